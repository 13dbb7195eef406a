"""Adaptive attacks that go through a projection defense, and the black-box ones.

Each end-to-end attack is a *gradient rule* for the defended model x ↦ f(purify(x)) plus an attack
loop from `attacks` (PGD by default, or `SignCW`, the sign-step CW loop of Chen et al.):

- BPDA (Athalye et al. 2018): forward purify, backward identity through the projection.
- Reparameterization, RP (InvGAN Sec. 3.4): the gradient of f(G(I(x))).
- Unrolled (Chen, Xie & Zhu, Thm. 1): solve z* with the defense, then unroll T' gradient steps of
  ||G(z) - x||² from z* with the graph kept, and back-propagate through them.
- NES (Ilyas et al. 2018): the vector-Jacobian product of the defended logits estimated from n
  antithetic Gaussian queries; a score-based black-box attack.
- Substitute (Papernot et al. 2017, InvGAN Table 4): train a substitute on the defense's labels with
  Jacobian augmentation, then transfer FGSM.
Every rule is an autograd function, so any gradient attack runs through it unchanged. Every attack,
the substitute included, is called as `attack(target, x, y, ids=ids) -> AttackResult`.
"""

from __future__ import annotations

import abc
import copy
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from invgan_core.attacks import (
    FGSM,
    Attack,
    Defended,
    GradientDescent,
    LinfPGD,
    Logits,
    Norm,
    Target,
    _rows,
    as_defense,
    margin,
    per_example_normal,
    predict,
)
from invgan_core.inversion import per_example_mse, project


def _require(defense: object, *attrs: str, attack: str) -> list[Any]:
    """The defense's attributes `attrs` (a generator, an inverter, ...); TypeError naming those it lacks."""
    values = [getattr(defense, a, None) for a in attrs]
    missing = [a for a, v in zip(attrs, values, strict=True) if v is None]
    if missing:
        raise TypeError(f"{attack} needs a defense with {', '.join(missing)}; got {type(defense).__name__}")
    return values


# ---------------------------------------------------------------- gradient rules


