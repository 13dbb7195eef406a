"""`invgan eval --plan`: what a config will cost, predicted before anything runs.

The cost model counts work in two units and prices them from earlier runs' rows:

- a *row-step*: one step of one latent row through the generator, forward and backward (a projection of one
  example costs restarts x steps of them: Defense-GAN 10 x 200 = 2,000, InvGAN T = 200: 200);
- a *query*: one gradient evaluation of the classifier on one example (an attack step on the classifier).

An attack through a defense spends, per query, the defense's whole projection (BPDA, NES: 1 + samples of them,
unrolled: plus its unrolled steps, about 3 row-steps each with the double backward; reparameterization: G and
the inverter, ~2). A first-success attack stops each example at its first fooling step, so it spends a
*fraction* of its budget: measured per (attack kind, defense kind) from earlier rows (`queries` ÷ budget), else
the whole budget (an upper bound, flagged). Seconds per row-step and per query are fitted per dataset from the
rows' `seconds`, `attack_seconds`, `effective_iterations` and `queries` of every earlier run folder found (the
runs folder, or `--plan-from`), else the shipped defaults (`jobs/cost_defaults.json`, measured on the
development machine: one thread per worker). Wall time for N workers: the shards in order on the first free
worker, plus a start-up.
"""

from __future__ import annotations

import inspect
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from invgan_core import adaptive, attacks
from invgan_core.data import load_dataset
from jobs.common import runs_dir
from jobs.config import EvalConfig, attacked_positions, examples_in_shard, load_config
from jobs.specs import BLACK_BOXES, DEFENSES, WRAPPERS
from jobs.stats import cell_widths, needed

DEFAULTS = Path(__file__).with_name("cost_defaults.json")
START_SECONDS = 20.0  # Ray start, one model load per worker, the driver's summary (measured: 15-25 s)


def projection_row_steps(kind: str, params: dict) -> float:
    """Row-steps of one example's projection by a defense of `kind`: restarts x steps, less what halving
    (`prune_every`) saves; InvGAN adds 1 for its encoder pass."""
    if kind == "none":
        return 0.0
    defaults = {k: p.default for k, p in inspect.signature(DEFENSES[kind]).parameters.items()}
    p = defaults | params
    restarts, steps = p.get("restarts", 1), p["steps"]
    prune = p.get("prune_every")
    if not prune:
        return float(restarts * steps) + (1.0 if kind == "invgan" else 0.0)
    total, k = 0, restarts
    for t in range(steps):
        if t > 0 and t % prune == 0 and k > 1:
            k = (k + 1) // 2
        total += k
    return float(total)


def max_queries(attack) -> int:
    """The most queries (gradient evaluations) an attack spends on one example."""
    if isinstance(attack, adaptive.ThroughDefense):
        return max_queries(attack.attack)
    if isinstance(attack, attacks.FGSM) or isinstance(attack, adaptive.Substitute):
        return 1
    if isinstance(attack, attacks.GradientDescent):
        return attack.steps * attack.restarts + (attack.restarts if attack.restarts > 1 else 0)
    if isinstance(attack, (attacks.CarliniWagnerL2, adaptive.SignCW)):
        return attack.binary_search_steps * attack.steps
    raise TypeError(f"no query count for {type(attack).__name__}")


def row_steps_per_query(attack, defense_row_steps: float) -> float:
    """Generator row-steps one query of an end-to-end attack costs through a defense of that projection."""
    if isinstance(attack, adaptive.Reparameterization):
        return 2.0
    if isinstance(attack, adaptive.NES):
        return (1 + attack.samples) * defense_row_steps
    if isinstance(attack, adaptive.Unrolled):
        return defense_row_steps + 3.0 * attack.unroll_steps
    if isinstance(attack, adaptive.BPDA):
        return attack.eot * defense_row_steps  # EOT: K copies of the example through the projection
    return defense_row_steps


@dataclass
class CostModel:
    row_step_seconds: dict[str, float]  # per dataset
    query_seconds: dict[str, float]  # per dataset
    spent: dict[str, float] = field(default_factory=dict)  # "attack kind/defense kind": queries ÷ budget
    factor: dict[str, float] = field(default_factory=dict)  # "dataset/attack kind": seconds ÷ priced row-steps
    source: str = "shipped defaults"

    def price(self, table: dict[str, float], dataset: str) -> float:
        if dataset in table:
            return table[dataset]
        return max(table.values())  # an unseen dataset: the dearest known (its generator may be larger)

    @classmethod
    def shipped(cls) -> "CostModel":
        raw = json.loads(DEFAULTS.read_text())
        return cls(
            raw["row_step_seconds"],
            raw["query_seconds"],
            raw["spent"],
            raw["factor"],
            f"shipped defaults ({DEFAULTS.name})",
        )

    def to_json(self) -> dict:
        return {
            "row_step_seconds": self.row_step_seconds,
            "query_seconds": self.query_seconds,
            "spent": self.spent,
            "factor": self.factor,
            "source": self.source,
        }


