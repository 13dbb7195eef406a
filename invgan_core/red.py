"""Reverse engineering of deceptions (RED): joint GAN inversion and block-sparse attack recovery.

    min_{z, c}  ½ ||x' − G(z) − D c||²  +  λ Σ_b ||c_b||₂                       (RED eq. 2 / eq. 5)

D (n × k) is the attack dictionary: ℓp PGD perturbations of training examples, block b = (i, j)
holding the attacks of type j on examples of class i (Sec. 5.2). Algorithm 1 alternates a gradient
step on z through G with a proximal-gradient step on c (block soft-thresholding), batched over
examples: every example has its own λ and z step and never sees the rest of its batch.

Convention: the smooth term carries a ½, so Algorithm 1's updates (written without a factor 2) are
plain gradient steps and the c step 1/||DᵀD||₂ (App. B.2) is one over the Lipschitz constant of the
c gradient. λ = multiplier · λ_max is scale-free, so this is the paper's problem, its λ doubled.
`REDResult.loss` is the paper's f = ||x' − G(z) − Dc||², without the ½.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save
from torch import nn

from invgan_core import rng
from invgan_core.attacks import L1PGD, L2PGD, Attack, LinfPGD
from invgan_core.checkpoint import CheckpointError, read_manifest, sha256_file
from invgan_core.files import atomic_write_bytes, atomic_write_json
from invgan_core.inversion import project

# ---------------------------------------------------------------- the attack dictionary

# App. B.2 budgets (AdvTorch PGD, CE loss, random start): name -> constructor taking seed=...
PAPER_MNIST_ATTACKS = {
    "linf": functools.partial(LinfPGD, eps=0.3, abs_stepsize=0.01, steps=100),
    "l2": functools.partial(L2PGD, eps=2.0, abs_stepsize=0.1, steps=200),
    "l1": functools.partial(L1PGD, eps=10.0, abs_stepsize=0.8, steps=100),
}
PAPER_CIFAR10_ATTACKS = {
    "linf": functools.partial(LinfPGD, eps=0.03, abs_stepsize=0.003, steps=100),
    "l2": functools.partial(L2PGD, eps=0.5, abs_stepsize=0.05, steps=200),
    "l1": functools.partial(L1PGD, eps=12.0, abs_stepsize=1.0, steps=100),
}


@dataclass
class AttackDictionary:
    """D_a with its block structure; columns sorted by (class i, attack type j), block b = i·J + j."""

    D: torch.Tensor  # (n, k) float32, column = flattened perturbation δ = x_adv − x
    classes: torch.Tensor  # (k,) int64 signal class i of each column
    attack_types: torch.Tensor  # (k,) int64 attack type j of each column
    attack_names: list[str]  # name of each attack type, e.g. ["linf", "l2", "l1"]
    num_classes: int
    image_shape: tuple[int, ...] | None = None
    source_index: torch.Tensor | None = None  # (k,) row of the training set each column comes from
    success: torch.Tensor | None = None  # (k,) bool: the attack fooled the classifier

    def __post_init__(self) -> None:
        k = self.D.shape[1]
        if self.D.ndim != 2 or self.classes.shape != (k,) or self.attack_types.shape != (k,):
            raise ValueError(
                f"inconsistent dictionary: D {tuple(self.D.shape)}, classes {tuple(self.classes.shape)}, "
                f"attack_types {tuple(self.attack_types.shape)}"
            )

    @property
    def num_types(self) -> int:
        return len(self.attack_names)

    @property
    def num_blocks(self) -> int:
        return self.num_classes * self.num_types

    @property
    def block_ids(self) -> torch.Tensor:
        """(k,) block index b = i·J + j of every column."""
        return self.classes * self.num_types + self.attack_types

    def blocks(self) -> list[torch.Tensor]:
        """Column indices of every block (i, j), in the order b = i·J + j (empty blocks included)."""
        ids = self.block_ids
        return [torch.nonzero(ids == b).flatten() for b in range(self.num_blocks)]

    @functools.cached_property
    def lipschitz(self) -> float:
        """L = ||DᵀD||₂ = σ_max(D)², the Lipschitz constant of ∇_c ½||s − Dc||² (computed once)."""
        return spectral_norm2(self.D)


def spectral_norm2(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M.double(), ord=2) ** 2)


def select_per_class(labels: torch.Tensor, per_class: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """`per_class` row indices of every class, chosen by a hash of (seed, row): sorted by class, then hash."""
    labels = torch.as_tensor(labels).reshape(-1).cpu()  # CPU: row indices are chosen there
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    keys = rng.hash_keys(seed, torch.arange(len(labels)))  # CPU: row indices, like `labels` above
    chosen = []
    for i in range(num_classes):
        rows = torch.nonzero(labels == i).flatten()
        if len(rows) < per_class:
            raise ValueError(f"class {i} has {len(rows)} examples, fewer than per_class={per_class}")
        chosen.append(rows[keys[rows].argsort()[:per_class]].sort().values)
    return torch.cat(chosen)


def build_attack_dictionary(
    classifier: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    attacks: dict[str, Attack],
    per_class: int,
    seed: int = 0,
    *,
    ids=None,
    batch_size: int = 1024,
    normalize_atoms: bool = False,
) -> AttackDictionary:
    """Run every attack on `per_class` training examples per class; columns are δ = x_adv − x (Sec. 5.2).

    Attack randomness comes from the example ids (dataset ids when given, else row numbers).
    `normalize_atoms` scales every column to unit ℓ2 norm. Raw ℓ∞ atoms (ε = 0.3) are ~2.7× longer than
    ℓ2 atoms (ε = 2), so the group penalty λ Σ ||c_ij|| explains an ℓ2 perturbation more cheaply with ℓ∞
    atoms and BSD-GAN-AD calls it ℓ∞; with unit atoms every block pays the same per unit of energy.
    """
    num_classes = getattr(classifier, "num_classes", None) or int(labels.max()) + 1
    rows = select_per_class(labels, per_class, seed, num_classes)
    ids = rows if ids is None else torch.as_tensor(ids, dtype=torch.int64)[rows]  # CPU row ids; attacks move them
    x, y = images[rows], torch.as_tensor(labels, device=images.device)[rows]
    deltas, success, type_blocks = [], [], []
    for j, attack in enumerate(attacks.values()):
        for lo in range(0, len(x), batch_size):
            sl = slice(lo, lo + batch_size)
            res = attack(classifier, x[sl], y[sl], ids=ids[sl])
            deltas.append((res.x_adv - x[sl]).flatten(1))
            success.append(res.success)
        type_blocks.append(torch.full((len(x),), j, dtype=torch.int64, device=y.device))
    classes, types = y.repeat(len(attacks)), torch.cat(type_blocks)
    order = torch.argsort(classes * len(attacks) + types, stable=True)
    D = torch.cat(deltas)[order].T.contiguous().float()
    if normalize_atoms:
        D = D / D.norm(dim=0, keepdim=True).clamp_min(1e-12)  # an all-zero atom (attack did not move) stays 0
    return AttackDictionary(
        D=D,
        classes=classes[order],
        attack_types=types[order],
        attack_names=list(attacks),
        num_classes=num_classes,
        image_shape=tuple(images.shape[1:]),
        source_index=rows.repeat(len(attacks))[order],
        success=torch.cat(success)[order].cpu(),
    )


def _dictionary_paths(stem: str | Path) -> tuple[Path, Path]:
    stem = Path(stem).with_suffix("") if Path(stem).suffix in (".safetensors", ".json") else Path(stem)
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_dictionary(stem: str | Path, dic: AttackDictionary, **manifest) -> dict:
    """`<stem>.safetensors` (D, classes, attack_types, ...) + `<stem>.json` manifest with its sha256, both
    written atomically as checkpoint.save_model does; extra keyword arguments go into the manifest."""
    weights, manifest_path = _dictionary_paths(stem)
    tensors = {
        k: v.detach().cpu().contiguous()
        for k, v in (
            ("D", dic.D),
            ("classes", dic.classes),
            ("attack_types", dic.attack_types),
            ("source_index", dic.source_index),
            ("success", dic.success),
        )
        if v is not None
    }
    data = safetensors_save(tensors, metadata={"kind": "attack-dictionary"})
    atomic_write_bytes(weights, data)
    full = {
        "kind": "attack-dictionary",
        "weights_file": weights.name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "attack_names": dic.attack_names,
        "num_classes": dic.num_classes,
        "image_shape": list(dic.image_shape) if dic.image_shape else None,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        **manifest,
    }
    atomic_write_json(manifest_path, full)
    return full


def load_dictionary(stem: str | Path) -> tuple[AttackDictionary, dict]:
    """Load a saved dictionary after checking the sha256 recorded in its manifest (CheckpointError if not)."""
    weights, _ = _dictionary_paths(stem)
    manifest = read_manifest(weights)
    if manifest.get("kind") != "attack-dictionary":
        raise CheckpointError(f"{stem}: holds a {manifest.get('kind')!r}, expected an 'attack-dictionary'")
    if not weights.exists() or sha256_file(weights) != manifest.get("sha256"):
        raise CheckpointError(f"{weights}: missing, or its sha256 does not match the manifest; altered or truncated")
    t = load_file(str(weights))
    shape = manifest.get("image_shape")
    return AttackDictionary(
        D=t["D"],
        classes=t["classes"],
        attack_types=t["attack_types"],
        attack_names=list(manifest["attack_names"]),
        num_classes=int(manifest["num_classes"]),
        image_shape=tuple(shape) if shape else None,
        source_index=t.get("source_index"),
        success=t.get("success"),
    ), manifest


# ---------------------------------------------------------------- block sparsity (ℓ1/ℓ2 group norm)


def _ids_of(blocks: Sequence[torch.Tensor], k: int) -> torch.Tensor:
    """The block of every column: CPU metadata, moved to the coefficients' device where it indexes them."""
    ids = torch.full((k,), -1, dtype=torch.int64)  # CPU: see above
    for b, idx in enumerate(blocks):
        ids[torch.as_tensor(idx, dtype=torch.int64).cpu()] = b  # CPU: see above
    if (ids < 0).any():
        raise ValueError("every column must belong to a block")
    return ids


