"""`invgan eval`: every attack against every defense, sharded over Ray Data, recorded in MLflow.

    config ─▶ run folder runs/<name>-<hash> ─▶ shards of the test set ─▶ ray.data map_batches(EvalWorker)
          ─▶ one Parquet file of rows per shard (atomic; a rerun skips finished shards)
          ─▶ driver: summary.json, tables, figures ─▶ MLflow (only the driver logs)

A shard is `shard_size` consecutive examples of the (limited) split. Every example's randomness
comes from (seed, example id), so the rows do not depend on the number of workers or shard order.
The shards run through the shared runner (jobs/sharded.py); on a cluster the same command runs as a
Ray job (`invgan submit -- eval ...`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from jobs.common import check_job_inputs
from jobs.config import BLACK_BOXES, EvalConfig, examples_in_shard
from jobs.models import build_defense, load_models
from jobs.sharded import (
    ShardStats,
    missing_shards,
    plan_shards,
    prepare_run_dir,
    quiet_ray_logging,
    read_rows,
    run_folder,
    run_shards,
    weights_hashes,
)
from jobs.tracking import recorded_run_id, where_to_open

ROW_COLUMNS = [
    "example_id",
    "label",
    "attack",
    "defense",
    "prediction",
    "correct",
    "detection_score",
    "l2",
    "linf",
    "effective_iterations",
    "seconds",
    "attack_seconds",
    "attacked",
    "queries",
    "shard",
    "diverged",
]
# A projection whose latent coordinate passes this (prior scale 1) has run away from every image G was trained to
# make, though float32 still holds it: a step size that blows up the projection. Its row is flagged `diverged`.
DIVERGED_LATENT = 100.0


# ---------------------------------------------------------------- the worker (one Ray actor)


class EvalWorker:
    """Loads the models once; per shard, runs every attack and defense and returns its rows."""

    def __init__(self, config: dict, run_dir: str | None = None):
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
        self.substitutes = load_substitutes(self.cfg, Path(run_dir) if run_dir else None, self.device)
        with torch.no_grad():  # warm up torch's kernels so the first shard's seconds are not inflated
            f(G(G.sample_latent(2)))

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
            at = examples_in_shard(spec, start, stop, len(self.data))  # spread over the split (attack `limit`)
            if not at:
                continue
            xs, ys, ids_s = x[at], y[at], ids[at]
            if spec.kind in BLACK_BOXES:  # trained on the driver against each oracle: FGSM on it, transferred
                for oracle in substitute_oracles(self.cfg, name):
                    sub, queries = self.substitutes[(name, oracle)]
                    target = self.models["classifier"] if oracle == "classifier" else self.defenses[oracle]
                    result, secs = _transfer(attack, sub, target, xs, ys, ids_s, queries)
                    for dname in [oracle] if spec.target == "each" else list(self.defenses):
                        defense = self.defenses[dname]
                        rows += self._rows(
                            shard, name, dname, defense, xs, ys, ids_s, result, secs, reuse=dname == oracle
                        )
            elif spec.target == "each":  # end to end against each defense: rows for that defense only
                for dname, defense in self.defenses.items():
                    result, secs = _attack(attack, defense, xs, ys, ids_s)
                    rows += self._rows(shard, name, dname, defense, xs, ys, ids_s, result, secs, reuse=True)
            else:  # computed once (against the classifier or one defense), fed to every defense
                target = self.models["classifier"] if spec.target == "classifier" else self.defenses[spec.target]
                result, secs = _attack(attack, target, xs, ys, ids_s)
                for dname, defense in self.defenses.items():
                    rows += self._rows(
                        shard, name, dname, defense, xs, ys, ids_s, result, secs, reuse=dname == spec.target
                    )
        return pd.DataFrame(rows, columns=ROW_COLUMNS)

    def _rows(
        self, shard, attack_name, defense_name, defense, x, y, ids, result, attack_secs, *, reuse: bool = False
    ) -> list[tuple]:
        """`reuse`: the defense is the attack's target, whose success check already purified x_adv (same
        defense, input and ids; a deterministic projection): take that result instead of projecting again.
        Its seconds are the row's `seconds` (and not in `attack_seconds`: see `_attack`)."""
        import torch

        from invgan_core.detection import detection_scores

        x_in = x if result is None else result.x_adv
        if reuse and result is not None and result.purified is not None:
            purified, secs = result.purified, result.purify_seconds
        else:
            purified, secs = _timed(lambda: defense.purify(x_in, ids))
        with torch.no_grad():
            logits = self.models["classifier"](purified.x)
        pred, diverged = logits.argmax(1).cpu(), diverged_rows(x_in, purified, logits).cpu()
        if purified.z is None:
            scores = torch.full((len(x),), float("nan"))
        else:
            scores = detection_scores(self.models["classifier"], x_in, purified.x, self.cfg.detection_space).cpu()
        n = len(x)
        l2 = result.l2.cpu() if result is not None else torch.zeros(n)
        linf = result.linf.cpu() if result is not None else torch.zeros(n)
        queries = result.queries.cpu() if result is not None else torch.zeros(n, dtype=torch.int64)
        # restart-steps spent on each example (they differ with Defense-GAN's pruning or early stopping)
        iters = (
            purified.iterations.cpu().tolist()
            if purified.iterations is not None
            else [purified.effective_iterations] * n
        )
        y = y.cpu()
        return [
            (
                int(ids[i]),
                int(y[i]),
                attack_name,
                defense_name,
                int(pred[i]),
                bool(pred[i] == y[i]),
                float(scores[i]),
                float(l2[i]),
                float(linf[i]),
                int(round(iters[i])),
                secs / n,
                attack_secs / n,
                result is not None,
                int(queries[i]),
                shard,
                bool(diverged[i]),
            )
            for i in range(n)
        ]


