"""Adaptive attacks: the gradient rules against exact answers, and the attacks against real models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from invgan_core.adaptive import (
    BPDA,
    NES,
    Reparameterization,
    SignCW,
    Substitute,
    Unrolled,
    bpda_logits,
    nes_logits,
    unrolled_logits,
)
from invgan_core.attacks import FGSM, LinfPGD
from invgan_core.defenses import DefenseGAN, InvGAN, NoDefense, Purified
from invgan_core.models import build_model, default_arch

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


class TinyG(nn.Module):
    """G(z) = W2 tanh(W1 z + b), d = 2 -> n = 6, float64: small enough to project exactly."""

    latent_dim, prior = 2, "normal"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.W1 = nn.Parameter(torch.randn(5, 2, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64) * 0.3)
        self.W2 = nn.Parameter(torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, z):
        return (torch.tanh(z @ self.W1.T + self.b) @ self.W2.T).reshape(len(z), 1, 1, 6)


class ExactProjection:
    """A defense whose z* = argmin ||G(z) - x||² is found by grid search and Newton's method."""

    def __init__(self, G, classifier):
        self.G, self.classifier = G, classifier

    def _solve(self, x):
        grid = torch.stack(torch.meshgrid(*[torch.linspace(-3, 3, 121, dtype=torch.float64)] * 2, indexing="ij"), -1)
        grid = grid.reshape(-1, 2)
        err = ((self.G(grid).flatten(1) - x.flatten()) ** 2).sum(1)
        z = grid[err.argmin()].clone()
        loss = lambda z: ((self.G(z[None]).flatten() - x.flatten()) ** 2).sum()  # noqa: E731
        for _ in range(50):
            g = torch.autograd.functional.jacobian(loss, z)
            H = torch.autograd.functional.hessian(loss, z)
            z = z - torch.linalg.solve(H, g)
        return z

    def purify(self, x, ids=None):
        with torch.enable_grad():
            z = torch.stack([self._solve(xi.detach()) for xi in x])  # a test oracle: exactness over speed
        return Purified(x=self.G(z).detach(), z=z, loss=torch.zeros(len(x)), effective_iterations=0)

    def predict(self, x, ids=None):
        return self.classifier(self.purify(x, ids).x).argmax(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(1)
    G = TinyG().requires_grad_(False)
    f = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double().requires_grad_(False)
    defense = ExactProjection(G, f)
    x = G(torch.tensor([[0.4, -0.7]], dtype=torch.float64)) + 0.05 * torch.randn(1, 1, 1, 6, dtype=torch.float64)
    return G, f, defense, x, torch.tensor([0])


def _loss_through(defense, f, x, y):
    return F.cross_entropy(f(defense.purify(x).x), y)


def _grad(rule, x, y):
    xv = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(rule(xv), y), xv)
    return g.flatten()


def test_unrolled_gradient_approaches_the_true_gradient_through_the_projection(tiny):
    G, f, defense, x, y = tiny
    h, fd = 1e-5, torch.zeros(6, dtype=torch.float64)
    for i in range(6):  # central finite differences of the loss through the exact projection
        e = torch.zeros_like(x).flatten()
        e[i] = h
        e = e.reshape(x.shape)
        fd[i] = (_loss_through(defense, f, x + e, y) - _loss_through(defense, f, x - e, y)) / (2 * h)
    z = defense.purify(x).z
    J = torch.autograd.functional.jacobian(lambda z: G(z[None]).flatten(), z[0])
    H_norm = torch.linalg.matrix_norm(2 / 6 * J.T @ J, 2).item()  # Gauss-Newton Hessian of the per-pixel MSE
    cos = {}
    for steps in (2, 400):
        g = _grad(unrolled_logits(defense, None, steps=steps, lr=0.5 / H_norm), x, y)
        cos[steps] = F.cosine_similarity(g, fd, dim=0).item()
    bpda = F.cosine_similarity(_grad(bpda_logits(defense, None), x, y), fd, dim=0).item()
    assert cos[400] >= 0.99, cos
    assert cos[400] > cos[2] and cos[400] > bpda  # more unrolling helps; the identity backward is cruder


def test_bpda_backward_is_the_identity():
    class Halve:
        classifier = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))

        def purify(self, x, ids=None):
            return Purified(x=x / 2, z=None, loss=torch.zeros(len(x)), effective_iterations=0)

    d = Halve()
    x = torch.rand(3, 1, 2, 2)
    y = torch.tensor([0, 1, 0])
    expected = _grad(d.classifier, x / 2, y)  # ∇ of the loss at the purified point, no 1/2 chain factor
    torch.testing.assert_close(_grad(bpda_logits(d, None), x, y), expected)


