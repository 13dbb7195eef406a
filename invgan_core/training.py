"""Losses and single training steps, framework-free: the jobs layer drives them with Accelerate.

Each step takes a `backward` callable (default `loss.backward()`), so `accelerator.backward` slots
in without this module knowing about Accelerate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

Backward = Callable[[torch.Tensor], None]
GAN_LOSSES = ("dcgan", "wgan-gp")


def _default_backward(loss: torch.Tensor) -> None:
    loss.backward()


def _norms(a: torch.Tensor) -> torch.Tensor:
    """Per-example ℓ2 norm over every non-batch dimension."""
    return a.flatten(1).norm(dim=1)


# ---------------------------------------------------------------- GAN (DCGAN and WGAN-GP)


def gradient_penalty(
    D: nn.Module, real: torch.Tensor, fake: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """WGAN-GP: E[(||∇D(x̂)||₂ - 1)²] on random interpolates x̂ of real and fake (Gulrajani et al.)."""
    eps = torch.rand(real.shape[0], 1, 1, 1, generator=generator, device=real.device)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    return ((_norms(grad) - 1) ** 2).mean()


def discriminator_loss(
    D: nn.Module, real: torch.Tensor, fake: torch.Tensor, kind: str, gp_weight: float = 10.0
) -> torch.Tensor:
    """Critic loss; real and fake go through D as one batch (one forward per step, DDP-friendly)."""
    scores = D(torch.cat([real, fake]))
    s_real, s_fake = scores[: len(real)], scores[len(real) :]
    if kind == "dcgan":
        return F.binary_cross_entropy_with_logits(s_real, torch.ones_like(s_real)) + F.binary_cross_entropy_with_logits(
            s_fake, torch.zeros_like(s_fake)
        )
    if kind == "wgan-gp":
        return s_fake.mean() - s_real.mean() + gp_weight * gradient_penalty(D, real, fake)
    raise ValueError(f"unknown GAN loss {kind!r}; choose one of {GAN_LOSSES}")


def generator_loss(D: nn.Module, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Non-saturating DCGAN loss, or the WGAN generator loss -E[D(G(z))]."""
    s = D(fake)
    if kind == "dcgan":
        return F.binary_cross_entropy_with_logits(s, torch.ones_like(s))
    if kind == "wgan-gp":
        return -s.mean()
    raise ValueError(f"unknown GAN loss {kind!r}; choose one of {GAN_LOSSES}")


def critic_step(
    G: nn.Module,
    D: nn.Module,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
    kind: str,
    *,
    gp_weight: float = 10.0,
    backward: Backward = _default_backward,
) -> float:
    with torch.no_grad():
        fake = G(z)
    loss = discriminator_loss(D, real, fake, kind, gp_weight)
    opt_d.zero_grad(set_to_none=True)
    backward(loss)
    opt_d.step()
    return loss.item()


def generator_step(
    G: nn.Module,
    D: nn.Module,
    opt_g: torch.optim.Optimizer,
    z: torch.Tensor,
    kind: str,
    *,
    backward: Backward = _default_backward,
) -> float:
    loss = generator_loss(D, G(z), kind)
    opt_g.zero_grad(set_to_none=True)
    backward(loss)
    opt_g.step()
    return loss.item()


# ---------------------------------------------------------------- classifier


def classifier_step(
    f: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    backward: Backward = _default_backward,
) -> float:
    loss = F.cross_entropy(f(x), y)
    opt.zero_grad(set_to_none=True)
    backward(loss)
    opt.step()
    return loss.item()


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by its own random (dy, dx) in [-max_shift, max_shift]², zero fill; batched."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), device=x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (N, W)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def accuracy(f: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    device = next(f.parameters()).device
    correct = sum(
        (f(x[i : i + batch_size].to(device)).argmax(1).cpu() == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return correct / max(len(x), 1)


# ---------------------------------------------------------------- InvGAN inverter


@dataclass(frozen=True)
class InverterWeights:
    """λ1·L_adv + λ2·L_semantic(hinge η) + λ3·L_latent; paper defaults λ2 = 100, λ1 = λ3 = 1."""

    adv: float = 1.0
    semantic: float = 100.0
    latent: float = 1.0
    eta: float = 1.0


def inverter_losses(
    G: nn.Module, I: nn.Module, D: nn.Module, z: torch.Tensor, w: InverterWeights
) -> dict[str, torch.Tensor]:
    """The data-free InvGAN objective for I (InvGAN eqs. 3-5): only samples z ~ p(z) and x = G(z).

    L_latent = E||z - I(G(z))||, L_semantic = E max(||G(z) - G(I(G(z)))||, η),
    L_adv = non-saturating loss that D takes G(I(G(z))) for a real sample G(z).
    """
    with torch.no_grad():
        x = G(z)
    z_hat = I(x)
    x_hat = G(z_hat)
    latent = _norms(z - z_hat).mean()
    semantic = torch.clamp(_norms(x - x_hat), min=w.eta).mean()
    adv = torch.zeros((), device=z.device)
    if w.adv:
        s = D(x_hat)
        adv = F.binary_cross_entropy_with_logits(s, torch.ones_like(s))
    total = w.adv * adv + w.semantic * semantic + w.latent * latent
    return {
        "total": total,
        "adv": adv,
        "semantic": semantic,
        "latent": latent,
        "mse": ((x - x_hat) ** 2).flatten(1).mean(1).mean().detach(),
        "x": x,
        "x_hat": x_hat.detach(),
    }


def inverter_step(
    G: nn.Module,
    I: nn.Module,
    D: nn.Module,
    opt_i: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    z: torch.Tensor,
    w: InverterWeights,
    *,
    backward: Backward = _default_backward,
) -> dict[str, float]:
    """One min-max step: update D (G(z) real vs G(I(G(z))) fake), then I against the updated D. G is frozen."""
    metrics = {}
    if w.adv:
        with torch.no_grad():
            x = G(z)
            x_hat = G(I(x))
        d_loss = discriminator_loss(D, x, x_hat, "dcgan")
        opt_d.zero_grad(set_to_none=True)
        backward(d_loss)
        opt_d.step()
        metrics["d_loss"] = d_loss.item()
    losses = inverter_losses(G, I, D, z, w)
    opt_i.zero_grad(set_to_none=True)
    backward(losses["total"])
    opt_i.step()
    return metrics | {k: float(v.detach()) for k, v in losses.items() if k not in ("x", "x_hat")}
