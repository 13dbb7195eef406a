"""`invgan curves`: accuracy and wall time versus effective iterations (InvGAN Sec. 4.3, Fig. 4).

The curve points are defenses of their own: InvGAN with T = budget steps from I(x), Defense-GAN with
R restarts x budget/R steps. They are evaluated by the same sharded job as `invgan eval` (same
rows, resume and workers), then each defense family's points become MLflow metrics with
step = effective iterations and one plot.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from jobs.config import DefenseSpec, EvalConfig, load_config
from jobs.evaluate import eval_job, finish_eval
from jobs.ray_session import quiet_ray_logging
from jobs.run_tables import replace_table, scored
from jobs.sharded import JobOptions, JobResult, job_main, run_folder, run_sharded_job


def point_defenses(cfg: EvalConfig) -> dict[str, tuple[str, int, DefenseSpec]]:
    """name -> (family, effective iterations, spec) for every curve point."""
    spec = cfg.curves
    if spec is None:
        raise ValueError("the config has no `curves:` section (see configs/curves.yaml)")
    points, opt = {}, {"lr": spec.lr, "optimizer": spec.optimizer}
    for budget in spec.budgets:
        if "invgan" in spec.defenses:
            invgan = DefenseSpec(kind="invgan", params={"steps": budget, **opt})
            points[f"invgan_T{budget}"] = ("invgan", max(budget, 1), invgan)
        if "defensegan" in spec.defenses:
            steps = budget // spec.restarts
            points[f"defensegan_{spec.restarts}x{steps}"] = (
                "defensegan",
                spec.restarts * steps,
                DefenseSpec(kind="defensegan", params={"restarts": spec.restarts, "steps": steps, **opt}),
            )
    return points


def curves_run_config(cfg: EvalConfig) -> EvalConfig:
    """The eval config `invgan curves` runs: the curve points as defenses, named <name>-curves (its run folder)."""
    return cfg.model_copy(
        update={"name": f"{cfg.name}-curves", "defenses": {k: v[2] for k, v in point_defenses(cfg).items()}}
    )


def curve_table(rows: pd.DataFrame, points: dict) -> pd.DataFrame:
    """One line per (defense family, effective iterations): clean/attacked accuracy and seconds per example."""
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


def run_curves(cfg: EvalConfig, opts: JobOptions | None = None) -> JobResult:
    """Evaluate every curve point (clean and the config's attacks), plot, log. The summary is the eval summary
    of the points plus `curves`, the table (`curve_table`) as records."""
    opts = opts or JobOptions()
    if cfg.curves is None:
        raise SystemExit("the config has no `curves:` section (see configs/curves.yaml)")
    quiet_ray_logging(opts.verbose)
    points = point_defenses(cfg)
    point_cfg = curves_run_config(cfg)

    def finish(run_dir: Path, rows: pd.DataFrame, tracker, shards: dict) -> dict:
        summary = finish_eval(point_cfg, run_dir, rows, None, {}, shards)  # the points' tables, logged as curves
        table = curve_table(rows, points)
        table.to_csv(run_dir / "curves.csv", index=False)
        fig = curve_figure(table, f"{cfg.dataset}: accuracy and cost vs effective iterations")
        fig.savefig(run_dir / "curves.png", dpi=100)
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
        return summary | {"curves": table.to_dict(orient="records")}

    job = eval_job(point_cfg, run_folder(point_cfg, opts.out), kind="curves", finish=finish)
    return run_sharded_job(point_cfg, job, opts)


def show(cfg: EvalConfig, res: JobResult) -> None:
    """The table `invgan curves` prints, and where its plot is."""
    print(pd.DataFrame(res.summary["curves"]).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"plot: {res.run_dir / 'curves.png'}   table: {res.run_dir / 'curves.csv'}")


def main(config: Path, overrides: list[str], opts: JobOptions, *, limit: int | None = None) -> JobResult:
    """The `invgan curves` command: validate, run or resume, print the table and where results are."""
    return job_main("curves", lambda: load_config(config, overrides, limit=limit), run_curves, show, opts)
