"""Property-based tests (hypothesis) of the math every attack and RED rely on (issue #12):

- the ℓ∞ / ℓ2 / ℓ1 ball ∩ box projections of the PGD attacks: always feasible, idempotent, and (ℓ∞, ℓ1)
  no feasible point closer than the projection — checked by brute force on a grid of small cases;
- RED's block soft-thresholding prox: the closed form, zero below the threshold, and the optimality
  condition of the prox (c − u ∈ τ ∂h(u));
- per-example randomness: an example's draws (and a random-start attack's result) do not depend on
  which other examples share its batch, nor on their order.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from invgan_core import rng
from invgan_core.attacks import L1PGD, L2PGD, LinfPGD, per_example_normal, per_example_uniform, project_l1_box
from invgan_core.red import block_soft_threshold

pytestmark = pytest.mark.reliability(kind="property")
ROOT = Path(__file__).resolve().parents[2]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-5

unit = st.floats(0, 1, allow_nan=False, width=32)
wide = st.floats(-2, 2, allow_nan=False, width=32)


@st.composite
def ball_case(draw, max_dim: int = 4, max_eps: float = 2.0):
    """(x0 in [0,1]^n, x anywhere near it, ε): one example of dimension n, shaped (1, 1, 1, n) like an image."""
    n = draw(st.integers(1, max_dim))
    x0 = torch.tensor(draw(st.lists(unit, min_size=n, max_size=n))).reshape(1, 1, 1, n)
    x = torch.tensor(draw(st.lists(wide, min_size=n, max_size=n))).reshape(1, 1, 1, n)
    eps = draw(st.floats(0, max_eps, allow_nan=False))
    return x0, x, eps


NORMS = {"linf": (LinfPGD, math.inf), "l2": (L2PGD, 2.0), "l1": (L1PGD, 1.0)}


def _projector(norm: str, eps: float):
    cls, _ = NORMS[norm]
    return cls(eps=eps, steps=1).project


@pytest.mark.parametrize("norm", NORMS)
@FAST
@given(case=ball_case())
def test_projection_is_feasible_and_idempotent(norm, case):
    x0, x, eps = case
    project = _projector(norm, eps)
    p = project(x, x0)
    assert p.min() >= 0 and p.max() <= 1  # in the box
    assert torch.linalg.vector_norm((p - x0).flatten(), ord=NORMS[norm][1]) <= eps * (1 + 1e-5) + TOL  # in the ball
    assert torch.allclose(project(p, x0), p, atol=TOL)  # a feasible point stays where it is


def _grid(x0: np.ndarray, h: float) -> np.ndarray:
    """Every point of a grid of step h over the box [0, 1]^n, as perturbations δ = point − x0."""
    axes = [np.linspace(0, 1, int(round(1 / h)) + 1) for _ in x0]
    return np.array(list(itertools.product(*axes))) - x0[None, :]


@pytest.mark.parametrize("norm", ["linf", "l1"])
@FAST
@given(case=ball_case(max_dim=3))
def test_no_feasible_point_is_closer_than_the_projection(norm, case):
    """Brute force: among grid points of box ∩ ball (plus x0 itself), none is nearer x than the projection."""
    x0, x, eps = case
    p = _projector(norm, eps)(x, x0)
    dist = float((p - x).norm())
    x0n, xn = x0.flatten().double().numpy(), x.flatten().double().numpy()
    deltas = _grid(x0n, 1 / 40)
    ord_ = np.inf if norm == "linf" else 1
    feasible = deltas[np.linalg.norm(deltas, ord=ord_, axis=1) <= eps]
    candidates = np.vstack([feasible, np.zeros((1, len(x0n)))])
    best = np.linalg.norm(x0n[None, :] + candidates - xn[None, :], axis=1).min()
    assert dist <= best + 1e-5


def _exact_l2_box(v: np.ndarray, eps: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Reference: the Euclidean projection of v onto {||δ||₂ ≤ ε} ∩ [lo, hi] is clip(v / (1 + μ), lo, hi) for
    the smallest μ ≥ 0 that makes it feasible (KKT; ||δ(μ)|| is non-increasing in μ): bisection."""
    d = lambda mu: np.clip(v / (1 + mu), lo, hi)  # noqa: E731
    if np.linalg.norm(d(0.0)) <= eps:
        return d(0.0)
    low, high = 0.0, 1.0
    while np.linalg.norm(d(high)) > eps:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if np.linalg.norm(d(mid)) > eps else (low, mid)
    return d(high)


@FAST
@given(case=ball_case())
def test_l2_projection_is_exact_when_the_box_does_not_bind(case):
    """The ℓ2 rule is shrink-then-clip (foolbox's, documented as feasible, not exact): where the shrunk point is
    already inside the box it must equal the exact projection; elsewhere it is never closer than the exact one."""
    x0, x, eps = case
    p = _projector("l2", eps)(x, x0)
    v, x0n = (x - x0).flatten().double().numpy(), x0.flatten().double().numpy()
    exact = x0n + _exact_l2_box(v, eps, -x0n, 1 - x0n)
    shrunk = x0n + v * min(1.0, eps / max(np.linalg.norm(v), 1e-12))
    got = p.flatten().double().numpy()
    xn = x.flatten().double().numpy()
    assert np.linalg.norm(exact - xn) <= np.linalg.norm(got - xn) + 1e-5
    if shrunk.min() >= 0 and shrunk.max() <= 1:
        np.testing.assert_allclose(got, exact, atol=1e-5)


