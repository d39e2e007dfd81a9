"""Sliding-window inference: run a network patch by patch over a volume of any size.

Windows sit on a regular grid with the requested overlap (evenly spread so that the last window
ends at the border). Each window's output is weighted by a Gaussian that trusts the centre of a
patch more than its edges, and added in place into one accumulator, so memory holds the volume's
output once, never a copy per window. Volumes smaller than the patch are padded and cropped back.

``patchify`` and ``unpatchify`` expose the same grid and blending for people who want the patches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import nn

ProgressCallback = Callable[[int, int], None]
CancelCheck = Callable[[], bool]

MIRROR_AXES = (2, 3, 4)


class Cancelled(Exception):
    """Raised when the cancel check returns True between batches of windows."""


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of length ``patch`` covering ``size`` with at least ``overlap``."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1 - overlap)))
    count = math.ceil((size - patch) / step) + 1
    return [round(index * (size - patch) / (count - 1)) for index in range(count)]


def window_positions(shape: Sequence[int], patch_size: Sequence[int], overlap: float) -> list[tuple[int, ...]]:
    """The (z, y, x) corner of every window over a volume of ``shape``."""
    return list(itertools.product(*(window_starts(s, p, overlap) for s, p in zip(shape, patch_size))))


@lru_cache(maxsize=8)
def _gaussian(patch_size: tuple[int, ...], sigma_scale: float) -> np.ndarray:
    axes = [np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / (size * sigma_scale)) ** 2) for size in patch_size]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)  # never zero: border voxels need some weight


def gaussian_weights(patch_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Importance weights for one patch: 1 at the centre, falling off with sigma = size * sigma_scale."""
    return torch.from_numpy(_gaussian(tuple(int(s) for s in patch_size), sigma_scale))


def _pad_to(tensor: torch.Tensor, patch_size: Sequence[int]) -> torch.Tensor:
    """Pad the last three axes at their end with zeros up to at least ``patch_size``."""
    missing = [max(0, p - s) for s, p in zip(tensor.shape[-3:], patch_size)]
    if not any(missing):
        return tensor
    return nn.functional.pad(tensor, (0, missing[2], 0, missing[1], 0, missing[0]))


def _as_tensor(array) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))


def patchify(array, patch_size: Sequence[int], overlap: float = 0.5) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
    """Cut a (z, y, x) or (c, z, y, x) array into overlapping patches.

    Returns ``(patches, positions)``: patches of shape (n, c, *patch_size) and the (z, y, x)
    corner of each. A volume smaller than the patch is zero-padded at its far end first.

    Example::

        >>> patches, positions = patchify(np.zeros((70, 80, 90)), (64, 64, 64), overlap=0.5)
        >>> patches.shape
        torch.Size([8, 1, 64, 64, 64])
    """
    tensor = _as_tensor(array)
    tensor = tensor[None] if tensor.ndim == 3 else tensor
    tensor = _pad_to(tensor, patch_size)
    positions = window_positions(tensor.shape[-3:], patch_size, overlap)
    patches = torch.stack([tensor[(slice(None), *_window(position, patch_size))] for position in positions])
    return patches, positions


def unpatchify(patches, positions: Sequence[Sequence[int]], shape: Sequence[int],
               weighting: str = "gaussian") -> torch.Tensor:
    """Blend patches (n, c, *patch) back into a (c, *shape) volume.

    Overlaps are averaged with Gaussian weights ('gaussian', no visible seams) or equally
    ('constant'). ``shape`` is the original (z, y, x) size; padding added by :func:`patchify` is cut.
    """
    patches = _as_tensor(patches).float()
    patch_size = patches.shape[-3:]
    padded = [max(s, p) for s, p in zip(shape, patch_size)]
    accumulator = torch.zeros((patches.shape[1], *padded))
    weights = gaussian_weights(patch_size) if weighting == "gaussian" else torch.ones(patch_size)
    total = torch.zeros(padded)
    for patch, position in zip(patches, positions):
        region = _window(position, patch_size)
        accumulator[(slice(None), *region)].addcmul_(patch, weights)
        total[region] += weights
    accumulator /= total
    return accumulator[(slice(None), *(slice(0, s) for s in shape))]


def _window(position: Sequence[int], patch_size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(start, start + size) for start, size in zip(position, patch_size))


def _mirrored_forward(model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, mirror: bool) -> torch.Tensor:
    """The model's output, averaged over all eight axis flips when ``mirror`` (test-time augmentation)."""
    output = model(batch).float()
    if not mirror:
        return output
    for count in range(1, 4):
        for axes in itertools.combinations(MIRROR_AXES, count):
            output += torch.flip(model(torch.flip(batch, axes)).float(), axes)
    return output / 8


def sliding_window_inference(
    image: torch.Tensor,
    model: Callable[[torch.Tensor], torch.Tensor],
    patch_size: Sequence[int],
    out_channels: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    mirror: bool = False,
    prepare_batch: Callable[[torch.Tensor], torch.Tensor] = lambda batch: batch,
    accumulate_device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> torch.Tensor:
    """Gaussian-weighted average of ``model``'s outputs over windows of ``image`` (c, z, y, x).

    Args:
        image: the preprocessed image, channels first, on any device.
        model: maps a batch (n, c, *patch_size) to logits (n, out_channels, *patch_size).
        patch_size: window size (z, y, x) in voxels.
        overlap: fraction of a window shared with its neighbour, in [0, 1).
        batch_size: windows per forward pass.
        mirror: average over the eight axis flips (8x slower, slightly better).
        prepare_batch: puts a stacked batch on the compute device in the right layout and dtype.
        accumulate_device: where the (out_channels, z, y, x) float32 sum lives.
        progress: called with (windows done, windows in total) after each batch.
        cancel: checked before each batch; when it returns True, :class:`Cancelled` is raised.

    Returns the averaged logits, (out_channels, z, y, x) float32 on ``accumulate_device``.
    """
    shape = image.shape[-3:]
    padded = _pad_to(image, patch_size)
    positions = window_positions(padded.shape[-3:], patch_size, overlap)
    weights = gaussian_weights(patch_size).to(accumulate_device)
    accumulator = torch.zeros((out_channels, *padded.shape[-3:]), dtype=torch.float32, device=accumulate_device)
    total = torch.zeros(padded.shape[-3:], dtype=torch.float32, device=accumulate_device)
    for first in range(0, len(positions), batch_size):
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")
        chunk = positions[first: first + batch_size]
        batch = torch.stack([padded[(slice(None), *_window(position, patch_size))] for position in chunk])
        output = _mirrored_forward(model, prepare_batch(batch), mirror).to(accumulate_device)
        for logits, position in zip(output, chunk):
            region = _window(position, patch_size)
            accumulator[(slice(None), *region)].addcmul_(logits, weights)
            total[region] += weights
        if progress is not None:
            progress(min(first + batch_size, len(positions)), len(positions))
    accumulator /= total
    return accumulator[(slice(None), *(slice(0, s) for s in shape))]
