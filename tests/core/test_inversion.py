"""`project`: known answers on a linear generator, batch independence, restarts, clipping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from invgan_core.inversion import project
from invgan_core.models import build_model, default_arch
from tests.core.test_training import LinearGenerator

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def small_G():
    torch.manual_seed(0)
    G = build_model("generator", default_arch("generator", (1, 8, 8)))
    G.train()
    with torch.no_grad():  # give batch norm non-trivial running statistics, then freeze them
        for _ in range(5):
            G(torch.randn(64, G.latent_dim))
    return G.eval()


def test_recovers_the_latent_of_a_linear_generator():
    torch.manual_seed(1)
    G = LinearGenerator(d=4, n=20)
    z_true = torch.randn(16, 4)
    x = G(z_true).detach()
    p = project(G, x, ids=torch.arange(16), steps=400, lr=0.05, restarts=2)
    assert (p.z - z_true).norm(dim=1).max() < 1e-3
    assert p.loss.max() < 1e-7 and p.effective_iterations == 800


def test_each_example_is_independent_of_its_batch(small_G):
    x = torch.rand(32, 1, 8, 8)
    ids = torch.arange(100, 132)
    batch = project(small_G, x, ids=ids, steps=60, restarts=3, seed=7)
    for i in (0, 17, 31):
        alone = project(small_G, x[i : i + 1], ids=ids[i : i + 1], steps=60, restarts=3, seed=7)
        torch.testing.assert_close(alone.z[0], batch.z[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(alone.restart_losses[0], batch.restart_losses[i], atol=1e-6, rtol=1e-4)


def test_keeps_the_best_restart_and_reports_a_trace(small_G):
    x = torch.rand(8, 1, 8, 8)
    p = project(small_G, x, ids=torch.arange(8), steps=30, restarts=5, keep_trace=True)
    torch.testing.assert_close(p.loss, p.restart_losses.min(dim=1).values)
    assert p.trace.shape == (8, 30)
    assert (p.loss <= p.trace[:, 0]).all()  # Adam from the same start ends below where it began
    torch.testing.assert_close(((small_G(p.z) - x) ** 2).flatten(1).mean(1), p.loss, atol=1e-6, rtol=1e-5)


def test_more_steps_fit_better(small_G):
    x = small_G(torch.randn(16, small_G.latent_dim)).detach()
    short = project(small_G, x, ids=torch.arange(16), steps=5, restarts=2)
    long = project(small_G, x, ids=torch.arange(16), steps=100, restarts=2)
    assert long.loss.mean() < short.loss.mean()


@pytest.mark.parametrize("constraint", ["clip", "stochastic_clip"])
def test_constraints_keep_latents_in_the_box(constraint):
    torch.manual_seed(2)
    G = LinearGenerator(d=4, n=20, prior="uniform")
    x = G(torch.rand(32, 4) * 6 - 3).detach()  # optima outside the box push z out
    p = project(G, x, ids=torch.arange(32), steps=50, lr=0.2, constraint=constraint)
    assert p.z.abs().max() <= 1.0


def test_restores_the_generator_state_and_validates_inputs(small_G):
    small_G.train()
    project(small_G, torch.rand(2, 1, 8, 8), ids=[0, 1], steps=2)
    assert small_G.training and all(p.requires_grad for p in small_G.parameters())
    small_G.eval()
    with pytest.raises(ValueError, match="expected"):
        project(small_G, torch.rand(2, 1, 8, 8), ids=[0, 1], init=torch.zeros(3, small_G.latent_dim))
    with pytest.raises(ValueError, match="ids"):
        project(small_G, torch.rand(2, 1, 8, 8), ids=[0], steps=1)
    with pytest.raises(ValueError, match="constraint"):
        project(small_G, torch.rand(2, 1, 8, 8), ids=[0, 1], constraint="box")


def test_projects_under_no_grad(small_G):
    """Defenses call `project` inside torch.no_grad() (predict, BPDA's forward): it must still optimise."""
    x = small_G(torch.randn(4, small_G.latent_dim)).detach()
    free = project(small_G, x, ids=torch.arange(4), steps=20)
    with torch.no_grad():
        inside = project(small_G, x, ids=torch.arange(4), steps=20)
    torch.testing.assert_close(inside.z, free.z)
    assert inside.loss.mean() < project(small_G, x, ids=torch.arange(4), steps=0).loss.mean()


def test_the_step_generator_is_the_same_function_with_batch_norm_folded(small_G):
    from invgan_core.inversion import step_generator

    fast = step_generator(small_G)
    assert fast is not small_G and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    z = torch.randn(64, small_G.latent_dim)
    with torch.no_grad():
        torch.testing.assert_close(fast(z), small_G(z), atol=1e-5, rtol=0)
    linear = LinearGenerator(d=4, n=20)
    assert step_generator(linear) is linear  # anything but a plain DCGAN generator runs as it is
    x = small_G(torch.randn(8, small_G.latent_dim)).detach()
    a, b = (project(small_G, x, ids=torch.arange(8), steps=30, restarts=2, fast=f) for f in (True, False))
    torch.testing.assert_close(a.z, b.z, atol=1e-3, rtol=0)


# ---------------------------------------------------------------- restart pruning and early stopping


def test_halving_keeps_the_restart_that_is_best_at_every_checkpoint(small_G):
    """Where plain R x L's final winner already leads at both checkpoints, pruning returns the same latent."""
    torch.manual_seed(4)
    x = torch.rand(24, 1, 8, 8)
    ids = torch.arange(24)
    plain = project(small_G, x, ids=ids, steps=60, restarts=4, seed=3)
    pruned = project(small_G, x, ids=ids, steps=60, restarts=4, seed=3, prune_every=15)
    # the loss each restart has when the pruned run ranks them (after 15 and 30 steps)
    at = {c: project(small_G, x, ids=ids, steps=c, restarts=4, seed=3).restart_losses for c in (15, 30)}
    winner = plain.restart_losses.argmin(1)
    leads = (at[15].argmin(1) == winner) & (at[30].argmin(1) == winner)
    assert leads.sum() >= 6, leads  # the property is checked on enough examples to mean something
    torch.testing.assert_close(pruned.z[leads], plain.z[leads], atol=1e-4, rtol=0)
    # 4 restarts for 15 steps, 2 for 15, 1 for the last 30
    assert pruned.iterations.tolist() == [4 * 15 + 2 * 15 + 30] * 24 and pruned.effective_iterations == 120
    assert plain.effective_iterations == 240 and plain.iterations.tolist() == [240] * 24


def test_halving_schedule_counts_restart_steps_with_an_odd_number_of_restarts(small_G):
    p = project(small_G, torch.rand(3, 1, 8, 8), ids=[5, 6, 7], steps=30, restarts=10, prune_every=5)
    assert p.effective_iterations == 10 * 5 + 5 * 5 + 3 * 5 + 2 * 5 + 1 * 10  # 10 -> 5 -> 3 -> 2 -> 1
    assert torch.isfinite(p.restart_losses).all() and p.z.shape == (3, small_G.latent_dim)


def test_early_stopping_on_a_generated_image_stops_early_and_fits_it(small_G):
    torch.manual_seed(6)
    x = small_G(torch.randn(16, small_G.latent_dim)).detach()
    p = project(
        small_G, x, ids=torch.arange(16), steps=400, restarts=2, early_stop_tol=1e-6, patience=10, keep_trace=True
    )
    assert p.loss.max() <= 1e-3
    assert (p.iterations < 2 * 400).all() and p.effective_iterations == p.iterations.double().mean().item()
    stopped = p.iterations // 2  # steps taken by each example (2 restarts each)
    for i in (0, 7):  # the trace ends where the example stopped
        assert torch.isfinite(p.trace[i, : stopped[i]]).all() and torch.isnan(p.trace[i, stopped[i] + 1 :]).all()


def test_pruning_and_early_stopping_are_independent_of_the_batch(small_G):
    torch.manual_seed(5)
    x = torch.cat([torch.rand(16, 1, 8, 8), small_G(torch.randn(16, small_G.latent_dim)).detach()])
    ids = torch.arange(200, 232)
    kw = dict(steps=60, restarts=5, seed=11, prune_every=10, early_stop_tol=1e-4, patience=5)
    batch = project(small_G, x, ids=ids, **kw)
    assert len(set(batch.iterations.tolist())) > 1  # examples stopped at different steps
    for i in (0, 2, 9, 29, 31):
        alone = project(small_G, x[i : i + 1], ids=ids[i : i + 1], **kw)
        assert alone.iterations[0] == batch.iterations[i]
        torch.testing.assert_close(alone.z[0], batch.z[i], atol=1e-4, rtol=0)


def test_pruning_parameters_are_validated(small_G):
    with pytest.raises(ValueError, match="prune_every"):
        project(small_G, torch.rand(1, 1, 8, 8), ids=[0], steps=2, prune_every=0)


# ---------------------------------------------------------------- on the shipped generators

WEIGHTS = __import__("pathlib").Path(__file__).resolve().parents[2] / "weights"


def _shipped(dataset: str, kind: str):
    from invgan_core.checkpoint import load_model

    stem = WEIGHTS / dataset / kind
    if not stem.with_suffix(".json").exists():
        pytest.skip(f"no shipped {stem}")
    return load_model(stem, kind=kind.split("-")[0])[0]


def test_invgan_init_recovers_generated_images_of_the_shipped_generator():
    """||G(ẑ) - x||²/n ≤ 1e-3 for ≥ 95% of 256 images x = G(z) within 200 steps from I(x)."""
    from invgan_core import rng

    G, I = _shipped("mnist5k", "generator"), _shipped("mnist5k", "inverter")
    z = rng.sample_latents(G.prior, 4242, torch.arange(256), 1, G.latent_dim)[:, 0]
    with torch.no_grad():
        x = G(z)
    p = project(G, x, ids=torch.arange(256), init=I, steps=200)
    assert (p.loss <= 1e-3).float().mean() >= 0.95


def test_stochastic_clipping_recovers_uniform_latents_better_than_clipping():
    """Lipton & Tripathi Table 1, qualitatively: same budget (plain gradient descent, 500 steps)."""
    from invgan_core import rng

    G = _shipped("digits", "generator-uniform")
    z = rng.sample_latents("uniform", 999, torch.arange(256), 1, G.latent_dim)[:, 0]
    with torch.no_grad():
        x = G(z)
    rates = {}
    for constraint in ("clip", "stochastic_clip"):
        p = project(G, x, ids=torch.arange(256), steps=500, lr=5.0, optimizer="sgd", constraint=constraint)
        assert p.z.abs().max() <= 1
        err = ((p.z - z) ** 2).mean(1)
        rates[constraint] = [(err < eps).float().mean().item() for eps in (1e-3, 1e-2, 1e-1)]
    # measured: clip 0.176 / 0.512 / 0.859, stochastic 0.219 / 0.578 / 0.883
    assert all(s > c for s, c in zip(rates["stochastic_clip"], rates["clip"], strict=True)), rates


def test_fused_projections_follow_the_trajectories_they_have_alone(small_G):
    """Projections of every kind in threads (`run_fused`) share each step's batch through G and end where each
    ends alone: the same latents, losses and steps per example, bit for bit."""
    from invgan_core.inversion import run_fused

    torch.manual_seed(3)
    inverter = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, small_G.latent_dim))
    x = torch.rand(6, 1, 8, 8)
    ids = torch.arange(40, 46)
    # different lengths, restarts, stopping rules, starts, constraints: they leave the batch at different steps
    jobs = [
        dict(x=x, ids=ids, steps=30, restarts=4, prune_every=5),
        dict(x=x[:1], ids=ids[:1], steps=70, init=inverter),
        dict(x=x[2:], ids=ids[2:], steps=50, restarts=2, early_stop_tol=1e-3, patience=3, optimizer="momentum", lr=0.5),
        dict(x=x[:3], ids=ids[:3], steps=20, restarts=2, constraint="clip", optimizer="sgd", lr=2.0),
    ]
    alone = [project(small_G, **job) for job in jobs]
    fused = run_fused(small_G, [lambda job=job: project(small_G, **job) for job in jobs])
    for a, f in zip(alone, fused, strict=True):  # bit for bit: every pass through G is a multiple of 8 rows
        assert torch.equal(f.z, a.z) and torch.equal(f.loss, a.loss) and torch.equal(f.iterations, a.iterations)
    assert small_G.training is False and all(p.requires_grad for p in small_G.parameters())  # restored


