"""Precision-targeted evaluation (`precision:` in an eval config): add examples until every cell is narrow enough.

After the configured shards, each *round* raises the `limit` of every attack that has an accuracy cell (attack x
defense) whose 95 % Wilson interval is wider than `precision.half_width`, to the number of examples that cell
needs at its current accuracy. Attack limits are nested in the spread order (`attacked_positions`), so a round
computes only the examples the last limit did not have, spread over the split like the first ones, into the
shards' positions that hold them: `<run>/rounds/round-NN/rows/shard-*.parquet`, with the limits it used in
`round.json`. Rounds stop when every cell is narrow enough, when an attack runs on the whole split, after
`max_rounds`, or when the next round would pass `budget_core_hours` (what the rows' seconds add up to; a round
that does not fit adds as many examples as fit). A rerun resumes an unfinished round and, with a larger budget
or a narrower target, continues with new rounds: `precision` is not part of the config hash.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from invgan_core.files import atomic_write_json
from jobs.config import EvalConfig, attacked_positions, examples_in_shard
from jobs.plan import measured_core_seconds
from jobs.run_folder import missing_shards, plan_shards
from jobs.sharded import MoreShards
from jobs.stats import cell_widths, needed

ROUNDS = "rounds"


@dataclass
class Round:
    name: str  # round-NN: its folder under <run>/rounds
    limits: dict[str, int]  # attack -> its examples after this round
    before: dict[str, int]  # attack -> its examples before it (the round computes the difference)
    shards: list[tuple[int, int, int]]  # the base plan's shards that hold any of the new examples

    def folder(self, run_dir: Path) -> Path:
        return run_dir / ROUNDS / self.name


def attacked(cfg: EvalConfig, n: int) -> dict[str, int]:
    """Examples each attack runs on under the config's limits."""
    return {a: len(attacked_positions(s.limit, n)) for a, s in cfg.attacks.items()}


def recorded_rounds(run_dir: Path) -> list[Round]:
    rounds = []
    for record in sorted((run_dir / ROUNDS).glob("round-*/round.json")):
        raw = json.loads(record.read_text())
        rounds.append(Round(raw["name"], raw["limits"], raw["before"], [tuple(s) for s in raw["shards"]]))
    return rounds


def next_round(cfg: EvalConfig, n: int, rows: pd.DataFrame, run_dir: Path) -> Round | None:
    """The round to run now: an unfinished recorded one (a resume), else a new one decided from the rows, else None
    (every cell narrow enough, the split used up, the rounds or the budget spent: `status` says which)."""
    assert cfg.precision is not None
    done = recorded_rounds(run_dir)
    for r in done:
        if missing_shards(r.folder(run_dir), r.shards):
            return r
    if len(done) >= cfg.precision.max_rounds:
        return None
    current = done[-1].limits if done else attacked(cfg, n)
    want = wanted_limits(cfg, n, rows, current)
    if not want:
        return None
    spent, budget = measured_core_seconds(cfg, rows), cfg.precision.budget_core_hours * 3600
    cost = per_example_seconds(cfg, rows)
    extra = {a: (want[a] - current[a]) * cost.get(a, 0.0) for a in want}
    if spent + sum(extra.values()) > budget:  # add what fits, each attack in proportion
        fit = max(0.0, budget - spent) / max(sum(extra.values()), 1e-12)
        want = {a: current[a] + int((want[a] - current[a]) * fit) for a in want}
        want = {a: m for a, m in want.items() if m > current[a]}
        if not want:
            return None
    limits = current | want
    shards = [
        s for s in plan_shards(n, cfg.shard_size) if any(new_positions(cfg, a, current, limits, s, n) for a in want)
    ]
    r = Round(f"round-{len(done) + 1:02d}", limits, current, shards)
    atomic_write_json(r.folder(run_dir) / "round.json", r.__dict__ | {"shards": [list(s) for s in shards]})
    return r


def wanted_limits(cfg: EvalConfig, n: int, rows: pd.DataFrame, current: dict[str, int]) -> dict[str, int]:
    """attack -> the examples its widest cell needs, for the attacks that need more than they have (capped at n)."""
    assert cfg.precision is not None
    want: dict[str, int] = {}
    widths = cell_widths(rows)
    for attack, cells in widths.groupby("attack"):
        if attack not in cfg.attacks or current[attack] >= n:
            continue
        wide = cells[cells["half_width"] > cfg.precision.half_width]
        if wide.empty:
            continue
        need = max(needed(int(k), int(m), cfg.precision.half_width) for k, m in zip(wide["k"], wide["n"], strict=True))
        want[attack] = min(n, max(need, current[attack] + 1))
    return want


