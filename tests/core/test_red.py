"""RED (`invgan_core.red`): the prox, λ_max, monotone proximal gradient, linear convergence on realizable
instances, attack-type recovery on digits, batch independence, dictionary files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from invgan_core import red, red_theory, rng
from invgan_core.checkpoint import CheckpointError

WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "digits"


def _random_dictionary(n=20, per_block=3, num_classes=3, types=2, seed=0, dtype=torch.float64, correlated=0.0):
    g = torch.Generator().manual_seed(seed)
    k = per_block * num_classes * types
    D = torch.randn(n, k, generator=g, dtype=dtype)
    D = D + correlated * torch.randn(n, 1, generator=g, dtype=dtype)  # a shared direction: ill-conditioned DᵀD
    b = torch.arange(k) // per_block
    return red.AttackDictionary(
        D=D,
        classes=b // types,
        attack_types=b % types,
        attack_names=[f"t{j}" for j in range(types)],
        num_classes=num_classes,
    )


# ---------------------------------------------------------------- the prox and λ_max


def test_prox_is_block_soft_thresholding_and_minimises_its_objective():
    g = torch.Generator().manual_seed(1)
    blocks = [torch.tensor([0, 4, 7]), torch.tensor([1, 2]), torch.tensor([3, 5, 6, 8, 9]), torch.tensor([10])]
    c = torch.randn(6, 11, generator=g, dtype=torch.float64) * 2
    c[0, blocks[1]] = 0.0  # a zero block stays zero
    tau = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.0, 0.0], dtype=torch.float64)
    p = red.block_soft_threshold(c, blocks, tau)
    for n in range(6):
        for idx in blocks:
            norm = c[n, idx].norm()
            expected = torch.clamp(1 - tau[n] / norm, min=0) * c[n, idx] if norm > 0 else torch.zeros(len(idx))
            torch.testing.assert_close(p[n, idx], expected.to(p.dtype), atol=1e-12, rtol=0)
    assert (red.block_norms(p, blocks) == 0).any() and (red.block_norms(p, blocks) > 0).any()  # both regimes hit

    def objective(v):  # ½||v − c||² + τ h(v), the function the prox minimises
        return 0.5 * ((v - c) ** 2).sum(1) + tau * red.group_norm(v, blocks)

    best = objective(p)
    for scale in (1e-4, 1e-2, 1.0):
        for _ in range(50):
            assert (objective(p + scale * torch.randn(c.shape, generator=g, dtype=c.dtype)) >= best - 1e-12).all()


def test_lambda_max_is_where_zero_becomes_optimal():
    dic = _random_dictionary()
    W = torch.randn(20, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    G = red_theory.OneLayerGenerator(W)
    x = torch.randn(5, 1, 1, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    z0 = torch.randn(5, 4, dtype=torch.float64)
    s = x.flatten(1) - G(z0).flatten(1)
    lmax = red.lambda_max(dic.D, s, dic.blocks())
    torch.testing.assert_close(lmax, torch.stack([(dic.D[:, i].T @ s.T).norm(dim=0) for i in dic.blocks()]).amax(0))
    at = red.red_solve(G, x, D=dic, z0=z0, lam_multiplier=1.0, fixed_z=True, steps=300)
    assert at.c.abs().max() < 1e-12  # the boundary: zero up to rounding
    above = red.red_solve(G, x, D=dic, z0=z0, lam_multiplier=1.0 + 1e-6, fixed_z=True, steps=300)
    assert (above.c == 0).all()
    below = red.red_solve(G, x, D=dic, z0=z0, lam_multiplier=0.97, fixed_z=True, steps=300)
    assert (below.c.abs().sum(1) > 0).all()
    assert (below.objective < 0.5 * (s**2).sum(1) - 1e-9).all()  # strictly better than c = 0
    # optimality of c = 0 at λ_max, checked directly: no small move lowers ½||s − Dc||² + λ_max h(c)
    for _ in range(50):
        v = 1e-3 * torch.randn(5, dic.D.shape[1], dtype=torch.float64)
        value = 0.5 * ((s - v @ dic.D.T) ** 2).sum(1) + lmax * red.group_norm(v, dic.blocks())
        assert (value >= 0.5 * (s**2).sum(1) - 1e-12).all()


@pytest.mark.parametrize("nesterov", [False, True])
def test_objective_never_increases_with_z_fixed(nesterov):
    dic = _random_dictionary(n=30, per_block=5, correlated=3.0)
    W = torch.randn(30, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    G = red_theory.OneLayerGenerator(W)
    x = torch.randn(8, 1, 1, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    res = red.red_solve(
        G, x, D=dic, z0=z0, lam_multiplier=0.2, fixed_z=True, steps=400, nesterov=nesterov, keep_trace=True
    )
    assert torch.equal(res.z, z0)
    steps = res.trace.diff(dim=1)
    assert (steps <= 1e-12 * res.trace[:, :1]).all()
    assert (res.trace[:, -1] < res.trace[:, 0]).all()
    torch.testing.assert_close(res.trace[:, -1], res.objective)


def test_nesterov_converges_at_least_as_fast_as_plain_proximal_gradient():
    dic = _random_dictionary(n=30, per_block=5, correlated=3.0)
    W = torch.randn(30, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    G = red_theory.OneLayerGenerator(W)
    x = torch.randn(8, 1, 1, 30, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z0 = torch.zeros(8, 4, dtype=torch.float64)
    lam = torch.full((8,), 0.5, dtype=torch.float64)
    runs = {
        nest: red.red_solve(G, x, D=dic, z0=z0, lam=lam, fixed_z=True, steps=3000, nesterov=nest, keep_trace=True)
        for nest in (False, True)
    }
    best = torch.minimum(runs[False].trace.amin(1), runs[True].trace.amin(1))[:, None]
    gap = {nest: (r.trace - best)[:, [25, 50, 100, 200]] for nest, r in runs.items()}
    assert (gap[True] <= gap[False] + 1e-12).all()
    assert gap[True][:, 2].mean() < 0.25 * gap[False][:, 2].mean()  # clearly faster at 100 steps (measured 0.10×)


# ---------------------------------------------------------------- theory: realizable instances (Sec. 5.1, App. B.1)


@pytest.mark.parametrize("activation", ["leaky_relu", "softplus"])
def test_converges_linearly_to_the_truth_on_a_realizable_instance(activation):
    inst = red_theory.realizable_instance(m=100, d=10, n=6, activation=activation, seed=0)
    out = red_theory.convergence_trace(inst, steps=800)
    dist2 = out["dist2"]
    rel = dist2 / dist2[:, :1]
    assert (rel[:, -1] < 1e-6).all()
    assert (out["rate"] < 0.99).all()  # negative slope of log dist² vs k
    for i in range(len(rel)):  # linear: every 100 steps shrink dist² at least 4× until rounding level
        live = np.nonzero(rel[i] > 1e-18)[0]
        windows = live[live + 100 <= live.max()]
        assert (rel[i, windows + 100] <= 0.25 * rel[i, windows]).all()
    assert out["attack_correct"].all()
    mu = out["mu"][~np.isnan(out["mu"])]
    assert mu.size > 100 and mu.min() > 0


def test_error_bound_parameter_grows_with_output_dimension():
    """Fig. 1: expansive generators (m ≫ d) have a larger μ along the path."""
    fig = red_theory.mu_vs_output_dim([30, 300], n=4, steps=400)
    assert fig["mean_mu"][1] > 2 * fig["mean_mu"][0] > 0


def test_mu_is_the_gradient_to_distance_ratio_at_a_known_point():
    inst = red_theory.realizable_instance(m=40, d=3, n=2, per_block=1, seed=1)
    G, D = inst.G, inst.dictionary.D
    z = inst.z_star + 0.1
    c = inst.c_star.clone()
    r = inst.x.flatten(1) - G(z).flatten(1) - c @ D.T
    zz = z.clone().requires_grad_(True)
    with torch.enable_grad():
        (gz,) = torch.autograd.grad(((inst.x.flatten(1) - G(zz).flatten(1) - c @ D.T) ** 2).sum(), zz)
    expected = ((gz**2).sum(1) + ((2 * r @ D) ** 2).sum(1)).sqrt() / (0.1 * 3**0.5)
    mu = red_theory.trajectory_mu(G, inst.x, z[None], c[None], D, inst.z_star, inst.c_star)
    torch.testing.assert_close(mu[:, 0], expected)


# ---------------------------------------------------------------- digits: the shipped classifier and generator


@pytest.fixture(scope="module")
def digits():
    from invgan_core.checkpoint import load_model
    from invgan_core.data import load_dataset

    if not (WEIGHTS / "generator.json").exists():
        pytest.skip("no shipped digits weights")
    torch.set_num_threads(1)
    G = load_model(WEIGHTS / "generator", kind="generator")[0]
    f = load_model(WEIGHTS / "classifier", kind="classifier")[0]
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    attacks = {name: red.PAPER_MNIST_ATTACKS[name](seed=0) for name in ("linf", "l2")}  # App. B.2 budgets
    dic = red.build_attack_dictionary(
        f, train.images, train.labels, attacks, per_class=5, seed=0, ids=torch.as_tensor(train.ids)
    )
    n = 20
    x, y, ids = test.images[:n], test.labels[:n], torch.as_tensor(test.ids[:n])
    x_adv = torch.cat([attack(f, x, y, ids=ids).x_adv for attack in attacks.values()])
    return {
        "G": G,
        "f": f,
        "train": train,
        "test": test,
        "dic": dic,
        "x_adv": x_adv,
        "y": y.repeat(2),
        "attack": torch.arange(2).repeat_interleave(n),
        "ids": torch.cat([ids, ids + 10**6]),
    }


def test_dictionary_columns_are_the_attacks_in_block_order(digits):
    dic, train = digits["dic"], digits["train"]
    assert dic.D.shape == (64, 10 * 2 * 5) and dic.attack_names == ["linf", "l2"]
    for b, idx in enumerate(dic.blocks()):
        assert len(idx) == 5 and (dic.classes[idx] == b // 2).all() and (dic.attack_types[idx] == b % 2).all()
    assert torch.equal(train.labels[dic.source_index], dic.classes)
    linf, l2 = dic.D[:, dic.attack_types == 0], dic.D[:, dic.attack_types == 1]
    assert linf.abs().max() <= 0.3 + 1e-6 and l2.norm(dim=0).max() <= 2.0 + 1e-5
    assert dic.success.float().mean() > 0.9


def test_bsd_gan_ad_tells_linf_from_l2_attacks(digits):
    G, f, dic, x = digits["G"], digits["f"], digits["dic"], digits["x_adv"]
    z0 = red.initial_latents(G, x, digits["ids"], "defensegan", seed=0)
    res = red.red_solve(G, x, D=dic, z0=z0, steps=500, classifier=f)
    accuracy = (res.attack_type == digits["attack"]).float().mean().item()
    assert accuracy >= 0.7, f"attack-type accuracy {accuracy:.3f} on 40 examples (chance 0.5)"  # measured 0.80
    assert res.block_norms.shape == (40, 10, 2) and res.signal_class.shape == (40,)


def test_sbsc_classifies_clean_digits_as_a_union_of_subspaces(digits):
    train, test = digits["train"], digits["test"]
    Ds, classes = red.signal_dictionary(train.images, train.labels, per_class=20, seed=0)
    res = red.sbsc_solve(test.images[:100], Ds=Ds, s_classes=classes, D=digits["dic"], keep_trace=True)
    assert (res.signal_class == test.labels[:100]).float().mean() >= 0.8  # measured 0.91
    assert (res.trace.diff(dim=1) <= 1e-5 * res.trace[:, :1]).all()  # monotone (no z: pure prox gradient)


def test_a_batch_of_64_gives_the_per_example_results(digits):
    G, dic = digits["G"], digits["dic"]
    x = torch.cat([digits["x_adv"], digits["test"].images[40:64]])
    ids = torch.cat([digits["ids"], torch.arange(40, 64)])
    z0 = rng.sample_latents("normal", 3, ids, 1, G.latent_dim)[:, 0]
    batch = red.red_solve(G, x, D=dic, z0=z0, steps=500)
    for i in (0, 25, 63):
        alone = red.red_solve(G, x[i : i + 1], D=dic, z0=z0[i : i + 1], steps=500)
        torch.testing.assert_close(alone.z[0], batch.z[i], atol=1e-4, rtol=0)
        torch.testing.assert_close(alone.c[0], batch.c[i], atol=1e-4, rtol=0)
        assert alone.attack_type[0] == batch.attack_type[i]


def test_dictionary_file_round_trip_and_tamper_check(digits, tmp_path):
    dic = digits["dic"]
    manifest = red.save_dictionary(tmp_path / "dic", dic, dataset="digits", per_class=5)
    loaded, read = red.load_dictionary(tmp_path / "dic")
    assert read == manifest and read["per_class"] == 5
    for name in ("D", "classes", "attack_types", "source_index", "success"):
        assert torch.equal(getattr(loaded, name), getattr(dic, name))
    assert loaded.attack_names == dic.attack_names and loaded.image_shape == dic.image_shape
    path = tmp_path / "dic.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        red.load_dictionary(tmp_path / "dic")