def test_nes_estimates_the_vector_jacobian_product_of_a_black_box():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).requires_grad_(False)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    exact = _grad(model, x, y)
    estimate = _grad(nes_logits(model, torch.arange(4), samples=4000, sigma=0.01, seed=0, counter=[0]), x, y)
    assert F.cosine_similarity(estimate, exact, dim=0) >= 0.95
    again = _grad(nes_logits(model, torch.arange(4), samples=4000, sigma=0.01, seed=0, counter=[0]), x, y)
    torch.testing.assert_close(again, estimate)  # deterministic given (seed, ids, call)


def test_nes_attack_reports_queries_keeps_its_budget_and_matches_white_box_pgd():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).requires_grad_(False)
    x = torch.rand(32, 1, 4, 4)
    y = model(x).argmax(1)
    pgd = LinfPGD(eps=0.5, steps=20)
    result = NES(samples=100, sigma=0.05, attack=pgd)(model, x, y)
    # queries at the iterate itself + 100 probes per gradient: 20 steps and a final check for a survivor,
    # j + 1 evaluations (each with a gradient) for an example first fooled at iterate j < 20
    survived, q = ~result.success, result.queries
    assert bool(survived.any()) and (q[survived] == 21 + 20 * 100).all()
    fell_in_loop = q[~survived] % 101 == 0
    assert bool(fell_in_loop.any()) and (q[~survived][~fell_in_loop] == 2021).all() and q.max() <= 2021
    assert result.linf.max() <= 0.5 + 1e-6 and result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    white_box = pgd(model, x, y).success.float().mean().item()
    assert 0.2 <= white_box and result.success.float().mean().item() >= white_box - 0.1


@pytest.fixture(scope="module")
def digits_models():
    from invgan_core.checkpoint import load_model
    from invgan_core.data import load_dataset

    if not (WEIGHTS / "digits" / "inverter.json").exists():
        pytest.skip("no shipped digits weights")
    models = {
        k: load_model(WEIGHTS / "digits" / k, kind=k)[0].requires_grad_(False)
        for k in ("generator", "inverter", "classifier")
    }
    test = load_dataset("digits", "test").subset(64)
    return models, test


def test_sign_cw_finds_small_adversarials_on_a_classifier(digits_models):
    m, test = digits_models
    model, x, y = m["classifier"], test.images[:32], test.labels[:32]
    correct = model(x).argmax(1) == y
    result = SignCW(steps=30, binary_search_steps=3)(model, x, y)
    assert result.success[correct].float().mean() >= 0.9
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    fgsm = FGSM(eps=0.3)(model, x, y)
    both = result.success & fgsm.success & correct
    assert result.l2[both].median() < fgsm.l2[both].median()  # minimal-distortion vs fixed budget


def test_reparameterization_breaks_the_pure_encoder(digits_models):
    m, test = digits_models
    defense = InvGAN(m["generator"], m["inverter"], m["classifier"], steps=0)
    clean = (defense.predict(test.images) == test.labels).float().mean().item()
    result = Reparameterization(attack=LinfPGD(eps=0.3, steps=20))(defense, test.images, test.labels, ids=test.ids)
    robust = 1 - result.success.float().mean().item()
    assert clean >= 0.7 and robust <= 0.2, (clean, robust)


def test_bpda_and_unrolled_run_through_a_real_defense_within_budget(digits_models):
    m, test = digits_models
    x, y, ids = test.images[:8], test.labels[:8], test.ids[:8]
    defense = InvGAN(m["generator"], m["inverter"], m["classifier"], steps=10)
    for attack in (BPDA(attack=LinfPGD(eps=0.2, steps=5)), Unrolled(unroll_steps=3, attack=LinfPGD(eps=0.2, steps=5))):
        result = attack(defense, x, y, ids=ids)
        assert result.linf.max() <= 0.2 + 1e-6
        assert torch.equal(result.success, defense.predict(result.x_adv, ids) != y)


def test_substitute_learns_the_oracle_and_its_fgsm_transfers(digits_models):
    from invgan_core.data import load_dataset

    m, test = digits_models
    oracle = m["classifier"]
    seeds = load_dataset("digits", "train").images[:150]
    torch.manual_seed(0)
    sub = build_model("classifier", default_arch("classifier", (1, 8, 8)))
    attack = Substitute(substitute=sub, seed_images=seeds, rounds=3, epochs=15, eps=0.3)
    model = attack.train(oracle)
    result = attack.bind(model, attack.queries_spent)(oracle, test.images, test.labels)
    clean_acc = (oracle(test.images).argmax(1) == test.labels).float().mean().item()
    assert attack.queries_spent == 150 + 300 + 600 and bool((result.queries == attack.queries_spent).all())
    agreement = (model(result.x_adv).argmax(1) == oracle(result.x_adv).argmax(1)).float().mean().item()
    assert agreement >= 0.5  # substitute vs oracle labels on the attacked inputs
    assert 1 - result.success.float().mean().item() <= clean_acc - 0.2  # the transfer attack does damage
    again = attack(oracle, test.images, test.labels)  # unbound, a call trains a fresh copy: same answer
    assert torch.equal(again.x_adv, result.x_adv)