def _norms(c: torch.Tensor, ids: torch.Tensor, nb: int) -> torch.Tensor:
    """(N, B) ||c_b||₂ of every block."""
    return c.new_zeros(c.shape[0], nb).index_add_(1, ids.to(c.device), c * c).sqrt()


def _soft(c: torch.Tensor, ids: torch.Tensor, nb: int, tau: torch.Tensor) -> torch.Tensor:
    scale = (1 - tau / _norms(c, ids, nb).clamp_min(1e-30)).clamp_min(0)  # a zero block stays zero
    return c * scale[:, ids.to(c.device)]


def block_norms(c: torch.Tensor, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, B): ||c_b||₂ for every example (row of c) and block."""
    return _norms(c, _ids_of(blocks, c.shape[1]), len(blocks))


def group_norm(c: torch.Tensor, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,): h(c) = Σ_b ||c_b||₂, the block-sparsity regulariser of RED eq. 2 (Thaker et al. eq. 1)."""
    return block_norms(c, blocks).sum(1)


def block_soft_threshold(c: torch.Tensor, blocks: Sequence[torch.Tensor], tau) -> torch.Tensor:
    """prox_{τh}(c) row by row: c_b ← (1 − τ_b / ||c_b||₂)₊ c_b. τ is a scalar, (N,) or (N, B)."""
    tau = torch.as_tensor(tau, dtype=c.dtype, device=c.device)
    tau = (tau[:, None] if tau.ndim == 1 else tau).expand(c.shape[0], len(blocks))
    return _soft(c, _ids_of(blocks, c.shape[1]), len(blocks), tau)


