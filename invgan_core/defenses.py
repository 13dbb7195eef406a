"""Projection defenses: purify an input by projecting it onto G's range, then classify the projection.

Common interface: `defense.purify(x, ids) -> Purified` and `defense.predict(x, ids) -> labels`.
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass

import torch
from torch import nn

from invgan_core import rng
from invgan_core.inversion import CONSTRAINTS, OPTIMIZERS, project

_FRESH_DRAWS = 0x5EED  # keys a randomized defense's per-call seeds apart from every other use of its seed


@dataclass
class Purified:
    x: torch.Tensor  # (N, C, H, W) the purified input fed to the classifier
    z: torch.Tensor | None  # (N, d) latent of the projection (None without a generator)
    loss: torch.Tensor  # (N,) reconstruction error ||G(z) - x||² / n
    effective_iterations: int | float  # restart-steps per example, averaged (restarts x steps without pruning)
    iterations: torch.Tensor | None = None  # (N,) restart-steps spent on each example (None: all equal)

    @property
    def x_proj(self) -> torch.Tensor:
        """The projection G(z) (the name the papers use); the same tensor as `x`."""
        return self.x


def _ids_for(x: torch.Tensor, ids) -> torch.Tensor:
    if ids is None:
        return torch.arange(len(x), device=x.device)
    return torch.as_tensor(ids, dtype=torch.int64, device=x.device)


class Defense:
    """Base: `purify` is the projection; `predict` classifies the purified input."""

    name = "defense"

    def __init__(self, classifier: nn.Module):
        self.classifier = classifier

    @staticmethod
    def check_params(params: dict) -> None:
        """Refuse a budget no projection can run (before any model is loaded): raises ValueError naming it."""
        for key, value in params.items():
            whole = isinstance(value, int) and not isinstance(value, bool)
            if key == "steps" and not (whole and value >= 0):
                raise ValueError(f"steps={value!r}: give a whole number of projection steps >= 0")
            if key == "restarts" and not (whole and value >= 1):
                raise ValueError(f"restarts={value!r}: give a whole number of restarts >= 1")
            if key == "lr" and not (
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            ):
                raise ValueError(f"lr={value!r}: give a finite step size > 0")
            if key == "optimizer" and value not in OPTIMIZERS:
                raise ValueError(f"optimizer={value!r}: choose one of {', '.join(OPTIMIZERS)}")
            if key == "constraint" and value not in CONSTRAINTS:
                raise ValueError(f"constraint={value!r}: choose one of {CONSTRAINTS}")
            if key == "prune_every" and not (value is None or whole and value >= 1):
                raise ValueError(f"prune_every={value!r}: give a whole number of steps >= 1 between halvings, or null")
            if key == "patience" and not (whole and value >= 1):
                raise ValueError(f"patience={value!r}: give a whole number of steps >= 1")
            if key == "early_stop_tol" and not (
                value is None
                or isinstance(value, (int, float))
                and not isinstance(value, bool)
                and math.isfinite(value)
                and value >= 0
            ):
                raise ValueError(f"early_stop_tol={value!r}: give a finite loss decrease >= 0, or null")

    def purify(self, x: torch.Tensor, ids=None) -> Purified:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, x: torch.Tensor, ids=None) -> torch.Tensor:
        return self.classifier(self.purify(x, ids).x).argmax(1)


class NoDefense(Defense):
    name = "none"

    def purify(self, x: torch.Tensor, ids=None) -> Purified:
        return Purified(x=x, z=None, loss=torch.zeros(len(x), device=x.device), effective_iterations=0)


class DefenseGAN(Defense):
    """Defense-GAN: R random restarts x L gradient steps on ||G(z) - x||², keep the best restart.

    The paper's plain R x L is the default. Cheaper budgets (benchmarks/README.md, accuracy vs cost):
    `prune_every` halves each example's restarts (keeping its better half) every that many steps;
    `early_stop_tol` stops an example once its best loss has not dropped by more than that for
    `patience` steps. Both decide per example, so results stay independent of the batch.

    Restarts are drawn per (seed, example id) by default: every call projects an input from the same starts,
    so an attacker who runs the defense sees the defender's own draw (a valid deterministic defense). With
    `randomized`, every call draws fresh starts (the deployed Defense-GAN): an attack then needs EOT over the
    draws (`BPDA(eot=K)`, Athalye et al. 2018), and a row's prediction is one more fresh draw. The draws are
    counted per defense object, so they are fresh but not reproducible across runs when threads share it.
    """

    name = "defensegan"

    def __init__(
        self,
        G: nn.Module,
        classifier: nn.Module,
        *,
        restarts: int = 10,
        steps: int = 200,
        lr: float = 0.05,
        optimizer: str = "adam",
        prune_every: int | None = None,
        early_stop_tol: float | None = None,
        patience: int = 20,
        randomized: bool = False,
        seed: int = 0,
    ):
        super().__init__(classifier)
        if not isinstance(randomized, bool):
            raise ValueError(f"randomized={randomized!r}: give true (fresh restarts per call) or false")
        self.check_params(
            dict(
                restarts=restarts,
                steps=steps,
                lr=lr,
                optimizer=optimizer,
                prune_every=prune_every,
                early_stop_tol=early_stop_tol,
                patience=patience,
            )
        )
        self.G, self.restarts, self.steps, self.lr, self.optimizer, self.seed = G, restarts, steps, lr, optimizer, seed
        self.prune_every, self.early_stop_tol, self.patience = prune_every, early_stop_tol, patience
        self.randomized, self._draws, self._lock = randomized, itertools.count(1), threading.Lock()

    def draw_seed(self) -> int:
        """The seed of this call's restarts: the defense's seed, or (randomized) a fresh one per call."""
        if not self.randomized:
            return self.seed
        with self._lock:
            draw = next(self._draws)
        return int(rng.hash_keys(self.seed, _FRESH_DRAWS, draw))

    def purify(self, x: torch.Tensor, ids=None) -> Purified:
        p = project(
            self.G,
            x,
            ids=_ids_for(x, ids),
            init="prior",
            steps=self.steps,
            lr=self.lr,
            restarts=self.restarts,
            optimizer=self.optimizer,
            seed=self.draw_seed(),
            prune_every=self.prune_every,
            early_stop_tol=self.early_stop_tol,
            patience=self.patience,
        )
        return Purified(x=p.x, z=p.z, loss=p.loss, effective_iterations=p.effective_iterations, iterations=p.iterations)


class InvGAN(Defense):
    """InvGAN (eq. 6): z0 = I(x), then T gradient steps; T = 0 is the pure encoder."""

    name = "invgan"

    def __init__(
        self,
        G: nn.Module,
        inverter: nn.Module,
        classifier: nn.Module,
        *,
        steps: int = 200,
        lr: float = 0.05,
        optimizer: str = "adam",
        seed: int = 0,
    ):
        super().__init__(classifier)
        self.check_params(dict(steps=steps, lr=lr, optimizer=optimizer))
        self.G, self.inverter, self.steps, self.lr, self.optimizer, self.seed = G, inverter, steps, lr, optimizer, seed

    def purify(self, x: torch.Tensor, ids=None) -> Purified:
        p = project(
            self.G,
            x,
            ids=_ids_for(x, ids),
            init=self.inverter,
            steps=self.steps,
            lr=self.lr,
            optimizer=self.optimizer,
            seed=self.seed,
        )
        return Purified(x=p.x, z=p.z, loss=p.loss, effective_iterations=max(p.effective_iterations, 1))


class ClippedProjection(Defense):
    """Projection with latents kept in [-1, 1]^d by stochastic clipping (Lipton & Tripathi); uniform prior.

    Plain gradient descent, as in the paper: with Adam, whose steps do not shrink near the optimum,
    coordinates near the box's faces keep overshooting and being re-drawn, and stochastic clipping
    recovers fewer latents than standard clipping (measured on the digits uniform-prior generator).
    """

    name = "clipped"

    def __init__(
        self,
        G: nn.Module,
        classifier: nn.Module,
        *,
        restarts: int = 1,
        steps: int = 500,
        lr: float = 5.0,
        optimizer: str = "sgd",
        constraint: str = "stochastic_clip",
        seed: int = 0,
    ):
        super().__init__(classifier)
        self.check_params(dict(restarts=restarts, steps=steps, lr=lr, optimizer=optimizer, constraint=constraint))
        if G.prior != "uniform":
            raise ValueError(
                "ClippedProjection needs a generator with a uniform prior (box [-1, 1]^d); "
                f"this one has prior {G.prior!r}"
            )
        self.G, self.restarts, self.steps, self.lr, self.constraint, self.seed = (
            G,
            restarts,
            steps,
            lr,
            constraint,
            seed,
        )
        self.optimizer = optimizer

    def purify(self, x: torch.Tensor, ids=None) -> Purified:
        p = project(
            self.G,
            x,
            ids=_ids_for(x, ids),
            init="prior",
            steps=self.steps,
            lr=self.lr,
            restarts=self.restarts,
            optimizer=self.optimizer,
            constraint=self.constraint,
            seed=self.seed,
        )
        return Purified(x=p.x, z=p.z, loss=p.loss, effective_iterations=p.effective_iterations)