def diverged_rows(x_in, purified, logits):
    """(N,) bool: the attack or the projection blew up (NaN or ±∞ in the attacked input, the projection, its
    latent or the logits, or a latent beyond DIVERGED_LATENT). Such rows are counted, never scored."""
    import torch

    def nonfinite(t):
        return ~torch.isfinite(t.flatten(1)).all(1)

    bad = nonfinite(x_in) | nonfinite(purified.x) | nonfinite(logits)
    if purified.z is not None:
        bad |= nonfinite(purified.z) | (purified.z.flatten(1).abs().amax(1) > DIVERGED_LATENT)
    return bad


def _attack(attack, target, x, y, ids):
    """The attack's result and seconds, less the seconds of the target's purification in its success check:
    the target's row reports that purification as its `seconds`, so attack_seconds + seconds count it once."""
    result, secs = _timed(lambda: attack(target, x, y, ids=ids))
    return result, secs - result.purify_seconds


def _transfer(attack, sub, target, x, y, ids, queries):
    """A trained substitute's attack and seconds, less the target's purification (as in `_attack`)."""
    result, secs = _timed(lambda: attack.transfer(sub, target, x, y, ids=ids, queries=queries))
    return result, secs - result.purify_seconds


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


# ---------------------------------------------------------------- black boxes, trained once on the driver

SUBSTITUTES = "substitutes"  # the run folder's subfolder of trained substitutes: <attack>-<oracle>.{safetensors,json}


def substitute_oracles(cfg: EvalConfig, name: str) -> list[str]:
    """Whose labels attack `name` trains on: 'classifier', its defense, or every defense (`each`)."""
    target = cfg.attacks[name].target
    return list(cfg.defenses) if target == "each" else [target]


