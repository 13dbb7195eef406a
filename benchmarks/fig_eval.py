"""Figures of the evaluation job (issue #9): BPDA warm start, Ray overhead, 2 workers, worker memory.

Every figure is a ratio measured in this process (the machine is shared: absolute seconds drift), the
two cases interleaved where they repeat.

- bpda_warm_vs_cold: BPDA end to end through Defense-GAN (R x L = 10 x 200, the default config's BPDA:
  10 ℓ∞ PGD steps of 0.05 at ε = 0.3), seconds per example with the attacker's projections warm-started
  (`BPDA(warm_start=True)`: step k starts from step k-1's latent, `WARM_STEPS` steps) ÷ cold (every step
  R x L). Both accuracies are in the details; the success check is the real, cold defense in both.
- eval_ray_vs_inprocess: `evaluate` (Ray Data, 1 worker, a Ray instance already up) ÷ the same rows
  computed in this process by `EvalWorker(...).run_shard` (model loading included in both); full mode on
  the default config's cells (6 examples), quick mode on the smoke config.
- two_vs_one_worker: wall time of `evaluate` with 2 workers ÷ 1 worker on 2 cores, default config with
  a smaller `limit` (its attack limits scaled with it).
- worker_rss_10x: peak RSS of a process running EvalWorker over 10x the examples ÷ over 1x.
"""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
WARM_STEPS = 20  # the attacker's warm projection: steps from the previous latent, one restart
KEY = ["example_id", "attack", "defense"]


@functools.cache
def _models() -> dict:
    from invgan_core.checkpoint import load_model

    return {
        k: load_model(ROOT / "weights" / "mnist5k" / k, kind=k)[0].requires_grad_(False)
        for k in ("generator", "classifier")
    }


def _spread_test_set(n: int):
    """n mnist5k test images spread over the split (it is sorted by class: the first n are one digit)."""
    from invgan_core.data import load_dataset
    from jobs.config import attacked_positions

    data = load_dataset("mnist5k", "test")
    at = list(attacked_positions(n, len(data)))
    return data.images[at], data.labels[at], torch.as_tensor(data.ids[at])


def bpda_warm_vs_cold(quick: bool) -> dict:
    from invgan_core.adaptive import BPDA
    from invgan_core.attacks import LinfPGD
    from invgan_core.defenses import DefenseGAN

    n, chunk = (4, 2) if quick else (60, 10)
    restarts, steps = (2, 40) if quick else (10, 200)
    m = _models()
    defense = DefenseGAN(m["generator"], m["classifier"], restarts=restarts, steps=steps)
    x, y, ids = _spread_test_set(n)
    pgd = {"eps": 0.3, "steps": 10, "abs_stepsize": 0.05}  # configs/default.yaml's bpda
    attacks = {
        "cold": BPDA(attack=LinfPGD(**pgd)),
        "warm": BPDA(warm_start=True, warm_steps=WARM_STEPS, attack=LinfPGD(**pgd)),
    }
    seconds = {"cold": 0.0, "warm": 0.0}
    success = {"cold": [], "warm": []}
    chunk_ratios = []
    with _threads(1):  # as an eval worker of 1 CPU runs it (and 2 threads on a loaded 2-core machine stall)
        for k, a in enumerate(range(0, n, chunk)):
            _bpda_chunk(k, slice(a, a + chunk), attacks, defense, x, y, ids, seconds, success, chunk_ratios)
    acc = {case: 1 - torch.cat(s).float().mean().item() for case, s in success.items()}
    differ = int((torch.cat(success["cold"]) != torch.cat(success["warm"])).sum())
    ratio = seconds["warm"] / seconds["cold"]
    return {
        "name": "bpda_warm_vs_cold",
        "value": ratio,
        "target": "≤ 0.2",
        "met": bool(ratio <= 0.2 and abs(acc["warm"] - acc["cold"]) <= 0.01),
        "unit": "×",
        "details": {
            "examples": n,
            "defense": f"defensegan {restarts} x {steps}",
            "bpda": pgd,
            "warm_steps": WARM_STEPS,
            "accuracy_cold": acc["cold"],
            "accuracy_warm": acc["warm"],
            "examples_differing": differ,
            "seconds_per_example_cold": seconds["cold"] / n,
            "seconds_per_example_warm": seconds["warm"] / n,
            "chunk_ratios": chunk_ratios,
            "median_chunk_ratio": statistics.median(chunk_ratios),
        },
    }


