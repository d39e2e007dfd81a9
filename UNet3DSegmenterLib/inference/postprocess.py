"""From the network's averaged logits to a labelmap on the input's own grid, and how sure it is."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..choices import UNCERTAINTIES, check_choice
from ..preprocess import resample_to_grid
from ..volume import Volume


def label_dtype(values: Sequence[int]) -> np.dtype:
    return np.dtype(np.uint8) if max(values) < 256 else np.dtype(np.uint16)


def probabilities_on_grid(probabilities: Volume, grid: Volume) -> Volume:
    """Resample class probabilities (c, z, y, x) linearly onto ``grid`` when the grids differ."""
    if probabilities.same_grid(grid):
        return probabilities
    return resample_to_grid(probabilities, grid, "linear")


def labelmap_on_grid(probabilities: Volume, grid: Volume, values: Sequence[int], slices: int = 16) -> np.ndarray:
    """The labelmap of :func:`probabilities_on_grid` followed by :func:`labelmap_from_probabilities`,
    resampled a block of ``slices`` slices of ``grid`` at a time, so that no class-sized volume is
    ever made on the (often much finer) input grid."""
    if probabilities.same_grid(grid):
        return labelmap_from_probabilities(probabilities.array, values)
    labelmap = np.empty(grid.shape, label_dtype(values))
    for start in range(0, grid.shape[0], slices):
        stop = min(start + slices, grid.shape[0])
        corner = np.asarray(grid.origin) + grid.direction @ (np.asarray(grid.spacing) * (0, 0, start))
        block = Volume(np.zeros((stop - start, *grid.shape[1:]), np.uint8), grid.spacing, tuple(corner),
                       grid.direction)
        labelmap[start:stop] = labelmap_from_probabilities(resample_to_grid(probabilities, block, "linear").array,
                                                           values)
    return labelmap


def labelmap_from_probabilities(probabilities: np.ndarray | torch.Tensor, values: Sequence[int]) -> np.ndarray:
    """Argmax over classes (the first on ties), mapped to the label values of each output channel.

    Works as well on logits or on unnormalised sums of logits: only the order within a voxel counts.
    """
    if isinstance(probabilities, np.ndarray):
        probabilities = torch.from_numpy(probabilities)
    indices = _argmax_over_channels(probabilities).cpu().numpy()
    lookup = np.asarray(values, dtype=label_dtype(values))
    return lookup[indices]


def _argmax_over_channels(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(0)`` as uint8/int16 indices, one vectorised pass per class: PyTorch's argmax
    over the outer axis of a (classes, z, y, x) tensor runs about five times slower."""
    best = scores[0].clone()
    indices = torch.zeros(best.shape, dtype=torch.uint8 if len(scores) <= 256 else torch.int16, device=best.device)
    for index in range(1, len(scores)):
        better = scores[index] > best
        indices.masked_fill_(better, index)
        torch.maximum(best, scores[index], out=best)
    return indices


def uncertainty_from_probabilities(probabilities: np.ndarray | torch.Tensor, measure: str = "entropy",
                                   slices: int = 16) -> np.ndarray:
    """Per voxel, how sure the class probabilities (c, z, y, x) are (see :data:`~UNet3DSegmenterLib.choices.UNCERTAINTIES`):
    'entropy' normalised to 0 (one class certain) .. 1 (all classes equally likely), or the winning
    'probability'. Float32, ``slices`` slices at a time, so the only new volume is the result."""
    check_choice(measure, UNCERTAINTIES, "uncertainty measure")
    if isinstance(probabilities, np.ndarray):
        probabilities = torch.from_numpy(probabilities)
    result = np.empty(tuple(probabilities.shape[1:]), np.float32)
    for start in range(0, probabilities.shape[1], slices):
        result[start: start + slices] = _uncertainty(probabilities[:, start: start + slices], measure).cpu().numpy()
    return result


def uncertainty_from_logits(logits: torch.Tensor, measure: str) -> np.ndarray:
    """:func:`uncertainty_from_probabilities` of the softmax of averaged ``logits`` (c, z, y, x)."""
    return _uncertainty(torch.softmax(logits.float(), dim=0), measure).cpu().numpy()


def _uncertainty(probabilities: torch.Tensor, measure: str) -> torch.Tensor:
    """The measure of (c, z, y, x) probabilities. The entropy's -p log p is ``torch.special.entr``, which
    takes each logarithm from the C library: ``Tensor.log`` on the CPU hands whole arrays to MKL's vector
    math, which has returned values off by 1e-4 (relative) on its first call in a busy process, so the
    same case gave two uncertainties in one process."""
    probabilities = probabilities.float()
    if measure == "probability":
        return probabilities.amax(0)
    classes = probabilities.shape[0]
    entropy = torch.special.entr(probabilities).sum(0)
    return (entropy / np.log(classes)).clamp_(0, 1) if classes > 1 else torch.zeros_like(entropy)


def uncertainty_on_grid(uncertainty: Volume, grid: Volume) -> Volume:
    """The uncertainty resampled linearly onto ``grid`` when the grids differ (one float volume there);
    the input's border voxels, whose centres lie just outside the model's grid, take the nearest value."""
    return uncertainty if uncertainty.same_grid(grid) else resample_to_grid(uncertainty, grid, "linear", True)


def keep_largest_component(labelmap: np.ndarray, values: Sequence[int] | None = None) -> np.ndarray:
    """For each label value, keep only its largest 26-connected component; the rest becomes 0."""
    result = labelmap.copy()
    values = [v for v in (values if values is not None else np.unique(labelmap)) if v != 0]
    for value in values:
        mask = sitk.GetImageFromArray((labelmap == value).astype(np.uint8))
        components = sitk.GetArrayFromImage(sitk.RelabelComponent(sitk.ConnectedComponent(mask, True)))
        result[(components > 1)] = 0
    return result
