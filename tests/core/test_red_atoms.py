"""Unit-norm attack atoms: the same directions as the raw dictionary, each of length 1."""

from __future__ import annotations

import torch
from torch import nn

from invgan_core.attacks import L2PGD, LinfPGD
from invgan_core.red import build_attack_dictionary


def test_normalized_atoms_have_unit_length_and_the_raw_directions():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Flatten(), nn.Linear(36, 3))
    images, labels = torch.rand(30, 1, 6, 6), torch.arange(30) % 3
    attacks = {"linf": LinfPGD(eps=0.3, steps=3), "l2": L2PGD(eps=0.5, steps=3)}
    raw = build_attack_dictionary(f, images, labels, attacks, per_class=4)
    unit = build_attack_dictionary(f, images, labels, attacks, per_class=4, normalize_atoms=True)
    lengths = raw.D.norm(dim=0)
    assert lengths[raw.attack_types == 0].mean() > 2 * lengths[raw.attack_types == 1].mean()  # why it matters
    assert torch.allclose(unit.D.norm(dim=0), torch.ones(unit.D.shape[1]), atol=1e-5)
    assert torch.allclose(unit.D * lengths, raw.D, atol=1e-5)
    assert torch.equal(unit.classes, raw.classes) and torch.equal(unit.attack_types, raw.attack_types)
