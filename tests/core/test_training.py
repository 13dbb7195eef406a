"""Losses and training steps: closed forms on linear models, and the InvGAN objective's known answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from invgan_core import training


class LinearCritic(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.lin = nn.Linear(n, 1)

    def forward(self, x):
        return self.lin(x.flatten(1)).squeeze(1)


class LinearGenerator(nn.Module):
    """G(z) = W z reshaped to (N, 1, 1, n): invertible by the pseudo-inverse."""

    def __init__(self, d: int = 4, n: int = 12, prior: str = "normal"):
        super().__init__()
        self.latent_dim, self.prior = d, prior
        self.lin = nn.Linear(d, n, bias=False)

    def forward(self, z):
        return self.lin(z).reshape(len(z), 1, 1, -1)


def test_gradient_penalty_of_a_linear_critic_is_closed_form():
    torch.manual_seed(0)
    D = LinearCritic(12)
    real, fake = torch.rand(16, 1, 1, 12), torch.rand(16, 1, 1, 12)
    expected = (D.lin.weight.norm() - 1) ** 2  # ∇_x D = w for every interpolate
    torch.testing.assert_close(training.gradient_penalty(D, real, fake), expected)


def test_wgan_critic_loss_is_score_gap_plus_penalty():
    torch.manual_seed(1)
    D = LinearCritic(12)
    real, fake = torch.rand(8, 1, 1, 12), torch.rand(8, 1, 1, 12)
    gap = D(fake).mean() - D(real).mean()
    expected = gap + 10 * (D.lin.weight.norm() - 1) ** 2
    torch.testing.assert_close(training.discriminator_loss(D, real, fake, "wgan-gp"), expected)


def test_dcgan_losses_at_zero_logits_are_log2():
    D = LinearCritic(12)
    nn.init.zeros_(D.lin.weight), nn.init.zeros_(D.lin.bias)
    x = torch.rand(4, 1, 1, 12)
    assert training.discriminator_loss(D, x, x, "dcgan").item() == pytest.approx(2 * math.log(2))
    assert training.generator_loss(D, x, "dcgan").item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="unknown GAN loss"):
        training.generator_loss(D, x, "hinge")


def test_inverter_objective_with_an_exact_inverse():
    """I = pinv(W): L_latent = 0 and the hinge makes L_semantic exactly η."""
    torch.manual_seed(2)
    G = LinearGenerator()
    I = nn.Linear(12, 4, bias=False)
    with torch.no_grad():
        I.weight.copy_(torch.linalg.pinv(G.lin.weight))
    inv = nn.Sequential(nn.Flatten(), I)
    z = torch.randn(32, 4)
    w = training.InverterWeights(adv=0.0, semantic=100.0, latent=1.0, eta=0.5)
    losses = training.inverter_losses(G, inv, None, z, w)
    assert losses["latent"].item() < 1e-5
    assert losses["semantic"].item() == pytest.approx(0.5)
    assert losses["total"].item() == pytest.approx(100 * 0.5 + losses["latent"].item(), rel=1e-6)
    w0 = training.InverterWeights(adv=0.0, semantic=1.0, latent=0.0, eta=0.0)  # the Table 5 ablation
    assert training.inverter_losses(G, inv, None, z, w0)["semantic"].item() < 1e-4


def test_inverter_step_learns_the_inverse_of_a_linear_generator():
    torch.manual_seed(3)
    G = LinearGenerator().requires_grad_(False)
    inv = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    D = LinearCritic(12)
    opt_i, opt_d = torch.optim.Adam(inv.parameters(), 1e-2), torch.optim.Adam(D.parameters(), 1e-3)
    w = training.InverterWeights(adv=1.0, semantic=1.0, latent=1.0, eta=0.0)
    first = training.inverter_step(G, inv, D, opt_i, opt_d, torch.randn(64, 4), w)
    for _ in range(300):
        last = training.inverter_step(G, inv, D, opt_i, opt_d, torch.randn(64, 4), w)
    assert last["latent"] < 0.1 * first["latent"]
    assert G.lin.weight.grad is None  # G stays frozen


def test_random_shift_translates_each_image_within_the_bound():
    torch.manual_seed(4)
    x = torch.zeros(64, 1, 10, 10)
    x[:, 0, 4, 5] = 1.0  # one bright pixel, far enough from the border that nothing falls off
    y = training.random_shift(x, 2)
    assert torch.equal(y.sum((1, 2, 3)), x.sum((1, 2, 3)))
    pos = y[:, 0].flatten(1).argmax(1)
    dr, dc = pos // 10 - 4, pos % 10 - 5
    assert dr.abs().max() <= 2 and dc.abs().max() <= 2
    assert len(set(zip(dr.tolist(), dc.tolist(), strict=True))) > 10  # the offsets vary per example
    assert torch.equal(training.random_shift(x, 0), x)