def substitute_seeds(cfg: EvalConfig, full, n: int) -> dict[str, slice]:
    """Each substitute attack's seed set: the split's last `seeds` images (the split is class-interleaved, so
    any stretch of it is stratified), which must not be among the n evaluated ones (the first n).
    ValueError naming the attack and the fix, before any work."""
    out = {}
    for name, spec in cfg.attacks.items():
        if spec.kind in BLACK_BOXES:
            k = spec.build(cfg.seed).seeds
            if n + k > len(full):
                raise ValueError(
                    f"attacks.{name}: the substitute's {k} seed images are the split's last {k}, which must not "
                    f"be evaluated; the split has {len(full)} images and {n} are evaluated: set limit <= "
                    f"{len(full) - k} or fewer seeds (attacks.{name}.params.seeds)"
                )
            out[name] = slice(len(full) - k, len(full))
    return out


def prepare_substitutes(
    cfg: EvalConfig, models: dict, full, seeds: dict[str, slice], run_dir: Path, device="cpu"
) -> None:
    """Train every substitute attack against each of its oracles, once per run (saved in the run folder and
    reused by every shard and every resume): Papernot et al.'s protocol, on the labels of the oracle, from the
    seed images `substitute_seeds` chose."""
    import sys

    import torch

    from invgan_core.checkpoint import read_manifest, save_model
    from invgan_core.models import build_model, default_arch

    G, I, f = models["generator"], models.get("inverter"), models["classifier"]
    shape = tuple(read_manifest(cfg.weights_dir() / "classifier")["arch"]["image_shape"])
    for name, where in seeds.items():
        for oracle in substitute_oracles(cfg, name):
            stem = run_dir / SUBSTITUTES / f"{name}-{oracle}"
            if stem.with_suffix(".json").exists():
                continue
            attack = cfg.attacks[name].build(cfg.seed)
            torch.manual_seed(cfg.seed)
            arch = default_arch("classifier", shape)  # the target's architecture family, fresh weights
            attack.substitute = build_model("classifier", arch)
            attack.seed_images = full.images[where].to(device)
            target = f if oracle == "classifier" else build_defense(cfg.defenses[oracle], G, I, f, cfg.seed)
            print(
                f"training the substitute of {name} on the labels of {oracle} "
                f"({attack.oracle_queries()} oracle queries) ...",
                file=sys.stderr,
                flush=True,
            )
            started = time.perf_counter()
            sub = attack.train(target, device)
            save_model(
                stem,
                sub,
                kind="classifier",
                arch=arch,
                oracle=oracle,
                oracle_queries=attack.queries_spent,
                seed_ids=[int(full.ids[where.start]), int(full.ids[where.stop - 1])],
                seconds=round(time.perf_counter() - started, 1),
            )


def load_substitutes(cfg: EvalConfig, run_dir: Path | None, device) -> dict:
    """{(attack, oracle): (substitute, oracle queries)} from the run folder, hash-verified."""
    from invgan_core.checkpoint import load_model

    out = {}
    for name, spec in cfg.attacks.items():
        if spec.kind not in BLACK_BOXES:
            continue
        if run_dir is None:
            raise ValueError(f"attacks.{name}: a substitute attack needs the run folder its substitute is trained in")
        for oracle in substitute_oracles(cfg, name):
            model, manifest = load_model(
                run_dir / SUBSTITUTES / f"{name}-{oracle}", kind="classifier", map_location=device
            )
            out[(name, oracle)] = (model.requires_grad_(False), int(manifest["oracle_queries"]))
    return out


# ---------------------------------------------------------------- the driver


@dataclass
class Results:
    run_dir: Path
    rows: pd.DataFrame
    summary: dict
    mlflow_run_id: str | None
    computed_shards: int
    skipped_shards: int
    retried_shards: int = 0


def expected_rows(cfg: EvalConfig, start: int, stop: int, n: int) -> int:
    """Rows a complete shard holds (of a split of n examples): clean x defenses, plus each attack's examples in
    the shard x defenses it covers."""
    return len(cfg.defenses) * (
        (stop - start) + sum(len(examples_in_shard(s, start, stop, n)) for s in cfg.attacks.values())
    )


