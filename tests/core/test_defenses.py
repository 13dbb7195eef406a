"""Defenses: the common interface, and each defense's defining property on the shipped digits models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from invgan_core.defenses import ClippedProjection, DefenseGAN, InvGAN, NoDefense

WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "digits"


@pytest.fixture(scope="module")
def models():
    from invgan_core.checkpoint import load_model
    from invgan_core.data import load_dataset

    if not (WEIGHTS / "inverter.json").exists():
        pytest.skip("no shipped digits weights")
    m = {
        k: load_model(WEIGHTS / k, kind=k.split("-")[0])[0]
        for k in ("generator", "inverter", "classifier", "generator-uniform")
    }
    return m, load_dataset("digits", "test").subset(24)


def test_no_defense_is_the_identity(models):
    m, t = models
    d = NoDefense(m["classifier"])
    p = d.purify(t.images, t.ids)
    assert torch.equal(p.x, t.images) and p.effective_iterations == 0 and p.x_proj is p.x
    assert torch.equal(d.predict(t.images), m["classifier"](t.images).argmax(1))


def test_invgan_with_zero_steps_is_the_encoder(models):
    m, t = models
    p = InvGAN(m["generator"], m["inverter"], m["classifier"], steps=0).purify(t.images, t.ids)
    with torch.no_grad():
        torch.testing.assert_close(p.x, m["generator"](m["inverter"](t.images)))
    assert p.effective_iterations == 1  # one encoder pass


def test_projection_steps_lower_the_reconstruction_error_and_count_iterations(models):
    m, t = models
    G, I, f = m["generator"], m["inverter"], m["classifier"]
    t0 = InvGAN(G, I, f, steps=0).purify(t.images, t.ids)
    t50 = InvGAN(G, I, f, steps=50).purify(t.images, t.ids)
    dg = DefenseGAN(G, f, restarts=4, steps=50).purify(t.images, t.ids)
    assert t50.loss.mean() < t0.loss.mean()
    assert dg.effective_iterations == 200 and t50.effective_iterations == 50
    d = DefenseGAN(G, f, restarts=4, steps=50)
    assert torch.equal(d.predict(t.images, t.ids), f(dg.x).argmax(1))  # deterministic per example id


def test_clipped_projection_needs_a_uniform_prior_and_stays_in_the_box(models):
    m, t = models
    with pytest.raises(ValueError, match="uniform prior"):
        ClippedProjection(m["generator"], m["classifier"])
    p = ClippedProjection(m["generator-uniform"], m["classifier"], steps=50).purify(t.images, t.ids)
    assert p.z.abs().max() <= 1


def test_an_example_gets_the_same_result_alone_as_in_a_batch_of_256(models):
    from invgan_core.data import load_dataset

    m, _ = models
    t = load_dataset("digits", "test").subset(256)
    for d in (
        DefenseGAN(m["generator"], m["classifier"], restarts=3, steps=100),
        InvGAN(m["generator"], m["inverter"], m["classifier"], steps=100),
    ):
        batch = d.purify(t.images, t.ids)
        batch_pred = m["classifier"](batch.x).argmax(1)
        for i in (0, 101, 255):
            alone = d.purify(t.images[i : i + 1], t.ids[i : i + 1])
            torch.testing.assert_close(alone.z[0], batch.z[i], atol=1e-4, rtol=0)
            assert m["classifier"](alone.x).argmax(1).item() == batch_pred[i].item()


@pytest.mark.parametrize(
    "key, bad",
    [
        ("prune_every", 0),
        ("prune_every", 2.5),
        ("patience", 0),
        ("patience", True),
        ("early_stop_tol", -1e-4),
        ("early_stop_tol", float("nan")),
    ],
)
def test_pruning_and_early_stopping_parameters_are_refused_naming_them(key, bad):
    with pytest.raises(ValueError, match=key):
        DefenseGAN.check_params({key: bad})
    DefenseGAN.check_params({"prune_every": None, "early_stop_tol": None, "patience": 20})  # the defaults pass


def test_defensegan_with_pruning_reports_the_restart_steps_it_spent(models):
    m, t = models
    G, f = m["generator"], m["classifier"]
    plain = DefenseGAN(G, f, restarts=4, steps=40).purify(t.images, t.ids)
    cheap = DefenseGAN(G, f, restarts=4, steps=40, prune_every=10, early_stop_tol=1e-4, patience=5).purify(
        t.images, t.ids
    )
    assert plain.effective_iterations == 160 and plain.iterations.tolist() == [160] * len(t.images)
    assert (cheap.iterations <= 4 * 10 + 2 * 10 + 20).all()  # halving 4 -> 2 -> 1, maybe stopped earlier
    assert cheap.effective_iterations == pytest.approx(cheap.iterations.double().mean().item())
    assert cheap.loss.mean() < 1.5 * plain.loss.mean()  # a cheaper projection, not a broken one
