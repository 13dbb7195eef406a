"""RED theory checks (Sec. 5.1, App. B.1, B.3-B.5): realizable instances from a one-layer GAN,
the local error bound μ along the trajectory, linear convergence, μ versus output dimension (Fig. 1).

Returns numpy arrays that a plotting job can use; no matplotlib here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from invgan_core import rng
from invgan_core.data import synthetic_gan
from invgan_core.red import AttackDictionary, red_solve


class OneLayerGenerator(nn.Module):
    """G(z) = σ(Wz) (RED eq. 4 with one layer, Sec. 5.1): σ = leaky ReLU (slope 0.2), or the smooth
    'softplus' variant σ(t) = 0.2t + 0.8·softplus_β(t), β = 10 — App. B.4's ReLU → softplus swap applied
    to the leaky ReLU, which satisfies Assumption 1. Output (N, 1, 1, m), like `synthetic_gan`."""

    W: torch.Tensor  # (m, d) buffer

    def __init__(self, W: torch.Tensor, activation: str = "leaky_relu", slope: float = 0.2, beta: float = 10.0):
        super().__init__()
        if activation not in ("leaky_relu", "softplus"):
            raise ValueError(f"activation must be 'leaky_relu' or 'softplus', got {activation!r}")
        self.register_buffer("W", W)
        self.activation, self.slope, self.beta = activation, slope, beta
        self.latent_dim, self.prior = W.shape[1], "normal"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        t = z @ self.W.T
        if self.activation == "leaky_relu":
            out = F.leaky_relu(t, self.slope)
        else:
            out = self.slope * t + (1 - self.slope) * F.softplus(t, beta=self.beta)
        return out.reshape(len(z), 1, 1, -1)


@dataclass
class RealizableInstance:
    G: OneLayerGenerator
    x: torch.Tensor  # (N, 1, 1, m) attacked inputs x' = G(z*) + D c*
    z_star: torch.Tensor  # (N, d)
    c_star: torch.Tensor  # (N, k), nonzero only on block (signal_class, attack_type)
    dictionary: AttackDictionary
    signal_class: torch.Tensor  # (N,) class of G(z*) under the binary classifier ψ
    attack_type: torch.Tensor  # (N,) j*


def realizable_instance(
    m: int = 100,
    d: int = 10,
    n: int = 10,
    *,
    per_block: int = 2,
    eps: float = 1.0,
    hidden: int = 50,
    activation: str = "leaky_relu",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> RealizableInstance:
    """App. B.1: G(z) = σ(Wz) from `synthetic_gan`; binary classifier ψ(x) = k^-½ Σ_l a_l ReLU(w_l·x)
    (eq. 87, w_l ~ N(0, I/m), a_l = ±1); the dictionary holds single gradient-step attacks on training
    points G(z_i), two types: ℓ2 (ε ∇ψ/||∇ψ||₂) and ℓ∞ (ε/√m · sign ∇ψ, the same ℓ2 size), signed to flip
    ψ. Test inputs x' = G(z*) + D c*, c* Gaussian on the block (class of G(z*), type j* = alternating)."""
    n_train = 40 * per_block
    data = synthetic_gan(n_train + n, m=m, d=d, seed=seed)
    G = OneLayerGenerator(data.info["W"].to(dtype), activation)
    z = data.info["z"].to(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(hidden, m, generator=g) / math.sqrt(m)).to(dtype)
    a = (torch.randint(0, 2, (hidden,), generator=g) * 2 - 1).to(dtype)
    with torch.no_grad():
        xs = G(z).flatten(1)
        pre = xs @ w.T
        psi = F.relu(pre) @ a / math.sqrt(hidden)
        grad = ((pre > 0).to(dtype) * a) @ w / math.sqrt(hidden)  # ∇ψ(x)
    label = (psi > 0).long()
    flip = -torch.where(label == 1, 1.0, -1.0).to(dtype)[:, None]
    attacks = [eps * grad / grad.norm(dim=1, keepdim=True), eps / math.sqrt(m) * grad.sign()]
    cols, classes, types = [], [], []
    for i in (0, 1):
        rows = torch.nonzero(label[:n_train] == i).flatten()[:per_block]
        if len(rows) < per_block:
            raise ValueError(f"seed {seed}: fewer than {per_block} training points of class {i}; use another seed")
        for j, delta in enumerate(attacks):
            cols.append((flip * delta)[rows])
            classes += [i] * per_block
            types += [j] * per_block
    dic = AttackDictionary(
        D=torch.cat(cols).T.contiguous(),
        classes=torch.tensor(classes),  # CPU: a synthetic instance is made there (`.to` moves its tensors)
        attack_types=torch.tensor(types),  # CPU: as above
        attack_names=["l2", "linf"],
        num_classes=2,
        image_shape=(1, 1, m),
    )
    test = slice(n_train, n_train + n)
    j_star = torch.arange(n) % 2  # CPU: as above
    block = label[test] * 2 + j_star
    c_star = torch.randn(n, dic.D.shape[1], generator=g).to(dtype) / math.sqrt(per_block)
    c_star = c_star * (dic.block_ids[None, :] == block[:, None])
    x = (xs[test] + c_star @ dic.D.T).reshape(n, 1, 1, m)
    return RealizableInstance(G, x, z[test], c_star, dic, label[test], j_star)