def evaluate(
    cfg: EvalConfig,
    *,
    out: Path | None = None,
    address: str | None = None,
    progress: bool = True,
    log_mlflow: bool = True,
    verbose: bool = False,
    on_shard=None,
) -> Results:
    """Run (or resume) the evaluation described by `cfg`; returns the rows and their summary.
    `on_shard(progress)` is called after every shard (another job's MLflow run, e.g. curves')."""
    from invgan_core.data import load_dataset
    from jobs.common import git_commit
    from jobs.tracking import job_run

    quiet_ray_logging(verbose)
    models = load_models(cfg)  # fail on a missing or altered weights file before any Ray work
    full = load_dataset(cfg.dataset, cfg.split, cfg.data_dir)
    data = full.subset(cfg.limit)
    check_job_inputs(cfg, data)  # models that agree and images they can score, before any Ray work
    n = len(data)
    seeds = substitute_seeds(cfg, full, n)  # seed images apart from the evaluated ones, checked before any work
    run_dir = run_folder(cfg, out)
    prepare_run_dir(cfg, run_dir)
    shards = plan_shards(n, cfg.shard_size)
    todo = missing_shards(run_dir, shards)
    tags = {
        "dataset": cfg.dataset,
        "defenses": ",".join(cfg.defenses),
        "attacks": ",".join(cfg.attacks),
        "git_commit": git_commit(),
        "config_hash": cfg.config_hash(),
        "kind": "eval",
        **{f"weights.{k}.sha256": h for k, h in weights_hashes(cfg).items()},
    }
    with job_run(cfg, run_dir, enabled=log_mlflow, tags=tags) as tracker:
        stats = ShardStats()
        if todo:
            prepare_substitutes(cfg, models, full, seeds, run_dir)
            stats = run_shards(
                todo,
                run_dir,
                worker=EvalWorker,
                worker_kwargs={"config": cfg.model_dump(mode="json"), "run_dir": str(run_dir)},
                resources=cfg.resources,
                expected=lambda a, b: expected_rows(cfg, a, b, n),
                columns=ROW_COLUMNS,
                desc=f"eval {cfg.name}",
                address=address,
                progress=progress,
                verbose=verbose,
                on_shard=tracker.progress if tracker else on_shard,
            )
        rows = read_rows(run_dir, ROW_COLUMNS)
        shards_info = {
            "total": len(shards),
            "computed": stats.computed,
            "reused": len(shards) - len(todo),
            "retried": stats.retried,
            "lost_workers": stats.lost,
            "failed_attempts": {str(k): v for k, v in stats.failed.items()},
        }
        summary = finish(cfg, run_dir, rows, tracker, models, shards_info)
    run_id = tracker.run_id if tracker else recorded_run_id(run_dir)
    return Results(run_dir, rows, summary, run_id, len(todo), len(shards) - len(todo), stats.retried)


def finish(cfg: EvalConfig, run_dir: Path, rows: pd.DataFrame, tracker, models: dict, shards_info: dict) -> dict:
    """Summary, figures and the MLflow records, all derived from the rows."""
    from jobs import masking, run_tables

    headline = rows[~rows["attack"].map(masking.is_check)]  # check/ attacks only feed the masking flags
    summary = run_tables.summarize(headline)
    flags = masking_flags(cfg, rows)
    summary["masking"] = masking.flags_summary(flags)
    if tracker is not None:
        figures = {"roc": run_tables.roc_figure(headline), "images": example_grid(cfg, models)}
        run_tables.log_results(
            tracker.client,
            tracker.run_id,
            summary=summary,
            rows_dir=run_dir / "rows",
            run_name=f"{cfg.name}-{cfg.config_hash()[:8]}",
            figures=figures,
            tags={
                "shards_retried": shards_info["retried"],
                "nodes": rows["node"].nunique() if "node" in rows else 0,
                "masking_flags": len(summary["masking"]["flagged"]),
            },
        )
        tracker.client.log_text(tracker.run_id, masking.flags_markdown(flags), "masking.md")
    # a rerun without MLflow keeps the link to the run logged before
    run_id = tracker.run_id if tracker is not None else recorded_run_id(run_dir)
    run_tables.write_summary(
        run_dir / "summary.json",
        summary,
        {"mlflow_run_id": run_id, "config_hash": cfg.config_hash(), "shards": shards_info},
    )
    return summary


