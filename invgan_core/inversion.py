"""Batched projection onto the range of a generator: the solver every defense and adaptive attack uses.

    z* = argmin_z ||G(z) - x||²  by gradient steps from R starting points per example (Defense-GAN),
    from I(x) (InvGAN eq. 6), or from given latents; optionally kept in the box [-1, 1]^d by standard
    or stochastic clipping (Lipton & Tripathi).

Examples x restarts form one batch through G. The objective is the *sum* of per-example losses, and
Adam/SGD act coordinate-wise, so each example's trajectory is independent of what else is in the
batch; random starts and clipping draws come from (seed, example id), see `rng.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from invgan_core import rng

OPTIMIZERS = ("adam", "sgd", "momentum")
CONSTRAINTS = (None, "clip", "stochastic_clip")


@dataclass
class Projection:
    z: torch.Tensor  # (N, d) best restart per example
    x: torch.Tensor  # (N, C, H, W) G(z)
    loss: torch.Tensor  # (N,) final ||G(z) - x||² / n (per-pixel mean) of the kept restart
    effective_iterations: int  # restarts x steps (InvGAN Sec. 4.3)
    restart_losses: torch.Tensor  # (N, R) final loss of every restart
    trace: torch.Tensor | None = None  # (N, steps) loss of the kept restart before each step


def per_example_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a - b) ** 2).flatten(1).mean(1)


def _make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.7)  # Defense-GAN's setting
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")


def initial_latents(G: nn.Module, x: torch.Tensor, ids: torch.Tensor, restarts: int, init, seed: int) -> torch.Tensor:
    """Starting latents (N, R, d): 'prior' draws per (seed, id, restart); an inverter gives I(x)
    for restart 0 and prior draws for the rest; a tensor (N, d) or (N, R, d) is used as given."""
    n, d = x.shape[0], G.latent_dim
    if isinstance(init, str):
        if init != "prior":
            raise ValueError(f"init must be 'prior', an inverter module or a latent tensor, got {init!r}")
        return rng.sample_latents(G.prior, seed, ids, restarts, d).to(x.device)
    if isinstance(init, nn.Module):
        z0 = rng.sample_latents(G.prior, seed, ids, restarts, d).to(x.device)
        with torch.no_grad():
            z0[:, 0] = init(x)
        return z0
    z = torch.as_tensor(init, dtype=torch.float32, device=x.device)
    if z.shape == (n, d):
        z = z[:, None].expand(n, restarts, d)
    if z.shape != (n, restarts, d):
        raise ValueError(f"init latents have shape {tuple(z.shape)}; expected ({n}, {d}) or ({n}, {restarts}, {d})")
    return z.clone()


def _apply_constraint(z: torch.Tensor, constraint: str | None, seed: int, ids: torch.Tensor, restarts: int, step: int) -> None:
    """In place. 'clip': clamp to [-1, 1]. 'stochastic_clip': re-draw out-of-box coordinates uniformly."""
    if constraint is None:
        return
    if constraint == "clip":
        z.clamp_(-1, 1)
    elif constraint == "stochastic_clip":
        out = z.abs() > 1
        if out.any():
            n, d = ids.numel(), z.shape[-1]
            fresh = rng.uniform(rng.latent_keys(seed, ids, restarts, d, step)).to(z.device).reshape(n * restarts, d) * 2 - 1
            z[out] = fresh[out]
    else:
        raise ValueError(f"unknown constraint {constraint!r}; choose one of {CONSTRAINTS}")


def project(G: nn.Module, x: torch.Tensor, *, ids, init="prior", steps: int = 200, lr: float = 0.05,
            restarts: int = 1, optimizer: str = "adam", constraint: str | None = None, seed: int = 0,
            keep_trace: bool = False) -> Projection:
    """Project images x (N, C, H, W) onto the range of G; keeps the restart with the lowest final loss."""
    if steps < 0 or restarts < 1:
        raise ValueError(f"need steps >= 0 and restarts >= 1, got steps={steps}, restarts={restarts}")
    if constraint not in CONSTRAINTS:
        raise ValueError(f"unknown constraint {constraint!r}; choose one of {CONSTRAINTS}")
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    n, d = x.shape[0], G.latent_dim
    if ids.numel() != n:
        raise ValueError(f"got {ids.numel()} ids for {n} images")
    was_training = G.training
    G.eval()  # batch norm must use its running statistics, or examples would interact
    flags = [p.requires_grad for p in G.parameters()]
    G.requires_grad_(False)
    try:
        x = x.detach()
        target = x.repeat_interleave(restarts, dim=0)  # row i*R + r is example i, restart r
        z = initial_latents(G, x, ids, restarts, init, seed).reshape(n * restarts, d).detach().requires_grad_(True)
        _apply_constraint(z.data, constraint, seed, ids, restarts, step=-2)
        opt = _make_optimizer(optimizer, [z], lr)
        trace = torch.empty(steps, n * restarts) if keep_trace else None
        for t in range(steps):
            with torch.enable_grad():  # a projection is an optimisation, even when called under no_grad
                losses = per_example_mse(G(z), target)
                opt.zero_grad(set_to_none=True)
                losses.sum().backward()  # sum, not mean: each example's step does not depend on batch size
            if trace is not None:
                trace[t] = losses.detach().cpu()
            opt.step()
            with torch.no_grad():
                _apply_constraint(z.data, constraint, seed, ids, restarts, step=t)
        with torch.no_grad():
            x_all = G(z)
            final = per_example_mse(x_all, target).reshape(n, restarts)
            best = final.argmin(dim=1)
            rows = torch.arange(n, device=x.device) * restarts + best
            out_trace = trace.reshape(steps, n, restarts)[:, torch.arange(n), best.cpu()].T.contiguous() if trace is not None else None
            return Projection(z=z.detach()[rows].clone(), x=x_all[rows].clone(), loss=final[torch.arange(n), best],
                              effective_iterations=restarts * steps, restart_losses=final, trace=out_trace)
    finally:
        for p, f in zip(G.parameters(), flags):
            p.requires_grad_(f)
        G.train(was_training)
