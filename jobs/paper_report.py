"""`invgan report`: docs/results.md and docs/figures/*.png regenerated from the reproduction runs' rows.

    configs/repro/paper_numbers.yaml (typed: jobs/paper_spec.py) ─▶ for each table: its config ─▶ that
    config's run folder (<runs>/<name>-<hash>, as `invgan eval` made it) ─▶ rows ─▶ our cell beside the
    paper's, n per cell, masking flags, run id, compute ─▶ one markdown section + one figure per table

Nothing in docs/results.md is typed by hand: a table whose run does not exist yet says so and gives
the command that makes it (a runs folder with no run of any table is an error, not an empty report). A
paper column may map to several of our attacks (e.g. BPDA with the CE and the margin loss): an example then
counts as correct only if it survives every one of them (the per-example worst case), computed from the
rows like every other number here.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from invgan_core.attacks import accuracy_vs_steps, fell_within
from invgan_core.checkpoint import read_manifest
from invgan_core.detection import detection_auc
from invgan_core.files import atomic_write_bytes
from jobs import masking
from jobs.common import PROJECT_ROOT
from jobs.config import MaskingChecks, load_config
from jobs.curves import curve_figure, curve_table, curves_run_config, point_defenses
from jobs.masking import flags_summary
from jobs.paper_spec import (
    PAPER_NUMBERS,
    REPRO_DIR,
    RESULTS_DIR,
    BaseTable,
    ConfigTable,
    CurvesTable,
    DistortionTable,
    EvalTable,
    Numbers,
    RecoveryTable,
    RedTable,
    RedTheoryTable,
    Table,
    load_paper_numbers,
)
from jobs.protocol import deviations
from jobs.recovery import RecoveryConfig, recovery_tables
from jobs.red import RedConfig, confusion_figure, red_tables
from jobs.run_tables import scored
from jobs.schemas import EVAL_ROWS, RED_ROWS
from jobs.sharded import read_rows
from jobs.stats import (
    MAX_HALF_WIDTH,
    MIN_N,
    Interval,
    bootstrap_auc,
    decimals,
    paired_difference,
    tally,
    verdict,
    wilson,
)
from jobs.tracking import recorded_run_id


@dataclass
class Cell:
    ours: float | None
    n: int
    paper: float | None
    interval: Interval | None = None  # 95 %: Wilson for an accuracy, bootstrap for an AUC; None: no interval

    @property
    def verdict(self) -> str:
        """Ours against the paper's number (jobs.stats.verdict); '' without an interval or a paper number."""
        return verdict(self.interval, self.paper) if self.interval is not None and self.ours is not None else ""


def combined_correct(d_rows: pd.DataFrame, attacks: list[str]) -> pd.Series | None:
    """Per example of one defense: correct under every listed attack (over examples that have them all)."""
    wide = d_rows[d_rows["attack"].isin(attacks)].pivot(index="example_id", columns="attack", values="correct")
    if wide.empty or set(wide.columns) != set(attacks):
        return None
    wide = wide.dropna()
    return wide.astype(bool).all(axis=1) if len(wide) else None


def fraction_cell(value: float | None, n: int, paper: float | None) -> Cell:
    """A fraction of n (an accuracy, a recovery rate) computed elsewhere, with its Wilson interval."""
    if value is None or not n:
        return Cell(value, n, paper)
    return Cell(value, n, paper, wilson(round(value * n), n))


def accuracy_cells(rows: pd.DataFrame, columns: dict[str, list[str]], paper: Numbers) -> dict[str, dict[str, Cell]]:
    out: dict[str, dict[str, Cell]] = {}
    for defense, d_rows in rows.groupby("defense", sort=False):
        out[defense] = {}
        for column, attacks in columns.items():
            correct = combined_correct(d_rows, attacks)
            theirs = paper.get(defense, {}).get(column)
            if correct is None:
                out[defense][column] = Cell(None, 0, theirs)
                continue
            out[defense][column] = Cell(
                float(correct.mean()), len(correct), theirs, wilson(int(correct.sum()), len(correct))
            )
    return out


def auc_cells(rows: pd.DataFrame, columns: dict[str, list[str]], paper: Numbers) -> dict[str, dict[str, Cell]]:
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
            theirs = paper.get(defense, {}).get(column)
            if not (len(pos) and len(neg)):
                out[defense][column] = Cell(None, len(pos), theirs)
                continue
            attacked = pos["detection_score"].to_numpy()
            auc = detection_auc(neg.to_numpy(), attacked)
            both = np.r_[neg.to_numpy(), attacked]
            labels = np.r_[np.zeros(len(neg)), np.ones(len(attacked))]
            out[defense][column] = Cell(auc, len(pos), theirs, bootstrap_auc(labels, both))
    return out


def mse_cells(
    rows: pd.DataFrame, columns: dict[str, list[str]], paper: Numbers, size: int
) -> dict[str, dict[str, Cell]]:
    """Reconstruction MSE per pixel, ||x - G(z_T)||² / size, from the rows of the listed attack (e.g. clean) of a
    run with `detection_space: image` (then a row's detection score is ||x - G(z_T)||)."""
    out: dict[str, dict[str, Cell]] = {}
    for defense, d_rows in rows.groupby("defense", sort=False):
        out[defense] = {}
        for column, attacks in columns.items():
            score = d_rows[d_rows["attack"] == attacks[0]]["detection_score"].to_numpy(dtype=float)
            score = score[np.isfinite(score)]
            mse = float((score**2).mean() / size) if len(score) else None
            out[defense][column] = Cell(mse, len(score), paper.get(defense, {}).get(column))
    return out


def _locate(spec: ConfigTable, runs: Path, config: Path | None = None) -> tuple[Any, Path, Path, str]:
    """A section's config (or `config`, one it joins) as its job reads it (RedConfig, RecoveryConfig, else
    EvalConfig), its run folder under `runs` (of the derived config `invgan curves` runs, for a curves section),
    the config's path as shown, and the heading."""
    config_path = REPRO_DIR / (config or spec.config)  # an absolute path stays as it is
    if isinstance(spec, RedTable):
        cfg: Any = load_config(config_path, model=RedConfig)
    elif isinstance(spec, RecoveryTable):
        cfg = load_config(config_path, model=RecoveryConfig)
    else:
        cfg = load_config(config_path)
    if isinstance(spec, CurvesTable):
        run_dir = find_run_dir(curves_run_config(cfg), runs)
    else:
        run_dir = find_run_dir(cfg, runs)
    rel = _relative(config_path)
    return cfg, run_dir, rel, _head(spec, rel)


