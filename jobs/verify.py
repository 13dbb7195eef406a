"""`invgan verify`: measure the shipped models on the held-out split and compare with their manifests.

Figures (all on the test split of the dataset the models were trained on):
- classifier accuracy on every held-out image;
- Defense-GAN accuracy: f(G(z*)) with z* from 10 restarts x 200 steps (the papers' default);
- InvGAN accuracy: z0 = I(x), 200 steps; and the pure encoder f(G(I(x))) (T = 0);
- mean reconstruction MSE of each projection.
The projections are costly, so they run on the first `limit` held-out images (the manifest records
which). `--write` measures the whole held-out split and the quick-check subset and records both in the
manifests' `quality` field, keyed by the number of images (e.g. "n=1000", "n=48").
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, TypedDict

import torch
from tqdm.auto import tqdm

from invgan_core.checkpoint import atomic_write_json, load_model, read_manifest
from invgan_core.data import load_dataset
from invgan_core.defenses import Defense, DefenseGAN, InvGAN
from invgan_core.training import accuracy
from jobs.common import WEIGHTS_DIR, UserError, user_errors

CHECK_SUBSET = 100  # held-out images of the quick check (`invgan verify`, the shipped-weights test): 1 flip = 0.01


class Projection(TypedDict):
    """Defense-GAN's projection in the figures (the papers' default); InvGAN uses its steps and lr."""

    restarts: int
    steps: int
    lr: float


PROJECTION: Projection = {"restarts": 10, "steps": 200, "lr": 0.05}
TOLERANCE = 0.02  # the reproduction tolerance


def measure(
    dataset: str,
    *,
    weights: Path | None = None,
    limit: int | None = None,
    data_dir=None,
    chunk: int = 100,
    progress: bool = True,
) -> dict:
    """Quality figures of weights/<dataset>/{classifier, generator, inverter} on the held-out split."""
    root = Path(weights) if weights else WEIGHTS_DIR / dataset
    f, _ = load_model(root / "classifier", kind="classifier")
    G, _ = load_model(root / "generator", kind="generator")
    I = load_model(root / "inverter", kind="inverter")[0] if (root / "inverter.json").exists() else None
    test = load_dataset(dataset, "test", data_dir)
    figures: dict[str, Any] = {
        "classifier_accuracy": accuracy(f, test.images, test.labels),
        "classifier_examples": len(test),
    }
    sub = test.subset(limit)
    defenses: dict[str, Defense] = {"defensegan": DefenseGAN(G, f, **PROJECTION)}
    if I is not None:
        defenses["invgan"] = InvGAN(G, I, f, steps=PROJECTION["steps"], lr=PROJECTION["lr"])
        defenses["invgan_t0"] = InvGAN(G, I, f, steps=0)
    for name, defense in defenses.items():
        correct, mse, t0 = 0, 0.0, time.perf_counter()
        chunks = range(0, len(sub), chunk)
        for i in tqdm(chunks, desc=f"verify {name}", disable=not progress, unit="chunk"):
            x, y = sub.images[i : i + chunk], sub.labels[i : i + chunk]
            purified = defense.purify(x, sub.ids[i : i + chunk])
            with torch.no_grad():
                correct += (f(purified.x).argmax(1) == y).sum().item()
            mse += purified.loss.sum().item()
        figures[f"{name}_accuracy"] = correct / len(sub)
        figures[f"{name}_mse"] = mse / len(sub)
        figures[f"{name}_seconds_per_example"] = (time.perf_counter() - t0) / len(sub)
    figures["projection_examples"] = len(sub)
    figures["projection"] = dict(PROJECTION)
    return figures


def write_quality(root: Path, dataset: str, data_dir=None) -> dict:
    """Measure on the whole held-out split and on the check subset; record both in every manifest."""
    quality = {}
    for limit in (None, CHECK_SUBSET):
        figures = measure(dataset, weights=root, limit=limit, data_dir=data_dir)
        quality[f"n={figures['projection_examples']}"] = figures
    for name in ("classifier", "generator", "inverter"):
        if (root / f"{name}.json").exists():
            manifest = read_manifest(root / name)
            manifest["quality"] = quality
            atomic_write_json(root / f"{name}.json", manifest)
    return quality


def compare(figures: dict, recorded: dict) -> list[str]:
    """Accuracy figures that differ from the recorded ones by more than the tolerance."""
    return [
        f"{k}: measured {figures[k]:.4f}, manifest {recorded[k]:.4f}"
        for k in figures
        if k.endswith("_accuracy") and k in recorded and abs(figures[k] - recorded[k]) > TOLERANCE
    ]


def main(dataset: str, limit: int | None, data_dir, weights: Path | None, write: bool, verbose: bool = False) -> int:
    """The `invgan verify` command: 0 when the measured figures match the manifests (or were written), 1 when
    they differ. Missing or unusable weights or data end in one line (`user_errors`; the traceback with -v)."""
    root = Path(weights) if weights else WEIGHTS_DIR / dataset
    with user_errors("verify", verbose=verbose):
        if not (root / "generator.json").exists() and not (root / "classifier.json").exists():
            shipped = sorted(p.name for p in WEIGHTS_DIR.iterdir() if (p / "classifier.json").exists())
            raise UserError(
                f"no models in {root} (shipped weights: {', '.join(shipped)}); "
                "give --weights FOLDER, or train them with `invgan train`"
            )
        return _verify(root, dataset, limit, data_dir, write)


def _verify(root: Path, dataset: str, limit: int | None, data_dir, write: bool) -> int:
    """Measure and compare (or, with `write`, record in the manifests); prints the figures."""
    if write:
        quality = write_quality(root, dataset, data_dir)
        print(json.dumps(quality, indent=2))
        print(f"recorded in the manifests under {root}")
        return 0
    figures = measure(dataset, weights=root, limit=limit or CHECK_SUBSET, data_dir=data_dir)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}, indent=2))
    recorded = read_manifest(root / "generator").get("quality", {}).get(f"n={figures['projection_examples']}")
    if recorded is None:
        print(f"(the manifests hold no figures on {figures['projection_examples']} images; nothing to compare)")
        return 0
    bad = compare(figures, recorded)
    print(
        "\n".join(["differs from the manifest by more than 0.02:", *bad])
        if bad
        else f"matches the manifests in {root} within {TOLERANCE}"
    )
    return 1 if bad else 0