@FAST
@given(n=st.integers(1, 6), data=st.data())
def test_l1_box_projection_matches_a_batch_of_single_projections(n, data):
    """Batched per example: each row's projection is the one it gets alone (no leakage across examples)."""
    rows = data.draw(st.integers(1, 5))
    v = torch.tensor(data.draw(st.lists(st.lists(wide, min_size=n, max_size=n), min_size=rows, max_size=rows)))
    x0 = torch.tensor(data.draw(st.lists(st.lists(unit, min_size=n, max_size=n), min_size=rows, max_size=rows)))
    eps = data.draw(st.floats(0, 3, allow_nan=False))
    batch = project_l1_box(v, eps, -x0, 1 - x0)
    for i in range(rows):
        assert torch.allclose(
            batch[i : i + 1], project_l1_box(v[i : i + 1], eps, -x0[i : i + 1], 1 - x0[i : i + 1]), atol=1e-6
        )


# ---------------------------------------------------------------- RED: block soft-thresholding


@st.composite
def blocks_case(draw):
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    k = sum(sizes)
    rows = draw(st.integers(1, 3))
    c = torch.tensor(
        draw(st.lists(st.lists(wide, min_size=k, max_size=k), min_size=rows, max_size=rows)), dtype=torch.float64
    )
    order = draw(st.permutations(range(k)))  # blocks need not be contiguous columns
    blocks, start = [], 0
    for s in sizes:
        blocks.append(torch.tensor(order[start : start + s]))
        start += s
    tau = draw(st.floats(0, 3, allow_nan=False))
    return c, blocks, tau


@FAST
@given(case=blocks_case())
def test_block_soft_threshold_matches_the_closed_form(case):
    c, blocks, tau = case
    u = block_soft_threshold(c, blocks, tau)
    for b in blocks:
        cb, ub = c[:, b], u[:, b]
        norm = cb.norm(dim=1, keepdim=True)
        expected = torch.where(norm <= tau, torch.zeros_like(cb), cb * (1 - tau / norm.clamp_min(1e-300)))
        assert torch.allclose(ub, expected, atol=1e-12)
        assert (ub[(norm <= tau).squeeze(1)] == 0).all()  # exactly zero below the threshold


@FAST
@given(case=blocks_case())
def test_block_soft_threshold_satisfies_the_prox_optimality_condition(case):
    """u = prox_{τh}(c) iff c − u ∈ τ ∂h(u): c_b − u_b = τ u_b / ||u_b|| where u_b ≠ 0,
    ||c_b − u_b|| ≤ τ where u_b = 0."""
    c, blocks, tau = case
    u = block_soft_threshold(c, blocks, tau)
    for b in blocks:
        r, ub = c[:, b] - u[:, b], u[:, b]
        nu = ub.norm(dim=1, keepdim=True)
        nonzero = (nu > 0).squeeze(1)
        assert torch.allclose(r[nonzero], (tau * ub / nu.clamp_min(1e-300))[nonzero], atol=1e-9)
        assert (r[~nonzero].norm(dim=1) <= tau + 1e-12).all()


# ---------------------------------------------------------------- per-example randomness

ids_strategy = st.lists(st.integers(0, 2_000_000), min_size=1, max_size=12, unique=True)


@FAST
@given(ids=ids_strategy, data=st.data(), seed=st.integers(0, 2**31), stream=st.integers(0, 3))
def test_per_example_draws_do_not_depend_on_the_batch(ids, data, seed, stream):
    """Any subset, in any order, gives each example the row it gets in the full batch."""
    full = torch.tensor(ids)
    picked = data.draw(st.lists(st.sampled_from(range(len(ids))), min_size=1, max_size=len(ids), unique=True))
    sub = full[picked]
    for draw in (per_example_uniform, per_example_normal):
        a, b = draw(seed, full, 7, stream), draw(seed, sub, 7, stream)
        assert torch.equal(a[picked], b)
    z_full = rng.sample_latents("normal", seed, full, 3, 5)
    assert torch.equal(z_full[picked], rng.sample_latents("normal", seed, sub, 3, 5))


@pytest.fixture(scope="module")
def digits_classifier():
    from invgan_core.checkpoint import load_model
    from invgan_core.data import load_dataset

    f, _ = load_model(ROOT / "weights" / "digits" / "classifier", kind="classifier")
    data = load_dataset("digits", "test").subset(10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: more threads only contend (and the machine is shared)
    yield f.requires_grad_(False), data
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "attack",
    [
        LinfPGD(eps=0.3, steps=3, abs_stepsize=0.1, seed=5),
        L2PGD(eps=1.0, steps=3, seed=5),
        L1PGD(eps=3.0, steps=3, seed=5),
    ],
    ids=["pgd_linf", "pgd_l2", "pgd_l1"],
)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_random_start_attack_gives_an_example_the_same_result_in_any_batch(digits_classifier, attack, data):
    f, ds = digits_classifier
    order = data.draw(st.lists(st.sampled_from(range(len(ds))), min_size=1, max_size=len(ds), unique=True))
    ids = torch.as_tensor(ds.ids)
    whole = attack(f, ds.images, ds.labels, ids=ids).x_adv
    part = attack(f, ds.images[order], ds.labels[order], ids=ids[order]).x_adv
    assert torch.allclose(whole[order], part, atol=1e-5)
