"""The models a job loads: G, f and I from a weights folder (hash-verified), and a defense built from its spec.

Shared by every job that evaluates (eval, red, curves) and by the tuning trials, so none of them imports another
job's module for it.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING, Callable

import torch

from invgan_core.checkpoint import CheckpointError, load_model, read_manifest
from invgan_core.data import check_images
from jobs.common import UserError
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


def worker_device(resources) -> torch.device:
    """Where a worker computes: CUDA when the job gives it GPUs, else the CPU. A worker given GPUs whose torch
    sees no CUDA device stops with one line (UserError) instead of silently running on the CPU."""
    if resources.num_gpus_per_worker <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(
            f"a worker was given {resources.num_gpus_per_worker:g} GPU(s) but torch {torch.__version__} on node "
            f"{socket.gethostname()} sees no CUDA device (a CPU-only build of torch, or no driver): install a CUDA "
            "build of torch on the GPU nodes, or set resources.num_gpus_per_worker: 0"
        )
    return torch.device("cuda")


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


def check_job_inputs(cfg, data) -> None:
    """Before any Ray work: the models of the weights folder agree with each other (one image shape; the
    generator's and the inverter's latent size) and `data`'s images are ones they can score (shape, finite,
    in [0, 1], not empty: invgan_core.data.check_images). Raises CheckpointError or DataError, one line."""
    root = cfg.weights_dir()
    arch = {
        k: read_manifest(root / k).get("arch", {})
        for k in ("generator", "classifier", "inverter")
        if (root / f"{k}.json").exists()
    }
    shapes = {k: tuple(a["image_shape"]) for k, a in arch.items() if "image_shape" in a}
    if len(set(shapes.values())) > 1:
        raise CheckpointError(
            f"{root}: its models were trained on different image shapes ("
            + ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in shapes.items())
            + "); a weights folder needs the generator, classifier and inverter of one dataset"
        )
    for name, spec in getattr(cfg, "defenses", {}).items():  # an ablation's own inverter (DefenseSpec.inverter)
        stem = spec.inverter_stem() if hasattr(spec, "inverter_stem") else None
        if stem is None:
            continue
        own = read_manifest(stem)
        if own.get("kind") != "inverter":
            raise CheckpointError(f"defenses.{name}.inverter: {stem} holds a {own.get('kind')!r}, not an inverter")
        own_latent, g_latent = own.get("arch", {}).get("latent_dim"), arch.get("generator", {}).get("latent_dim")
        if own_latent != g_latent:
            raise CheckpointError(
                f"defenses.{name}.inverter: {stem}'s latent size {own_latent} differs from the generator's "
                f"{g_latent}; train the inverter for this generator"
            )
    latents = {k: arch[k]["latent_dim"] for k in ("generator", "inverter") if "latent_dim" in arch.get(k, {})}
    if len(set(latents.values())) > 1:
        raise CheckpointError(
            f"{root}: the generator's latent size {latents['generator']} differs from the "
            f"inverter's {latents['inverter']}; train the inverter for this generator"
        )
    split = getattr(cfg, "split", data.split)
    check_images(
        data,
        shapes.get("classifier") or next(iter(shapes.values()), None),
        where=f"dataset {cfg.dataset!r} ({split} split)",
    )
