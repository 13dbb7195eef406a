"""Attack detection from the projection residual (InvGAN eq. 7) and its ROC AUC.

A(x) = ||Φ(x) - Φ(x_proj)||₂ with Φ the classifier without its last layer; the image-space variant
||x - x_proj||₂ is the ablation. Adversarial inputs lie off G's range, so they project farther away.
"""

from __future__ import annotations

from typing import Callable, cast

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve
from torch import nn

SPACES = ("feature", "image")


@torch.no_grad()
def detection_scores(
    classifier: nn.Module, x: torch.Tensor, x_proj: torch.Tensor, space: str = "feature"
) -> torch.Tensor:
    """Per-example score A(x) (N,): larger means more likely attacked."""
    if space == "feature":
        # `features` is a method of Classifier; typed as nn.Module, mypy would read it as a submodule or buffer
        features = cast(Callable[[torch.Tensor], torch.Tensor], classifier.features)
        return (features(x) - features(x_proj)).norm(dim=1)
    if space == "image":
        return (x - x_proj).flatten(1).norm(dim=1)
    raise ValueError(f"unknown detection space {space!r}; choose one of {SPACES}")


def _labelled(clean, attacked) -> tuple[np.ndarray, np.ndarray]:
    clean, attacked = np.asarray(clean, dtype=np.float64).ravel(), np.asarray(attacked, dtype=np.float64).ravel()
    if len(clean) == 0 or len(attacked) == 0:
        raise ValueError(f"need clean and attacked scores, got {len(clean)} clean and {len(attacked)} attacked")
    if not (np.isfinite(clean).all() and np.isfinite(attacked).all()):
        raise ValueError("detection scores contain NaN or inf")
    return np.r_[np.zeros(len(clean)), np.ones(len(attacked))], np.r_[clean, attacked]


def detection_auc(clean_scores, attacked_scores) -> float:
    """ROC AUC of attacked (positive) vs clean scores (InvGAN Table 3)."""
    return float(roc_auc_score(*_labelled(clean_scores, attacked_scores)))


def detection_roc(clean_scores, attacked_scores) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) of the ROC curve, for plotting."""
    fpr, tpr, _ = roc_curve(*_labelled(clean_scores, attacked_scores))
    return fpr, tpr
