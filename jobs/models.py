"""The models a job loads: G, f and I from a weights folder (hash-verified), and a defense built from its spec.

Shared by every job that evaluates (eval, red, curves) and by the tuning trials, so none of them imports another
job's module for it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from invgan_core.checkpoint import load_model
from jobs.config import DEFENSES, JobConfig

if TYPE_CHECKING:
    from invgan_core.defenses import Defense


def load_models(cfg: JobConfig, device="cpu") -> dict:
    """G, f and (if shipped) I from the config's weights folder, hash-verified."""
    root = cfg.weights_dir()
    models = {}
    for kind in ("generator", "classifier", "inverter"):
        if kind == "inverter" and not (root / "inverter.json").exists():
            continue
        model, _ = load_model(root / kind, kind=kind, map_location=device)
        models[kind] = model.requires_grad_(False)
    return models


def build_defense(spec, G, I, f, seed: int):
    """The defense a DefenseSpec names, on the device of G (an ablation's own inverter is loaded there too)."""
    cls: Callable[..., Defense] = DEFENSES[spec.kind]  # constructors differ: G, I, f by kind
    if spec.kind == "none":
        return cls(f, **spec.params)
    if spec.kind == "invgan":
        if spec.inverter is not None:  # an ablation's inverter instead of the weights folder's
            device = next(G.parameters()).device
            I = load_model(spec.inverter_stem(), kind="inverter", map_location=device)[0].requires_grad_(False)
        if I is None:
            raise ValueError("defense kind 'invgan' needs an inverter in the weights folder")
        return cls(G, I, f, seed=seed, **spec.params)
    return cls(G, f, seed=seed, **spec.params)
