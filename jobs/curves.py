"""`invgan curves`: accuracy and wall time versus effective iterations (InvGAN Sec. 4.3, Fig. 4).

The curve points are defenses of their own: InvGAN with T = budget steps from I(x), Defense-GAN with
R restarts x budget/R steps. They are evaluated by the same sharded job as `invgan eval` (same
rows, resume and workers), then each defense family's points become MLflow metrics with
step = effective iterations and one plot.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from jobs.config import DefenseSpec, EvalConfig


def point_defenses(cfg: EvalConfig) -> dict[str, tuple[str, int, DefenseSpec]]:
    """name -> (family, effective iterations, spec) for every curve point."""
    spec = cfg.curves
    if spec is None:
        raise ValueError("the config has no `curves:` section (see configs/curves.yaml)")
    points = {}
    for budget in spec.budgets:
        if "invgan" in spec.defenses:
            invgan = DefenseSpec(kind="invgan", params={"steps": budget, "lr": spec.lr})
            points[f"invgan_T{budget}"] = ("invgan", max(budget, 1), invgan)
        if "defensegan" in spec.defenses:
            steps = budget // spec.restarts
            points[f"defensegan_{spec.restarts}x{steps}"] = (
                "defensegan",
                spec.restarts * steps,
                DefenseSpec(kind="defensegan", params={"restarts": spec.restarts, "steps": steps, "lr": spec.lr}),
            )
    return points


def curves_run_config(cfg: EvalConfig) -> EvalConfig:
    """The eval config `invgan curves` runs: the curve points as defenses, named <name>-curves (its run folder)."""
    return cfg.model_copy(
        update={"name": f"{cfg.name}-curves", "defenses": {k: v[2] for k, v in point_defenses(cfg).items()}}
    )


def curve_table(rows: pd.DataFrame, points: dict) -> pd.DataFrame:
    """One line per (defense family, effective iterations): clean/attacked accuracy and seconds per example."""
    from jobs.run_tables import scored

    out = []
    for name, (family, iters, _) in points.items():
        mine = rows[rows.defense == name]
        counted = scored(mine)  # diverged rows are neither correct nor incorrect
        clean, attacked = counted[~counted.attacked], counted[counted.attacked]
        out.append(
            {
                "family": family,
                "point": name,
                "effective_iterations": iters,
                "clean_accuracy": clean.correct.mean(),
                "attacked_accuracy": attacked.correct.mean() if len(attacked) else float("nan"),
                "seconds_per_example": clean.seconds.mean(),
                "n": len(clean),
            }
        )
    table = pd.DataFrame(out).drop_duplicates(["family", "effective_iterations"])
    return table.sort_values(["family", "effective_iterations"])


def curve_figure(table: pd.DataFrame, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4))
    ax_acc, ax_time = fig.subplots(1, 2)
    for family, t in table.groupby("family"):
        ax_acc.plot(t.effective_iterations, t.clean_accuracy, "o-", label=f"{family} clean")
        if t.attacked_accuracy.notna().any():
            ax_acc.plot(t.effective_iterations, t.attacked_accuracy, "s--", label=f"{family} attacked")
        ax_time.plot(t.effective_iterations, t.seconds_per_example, "o-", label=family)
    for ax, ylabel in ((ax_acc, "accuracy"), (ax_time, "wall seconds per example")):
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("effective iterations (restarts x steps)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def run_curves(
    cfg: EvalConfig,
    *,
    out: Path | None = None,
    address: str | None = None,
    progress: bool = True,
    log_mlflow: bool = True,
    verbose: bool = False,
) -> tuple[pd.DataFrame, Path, str | None]:
    """Evaluate every curve point (clean and the config's attacks), plot, log; returns the table."""
    from jobs.common import git_commit
    from jobs.evaluate import evaluate
    from jobs.run_tables import replace_table
    from jobs.sharded import run_folder
    from jobs.tracking import job_run

    if cfg.curves is None:
        raise SystemExit("the config has no `curves:` section (see configs/curves.yaml)")
    points = point_defenses(cfg)
    point_cfg = curves_run_config(cfg)
    tags = {
        "dataset": cfg.dataset,
        "kind": "curves",
        "config_hash": point_cfg.config_hash(),
        "git_commit": git_commit(),
    }
    with job_run(point_cfg, run_folder(point_cfg, out), enabled=log_mlflow, tags=tags) as tracker:
        res = evaluate(
            point_cfg,
            out=out,
            address=address,
            progress=progress,
            log_mlflow=False,
            verbose=verbose,
            on_shard=tracker.progress if tracker else None,
        )
        table = curve_table(res.rows, points)
        table.to_csv(res.run_dir / "curves.csv", index=False)
        fig = curve_figure(table, f"{cfg.dataset}: accuracy and cost vs effective iterations")
        fig.savefig(res.run_dir / "curves.png", dpi=100)
        if tracker is not None:
            client, run_id = tracker.client, tracker.run_id
            for r in table.itertuples():
                for metric in ("clean_accuracy", "attacked_accuracy", "seconds_per_example"):
                    value = getattr(r, metric)
                    if value == value:  # not NaN
                        client.log_metric(
                            run_id, f"curve/{r.family}/{metric}", float(value), step=int(r.effective_iterations)
                        )
            client.log_figure(run_id, fig, "figures/curves.png")
            replace_table(client, run_id, table, "tables/curves.json")
    return table, res.run_dir, tracker.run_id if tracker else None


def main(
    config: Path,
    overrides: list[str],
    limit: int | None,
    out: Path | None,
    address: str | None,
    log_mlflow: bool,
    progress: bool,
    verbose: bool = False,
) -> None:
    from pydantic import ValidationError

    from jobs.config import load_config

    try:
        cfg = load_config(config, overrides, limit=limit)
    except (ValidationError, ValueError, FileNotFoundError) as err:
        from jobs.config import describe_error

        raise SystemExit(f"invalid curves config: {describe_error(err)}") from None
    table, run_dir, run_id = run_curves(
        cfg, out=out, address=address, progress=progress, log_mlflow=log_mlflow, verbose=verbose
    )
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"plot: {run_dir / 'curves.png'}   table: {run_dir / 'curves.csv'}")
    if run_id:
        from jobs.tracking import where_to_open

        print(f"MLflow run {run_id}; open with: {where_to_open(cfg.mlflow.tracking_uri)}")
