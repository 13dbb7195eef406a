"""`invgan report`: docs/results.md and docs/figures/*.png regenerated from the reproduction runs' rows.

    configs/repro/paper_numbers.yaml ─▶ for each table: its config ─▶ that config's run folder
    (<runs>/<name>-<hash>, as `invgan eval` made it) ─▶ rows ─▶ our cell beside the paper's, n per cell,
    masking flags, run id, compute ─▶ one markdown section + one figure per table

Nothing in docs/results.md is typed by hand: a table whose run does not exist yet says so and gives
the command that makes it. A paper column may map to several of our attacks (e.g. BPDA with the CE and
the margin loss): an example then counts as correct only if it survives every one of them (the per-example
worst case), computed from the rows like every other number here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from matplotlib.figure import Figure

from jobs.common import PROJECT_ROOT

REPRO_DIR = PROJECT_ROOT / "configs" / "repro"
PAPER_NUMBERS = REPRO_DIR / "paper_numbers.yaml"


@dataclass
class Cell:
    ours: float | None
    n: int
    paper: float | None


def combined_correct(d_rows: pd.DataFrame, attacks: list[str]) -> pd.Series | None:
    """Per example of one defense: correct under every listed attack (over examples that have them all)."""
    wide = d_rows[d_rows["attack"].isin(attacks)].pivot(index="example_id", columns="attack", values="correct")
    if wide.empty or set(wide.columns) != set(attacks):
        return None
    wide = wide.dropna()
    return wide.astype(bool).all(axis=1) if len(wide) else None


def accuracy_cells(rows: pd.DataFrame, columns: dict[str, list[str]], paper: dict) -> dict[str, dict[str, Cell]]:
    out: dict[str, dict[str, Cell]] = {}
    for defense, d_rows in rows.groupby("defense", sort=False):
        out[defense] = {}
        for column, attacks in columns.items():
            correct = combined_correct(d_rows, attacks)
            theirs = paper.get(defense, {}).get(column)
            out[defense][column] = Cell(
                None if correct is None else float(correct.mean()), 0 if correct is None else len(correct), theirs
            )
    return out


def auc_cells(rows: pd.DataFrame, columns: dict[str, list[str]], paper: dict) -> dict[str, dict[str, Cell]]:
    from invgan_core.detection import detection_auc

    out: dict[str, dict[str, Cell]] = {}
    for defense, d_rows in rows.groupby("defense", sort=False):
        clean = d_rows[d_rows["attack"] == "clean"].set_index("example_id")["detection_score"]
        if not np.isfinite(clean.to_numpy(dtype=float)).any():
            continue  # no scores without a projection (defense none)
        out[defense] = {}
        for column, attacks in columns.items():
            pos = d_rows[d_rows["attack"] == attacks[0]]
            pos = pos[np.isfinite(pos["detection_score"].to_numpy(dtype=float))]
            neg = clean.reindex(pos["example_id"].to_numpy()).dropna()
            auc = detection_auc(neg.to_numpy(), pos["detection_score"].to_numpy()) if len(pos) and len(neg) else None
            out[defense][column] = Cell(auc, len(pos), paper.get(defense, {}).get(column))
    return out


def _fmt(v: float | None, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def cells_markdown(cells: dict[str, dict[str, Cell]], digits: int) -> str:
    columns = list(dict.fromkeys(c for row in cells.values() for c in row))
    lines = ["| defense | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for defense, row in cells.items():
        parts = []
        for c in columns:
            cell = row.get(c)
            if cell is None or (cell.ours is None and cell.paper is None):
                parts.append("–")
                continue
            ours = f"**{_fmt(cell.ours, digits)}** (n={cell.n})" if cell.ours is not None else "not run"
            parts.append(ours + (f" · paper {_fmt(cell.paper, digits)}" if cell.paper is not None else ""))
        lines.append(f"| {defense} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def cells_figure(cells: dict[str, dict[str, Cell]], title: str, ylabel: str) -> Figure:
    """Grouped bars per defense: ours (solid) beside the paper (hatched), one colour per column."""
    defenses = list(cells)
    fig = Figure(figsize=(4 * max(len(defenses), 1), 3.4), layout="constrained")
    axes = fig.subplots(1, max(len(defenses), 1), squeeze=False)[0]
    for ax, defense in zip(axes, defenses, strict=False):  # one axis even with no defense
        columns = list(cells[defense])
        x = np.arange(len(columns))
        ours = [cells[defense][c].ours if cells[defense][c].ours is not None else np.nan for c in columns]
        paper = [cells[defense][c].paper if cells[defense][c].paper is not None else np.nan for c in columns]
        ax.bar(x - 0.2, ours, 0.4, label="ours", color="tab:blue")
        ax.bar(x + 0.2, paper, 0.4, label="paper", color="none", edgecolor="tab:gray", hatch="//")
        ax.set_xticks(x, columns, rotation=30)
        ax.set_ylim(0, 1.05)
        ax.set_title(defense)
        ax.set_ylabel(ylabel)
    axes[0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig


def _compute_seconds(rows: pd.DataFrame, cfg) -> float:
    """Core-seconds spent on the rows: every purification, plus each attack once per example and target
    (an attack computed once and fed to every defense repeats its per-example seconds on each row)."""
    attacked = rows[rows["attacked"]]
    each = attacked["attack"].isin([n for n, s in cfg.attacks.items() if s.target == "each"])
    shared = attacked[~each].drop_duplicates(["example_id", "attack"])["attack_seconds"].sum()
    return float(rows["seconds"].sum() + attacked[each]["attack_seconds"].sum() + shared)


def table_section(key: str, spec: dict, runs: Path) -> tuple[str, Figure | None]:
    """One table's markdown (and figure), from its config's run folder under `runs`."""
    from jobs.config import load_config
    from jobs.evaluate import ROW_COLUMNS, masking_flags
    from jobs.masking import flags_summary
    from jobs.report import scored
    from jobs.runner import read_rows

    config_path = REPRO_DIR / spec["config"]  # an absolute path stays as it is
    cfg = load_config(config_path)
    run_dir = runs / f"{cfg.name}-{cfg.config_hash()[:12]}"
    rel = config_path.relative_to(PROJECT_ROOT) if config_path.is_relative_to(PROJECT_ROOT) else config_path
    head = f"## {spec['title']}\n\nPaper: {spec['source']}. Config: `{rel}`.\n\n"
    rows = read_rows(run_dir, ROW_COLUMNS) if (run_dir / "rows").is_dir() else pd.DataFrame()
    if rows.empty:
        return head + (
            f"*Not run yet.* `invgan eval --config {rel}` writes `{run_dir.name}`; then `invgan report`.\n"
        ), None
    rows = scored(rows)  # diverged rows are neither correct nor incorrect, as in the eval's own tables
    metric = spec.get("metric", "accuracy")
    cells = (auc_cells if metric == "auc" else accuracy_cells)(rows, spec["columns"], spec.get("paper", {}))
    cells = {d: cells[d] for d in cfg.defenses if d in cells}  # the config's order
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    flags = flags_summary(masking_flags(cfg, rows))
    done, total = rows["shard"].nunique(), summary.get("shards", {}).get("total", "?")
    lines = [head + cells_markdown(cells, 4 if metric == "auc" else 2), ""]
    lines.append(
        f"Run `{run_dir.name}` (MLflow run `{summary.get('mlflow_run_id', 'not logged')}`), "
        f"{len(rows['example_id'].unique())} examples of `{cfg.dataset}/{cfg.split}`, "
        f"{done} of {total} shards, "
        f"compute {_compute_seconds(rows, cfg) / 3600:.2f} core-hours. Bold: ours; n: examples in the cell"
        + (
            " (several attacks in one column: an example counts as correct only if it survives all)"
            if any(len(a) > 1 for a in spec["columns"].values())
            else ""
        )
        + "."
    )
    raised = flags["flagged"]
    lines.append(f"\nGradient-masking checks: {flags['checks']} run, {len(raised)} flagged" + (":" if raised else "."))
    lines += [
        f"- {f['defense']}: **{f['check']}** — {f['attack']} {f['acc']:.2f} vs {f['compared_with']} "
        f"{f['acc_other']:.2f} (n={f['n']})"
        for f in raised
    ]
    if spec.get("notes"):
        lines.append("\n" + spec["notes"].strip())
    figure = cells_figure(cells, spec["title"], "ROC AUC" if metric == "auc" else "accuracy")
    return "\n".join(lines) + "\n", figure


def build_report(out: Path, *, runs: Path | None = None, paper_numbers: Path = PAPER_NUMBERS) -> Path:
    """Write out/results.md and out/figures/<table>.png; returns the markdown's path."""
    from invgan_core.checkpoint import atomic_write_bytes
    from jobs.common import runs_dir

    runs = runs or runs_dir()
    tables = yaml.safe_load(paper_numbers.read_text())
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Results\n",
        f"Generated by `invgan report` from the rows of the reproduction runs in `{runs.name}/` "
        f"({time.strftime('%Y-%m-%d')}); do not edit by hand. The papers' numbers come from "
        "`configs/repro/paper_numbers.yaml`.\n",
    ]
    for key, spec in tables.items():
        text, figure = table_section(key, spec, runs)
        if figure is not None:
            path = figures_dir / f"{key}.png"
            figure.savefig(path, dpi=110)
            text += f"\n![{spec['title']}](figures/{key}.png)\n"
        parts.append(text)
    target = out / "results.md"
    atomic_write_bytes(target, "\n".join(parts).encode())
    return target
