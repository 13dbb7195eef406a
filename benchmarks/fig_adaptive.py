"""The adaptive cells' cost (issue #23): BPDA to many steps, both losses, end to end through Defense-GAN 10 x 200,
InvGAN T = 1000 and InvGAN T = 200 (configs/repro/table2_mnist_bpda500.yaml with a margin-loss twin of its
attack), core-seconds per attacked example, in one process on one thread (an eval worker of 1 CPU):

- today: the code before #23 on the repro config's layout: every attacked example in its own shard (its 20
  attacked examples are spread over 200, one per shard of 10), the attacks and defenses one after the other,
  each projection its own batch, G stepped on exactly the rows it is given (`inversion.CPU_BLOCK = 1`, no
  pieces);
- fused: all examples in one shard (`invgan eval --plan`'s shard-size hint), every projection step of every
  attack and defense as one batch through G (`resources.fused`), padded to a multiple of 8 rows in pieces
  of at most 64 (today's defaults).

The figure is fused ÷ today. The details count the rows whose prediction or fooling step (queries) differ
from today's: today's unpadded small batches differ from padded ones in the last bits, and a long InvGAN
projection of an adversarial input amplifies that (fused rows equal unfused ones bit for bit:
tests/jobs/test_evaluate.py). Full mode: the official MNIST test set when ../shared/data/mnist holds it
(else mnist5k's test split), 6 examples, 100 attack steps (500 would take hours per case; the per-step cost
is what changes). Quick mode: the digits models, 3 examples, 3 steps.
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks.fig_eval import _threads

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "data" / "mnist"
COLUMNS = ["example_id", "attack", "defense", "prediction", "queries"]


def _config(quick: bool, n: int, shard_size: int, fused: bool):
    from jobs.config import EvalConfig

    steps = 3 if quick else 100
    pgd = {"kind": "pgd_linf", "params": {"eps": 0.3, "steps": steps, "abs_stepsize": 0.01, "loss": "ce"}}
    margin = {**pgd, "params": {**pgd["params"], "loss": "margin"}}
    if quick:
        data = {"dataset": "digits", "weights": "weights/digits"}
        dg, t_long, t_short = {"restarts": 2, "steps": 20}, {"steps": 50}, {"steps": 10}
    else:
        data = {"dataset": "mnist", "data_dir": str(MNIST)} if MNIST.exists() else {"dataset": "mnist5k"}
        data["weights"] = "weights/mnist5k"
        dg, t_long, t_short = {"restarts": 10, "steps": 200}, {"steps": 1000}, {"steps": 200}
    return EvalConfig.model_validate(
        {
            "name": "bench-adaptive",
            **data,
            "limit": n,
            "shard_size": shard_size,
            "defenses": {
                "defensegan": {"kind": "defensegan", "params": dg},
                "invgan": {"kind": "invgan", "params": t_long},
                "invgan_t200": {"kind": "invgan", "params": t_short},
            },
            "attacks": {
                "bpda_ce": {"kind": "bpda", "target": "each", "base": pgd},
                "bpda_margin": {"kind": "bpda", "target": "each", "base": margin},
            },
            "resources": {"num_workers": 1, "num_cpus_per_worker": 1, "fused": fused},
        }
    )


def _run(cfg) -> tuple[float, object]:
    """Wall seconds of every shard of `cfg` run in this process by one EvalWorker, and the rows."""
    import pandas as pd

    from jobs.evaluate import EvalWorker

    worker = EvalWorker(cfg.model_dump(mode="json"))
    n = len(worker.data)
    started = time.perf_counter()
    rows = [worker.run_shard(k, a, min(a + cfg.shard_size, n)) for k, a in enumerate(range(0, n, cfg.shard_size))]
    return time.perf_counter() - started, pd.concat(rows, ignore_index=True)


def bpda_core_seconds_fused_vs_today(quick: bool) -> dict:
    from invgan_core import inversion

    n = 3 if quick else 6
    cases = {"today": (1, False, 1, 10**9), "fused": (n, True, inversion.CPU_BLOCK, inversion.CPU_ROWS)}
    seconds, rows = {}, {}
    with _threads(1):
        for case, (shard_size, fused, block, pieces) in cases.items():
            kept = inversion.CPU_BLOCK, inversion.CPU_ROWS
            inversion.CPU_BLOCK, inversion.CPU_ROWS = block, pieces
            try:
                seconds[case], rows[case] = _run(_config(quick, n, shard_size, fused))
            finally:
                inversion.CPU_BLOCK, inversion.CPU_ROWS = kept
    key = ["example_id", "attack", "defense"]
    base = rows["today"].sort_values(key)[COLUMNS].reset_index(drop=True)
    differ = {}  # rows whose prediction or fooling step differs from today's (a long InvGAN projection of an
    # adversarial input is chaotic under any change of batch: see tests/jobs/test_evaluate.py)
    for case in ("fused",):
        other = rows[case].sort_values(key)[COLUMNS].reset_index(drop=True)
        differ[case] = int((base != other).any(axis=1).sum())
    attacked = rows["today"][rows["today"]["attack"] != "clean"]
    return {
        "name": "bpda_core_seconds_fused_vs_today",
        "value": seconds["fused"] / seconds["today"],
        "target": "≤ 0.333",
        "met": seconds["fused"] / seconds["today"] <= 1 / 3,
        "unit": "ratio",
        "details": {
            "examples": n,
            "rows_differing_from_today": differ,
            "rows": len(base),
            "dataset": rows["today"].attrs.get("dataset", _config(quick, n, 1, True).dataset),
            "seconds": {k: round(v, 1) for k, v in seconds.items()},
            "core_seconds_per_example": {k: round(v / n, 1) for k, v in seconds.items()},
            "accuracy": {
                case: {
                    f"{a}/{d}": round(float(g["correct"].mean()), 3)
                    for (a, d), g in r[r["attack"] != "clean"].groupby(["attack", "defense"])
                }
                for case, r in rows.items()
            },
            "mean_queries": round(float(attacked["queries"].mean()), 1),
        },
    }


def plan_predicted_vs_measured(quick: bool) -> dict:
    """`invgan eval --plan`'s core-seconds (shipped defaults, jobs/cost_defaults.json) ÷ the rows' own, for a
    config run here in one process: the default config at half its examples (attack limits halved alike;
    quick: the smoke config). Target: within 0.8-1.25."""
    from jobs.config import load_config
    from jobs.plan import CostModel, measured_core_seconds, plan

    if quick:
        cfg = load_config(ROOT / "configs" / "smoke.yaml", ["limit=8", "shard_size=4"])
    else:
        cfg = load_config(
            ROOT / "configs" / "default.yaml", ["limit=30", "attacks.cw.limit=15", "attacks.bpda.limit=5"]
        )
    cells, _, driver = plan(cfg, cfg.limit or 0, CostModel.shipped())
    predicted = sum(c.seconds for c in cells) + driver
    with _threads(1):
        _, rows = _run(cfg)
    measured = measured_core_seconds(cfg, rows)
    ratio = predicted / measured
    return {
        "name": "plan_predicted_vs_measured",
        "value": ratio,
        "target": "≤ 1.25 and ≥ 0.8",
        "met": 0.8 <= ratio <= 1.25,
        "unit": "ratio",
        "details": {"config": cfg.name, "limit": cfg.limit, "predicted_core_s": predicted, "measured_core_s": measured},
    }


FIGURES = [bpda_core_seconds_fused_vs_today, plan_predicted_vs_measured]
