"""`invgan eval`: every attack against every defense, sharded over Ray Data, recorded in MLflow.

    config ─▶ run folder runs/<name>-<hash> ─▶ shards of the test set ─▶ ray.data map_batches(EvalWorker)
          ─▶ one Parquet file of rows per shard (atomic; a rerun skips finished shards)
          ─▶ driver: summary.json, tables, figures ─▶ MLflow (only the driver logs)

A shard is `shard_size` consecutive examples of the (limited) split. Every example's randomness
comes from (seed, example id), so the rows do not depend on the number of workers or shard order.
Also runnable as `python -m jobs.evaluate --config ...` (what `ray job submit` runs on a cluster).
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from invgan_core.checkpoint import atomic_write_bytes
from jobs.common import default_tracking_uri, runs_dir
from jobs.config import EvalConfig, examples_in_shard

ROW_COLUMNS = ["example_id", "label", "attack", "defense", "prediction", "correct", "detection_score", "l2", "linf",
               "effective_iterations", "seconds", "attack_seconds", "attacked", "queries", "shard"]


# ---------------------------------------------------------------- the worker (one Ray actor)

class EvalWorker:
    """Loads the models once; per shard, runs every attack and defense and returns its rows."""

    def __init__(self, config: dict):
        import torch

        from invgan_core.data import load_dataset
        from jobs.config import EvalConfig

        self.cfg = EvalConfig.model_validate(config)
        res = self.cfg.resources
        torch.set_num_threads(res.torch_threads or max(1, int(res.num_cpus_per_worker)))
        self.device = torch.device("cuda" if res.num_gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")
        self.models = load_models(self.cfg, self.device)
        self.data = load_dataset(self.cfg.dataset, self.cfg.split, self.cfg.data_dir).subset(self.cfg.limit)
        G, I, f = self.models["generator"], self.models.get("inverter"), self.models["classifier"]
        self.defenses = {name: build_defense(spec, G, I, f, self.cfg.seed) for name, spec in self.cfg.defenses.items()}
        self.attacks = {name: spec.build(self.cfg.seed) for name, spec in self.cfg.attacks.items()}
        with torch.no_grad():  # warm up torch's kernels so the first shard's seconds are not inflated
            f(G(G.sample_latent(2)))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        frames = [self.run_shard(int(r.shard), int(r.start), int(r.stop)) for r in batch.itertuples()]
        return pd.concat(frames, ignore_index=True)

    def run_shard(self, shard: int, start: int, stop: int) -> pd.DataFrame:
        import torch

        x = self.data.images[start:stop].to(self.device)
        y = self.data.labels[start:stop].to(self.device)
        ids = torch.as_tensor(self.data.ids[start:stop])
        rows = []
        for name, defense in self.defenses.items():  # clean inputs
            rows += self._rows(shard, "clean", name, defense, x, y, ids, None, 0.0)
        for name, attack in self.attacks.items():
            spec = self.cfg.attacks[name]
            n = examples_in_shard(spec, start, stop)
            if n == 0:
                continue
            xs, ys, ids_s = x[:n], y[:n], ids[:n]
            if spec.target == "each":  # end to end against each defense: rows for that defense only
                for dname, defense in self.defenses.items():
                    result, secs = _timed(lambda: attack(defense, xs, ys, ids=ids_s))
                    rows += self._rows(shard, name, dname, defense, xs, ys, ids_s, result, secs)
            else:  # computed once (against the classifier or one defense), fed to every defense
                target = self.models["classifier"] if spec.target == "classifier" else self.defenses[spec.target]
                result, secs = _timed(lambda: attack(target, xs, ys, ids=ids_s))
                for dname, defense in self.defenses.items():
                    rows += self._rows(shard, name, dname, defense, xs, ys, ids_s, result, secs)
        return pd.DataFrame(rows, columns=ROW_COLUMNS)

    def _rows(self, shard, attack_name, defense_name, defense, x, y, ids, result, attack_secs) -> list[tuple]:
        import torch

        from invgan_core.detection import detection_scores

        x_in = x if result is None else result.x_adv
        purified, secs = _timed(lambda: defense.purify(x_in, ids))
        with torch.no_grad():
            pred = self.models["classifier"](purified.x).argmax(1).cpu()
        if purified.z is None:
            scores = torch.full((len(x),), float("nan"))
        else:
            scores = detection_scores(self.models["classifier"], x_in, purified.x, self.cfg.detection_space).cpu()
        n = len(x)
        l2 = result.l2.cpu() if result is not None else torch.zeros(n)
        linf = result.linf.cpu() if result is not None else torch.zeros(n)
        queries = result.queries.cpu() if result is not None else torch.zeros(n, dtype=torch.int64)
        y = y.cpu()
        return [(int(ids[i]), int(y[i]), attack_name, defense_name, int(pred[i]), bool(pred[i] == y[i]),
                 float(scores[i]), float(l2[i]), float(linf[i]), int(purified.effective_iterations), secs / n,
                 attack_secs / n, result is not None, int(queries[i]), shard) for i in range(n)]


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def load_models(cfg: EvalConfig, device="cpu") -> dict:
    """G, f and (if shipped) I from the config's weights folder, hash-verified."""
    from invgan_core.checkpoint import load_model

    root = cfg.weights_dir()
    models = {}
    for kind in ("generator", "classifier", "inverter"):
        if kind == "inverter" and not (root / "inverter.json").exists():
            continue
        model, _ = load_model(root / kind, kind=kind, map_location=device)
        models[kind] = model.requires_grad_(False)
    return models


