"""Throughput of `project` on the shipped mnist5k generator: batched vs one example at a time.

    .venv/bin/python benchmarks/bench_project.py [--steps 20] [--threads 2] [--out benchmarks/results/project.json]

Reports example-iterations per second (examples x restarts x steps / wall seconds) for
1. restarts = 1 at batch 1, 64, 256, 1024;
2. Defense-GAN's 10 restarts: all examples x restarts in one batch, against the way the reference
   implementations run it (a Python loop over examples, each example's restarts batched).
Everything is measured in one run, so the ratios are meaningful on a shared, noisy machine; absolute
numbers are not.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from invgan_core.checkpoint import load_model
from invgan_core.data import load_dataset
from invgan_core.inversion import project

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeat: int = 2) -> float:
    """Best of `repeat` wall times (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="gradient steps per projection (rate is per step)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--loop-examples", type=int, default=16, help="examples in the one-at-a-time runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "project.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    G, _ = load_model(ROOT / "weights" / "mnist5k" / "generator", kind="generator")
    x_all = load_dataset("mnist5k", "test").images
    x_all = torch.cat([x_all, x_all])[:1024]
    ids = torch.arange(len(x_all))
    S = args.steps
    rows = []

    for batch in (1, 64, 256, 1024):
        t = timed(lambda b=batch: project(G, x_all[:b], ids=ids[:b], steps=S))
        rows.append({"case": "restarts=1", "batch": batch, "seconds": t, "example_iters_per_s": batch * S / t})
        print(rows[-1])

    n, R = args.loop_examples, 10
    t_loop = timed(
        lambda: [project(G, x_all[i : i + 1], ids=ids[i : i + 1], steps=S, restarts=R) for i in range(n)], repeat=1
    )
    t_batch = timed(lambda: project(G, x_all[:n], ids=ids[:n], steps=S, restarts=R), repeat=1)
    t_one_by_one = timed(
        lambda: [project(G, x_all[i : i + 1], ids=ids[i : i + 1], steps=S) for i in range(n) for _ in range(R)],
        repeat=1,
    )
    for case, t in (
        ("defensegan loop over examples (restarts batched)", t_loop),
        ("defensegan loop over examples and restarts", t_one_by_one),
        ("defensegan examples x restarts batched", t_batch),
    ):
        rows.append({"case": case, "batch": n * R, "seconds": t, "example_iters_per_s": n * R * S / t})
        print(rows[-1])
    summary = {
        "speedup_batch1024_vs_batch1": rows[3]["example_iters_per_s"] / rows[0]["example_iters_per_s"],
        "speedup_defensegan_batched_vs_example_loop": t_loop / t_batch,
        "speedup_defensegan_batched_vs_full_loop": t_one_by_one / t_batch,
    }
    print(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "rows": rows,
                "summary": summary,
                "steps": S,
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.machine(),
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