def fit(runs: list[tuple[EvalConfig, pd.DataFrame]], fallback: CostModel | None = None) -> CostModel:
    """A cost model from earlier runs' configs and rows (the datasets and pairs they lack: `fallback`'s)."""
    base = fallback or CostModel.shipped()
    sums: dict[str, defaultdict] = {k: defaultdict(float) for k in ("ss", "sn", "qs", "qn", "pq", "pb", "fs", "fn")}
    for cfg, rows in runs:
        ds, cpus = cfg.dataset, cfg.resources.num_cpus_per_worker
        kinds = {name: spec.kind for name, spec in cfg.defenses.items()}
        proj = rows[rows["defense"].map(kinds) != "none"]
        sums["ss"][ds] += proj["seconds"].sum() * cpus
        sums["sn"][ds] += proj["effective_iterations"].sum()
        for name, spec in cfg.attacks.items():
            mine = rows[rows["attack"] == name]
            if mine.empty or spec.kind in BLACK_BOXES:
                continue
            attack = spec.build(cfg.seed)
            if spec.kind not in WRAPPERS:
                once = mine.drop_duplicates("example_id")  # a fed attack's seconds repeat in every defense's row
                sums["qs"][ds] += once["attack_seconds"].sum() * cpus
                sums["qn"][ds] += once["queries"].sum()
                continue
            budget = max_queries(attack)
            for t, g in mine.groupby("defense"):
                if spec.target not in ("each", t):
                    continue  # rows fed from the attack on another target
                key = f"{spec.kind}/{kinds[t]}"
                sums["pq"][key] += g["queries"].sum()
                sums["pb"][key] += budget * len(g)
                steps = row_steps_per_query(attack, projection_row_steps(kinds[t], cfg.defenses[t].params))
                sums["fs"][(ds, spec.kind)] += g["attack_seconds"].sum() * cpus
                sums["fn"][(ds, spec.kind)] += g["queries"].sum() * steps
    row_step = dict(base.row_step_seconds) | {d: sums["ss"][d] / n for d, n in sums["sn"].items() if n > 0}
    query = dict(base.query_seconds) | {d: sums["qs"][d] / n for d, n in sums["qn"].items() if n > 0}
    spent = dict(base.spent) | {k: sums["pq"][k] / n for k, n in sums["pb"].items() if n > 0}
    # an end-to-end attack's seconds per query against its priced row-steps (its projections run in smaller
    # batches than clean rows, and it adds the classifier's own steps)
    factor = dict(base.factor) | {
        f"{ds}/{kind}": sums["fs"][(ds, kind)] / (n * row_step[ds]) for (ds, kind), n in sums["fn"].items() if n > 0
    }
    n_rows = sum(len(r) for _, r in runs)
    source = f"fitted from {len(runs)} earlier run(s), {n_rows:,} rows" if runs else base.source
    return CostModel(row_step, query, spent, factor, source)


@dataclass
class Cell:
    attack: str
    defense: str
    examples: int
    seconds: float  # core-seconds of the whole cell
    bound: bool = False  # an end-to-end attack priced at its whole budget (no earlier rows of that pair)


