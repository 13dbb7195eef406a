"""`invgan red`: reverse engineering of deceptions (RED Table 1) on Ray Data, recorded in MLflow.

    config ─▶ attack dictionary D_a (built once on the driver, cached in the run folder, hash-checked)
           ─▶ shards of the test set ─▶ RedWorker actors: attack each example with every attack type,
              then per method (CNN, BSD-GAN from a Defense-GAN or an inverter start, SBSC) one row
           ─▶ Parquet rows ─▶ signal / attack-type accuracy tables, confusion matrix ─▶ MLflow

Rows: `jobs.schemas.RedRow`, one per (example, attack type, method).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import Field, model_validator

from invgan_core.checkpoint import load_model
from invgan_core.data import load_dataset
from invgan_core.red import (
    build_attack_dictionary,
    initial_latents,
    load_dictionary,
    red_solve,
    save_dictionary,
    sbsc_solve,
    signal_dictionary,
)
from invgan_core.red_theory import convergence_trace, mu_vs_output_dim, realizable_instance
from jobs.common import default_tracking_uri, runs_dir, start_mlflow
from jobs.config import AttackSpec, JobConfig, MlflowSpec, Resources, _Strict, load_config
from jobs.models import check_job_inputs, load_models, worker_device
from jobs.ray_session import quiet_ray_logging
from jobs.schemas import RED_ROWS
from jobs.sharded import JobOptions, JobResult, ShardedJob, job_main, run_sharded_job

Method = Literal["cnn", "bsd_gan", "bsd_gan_inverter", "sbsc"]
METHODS: tuple[Method, ...] = ("cnn", "bsd_gan", "bsd_gan_inverter", "sbsc")


class DictionarySpec(_Strict):
    per_class: int = Field(200, gt=0, description="training examples per class and attack type (paper: 200)")
    attacks: dict[str, AttackSpec]  # the attack types: their order is the type index j
    normalize_atoms: bool = Field(
        True,
        description="scale every column of D_a to unit ℓ2 norm (see the README: "
        "raw ℓ∞ atoms are longer, and ℓ2 attacks were classified ℓ∞)",
    )


class RedConfig(JobConfig):
    family_prefix: ClassVar[str] = "red"

    name: str
    dataset: str = "mnist5k"
    data_dir: Optional[Path] = None
    split: Literal["test", "validation"] = Field(
        "test", description="the examples attacked and explained; 'validation' inside a search (`invgan tune`)"
    )
    train_split: Literal["train", "fit"] = Field(
        "train",
        description="the images of the attack and signal dictionaries: 'fit' (train without its validation "
        "images) whenever split is 'validation', so no example is in a dictionary",
    )
    limit: Optional[int] = Field(None, gt=0)
    weights: Path = Path("weights/mnist5k")
    seed: int = 0
    shard_size: int = Field(16, gt=0)
    dictionary: DictionarySpec
    methods: list[Method] = list(METHODS)
    steps: int = Field(500, gt=0, description="Algorithm 1 iterations (App. B.2: 500)")
    lam_multiplier: float = Field(0.35, gt=0, description="λ = multiplier · λ_max (App. B.2: 0.35)")
    init_restarts: int = Field(10, gt=0, description="Defense-GAN start: restarts x init_steps (App. B.2: 10 x 100)")
    init_steps: int = Field(100, ge=0)
    sbsc_per_class: int = Field(50, gt=0, description="training images per class in SBSC's signal dictionary")
    resources: Resources = Resources()
    mlflow: MlflowSpec = MlflowSpec()

    @model_validator(mode="after")
    def _dictionaries_apart_from_the_examples(self) -> RedConfig:
        if self.split == "validation" and self.train_split != "fit":
            raise ValueError("split: validation needs train_split: fit (the validation images are part of 'train')")
        return self


def build_or_load_dictionary(cfg: RedConfig, run_dir: Path):
    """D_a from `per_class` training examples per class, cached as run_dir/dictionary.{safetensors,json}."""
    stem = run_dir / "dictionary"
    if stem.with_suffix(".json").exists():
        return load_dictionary(stem)[0]
    f, _ = load_model(cfg.weights_dir() / "classifier", kind="classifier")
    f.requires_grad_(False)
    train = load_dataset(cfg.dataset, cfg.train_split, cfg.data_dir)
    attacks = {name: spec.build(cfg.seed) for name, spec in cfg.dictionary.attacks.items()}
    print(
        f"building the attack dictionary: {len(attacks)} attacks x {cfg.dictionary.per_class} examples per class ...",
        flush=True,
    )
    dic = build_attack_dictionary(
        f,
        train.images,
        train.labels,
        attacks,
        cfg.dictionary.per_class,
        cfg.seed,
        ids=train.ids,
        normalize_atoms=cfg.dictionary.normalize_atoms,
    )
    save_dictionary(
        stem,
        dic,
        dataset=cfg.dataset,
        per_class=cfg.dictionary.per_class,
        normalize_atoms=cfg.dictionary.normalize_atoms,
        attacks={k: v.model_dump() for k, v in cfg.dictionary.attacks.items()},
    )
    return dic


class RedWorker:
    """Loads models, the dictionary and SBSC's signal dictionary once; per shard emits the rows."""

    def __init__(self, config: dict, run_dir: str):
        self.cfg = RedConfig.model_validate(config)
        res = self.cfg.resources
        torch.set_num_threads(res.torch_threads or max(1, int(res.num_cpus_per_worker)))
        self.device = worker_device(res)
        self.models = load_models(self.cfg, self.device)
        self.dic = load_dictionary(Path(run_dir) / "dictionary")[0]  # shipped to this node by the runner
        self.attacks = {name: spec.build(self.cfg.seed) for name, spec in self.cfg.dictionary.attacks.items()}
        self.data = load_dataset(self.cfg.dataset, self.cfg.split, self.cfg.data_dir).subset(self.cfg.limit)
        if "sbsc" in self.cfg.methods:
            train = load_dataset(self.cfg.dataset, self.cfg.train_split, self.cfg.data_dir)
            self.Ds, self.s_classes = signal_dictionary(
                train.images, train.labels, self.cfg.sbsc_per_class, self.cfg.seed
            )
            self.Ds = self.Ds.to(self.device)

    def run_shard(self, shard: int, start: int, stop: int) -> pd.DataFrame:
        x, y = self.data.images[start:stop].to(self.device), self.data.labels[start:stop].to(self.device)
        ids = torch.as_tensor(self.data.ids[start:stop], device=self.device)
        f = self.models["classifier"]
        inputs = {"clean": x} | {name: a(f, x, y, ids=ids).x_adv for name, a in self.attacks.items()}
        rows = []
        for attack_type, xa in inputs.items():
            for method in self.cfg.methods:
                t = time.perf_counter()
                signal, attack, loss = self._method(method, xa, ids)
                rows.append(
                    RED_ROWS.frame(
                        len(x),
                        example_id=ids.numpy(),
                        label=y.cpu().numpy(),
                        attack_type=attack_type,
                        signal_pred=signal.numpy(),
                        attack_pred=attack.numpy(),
                        method=method,
                        seconds=(time.perf_counter() - t) / len(x),
                        final_loss=loss.numpy(),
                        shard=shard,
                    )
                )
        return pd.concat(rows, ignore_index=True)

    def _method(self, method: str, x, ids):
        f, G, cfg = self.models["classifier"], self.models["generator"], self.cfg
        if method == "cnn":
            with torch.no_grad():
                no_type, no_loss = torch.full((len(x),), -1), torch.full((len(x),), float("nan"))  # CPU: row values
                return f(x).argmax(1).cpu(), no_type, no_loss
        if method == "sbsc":
            r = sbsc_solve(
                x, Ds=self.Ds, s_classes=self.s_classes, D=self.dic, lam_multiplier=cfg.lam_multiplier, steps=cfg.steps
            )
            assert r.signal_class is not None, "sbsc_solve always classifies the signal"
            return r.signal_class.cpu(), r.attack_type.cpu(), r.loss.cpu()
        init = self.models["inverter"] if method == "bsd_gan_inverter" else "defensegan"
        z0 = initial_latents(G, x, ids, init, cfg.seed, restarts=cfg.init_restarts, steps=cfg.init_steps)
        r = red_solve(G, x, D=self.dic, z0=z0, lam_multiplier=cfg.lam_multiplier, steps=cfg.steps, classifier=f)
        assert r.signal_class is not None, "red_solve classifies the signal when given the classifier"
        return r.signal_class.cpu(), r.attack_type.cpu(), r.loss.cpu()