def _run_dirs(spec: Table, runs: Path) -> list[Path]:
    """The run folders under `runs` that a section reads, whether or not they exist yet."""
    if isinstance(spec, RedTheoryTable):
        return [runs / spec.folder]
    configs = [spec.config, *spec.also] if isinstance(spec, EvalTable) else [spec.config]
    return [_locate(spec, runs, config)[1] for config in configs]


def find_run_dir(cfg, runs: Path) -> Path:
    """The run folder of `cfg` under `runs`: runs/<name>-<hash>, or else a folder of the same name whose
    recorded config differs only in `data_dir` (the same data read from another path, e.g. `--set
    data_dir=...` on another machine); the first is what a run would write when there is neither."""
    exact = runs / f"{cfg.name}-{cfg.config_hash()[:12]}"
    if exact.exists():
        return exact
    skip = {"resources", "mlflow", "data_dir"}
    want = cfg.model_dump(mode="json", exclude=skip)
    for folder in sorted(runs.glob(f"{cfg.name}-*")):
        try:
            recorded = json.loads((folder / "config.json").read_text())["config"]
            other = type(cfg).model_validate(recorded)
        except (OSError, KeyError, ValueError):
            continue
        if other.model_dump(mode="json", exclude=skip) == want:
            return folder
    return exact


def _paired_line(label: str, ours: pd.DataFrame, theirs: pd.DataFrame, attacks: list[str], min_n: int) -> str | None:
    """`label`: both sides' accuracy under `attacks` (all of them) on the examples they share, their paired
    difference (ours minus theirs) with its 95 % bootstrap interval, and jobs.stats.verdict with 0 as the claim;
    None when they share no example."""
    a, b = combined_correct(ours, attacks), combined_correct(theirs, attacks)
    if a is None or b is None:
        return None
    common = a.index.intersection(b.index)
    if not len(common):
        return None
    diff = paired_difference(a[common].to_numpy(), b[common].to_numpy())
    return (
        f"- {label}: {a[common].mean():.2f} vs {b[common].mean():.2f} (n={len(common)}; difference "
        f"{diff.value:+.2f} [{diff.low:+.2f}, {diff.high:+.2f}]): **{verdict(diff, 0.0, min_n=min_n)}**"
    )


def paired_comparison(
    rows: pd.DataFrame, cheap: str, reference: str, columns: dict[str, list[str]], *, min_n: int = MIN_N
) -> list[str]:
    """One line per column: the cheap defense's accuracy against the reference's on the same examples, their
    paired difference with its 95 % bootstrap interval, and one of the four verdicts on the claim that the cheap
    one is as accurate (jobs.stats.verdict with 0 as the claimed difference): n too small (fewer than `min_n`
    pairs), undecided (the interval wider than ±0.10), reproduced (0 lies in it), not reproduced (above: the
    cheap one better; below: worse)."""
    a, b = rows[rows["defense"] == cheap], rows[rows["defense"] == reference]
    lines = [_paired_line(column, a, b, attacks, min_n) for column, attacks in columns.items()]
    return [line for line in lines if line is not None]


def versus_lines(
    rows: pd.DataFrame,
    other: pd.DataFrame,
    columns: dict[str, list[str]],
    defenses: list[str],
    *,
    min_n: int = MIN_N,
) -> list[str]:
    """One line per (defense of `defenses`, column) both runs have: this run's accuracy against the other's on
    the same examples, the paired difference (this minus the other) with its 95 % bootstrap interval, and the
    verdict on the claim that the change makes no difference (jobs.stats.verdict with 0 as the claim)."""
    lines = [
        _paired_line(f"{d}, {column}", rows[rows["defense"] == d], other[other["defense"] == d], attacks, min_n)
        for d in defenses
        for column, attacks in columns.items()
    ]
    return [line for line in lines if line is not None]