def plan(cfg: EvalConfig, n: int, model: CostModel) -> tuple[list[Cell], list[float], float]:
    """Every cell's predicted core-seconds, each shard's, and the driver's (substitute training)."""
    u, q = model.price(model.row_step_seconds, cfg.dataset), model.price(model.query_seconds, cfg.dataset)
    proj = {d: projection_row_steps(s.kind, s.params) * u for d, s in cfg.defenses.items()}
    kinds = {d: s.kind for d, s in cfg.defenses.items()}
    per_example: dict[tuple[str, str], float] = {("clean", d): proj[d] for d in cfg.defenses}
    bound: set[tuple[str, str]] = set()
    driver = 0.0
    for name, spec in cfg.attacks.items():
        attack = spec.build(cfg.seed)
        budget = max_queries(attack)
        targets = list(cfg.defenses) if spec.target == "each" else [spec.target]
        for t in targets:
            if spec.kind in WRAPPERS:
                key = f"{spec.kind}/{kinds[t]}"
                bound |= {(name, t)} if key not in model.spent else set()
                steps = row_steps_per_query(attack, projection_row_steps(kinds[t], cfg.defenses[t].params))
                factor = model.factor.get(f"{cfg.dataset}/{spec.kind}", 1.0)
                cost = model.spent.get(key, 1.0) * budget * steps * u * factor
            else:
                cost = budget * q
                if spec.kind in BLACK_BOXES:  # trained once on the driver: each oracle label is a projection
                    driver += attack.oracle_queries() * (proj.get(t, 0.0) + q)
            fed = [t] if spec.target == "each" else list(cfg.defenses)
            for d in fed:  # every fed row projects (the target's reuses the success check's projection: the same)
                per_example[(name, d)] = per_example.get((name, d), 0.0) + cost / len(fed) + proj[d]
    cells, shards = [], []
    for (a, d), cost in per_example.items():
        m = n if a == "clean" else len(attacked_positions(cfg.attacks[a].limit, n))
        cells.append(Cell(a, d, m, cost * m, (a, d) in bound))
    for start in range(0, n, cfg.shard_size):
        stop = min(start + cfg.shard_size, n)
        s = sum(proj.values()) * (stop - start)
        for (a, _), cost in per_example.items():
            if a != "clean":
                s += cost * len(examples_in_shard(cfg.attacks[a], start, stop, n))
        shards.append(s)
    return cells, shards, driver


def wall_seconds(shards: list[float], workers: int, cpus_per_worker: float, driver: float) -> float:
    """Shards in order, each to the first free worker (Ray Data's actor pool), plus start-up and the driver."""
    free = [0.0] * workers
    for s in shards:
        i = free.index(min(free))
        free[i] += s / cpus_per_worker
    return max(free) + START_SECONDS + driver


def earlier_runs(folders: list[Path]) -> list[tuple[EvalConfig, pd.DataFrame]]:
    """(config, rows) of every eval run folder among `folders` (or their subfolders) with rows."""
    runs = []
    for top in folders:
        for run in sorted({p.parent.parent for p in Path(top).glob("**/rows/shard-*.parquet")}):
            record = run / "config.json"
            try:
                cfg = EvalConfig.model_validate(json.loads(record.read_text())["config"])
                rows = pd.read_parquet(run / "rows")
            except Exception:  # noqa: BLE001 - another job's folder (RED, a search), or an older schema
                continue
            if {"seconds", "attack_seconds", "queries", "effective_iterations"} <= set(rows.columns):
                runs.append((cfg, rows))
    return runs


FUSED_ROWS = 8  # attacked examples per shard from which the fused batch keeps G at its full rate (1 thread)