def per_example_seconds(cfg: EvalConfig, rows: pd.DataFrame) -> dict[str, float]:
    """attack -> core-seconds one more example of it costs (its rows' seconds over its examples so far)."""
    out = {}
    for attack, g in rows[rows["attack"] != "clean"].groupby("attack"):
        if attack in cfg.attacks:
            out[attack] = measured_core_seconds(cfg, g) / max(g["example_id"].nunique(), 1)
    return out


def new_positions(cfg: EvalConfig, attack: str, before: dict[str, int], after: dict[str, int], shard, n: int) -> list:
    """Offsets in `shard` of the examples `attack` gains from limit before[attack] to after[attack]."""
    _, start, stop = shard
    spec = cfg.attacks[attack]
    old = set(examples_in_shard(spec.model_copy(update={"limit": before[attack]}), start, stop, n))
    return [
        p for p in examples_in_shard(spec.model_copy(update={"limit": after[attack]}), start, stop, n) if p not in old
    ]


def status(cfg: EvalConfig, n: int, rows: pd.DataFrame, run_dir: Path) -> dict:
    """The summary's `precision` entry: the target, what was spent, the rounds and every cell's n and width."""
    assert cfg.precision is not None
    target = cfg.precision.half_width
    widths = cell_widths(rows)
    rounds = recorded_rounds(run_dir)
    spent = measured_core_seconds(cfg, rows) / 3600
    narrow = bool((widths["half_width"] <= target).all())
    current = rounds[-1].limits if rounds else attacked(cfg, n)
    if narrow:
        stopped = "every cell reached the target"
    elif all(current.get(a, n) >= n for a in widths["attack"].unique()):
        stopped = "the split is used up"
    elif len(rounds) >= cfg.precision.max_rounds:
        stopped = f"max_rounds ({cfg.precision.max_rounds}) done"
    else:
        stopped = "the budget is spent"
    return {
        "half_width": target,
        "budget_core_hours": cfg.precision.budget_core_hours,
        "spent_core_hours": round(spent, 4),
        "stopped": stopped,
        "rounds": [{"name": r.name, "limits": r.limits} for r in rounds],
        "cells": {
            f"{a}/{d}": {"n": int(m), "half_width": round(float(h), 4), "reached": bool(h <= target)}
            for a, d, m, h in zip(widths["attack"], widths["defense"], widths["n"], widths["half_width"], strict=True)
        },
    }


def status_text(p: dict) -> str:
    """The lines `invgan eval` prints after its tables."""
    cells = p["cells"]
    missed = [f"{c} (n={v['n']}, ±{v['half_width']:.3f})" for c, v in cells.items() if not v["reached"]]
    head = (
        f"Precision target ±{p['half_width']}: {len(cells) - len(missed)} of {len(cells)} cells reached it after "
        f"{len(p['rounds'])} round(s) of added examples; {p['spent_core_hours']:.3f} of "
        f"{p['budget_core_hours']} core-hours spent; stopped: {p['stopped']}"
    )
    return head + ("\n  wider: " + ", ".join(missed) if missed else "")


def more_shards(cfg: EvalConfig, n: int, run_dir: Path, rows: pd.DataFrame):
    """The runner's hook (`ShardedJob.more`): the next round as shards for EvalWorkers of the round's limits, or
    None when the rounds are over."""
    r = next_round(cfg, n, rows, run_dir)
    if r is None:
        return None
    round_cfg = cfg.model_copy(deep=True)
    for a, m in r.limits.items():
        round_cfg.attacks[a].limit = m
    return MoreShards(
        folder=r.folder(run_dir),
        shards=r.shards,
        worker_kwargs={"config": round_cfg.model_dump(mode="json"), "after": r.before},
        expected=lambda a, b: expected_round_rows(cfg, r.before, r.limits, (0, a, b), n),
        label=f"{r.name}: " + ", ".join(f"{a} {r.before[a]}→{m}" for a, m in r.limits.items() if m > r.before[a]),
    )


def expected_round_rows(cfg: EvalConfig, before: dict[str, int], after: dict[str, int], shard, n: int) -> int:
    """Rows a precision round's shard holds: the attacks' added examples in it x defenses."""
    return len(cfg.defenses) * sum(len(new_positions(cfg, a, before, after, shard, n)) for a in before)
