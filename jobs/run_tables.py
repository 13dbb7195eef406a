"""From evaluation rows to results: accuracy and AUC tables, figures, MLflow records, summary.json.

The rows are one per (example, attack, defense) (`jobs.schemas.EvalRow`); everything here is computed
from them on the driver, so a table can always be rebuilt from the Parquet shards. Attack "clean"
is the unattacked input; "worst_case" is the per-example minimum over attacks (AutoAttack
convention). Only `log_to_mlflow` touches MLflow, and only the driver calls it.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # a bare Figure: no pyplot state, rendered by Agg on savefig

from invgan_core.detection import detection_auc, detection_roc
from invgan_core.files import atomic_write_json
from jobs.schemas import EVAL_ROWS

CLEAN, WORST = "clean", "worst_case"
MAX_PARAM_VALUE, MAX_TAG_VALUE, PARAMS_PER_BATCH = 6000, 8000, 100  # MLflow's limits


def validate_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Raise ValueError on missing columns, duplicate cells or a wrong `attacked` flag; return the rows
    with names as plain strings (a categorical read from Parquet could group unseen names) and scores float."""
    required = [c for c in EVAL_ROWS.columns if c not in EVAL_ROWS.added_later]  # older runs lack the later ones
    missing = [c for c in required if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {', '.join(missing)} (expected: {', '.join(EVAL_ROWS.columns)})")
    dup = int(rows.duplicated(["example_id", "attack", "defense"]).sum())
    if dup:
        raise ValueError(
            f"rows hold {dup} duplicate (example_id, attack, defense) row(s); a shard was probably written twice"
        )
    wrong = int((rows["attacked"].astype(bool) == (rows["attack"] == CLEAN)).sum())
    if wrong:
        raise ValueError(f"{wrong} row(s) have `attacked` inconsistent with attack == {CLEAN!r}")
    diverged = rows["diverged"].fillna(False) if "diverged" in rows else False  # rows from before the column
    return rows.assign(diverged=diverged).astype(
        {
            "attack": str,
            "defense": str,
            "detection_score": "float64",
            "correct": bool,
            "attacked": bool,
            "diverged": bool,
        }
    )


def scored(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows that count as correct or incorrect: diverged rows left out (rows from before the
    `diverged` column all count). Every table, check and curve derived from rows scores these."""
    if "diverged" not in rows.columns:
        return rows
    return rows[~rows["diverged"].fillna(False).astype(bool)]


def _attack_order(names) -> list[str]:
    """clean first, worst_case last, the rest in order of first appearance (the config's order)."""
    names = list(dict.fromkeys(names))
    middle = [n for n in names if n not in (CLEAN, WORST)]
    return [CLEAN] * (CLEAN in names) + middle + [WORST] * (WORST in names)


def _worst_case(d_rows: pd.DataFrame, attacks=None) -> tuple[float, int] | None:
    """(accuracy, n) over examples with rows for clean and every attack of this defense (`attacks`: all the
    defense has rows for, diverged ones included, so a cell left out does not drop out of the worst case)."""
    wide = d_rows.pivot(index="example_id", columns="attack", values="correct")
    if attacks is not None:
        wide = wide.reindex(columns=list(attacks))
    complete = wide.dropna()
    if complete.empty:
        return None
    return float(complete.astype(bool).all(axis=1).mean()), len(complete)


def _detection_pairs(d_rows: pd.DataFrame):
    """Yield (attack, clean scores, attacked scores) per attack of one defense, the clean negatives
    restricted to the same example ids as the attacked positives; attacks without scores are skipped."""
    clean = d_rows[~d_rows["attacked"]].set_index("example_id")["detection_score"]
    for attack, g in d_rows[d_rows["attacked"]].groupby("attack", sort=False):
        g = g[np.isfinite(g["detection_score"])]
        negatives = clean.reindex(g["example_id"].to_numpy())
        negatives = negatives[np.isfinite(negatives)]
        if len(g) and len(negatives):
            yield attack, negatives.to_numpy(), g["detection_score"].to_numpy()


def summarize(rows: pd.DataFrame) -> dict:
    """Aggregate rows into {accuracy, n, auc, seconds_per_example, diverged: {defense: {attack: v}}, mean_l2,
    mean_linf}.

    - accuracy/n: mean of `correct` and row count per (defense, attack), "clean" included;
      each cell has its own n because attacks may run on a subset (`limit`) or against some defenses.
    - worst_case (AutoAttack convention): an example is correct only if correct on clean and under
      every attack with rows for that defense, computed over the examples that have rows for all of
      them (typically the smallest `limit`); its n is that count. Absent if no example has all.
    - auc: detection ROC AUC (InvGAN Table 3), attacked scores vs the same defense's clean scores of
      the same example ids; rows with NaN scores are ignored, so cells without scores (defense
      "none") are absent.
    - mean_l2/mean_linf: mean distortion per attack over its attacked rows (all defenses).
    - diverged: rows whose attack or projection blew up (NaN/∞, a runaway latent), per cell where there are
      any. They are left out of accuracy, n, worst case, AUC and distortions, with a warning (a diverged
      projection's prediction is not a measurement of the defense); seconds_per_example keeps them (the
      compute was spent).
    """
    rows = validate_rows(rows)
    out: dict[str, dict] = {k: {} for k in ("accuracy", "n", "auc", "seconds_per_example", "diverged")}
    for (defense, attack), count in rows[rows["diverged"]].groupby(["defense", "attack"], sort=False).size().items():
        out["diverged"].setdefault(defense, {})[attack] = int(count)
    warning = diverged_warning(out)
    if warning:  # on stderr like the runner's other warnings: the job goes on, the tables say it too
        print(warning, file=sys.stderr, flush=True)
    for defense, d_rows in rows.groupby("defense", sort=False):  # the compute spent: diverged rows included
        seconds = d_rows.groupby("attack", sort=False)["seconds"].mean()
        out["seconds_per_example"][defense] = {a: float(seconds[a]) for a in _attack_order(seconds.index)}
    all_rows, rows = rows, scored(rows)
    for defense in all_rows["defense"].unique():  # a cell whose every row diverged still shows n = 0
        for attack in out["diverged"].get(defense, {}):
            if not ((rows["defense"] == defense) & (rows["attack"] == attack)).any():
                out["n"].setdefault(defense, {})[attack] = 0
    for defense, d_rows in rows.groupby("defense", sort=False):
        cells = d_rows.groupby("attack", sort=False).agg(
            accuracy=("correct", "mean"), n=("correct", "size"), seconds=("seconds", "mean")
        )
        order = _attack_order(cells.index)
        out["accuracy"][defense] = {a: float(cells.at[a, "accuracy"]) for a in order}
        out["n"][defense] = {a: int(cells.at[a, "n"]) for a in order} | out["n"].get(defense, {})
        worst = _worst_case(d_rows, all_rows.loc[all_rows["defense"] == defense, "attack"].unique())
        if worst is not None:
            out["accuracy"][defense][WORST], out["n"][defense][WORST] = worst
        aucs = {a: detection_auc(neg, pos) for a, neg, pos in _detection_pairs(d_rows)}
        if aucs:
            out["auc"][defense] = aucs
    attacked = rows[rows["attacked"]].groupby("attack", sort=False)
    out["mean_l2"] = {a: float(v) for a, v in attacked["l2"].mean().items()}
    out["mean_linf"] = {a: float(v) for a, v in attacked["linf"].mean().items()}
    return out


def diverged_warning(summary: dict) -> str | None:
    """One line naming the cells with diverged rows (None without any)."""
    cells = summary.get("diverged") or {}
    total = sum(v for c in cells.values() for v in c.values())
    if not total:
        return None
    where = ", ".join(f"{d}/{a}: {v}" for d, c in cells.items() for a, v in c.items())
    return (
        f"warning: {total} row(s) diverged (NaN/inf or a runaway latent: lower the step size) and are left "
        f"out of accuracy, worst case and AUC ({where})"
    )


def table_frame(summary: dict, metric: str = "accuracy") -> pd.DataFrame:
    """One metric as a DataFrame: a `defense` column, then one column per attack (NaN where not run)."""
    table = summary[metric]
    attacks = _attack_order(a for cells in table.values() for a in cells)
    return pd.DataFrame([{"defense": d, **cells} for d, cells in table.items()], columns=["defense", *attacks])


def markdown_table(summary: dict, metric: str = "accuracy", digits: int | None = None) -> str:
    """Defenses × attacks as a padded markdown table (readable as plain text), cells `0.83 (n=100)`."""
    table, counts, diverged = summary[metric], summary["n"], summary.get("diverged") or {}
    if not table and not diverged:
        return f"(no {metric} cells)"
    digits = digits if digits is not None else (4 if metric == "auc" else 2)
    defenses = list(dict.fromkeys([*table, *diverged]))
    attacks = _attack_order(a for d in defenses for a in [*table.get(d, {}), *diverged.get(d, {})])

    def cell(defense: str, attack: str) -> str:
        value, k = table.get(defense, {}).get(attack), diverged.get(defense, {}).get(attack, 0)
        lost = f", {k} diverged" if k else ""
        if value is None:
            return f"- ({k} diverged)" if k else "-"
        return f"{value:.{digits}f} (n={counts[defense][attack]}{lost})"

    lines = [["defense", *attacks]]
    for defense in defenses:
        lines.append([defense, *(cell(defense, a) for a in attacks)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(attacks) + 1)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines[1:])])


def roc_figure(rows: pd.DataFrame) -> Figure:
    """Detection ROC curves: one panel per defense with scores, one curve per attack, AUC in the legend."""
    rows = validate_rows(rows)
    panels = [(d, list(_detection_pairs(g))) for d, g in rows.groupby("defense", sort=False)]
    panels = [(d, pairs) for d, pairs in panels if pairs]
    fig = Figure(figsize=(4 * max(len(panels), 1), 4), layout="constrained")
    if not panels:
        fig.text(0.5, 0.5, "no detection scores", ha="center", va="center")
        return fig
    for ax, (defense, pairs) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True):
        for attack, neg, pos in pairs:
            fpr, tpr = detection_roc(neg, pos)
            ax.plot(fpr, tpr, label=f"{attack} (AUC={detection_auc(neg, pos):.3f}, n={len(pos)})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        ax.set(title=defense, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="lower right", fontsize="small")
    return fig


def _named(images, kind: str) -> dict[str, np.ndarray]:
    if isinstance(images, Mapping):
        return {f"{kind}: {name}": np.asarray(a) for name, a in images.items()}
    return {kind: np.asarray(images)}


def image_grid(clean, attacked, projected, labels=None, *, columns: int = 8) -> Figure:
    """Rows clean / attacked / projected (one per entry when a dict), columns examples (InvGAN Fig. 2).

    Arrays are (N, C, H, W) in [0, 1]; `labels` (N,) titles the columns.
    """
    groups = {**_named(clean, "clean"), **_named(attacked, "attacked"), **_named(projected, "projected")}
    for name, a in groups.items():
        if a.ndim != 4 or a.shape[1] not in (1, 3):
            raise ValueError(f"image_grid: {name!r} has shape {a.shape}; expected (N, 1 or 3, H, W)")
    k = min(columns, *(len(a) for a in groups.values()))
    fig = Figure(figsize=(1.2 * k + 1.2, 1.3 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), k, squeeze=False)
    for r, (name, a) in enumerate(groups.items()):
        for c in range(k):
            ax, img = axes[r, c], np.clip(a[c], 0, 1)
            if img.shape[0] == 1:
                ax.imshow(img[0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img.transpose(1, 2, 0))
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize="small")
            if r == 0 and labels is not None:
                ax.set_title(f"y={int(labels[c])}", fontsize="small")
    return fig


def safe_name(name: str) -> str:
    """`name` with characters MLflow forbids in metric/param keys replaced by '_'."""
    return re.sub(r"[^\w.\- /]", "_", str(name))


def _metric_part(name: str) -> str:
    part = safe_name(name).replace("/", "_")  # a defense or attack name must not add path levels
    return "_" if part in ("", ".", "..") else part


def flatten_config(config: Mapping, prefix: str = "") -> dict[str, str]:
    """{'a': {'b': 1}} -> {'a.b': '1'}: MLflow params, values as strings cut to MLflow's 6000 chars."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{safe_name(key)}"
        if isinstance(value, Mapping) and value:
            flat |= flatten_config(value, f"{name}.")
        else:
            flat[name] = str(value)[:MAX_PARAM_VALUE]
    return flat


def description(summary: dict, run_name: str, feeds: Sequence[str] = ()) -> str:
    """The run's markdown note: what it feeds (the reproduction tables of docs/results.md), then both tables,
    so the MLflow UI shows results without opening artifacts."""
    fed = f"Feeds {', '.join(feeds)} of docs/results.md (`invgan report`).\n\n" if feeds else ""
    text = (
        f"### {run_name}\n\n{fed}**Accuracy** (defenses × attacks; n = examples per cell; worst_case = correct "
        f"on clean and under every attack)\n\n{markdown_table(summary, 'accuracy')}\n\n"
        f"**Detection ROC AUC** (attacked vs clean of the same examples)\n\n{markdown_table(summary, 'auc')}\n"
    )
    return text[:MAX_TAG_VALUE]


def replace_table(client, run_id: str, frame: pd.DataFrame, artifact_file: str) -> None:
    """client.log_table, but replacing the file when resuming (log_table itself appends rows)."""
    folder = artifact_file.rpartition("/")[0] or None
    if artifact_file in {f.path for f in client.list_artifacts(run_id, folder)}:
        client.log_text(run_id, frame.to_json(orient="split", index=False), artifact_file)
    else:
        client.log_table(run_id, frame, artifact_file)


def log_config_params(client, run_id: str, config_dict: dict) -> None:
    """The flattened config as params, in MLflow-sized batches; on a resumed run only new or changed keys
    (a changed value then raises MLflow's own error: one run never mixes two configs)."""
    from mlflow.entities import Param

    logged = client.get_run(run_id).data.params
    params = [Param(k, v) for k, v in flatten_config(config_dict).items() if logged.get(k) != v]
    for i in range(0, len(params), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + PARAMS_PER_BATCH])


def log_results(
    client,
    run_id: str,
    *,
    summary: dict,
    rows_dir: Path,
    run_name: str,
    figures: dict[str, Figure],
    tags: dict,
    feeds: Sequence[str] = (),
) -> None:
    """Record an evaluation's results in its (running) MLflow run.

    metrics: accuracy|auc|n|seconds_per_example/<defense>/<attack>, mean_l2|mean_linf/<attack>;
    artifacts: tables/*.json, figures/<name>.png, rows/ (Parquet); the note: both tables.
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = {
        f"{m}/{_metric_part(d)}/{_metric_part(a)}": float(v)
        for m in ("accuracy", "auc", "n", "seconds_per_example", "diverged")
        for d, cells in summary.get(m, {}).items()
        for a, v in cells.items()
    }
    metrics |= {f"{m}/{_metric_part(a)}": v for m in ("mean_l2", "mean_linf") for a, v in summary[m].items()}
    items = [Metric(k, v, now, 0) for k, v in metrics.items()]
    for i in range(0, len(items), PARAMS_PER_BATCH * 10):
        client.log_batch(run_id, metrics=items[i : i + PARAMS_PER_BATCH * 10])
    for metric in ("accuracy", "auc", "n"):
        replace_table(client, run_id, table_frame(summary, metric), f"tables/{metric}.json")
    for name, fig in figures.items():
        client.log_figure(run_id, fig, f"figures/{name}.png")
    client.log_artifacts(run_id, str(rows_dir), "rows")
    for key, value in {**tags, "mlflow.note.content": description(summary, run_name, feeds)}.items():
        client.set_tag(run_id, key, str(value)[:MAX_TAG_VALUE])


def write_summary(path: Path, summary: dict, extra: dict[str, Any]) -> None:
    """summary.json (atomically): the whole summary (accuracy, n, auc, ...) plus `extra` (mlflow_run_id, ...)."""
    atomic_write_json(Path(path), summary | extra)
