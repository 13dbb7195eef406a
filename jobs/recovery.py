"""`invgan recovery`: Lipton & Tripathi's latent-recovery tables on a uniform-prior generator.

    Table 1: z ~ U[-1, 1]^d, target G(z), z' by gradient descent on ||G(z') - G(z)||² from a random start in
             the box, with no clipping / standard clipping / stochastic clipping; the fraction of trials with
             ||z - z'||² / d < ε, for each ε.
    Table 2: real images (not G's outputs), recovered from many random starts each; the mean pairwise
             distance ||z'_i - z'_j||₂ / d of the recoveries of one image, beside that of random box vectors.

All trials go through G as one batch (`invgan_core.inversion.project`); every start and stochastic-clipping
draw comes from (seed, trial id), so the rows do not depend on the batch. Results are rows (one per trial
and constraint; one per recovery for Table 2), written to <runs>/<name>-<hash>/rows.parquet; the tables
are derived from them, and everything is logged to MLflow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal, Optional

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from invgan_core import rng
from invgan_core.checkpoint import atomic_write_json, load_model
from invgan_core.data import load_dataset
from invgan_core.inversion import per_example_mse, project
from jobs import storage
from jobs.common import git_commit
from jobs.config import JobConfig, MlflowSpec, load_config
from jobs.run_folder import run_folder, write_shard
from jobs.sharded import JobOptions, JobResult, job_main
from jobs.tracking import job_run, recorded_run_id

Constraint = Literal["none", "clip", "stochastic_clip"]
TARGET_STREAM = 1_000_003  # the targets' seed offset: never the same draws as the starts


class RecoveryConfig(JobConfig):
    family_prefix: ClassVar[str] = "recovery"

    name: str
    weights: Path = Field(Path("weights/digits"), description="folder holding the generator")
    generator: str = Field("generator-uniform", description="its stem in `weights`: a uniform-prior generator")
    dataset: str = Field("digits", description="the real images of Table 2 (test split)")
    data_dir: Optional[Path] = None
    trials: int = Field(1000, gt=0, description="Table 1: latent vectors to recover (paper: 1000)")
    constraints: list[Constraint] = ["none", "clip", "stochastic_clip"]
    thresholds: list[float] = Field([1e-4, 1e-3, 1e-2, 1e-1], min_length=1)
    steps: int = Field(5000, gt=0, description="gradient steps per recovery (paper: 100k)")
    lr: float = Field(0.05, gt=0)
    optimizer: Literal["adam", "sgd", "momentum"] = "adam"
    images: int = Field(5, ge=0, description="Table 2: real test images")
    recoveries: int = Field(100, gt=1, description="Table 2: random starts per image (paper: 1000)")
    seed: int = 0
    mlflow: MlflowSpec = MlflowSpec()


def _recover(G, x, ids, cfg: RecoveryConfig, constraint: str) -> torch.Tensor:
    return project(
        G,
        x,
        ids=ids,
        init="prior",
        steps=cfg.steps,
        lr=cfg.lr,
        optimizer=cfg.optimizer,
        constraint=None if constraint == "none" else constraint,
        seed=cfg.seed,
    ).z


def recovery_rows(cfg: RecoveryConfig, G, images: torch.Tensor, image_ids: list[int]) -> pd.DataFrame:
    """Table 1 rows (table=1: trial, constraint, sq_err = ||z - z'||²/d, mse) and Table 2 rows (table=2:
    image, recovery, constraint, z')."""
    d, device = G.latent_dim, next(G.parameters()).device
    ids = torch.arange(cfg.trials, device=device)
    z = rng.sample_latents("uniform", cfg.seed + TARGET_STREAM, ids, 1, d)[:, 0]
    with torch.no_grad():
        x = G(z)
    out = []
    for constraint in cfg.constraints:
        started = time.perf_counter()
        zr = _recover(G, x, ids, cfg, constraint)
        with torch.no_grad():
            mse = per_example_mse(G(zr), x)
        err = ((zr - z) ** 2).mean(1)
        out.append(
            pd.DataFrame(
                {
                    "table": 1,
                    "trial": ids.cpu().numpy(),
                    "constraint": constraint,
                    "sq_err": err.cpu().numpy(),
                    "mse": mse.cpu().numpy(),
                }
            )
        )
        print(f"Table 1, {constraint}: {cfg.trials} trials in {time.perf_counter() - started:.0f} s", flush=True)
        if len(images):
            k = cfg.recoveries
            x2 = images.repeat_interleave(k, dim=0)
            x2 = x2.to(device)
            ids2 = torch.arange(len(x2), device=device) + 10_000_000  # starts of their own, apart from Table 1's
            zr2 = _recover(G, x2, ids2, cfg, constraint).cpu().numpy()
            out.append(
                pd.DataFrame(
                    {
                        "table": 2,
                        "trial": np.repeat(image_ids, k),
                        "recovery": np.tile(np.arange(k), len(images)),
                        "constraint": constraint,
                        "z": list(zr2),
                    }
                )
            )
    return pd.concat(out, ignore_index=True)


def mean_pairwise(z: np.ndarray) -> float:
    """Mean over pairs i < j of ||z_i - z_j||₂ / d (Lipton & Tripathi Table 2's measure)."""
    diff = np.linalg.norm(z[:, None, :] - z[None, :, :], axis=-1)
    iu = np.triu_indices(len(z), 1)
    return float(diff[iu].mean() / z.shape[1])


def recovery_tables(rows: pd.DataFrame, thresholds: list[float], d: int, seed: int = 0) -> dict[str, pd.DataFrame]:
    t1 = rows[rows.table == 1]
    table1 = pd.DataFrame(
        {
            f"ε = {e:g}": t1.groupby("constraint", sort=False)["sq_err"].apply(lambda s, e=e: (s < e).mean())
            for e in thresholds
        }
    )
    table1["n"] = t1.groupby("constraint", sort=False).size()
    t2 = rows[rows.table == 2]
    table2 = pd.DataFrame()
    if len(t2):
        per_image = t2.groupby(["constraint", "trial"], sort=False)["z"].apply(lambda s: mean_pairwise(np.stack(s)))
        table2 = per_image.groupby(level=0, sort=False).mean().to_frame("mean pairwise ||z_i - z_j|| / d")
        baseline = np.random.default_rng(seed).uniform(-1, 1, (1000, d))  # E over pairs, precise to ~1%
        table2.loc["baseline (random box vectors)"] = mean_pairwise(baseline)
    return {"table1": table1, "table2": table2}


def markdown(table: pd.DataFrame, fmt: str) -> str:
    """A table as markdown, its index as the first column (integers as they are, floats with `fmt`)."""
    cells = lambda v: str(v) if isinstance(v, (int, np.integer)) else fmt.format(v)  # noqa: E731
    lines = ["| | " + " | ".join(map(str, table.columns)) + " |", "|---|" + "---|" * len(table.columns)]
    lines += [
        f"| {i} | " + " | ".join(cells(v) for v in row) + " |"
        for i, row in zip(table.index, table.astype(object).values, strict=True)
    ]
    return "\n".join(lines)


def run_recovery(cfg: RecoveryConfig, opts: JobOptions | None = None) -> JobResult:
    """Tables 1-2 for `cfg` (one process: every trial is one batch through G); the summary holds both tables."""
    opts = opts or JobOptions()
    G, manifest = load_model(cfg.weights_dir() / cfg.generator, kind="generator")
    G.requires_grad_(False)
    d = int(manifest["arch"]["latent_dim"])
    if getattr(G, "prior", None) != "uniform":
        raise SystemExit(f"{cfg.weights_dir() / cfg.generator}: needs a uniform-prior generator (box [-1, 1]^d)")
    data = load_dataset(cfg.dataset, "test", cfg.data_dir).subset(cfg.images) if cfg.images else None
    run_dir = run_folder(cfg, opts.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    tags = {"kind": "recovery", "config_hash": cfg.config_hash(), "git_commit": git_commit()}
    with job_run(cfg, run_dir, enabled=opts.log_mlflow, tags=tags) as tracker:
        started = time.perf_counter()
        images = data.images if data is not None else torch.empty(0)  # CPU, as loaded: recovery_rows moves it
        rows = recovery_rows(cfg, G, images, [int(i) for i in data.ids] if data is not None else [])
        write_shard(run_dir / "rows.parquet", rows)  # atomic: complete or absent
        tables = recovery_tables(rows, cfg.thresholds, d, cfg.seed)
        summary = {
            "table1": tables["table1"].to_dict(),
            "table2": tables["table2"].iloc[:, 0].to_dict() if len(tables["table2"]) else {},
            "seconds": time.perf_counter() - started,
            "latent_dim": d,
        }
        atomic_write_json(run_dir / "summary.json", summary)
        if tracker is not None:
            for c, row in tables["table1"].iterrows():
                for col, v in row.items():
                    if col != "n":
                        tracker.client.log_metric(tracker.run_id, f"recovered/{c}/{col.split('= ')[1]}", float(v))
            tracker.client.log_dict(tracker.run_id, summary, "summary.json")
    storage.finish(run_dir)  # a URI run folder: its files to the URI
    run_id = tracker.run_id if tracker is not None else recorded_run_id(run_dir)
    return JobResult(run_dir, summary, run_id, rows)


def show(cfg: RecoveryConfig, res: JobResult) -> None:
    """The tables `invgan recovery` prints, derived from its rows."""
    tables = recovery_tables(res.rows, cfg.thresholds, res.summary["latent_dim"], cfg.seed)
    print("\nTable 1: fraction recovered, ||z - z'||² / d < ε\n" + markdown(tables["table1"], "{:.3f}"))
    if len(tables["table2"]):
        print("\nTable 2: recoveries of one real image\n" + markdown(tables["table2"], "{:.3g}"))


def main(config: Path, overrides: list[str], opts: JobOptions) -> JobResult:
    """The `invgan recovery` command: validate, run, print the tables and where results are."""
    return job_main("recovery", lambda: load_config(config, overrides, model=RecoveryConfig), run_recovery, show, opts)