def suggest_shard_size(cfg: EvalConfig, n: int, cells: list[Cell], workers: int) -> tuple[str, int] | None:
    """For the costliest end-to-end attack: (its name, a shard size giving each shard >= FUSED_ROWS of its
    examples in a number of shards that is a multiple of `workers`), when the config's shards hold fewer."""
    e2e = [c for c in cells if c.attack != "clean" and cfg.attacks[c.attack].kind in WRAPPERS]
    if not e2e:
        return None
    costs: dict[str, float] = defaultdict(float)
    for c in e2e:
        costs[c.attack] += c.seconds
    name = max(costs, key=lambda a: costs[a])
    if costs[name] < 0.5 * sum(c.seconds for c in cells):
        return None  # the cheap cells dominate: keep the shards small for balance
    m = len(attacked_positions(cfg.attacks[name].limit, n))
    per_shard = m * cfg.shard_size / n
    shards = workers * max(1, m // (FUSED_ROWS * workers))
    size = math.ceil(n / shards)
    return (name, size) if per_shard < FUSED_ROWS and size > cfg.shard_size else None


def precision_lines(cfg: EvalConfig, n: int, cells: list[Cell], rows: pd.DataFrame | None) -> list[str]:
    """With `precision:`: the examples each attack's widest cell needs for the target (at the accuracy of this
    config's earlier rows when there are some, else at 0.5, the widest case), capped at the split, and what
    adding them costs against the budget."""
    assert cfg.precision is not None
    h = cfg.precision.half_width
    widths = cell_widths(rows) if rows is not None and len(rows) else None
    lines = ["", f"Precision target ±{h} (95 % Wilson), budget {cfg.precision.budget_core_hours} core-hours:"]
    total = sum(c.seconds for c in cells)
    extra = 0.0
    for a in cfg.attacks:
        mine = [c for c in cells if c.attack == a]
        m = max(c.examples for c in mine)
        if widths is not None and a in set(widths["attack"]):
            w = widths[widths["attack"] == a]
            need = max(needed(int(k), int(k_n), h) for k, k_n in zip(w["k"], w["n"], strict=True))
            basis = "at the earlier rows' accuracy"
        else:
            need, basis = needed(1, 2, h), "at accuracy 0.5"
        need = min(max(need, m), n)
        cost = sum(c.seconds for c in mine) / m * (need - m)
        extra += cost
        lines.append(f"  {a}: {need} examples ({basis}; the config runs {m}): +{cost / 3600:.3f} core-hours")
    fits = "within" if total + extra <= cfg.precision.budget_core_hours * 3600 else "beyond"
    lines.append(f"  all cells at the target: {(total + extra) / 3600:.3f} core-hours, {fits} the budget")
    return lines


def report(cfg: EvalConfig, n: int, model: CostModel, rows: pd.DataFrame | None = None) -> str:
    """The plan as printed: core-seconds per cell (attacks x defenses), totals, wall time by workers."""
    cells, shards, driver = plan(cfg, n, model)
    res = cfg.resources
    by = {(c.attack, c.defense): c for c in cells}
    attacks_ = list(dict.fromkeys(c.attack for c in cells))
    lines = [
        f"Plan for {cfg.name}: {cfg.dataset}, {n} examples in {len(shards)} shards of {cfg.shard_size}",
        f"cost model: {model.source}",
        "",
        "Predicted core-seconds per cell (* an end-to-end attack priced at its whole budget: no earlier rows of it)",
        "| attack | n | " + " | ".join(cfg.defenses) + " | all |",
        "|---|---|" + "---|" * (len(cfg.defenses) + 1),
    ]
    for a in attacks_:
        row = [by.get((a, d)) for d in cfg.defenses]
        n_a = max(c.examples for c in row if c is not None)
        cols = ["" if c is None else _num(c.seconds) + ("*" if c.bound else "") for c in row]
        lines.append(f"| {a} | {n_a} | " + " | ".join(cols) + f" | {_num(sum(c.seconds for c in row if c))} |")
    total = sum(c.seconds for c in cells) + driver
    lines += [
        "",
        f"total: {total / 3600:.3f} core-hours"
        + (f" ({driver / 3600:.3f} of them on the driver, training substitutes)" if driver else ""),
    ]
    cpus = res.num_cpus_per_worker
    counts = sorted({res.num_workers, 1, 2, 4, 8})
    walls = ", ".join(f"{w}: {_duration(wall_seconds(shards, w, cpus, driver))}" for w in counts)
    lines.append(f"wall time by workers of {cpus:g} CPU (the config has {res.num_workers}): {walls}")
    largest = max(shards, default=0.0)
    if shards and largest > 0.25 * sum(shards) and len(shards) > 1:
        lines.append(f"the largest shard is {largest / sum(shards):.0%} of the work: more workers cannot beat it")
    if cfg.precision is not None:
        lines += precision_lines(cfg, n, cells, rows)
    hint = suggest_shard_size(cfg, n, cells, res.num_workers)
    if hint:
        per_shard = len(attacked_positions(cfg.attacks[hint[0]].limit, n)) * cfg.shard_size / n
        lines.append(
            f"{hint[0]} is most of the work and each shard holds ~{per_shard:.1f} of its examples, too few to fill "
            f"the fused batch (>= {FUSED_ROWS}): --set shard_size={hint[1]} batches them (the same predictions; "
            "a new run folder)"
        )
    return "\n".join(lines)


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def measured_core_seconds(cfg: EvalConfig, rows: pd.DataFrame) -> float:
    """A finished run's core-seconds from its rows, counted as `plan` counts them (a fed attack's seconds once)."""
    fed = [a for a, s in cfg.attacks.items() if s.target != "each"]  # one attack, its seconds in every fed row
    attack = rows[~rows["attack"].isin(fed)]["attack_seconds"].sum()
    attack += rows[rows["attack"].isin(fed)].drop_duplicates(["attack", "example_id"])["attack_seconds"].sum()
    return float(rows["seconds"].sum() + attack) * cfg.resources.num_cpus_per_worker


def main(config: Path, overrides: list[str], *, limit: int | None, plan_from: list[Path]) -> str:
    """`invgan eval --plan`: the config validated, its size read, the plan printed; nothing runs."""
    cfg = load_config(config, overrides, limit=limit)
    n = len(load_dataset(cfg.dataset, cfg.split, cfg.data_dir).subset(cfg.limit))
    runs = earlier_runs(plan_from or [runs_dir()])
    mine = [r for c, r in runs if c.config_hash() == cfg.config_hash()]  # this config's own earlier rows
    text = report(cfg, n, fit(runs), pd.concat(mine, ignore_index=True) if mine else None)
    print(text)
    return text