class _Shrink(NoDefense):
    """A defense whose purification differs from its input (x / 2), so its reuse in the result is visible."""

    def purify(self, x, ids=None):
        p = super().purify(x, ids)
        p.x = x * 0.5
        return p


def test_the_substitute_attack_has_the_common_call_shape_and_the_two_step_transfer_result():
    """`attack.bind(model, queries)(target, x, y, ids=ids)` gives exactly what the former two-step path gave
    (`transfer`: FGSM on the trained substitute, judged by the target, every example charged the training's
    oracle labels); an unbound attack trains the same substitute against the target at the call."""
    torch.manual_seed(6)
    oracle = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).requires_grad_(False)
    with torch.no_grad():
        oracle[1].weight.mul_(10)  # labels that differ between inputs
    defense = _Shrink(oracle)
    seeds, x = torch.rand(24, 1, 4, 4), torch.rand(10, 1, 4, 4)
    y, ids = oracle(x * 0.5).argmax(1), torch.arange(50, 60)
    template = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    attack = Substitute(substitute=template, seed_images=seeds, rounds=2, epochs=5, eps=0.3)
    model = attack.train(defense)
    assert attack.queries_spent == attack.oracle_queries() == 24 + 48
    bound = attack.bind(model, attack.queries_spent)
    result = bound(defense, x, y, ids=ids)
    x_adv = FGSM(eps=0.3)(model, x, y).x_adv  # the two-step path, written out
    assert torch.equal(result.x_adv, x_adv) and not torch.equal(x_adv, x)
    assert torch.equal(result.queries, torch.full((10,), 72, dtype=torch.int64))
    assert torch.equal(result.success, defense.predict(x_adv, ids) != y) and bool(result.success.any())
    assert torch.equal(result.purified.x, x_adv * 0.5)
    unbound = attack(defense, x, y, ids=ids)
    assert torch.equal(unbound.x_adv, result.x_adv) and torch.equal(unbound.queries, result.queries)
    assert torch.equal(unbound.success, result.success)
    assert attack.model is None and bound.model is model  # bind copies: the attack itself stays unbound


def test_an_unbound_substitute_without_seeds_names_the_fix():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"attack\.bind\(model, queries\).*seed_images"):
        Substitute()(model, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))


def test_attacks_through_a_defense_refuse_a_bare_classifier():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    for attack in (BPDA(), Reparameterization(), Unrolled()):
        with pytest.raises(TypeError, match="needs a defense"):
            attack(model, torch.rand(2, 1, 4, 4), torch.tensor([0, 1]))


def test_bpda_warm_start_projects_from_the_previous_latent_and_checks_with_the_cold_defense(digits_models, monkeypatch):
    """The attacker's projections: the first is the defense's own (R x L), each later one runs `warm_steps`
    steps from the latent the previous one returned; the success flag is the real defense's prediction."""
    from invgan_core import adaptive

    m, test = digits_models
    x, y, ids = test.images[:6], test.labels[:6], torch.as_tensor(test.ids[:6])
    defense = DefenseGAN(m["generator"], m["classifier"], restarts=3, steps=15)
    real_project, real_purify = adaptive.project, defense.purify
    warm, cold = [], []

    def recording_project(G, x, *, init, steps, restarts, **kw):
        p = real_project(G, x, init=init, steps=steps, restarts=restarts, **kw)
        warm.append((init.clone(), steps, restarts, p.z.clone()))
        return p

    def recording_purify(x, ids=None):
        p = real_purify(x, ids)
        cold.append(p.z.clone())
        return p

    monkeypatch.setattr(adaptive, "project", recording_project)
    monkeypatch.setattr(defense, "purify", recording_purify)
    result = BPDA(warm_start=True, warm_steps=4, attack=LinfPGD(eps=0.3, steps=5, abs_stepsize=0.05))(
        defense, x, y, ids=ids
    )
    assert len(cold) == 2 and len(warm) == 4  # step 1 cold, steps 2-5 warm, then the cold success check
    previous = cold[0]
    for init, steps, restarts, z in warm:
        assert (steps, restarts) == (4, 1)
        torch.testing.assert_close(init, previous)
        previous = z
    monkeypatch.undo()
    assert torch.equal(result.success, defense.predict(result.x_adv, ids) != y)
    torch.testing.assert_close(result.purified.x, defense.purify(result.x_adv, ids).x)


