"""Segmentation losses on logits (b, classes, z, y, x) and class-index targets (b, z, y, x).

- ``dicece`` (default): soft Dice plus cross-entropy. Dice copes with small structures, cross-entropy
  gives smooth gradients early on; together they are the usual strong baseline (nnU-Net).
- ``dice``: soft Dice alone.
- ``focal``: cross-entropy that down-weights voxels the network already gets right (Lin et al. 2017).
- ``weighted_dice``: soft Dice with a weight per class, for classes that matter more or are rarer.

Dice is computed over the whole batch at once ("batch Dice") and, where there is foreground, over
foreground classes only: a patch without some class then does not produce a meaningless 0/0, and
the huge background does not dominate. Losses run in float32 whatever the network's precision.

Example::

    >>> loss = build_loss("dicece", classes=3)
    >>> value = loss(model(images), labels)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import LOSSES


class DiceLoss(nn.Module):
    """1 - soft Dice, averaged over classes (weighted when ``class_weights`` is given).

    Args:
        include_background: also score class 0 (the default leaves it out when there are others).
        class_weights: one weight per class (including background, whose weight is ignored when it
            is left out); normalised to sum to one.
        smooth: added to numerator and denominator, so empty classes give a finite loss.
    """

    class_weights: torch.Tensor | None

    def __init__(self, include_background: bool = False, class_weights: Sequence[float] | None = None,
                 smooth: float = 1e-5):
        super().__init__()
        self.include_background, self.smooth = include_background, smooth
        weights = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probabilities = torch.softmax(logits.float(), dim=1)
        one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probabilities.dtype)
        axes = (0, *range(2, logits.ndim))
        intersection = (probabilities * one_hot).sum(axes)
        total = probabilities.sum(axes) + one_hot.sum(axes)
        dice = (2 * intersection + self.smooth) / (total + self.smooth)
        first = 0 if self.include_background or logits.shape[1] == 1 else 1
        dice = dice[first:]
        if self.class_weights is None:
            return 1 - dice.mean()
        weights = self.class_weights[first:].to(dice.device)
        return 1 - (dice * weights).sum() / weights.sum()


class DiceCELoss(nn.Module):
    """Soft Dice plus cross-entropy, equally weighted."""

    def __init__(self, class_weights: Sequence[float] | None = None):
        super().__init__()
        self.dice = DiceLoss(class_weights=class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + F.cross_entropy(logits.float(), target)


class FocalLoss(nn.Module):
    """Focal loss: cross-entropy scaled by (1 - p_true) ** gamma, so easy voxels count less."""

    def __init__(self, gamma: float = 2.0):
        super().__init__()
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probability = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        return (-(1 - log_probability.exp()) ** self.gamma * log_probability).mean()


def build_loss(name: str, classes: int, class_weights: Sequence[float] | None = None) -> nn.Module:
    """The loss called ``name`` (see :data:`LOSSES`) for ``classes`` outputs including background.

    ``class_weights`` (one per class, background first) is used by 'weighted_dice'; without it
    every class weighs the same (the trainer passes :func:`inverse_frequency_weights` of the data).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {LOSSES}")
    if class_weights is not None and len(class_weights) != classes:
        raise ValueError(f"{len(class_weights)} class weights for {classes} classes (give one per class, "
                         "background first)")
    if name == "dicece":
        return DiceCELoss()
    if name == "dice":
        return DiceLoss()
    if name == "focal":
        return FocalLoss()
    return DiceLoss(class_weights=class_weights if class_weights is not None else [1.0] * classes)


def inverse_frequency_weights(voxel_counts: Sequence[int]) -> list[float]:
    """Class weights in inverse proportion to how often each class occurs (mean weight 1), for
    'weighted_dice' when the user gives none: a class ten times rarer counts ten times more."""
    counts = torch.as_tensor(voxel_counts, dtype=torch.float64).clamp_min(1)
    weights = 1 / counts
    return (weights / weights.mean()).tolist()