def test_fused_rounds_hold_every_members_rows_and_an_error_stops_nobody_else(small_G):
    from invgan_core import inversion

    x, ids = torch.rand(5, 1, 8, 8), torch.arange(5)
    seen = []
    real = inversion.FusedGenerator._run_if_ready

    def spy(self):
        seen.append(sum(len(r[0]) for r in self._pending.values()) if len(self._pending) >= self._members else None)
        real(self)

    def fails():
        project(small_G, x[:2], ids=ids[:2], steps=3)
        raise KeyError("task failed")

    inversion.FusedGenerator._run_if_ready = spy
    try:
        tasks = [lambda: project(small_G, x, ids=ids, steps=10, restarts=3), fails]
        with pytest.raises(KeyError, match="task failed"):
            inversion.run_fused(small_G, tasks)
    finally:
        inversion.FusedGenerator._run_if_ready = real
    rounds = [s for s in seen if s]
    # 15 + 2 rows for the first 3 steps and the failing task's final forward, then 15 alone (10 steps + final)
    assert rounds == [17] * 4 + [15] * 7


@pytest.mark.parametrize("weights", ["mnist5k", "digits"])
@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_step_is_bit_identical_whatever_its_batch(weights, threads):
    """On a CPU, a row's G(z), loss and gradient do not depend on how many rows go with it or which: every pass
    holds a multiple of 8 rows (padded) in pieces of at most ~64 (inversion.CPU_BLOCK, CPU_ROWS). Unpadded, small
    batches take other kernel paths that differ in the last bits (printed: 1 and 3 rows on both shipped
    generators here), enough to change where a long projection of an adversarial input ends."""
    from invgan_core.checkpoint import load_model
    from invgan_core.inversion import _one_pass, _rows_step, step_generator

    G = step_generator(load_model(ROOT / "weights" / weights / "generator", kind="generator")[0].eval())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        z = torch.randn(200, G.latent_dim)
        x = torch.rand(200, *G(z[:1]).shape[1:])
        ref = _rows_step(G, z[:64], x[:64])
        for rows in (1, 3, 5, 9, 13, 64, 65, 100, 200):
            for a, b in zip(ref, _rows_step(G, z[:rows], x[:rows]), strict=True):
                assert torch.equal(a[: min(rows, 64)], b[:64]), rows
        shuffled = torch.randperm(200)  # other rows beside it, elsewhere in the batch
        where = int((shuffled == 0).nonzero())
        for a, b in zip(ref, _rows_step(G, z[shuffled], x[shuffled]), strict=True):
            assert torch.equal(a[0], b[where])
        unpadded = [not torch.equal(ref[2][:k], _one_pass(G, z[:k], x[:k])[2]) for k in (1, 3, 5, 7, 9)]
        print(f"unpadded, batches of 1, 3, 5, 7, 9 rows differ from 8: {unpadded}")
    finally:
        torch.set_num_threads(before)