# ---------------------------------------------------------------- results


def red_tables(rows: pd.DataFrame, attack_names: list[str]) -> dict:
    """RED Table 1: signal accuracy per method x input (clean + attacks), attack-type accuracy per method x attack."""
    signal = rows.assign(ok=rows.signal_pred == rows.label).pivot_table(
        index="method", columns="attack_type", values="ok", aggfunc="mean"
    )
    attacked = rows[(rows.attack_type != "clean") & (rows.method != "cnn")]
    truth = attacked.attack_type.map({n: j for j, n in enumerate(attack_names)})
    detect = attacked.assign(ok=attacked.attack_pred == truth).pivot_table(
        index="method", columns="attack_type", values="ok", aggfunc="mean"
    )
    order = ["clean", *attack_names]
    return {
        "signal_accuracy": signal.reindex(columns=order),
        "attack_accuracy": detect.reindex(columns=attack_names),
        "n": rows.groupby(["method", "attack_type"]).size().unstack().reindex(columns=order),
        "seconds_per_example": rows.pivot_table(index="method", columns="attack_type", values="seconds"),
    }


def confusion_figure(rows: pd.DataFrame, attack_names: list[str]):
    """Attack-type confusion matrix of every dictionary method (rows: true type, columns: predicted)."""
    from matplotlib.figure import Figure

    methods = [m for m in rows.method.unique() if m != "cnn"]
    fig = Figure(figsize=(3.6 * max(len(methods), 1), 3.4))
    axes = np.atleast_1d(fig.subplots(1, max(len(methods), 1)))
    J = len(attack_names)
    for ax, method in zip(axes, methods, strict=False):  # one axis even without methods
        sub = rows[(rows.method == method) & (rows.attack_type != "clean")]
        truth = sub.attack_type.map({n: j for j, n in enumerate(attack_names)}).to_numpy()
        m = np.zeros((J, J))
        np.add.at(m, (truth, sub.attack_pred.to_numpy()), 1)
        m = m / np.maximum(m.sum(1, keepdims=True), 1)
        ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
        for i in range(J):
            for j in range(J):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="white" if m[i, j] > 0.5 else "black")
        ax.set_xticks(range(J), attack_names)
        ax.set_yticks(range(J), attack_names)
        ax.set_xlabel("predicted attack type")
        ax.set_ylabel("true attack type")
        ax.set_title(method)
    fig.tight_layout()
    return fig