class _IdentityBackward(torch.autograd.Function):
    """BPDA: the value of the projection, the gradient of the identity."""

    @staticmethod
    def forward(ctx, x, x_proj):
        return x_proj.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class WarmProjection:
    """The attacker's own projections, each started from the latent the previous one found.

    The first call runs the defense's cold projection (R restarts x L steps, or I(x) + T steps); every
    later call runs `steps` steps of the defense's own optimizer from the previous call's z, one
    restart. Successive attack iterates differ by one step, so z_{k-1} is already near the optimum for
    x_k and a short run re-converges. Only the attacker's gradient path uses it: the success check and
    the reported rows use the real, cold defense. A defense without a generator is called as it is.
    """

    def __init__(self, defense, steps: int):
        self.defense, self.steps, self.z = defense, steps, None

    def __call__(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        d = self.defense
        if self.z is None or len(self.z) != len(x) or getattr(d, "G", None) is None:
            p = d.purify(x, ids)
        else:
            p = project(
                d.G,
                x,
                ids=ids,
                init=self.z,
                steps=self.steps,
                lr=d.lr,
                restarts=1,
                optimizer=d.optimizer,
                constraint=getattr(d, "constraint", None),
                seed=d.seed,
            )
        self.z = None if p.z is None else p.z.detach()
        return p.x


EOT_ID_STRIDE = 1 << 40  # copy k of example id i projects as id i + k * stride: its own restarts


def _check_eot(eot: int, warm_start: bool) -> None:
    """Refuse an EOT count no attack can run, or EOT over a warm projection (one restart: nothing to average)."""
    if not (isinstance(eot, int) and not isinstance(eot, bool) and eot >= 1):
        raise ValueError(f"eot={eot!r}: give a whole number of draws >= 1")
    if eot > 1 and warm_start:
        raise ValueError("eot > 1 with warm_start: a warm projection has one restart, nothing to average over")


def bpda_logits(
    defense: Defended, ids: Optional[torch.Tensor], *, warm_steps: int | None = None, eot: int = 1
) -> Logits:
    """f(purify(x)) with the identity as the projection's backward; `warm_steps` warm-starts the
    attacker's projections (`WarmProjection`).

    `eot` > 1: expectation over transformation (Athalye, Carlini & Wagner 2018) for a defense with random
    restarts. The K copies of the batch go through one projection, copy k with ids shifted by k *
    EOT_ID_STRIDE (its own restarts; copy 0 is the defender's draw when the draws are keyed on the id), and
    the logits are log E_k[softmax]: the draws' mean class probabilities. The prediction is that mean's
    argmax, and the cross-entropy's gradient is the average of the draws' gradients, each weighted by the
    probability its draw gives the label (tests/core/test_adaptive.py checks it)."""
    _require(defense, "classifier", attack="BPDA")
    _check_eot(eot, warm_start=warm_steps is not None)
    purify = (lambda x, ids: defense.purify(x, ids).x) if warm_steps is None else WarmProjection(defense, warm_steps)

    def f(x):
        if eot == 1:
            with torch.no_grad():
                x_proj = purify(x.detach(), ids)
            return defense.classifier(_IdentityBackward.apply(x, x_proj))
        n = len(x)
        base = torch.arange(n, device=x.device) if ids is None else torch.as_tensor(ids, device=x.device)
        copies = torch.cat([base + k * EOT_ID_STRIDE for k in range(eot)])
        xs = x.repeat(eot, *([1] * (x.dim() - 1)))
        with torch.no_grad():
            x_proj = purify(xs.detach(), copies)
        logp = torch.log_softmax(defense.classifier(_IdentityBackward.apply(xs, x_proj)), dim=1)
        return torch.logsumexp(logp.view(eot, n, -1), dim=0) - math.log(eot)

    return f


def rp_logits(defense: Defended, ids: Optional[torch.Tensor]) -> Logits:
    """f(G(I(x))): differentiable end to end (InvGAN's reparameterization attack)."""
    G, inverter, classifier = _require(defense, "G", "inverter", "classifier", attack="Reparameterization")
    return lambda x: classifier(G(inverter(x)))


def unrolled_logits(defense: Defended, ids: Optional[torch.Tensor], *, steps: int, lr: float) -> Logits:
    """f(G(z_T')) with z_0 = z* from the defense and z_{t+1} = z_t - lr ∇_z ||G(z_t) - x||²/n, graph kept."""
    G, _ = _require(defense, "G", "classifier", attack="Unrolled")

    def f(x):
        with torch.no_grad():
            z = defense.purify(x.detach(), ids).z
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            for _ in range(steps):
                (g,) = torch.autograd.grad(per_example_mse(G(z), x).sum(), z, create_graph=True)
                z = z - lr * g
            return defense.classifier(G(z))

    return f


class _NESBackward(torch.autograd.Function):
    """Forward: the defended logits. Backward: NES estimate of the vector-Jacobian product,
    v ≈ 1/(nσ) Σ_i ⟨grad_out, (L(x + σu_i) - L(x - σu_i))/2⟩ u_i over n/2 antithetic pairs."""

    @staticmethod
    def forward(ctx, x, logits_fn, samples, sigma, seed, ids, counter):
        ctx.logits_fn, ctx.samples, ctx.sigma, ctx.seed, ctx.ids, ctx.counter = (
            logits_fn,
            samples,
            sigma,
            seed,
            ids,
            counter,
        )
        ctx.save_for_backward(x)
        return logits_fn(x.detach(), ids)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        n, half, dim = len(x), ctx.samples // 2, x[0].numel()
        counter = ctx.counter
        # per (example id, call, pair) directions: an example's estimate does not depend on its batch
        keys = ctx.ids.reshape(-1, 1) * 1_000_003 + counter[0] * 1009 + torch.arange(half, device=x.device)
        u = per_example_normal(ctx.seed, keys.reshape(-1), dim).reshape(n, half, *x.shape[1:]).to(x.device)
        counter[0] += 1
        probes = torch.cat([x[:, None] + ctx.sigma * u, x[:, None] - ctx.sigma * u], 1).flatten(0, 1)
        probe_ids = keys.repeat(1, 2).reshape(-1)  # the defense's own randomness keyed per probe
        with torch.no_grad():
            out = ctx.logits_fn(probes.clamp(0, 1), probe_ids).reshape(n, 2 * half, -1)
        score = ((out[:, :half] - out[:, half:]) / 2 * grad_out[:, None]).sum(-1)  # (N, half)
        vjp = (_rows(score.flatten(), u.flatten(0, 1).ndim) * u.flatten(0, 1)).reshape(n, half, *x.shape[1:]).sum(1)
        return vjp / (half * ctx.sigma), None, None, None, None, None, None


def nes_logits(target: Target, ids: torch.Tensor, *, samples: int, sigma: float, seed: int, counter: list) -> Logits:
    """Defended logits whose gradient is estimated from queries only (score-based black box)."""

    def query(x, probe_ids):
        if isinstance(target, Defended):
            return target.classifier(target.purify(x, probe_ids).x)
        return target(x)

    return lambda x: _NESBackward.apply(x, query, samples, sigma, seed, ids, counter)


# ---------------------------------------------------------------- the attack loop of Chen et al.


class SignCW(Attack):
    """CW-style sign steps (Chen et al. supplement D, eqs. 20-21): minimise ||x' - x||² + λ·F(x') with
    x' ← clip(x' - η_t · sign ∇), η_t = eta · t/T as the supplement states, λ by a `binary_search_steps`
    search per example; F = max(Z_y - max_{j≠y} Z_j, -κ). Keeps the smallest-ℓ2 adversarial found."""

    norm = Norm.L2

    def __init__(
        self,
        *,
        steps: int = 100,
        binary_search_steps: int = 5,
        initial_const: float = 1.0,
        eta: float = 0.04,
        confidence: float = 0.0,
    ):
        self.steps, self.binary_search_steps, self.initial_const = steps, binary_search_steps, initial_const
        self.eta, self.confidence = eta, confidence

    def run(self, f, x, y, ids):
        n = len(x)
        best, best_l2 = x.clone(), torch.full((n,), math.inf, device=x.device)
        const = torch.full((n,), self.initial_const, device=x.device)
        lower, upper = torch.zeros_like(const), torch.full_like(const, math.inf)
        for _ in range(self.binary_search_steps):
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            xp = x.clone()
            for t in range(1, self.steps + 1):
                xv = xp.detach().requires_grad_(True)
                with torch.enable_grad():
                    m = margin(f(xv), y)
                    loss = ((xv - x) ** 2).flatten(1).sum(1) + const * m.clamp_min(-self.confidence)
                    (grad,) = torch.autograd.grad(loss.sum(), xv)
                l2 = (xv.detach() - x).flatten(1).norm(dim=1)
                better = (m.detach() < 0) & (l2 < best_l2)
                best = torch.where(_rows(better, x.ndim), xv.detach(), best)
                best_l2, found = torch.where(better, l2, best_l2), found | (m.detach() < 0)
                xp = (xp - self.eta * t / self.steps * grad.sign()).clamp(0, 1)
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(upper.isinf(), const * 10, (lower + upper) / 2)
        queries = torch.full((n,), self.binary_search_steps * self.steps, dtype=torch.int64, device=x.device)
        return best, queries


# ---------------------------------------------------------------- end-to-end attacks


class _Bound:
    """An end-to-end attack's logits for a batch of example ids; `restrict(rows)` makes the same logits for
    the examples `rows` of that batch (the attack loop drops the examples it has already fooled)."""

    def __init__(self, make, ids: torch.Tensor):
        self.make, self.ids, self.f = make, ids, make(ids)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.f(x)

    def restrict(self, rows: torch.Tensor) -> "_Bound":
        return _Bound(self.make, self.ids[rows])


class ThroughDefense(Attack):
    """Run `attack`'s loop against a defense, following the gradient rule `rule(defense, ids)`."""

    def __init__(self, attack: Attack | None = None):
        self.attack = attack or LinfPGD(eps=0.3, steps=40)
        self.norm = self.attack.norm

    @abc.abstractmethod
    def rule(self, defense: Defended, ids: torch.Tensor) -> Logits:
        """The defended logits x ↦ f(purify(x)) for the examples `ids`, with the attack's gradient rule."""

    def differentiable(self, target: Target, ids: torch.Tensor) -> Logits:
        defense = as_defense(target, type(self).__name__)
        return _Bound(lambda sub: self.rule(defense, sub), ids)

    @property
    def exact_forward(self) -> bool:
        """Is the forward pass of `rule` the defense's own prediction? Then an iterate it misclassifies is an
        adversarial example of the defense, and the loop keeps each example's first (stop_at_success)."""
        return True

    def run(self, f, x, y, ids):
        if self.exact_forward and isinstance(self.attack, GradientDescent):
            return self.attack.run(f, x, y, ids, stop_at_success=True)
        return self.attack.run(f, x, y, ids)


class BPDA(ThroughDefense):
    """Backward-pass differentiable approximation through the projection (identity backward).

    `warm_start`: the attacker's projection at step k starts from the latent of step k-1 and runs
    `warm_steps` steps (one restart) instead of the defense's full budget; the first step and the
    success check stay cold (measured in benchmarks/fig_eval.py: cost and accuracy against cold).

    `eot`: average the gradient over that many draws of the defense's restarts (`bpda_logits`); the success
    check is then the K-draw average's prediction, and a row's prediction one fresh draw of the defense."""

    def __init__(self, *, warm_start: bool = False, warm_steps: int = 20, eot: int = 1, attack: Attack | None = None):
        super().__init__(attack)
        if not (isinstance(warm_steps, int) and warm_steps >= 1):
            raise ValueError(f"warm_steps={warm_steps!r}: give a whole number of projection steps >= 1")
        _check_eot(eot, bool(warm_start))
        self.warm_start, self.warm_steps, self.eot = bool(warm_start), warm_steps, eot

    @property
    def exact_forward(self) -> bool:
        return not self.warm_start  # a warm projection is the attacker's approximation, not the defense

    def rule(self, defense, ids):
        return bpda_logits(defense, ids, warm_steps=self.warm_steps if self.warm_start else None, eot=self.eot)


class Reparameterization(ThroughDefense):
    """RP: attack f(G(I(x))) (InvGAN Sec. 3.4); needs a defense with an inverter."""

    @property
    def exact_forward(self) -> bool:
        return False  # f(G(I(x))) is the T = 0 path, not the defense's prediction

    def rule(self, defense, ids):
        return rp_logits(defense, ids)


class Unrolled(ThroughDefense):
    """Chen et al.'s attack: back-propagate through T' unrolled projection steps started at z*.

    Theorem 1 needs lr·||H|| ≤ 1 for the Hessian H of the per-pixel MSE in z; the default suits the
    shipped generators (check with `tests/core/test_adaptive.py`)."""

    @property
    def exact_forward(self) -> bool:
        return False  # f(G(z_T')) after T' more steps from z*, close to but not the defense's f(G(z*))

    def __init__(self, *, unroll_steps: int = 20, unroll_lr: float = 1.0, attack: Attack | None = None):
        super().__init__(attack or SignCW())
        self.unroll_steps, self.unroll_lr = unroll_steps, unroll_lr

    def rule(self, defense, ids):
        return unrolled_logits(defense, ids, steps=self.unroll_steps, lr=self.unroll_lr)


class NES(ThroughDefense):
    """Score-based black box: NES gradients (n = 50, σ = 0.5 against Defense-GAN, Chen et al. D).

    queries = evaluations of the defended model: one at each iterate, plus `samples` probes per gradient."""

    def __init__(self, *, samples: int = 50, sigma: float = 0.5, seed: int = 0, attack: Attack | None = None):
        super().__init__(attack)
        if samples < 2 or samples % 2:
            raise ValueError(f"NES needs an even number of samples (antithetic pairs), got {samples}")
        self.samples, self.sigma, self.seed = samples, sigma, seed

    def rule(self, defense: Target, ids: torch.Tensor, counter: list | None = None) -> Logits:
        """NES logits of a defense or, as a black box, of a bare classifier."""
        counter = [0] if counter is None else counter
        return nes_logits(defense, ids, samples=self.samples, sigma=self.sigma, seed=self.seed, counter=counter)

    def differentiable(self, target: Target, ids: torch.Tensor) -> Logits:
        counter = [0]  # one count of gradient estimates for the batch and its restrictions: directions never repeat
        return _Bound(lambda sub: self.rule(target, sub, counter), ids)

    def run(self, f, x, y, ids):
        """queries: every evaluation queries the defense at x once, every gradient adds `samples` probes."""
        x_adv, evaluations = super().run(f, x, y, ids)  # the forward is the defense's: first success, as BPDA
        if isinstance(self.attack, GradientDescent):  # evaluations include one final check per finished restart
            gradients = evaluations - evaluations // (self.attack.steps + 1)
        else:
            gradients = evaluations
        return x_adv, evaluations + gradients * self.samples


# ---------------------------------------------------------------- substitute black box


class Substitute(Attack):
    """Papernot et al. (2017): label a seed set with the target's predictions, train a substitute,
    grow the set by Jacobian augmentation x + λ·sign(∂F_sub[ŷ]/∂x) (their eq. 4), repeat; then FGSM on
    the substitute, transferred. InvGAN Table 4 setting: 150 seeds, 6 rounds, λ = 0.1, FGSM ε = 0.3.

    Called like every attack, `attack(target, x, y, ids=ids)`: FGSM on `model`, the trained substitute,
    judged by `target`; queries = the oracle labels its training took (`queries_spent`). An evaluation
    trains once on the driver (`train`) and binds every shard's attack to the result (`bind`). Unbound
    (`model` None), each call trains a fresh substitute on `target`'s labels first, from `substitute` (a
    fresh model) and `seed_images` (both may be set after construction; `seeds` says how many)."""

    norm = Norm.LINF

    def __init__(
        self,
        *,
        substitute: nn.Module | None = None,
        seed_images: torch.Tensor | None = None,
        seeds: int = 150,
        rounds: int = 6,
        lam: float = 0.1,
        epochs: int = 10,
        lr: float = 1e-3,
        eps: float = 0.3,
        seed: int = 0,
    ):
        self.substitute, self.seed_images, self.rounds, self.lam = substitute, seed_images, rounds, lam
        self.seeds = len(seed_images) if seed_images is not None else seeds
        self.epochs, self.lr, self.eps, self.seed = epochs, lr, eps, seed
        self.model: nn.Module | None = None  # the trained substitute the attack transfers from (`bind`)
        self.queries_spent = 0  # oracle labels its training took

    def oracle_queries(self) -> int:
        """Labels the training asks of the target: the seed set doubles every round but the last."""
        return self.seeds * (2**self.rounds - 1)

    def bind(self, model: nn.Module, queries: int) -> Substitute:
        """A copy of this attack that transfers from `model`, a substitute trained with `queries` oracle labels."""
        bound = copy.copy(self)
        bound.model, bound.queries_spent = model, int(queries)
        return bound

    def train(self, target: Target, device=None, *, batch: int = 512) -> nn.Module:
        """A fresh copy of `substitute` trained on the target's labels (Papernot et al., Algorithm 1); sets
        `self.queries_spent`."""
        if self.substitute is None or self.seed_images is None:
            raise ValueError(
                "Substitute: nothing to transfer from. Bind a trained substitute (attack.bind(model, queries)) "
                "or give `substitute` (a fresh model) and `seed_images` to train one against the target"
            )
        g = torch.Generator().manual_seed(self.seed)
        sub = copy.deepcopy(self.substitute).to(device).requires_grad_(True)
        data, queries = self.seed_images.to(device).clone(), 0
        opt = torch.optim.Adam(sub.parameters(), lr=self.lr)
        for r in range(self.rounds):
            query_ids = torch.arange(len(data), device=device) + 10_000_000 * (r + 1)
            with torch.no_grad():  # the oracle in chunks: a projection defense batches restarts x images
                labels = torch.cat(
                    [predict(target, d, i) for d, i in zip(data.split(batch), query_ids.split(batch), strict=True)]
                )
            queries += len(data)
            sub.train()
            for _ in range(self.epochs):
                for idx in torch.randperm(len(data), generator=g).to(device).split(64):
                    opt.zero_grad()
                    F.cross_entropy(sub(data[idx]), labels[idx]).backward()
                    opt.step()
            if r < self.rounds - 1:
                xg = data.clone().requires_grad_(True)
                sub.eval()
                score = sub(xg).gather(1, labels[:, None]).sum()
                (jac,) = torch.autograd.grad(score, xg)
                data = torch.cat([data, (data + self.lam * jac.sign()).clamp(0, 1)])
        self.queries_spent = queries
        return sub.eval().requires_grad_(False)

    def differentiable(self, target: Target, ids: torch.Tensor) -> Logits:
        """The substitute FGSM follows: the bound one, else one trained on `target`'s labels now."""
        return self.model if self.model is not None else self.train(target, ids.device)

    def run(self, f, x, y, ids):
        """FGSM on the substitute f (x + ε·sign ∇_x CE(f(x), y)); every example's queries are the training's."""
        x_adv, _ = FGSM(eps=self.eps).run(f, x, y, ids)
        return x_adv, torch.full((len(x),), self.queries_spent, dtype=torch.int64, device=x.device)