def build_defense(spec, G, I, f, seed: int):
    from jobs.config import DEFENSES

    cls = DEFENSES[spec.kind]
    if spec.kind == "none":
        return cls(f, **spec.params)
    if spec.kind == "invgan":
        if I is None:
            raise ValueError("defense kind 'invgan' needs an inverter in the weights folder")
        return cls(G, I, f, seed=seed, **spec.params)
    return cls(G, f, seed=seed, **spec.params)


# ---------------------------------------------------------------- the driver

@dataclass
class Results:
    run_dir: Path
    rows: pd.DataFrame
    summary: dict
    mlflow_run_id: str | None
    computed_shards: int
    skipped_shards: int


def run_folder(cfg, out: Path | None) -> Path:
    """--out, or runs/<name>-<config hash> (any job config)."""
    return Path(out) if out else runs_dir() / f"{cfg.name}-{cfg.config_hash()[:12]}"


def plan_shards(n_examples: int, shard_size: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) covering positions 0..n-1 in order."""
    return [(k, k * shard_size, min(n_examples, (k + 1) * shard_size)) for k in range(math.ceil(n_examples / shard_size))]


def shard_path(run_dir: Path, shard: int) -> Path:
    return run_dir / "rows" / f"shard-{shard:05d}.parquet"


def expected_rows(cfg: EvalConfig, start: int, stop: int) -> int:
    """Rows a complete shard holds: clean x defenses, plus each attack's examples x defenses it covers."""
    return len(cfg.defenses) * ((stop - start) + sum(examples_in_shard(s, start, stop) for s in cfg.attacks.values()))


