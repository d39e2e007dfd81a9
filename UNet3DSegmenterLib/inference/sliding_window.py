"""Sliding-window inference: run a network patch by patch over a volume of any size.

Windows sit on a regular grid with the requested overlap (evenly spread so that the last window
ends at the border). Each window's output is weighted by a Gaussian that trusts the centre of a
patch more than its edges, and added in place into an accumulator that spans one band of windows
along z: a band's slab is handed on as soon as no later window touches it, so memory holds a band's
output, never the whole volume's per class, nor a copy per window. Volumes smaller than the patch
are padded and cropped back.

``patchify`` and ``unpatchify`` expose the same grid and blending for people who want the patches.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


def _mirrored_forward(model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor, mirror: bool,
                      mirror_axes: Sequence[int] = (0, 1, 2)) -> torch.Tensor:
    """The model's output, averaged over every combination of flips of ``mirror_axes`` (spatial axes
    z, y, x as 0, 1, 2; all three: the eight flips) when ``mirror`` (test-time augmentation)."""
    output = model(batch).float()
    if not mirror or not mirror_axes:
        return output
    axes_to_flip = [MIRROR_AXES[axis] for axis in mirror_axes]
    combinations = [axes for count in range(1, len(axes_to_flip) + 1)
                    for axes in itertools.combinations(axes_to_flip, count)]
    for axes in combinations:
        output += torch.flip(model(torch.flip(batch, axes)).float(), axes)
    return output / (len(combinations) + 1)


@dataclass(frozen=True)
class WindowGrid:
    """Where windows sit, how each is weighted and which axes mirroring flips, where they are not this
    engine's own (a model from nnU-Net runs on nnU-Net's grid and Gaussian).

    ``positions(shape, patch_size)`` gives the window corners over a (padded) ``shape``; ``weights`` the
    importance map of one window; ``mirror_axes`` the spatial axes (0, 1, 2 = z, y, x) flipped;
    ``accumulate_dtype`` the type the weighted sums are kept in (nnU-Net keeps them in float16, which
    rounds where the weights are tiny, at the corners of windows: to give its results, so do we).
    """

    positions: Callable[[Sequence[int], Sequence[int]], list[tuple[int, ...]]] | None = None
    weights: torch.Tensor | None = None
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    accumulate_dtype: torch.dtype = torch.float32


def sliding_window_slabs(
    image: torch.Tensor,
    model: Callable[[torch.Tensor], torch.Tensor],
    patch_size: Sequence[int],
    out_channels: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    mirror: bool = False,
    prepare_batch: Callable[[torch.Tensor], torch.Tensor] = lambda batch: batch,
    accumulate_device: torch.device | str = "cpu",
    normalize: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
    windows: WindowGrid | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Like :func:`sliding_window_inference`, but yields the result in slabs along z, each as soon
    as no later window can touch it, so that memory holds a band of windows, not the whole output.

    Yields ``(z, slab)``: ``slab`` is (out_channels, depth, y, x) float32 on ``accumulate_device``
    and covers slices ``z`` to ``z + depth`` of ``image``. With ``normalize`` it holds the weighted
    averages; without, the weighted sums, which have the same argmax over channels and cost no
    weight total. A slab is only valid until the next one is asked for: copy what you keep.

    Windows run in the same order as in :func:`window_positions`, and each voxel's sum adds them in
    that order, so the values are those of one whole-volume accumulator. ``windows`` replaces the grid,
    weights and mirrored axes by another tool's (see :class:`WindowGrid`).
    """
    shape = image.shape[-3:]
    padded = _pad_to(image, patch_size)
    windows = windows or WindowGrid()
    positions = (windows.positions or functools.partial(window_positions, overlap=overlap))(
        padded.shape[-3:], patch_size)
    bands = _bands(positions, batch_size)
    depth = max(band[-1][0] + patch_size[0] - band[0][0] for band in bands)
    weights = (gaussian_weights(patch_size) if windows.weights is None else windows.weights).to(
        accumulate_device, windows.accumulate_dtype)
    sums = torch.zeros((out_channels, depth, *padded.shape[-2:]), dtype=windows.accumulate_dtype,
                       device=accumulate_device)
    totals = torch.zeros(sums.shape[1:], dtype=windows.accumulate_dtype, device=accumulate_device) if normalize else None
    done = 0
    for index, band in enumerate(bands):
        base = band[0][0]
        for first in range(0, len(band), batch_size):
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
            chunk = band[first: first + batch_size]
            batch = torch.stack([padded[(slice(None), *_window(position, patch_size))] for position in chunk])
            output = _mirrored_forward(model, prepare_batch(batch), mirror, windows.mirror_axes).to(accumulate_device)
            for logits, (z, y, x) in zip(output, chunk):
                region = _window((z - base, y, x), patch_size)
                sums[(slice(None), *region)].addcmul_(logits, weights)
                if totals is not None:
                    totals[region] += weights
            done += len(chunk)
            if progress is not None:
                progress(done, len(positions))
        end = bands[index + 1][0][0] if index + 1 < len(bands) else padded.shape[-3]
        finished = (slice(0, min(end, shape[0]) - base), slice(0, shape[1]), slice(0, shape[2]))
        if finished[0].stop > 0:
            slab = sums[(slice(None), *finished)]
            yield base, slab / totals[finished] if totals is not None else slab
        for buffer in (sums, totals):
            if buffer is not None:
                _shift_down(buffer, end - base)


def _bands(positions: list[tuple[int, ...]], batch_size: int) -> list[list[tuple[int, ...]]]:
    """Group windows into bands of whole z-rows (windows that share a z start), each band holding at
    least ``batch_size`` windows: batches never straddle a band, and a band is finished as one slab."""
    rows: dict[int, list[tuple[int, ...]]] = {}
    for position in positions:
        rows.setdefault(position[0], []).append(position)
    ordered = list(rows.values())
    rows_per_band = max(1, math.ceil(batch_size / len(ordered[0])))
    return [sum(ordered[start: start + rows_per_band], []) for start in range(0, len(ordered), rows_per_band)]


def _shift_down(buffer: torch.Tensor, by: int) -> None:
    """Move the slices from ``by`` on (axis -3) to the start of ``buffer`` and zero the rest, in
    chunks that never overlap, so no temporary copy of the buffer is needed."""
    depth = buffer.shape[-3]
    kept = max(0, depth - by)
    for start in range(0, kept, by):
        stop = min(start + by, kept)
        buffer[..., start:stop, :, :].copy_(buffer[..., start + by: stop + by, :, :])
    buffer[..., kept:, :, :].zero_()


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
        accumulate_device: where the (out_channels, z, y, x) float32 result lives.
        progress: called with (windows done, windows in total) after each batch.
        cancel: checked before each batch; when it returns True, :class:`Cancelled` is raised.

    Returns the averaged logits, (out_channels, z, y, x) float32 on ``accumulate_device``.
    :func:`sliding_window_slabs` gives the same values slab by slab, in less memory.
    """
    result = torch.empty((out_channels, *image.shape[-3:]), dtype=torch.float32, device=accumulate_device)
    for z, slab in sliding_window_slabs(image, model, patch_size, out_channels, overlap, batch_size, mirror,
                                        prepare_batch, accumulate_device, True, progress, cancel):
        result[:, z: z + slab.shape[1]] = slab
    return result
