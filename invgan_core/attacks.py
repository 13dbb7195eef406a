"""Gradient attacks on a classifier or a defense: FGSM, PGD (ℓ∞, ℓ2, sparse ℓ1) and Carlini-Wagner ℓ2.

Every attack has the same call shape (after foolbox 3), its one entry point:

    result = attack(target, x, y, ids=None)      # -> AttackResult(x_adv, success, l2, linf, queries)

`target` is a `Target`: a `Classifier` (an `nn.Module` returning logits) or a `Defended` model (a
defense: `.purify`, `.predict`, `.classifier`). A subclass implements the abstract `run` (its loop on
a logits function) and may override `differentiable` (the function that loop follows). Attacks "fed
to every defense" follow the bare classifier (InvGAN Sec. 4.2), as `logits_fn` does; end-to-end
attacks (BPDA, reparameterization, unrolled) follow the defense itself by overriding `differentiable`.

One base loop (`GradientDescent.run`: gradient of the cross-entropy, step, project) serves every
fixed-budget attack; each norm only supplies `get_random_start`, `normalize` and `project`.
Randomness comes from (seed, example id) through `rng`, so an example's result does not depend on
its batch. Images are float32 NCHW in [0, 1] and stay there.
"""

from __future__ import annotations

import abc
import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence, Union, final, runtime_checkable

import torch
import torch.nn.functional as F

from invgan_core import rng
from invgan_core.defenses import Defense
from invgan_core.inversion import busy_clock

if TYPE_CHECKING:
    import numpy as np

    from invgan_core.defenses import Purified

Logits = Callable[[torch.Tensor], torch.Tensor]
Ids = Union[torch.Tensor, Sequence[int], "np.ndarray"]  # example ids; None in a call means 0..N-1


@runtime_checkable
class Classifier(Protocol):
    """A model an attack can target: images (N, C, H, W) in [0, 1] to logits (N, K), e.g. an nn.Module."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Defended(Protocol):
    """A defense an attack can target (`invgan_core.defenses.Defense`): purify x, classify the purification."""

    @property
    def classifier(self) -> Classifier: ...

    def purify(self, x: torch.Tensor, ids: Any = None) -> Purified: ...

    def predict(self, x: torch.Tensor, ids: Any = None) -> torch.Tensor: ...


Target = Union[Defended, Classifier]  # what an attack attacks: a defense is checked first (it is not callable)


def as_defense(target: Target, attack: str) -> Defended:
    """`target` if it is a defense, else a TypeError saying that `attack` attacks through one."""
    if not isinstance(target, Defended):
        raise TypeError(f"{attack} needs a defense (purify, predict, classifier); got {type(target).__name__}")
    return target


class Norm(float, enum.Enum):
    """The ℓp norm an attack is measured in; the value is p."""

    L1 = 1.0
    L2 = 2.0
    LINF = math.inf

    def of(self, delta: torch.Tensor) -> torch.Tensor:
        """Per-example norm of a batch of perturbations, shape (N,)."""
        return delta.flatten(1).norm(p=self.value, dim=1)


@dataclass
class AttackResult:
    x_adv: torch.Tensor  # (N, C, H, W) in [0, 1]
    success: torch.Tensor  # (N,) bool: the target's logits at x_adv do not pick the label
    l2: torch.Tensor  # (N,) ||x_adv - x||_2
    linf: torch.Tensor  # (N,) ||x_adv - x||_∞
    queries: torch.Tensor  # (N,) int64: gradient evaluations spent per example
    # a defense target's purification of x_adv, made for the success check (None for a classifier target):
    # the evaluation reuses it for that defense's row instead of projecting x_adv a second time
    purified: Optional["Purified"] = None
    purify_seconds: float = 0.0  # wall seconds of that purification (part of the attack's own time)


def logits_fn(target: Target, ids: Optional[torch.Tensor] = None) -> Logits:
    """The differentiable function an attack follows: a defense's classifier, or the classifier itself.

    End-to-end attacks replace the defense branch (`Attack.differentiable`) with `classifier(purify(x, ids).x)`
    and a gradient rule for the projection (BPDA, reparameterization G(I(x)), unrolled steps).
    """
    if isinstance(target, Defended):
        classifier = target.classifier
        return lambda x: classifier(x)  # the papers' "attack the classifier, feed the defense"
    if isinstance(target, Classifier):  # an nn.Module, or any callable returning logits
        return target
    raise TypeError(f"target must be an nn.Module, a defense or a callable returning logits, got {type(target)}")


def restrict(f: Logits, rows: torch.Tensor) -> Logits:
    """f for the examples `rows` of the batch it was made for. An end-to-end attack's logits are bound to
    their examples' ids (a defense keys its randomness by them) and say how to rebind (`restrict`); any
    other f (a model, a classifier) treats examples independently and is used as it is."""
    return f.restrict(rows) if hasattr(f, "restrict") else f


class Loss(str, enum.Enum):
    """What a gradient attack ascends. CE is the papers' (and foolbox's) choice; MARGIN is the CW logit
    margin max_{j≠y} Z_j - Z_y, which does not saturate when a confident classifier's softmax does."""

    CE = "ce"
    MARGIN = "margin"


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Z_y - max_{j≠y} Z_j per example: negative means misclassified."""
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return logits.gather(1, y[:, None]).squeeze(1) - other


@torch.no_grad()
def predict(target: Target, x: torch.Tensor, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The target's labels for x: a defense purifies first (`defense.predict`), a model is argmax."""
    if isinstance(target, Defended):
        return target.predict(x, ids)
    return logits_fn(target, ids)(x).argmax(1)