def trajectory_mu(
    G: nn.Module,
    x: torch.Tensor,
    z_iterates: torch.Tensor,
    c_iterates: torch.Tensor,
    D: torch.Tensor,
    z_ref: torch.Tensor,
    c_ref: torch.Tensor,
) -> torch.Tensor:
    """(N, K) local error-bound parameter along a trajectory (Assumption 5, eq. 9; App. B.1):

        μ² = (||∇_z f||² + ||∇_c f||²) / (||z^k − z_ref||² + ||c^k − c_ref||²),  f = ||x' − G(z) − Dc||²

    with the paper's f (no ½: gradients −2Jᵀr, −2Dᵀr). (z_ref, c_ref) is the truth (z*, c*) on a
    realizable instance with λ = 0, as in the paper; for λ > 0 pass the final iterate instead."""
    K, N, d = z_iterates.shape
    xs = x.flatten(1).repeat(K, 1)
    z = z_iterates.reshape(K * N, d).detach().requires_grad_(True)
    c = c_iterates.reshape(K * N, -1)
    with torch.enable_grad():
        r = xs - G(z).flatten(1) - c @ D.to(x.dtype).T
        (gz,) = torch.autograd.grad((r * r).sum(), z)
    gc = -2 * r.detach() @ D.to(x.dtype)
    num = (gz**2).sum(1) + (gc**2).sum(1)
    den = ((z.detach() - z_ref.repeat(K, 1)) ** 2).sum(1) + ((c - c_ref.repeat(K, 1)) ** 2).sum(1)
    return (num / den).sqrt().reshape(K, N).T


def convergence_trace(
    inst: RealizableInstance,
    *,
    steps: int = 1000,
    z0: torch.Tensor | None = None,
    z_lr: float | None = None,
    nesterov: bool = False,
    jacobi: bool = False,
    seed: int = 0,
    floor: float = 1e-20,
) -> dict[str, np.ndarray]:
    """Unregularised Algorithm 1 (λ = 0, Sec. 4.2) from z0 ~ N(0, I) (per example id), c0 = 0.

    Arrays for the figures: dist2 (N, K) = ||Δz^k||² + ||Δc^k||² to the truth; mu (N, K) along the path
    (NaN once dist2 < floor · dist2[0], where it is rounding noise); objective (N, K); rate (N,) = e^slope
    of a least-squares fit of log dist2 vs k above the floor (per-step contraction factor, Theorem 6);
    attack_correct / z_error / c_error (N,)."""
    n = len(inst.x)
    if z0 is None:
        z0 = rng.sample_latents("normal", seed, torch.arange(n, device=inst.x.device), 1, inst.G.latent_dim)[:, 0]
    res = red_solve(
        inst.G,
        inst.x,
        D=inst.dictionary,
        z0=z0.to(inst.x.dtype),
        lam=torch.zeros(n, dtype=inst.x.dtype, device=inst.x.device),
        steps=steps,
        z_lr=z_lr,
        nesterov=nesterov,
        jacobi=jacobi,
        keep_trace=True,
        keep_iterates=True,
    )
    assert res.z is not None and res.trace is not None, "red_solve returns z and the trace when keep_trace is set"
    assert res.z_iterates is not None and res.c_iterates is not None, "keep_iterates=True returns the iterates"
    dist2 = (((res.z_iterates - inst.z_star) ** 2).sum(2) + ((res.c_iterates - inst.c_star) ** 2).sum(2)).T
    mu = trajectory_mu(inst.G, inst.x, res.z_iterates, res.c_iterates, inst.dictionary.D, inst.z_star, inst.c_star)
    above = dist2 > floor * dist2[:, :1]
    mu = torch.where(above, mu, torch.full_like(mu, math.nan))
    k = torch.arange(steps + 1, dtype=torch.float64, device=dist2.device)
    rate = []
    for i in range(n):
        kk, yy = k[above[i]], dist2[i][above[i]].double().log()
        slope = ((kk - kk.mean()) * (yy - yy.mean())).sum() / ((kk - kk.mean()) ** 2).sum().clamp_min(1e-30)
        rate.append(math.exp(float(slope)))
    arrays = {
        "dist2": dist2,
        "mu": mu,
        "objective": res.trace,
        "attack_correct": res.attack_type == inst.attack_type,
        "z_error": (res.z - inst.z_star).norm(dim=1),
        "c_error": (res.c - inst.c_star).norm(dim=1),
    }
    return {"rate": np.array(rate), **{k: v.detach().cpu().numpy() for k, v in arrays.items()}}


def mu_vs_output_dim(
    ms: Sequence[int], *, d: int = 10, n: int = 10, steps: int = 1000, activation: str = "leaky_relu", seed: int = 0
) -> dict[str, np.ndarray]:
    """Fig. 1: output dimension m vs μ averaged over the optimisation paths of n test examples."""
    rows = [
        convergence_trace(realizable_instance(m, d, n, activation=activation, seed=seed), steps=steps, seed=seed)
        for m in ms
    ]
    return {
        "m": np.asarray(ms),
        "mean_mu": np.array([np.nanmean(r["mu"]) for r in rows]),
        "mean_rate": np.array([r["rate"].mean() for r in rows]),
    }