def _bpda_chunk(k, sl, attacks, defense, x, y, ids, seconds, success, chunk_ratios) -> None:
    took = {}
    for case in ("cold", "warm") if k % 2 == 0 else ("warm", "cold"):  # interleaved, order alternating
        t = time.perf_counter()
        result = attacks[case](defense, x[sl], y[sl], ids=ids[sl])
        took[case] = time.perf_counter() - t
        success[case].append(result.success)
        seconds[case] += took[case]
    chunk_ratios.append(took["warm"] / took["cold"])


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- the job through Ray


@contextlib.contextmanager
def _ray(num_cpus: int = 3):
    """A local Ray instance for the figure (2 actors + 1 CPU for Ray Data), or the one already up."""
    import ray

    from jobs.ray_session import quiet_ray_logging

    quiet_ray_logging(False)
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _config(name: str, overrides: list[str], workers: int = 1):
    from jobs.config import load_config

    return load_config(ROOT / "configs" / name, overrides, resources={"num_workers": workers, "num_cpus_per_worker": 1})


def _in_process(cfg):
    """The rows of `cfg` computed here, shard after shard, by one EvalWorker (as a Ray actor would)."""
    import pandas as pd

    from jobs.evaluate import EvalWorker
    from jobs.run_folder import plan_shards

    threads = torch.get_num_threads()
    try:
        worker = EvalWorker(cfg.model_dump(mode="json"))
        return pd.concat(
            [worker.run_shard(*s) for s in plan_shards(len(worker.data), cfg.shard_size)], ignore_index=True
        )
    finally:
        torch.set_num_threads(threads)  # the worker sets its own thread count


def _through_ray(cfg, out: Path):
    from jobs.evaluate import evaluate
    from jobs.sharded import JobOptions

    return evaluate(cfg, JobOptions(out=out, progress=False, log_mlflow=False)).rows


def _same_rows(a, b) -> bool:
    a, b = a.sort_values(KEY).reset_index(drop=True), b.sort_values(KEY).reset_index(drop=True)
    return len(a) == len(b) and (a[KEY + ["prediction"]] == b[KEY + ["prediction"]]).all().all()


def eval_ray_vs_inprocess(quick: bool) -> dict:
    if quick:  # the smoke config: Ray's fixed start-up (actor, imports, models) dominates its ~1 s of work
        name, overrides, repeats = "smoke.yaml", ["limit=16", "shard_size=16"], 1
    else:  # the default config on 6 examples (attack limits scaled alike): minutes of work, one shard
        name, overrides, repeats = (
            "default.yaml",
            ["limit=6", "shard_size=6", "attacks.cw.limit=3", "attacks.bpda.limit=1"],
            2,
        )
    cfg = _config(name, overrides)
    ray_s, local_s, same = [], [], True
    with _ray(), tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            rows = {}
            for case in ("local", "ray") if r % 2 == 0 else ("ray", "local"):  # interleaved, order alternating
                t = time.perf_counter()
                rows[case] = _in_process(cfg) if case == "local" else _through_ray(cfg, Path(tmp) / f"run{r}")
                (local_s if case == "local" else ray_s).append(time.perf_counter() - t)
            same &= _same_rows(rows["local"], rows["ray"])  # a fresh run folder each time: nothing reused
    ratio = statistics.median(ray_s) / statistics.median(local_s)
    return {
        "name": "eval_ray_vs_inprocess",
        "value": ratio,
        "target": "≤ 1.15",
        "met": ratio <= 1.15,
        "unit": "×",
        "details": {
            "config": f"configs/{name}",
            "overrides": overrides,
            "seconds_ray": ray_s,
            "seconds_in_process": local_s,
            "same_predictions": bool(same),
        },
    }


