"""Segmentation losses on logits (b, classes, z, y, x) and class-index targets (b, z, y, x).

- ``dicece`` (default): soft Dice plus cross-entropy. Dice copes with small structures, cross-entropy
  gives smooth gradients early on; together they are the usual strong baseline (nnU-Net).
- ``dice``: soft Dice alone.
- ``focal``: cross-entropy that down-weights voxels the network already gets right (Lin et al. 2017).
- ``dice_focal``: soft Dice plus focal loss, as VNet-style pipelines train.
- ``ce``: cross-entropy alone.
- ``weighted_dice``: soft Dice with a weight per class; without given weights, rarer foreground
  classes weigh more (inverse frequency, see :func:`inverse_frequency_weights`).

Dice is computed over the whole batch at once ("batch Dice"). Without class weights it averages the
foreground classes only: a patch without some class then does not produce a meaningless 0/0, and
the huge background does not dominate.

Class weights (one per class, background first) apply to every term of every loss, so that none is
silently dropped: the Dice becomes a weighted mean over the classes whose weight is above zero (a
background weight above zero brings background into the Dice; a zero weight leaves a class out),
and each voxel's cross-entropy or focal term is multiplied by the weight of its true class (weights
scaled to average 1, so the term keeps its size). Losses run in float32 whatever the network's precision.

Sparse annotation: target voxels of class index :data:`~UNet3DSegmenterLib.labels.IGNORE_INDEX` (the
``ignore`` label) were never annotated. Every loss leaves them out: they add nothing to a Dice's sums
and the cross-entropy and focal terms average over the annotated voxels only.

Example::

    >>> loss = build_loss("dice_focal", classes=3, class_weights=[0.1, 1.0, 3.0])
    >>> value = loss(model(images), labels)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..choices import LOSSES
from ..labels import IGNORE_INDEX


def check_class_weights(class_weights: Sequence[float], classes: int) -> list[float]:
    """``class_weights`` as floats when there is one per class, none negative and some foreground
    class above zero; otherwise ValueError saying what to give."""
    weights = [float(weight) for weight in class_weights]
    if len(weights) != classes:
        raise ValueError(f"{len(weights)} class weights for {classes} classes (give one per class, background first)")
    if any(weight < 0 for weight in weights) or not any(weight > 0 for weight in weights[1:]):
        raise ValueError(f"class weights {weights} must be zero or more, with at least one foreground class above "
                         "zero")
    return weights


def annotated(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``target`` with unannotated voxels set to class 0 (so that it indexes classes), and the mask
    of annotated voxels (float, same shape)."""
    mask = target != IGNORE_INDEX
    return target.masked_fill(~mask, 0), mask.float()


def _annotated_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of per-voxel ``losses`` over annotated voxels (0 when a batch has none)."""
    return (losses * mask).sum() / mask.sum().clamp_min(1)


class _ClassWeighted(nn.Module):
    """A loss with optional class weights, held as a buffer so they move with ``.to(device)``."""

    class_weights: torch.Tensor | None

    def __init__(self, class_weights: Sequence[float] | None = None):
        super().__init__()
        weights = torch.as_tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)

    def voxel_weights(self, target: torch.Tensor) -> torch.Tensor | None:
        """Each voxel's weight, that of its true class, with the class weights scaled to average 1."""
        if self.class_weights is None:
            return None
        return (self.class_weights / self.class_weights.mean())[target]


class DiceLoss(_ClassWeighted):
    """1 - soft Dice, averaged over classes (weighted when ``class_weights`` is given).

    Args:
        class_weights: one weight per class, background first: the Dice is their weighted mean over
            the classes with a weight above zero. Without weights, the foreground classes count
            equally and background is left out (when there is foreground).
        smooth: added to numerator and denominator, so empty classes give a finite loss.
    """

    def __init__(self, class_weights: Sequence[float] | None = None, smooth: float = 1e-5):
        super().__init__(class_weights)
        self.smooth = smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target, mask = annotated(target)
        probabilities = torch.softmax(logits.float(), dim=1) * mask[:, None]
        one_hot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probabilities.dtype) * mask[:, None]
        axes = (0, *range(2, logits.ndim))
        intersection = (probabilities * one_hot).sum(axes)
        total = probabilities.sum(axes) + one_hot.sum(axes)
        dice = (2 * intersection + self.smooth) / (total + self.smooth)
        if self.class_weights is None:
            return 1 - dice[0 if logits.shape[1] == 1 else 1:].mean()
        return 1 - (dice * self.class_weights).sum() / self.class_weights.sum()


class CrossEntropyLoss(_ClassWeighted):
    """Cross-entropy per voxel, averaged; with ``class_weights``, each voxel weighed by its class."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target, mask = annotated(target)
        losses = F.cross_entropy(logits.float(), target, reduction="none")
        weights = self.voxel_weights(target)
        return _annotated_mean(losses if weights is None else losses * weights, mask)


class FocalLoss(_ClassWeighted):
    """Focal loss: cross-entropy scaled by (1 - p_true) ** gamma, so easy voxels count less; with
    ``class_weights``, each voxel also weighed by its class (the alpha of Lin et al.)."""

    def __init__(self, gamma: float = 2.0, class_weights: Sequence[float] | None = None):
        super().__init__(class_weights)
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target, mask = annotated(target)
        log_probability = F.log_softmax(logits.float(), dim=1).gather(1, target[:, None]).squeeze(1)
        losses = -(1 - log_probability.exp()) ** self.gamma * log_probability
        weights = self.voxel_weights(target)
        return _annotated_mean(losses if weights is None else losses * weights, mask)


class SumOfLosses(nn.Module):
    """The sum of several losses, equally weighted (Dice + cross-entropy, Dice + focal)."""

    def __init__(self, *terms: nn.Module):
        super().__init__()
        self.terms = nn.ModuleList(terms)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum((term(logits, target) for term in self.terms), torch.zeros((), device=logits.device))


def build_loss(name: str, classes: int, class_weights: Sequence[float] | None = None) -> nn.Module:
    """The loss called ``name`` (see :data:`LOSSES`) for ``classes`` outputs including background.

    ``class_weights`` (one per class, background first) weighs every term of the loss, as the
    module docstring says. 'weighted_dice' without weights weighs the foreground classes equally
    (the trainer passes :func:`inverse_frequency_weights` of the data instead).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {LOSSES}")
    weights = check_class_weights(class_weights, classes) if class_weights is not None else None
    if name == "weighted_dice" and weights is None:
        weights = [0.0] + [1.0] * (classes - 1)
    terms = {
        "dicece": lambda: SumOfLosses(DiceLoss(weights), CrossEntropyLoss(weights)),
        "dice": lambda: DiceLoss(weights),
        "weighted_dice": lambda: DiceLoss(weights),
        "focal": lambda: FocalLoss(class_weights=weights),
        "dice_focal": lambda: SumOfLosses(DiceLoss(weights), FocalLoss(class_weights=weights)),
        "ce": lambda: CrossEntropyLoss(weights),
    }
    return terms[name]()


def inverse_frequency_weights(voxel_counts: Sequence[int]) -> list[float]:
    """Class weights in inverse proportion to how often each class occurs (mean weight 1): a class
    ten times rarer counts ten times more. The trainer uses them, for the foreground classes and
    with background weighed zero, for 'weighted_dice' when the user gives no weights."""
    counts = torch.as_tensor(voxel_counts, dtype=torch.float64).clamp_min(1)
    weights = 1 / counts
    return (weights / weights.mean()).tolist()