@torch.no_grad()
def _judge(target: Target, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, Optional[Purified], float]:
    """The target's labels for x; for a defense whose prediction is exactly classifier(purify(x).x) (the base
    `Defense.predict`) also that purification and its seconds (else None, 0: a classifier, or a defense
    that predicts its own way)."""
    if isinstance(target, Defense) and type(target).predict is Defense.predict:
        started = busy_clock()
        purified = target.purify(x, ids)
        seconds = busy_clock() - started
        return target.classifier(purified.x).argmax(1), purified, seconds
    return predict(target, x, ids), None, 0.0


def loss_gradient(f: Logits, x: torch.Tensor, y: torch.Tensor, loss: Loss = Loss.CE) -> torch.Tensor:
    """∇_x of the summed per-example loss: row i is the gradient of example i's own loss."""
    return loss_gradient_and_logits(f, x, y, loss)[0]


def loss_gradient_and_logits(
    f: Logits, x: torch.Tensor, y: torch.Tensor, loss: Loss = Loss.CE
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of `loss_gradient` and the logits f(x) of the same forward pass (detached)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = f(x)
        value = F.cross_entropy(logits, y, reduction="sum") if Loss(loss) is Loss.CE else -margin(logits, y).sum()
        (grad,) = torch.autograd.grad(value, x)
    return grad, logits.detach()


def _keys(seed: int, ids: torch.Tensor, n: int, stream: int) -> torch.Tensor:
    """(N, n) int64 keys that depend only on (seed, example id, stream, coordinate), never on batch position."""
    return rng.hash_keys(seed, ids.reshape(-1, 1), stream, torch.arange(n, device=ids.device).reshape(1, -1))


def per_example_uniform(seed: int, ids: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """(N, n) uniforms in [0, 1), one row per example id, on the ids' device."""
    return rng.uniform(_keys(seed, ids, n, stream))


def per_example_normal(seed: int, ids: torch.Tensor, n: int, stream: int = 0) -> torch.Tensor:
    """(N, n) standard normals, one row per example id, on the ids' device."""
    return rng.normal(_keys(seed, ids, n, stream))


def _rows(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-example vector (N,) to broadcast against a batch with `ndim` dimensions."""
    return t.reshape(-1, *([1] * (ndim - 1)))


def as_ids(ids: Optional[Ids], x: torch.Tensor) -> torch.Tensor:
    """The example ids of batch x as int64 on its device; None means 0..N-1."""
    if ids is None:
        return torch.arange(len(x), device=x.device)
    return torch.as_tensor(ids, dtype=torch.int64, device=x.device)


class Attack(abc.ABC):
    """Base of every attack: a subclass's `run` finds x_adv; `__call__` measures it against the same target."""

    norm: Norm

    @final
    def __call__(self, target: Target, x: torch.Tensor, y: torch.Tensor, *, ids: Optional[Ids] = None) -> AttackResult:
        """Attack x (labels y): `run` on `differentiable(target)`, success judged by the target's own prediction."""
        ids = as_ids(ids, x)
        f = self.differentiable(target, ids)
        x_adv, queries = self.run(f, x.detach(), y, ids)
        x_adv = x_adv.detach()
        labels, purified, seconds = _judge(target, x_adv, ids)  # the real target, not a gradient surrogate
        delta = x_adv - x
        return AttackResult(
            x_adv=x_adv,
            success=labels != y,
            l2=Norm.L2.of(delta),
            linf=Norm.LINF.of(delta),
            queries=queries,
            purified=purified,
            purify_seconds=seconds,
        )

    def differentiable(self, target: Target, ids: torch.Tensor) -> Logits:
        """The function whose gradient the attack follows; end-to-end attacks override this."""
        return logits_fn(target, ids)

    @abc.abstractmethod
    def run(self, f: Logits, x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_adv (N, C, H, W) from the attack's loop on f, and the evaluations of f each example took (N,) int64."""


# ---------------------------------------------------------------- fixed-budget gradient descent


class GradientDescent(Attack):
    """Untargeted PGD (Madry et al. 2018, eq. 2): x ← Π_{B_ε(x0) ∩ [0,1]}(x + α · normalize(∇_x CE)).

    Step size α = abs_stepsize, or rel_stepsize · ε when abs_stepsize is None (as in foolbox).
    `loss` = "margin" ascends the CW margin instead of the cross-entropy (stronger on saturated models).
    `restarts` > 1 runs again from other random starts (seeded per restart and example).

    `run(..., stop_at_success=True)` returns each example's first iterate (over steps and restarts) that f
    misclassifies, else the last restart's final iterate. The end-to-end attacks whose forward pass is the
    defense itself (BPDA, NES) ask for it: an iterate the defense misclassifies is an adversarial example
    whatever the later steps do (sign steps oscillate around the boundary). It is off by default: a
    transfer attack computed on the classifier should keep its last, most confident iterate.

    A fooled example stops: later steps (and restarts) compute only the examples still standing, so a
    defense that falls early costs little. The second value `run` returns counts, per example, the
    evaluations of f it took: each step evaluates f at the current iterate (forward and backward), and
    a run that judges (stop_at_success or restarts) evaluates each restart's final iterate once more. An
    example first fooled at iterate j (0 = the start) of the first restart took j + 1; so a k-step attack
    would have fooled exactly the examples with success and queries ≤ k + 1 (`accuracy_vs_steps`): the
    convergence curve of one long run.
    """

    def __init__(
        self,
        *,
        eps: float,
        rel_stepsize: float,
        abs_stepsize: Optional[float] = None,
        steps: int,
        random_start: bool,
        seed: int = 0,
        loss: Loss | str = Loss.CE,
        restarts: int = 1,
    ):
        if eps < 0 or steps < 1:
            raise ValueError(f"need eps >= 0 and steps >= 1, got eps={eps}, steps={steps}")
        if not (isinstance(restarts, int) and restarts >= 1) or (restarts > 1 and not random_start):
            raise ValueError(f"restarts={restarts!r}: give a whole number >= 1 (more than 1 needs random_start)")
        self.eps, self.rel_stepsize, self.abs_stepsize = eps, rel_stepsize, abs_stepsize
        self.steps, self.random_start, self.seed, self.loss = steps, random_start, seed, Loss(loss)
        self.restarts = restarts

    @property
    def stepsize(self) -> float:
        return self.rel_stepsize * self.eps if self.abs_stepsize is None else self.abs_stepsize

    def run(self, f, x, y, ids, *, stop_at_success: bool = False):
        x0, judge = x, stop_at_success or self.restarts > 1
        n, device = len(x0), x0.device
        out, fooled = x0.clone(), torch.zeros(n, dtype=torch.bool, device=device)
        spent = torch.zeros(n, dtype=torch.int64, device=device)  # evaluations of f per example

        def keep_first(logits: torch.Tensor, xs: torch.Tensor, rows: torch.Tensor) -> None:
            new = (logits.argmax(1) != y[rows]) & ~fooled[rows]
            out[rows[new]], fooled[rows[new]] = xs[new], True

        for restart in range(self.restarts):
            # a restart (and, with stop_at_success, every step) runs only the examples not yet fooled
            rows = (~fooled).nonzero().squeeze(1) if judge else torch.arange(n, device=device)
            if not len(rows):
                break
            g, xs0 = restrict(f, rows), x0[rows]
            # clipping to the box keeps a random start in the ball; restart r draws from seed + 7919 r
            xs = xs0
            if self.random_start:
                xs = self.get_random_start(xs0, ids[rows], self.seed + 7919 * restart).clamp(0, 1)
            for _ in range(self.steps):
                if stop_at_success and bool(fooled[rows].any()):
                    keep = ~fooled[rows]
                    rows, xs, xs0 = rows[keep], xs[keep], xs0[keep]
                    if not len(rows):
                        break
                    g = restrict(f, rows)
                grad, logits = loss_gradient_and_logits(g, xs, y[rows], self.loss)
                spent[rows] += 1
                if stop_at_success:
                    keep_first(logits, xs, rows)
                xs = self.project(xs + self.stepsize * self.normalize(grad, xs), xs0)
            if not len(rows):
                continue
            out[rows] = torch.where(_rows(fooled[rows], xs.ndim), out[rows], xs)  # the restart's final iterate
            if judge:
                with torch.no_grad():
                    keep_first(g(xs), xs, rows)
                spent[rows] += 1
        return out, spent

    @abc.abstractmethod
    def get_random_start(self, x0: torch.Tensor, ids: torch.Tensor, seed: int) -> torch.Tensor:
        """A random point of the ε-ball around x0, drawn per example id from `seed`."""

    @abc.abstractmethod
    def normalize(self, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The ascent direction of unit size in the attack's norm."""

    @abc.abstractmethod
    def project(self, x: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """A point of {||x - x0|| ≤ ε} ∩ [0, 1]^n near x (exact Euclidean projection for ℓ∞ and ℓ1)."""


class LinfGradientDescent(GradientDescent):
    norm = Norm.LINF

    def get_random_start(self, x0, ids, seed):
        u = per_example_uniform(seed, ids, x0[0].numel()).reshape(x0.shape)
        return x0 + self.eps * (2 * u - 1)

    def normalize(self, grad, x):
        return grad.sign()

    def project(self, x, x0):
        return (x0 + (x - x0).clamp(-self.eps, self.eps)).clamp(0, 1)


class L2GradientDescent(GradientDescent):
    norm = Norm.L2

    def get_random_start(self, x0, ids, seed):
        """Uniform in the ℓ2 ball: a direction uniform on the (n+2)-sphere, first n coordinates (Voelker 2017)."""
        n = x0[0].numel()
        g = per_example_normal(seed, ids, n + 2)
        return x0 + self.eps * (g / g.norm(dim=1, keepdim=True))[:, :n].reshape(x0.shape)

    def normalize(self, grad, x):
        return grad / _rows(Norm.L2.of(grad).clamp_min(1e-12), grad.ndim)

    def project(self, x, x0):
        """Shrink onto the ℓ2 ball, then clip to the box (foolbox's rule; stays feasible, not exact)."""
        delta = x - x0
        factor = (self.eps / Norm.L2.of(delta).clamp_min(1e-12)).clamp(max=1)
        return (x0 + delta * _rows(factor, x.ndim)).clamp(0, 1)


def fell_within(success, queries, k: int):
    """Which examples a first-success run (one restart) had fooled within k steps: its fooling iterate j
    took j + 1 evaluations (`queries`), so fell by step k ⇔ success and queries ≤ k + 1. Elementwise on
    tensors, arrays or Series alike."""
    return success & (queries <= k + 1)


def accuracy_vs_steps(success, queries, steps) -> list[float]:
    """Accuracy a k-step run would leave, for each k in `steps`, from one longer first-success run (one
    restart; `GradientDescent.run` with stop_at_success): an example falls within k steps iff it fell and
    its queries (evaluations up to its fooling iterate) are ≤ k + 1. Accuracy counts every example, so
    those the defense already misclassifies count as fallen at step 0."""
    success = torch.as_tensor(success, dtype=torch.bool)  # a result's device; rows read back: the CPU
    queries = torch.as_tensor(queries, dtype=torch.int64, device=success.device)
    return [1 - fell_within(success, queries, k).float().mean().item() for k in steps]


def project_l1_box(v: torch.Tensor, eps, lo: torch.Tensor, hi: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """Euclidean projection of each example of v onto {δ : ||δ||₁ ≤ ε, lo ≤ δ ≤ hi}, with lo ≤ 0 ≤ hi.

    KKT: δ(λ) = clip(soft_λ(v), lo, hi) for the multiplier λ ≥ 0 of the ℓ1 constraint; λ = 0 if that
    point is inside the ball, else ||δ(λ)||₁ = ε. ||δ(λ)||₁ = Σ min((|v_i| - λ)₊, c_i), with c_i the room
    the box leaves in v_i's direction, is continuous and non-increasing in λ, so a batched bisection
    in float64 finds λ to 2^-iters of max|v|; the upper end is kept, so the result is always feasible.
    """
    shape, n = v.shape, len(v)
    v64 = v.reshape(n, -1).double()
    a = v64.abs()
    room = torch.where(v64 >= 0, hi.reshape(n, -1).double(), -lo.reshape(n, -1).double()).clamp_min(0)
    eps = torch.as_tensor(eps, dtype=torch.float64, device=v.device).expand(n)

    def l1(lam: torch.Tensor) -> torch.Tensor:
        return (a - lam[:, None]).clamp_min(0).minimum(room).sum(1)

    low, high = torch.zeros_like(eps), a.amax(1)
    for _ in range(iters):
        mid = (low + high) / 2
        over = l1(mid) > eps
        low, high = torch.where(over, mid, low), torch.where(over, high, mid)
    lam = torch.where(l1(torch.zeros_like(eps)) <= eps, torch.zeros_like(eps), high)
    delta = v64.sign() * (a - lam[:, None]).clamp_min(0).minimum(room)
    return delta.to(v.dtype).reshape(shape)


class L1GradientDescent(GradientDescent):
    """ℓ1 PGD with the sparse step of SparseL1Descent (Tramèr & Boneh 2019; cleverhans, foolbox)."""

    norm = Norm.L1

    def __init__(self, *, quantile: float, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= quantile <= 1:
            raise ValueError(f"quantile must be in [0, 1], got {quantile}")
        self.quantile = quantile

    def get_random_start(self, x0, ids, seed):
        """Uniform in the ℓ1 ball: spacings of n sorted uniforms, random signs (as foolbox)."""
        n = x0[0].numel()
        u = per_example_uniform(seed, ids, n, stream=0).sort(dim=1).values
        spacings = u - torch.cat([torch.zeros_like(u[:, :1]), u[:, :-1]], dim=1)
        signs = (per_example_uniform(seed, ids, n, stream=1) < 0.5).float() * 2 - 1
        return x0 + self.eps * (signs * spacings).reshape(x0.shape)

    def normalize(self, grad, x):
        """sign(∇) on the coordinates whose |∇| reaches the per-example `quantile`, divided by their count.

        Coordinates pinned at a box face with the gradient pointing outwards are left out first.
        """
        blocked = ((x <= 0) & (grad < 0)) | ((x >= 1) & (grad > 0))
        g = torch.where(blocked, torch.zeros_like(grad), grad).flatten(1)
        threshold = torch.quantile(g.abs(), self.quantile, dim=1, keepdim=True)
        e = torch.where(g.abs() >= threshold, g.sign(), torch.zeros_like(g))
        return (e / e.abs().sum(1, keepdim=True).clamp_min(1e-12)).reshape(grad.shape)

    def project(self, x, x0):
        return (x0 + project_l1_box(x - x0, self.eps, -x0, 1 - x0)).clamp(0, 1)


class FGSM(LinfGradientDescent):
    """Fast gradient sign method (Goodfellow et al. 2015): x + ε · sign(∇_x CE), clipped to [0, 1].

    ε = 0.3 for MNIST / F-MNIST, 8/255 for CIFAR-10 / CelebA (InvGAN Sec. 4.2).
    """

    def __init__(self, *, eps: float = 0.3, loss: Loss | str = Loss.CE):
        super().__init__(eps=eps, rel_stepsize=1.0, steps=1, random_start=False, loss=loss)


class LinfPGD(LinfGradientDescent):
    """ℓ∞ PGD; defaults of Madry et al. / foolbox: 40 steps of 0.01 at ε = 0.3, random start."""

    def __init__(
        self,
        *,
        eps: float = 0.3,
        rel_stepsize: float = 0.01 / 0.3,
        abs_stepsize: Optional[float] = None,
        steps: int = 40,
        random_start: bool = True,
        seed: int = 0,
        loss: Loss | str = Loss.CE,
        restarts: int = 1,
    ):
        super().__init__(
            eps=eps,
            rel_stepsize=rel_stepsize,
            abs_stepsize=abs_stepsize,
            steps=steps,
            random_start=random_start,
            seed=seed,
            loss=loss,
            restarts=restarts,
        )


class L2PGD(L2GradientDescent):
    """ℓ2 PGD; defaults of the RED appendix B.2 (MNIST): ε = 2.0, step 0.1 (= 0.05 ε), 200 steps."""

    def __init__(
        self,
        *,
        eps: float = 2.0,
        rel_stepsize: float = 0.05,
        abs_stepsize: Optional[float] = None,
        steps: int = 200,
        random_start: bool = True,
        seed: int = 0,
        loss: Loss | str = Loss.CE,
        restarts: int = 1,
    ):
        super().__init__(
            eps=eps,
            rel_stepsize=rel_stepsize,
            abs_stepsize=abs_stepsize,
            steps=steps,
            random_start=random_start,
            seed=seed,
            loss=loss,
            restarts=restarts,
        )


class L1PGD(L1GradientDescent):
    """Sparse ℓ1 PGD; RED appendix B.2 (MNIST): ε = 10, step 0.8 (= 0.08 ε), 100 steps.

    `quantile` = 0.99 is SparseL1Descent's default (cleverhans grad_sparsity = 99); the random start
    follows AdvTorch's L1PGDAttack, which the RED paper used.
    """

    def __init__(
        self,
        *,
        eps: float = 10.0,
        rel_stepsize: float = 0.08,
        abs_stepsize: Optional[float] = None,
        steps: int = 100,
        quantile: float = 0.99,
        random_start: bool = True,
        seed: int = 0,
        loss: Loss | str = Loss.CE,
        restarts: int = 1,
    ):
        super().__init__(
            eps=eps,
            rel_stepsize=rel_stepsize,
            abs_stepsize=abs_stepsize,
            steps=steps,
            random_start=random_start,
            seed=seed,
            quantile=quantile,
            loss=loss,
            restarts=restarts,
        )


# ---------------------------------------------------------------- minimal-norm attack


class CarliniWagnerL2(Attack):
    """Carlini & Wagner (2017) ℓ2: min ||x' - x||² + c · max(Z_y - max_{j≠y} Z_j + κ, 0), x' = (tanh(w) + 1)/2.

    Adam on w, then a per-example binary search over c (×10 until the first success, then bisect).
    Defaults are InvGAN's (Sec. 4.2): 6 binary-search steps, learning rate 0.2, 100 iterations.
    initial_const = 10 rather than Carlini's 1e-3: with only 6 searches a start at 1e-3 spends four
    of them growing c; 10 (the value cleverhans-based scripts pair with lr 0.2 / 100 iterations) succeeds at once
    and the remaining searches shrink c. Examples never made adversarial are returned unchanged.
    `abort_early` freezes an example whose loss stopped falling (checked every tenth of the steps).
    """

    norm = Norm.L2

    def __init__(
        self,
        *,
        binary_search_steps: int = 6,
        lr: float = 0.2,
        steps: int = 100,
        confidence: float = 0.0,
        initial_const: float = 10.0,
        abort_early: bool = True,
    ):
        self.binary_search_steps, self.lr, self.steps = binary_search_steps, lr, steps
        self.confidence, self.initial_const, self.abort_early = confidence, initial_const, abort_early

    def _margin(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Z_y - max_{j≠y} Z_j + κ: negative means adversarial with confidence κ."""
        return margin(logits, y) + self.confidence

    def run(self, f, x, y, ids):
        n = len(x)
        best, best_l2 = x.clone(), torch.full((n,), math.inf, device=x.device)
        const = torch.full((n,), self.initial_const, dtype=torch.float64, device=x.device)
        lower, upper = torch.zeros_like(const), torch.full_like(const, math.inf)
        queries = torch.zeros(n, dtype=torch.int64, device=x.device)
        for search in range(self.binary_search_steps):
            if search == self.binary_search_steps - 1 and self.binary_search_steps >= 10:
                const = upper.clamp(max=1e10)  # Carlini's "repeat at the upper bound" on the last search
            found = self._optimize(f, x, y, const.float(), best, best_l2, queries)
            upper = torch.where(found, torch.minimum(upper, const), upper)
            lower = torch.where(found, lower, torch.maximum(lower, const))
            const = torch.where(upper.isinf(), const * 10, (lower + upper) / 2)
        return best, queries

    def _optimize(self, f, x, y, const, best, best_l2, queries) -> torch.Tensor:
        """One inner Adam run at fixed c; updates best/best_l2/queries in place, returns 'found' (N,)."""
        w0 = torch.atanh((2 * x - 1) * 0.999999)
        w, m, v = w0.clone(), torch.zeros_like(x), torch.zeros_like(x)
        beta1, beta2 = 0.9, 0.999
        active = torch.ones(len(x), dtype=torch.bool, device=x.device)
        found = torch.zeros_like(active)
        previous = torch.full((len(x),), math.inf, device=x.device)
        check_every = max(1, math.ceil(self.steps / 10))
        for step in range(self.steps):
            w_ = w.detach().requires_grad_(True)
            with torch.enable_grad():
                xp = (torch.tanh(w_) + 1) / 2
                logits = f(xp)
                margin = self._margin(logits, y)
                l2sq = (xp - x).flatten(1).pow(2).sum(1)
                loss = l2sq + const * margin.clamp_min(0)
                (grad,) = torch.autograd.grad(loss.sum(), w_)
            xp, margin, l2 = xp.detach(), margin.detach(), l2sq.detach().sqrt()
            improved = active & (margin < 0) & (l2 < best_l2)  # the point just evaluated, before the step
            best.copy_(torch.where(_rows(improved, x.ndim), xp, best))
            best_l2.copy_(torch.where(improved, l2, best_l2))
            found |= active & (margin < 0)
            queries += active.long()
            if self.abort_early and step % check_every == 0:
                active &= loss.detach() <= 0.9999 * previous
                previous = torch.where(active, loss.detach(), previous)
            m, v = beta1 * m + (1 - beta1) * grad, beta2 * v + (1 - beta2) * grad**2
            update = self.lr * (m / (1 - beta1 ** (step + 1))) / ((v / (1 - beta2 ** (step + 1))).sqrt() + 1e-8)
            w = w - torch.where(_rows(active, x.ndim), update, torch.zeros_like(update))
        return found