def lambda_max(D: torch.Tensor, residual: torch.Tensor, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) max_b ||D_bᵀ r||₂: the smallest λ with c = 0 optimal for min_c ½||r − Dc||² + λh(c).

    0 ∈ −Dᵀr + λ ∂h(0) and ∂h(0) = {g : ||g_b|| ≤ 1 ∀b} (App. B.2, after Thaker et al.).
    """
    return block_norms(residual.flatten(1) @ D.to(residual), blocks).amax(1)


# ---------------------------------------------------------------- Algorithm 1


@dataclass
class REDResult:
    z: torch.Tensor | None  # (N, d) final latent; None for SBSC
    c: torch.Tensor  # (N, k) attack coefficients c_a
    signal: torch.Tensor  # (N, C, H, W) clean-signal estimate: G(z), or D_s c_s for SBSC
    lam: torch.Tensor  # (N,) λ used for the attack blocks
    loss: torch.Tensor  # (N,) f = ||x' − signal − D c||² (RED eq. 5)
    objective: torch.Tensor  # (N,) ½ f + λ h(c), what the algorithm minimises
    block_norms: torch.Tensor  # (N, I, J) ||c_ij||₂
    block_residuals: torch.Tensor  # (N, I, J) ||x' − signal − D_ij c_ij||₂
    attack_type: torch.Tensor  # (N,) ĵ = argmin_j min_i block residual (BSD-GAN-AD / SBSAD)
    signal_class: torch.Tensor | None = None  # (N,) f(G(z)).argmax (BSD-GAN) or argmax_i ||c_s,i|| (SBSC)
    trace: torch.Tensor | None = None  # (N, steps + 1) objective at (z^k, c^k), k = 0..steps
    z_iterates: torch.Tensor | None = None  # (steps + 1, N, d)
    c_iterates: torch.Tensor | None = None  # (steps + 1, N, k)
    c_signal: torch.Tensor | None = None  # (N, k_s) SBSC signal coefficients
    extra: dict = field(default_factory=dict)


class _Latent:
    """z and its gradient step through G (Algorithm 1): z ← z − η Jᵀ(G(z) + Dc − x'), per-example η."""

    def __init__(self, G: nn.Module, z0: torch.Tensor, lr: torch.Tensor, fixed: bool):
        self.G, self.z, self.lr, self.fixed = G, z0.detach().clone(), lr, fixed

    def forward(self) -> torch.Tensor:
        self._z = self.z.detach().requires_grad_(not self.fixed)
        with torch.set_grad_enabled(not self.fixed):
            self._g = self.G(self._z).flatten(1)
        return self._g.detach()

    def step(self, r: torch.Tensor) -> None:
        """r = x' − G(z) − Dc: ∇_z ½||r||² = −Jᵀr is one vector-Jacobian product of the forward pass."""
        (grad,) = torch.autograd.grad(self._g, self._z, grad_outputs=-r)
        self.z = (self.z - self.lr[:, None] * grad).detach()


def jacobian_norm2(G: nn.Module, z: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """(N,) ||J_G(z)||₂² per example by power iteration on JᵀJ (the Lipschitz constant of ∇_z ½||x − G(z)||²
    without G's curvature). Start (1, ..., 1)/√d for every example: deterministic and batch-independent."""
    v = torch.ones_like(z) / math.sqrt(z.shape[1])
    s = torch.zeros(len(z), dtype=z.dtype, device=z.device)
    zz = z.detach().requires_grad_(True)
    with torch.enable_grad():
        g = G(zz).flatten(1)
        u = torch.zeros_like(g, requires_grad=True)
        (vjp,) = torch.autograd.grad(g, zz, u, create_graph=True)  # linear in u: Jᵀu
        for _ in range(iters):
            (jv,) = torch.autograd.grad(vjp, u, v, retain_graph=True)  # J v
            (jtjv,) = torch.autograd.grad(g, zz, jv, retain_graph=True)  # Jᵀ J v
            s = jtjv.norm(dim=1)
            v = jtjv / s.clamp_min(1e-30)[:, None]
    return s.detach()


def _frozen(G: nn.Module):
    """Eval mode (batch norm must not mix examples) and no parameter gradients; returns a restore callback."""
    was, flags = G.training, [p.requires_grad for p in G.parameters()]
    G.eval().requires_grad_(False)

    def restore():
        for p, f in zip(G.parameters(), flags, strict=True):
            p.requires_grad_(f)
        G.train(was)

    return restore


def _prox_gradient(
    x, D, ids, nb, weights, L, steps, nesterov, latent=None, jacobi=False, keep_trace=False, keep_iterates=False
):
    """The loop of Algorithm 1. c step: (M)FISTA on c for the current s = x' − G(z^k); z step: one gradient
    step with r = s − D c^{k+1} (Gauss–Seidel; `jacobi` uses c^k as printed in Algorithm 1).

    Nesterov is the monotone FISTA of Beck & Teboulle (2009): the extrapolated prox point u is accepted
    only if it does not raise the objective, so with z fixed the objective never increases.
    """
    n_ex, k = x.shape[0], D.shape[1]
    c, Dc, t, s = x.new_zeros(n_ex, k), torch.zeros_like(x), 1.0, x
    y, Dy, tau = c, Dc, weights / L
    trace, zs, cs = [], [], []

    def objective(Dv, v):
        return 0.5 * ((s - Dv) ** 2).sum(1) + (weights * _norms(v, ids, nb)).sum(1)

    for it in range(steps + 1):
        if latent is not None and (it == 0 or not latent.fixed):
            s = x - latent.forward()
        f_c = objective(Dc, c)
        if keep_trace:
            trace.append(f_c)
        if keep_iterates:
            zs.append(latent.z.clone() if latent is not None else x.new_zeros(n_ex, 0))
            cs.append(c.clone())
        if it == steps:
            break
        r_old = s - Dc
        u = _soft(y - (Dy - s) @ D / L, ids, nb, tau)
        Du = u @ D.T
        if nesterov:
            keep = (objective(Du, u) <= f_c)[:, None]
            c_new, Dc_new = torch.where(keep, u, c), torch.where(keep, Du, Dc)
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            a, b = t / t_new, (t - 1) / t_new
            y, Dy = c_new + a * (u - c_new) + b * (c_new - c), Dc_new + a * (Du - Dc_new) + b * (Dc_new - Dc)
            c, Dc, t = c_new, Dc_new, t_new
        else:
            c = y = u
            Dc = Dy = Du
        if latent is not None and not latent.fixed:
            latent.step(r_old if jacobi else s - Dc)
    iterates = (torch.stack(zs), torch.stack(cs)) if keep_iterates else (None, None)
    return c, s, (torch.stack(trace, 1) if keep_trace else None), *iterates


def classify_attack(residual: torch.Tensor, c: torch.Tensor, dic: AttackDictionary) -> tuple[torch.Tensor, ...]:
    """BSD-GAN-AD: ĵ = argmin_j min_i ||x' − G(z) − D_ij c_ij||₂ (Sec. 5.2). residual = x' − G(z), (N, n).

    Returns (ĵ (N,), block residuals (N, I, J))."""
    D = dic.D.to(residual)
    res = torch.stack([(residual - c[:, idx] @ D[:, idx].T).norm(dim=1) for idx in dic.blocks()], 1)
    res = res.reshape(-1, dic.num_classes, dic.num_types)
    return res.amin(1).argmin(1), res


def initial_latents(
    G: nn.Module,
    x: torch.Tensor,
    ids,
    init="defensegan",
    seed: int = 0,
    *,
    restarts: int = 10,
    steps: int = 100,
    lr: float = 0.05,
) -> torch.Tensor:
    """z0 for Algorithm 1: Defense-GAN (best of `restarts` × `steps` Adam projections, App. B.2), or an
    InvGAN inverter module: z0 = I(x) followed by `steps` projection steps (0 = the encoder alone)."""
    if isinstance(init, nn.Module):
        return project(G, x, ids=ids, init=init, steps=steps, lr=lr, restarts=1, seed=seed).z
    if init != "defensegan":
        raise ValueError(f"init must be 'defensegan' or an inverter module, got {init!r}")
    return project(G, x, ids=ids, init="prior", steps=steps, lr=lr, restarts=restarts, seed=seed).z


def red_solve(
    G: nn.Module,
    x: torch.Tensor,
    *,
    D: AttackDictionary,
    z0: torch.Tensor,
    lam_multiplier: float = 0.35,
    lam: torch.Tensor | None = None,
    steps: int = 500,
    z_lr: float | None = None,
    nesterov: bool = True,
    jacobi: bool = False,
    fixed_z: bool = False,
    classifier: nn.Module | None = None,
    keep_trace: bool = False,
    keep_iterates: bool = False,
) -> REDResult:
    """Algorithm 1 on a batch x' (N, C, H, W): min_{z,c} ½||x' − G(z) − Dc||² + λ Σ_b ||c_b||₂ from (z0, 0).

    λ = lam_multiplier · λ_max(x' − G(z0)) per example (App. B.2: 0.35), unless `lam` (N,) is given.
    c step 1/||DᵀD||₂ with monotone Nesterov acceleration. z step: `z_lr`, or by default 1/||J_G(z0)||₂²
    per example — the z-block analogue of the c step (one over the Gauss–Newton Lipschitz constant at z0),
    which needs no tuning across generators whose Jacobians differ by 10× (digits vs MNIST).
    `fixed_z` turns the z step off: pure proximal gradient on c, the objective then never increases.
    """
    restore = _frozen(G)
    try:
        x_flat = x.detach().flatten(1)
        Dm, ids, nb = D.D.to(x), D.block_ids, D.num_blocks
        z0 = z0.detach().to(x)
        if lam is None:
            with torch.no_grad():
                lam = lam_multiplier * lambda_max(Dm, x_flat - G(z0).flatten(1), D.blocks())
        lam = torch.as_tensor(lam, dtype=x.dtype, device=x.device).expand(len(x))
        if fixed_z or z_lr is not None:
            lr = torch.as_tensor(0.0 if fixed_z else z_lr, dtype=x.dtype, device=x.device).expand(len(x))
        else:
            lr = 1 / jacobian_norm2(G, z0)
        latent = _Latent(G, z0, lr, fixed_z)
        c, s, trace, zs, cs = _prox_gradient(
            x_flat,
            Dm,
            ids,
            nb,
            lam[:, None].expand(-1, nb),
            D.lipschitz,
            steps,
            nesterov,
            latent,
            jacobi,
            keep_trace,
            keep_iterates,
        )
        with torch.no_grad():
            attack_type, block_res = classify_attack(s, c, D)
            norms = _norms(c, ids, nb)
            r = s - c @ Dm.T
            signal = (x_flat - s).reshape(x.shape)
            signal_class = classifier(signal.float()).argmax(1) if classifier is not None else None
        return REDResult(
            z=latent.z,
            c=c,
            signal=signal,
            lam=lam,
            loss=(r * r).sum(1),
            objective=0.5 * (r * r).sum(1) + lam * norms.sum(1),
            block_norms=norms.reshape(-1, D.num_classes, D.num_types),
            block_residuals=block_res,
            attack_type=attack_type,
            signal_class=signal_class,
            trace=trace,
            z_iterates=zs,
            c_iterates=cs,
            extra={"z_lr": lr},
        )
    finally:
        restore()


# ---------------------------------------------------------------- SBSC / SBSAD baseline (Thaker et al. 2022)


def signal_dictionary(
    images: torch.Tensor, labels: torch.Tensor, per_class: int, seed: int = 0, num_classes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """D_s (n × k_s): `per_class` flattened training images per class as columns, and their classes."""
    rows = select_per_class(labels, per_class, seed, num_classes)
    return images[rows].flatten(1).T.contiguous().float(), torch.as_tensor(labels)[rows]  # labels' device (or CPU)


def sbsc_solve(
    x: torch.Tensor,
    *,
    Ds: torch.Tensor,
    s_classes: torch.Tensor,
    D: AttackDictionary,
    lam_multiplier: float = 0.35,
    steps: int = 500,
    nesterov: bool = True,
    keep_trace: bool = False,
) -> REDResult:
    """SBSC / SBSAD (Thaker et al. eq. 1 = RED eq. 1): x' ≈ D_s c_s + D_a c_a, both block-sparse, solved by
    the same proximal-gradient loop on [c_s, c_a] (blocks: classes for c_s, (i, j) for c_a).

    λ_s, λ_a = lam_multiplier · λ_max of the signal and attack blocks at c = 0. Signal class
    argmax_i ||c_s,i||₂; attack type as BSD-GAN-AD with x' − D_s c_s in place of x' − G(z).
    """
    x_flat, I = x.detach().flatten(1), D.num_classes
    Ds, Da = Ds.to(x), D.D.to(x)
    M = torch.cat([Ds, Da], 1)
    ids = torch.cat([torch.as_tensor(s_classes, dtype=torch.int64).cpu(), I + D.block_ids])  # CPU: as `_ids_of`
    nb = I + D.num_blocks
    lam_all = _norms(x_flat @ M, ids, nb)
    lam_s, lam_a = lam_multiplier * lam_all[:, :I].amax(1), lam_multiplier * lam_all[:, I:].amax(1)
    weights = torch.cat([lam_s[:, None].expand(-1, I), lam_a[:, None].expand(-1, D.num_blocks)], 1)
    c, _, trace, _, _ = _prox_gradient(
        x_flat, M, ids, nb, weights, spectral_norm2(M), steps, nesterov, keep_trace=keep_trace
    )
    ks = Ds.shape[1]
    cs, ca = c[:, :ks], c[:, ks:]
    signal = cs @ Ds.T
    attack_type, block_res = classify_attack(x_flat - signal, ca, D)
    norms = _norms(c, ids, nb)
    r = x_flat - signal - ca @ Da.T
    return REDResult(
        z=None,
        c=ca,
        signal=signal.reshape(x.shape),
        lam=lam_a,
        loss=(r * r).sum(1),
        objective=0.5 * (r * r).sum(1) + (weights * norms).sum(1),
        block_norms=norms[:, I:].reshape(-1, I, D.num_types),
        block_residuals=block_res,
        attack_type=attack_type,
        signal_class=norms[:, :I].argmax(1),
        trace=trace,
        c_signal=cs,
        extra={"lam_signal": lam_s},
    )