def _markdown(frame: pd.DataFrame, n: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, row in frame.iterrows():
        cells = [f"{row[c]:.3f} (n={int(n.loc[method, c])})" if pd.notna(row[c]) else "-" for c in cols]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_red(cfg: RedConfig, opts: JobOptions | None = None) -> JobResult:
    """Run (or resume) RED Table 1 for `cfg`: the rows, and the tables (DataFrames) as its summary's values."""
    opts = opts or JobOptions()
    quiet_ray_logging(opts.verbose)
    load_models(cfg)  # fail early on missing or altered weights
    data = load_dataset(cfg.dataset, cfg.split, cfg.data_dir).subset(cfg.limit)
    check_job_inputs(cfg, data)  # models that agree and images they can score, before any run folder
    per_example = (1 + len(cfg.dictionary.attacks)) * len(cfg.methods)
    attack_names = list(cfg.dictionary.attacks)  # their order is the attack-type index

    def finish(run_dir: Path, rows: pd.DataFrame, tracker, shards: dict) -> dict:
        tables = red_tables(rows, attack_names)
        if tracker is not None:
            _log(tracker, cfg, run_dir, rows, tables, attack_names)
        return {k: v.to_dict() for k, v in tables.items()}

    job = ShardedJob(
        kind="red",
        worker=RedWorker,
        worker_kwargs={"config": cfg.model_dump(mode="json")},
        schema=RED_ROWS,
        n_examples=len(data),
        expected=lambda a, b: (b - a) * per_example,
        prepare=lambda run_dir: build_or_load_dictionary(cfg, run_dir),
        ships=("dictionary.*",),
        finish=finish,
    )
    return run_sharded_job(cfg, job, opts)


def _log(tracker, cfg: RedConfig, run_dir: Path, rows: pd.DataFrame, tables: dict, attack_names: list[str]) -> None:
    from mlflow.entities import Metric

    client, run_id, now = tracker.client, tracker.run_id, int(time.time() * 1000)
    for table in ("signal_accuracy", "attack_accuracy"):
        client.log_batch(
            run_id,
            metrics=[
                Metric(f"{table}/{method}/{attack}", float(value), now, 0)
                for method, row in tables[table].iterrows()
                for attack, value in row.items()
                if pd.notna(value)
            ],
        )
        client.log_text(run_id, tables[table].reset_index().to_json(orient="split"), f"tables/{table}.json")
    client.log_figure(run_id, confusion_figure(rows, attack_names), "figures/attack_confusion.png")
    client.log_artifacts(run_id, str(run_dir / "rows"), "rows")
    theory = runs_dir() / "red-theory"  # figures of `invgan red-theory`, when it has been run
    for png in sorted(theory.glob("*.png")) if theory.is_dir() else []:
        client.log_artifact(run_id, str(png), "figures/theory")
    note = (
        f"### {cfg.name}\n\n**Signal accuracy** (CNN / BSD-GAN / SBSC)\n\n"
        + _markdown(tables["signal_accuracy"], tables["n"])
        + "\n\n**Attack-type accuracy** (BSD-GAN-AD / SBSAD)\n\n"
        + _markdown(tables["attack_accuracy"], tables["n"])
    )
    client.set_tag(run_id, "mlflow.note.content", note[:8000])


def show(cfg: RedConfig, res: JobResult) -> None:
    """The tables `invgan red` prints: signal and attack-type accuracy, n per cell."""
    tables = red_tables(res.rows, list(cfg.dictionary.attacks))
    print("\nSignal accuracy (CNN / BSD-GAN / SBSC)\n" + _markdown(tables["signal_accuracy"], tables["n"]))
    print("\nAttack-type accuracy (BSD-GAN-AD / SBSAD)\n" + _markdown(tables["attack_accuracy"], tables["n"]))


def main(config: Path, overrides: list[str], opts: JobOptions, *, limit: int | None = None) -> JobResult:
    """The `invgan red` command: validate, run or resume, print the tables and where results are."""
    return job_main("RED", lambda: load_config(config, overrides, model=RedConfig, limit=limit), run_red, show, opts)


# ---------------------------------------------------------------- theory figures (`invgan red-theory`)


def theory_figures(ms=(30, 50, 100, 200, 500, 1000), *, n: int = 10, steps: int = 1000, seed: int = 0) -> dict:
    """Fig. 1 (m vs mean μ, leaky ReLU and softplus β = 10) and linear convergence (log ||Δ||² vs k)."""
    from matplotlib.figure import Figure

    curves = {
        act: mu_vs_output_dim(ms, n=n, steps=steps, activation=act, seed=seed) for act in ("leaky_relu", "softplus")
    }
    fig_mu = Figure(figsize=(5, 4))
    ax = fig_mu.subplots()
    for act, c in curves.items():
        ax.plot(c["m"], c["mean_mu"], "o-", label=act if act == "leaky_relu" else "softplus (β = 10)")
    ax.set_xscale("log")
    ax.set_xlabel("output dimension m")
    ax.set_ylabel("mean μ along the path")
    ax.set_title("local error bound vs m (RED Fig. 1)")
    ax.legend()
    ax.grid(alpha=0.3)
    trace = convergence_trace(realizable_instance(100, 10, n, seed=seed), steps=steps, seed=seed)
    fig_conv = Figure(figsize=(5, 4))
    ax = fig_conv.subplots()
    for row in trace["dist2"]:
        ax.semilogy(row, alpha=0.6)
    ax.set_xlabel("iteration k")
    ax.set_ylabel("||Δz||² + ||Δc||²")
    ax.set_title(f"linear convergence, m = 100 (mean rate {trace['rate'].mean():.3f}/step)")
    ax.grid(alpha=0.3)
    numbers = {
        "m": [int(m) for m in ms],
        **{f"mean_mu/{a}": c["mean_mu"].tolist() for a, c in curves.items()},
        "rate_m100": float(trace["rate"].mean()),
        "attack_type_recovered": float(trace["attack_correct"].mean()),
    }
    return {"figures": {"mu_vs_m": fig_mu, "convergence": fig_conv}, "numbers": numbers}


def theory_main(out: Path, n: int, steps: int, log_mlflow: bool, tracking_uri: str | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result = theory_figures(n=n, steps=steps)
    for name, fig in result["figures"].items():
        fig.savefig(out / f"{name}.png", dpi=100)
    (out / "theory.json").write_text(json.dumps(result["numbers"], indent=2))
    print(json.dumps(result["numbers"], indent=2))
    print(f"figures: {out / 'mu_vs_m.png'}, {out / 'convergence.png'}")
    if log_mlflow:
        import mlflow

        start_mlflow(tracking_uri or default_tracking_uri(), "red-theory")
        with mlflow.start_run(run_name="red-theory") as run:
            for name, fig in result["figures"].items():
                mlflow.log_figure(fig, f"figures/{name}.png")
            mlflow.log_dict(result["numbers"], "theory.json")
            mlflow.log_metrics({"rate_m100": result["numbers"]["rate_m100"]})
            print(f"MLflow run {run.info.run_id} in experiment 'red-theory'")