def masking_text(masking: dict | None) -> str:
    """The masking flags of a summary as printed after the tables."""
    if not masking or not masking["checks"]:
        return "Gradient-masking checks: none applied (add comparable attacks or masking_checks: to the config)"
    flagged = masking["flagged"]
    lines = [
        f"Gradient-masking checks: {masking['checks']} run, {len(flagged)} flagged"
        + (" (see jobs/masking.py for what each means)" if flagged else "")
    ]
    lines += [
        f"  FLAG {f['defense']}: {f['check']} — {f['attack']} {f['acc']:.2f} vs {f['compared_with']} "
        f"{f['acc_other']:.2f} (n={f['n']})"
        for f in flagged
    ]
    return "\n".join(lines)


def masking_flags(cfg: EvalConfig, rows: pd.DataFrame) -> pd.DataFrame:
    """The gradient-masking checks (jobs/masking.py) of this config's attacks over its rows."""
    from jobs import masking
    from jobs.config import MaskingChecks

    m = cfg.masking_checks or MaskingChecks()
    specs = {name: spec.model_dump(mode="json", exclude_none=True) for name, spec in cfg.attacks.items()}
    kinds = {name: spec.kind for name, spec in cfg.defenses.items()}
    return masking.masking_flags(rows, specs, tol=m.tol, floor=m.floor, defense_kinds=kinds)


def example_grid(cfg: EvalConfig, models: dict, n: int = 6):
    """Clean / attacked / projected images of the first n examples (InvGAN Fig. 2), first attack vs classifier."""
    import torch

    from invgan_core.data import load_dataset
    from jobs import run_tables

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
    return run_tables.image_grid(x.numpy(), {k: v.numpy() for k, v in attacked.items()}, projected, labels=y.numpy())


def main(
    config: Path,
    overrides: list[str],
    limit: int | None,
    out: Path | None,
    address: str | None,
    tracking_uri: str | None,
    log_mlflow: bool,
    progress: bool,
    verbose: bool = False,
) -> None:
    """The `invgan eval` command: validate, run or resume, print the tables and where results are."""
    from pydantic import ValidationError

    from jobs import run_tables
    from jobs.config import load_config

    try:
        cfg = load_config(config, overrides, limit=limit)
        if tracking_uri:
            cfg.mlflow.tracking_uri = tracking_uri
    except (ValidationError, ValueError, FileNotFoundError) as err:
        from jobs.config import describe_error

        raise SystemExit(f"invalid evaluation config: {describe_error(err)}") from None
    from jobs.common import user_errors

    with user_errors(config, run_folder(cfg, out), verbose=verbose):
        res = evaluate(cfg, out=out, address=address, progress=progress, log_mlflow=log_mlflow, verbose=verbose)
    print(f"\nAccuracy ({cfg.dataset}, n per cell in brackets)\n" + run_tables.markdown_table(res.summary, "accuracy"))
    if res.summary.get("auc"):
        print("\nDetection ROC AUC, clean vs attacked\n" + run_tables.markdown_table(res.summary, "auc"))
    print("\n" + masking_text(res.summary.get("masking")))
    retried = f", {res.retried_shards} run again (see summary.json: shards)" if res.retried_shards else ""
    print(f"\nshards: {res.computed_shards} computed, {res.skipped_shards} reused{retried}")
    print(f"run folder: {res.run_dir}")
    if res.mlflow_run_id:
        print(
            f"MLflow run {res.mlflow_run_id} in experiment {cfg.family!r}; open with: "
            f"{where_to_open(cfg.mlflow.tracking_uri)}"
        )
