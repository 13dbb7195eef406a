"""One ready script for a machine with a GPU: every defense kind and every attack kind on DEVICE, checked against
the CPU, and the projection's throughput on both.

    .venv/bin/python -m benchmarks.gpu_check                       # --device cuda, writes benchmarks/gpu_check.json
    .venv/bin/python -m benchmarks.gpu_check --device cpu --quick  # the same path on the CPU (the quick suite runs it)

Each attack runs against its target (the classifier, or a defense for the end-to-end attacks) on DEVICE and on
the CPU, from the same per-example randomness; each defense then classifies the attacked images on both. The
check is the agreement of those predictions (1.0 on the same device; on a GPU, float rounding may flip an
example at a decision boundary, so the script reports the fraction and fails below `--min-agreement`). The
throughput is images per second of a Defense-GAN projection (R x L through G in one batch) on each device, and
their ratio. The JSON goes beside benchmarks/README.md, which records the runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from invgan_core.checkpoint import load_model
from invgan_core.data import load_dataset
from invgan_core.inversion import project
from jobs.common import WEIGHTS_DIR
from jobs.models import build_defense
from jobs.specs import AttackSpec, DefenseSpec

HERE = Path(__file__).resolve().parent
# Every defense kind and every attack kind of the registries, at budgets small enough for seconds on a CPU.
DEFENSES = {
    "none": {"kind": "none"},
    "defensegan": {"kind": "defensegan", "params": {"restarts": 2, "steps": 20}},
    "invgan": {"kind": "invgan", "params": {"steps": 10}},
    "clipped": {"kind": "clipped", "params": {"steps": 20}},  # on the uniform-prior generator
}
PGD = {"kind": "pgd_linf", "params": {"eps": 0.3, "steps": 5, "abs_stepsize": 0.1}}
ATTACKS = {  # name: (spec, target)
    "fgsm": ({"kind": "fgsm", "params": {"eps": 0.3}}, "classifier"),
    "pgd_linf": (PGD, "classifier"),
    "pgd_l2": ({"kind": "pgd_l2", "params": {"eps": 2.0, "steps": 5}}, "classifier"),
    "pgd_l1": ({"kind": "pgd_l1", "params": {"eps": 10.0, "steps": 5}}, "classifier"),
    "cw": ({"kind": "cw", "params": {"steps": 10, "binary_search_steps": 2}}, "classifier"),
    "sign_cw": ({"kind": "sign_cw", "params": {"steps": 10, "binary_search_steps": 2}}, "classifier"),
    "bpda": ({"kind": "bpda", "base": PGD}, "invgan"),
    "rp": ({"kind": "rp", "base": PGD}, "invgan"),
    "unrolled": ({"kind": "unrolled", "params": {"unroll_steps": 3}, "base": PGD}, "invgan"),
    "nes": ({"kind": "nes", "params": {"samples": 8}, "base": PGD}, "invgan"),
    "substitute": ({"kind": "substitute", "params": {"seeds": 20, "rounds": 2, "epochs": 2}}, "classifier"),
}


def _models(device: torch.device, weights: Path) -> dict:
    out = {}
    for kind, stem in (("generator", "generator"), ("classifier", "classifier"), ("inverter", "inverter")):
        out[kind] = load_model(weights / stem, kind=kind, map_location=device)[0].requires_grad_(False)
    out["uniform"] = load_model(weights / "generator-uniform", kind="generator", map_location=device)[0]
    out["uniform"].requires_grad_(False)
    return out


def _defenses(models: dict, seed: int) -> dict:
    G, I, f = models["generator"], models["inverter"], models["classifier"]
    return {
        name: build_defense(DefenseSpec.model_validate(spec), models["uniform"] if name == "clipped" else G, I, f, seed)
        for name, spec in DEFENSES.items()
    }


def predictions(device: torch.device, n: int, seed: int = 0, weights: Path = WEIGHTS_DIR / "digits") -> dict:
    """{attack: {defense: predictions (list)}} of every defense on every attack's images, computed on `device`."""
    models = _models(device, weights)
    defenses = _defenses(models, seed)
    data = load_dataset("digits", "test").subset(n)
    x, y = data.images.to(device), data.labels.to(device)
    ids = torch.as_tensor(data.ids, device=device)
    out = {"clean": {name: d.predict(x, ids).cpu().tolist() for name, d in defenses.items()}}
    for name, (spec, target) in ATTACKS.items():
        attack = AttackSpec.model_validate(spec).build(seed)
        if name == "substitute":  # trained on the target's labels from seed images apart from the evaluated ones
            attack.substitute = type(models["classifier"])(**models["classifier"].arch).to(device)
            attack.seed_images = load_dataset("digits", "test").images[-attack.seeds :].to(device)
        victim = models["classifier"] if target == "classifier" else defenses[target]
        torch.manual_seed(seed)  # the substitute's initial weights
        x_adv = attack(victim, x, y, ids=ids).x_adv
        assert x_adv.device.type == device.type, f"{name}: x_adv on {x_adv.device}, inputs on {device}"
        out[name] = {d: defense.predict(x_adv, ids).cpu().tolist() for d, defense in defenses.items()}
    return out