def write_shard(path: Path, frame: pd.DataFrame) -> None:
    """Parquet bytes written atomically (temp file, fsync, rename): a shard file is complete or absent."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def weights_hashes(cfg) -> dict[str, str]:
    """sha256 of every model file the job uses, from the (verified) manifests."""
    root = cfg.weights_dir()
    return {k: json.loads((root / f"{k}.json").read_text())["sha256"]
            for k in ("generator", "classifier", "inverter") if (root / f"{k}.json").exists()}


def prepare_run_dir(cfg, run_dir: Path) -> None:
    """Create the run folder, or check that the one found holds the same config and the same weights
    (so a resume never mixes rows of two configs, or of weights retrained in place)."""
    from invgan_core.checkpoint import atomic_write_json

    recorded = run_dir / "config.json"
    current = {"config_hash": cfg.config_hash(), "weights_sha256": weights_hashes(cfg), "config": cfg.model_dump(mode="json")}
    if recorded.exists():
        previous = json.loads(recorded.read_text())
        if previous.get("config_hash") != current["config_hash"]:
            raise SystemExit(f"{run_dir} holds results of a different config ({previous.get('config_hash', '?')[:12]});"
                             " choose another --out or delete the folder")
        if previous.get("weights_sha256", current["weights_sha256"]) != current["weights_sha256"]:
            raise SystemExit(f"{run_dir} holds results of other weights than {cfg.weights_dir()} now has;"
                             " choose another --out or delete the folder")
    else:
        atomic_write_json(recorded, current)


def compute_shards(todo: list[tuple[int, int, int]], run_dir: Path, address: str | None, progress: bool, *,
                   worker: type, worker_kwargs: dict, resources, expected: Callable[[int, int], int],
                   columns: list[str], desc: str) -> None:
    """Run the missing shards through Ray Data (`worker` actors, one shard per call); the driver writes
    each shard's rows as they arrive, after checking the shard holds the `expected(start, stop)` rows."""
    import ray
    from tqdm.auto import tqdm

    started_here = False
    if not ray.is_initialized():
        # a local instance leaves one CPU for Ray Data's own tasks beside the actors
        cpus = int(math.ceil(resources.num_workers * resources.num_cpus_per_worker)) + 1
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **({} if address else {"num_cpus": cpus}))
        started_here = True
    try:
        items = [{"shard": k, "start": a, "stop": b} for k, a, b in todo]
        rows = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            worker, fn_constructor_kwargs=worker_kwargs, batch_size=1, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=min(resources.num_workers, len(items))),
            num_cpus=resources.num_cpus_per_worker, num_gpus=resources.num_gpus_per_worker,
        )
        bounds = {k: (a, b) for k, a, b in todo}
        with tqdm(total=len(todo), desc=desc, unit="shard", disable=not progress) as bar:
            for batch in rows.iter_batches(batch_size=None, batch_format="pandas"):
                for shard, frame in batch.groupby("shard"):
                    a, b = bounds[int(shard)]
                    if len(frame) != expected(a, b):
                        raise RuntimeError(f"shard {shard}: {len(frame)} rows, expected {expected(a, b)}")
                    write_shard(shard_path(run_dir, int(shard)), frame[columns].reset_index(drop=True))
                    bar.update(1)
    finally:
        if started_here:
            ray.shutdown()


def read_rows(run_dir: Path, columns: list[str] = ROW_COLUMNS) -> pd.DataFrame:
    files = sorted((run_dir / "rows").glob("shard-*.parquet"))
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True) if files else pd.DataFrame(columns=columns)


def evaluate(cfg: EvalConfig, *, out: Path | None = None, address: str | None = None, progress: bool = True,
             log_mlflow: bool = True) -> Results:
    """Run (or resume) the evaluation described by `cfg`; returns the rows and their summary."""
    from invgan_core.data import load_dataset

    models = load_models(cfg)  # fail on a missing or altered weights file before any Ray work
    n = len(load_dataset(cfg.dataset, cfg.split, cfg.data_dir).subset(cfg.limit))
    run_dir = run_folder(cfg, out)
    prepare_run_dir(cfg, run_dir)
    shards = plan_shards(n, cfg.shard_size)
    todo = [s for s in shards if not shard_path(run_dir, s[0]).exists()]
    if todo:
        compute_shards(todo, run_dir, address, progress, worker=EvalWorker,
                       worker_kwargs={"config": cfg.model_dump(mode="json")}, resources=cfg.resources,
                       expected=lambda a, b: expected_rows(cfg, a, b), columns=ROW_COLUMNS, desc=f"eval {cfg.name}")
    rows = read_rows(run_dir)
    summary, run_id = finish(cfg, run_dir, rows, log_mlflow, models)
    return Results(run_dir, rows, summary, run_id, len(todo), len(shards) - len(todo))


