"""Detection scores and AUC: known answers and an independent Mann-Whitney computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invgan_core.detection import detection_auc, detection_roc, detection_scores
from invgan_core.models import build_model, default_arch


def test_auc_known_answers():
    assert detection_auc([0.1, 0.2, 0.3], [0.4, 0.5]) == 1.0
    assert detection_auc([0.4, 0.5], [0.1, 0.2, 0.3]) == 0.0
    assert detection_auc([1.0, 1.0], [1.0, 1.0]) == 0.5


def test_auc_equals_the_mann_whitney_statistic():
    rng = np.random.default_rng(0)
    clean, attacked = rng.normal(0, 1, 300), rng.normal(0.7, 1, 200)
    # P(attacked > clean) + 0.5 P(tie), counted pair by pair
    pairs = attacked[:, None] - clean[None, :]
    u = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    assert detection_auc(clean, attacked) == pytest.approx(u, abs=1e-12)
    fpr, tpr = detection_roc(clean, attacked)
    assert np.trapezoid(tpr, fpr) == pytest.approx(u, abs=1e-12)


def test_auc_rejects_bad_scores():
    with pytest.raises(ValueError, match="NaN"):
        detection_auc([0.1, float("nan")], [0.2])
    with pytest.raises(ValueError, match="attacked"):
        detection_auc([0.1], [])


def test_scores_are_distances_in_feature_and_image_space():
    torch.manual_seed(0)
    f = build_model("classifier", default_arch("classifier", (1, 8, 8))).eval()
    x = torch.rand(6, 1, 8, 8)
    assert torch.equal(detection_scores(f, x, x), torch.zeros(6))
    x2 = x.clone()
    x2[:3] += 0.1
    img = detection_scores(f, x2, x, space="image")
    torch.testing.assert_close(img[:3], torch.full((3,), 0.1 * 8))  # ||0.1·1||₂ over 64 pixels
    feat = detection_scores(f, x2, x)
    torch.testing.assert_close(feat, (f.features(x2) - f.features(x)).norm(dim=1).detach())
    assert (feat[3:] == 0).all() and (feat[:3] > 0).all()