def two_vs_one_worker(quick: bool) -> dict:
    if quick:  # the smoke config: the figure is produced, not meaningful
        name, overrides = "smoke.yaml", ["limit=8", "shard_size=2"]
    else:  # the default config at a fifth of its examples, attack limits scaled alike, 6 shards
        name, overrides = "default.yaml", ["limit=12", "shard_size=2", "attacks.cw.limit=6", "attacks.bpda.limit=2"]
    from jobs.plan import measured_core_seconds, wall_seconds

    wall: dict[int, list[float]] = {1: [], 2: []}
    order = (1, 2) if quick else (1, 2, 2, 1)  # interleaved: load that drifts weighs on both alike
    shard_seconds: dict[int, list[list[float]]] = {1: [], 2: []}
    with _ray(), tempfile.TemporaryDirectory() as tmp:
        for k, workers in enumerate(order):
            cfg = _config(name, overrides, workers)
            t = time.perf_counter()
            rows = _through_ray(cfg, Path(tmp) / f"run{k}")
            wall[workers].append(time.perf_counter() - t)
            shard_seconds[workers].append(
                [measured_core_seconds(cfg, g) for _, g in sorted(rows.groupby("shard"), key=lambda kv: kv[0])]
            )
    ratio = statistics.median(wall[2]) / statistics.median(wall[1])
    # Where the rest goes: the shards' own seconds (from the rows), their schedule on 2 workers (in order, each to
    # the first free one), and the fixed part (Ray actors, model loading, the driver's summary) = wall - work
    work = [statistics.median(s) for s in zip(*shard_seconds[1], strict=True)]
    fixed = statistics.median(wall[1]) - sum(work)
    makespan2 = wall_seconds(work, 2, 1, 0) - wall_seconds([], 1, 1, 0)
    cause = {
        "shard_seconds": [round(w, 1) for w in work],
        "fixed_seconds": round(fixed, 1),
        "makespan_2_workers": round(makespan2, 1),
        "ratio_if_fixed_and_schedule_explain_it": round((fixed + makespan2) / (fixed + sum(work)), 3),
        "ratio_with_no_fixed_part": round(makespan2 / sum(work), 3),
        # the shards' own seconds when two run at once ÷ alone: what sharing the machine costs each shard
        "shard_slowdown_2_workers": round(
            statistics.median(sum(s) for s in shard_seconds[2]) / statistics.median(sum(s) for s in shard_seconds[1]),
            3,
        ),
    }
    return {
        "name": "two_vs_one_worker",
        "value": ratio,
        "target": "≤ 0.6",
        "met": ratio <= 0.6,
        "unit": "×",
        "details": {
            "config": f"configs/{name}",
            "overrides": overrides,
            "seconds_1_worker": wall[1],
            "seconds_2_workers": wall[2],
            "cause": cause,
        },
    }


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, {root!r})
    from jobs.config import load_config
    from jobs.evaluate import EvalWorker
    from jobs.run_folder import plan_shards
    cfg = load_config({config!r}, {overrides!r})
    worker = EvalWorker(cfg.model_dump(mode="json"))
    rows = sum(len(worker.run_shard(*s)) for s in plan_shards(len(worker.data), cfg.shard_size))
    print(json.dumps({{"rows": rows, "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
""")


def _peak_rss(config: Path, overrides: list[str]) -> dict:
    script = _RSS_SCRIPT.format(root=str(ROOT), config=str(config), overrides=overrides)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=900, cwd=ROOT, check=False
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def worker_rss_10x(quick: bool) -> dict:
    base = 4 if quick else 16
    config = ROOT / "configs" / "smoke.yaml"
    one = _peak_rss(config, [f"limit={base}", "shard_size=4"])
    ten = _peak_rss(config, [f"limit={10 * base}", "shard_size=4"])
    ratio = ten["max_rss_kib"] / one["max_rss_kib"]
    return {
        "name": "worker_rss_10x",
        "value": ratio,
        "target": "≤ 1.2",
        "met": ratio <= 1.2,
        "unit": "×",
        "details": {
            "config": "configs/smoke.yaml",
            "examples": [base, 10 * base],
            "rows": [one["rows"], ten["rows"]],
            "peak_rss_mib": [one["max_rss_kib"] / 1024, ten["max_rss_kib"] / 1024],
        },
    }


FIGURES = [bpda_warm_vs_cold, eval_ray_vs_inprocess, two_vs_one_worker, worker_rss_10x]