def test_bpda_warm_start_does_the_damage_cold_bpda_must_do(digits_models):
    """The bar tests/core/test_adaptive_strength.py sets for cold BPDA, met with warm starts: accuracy far
    below clean on real digits through Defense-GAN 4 x 50 (measured on 32: warm 0.00-0.06, cold 0.03)."""
    m, test = digits_models
    x, y, ids = test.images[:16], test.labels[:16], torch.as_tensor(test.ids[:16])
    defense = DefenseGAN(m["generator"], m["classifier"], restarts=4, steps=50)
    clean = (defense.predict(x, ids) == y).float().mean().item()
    result = BPDA(warm_start=True, warm_steps=10, attack=LinfPGD(eps=0.3, steps=10, abs_stepsize=0.05))(
        defense, x, y, ids=ids
    )
    robust = 1 - result.success.float().mean().item()
    assert clean >= 0.8 and robust <= clean - 0.6, (clean, robust)


def test_bpda_refuses_a_warm_budget_of_no_steps():
    with pytest.raises(ValueError, match="warm_steps"):
        BPDA(warm_start=True, warm_steps=0)


def test_bpda_drops_fallen_examples_without_changing_anyones_result(digits_models):
    """The loop rebinds the defense to the examples still standing: each example's adversarial, success and
    queries are those of attacking it alone (Defense-GAN keys its random restarts by example id, so a
    wrong id after a restriction would change them), and fallen examples cost no more projections."""
    m, test = digits_models
    x, y, ids = test.images[:8], test.labels[:8], torch.as_tensor(test.ids[:8])
    defense = DefenseGAN(m["generator"], m["classifier"], restarts=2, steps=10)
    attack = BPDA(attack=LinfPGD(eps=0.2, steps=6, abs_stepsize=0.03))
    together = attack(defense, x, y, ids=ids)
    assert 0 < int(together.success.sum()) < len(x) and int(together.queries.min()) < 7  # some fall early
    for i in range(len(x)):
        alone = attack(defense, x[i : i + 1], y[i : i + 1], ids=ids[i : i + 1])
        torch.testing.assert_close(alone.x_adv[0], together.x_adv[i])
        assert (bool(alone.success[0]), int(alone.queries[0])) == (bool(together.success[i]), int(together.queries[i]))


def test_a_randomized_defensegan_draws_fresh_restarts_per_call_and_a_derandomized_one_does_not(digits_models):
    models, test = digits_models
    x, ids = test.images[:4], torch.as_tensor(test.ids[:4])
    kw = dict(restarts=3, steps=5, seed=7)
    fixed = DefenseGAN(models["generator"], models["classifier"], **kw)
    fresh = DefenseGAN(models["generator"], models["classifier"], randomized=True, **kw)
    torch.testing.assert_close(fixed.purify(x, ids).z, fixed.purify(x, ids).z)
    a, b = fresh.purify(x, ids).z, fresh.purify(x, ids).z
    assert (a - b).abs().amax(1).min() > 1e-3  # every example's kept latent moved: new starts, not a shared one
    with pytest.raises(ValueError, match="randomized"):
        DefenseGAN(models["generator"], models["classifier"], randomized="yes")


def test_bpda_eot_averages_the_single_draw_gradients_weighted_by_each_draws_probability(digits_models):
    """EOT over K draws, one batch of K copies, logits log E_k[p_k]: the cross-entropy gradient of example i is
    sum_k w_ki g_ki, with g_ki the gradient of draw k alone (BPDA with ids + k * EOT_ID_STRIDE: a derandomised
    defense reproduces each copy) and w_ki = p_ki(y) / sum_j p_ji(y). Predictions: the argmax of the mean p."""
    from invgan_core.adaptive import EOT_ID_STRIDE

    models, test = digits_models
    defense = DefenseGAN(models["generator"], models["classifier"], restarts=2, steps=4)
    x, y, ids = test.images[:3], test.labels[:3], torch.as_tensor(test.ids[:3])
    k = 3
    eot = _grad(bpda_logits(defense, ids, eot=k), x, y).view(len(x), -1)
    rules = [bpda_logits(defense, ids + i * EOT_ID_STRIDE) for i in range(k)]
    singles = torch.stack([_grad(f, x, y).view(len(x), -1) for f in rules])  # (K, N, D)
    with torch.no_grad():
        probs = torch.stack([f(x).softmax(1) for f in rules])  # (K, N, C)
    p_y = probs[:, torch.arange(len(x)), y]  # (K, N)
    expected = ((p_y / p_y.sum(0))[..., None] * singles).sum(0)
    torch.testing.assert_close(eot, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(singles[0], singles[1])  # the copies really are different draws
    with torch.no_grad():
        torch.testing.assert_close(bpda_logits(defense, ids, eot=k)(x).exp(), probs.mean(0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eot"):
        BPDA(eot=0)
    with pytest.raises(ValueError, match="warm"):
        BPDA(eot=2, warm_start=True)