def throughput(device: torch.device, n: int, restarts: int = 10, steps: int = 50, repeats: int = 3) -> float:
    """Images per second of a Defense-GAN projection (restarts x steps, one batch through G) on `device`."""
    G = load_model(WEIGHTS_DIR / "digits" / "generator", kind="generator", map_location=device)[0]
    G.requires_grad_(False)
    x = load_dataset("digits", "test").subset(n).images.to(device)
    ids = torch.arange(len(x), device=device)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        project(G, x, ids=ids, steps=steps, restarts=restarts)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return len(x) / best


def check(device: torch.device, *, n: int = 8, throughput_n: int = 64, steps: int = 50) -> dict:
    """Predictions on `device` vs the CPU (agreement per attack) and projection throughput on both."""
    on_device, on_cpu = predictions(device, n), predictions(torch.device("cpu"), n)
    agreement = {
        attack: sum(
            a == b for d in on_cpu[attack] for a, b in zip(on_device[attack][d], on_cpu[attack][d], strict=True)
        )
        / (n * len(on_cpu[attack]))
        for attack in on_cpu
    }
    rate = {d: throughput(torch.device(d), throughput_n, steps=steps) for d in (str(device), "cpu")}
    device_rate, cpu_rate = rate[str(device)], rate["cpu"]
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "examples": n,
        "agreement": agreement,
        "min_agreement": min(agreement.values()),
        "projection_images_per_second": {"device": device_rate, "cpu": cpu_rate},
        "device_over_cpu": device_rate / cpu_rate,
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the device to check against the CPU [cuda]")
    parser.add_argument("--quick", action="store_true", help="4 images and a small throughput batch (the test suite)")
    parser.add_argument("--min-agreement", type=float, default=0.9, help="fail below this agreement [0.9]")
    parser.add_argument(
        "--out", type=Path, default=HERE / "gpu_check.json", help="the JSON [benchmarks/gpu_check.json]"
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"torch {torch.__version__} sees no CUDA device: run with --device cpu, or on a GPU machine")
        return 2
    result = check(
        device, **({"n": 2, "throughput_n": 4, "steps": 5} if args.quick else {"n": 32, "throughput_n": 256})
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for attack, share in result["agreement"].items():
        print(f"{attack:<12} predictions on {device} = on the CPU: {share:.3f}")
    rates = result["projection_images_per_second"]
    print(
        f"projection: {rates['device']:.1f} images/s on {device}, {rates['cpu']:.1f} on the CPU "
        f"({result['device_over_cpu']:.2f}x); written to {args.out}"
    )
    return 0 if result["min_agreement"] >= args.min_agreement else 1


if __name__ == "__main__":
    sys.exit(main())