def finish(cfg: EvalConfig, run_dir: Path, rows: pd.DataFrame, log_mlflow: bool, models: dict) -> tuple[dict, str | None]:
    """Summary, figures and the MLflow run, all derived from the rows."""
    from jobs import report
    from jobs.common import git_commit

    summary = report.summarize(rows)
    run_id = recorded_run_id(run_dir)  # a rerun without MLflow keeps the link to the run logged before
    if log_mlflow:
        figures = {"roc": report.roc_figure(rows), "images": example_grid(cfg, models)}
        tags = {"dataset": cfg.dataset, "defenses": ",".join(cfg.defenses), "attacks": ",".join(cfg.attacks),
                "git_commit": git_commit(), "config_hash": cfg.config_hash(),
                **{f"weights.{k}.sha256": h for k, h in weights_hashes(cfg).items()}}
        prior_id = previous_run_id(run_dir, cfg.mlflow.tracking_uri or default_tracking_uri())
        run_id = report.log_to_mlflow(
            summary=summary, rows_dir=run_dir / "rows", config_dict=cfg.model_dump(mode="json"),
            run_name=f"{cfg.name}-{cfg.config_hash()[:8]}", experiment=cfg.family,
            tracking_uri=cfg.mlflow.tracking_uri or default_tracking_uri(), tags=tags, figures=figures, run_id=prior_id)
    report.write_summary(run_dir / "summary.json", summary, {"mlflow_run_id": run_id, "config_hash": cfg.config_hash()})
    return summary, run_id


def recorded_run_id(run_dir: Path) -> str | None:
    """The MLflow run id summary.json records for this run folder, if any."""
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()).get("mlflow_run_id") if summary.exists() else None


def previous_run_id(run_dir: Path, tracking_uri: str) -> str | None:
    """The MLflow run a previous pass over this run folder logged to, if that run is in this store
    (a rerun continues it; a run recorded in another store, e.g. another --tracking-uri, is not)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_id = recorded_run_id(run_dir)
    if not run_id:
        return None
    try:
        MlflowClient(tracking_uri).get_run(run_id)
        return run_id
    except MlflowException:
        return None


def example_grid(cfg: EvalConfig, models: dict, n: int = 6):
    """Clean / attacked / projected images of the first n examples (InvGAN Fig. 2), first attack vs classifier."""
    import torch

    from invgan_core.data import load_dataset
    from jobs import report

    data = load_dataset(cfg.dataset, cfg.split, cfg.data_dir).subset(min(n, cfg.limit or n))
    x, y, ids = data.images, data.labels, torch.as_tensor(data.ids)
    name = next((k for k, s in cfg.attacks.items() if s.target == "classifier"), None)
    attacked = {name: cfg.attacks[name].build(cfg.seed)(models["classifier"], x, y, ids=ids).x_adv} if name else {}
    x_in = attacked[name] if name else x
    projected = {}
    for dname, spec in cfg.defenses.items():
        if spec.kind != "none":
            d = build_defense(spec, models["generator"], models.get("inverter"), models["classifier"], cfg.seed)
            projected[dname] = d.purify(x_in, ids).x.numpy()
    return report.image_grid(x.numpy(), {k: v.numpy() for k, v in attacked.items()}, projected, labels=y.numpy())


def main(config: Path, overrides: list[str], limit: int | None, out: Path | None, address: str | None,
         tracking_uri: str | None, log_mlflow: bool, progress: bool) -> None:
    """The `invgan eval` command: validate, run or resume, print the tables and where results are."""
    from pydantic import ValidationError

    from jobs import report
    from jobs.config import load_config

    try:
        cfg = load_config(config, overrides, limit=limit)
        if tracking_uri:
            cfg.mlflow.tracking_uri = tracking_uri
    except (ValidationError, ValueError, FileNotFoundError) as err:
        raise SystemExit(f"invalid evaluation config: {err}") from None
    try:
        res = evaluate(cfg, out=out, address=address, progress=progress, log_mlflow=log_mlflow)
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted; finished shards are kept in {run_folder(cfg, out)}: rerun the same command to resume")
    print(f"\nAccuracy ({cfg.dataset}, n per cell in brackets)\n" + report.markdown_table(res.summary, "accuracy"))
    if res.summary.get("auc"):
        print("\nDetection ROC AUC, clean vs attacked\n" + report.markdown_table(res.summary, "auc"))
    print(f"\nshards: {res.computed_shards} computed, {res.skipped_shards} reused")
    print(f"run folder: {res.run_dir}")
    if res.mlflow_run_id:
        uri = cfg.mlflow.tracking_uri or default_tracking_uri()
        print(f"MLflow run {res.mlflow_run_id} in experiment {cfg.family!r} ({uri}); open with: invgan ui")


if __name__ == "__main__":
    import sys

    from invgan.cli import app

    sys.exit(app(["eval", *sys.argv[1:]]))
