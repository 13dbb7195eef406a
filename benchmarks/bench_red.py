"""Seconds per example of RED's Algorithm 1 (500 steps) on the shipped mnist5k generator, batched vs one at a time.

    .venv/bin/python benchmarks/bench_red.py [--threads 2] [--per-class 20]

The dictionary uses the paper's three MNIST attacks on `per_class` training images per class (the
paper: 200; the cost per step grows with the dictionary's k = 10 x 3 x per_class columns). Reports
seconds per example at batch 1, 16 and 64 (plus the Defense-GAN 10 x 100 start), measured in one run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from invgan_core.checkpoint import load_model
from invgan_core.data import load_dataset
from invgan_core.red import PAPER_MNIST_ATTACKS, build_attack_dictionary, initial_latents, red_solve

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "red.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    G, _ = load_model(ROOT / "weights" / "mnist5k" / "generator", kind="generator")
    f, _ = load_model(ROOT / "weights" / "mnist5k" / "classifier", kind="classifier")
    f.requires_grad_(False)
    train, test = load_dataset("mnist5k", "train"), load_dataset("mnist5k", "test")
    t = time.perf_counter()
    dic = build_attack_dictionary(
        f, train.images, train.labels, {k: v() for k, v in PAPER_MNIST_ATTACKS.items()}, args.per_class, ids=train.ids
    )
    rows = [{"case": "dictionary", "columns": dic.D.shape[1], "seconds": time.perf_counter() - t}]
    x, ids = test.images[:64], torch.as_tensor(test.ids[:64])
    t = time.perf_counter()
    z0 = initial_latents(G, x, ids)
    rows.append({"case": "defensegan start 10x100", "batch": 64, "seconds_per_example": (time.perf_counter() - t) / 64})
    for batch in (1, 16, 64):
        n = 4 if batch == 1 else batch
        t = time.perf_counter()
        for lo in range(0, n, batch):
            red_solve(G, x[lo : lo + batch], D=dic, z0=z0[lo : lo + batch], steps=args.steps)
        rows.append(
            {
                "case": f"algorithm 1, {args.steps} steps",
                "batch": batch,
                "seconds_per_example": (time.perf_counter() - t) / n,
            }
        )
        print(rows[-1])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "threads": args.threads, "per_class": args.per_class}, indent=2))
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
