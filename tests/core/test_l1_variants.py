"""The two ℓ1 PGD step rules: SparseL1Descent (our default, quantile 0.99) and AdvTorch's L1PGDAttack
(the one RED's authors used: one coordinate, the largest |∇|, per step), which `quantile: 1.0` gives.

The reference below is AdvTorch's `perturb_iterative` ord=1 rule written out (top-k of |∇|, sign,
divided by the count, times eps_iter), applied where neither the ℓ1 ball nor the box binds, so both
implementations must agree exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from invgan_core.attacks import L1PGD


def advertorch_l1_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps_iter: float, k: int) -> torch.Tensor:
    """One step of AdvTorch's ord=1 rule with `k` coordinates (L1PGDAttack: k = 1)."""
    x = x.clone().requires_grad_(True)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    grad = x.grad
    view = grad.abs().flatten(1)
    vals, idx = view.topk(k)
    mask = torch.zeros_like(view).scatter_(1, idx, vals).view_as(grad) > 0
    step = grad.sign() * mask
    step = step / step.flatten(1).abs().sum(1).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x + eps_iter * step).detach()


def linear_model(n_pixels: int = 64, classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(n_pixels, classes))
    return model.double()


def test_quantile_one_is_advertorchs_l1pgd_step_by_step():
    model = linear_model()
    x = torch.full((4, 1, 8, 8), 0.5, dtype=torch.float64) + torch.rand(4, 1, 8, 8, dtype=torch.float64) * 0.1
    y = torch.tensor([0, 3, 5, 9])
    ours = L1PGD(eps=10.0, abs_stepsize=0.05, steps=1, quantile=1.0, random_start=False)
    ref = x
    mine = x
    for _ in range(5):  # 5 steps of 0.05: far from the ball's edge (10) and the box's faces
        ref = advertorch_l1_step(model, ref, y, 0.05, k=1)
        mine, _ = ours.run(lambda t: model(t), mine, y, torch.arange(4))
        assert torch.allclose(mine, ref, atol=1e-12)
    changed = ((mine - x).abs() > 0).flatten(1).sum(1)
    assert (changed <= 5).all()  # at most one new coordinate per step


def test_default_quantile_spreads_each_step_over_the_top_one_percent():
    model = linear_model(n_pixels=400)
    x = torch.full((2, 1, 20, 20), 0.5, dtype=torch.float64)
    y = torch.tensor([1, 2])
    out, _ = L1PGD(eps=10.0, abs_stepsize=0.8, steps=1, random_start=False).run(
        lambda t: model(t), x, y, torch.arange(2)
    )
    moved = (out - x).flatten(1)
    assert torch.allclose(moved.abs().sum(1), torch.full((2,), 0.8, dtype=torch.float64))
    assert ((moved != 0).sum(1) == 4).all()  # 1 % of 400 coordinates share the step
    ref = advertorch_l1_step(model, x, y, 0.8, k=4)  # = AdvTorch's SparseL1Descent with l1_sparsity 0.99
    assert torch.allclose(out, ref, atol=1e-12)
