"""Counter-based randomness: a correct 64-bit mix, good marginals, and batch-independent draws."""

from __future__ import annotations

import pytest
import torch

from invgan_core import rng

N_KEYS = 200_000
U64 = (1 << 64) - 1


def reference_mix(x: int) -> int:
    """The same mix in plain Python on unsigned 64-bit integers (logical shifts), as signed int64."""
    x = (x * 0x9E3779B97F4A7C15) & U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & U64
    x ^= x >> 31
    return x - (1 << 64) if x >> 63 else x


@pytest.fixture(scope="module")
def keys():
    return torch.arange(N_KEYS, dtype=torch.int64)  # consecutive keys: the hardest case for a weak hash


@pytest.mark.parametrize("x", [0, 1, 2, 12345, -1, -(2**63), 2**63 - 1, 0x0123456789ABCDEF])
def test_mix_matches_unsigned_reference(x):
    assert rng._mix(torch.tensor([x], dtype=torch.int64)).item() == reference_mix(x & U64)


def test_mix_output_uses_the_sign_bit(keys):
    mixed = rng._mix(keys[:10_000])
    assert 0.45 < (mixed < 0).double().mean() < 0.55  # the top bit is as random as the rest


def test_uniform_moments_and_range(keys):
    u = rng.uniform(keys).double()
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005
    assert abs(u.var() - 1 / 12) < 0.005


def test_uniform_passes_kolmogorov_smirnov(keys):
    u, _ = torch.sort(rng.uniform(keys).double())
    i = torch.arange(1, N_KEYS + 1, dtype=torch.float64)
    d = torch.maximum(i / N_KEYS - u, u - (i - 1) / N_KEYS).max().item()
    assert d < 0.01  # the 1% critical value at n = 200k is ~0.0036


def test_normal_moments(keys):
    x = rng.normal(keys).double()
    assert abs(x.mean()) < 0.01
    assert abs(x.std() - 1) < 0.01
    assert abs((x.abs() < 1).double().mean() - 0.6827) < 0.01  # the one-sigma mass


def test_uniform_and_normal_are_deterministic(keys):
    k = keys[:1000]
    assert torch.equal(rng.uniform(k), rng.uniform(k.clone()))
    assert torch.equal(rng.normal(k), rng.normal(k.clone()))


@pytest.mark.parametrize("prior", ["normal", "uniform"])
def test_sample_latents_are_batch_independent(prior):
    small = rng.sample_latents(prior, 7, torch.tensor([5, 9]), restarts=3, dim=4)
    big = rng.sample_latents(prior, 7, torch.tensor([1, 5, 7, 9]), restarts=3, dim=4)
    assert small.shape == (2, 3, 4) and big.shape == (4, 3, 4) and small.dtype == torch.float32
    assert torch.equal(small, big[[1, 3]])
    alone = rng.sample_latents(prior, 7, torch.tensor([9]), restarts=3, dim=4)
    assert torch.equal(alone[0], big[3])


@pytest.mark.parametrize("prior", ["normal", "uniform"])
@pytest.mark.parametrize(
    "other",
    [
        dict(seed=1),  # another seed
        dict(ids=torch.arange(1, 65)),  # other examples
    ],
)
def test_different_counters_give_different_draws(prior, other):
    base = dict(prior=prior, seed=0, ids=torch.arange(64), restarts=2, dim=8)
    a = rng.sample_latents(**base)
    b = rng.sample_latents(**{**base, **other})
    assert (a == b).double().mean() < 0.01
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.15


def test_restarts_coordinates_and_steps_are_distinct():
    ids = torch.arange(32)
    z = rng.sample_latents("normal", 0, ids, restarts=4, dim=8)
    assert not torch.equal(z[:, 0], z[:, 1])  # restarts differ
    assert not torch.equal(z[..., 0], z[..., 1])  # coordinates differ
    step3, step4 = (rng.uniform(rng.latent_keys(0, ids, 4, 8, step=s)) for s in (3, 4))
    assert (step3 == step4).double().mean() < 0.01


def test_uniform_prior_fills_the_box():
    z = rng.sample_latents("uniform", 3, torch.arange(500), restarts=4, dim=10)
    assert z.min() >= -1 and z.max() <= 1
    assert z.min() < -0.99 and z.max() > 0.99  # both halves of the box are reached
    assert abs(z.mean()) < 0.02


def test_unknown_prior_raises():
    with pytest.raises(ValueError, match="laplace"):
        rng.sample_latents("laplace", 0, torch.arange(2), 1, 2)