def _fmt(v: float | None, digits: int) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def cells_markdown(
    cells: dict[str, dict[str, Cell]], digits: int | None | dict[str, int | None], first: str = "defense"
) -> str:
    """`digits`: for every column, or per column (e.g. an MSE column beside accuracies); None: as many as the
    cell's interval supports (jobs.stats.decimals: an AUC). A cell with an interval prints it, 95 %, and its
    verdict against the paper's number."""
    columns = list(dict.fromkeys(c for row in cells.values() for c in row))
    places = digits if isinstance(digits, dict) else dict.fromkeys(columns, digits)
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for defense, row in cells.items():
        parts = []
        for c in columns:
            cell = row.get(c)
            if cell is None or (cell.ours is None and cell.paper is None):
                parts.append("–")
                continue
            i = cell.interval
            fixed = places[c]
            d: int = fixed if fixed is not None else (decimals(i) if i is not None else 2)
            if cell.ours is None:
                ours = "not run"
            elif i is not None:
                ours = f"**{_fmt(cell.ours, d)}** [{i.low:.{d}f}, {i.high:.{d}f}] (n={cell.n})"
            else:
                ours = f"**{_fmt(cell.ours, d)}** (n={cell.n})"
            paper = f" · paper {_fmt(cell.paper, max(d, _places(cell.paper)))}" if cell.paper is not None else ""
            parts.append(ours + paper + (f": *{cell.verdict}*" if cell.verdict else ""))
        lines.append(f"| {defense} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def _places(x: float) -> int:
    """The decimals a paper's number was printed with (0.9985 -> 4, 0.99 -> 2), at most 4."""
    text = f"{x:.4f}".rstrip("0")
    return max(len(text.split(".")[1]) if "." in text else 0, 1)


def verdict_line(cells: dict[str, dict[str, Cell]]) -> str:
    """'Verdicts against the paper (...): reproduced 9, not reproduced 4 (1 above, 3 below), undecided 3.', or ''
    when no cell has both an interval and a paper number."""
    counts = tally(c.verdict for row in cells.values() for c in row.values())
    if not counts:
        return ""
    return (
        f"Verdicts against the paper, 95 % intervals: {counts}. *Reproduced*: the paper's number lies in our "
        f"interval; *not reproduced*: it lies outside (above: ours higher); *undecided*: our interval is wider "
        f"than ±{MAX_HALF_WIDTH:.2f}, too wide to tell a gap from none; *n too small*: fewer than {MIN_N} examples."
    )


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
        bars = []
        for c in columns:
            cell = cells[defense][c]
            i = cell.interval
            bars.append([cell.ours - i.low, i.high - cell.ours] if i is not None and cell.ours is not None else [0, 0])
        err = np.array(bars).T.reshape(2, len(columns))  # 95 % intervals (none: a zero bar)
        ax.bar(x - 0.2, ours, 0.4, yerr=err, capsize=3, label="ours (95 % interval)", color="tab:blue")
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


def _relative(config_path: Path) -> Path:
    return config_path.relative_to(PROJECT_ROOT) if config_path.is_relative_to(PROJECT_ROOT) else config_path


def _head(spec: BaseTable, rel: Path) -> str:
    return f"## {spec.title}\n\nPaper: {spec.source}. Config: `{rel}`.\n\n"


def _not_run(head: str, command: str, run_dir: Path) -> tuple[str, None]:
    return head + f"*Not run yet.* `{command} --out {_relative(run_dir)}`, then `invgan report`.\n", None


def _run_id(run_dir: Path) -> str:
    return recorded_run_id(run_dir) or "not logged"


def _shards(rows: pd.DataFrame, run_dir: Path, cfg) -> tuple[int, int]:
    """(finished, planned) shards of a run, planned from the config while it is still running."""
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    total = summary.get("shards", {}).get("total")
    if total is None and getattr(cfg, "limit", None):
        total = math.ceil(cfg.limit / cfg.shard_size)
    done = int(rows["shard"].nunique())
    return done, int(total) if total is not None else done


def _image_size(cfg) -> int:
    return int(np.prod(read_manifest(cfg.weights_dir() / "generator")["arch"]["image_shape"]))


def _attack_specs(cfgs: list) -> dict[str, dict]:
    """Every attack of the joined configs, by name, as the JSON its config validates from."""
    return {n: s.model_dump(mode="json", exclude_none=True) for c in cfgs for n, s in c.attacks.items()}


def merged_flags(cfgs: list, rows: pd.DataFrame) -> pd.DataFrame:
    """The gradient-masking checks over the rows of several configs' runs on the same examples (their attacks
    compared with each other too, e.g. one run's black box with another's white box)."""
    m = cfgs[0].masking_checks or MaskingChecks()
    specs = _attack_specs(cfgs)
    kinds = {n: s.kind for c in cfgs for n, s in c.defenses.items()}
    return masking.masking_flags(rows, specs, tol=m.tol, floor=m.floor, defense_kinds=kinds)


def convergence_steps(steps: int) -> list[int]:
    """0, 1, 2, 5, 10, 20, ... up to the attack's `steps` (and `steps` itself)."""
    marks = [k * 10**e for e in range(6) for k in (1, 2, 5)]
    return [0] + [k for k in marks if k < steps] + [steps]


def convergence_curves(rows: pd.DataFrame, attack: str, steps: int) -> dict[str, list[float]]:
    """Per defense, accuracy after k steps (k in `convergence_steps`) of a first-success attack that ran
    `steps` steps, from its rows' success and queries (`invgan_core.attacks.accuracy_vs_steps`)."""
    out = {}
    for defense, d_rows in rows[rows["attack"] == attack].groupby("defense", sort=False):
        success = ~d_rows["correct"].astype(bool).to_numpy()
        out[defense] = accuracy_vs_steps(
            success, d_rows["queries"].to_numpy(dtype="int64", copy=True), convergence_steps(steps)
        )
    return out


def _without_steps(spec: dict) -> tuple[dict, int | None]:
    """An attack spec with its step count taken out (top level or the wrapped base's), and that count."""
    spec = json.loads(json.dumps(spec))
    steps = None
    for part in (spec, spec.get("base") or {}):
        steps = part.get("params", {}).pop("steps", steps)
    return spec, steps


def prefixes(name: str, cfgs: list) -> list[tuple[str, int]]:
    """The joined configs' attacks that are `name` cut short: the same spec (start, step, examples) but
    fewer steps. Randomness depends on (seed, example id) only, so their rows must repeat `name`'s first
    steps exactly."""
    specs = _attack_specs(cfgs)
    long, steps = _without_steps(specs[name])
    found = []
    for other, s in specs.items():
        short, k = _without_steps(s)
        if other != name and short == long and k is not None and steps is not None and k < steps:
            found.append((other, k))
    return found


def prefix_agreement(rows: pd.DataFrame, name: str, short: str, k: int) -> str:
    """Whether the first k steps of the first-success attack `name` repeat the k-step run `short`: per
    (defense, example), the same verdict at k and, where it fell, the same evaluations to its fall."""
    cols = ["defense", "example_id", "correct", "queries"]
    both = rows.loc[rows["attack"] == name, cols].merge(
        rows.loc[rows["attack"] == short, cols], on=["defense", "example_id"], suffixes=("", "_short")
    )
    if both.empty:
        return ""
    fell = fell_within(~both["correct"].astype(bool), both["queries"], k)
    fell_short = ~both["correct_short"].astype(bool)
    same = (fell == fell_short) & (~fell | (both["queries"] == both["queries_short"]))
    verdict = "repeats it exactly" if same.all() else f"**differs on {int((~same).sum())}**"
    return (
        f"\nIts first {k} steps are `{short}` (same spec but the steps): on the {len(both)} (defense, example) "
        f"pairs both ran, it {verdict} (same examples fallen by step {k}, at the same step)."
    )


def column_at_half(rows: pd.DataFrame, name: str, column: str, attacks: list[str], k: int) -> str:
    """A column that scores each example by the worst of several attacks, with the first-success attack
    `name` cut to its first k steps vs run in full: if the examples it fooled late were already fooled by
    the column's other attacks, the column has stopped moving even where `name` alone has not."""
    short = rows[rows["attack"] == name].copy()
    short["correct"] = ~fell_within(~short["correct"].astype(bool), short["queries"], k)  # standing at step k
    cut = pd.concat([rows[rows["attack"] != name], short])
    parts = []
    for d in rows.loc[rows["attack"] == name, "defense"].unique():
        at_k, full = (combined_correct(r[r["defense"] == d], attacks) for r in (cut, rows))
        if at_k is not None and full is not None:
            parts.append(f"{d} {at_k.mean():.2f} → {full.mean():.2f}")
    return f"\nColumn `{column}` (worst of {', '.join(attacks)}) with `{name}` cut to k={k} → in full: " + (
        "; ".join(parts) + "."
    )


def convergence_text(key: str, spec: EvalTable, rows: pd.DataFrame, cfgs: list, figures: Path) -> str:
    """The table (and figure, <figures>/<key>_convergence.png) of accuracy vs steps of the attack named
    by `convergence`, run with one restart and first success (BPDA): the curve must flatten."""
    name = spec.convergence
    if name is None:
        return ""
    attack_spec = next((c.attacks[name] for c in cfgs if name in c.attacks), None)
    if attack_spec is None:
        raise ValueError(f"convergence: no attack {name!r} in {', '.join(c.name for c in cfgs)}")
    steps = int(attack_spec.build().attack.steps)
    curves = convergence_curves(rows, name, steps)
    if not curves:
        return f"\nConvergence of `{name}`: not run yet."
    ks = convergence_steps(steps)
    n = rows[rows["attack"] == name].groupby("defense").size()
    lines = [f"\n**Convergence of `{name}`**: accuracy after k steps, from the steps at which each example fell:", ""]
    lines += ["| defense | n | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    lines += [f"| {d} | {n[d]} | " + " | ".join(f"{a:.2f}" for a in acc) + " |" for d, acc in curves.items()]
    half = ks.index(max(k for k in ks if k <= steps // 2))
    verdicts = []
    for d, acc in curves.items():
        fell = round((acc[half] - acc[-1]) * n[d])
        verdicts.append(
            f"{d} flat over the second half" if fell == 0 else f"{d} still falling ({fell} fell after k={ks[half]})"
        )
    lines.append("\n" + "; ".join(verdicts) + ".")
    lines += [prefix_agreement(rows, name, short, k) for short, k in prefixes(name, cfgs)]
    lines += [
        column_at_half(rows, name, column, attacks, ks[half])
        for column, attacks in spec.columns.items()
        if name in attacks and len(attacks) > 1 and column != "worst"
    ]
    fig = Figure(figsize=(5.5, 3.4), layout="constrained")
    ax = fig.subplots()
    for d, acc in curves.items():
        ax.plot(ks, acc, marker="o", label=f"{d} (n={n[d]})")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("attack steps (0 = the random start)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(f"{name}: accuracy vs steps", fontsize=10)
    target = figures / f"{key}_convergence.png"
    fig.savefig(target, dpi=110)
    lines.append(f"\n![{name} convergence](figures/{target.name})")
    return "\n".join(lines)


def eval_section(key: str, spec: EvalTable, runs: Path, figures: Path) -> tuple[str, Figure | None]:
    """An `invgan eval` table (InvGAN Tables 2, 3, 5): defenses x the paper's columns, from the config's run.
    `metric` (accuracy | auc | mse) is the table's; `column_metrics` overrides it per column; `compare:
    {cheap, reference}` adds the paired verdict of one defense against another (e.g. InvGAN at 1/10 of
    Defense-GAN's effective iterations). `also: [configs]` joins the attacks of other configs' runs on the same
    examples (stronger attacks added later without recomputing the rest); `convergence: <attack>` adds that
    first-success attack's accuracy after k steps (`convergence_text`)."""
    cfg, run_dir, rel, head = _locate(spec, runs)
    rows = read_rows(run_dir, EVAL_ROWS) if (run_dir / "rows").is_dir() else pd.DataFrame()
    if rows.empty:
        return _not_run(head, f"invgan eval --config {rel}", run_dir)
    runs_used = [(cfg, run_dir, rel, rows)]
    for also in spec.also:  # more attacks on the same examples, from another config's run
        c2, d2, rel2, _ = _locate(spec, runs, also)
        r2 = read_rows(d2, EVAL_ROWS) if (d2 / "rows").is_dir() else pd.DataFrame()
        runs_used.append((c2, d2, rel2, r2))
    head = head.replace(f"Config: `{rel}`", "Config: " + " + ".join(f"`{r}`" for _, _, r, _ in runs_used))
    merged = pd.concat(
        [rows] + [r[~r["attack"].isin(rows["attack"].unique())] for *_, r in runs_used[1:] if not r.empty]
    )  # the first run's clean rows (and any attack it has) stay; the others add their own attacks
    rows = scored(merged)  # diverged rows are neither correct nor incorrect, as in the eval's own tables
    metric = spec.metric
    per_column = {c: spec.metric_of(c) for c in spec.columns}
    paper = spec.paper
    cells: dict[str, dict[str, Cell]] = {}
    for m in dict.fromkeys(per_column.values()):
        cols = {c: a for c, a in spec.columns.items() if per_column[c] == m}
        if m == "mse":
            part = mse_cells(rows, cols, paper, _image_size(cfg))
        else:
            part = (auc_cells if m == "auc" else accuracy_cells)(rows, cols, paper)
        for d, row in part.items():
            cells.setdefault(d, {}).update(row)
    cells = {d: {c: cells[d][c] for c in spec.columns if c in cells[d]} for d in cfg.defenses if d in cells}
    flags = flags_summary(merged_flags([c for c, *_ in runs_used], merged))
    digits: dict[str, int | None] = {c: {"auc": None, "mse": 4}.get(m, 2) for c, m in per_column.items()}
    partial, run_lines = [], []
    for c, folder, rel_c, r in runs_used:
        if r.empty:
            partial.append(f"**`{rel_c}` not run yet**: `invgan eval --config {rel_c}` writes `{folder.name}`.")
            continue
        done, total = _shards(r, folder, c)
        if done != total:
            partial.append(
                f"**Partial run: {done} of {total} shards of `{rel_c}`.** Rerunning its command resumes it; "
                "the cells hold the finished shards' examples only."
            )
        run_lines.append(
            f"Run `{folder.name}` (MLflow run `{_run_id(folder)}`), {len(r['example_id'].unique())} examples of "
            f"`{c.dataset}/{c.split}`, {done} of {total} shards, compute {_compute_seconds(r, c) / 3600:.2f} "
            "core-hours."
        )
    lines = [head + "".join(p + "\n\n" for p in partial) + cells_markdown(cells, digits), "", *run_lines]
    lines[-1] += (
        " Bold: ours; n: examples in the cell"
        + (
            " (several attacks in one column: an example counts as correct only if it survives all)"
            if any(len(a) > 1 for a in spec.columns.values())
            else ""
        )
        + "."
    )
    if verdict_line(cells):
        lines.append("\n" + verdict_line(cells))
    if spec.compare is not None:
        cheap, reference = spec.compare.cheap, spec.compare.reference
        iters = rows[~rows["attacked"]].groupby("defense")["effective_iterations"].mean()
        ratio = iters.get(cheap, np.nan) / iters.get(reference, np.nan)
        lines.append(
            f"\n**{cheap}** ({iters.get(cheap, np.nan):.0f} effective iterations per example, {ratio:.2f} of "
            f"{reference}'s {iters.get(reference, np.nan):.0f}) against **{reference}**, on the same examples; "
            "the claim: as accurate (a difference of 0 in the 95 % interval of the paired difference):"
        )
        accuracy_columns = {c: a for c, a in spec.columns.items() if per_column[c] == "accuracy"}
        lines += paired_comparison(rows, cheap, reference, accuracy_columns)
    if spec.versus is not None:
        other_cfg, other_dir, other_rel, _ = _locate(spec, runs, spec.versus.config)
        changed = [d for d, ds in cfg.defenses.items() if other_cfg.defenses.get(d, ds) != ds]
        other = read_rows(other_dir, EVAL_ROWS) if (other_dir / "rows").is_dir() else pd.DataFrame()
        lines.append(
            f"\n**Against {spec.versus.label}** (`{other_rel}`), each cell of a defense the two configs set "
            "differently beside the same cell there, on the same examples; the claim: no difference (0 in the 95 % "
            "interval of the paired difference, this run's accuracy minus that one's):"
        )
        accuracy_columns = {c: a for c, a in spec.columns.items() if per_column[c] == "accuracy"}
        found = versus_lines(rows, scored(other), accuracy_columns, changed) if not other.empty else []
        lines += found or [f"- no examples in common yet (`{other_rel}`: {len(other)} rows)."]
    lines += masking_lines(flags)
    if spec.convergence:
        lines.append(convergence_text(key, spec, rows, [c for c, *_ in runs_used], figures))
    if spec.notes:
        lines.append("\n" + spec.notes.strip())
    plotted = {d: {c: v for c, v in row.items() if per_column[c] == metric} for d, row in cells.items()}
    ylabel = {"auc": "ROC AUC", "mse": "reconstruction MSE"}.get(metric, "accuracy")
    return "\n".join(lines) + "\n", cells_figure(plotted, spec.title, ylabel)


def masking_lines(flags: dict) -> list[str]:
    """The masking checks' flags, each with its n; a flag on fewer than MIN_N examples reads *undecided* (a
    difference of a few examples), not a finding."""
    raised = flags["flagged"]
    small = sum(f["n"] < MIN_N for f in raised)
    head = f"\nGradient-masking checks: {flags['checks']} run, {len(raised)} flagged"
    if small:
        head += f" ({small} on n < {MIN_N}: undecided)"
    lines = [head + (":" if raised else ".")]
    for f in raised:
        wilson_1, wilson_2 = wilson(round(f["acc"] * f["n"]), f["n"]), wilson(round(f["acc_other"] * f["n"]), f["n"])
        lines.append(
            f"- {f['defense']}: **{f['check']}** — {f['attack']} {f['acc']:.2f} [{wilson_1.low:.2f}, "
            f"{wilson_1.high:.2f}] vs {f['compared_with']} {f['acc_other']:.2f} [{wilson_2.low:.2f}, "
            f"{wilson_2.high:.2f}] (n={f['n']})" + (f": *undecided* (n < {MIN_N})" if f["n"] < MIN_N else "")
        )
    return lines


def curves_section(key: str, spec: CurvesTable, runs: Path, figures: Path) -> tuple[str, Figure | None]:
    """An `invgan curves` run (InvGAN Fig. 4): accuracy and seconds per effective iterations, and the
    smallest InvGAN budget that reaches the reference's accuracy at its largest budget."""
    cfg, run_dir, rel, head = _locate(spec, runs)
    rows = read_rows(run_dir, EVAL_ROWS) if (run_dir / "rows").is_dir() else pd.DataFrame()
    if rows.empty:
        return _not_run(head, f"invgan curves --config {rel}", run_dir)
    table = curve_table(rows, point_defenses(cfg))
    lines = [
        head + "| defense | effective iterations | clean accuracy | attacked accuracy | s per example | n |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.family} | {r.effective_iterations} | {r.clean_accuracy:.3f} | {r.attacked_accuracy:.3f} | "
        f"{r.seconds_per_example:.3f} | {r.n} |"
        for r in table.itertuples()
    ]
    lines.append(
        f"\nRun `{run_dir.name}` (eval run `{_run_id(run_dir)}`), "
        f"{rows['example_id'].nunique()} examples of `{cfg.dataset}/{cfg.split}`, attacked: "
        f"{', '.join(cfg.attacks)}. Seconds are wall time per example on one worker (one core)."
    )
    lines += ["", *_reaches(table, spec.cheap, spec.reference)]
    if spec.notes:
        lines.append("\n" + spec.notes.strip())
    return "\n".join(lines) + "\n", curve_figure(table, spec.title)


def _reaches(table: pd.DataFrame, cheap: str, reference: str, tol: float = 0.005) -> list[str]:
    """Plain sentences: the fewest effective iterations at which `cheap` reaches `reference`'s accuracy at
    its largest budget (within `tol`), and that as a fraction of the reference's iterations."""
    out: list[str] = []
    ref, mine = table[table.family == reference], table[table.family == cheap]
    if ref.empty or mine.empty:
        return out
    top = ref.loc[ref.effective_iterations.idxmax()]
    for column, label in (("clean_accuracy", "clean"), ("attacked_accuracy", "attacked")):
        if not np.isfinite(top[column]):
            continue
        ok = mine[mine[column] >= top[column] - tol]
        if ok.empty:
            out.append(
                f"- {label}: {cheap} never reaches {reference}'s {top[column]:.3f} at {top.effective_iterations} "
                f"iterations (best {mine[column].max():.3f})."
            )
            continue
        first = ok.loc[ok.effective_iterations.idxmin()]
        out.append(
            f"- {label}: {cheap} reaches {reference}'s {top[column]:.3f} (at {top.effective_iterations} "
            f"iterations) within {tol} at **{first.effective_iterations} iterations = "
            f"{first.effective_iterations / top.effective_iterations:.4f}** of them ({first[column]:.3f})."
        )
    return out


def red_section(key: str, spec: RedTable, runs: Path, figures: Path) -> tuple[str, Figure | None]:
    """An `invgan red` run (RED Table 1): signal accuracy and attack-type accuracy per method beside the paper."""
    cfg, run_dir, rel, head = _locate(spec, runs)
    rows = read_rows(run_dir, RED_ROWS) if (run_dir / "rows").is_dir() else pd.DataFrame()
    if rows.empty:
        return _not_run(head, f"invgan red --config {rel}", run_dir)
    names = list(cfg.dictionary.attacks)
    tables = red_tables(rows, names)
    parts = [head]
    for which, title, paper in (
        ("signal_accuracy", "Signal accuracy", spec.paper.signal_accuracy),
        ("attack_accuracy", "Attack-type accuracy", spec.paper.attack_accuracy),
    ):
        t = tables[which]
        cells = {
            str(m): {
                str(c): fraction_cell(
                    None if pd.isna(t.loc[m, c]) else float(t.loc[m, c]),
                    int(tables["n"].loc[m, c]) if not pd.isna(tables["n"].loc[m, c]) else 0,
                    paper.get(m, {}).get(c),
                )
                for c in t.columns
            }
            for m in t.index
        }
        parts.append(
            f"**{title}** (rows: method; columns: the input's attack)\n\n"
            + cells_markdown(cells, 3, "method")
            + ("\n\n" + verdict_line(cells) if verdict_line(cells) else "")
            + "\n"
        )
    secs = rows.groupby("method")["seconds"].mean()
    parts.append(
        f"Run `{run_dir.name}` (MLflow run `{_run_id(run_dir)}`), "
        f"{rows['example_id'].nunique()} test examples of `{cfg.dataset}`, dictionary {cfg.dictionary.per_class} "
        f"per class x {len(names)} attack types, {cfg.steps} steps. Seconds per input: "
        + ", ".join(f"{m} {v:.2f}" for m, v in secs.items())
        + ". Attack-type accuracy of bsd_gan is BSD-GAN-AD's, of sbsc SBSAD's."
    )
    if spec.notes:
        parts.append("\n" + spec.notes.strip())
    return "\n".join(parts) + "\n", confusion_figure(rows, names)


def distortion_curve(rows: pd.DataFrame, eps: np.ndarray) -> np.ndarray:
    """Accuracy at each ℓ2 budget of a minimum-distortion attack's rows: an example counts as correct at ε if
    the defense classified its adversarial correctly, or the adversarial needed more than ε (l2 > ε)."""
    correct, l2 = rows["correct"].to_numpy(dtype=bool), rows["l2"].to_numpy(dtype=float)
    return (correct[None, :] | (l2[None, :] > eps[:, None])).mean(axis=1)


def distortion_section(key: str, spec: DistortionTable, runs: Path, figures: Path) -> tuple[str, Figure | None]:
    """Chen, Xie & Zhu Fig. 1: accuracy vs ℓ2 distortion, per defense, one line per (minimum-distortion) attack."""
    cfg, run_dir, rel, head = _locate(spec, runs)
    rows = read_rows(run_dir, EVAL_ROWS) if (run_dir / "rows").is_dir() else pd.DataFrame()
    if rows.empty:
        return _not_run(head, f"invgan eval --config {rel}", run_dir)
    rows = scored(rows)
    budgets = spec.table_eps
    grid = np.linspace(0, spec.max_eps, 101)
    defenses = [d for d in cfg.defenses if d in set(rows["defense"])]
    lines = [
        head + "| defense | attack | n | " + " | ".join(f"ℓ2 ≤ {b:g}" for b in budgets) + " | median ℓ2 of successes |"
    ]
    lines.append("|---|---|---|" + "---|" * (len(budgets) + 1))
    fig = Figure(figsize=(4.2 * max(len(defenses), 1), 3.4), layout="constrained")
    axes = fig.subplots(1, max(len(defenses), 1), squeeze=False)[0]
    for ax, defense in zip(axes, defenses, strict=False):
        for attack in spec.attacks:
            sub = rows[(rows["defense"] == defense) & (rows["attack"] == attack)]
            if sub.empty:
                continue
            at = distortion_curve(sub, np.array(budgets))
            won = sub[~sub["correct"].astype(bool)]["l2"]
            med = f"{won.median():.2f}" if len(won) else "–"
            lines.append(f"| {defense} | {attack} | {len(sub)} | " + " | ".join(f"{a:.2f}" for a in at) + f" | {med} |")
            ax.plot(grid, distortion_curve(sub, grid), label=f"{attack} (n={len(sub)})")
        ax.set_title(defense)
        ax.set_xlabel("ℓ2 distortion")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(spec.title, fontsize=10)
    lines.append(
        f"\nRun `{run_dir.name}`, {rows['example_id'].nunique()} examples of `{cfg.dataset}/{cfg.split}`. "
        "Accuracy at budget ε: the defense classifies the attack's smallest adversarial correctly, or that "
        "adversarial is farther than ε (an example the attack never fooled counts at every ε)."
    )
    if spec.notes:
        lines.append("\n" + spec.notes.strip())
    return "\n".join(lines) + "\n", fig


def red_theory_section(key: str, spec: RedTheoryTable, runs: Path, figures: Path) -> tuple[str, Figure | None]:
    """`invgan red-theory`'s numbers (RED Fig. 1, μ vs m, and the linear-convergence rate) and its figures."""
    folder = runs / spec.folder
    head = f"## {spec.title}\n\nPaper: {spec.source}. "
    head += f"Command: `invgan red-theory --out {_relative(folder)}`.\n\n"
    if not (folder / "theory.json").exists():
        return head + f"*Not run yet.* `invgan red-theory --out {_relative(folder)}`; then `invgan report`.\n", None
    numbers = json.loads((folder / "theory.json").read_text())
    acts = [k.split("/", 1)[1] for k in numbers if k.startswith("mean_mu/")]
    lines = [head + "| output dimension m | " + " | ".join(f"mean μ ({a})" for a in acts) + " |"]
    lines.append("|---|" + "---|" * len(acts))
    for i, m in enumerate(numbers["m"]):
        lines.append(f"| {m} | " + " | ".join(f"{numbers[f'mean_mu/{a}'][i]:.3g}" for a in acts) + " |")
    lines.append(
        f"\nLinear convergence at m = 100: mean rate {numbers['rate_m100']:.4f} per step (||Δz||² + ||Δc||² "
        f"shrinks by that factor); attack type recovered on {numbers['attack_type_recovered']:.0%} of the instances."
    )
    links = []
    for name in ("mu_vs_m", "convergence"):
        if (folder / f"{name}.png").exists():
            target = figures / f"{key}_{name}.png"
            shutil.copyfile(folder / f"{name}.png", target)
            links.append(f"![{name}](figures/{target.name})")
    if spec.notes:
        lines.append("\n" + spec.notes.strip())
    return "\n".join(lines) + "\n\n" + "\n".join(links) + "\n", None


ORDERING = [("clip", "none"), ("stochastic_clip", "clip"), ("stochastic_clip", "none")]


def ordering_text(rows: pd.DataFrame, thresholds: list[float]) -> str:
    """Lipton & Tripathi's claim as the paper states it: stochastic clipping recovers at least as many latents
    as clipping, and clipping as none. Each pair on the same trials (same target, same start), per ε: the
    paired difference of the recovered fractions with its 95 % bootstrap interval, read as *holds* (above 0),
    *reversed* (below 0) or *not decided* (0 inside)."""
    t1 = rows[rows.table == 1]
    err = t1.pivot_table(index="trial", columns="constraint", values="sq_err", aggfunc="first")
    lines = [
        "**The ordering** (the paper's claim), each pair on the same trials, the difference in the fraction "
        "recovered with its 95 % interval:",
        "",
        "| pair | " + " | ".join(f"ε = {e:g}" for e in thresholds) + " |",
        "|---|" + "---|" * len(thresholds),
    ]
    for better, worse in ORDERING:
        if better not in err or worse not in err:
            continue
        both = err[[better, worse]].dropna()
        cells = []
        for e in thresholds:
            d = paired_difference((both[better] < e).to_numpy(), (both[worse] < e).to_numpy())
            word = "holds" if d.low > 0 else "reversed" if d.high < 0 else "not decided"
            cells.append(f"{d.value:+.3f} [{d.low:+.3f}, {d.high:+.3f}] *{word}*")
        lines.append(f"| {better} − {worse} (n={len(both)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def recovery_section(key: str, spec: RecoveryTable, runs: Path, figures: Path) -> tuple[str, Figure | None]:
    """An `invgan recovery` run (Lipton & Tripathi Tables 1-2) beside the paper's numbers."""
    cfg, run_dir, rel, head = _locate(spec, runs)
    if not (run_dir / "rows.parquet").exists():
        return _not_run(head, f"invgan recovery --config {rel}", run_dir)
    rows = pd.read_parquet(run_dir / "rows.parquet")
    summary = json.loads((run_dir / "summary.json").read_text())
    tables = recovery_tables(rows, cfg.thresholds, int(summary["latent_dim"]), cfg.seed)
    paper = spec.paper
    t1 = tables["table1"]
    cells = {
        str(c): {
            col: fraction_cell(float(t1.loc[c, col]), int(t1.loc[c, "n"]), paper.table1.get(c, {}).get(col))
            for col in t1.columns
            if col != "n"
        }
        for c in t1.index
    }
    parts = [
        head
        + "**Table 1**: fraction of trials with ||z − z'||² / d < ε\n\n"
        + cells_markdown(cells, 3, "clipping")
        + ("\n\n" + verdict_line(cells) if verdict_line(cells) else "")
        + "\n"
    ]
    parts.append(ordering_text(rows, cfg.thresholds))
    t2 = tables["table2"]
    if len(t2):
        lines = ["**Table 2**: mean pairwise ||z'_i − z'_j||₂ / d of the recoveries of one real image", ""]
        lines += ["| clipping | ours | paper |", "|---|---|---|"]
        for c, v in t2.iloc[:, 0].items():
            theirs = paper.table2.get(str(c))
            lines.append(f"| {c} | **{v:.3g}** | {'–' if theirs is None else f'{theirs:.3g}'} |")
        parts.append("\n".join(lines) + "\n")
    parts.append(
        f"Run `{run_dir.name}` (MLflow run `{_run_id(run_dir)}`): {cfg.trials} trials of {cfg.steps} {cfg.optimizer} "
        f"steps (lr {cfg.lr}) on `{cfg.weights}/{cfg.generator}` (d = {summary['latent_dim']}), "
        f"{summary['seconds'] / 60:.0f} min."
    )
    if spec.notes:
        parts.append("\n" + spec.notes.strip())
    return "\n".join(parts) + "\n", None


SECTIONS: dict[type[BaseTable], Callable[..., tuple[str, Figure | None]]] = {
    EvalTable: eval_section,
    CurvesTable: curves_section,
    RedTable: red_section,
    DistortionTable: distortion_section,
    RedTheoryTable: red_theory_section,
    RecoveryTable: recovery_section,
}


def table_section(key: str, spec: Table, runs: Path, figures: Path) -> tuple[str, Figure | None]:
    """One table's markdown (and figure), from its config's run folder under `runs`; its kind picks the job.
    Figures a section writes itself (a convergence curve, red-theory's plots) go to `figures`."""
    text, figure = SECTIONS[type(spec)](key, spec, runs, figures)
    if isinstance(spec, ConfigTable) and spec.protocol:
        text += deviations_text(spec, runs)
    return text, figure


def deviations_text(spec: ConfigTable, runs: Path) -> str:
    """The section's "Deviations" list: every setting of the paper's protocol (`protocol:` in the paper-numbers
    file) where the table's configs differ, read from the configs and the weights manifests they load."""
    configs = []
    for config in (spec.config, *getattr(spec, "also", [])):
        cfg = _locate(spec, runs, config)[0]
        weights = cfg.weights_dir() if hasattr(cfg, "weights_dir") else PROJECT_ROOT / cfg.weights
        configs.append((cfg.model_dump(mode="json"), weights))
    try:
        lines, compared = deviations(spec.protocol, configs)
    except KeyError as err:
        raise SystemExit(f"{spec.title}: {err.args[0]}") from None
    if not lines:
        return f"\n**Deviations from the paper's protocol**: none of the {compared} settings it states.\n"
    return (
        f"\n**Deviations from the paper's protocol** ({len(lines)} of the {compared} settings it states, read from "
        "the configs and weights manifests):\n" + "\n".join(lines) + "\n"
    )


HEADLINE_START, HEADLINE_END = "<!-- invgan report: headline -->", "<!-- /invgan report -->"


def update_headline(readme: Path, text: str) -> bool:
    """Replace the block between the README's headline markers by `text` (the table marked `headline: true`);
    False if the README has no such block (nothing is written)."""
    old = readme.read_text() if readme.exists() else ""
    start, end = old.find(HEADLINE_START), old.find(HEADLINE_END)
    if start < 0 or end < start:
        return False
    new = old[: start + len(HEADLINE_START)] + "\n" + text.strip() + "\n" + old[end:]
    if new != old:
        atomic_write_bytes(readme, new.encode())
    return True


def _as_headline(text: str, key: str) -> str:
    """A section of results.md for the README: its title one level down, figures linked from docs/, long
    paragraphs wrapped (the README is read as source too; markdown renders them the same)."""
    text = text.replace("](figures/", "](docs/figures/")
    text = re.sub(r"^## ", "### ", text, count=1) + f"\nFull report: [docs/results.md](docs/results.md#{key}).\n"
    return wrap_paragraphs(text)


def wrap_paragraphs(text: str, width: int = 120) -> str:
    """Every line of plain prose longer than `width` wrapped at spaces; tables, headings, lists, images, code
    and HTML lines stay as they are."""
    return "\n".join(
        textwrap.fill(line, width, break_long_words=False, break_on_hyphens=False)
        if len(line) > width and not line.lstrip().startswith(("|", "#", "-", "*", "!", "`", "<", ">"))
        else line
        for line in text.split("\n")
    )


def _no_runs(runs: Path, tables: dict[str, Table]) -> str:
    """One line: `runs` holds no run folder of any table, and the command that makes one."""
    example = next(
        (_relative(REPRO_DIR / t.config) for t in tables.values() if isinstance(t, EvalTable)),
        _relative(REPRO_DIR) / "<config>.yaml",
    )
    return (
        f"no run folders of the configs in {_relative(REPRO_DIR)}/ found in {runs}: `invgan eval --config "
        f"{example}` makes one (or point --runs at the folder that holds them)"
    )


def build_report(
    out: Path, *, runs: Path | None = None, paper_numbers: Path = PAPER_NUMBERS, readme: Path | None = None
) -> Path:
    """Write out/results.md and out/figures/<table>.png; returns the markdown's path. With `readme`, the table
    marked `headline: true` also replaces the README's headline block (between HEADLINE_START and _END).
    A paper-numbers file that does not validate, or a `runs` folder with no run of any table, ends the
    command with one line (SystemExit) before anything is written."""
    runs = runs or RESULTS_DIR
    try:
        tables = load_paper_numbers(paper_numbers)
    except ValueError as err:  # the file's problems, each naming its table and field
        raise SystemExit(f"{paper_numbers}: {err}") from None
    if not any(d.exists() for spec in tables.values() for d in _run_dirs(spec, runs)):
        raise SystemExit(_no_runs(runs, tables))
    figures_dir = out / "figures"
    figures_dir.mkdir(parents=True, exist_ok=True)
    parts = [
        "# Results\n",
        f"Generated by `invgan report` from the rows of the reproduction runs in `{runs.name}/`; do not edit by "
        "hand. The papers' numbers come from `configs/repro/paper_numbers.yaml`. Every cell: our accuracy (bold), "
        "its 95 % interval (Wilson; bootstrap for an AUC) and n, the paper's number and the verdict. The report "
        "before the rows were tracked, whose rows are lost: [archive](archive/results-2026-11-25.md).\n",
    ]
    for key, spec in tables.items():
        text, figure = table_section(key, spec, runs, figures_dir)
        if figure is not None:
            path = figures_dir / f"{key}.png"
            figure.savefig(path, dpi=110)
            text += f"\n![{spec.title}](figures/{key}.png)\n"
        parts.append(f'<a id="{key}"></a>\n\n' + text)
        if readme is not None and spec.headline:
            update_headline(readme, _as_headline(text, key))
    target = out / "results.md"
    atomic_write_bytes(target, "\n".join(parts).encode())
    return target
