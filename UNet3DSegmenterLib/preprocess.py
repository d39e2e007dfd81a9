"""Preprocessing that training records and inference repeats exactly: resampling and normalisation.

- Resampling to the model's spacing keeps origin and direction, so the resampled grid covers the
  same physical box; images are interpolated linearly, labels by nearest neighbour or by linear
  interpolation of each class's one-hot mask followed by argmax (smoother at coarse spacing).
- Or resizing to a fixed grid (``size``, e.g. 64 x 128 x 128 voxels): every case is resampled to
  that many voxels over its own physical box (the outer corners of the box stay where they are),
  so its spacing follows from its size. Inference resamples the network's output back from that
  grid onto the input's, as it does after resampling to a spacing.
- Normalisation: ``zscore`` (per case and channel: MR, whose intensity scale varies between
  scanners); ``ct`` (clip to a window in HU, then subtract a fixed mean and divide by a fixed std,
  all four numbers recorded); ``window`` (clip to a given window, e.g. -160..240 HU, and scale it
  to [0, 1]); ``none``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .io import from_sitk, to_sitk
from .volume import Volume, float3, int3

NORMALIZATIONS = ("zscore", "ct", "window", "none")


@dataclass
class Preprocessing:
    """What is done to an image before the network sees it.

    Args:
        spacing: target spacing (x, y, z) in mm, or None to keep each input's own spacing.
        normalization: 'zscore', 'ct', 'window' or 'none'.
        clip: for 'ct', the intensity window (low, high), e.g. (-160, 240) HU; for 'window', the
            window that is scaled to [0, 1].
        mean, std: for 'ct', the fixed numbers subtracted and divided by after clipping.
        channels: image channels the network expects.
        size: resize every input to this grid (z, y, x) in voxels instead of resampling it to a
            spacing (``spacing`` must then be None).
        nnunet: for a model trained by nnU-Net, its own preprocessing and export as its plans record
            them (see nnunet_preprocess.py); the other fields then only describe it.
    """

    spacing: tuple[float, float, float] | None = None
    normalization: str = "zscore"
    clip: tuple[float, float] | None = None
    mean: float = 0.0
    std: float = 1.0
    channels: int = 1
    size: tuple[int, int, int] | None = None
    nnunet: dict | None = None

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {self.normalization!r}: choose one of {NORMALIZATIONS}")
        if self.spacing is not None:
            self.spacing = float3(self.spacing)
        if self.clip is not None:
            self.clip = (float(self.clip[0]), float(self.clip[1]))
        if self.size is not None:
            self.size = int3(self.size)
            if min(self.size) < 1 or self.spacing is not None:
                raise ValueError(f"resize to {self.size} voxels needs three positive sizes and no spacing")
        if self.normalization == "window" and (self.clip is None or not self.clip[0] < self.clip[1]):
            raise ValueError(f"the 'window' normalisation needs a window low < high, got {self.clip}")

    def to_dict(self) -> dict:
        record: dict = {"spacing": list(self.spacing) if self.spacing else None, "normalization": self.normalization,
                  "clip": list(self.clip) if self.clip else None, "mean": float(self.mean),
                  "std": float(self.std), "channels": int(self.channels)}
        if self.size is not None:  # only when used: older records (and cache keys) stay as they were
            record["size"] = list(self.size)
        if self.nnunet is not None:
            record["nnunet"] = self.nnunet
        return record

    @classmethod
    def from_dict(cls, record: dict) -> Preprocessing:
        return cls(spacing=record.get("spacing"), normalization=record["normalization"],
                   clip=record.get("clip"), mean=record.get("mean", 0.0), std=record.get("std", 1.0),
                   channels=record.get("channels", 1), size=record.get("size"), nnunet=record.get("nnunet"))

    def describe(self) -> str:
        if self.nnunet is not None:
            from .nnunet_preprocess import describe

            return describe(self.nnunet)
        if self.normalization == "ct":
            window = f"clip {self.clip[0]:g}..{self.clip[1]:g}, " if self.clip else ""
            return f"ct ({window}then (x - {self.mean:.4g}) / {self.std:.4g})"
        if self.normalization == "window":
            assert self.clip is not None  # checked in __post_init__
            return f"window ({self.clip[0]:g}..{self.clip[1]:g} scaled to 0..1)"
        if self.normalization == "zscore":
            return "zscore (per case and channel: zero mean, unit variance)"
        return "none"


def normalize(array: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """Normalise an image array (c, z, y, x) to float32 as ``preprocessing`` says."""
    array = array.astype(np.float32, copy=True)
    if preprocessing.normalization == "zscore":
        for channel in array:
            mean, std = _mean_and_std(channel)
            channel -= mean
            channel /= max(std, 1e-8)
    elif preprocessing.normalization == "ct":
        if preprocessing.clip is not None:
            np.clip(array, *preprocessing.clip, out=array)
        array -= preprocessing.mean
        array /= max(preprocessing.std, 1e-8)
    elif preprocessing.normalization == "window":
        assert preprocessing.clip is not None  # checked by Preprocessing
        low, high = preprocessing.clip
        np.clip(array, low, high, out=array)
        array -= low
        array /= high - low
    return array


def _mean_and_std(channel: np.ndarray, block: int = 1 << 20) -> tuple[float, float]:
    """Mean and standard deviation in float64, a block at a time: numpy's ``std(dtype=float64)``
    would make a float64 copy of the whole volume, twice its float32 size, for a CT scan 800 MB."""
    flat = channel.reshape(-1)
    starts = range(0, flat.size, block)
    mean = sum(float(flat[start: start + block].sum(dtype=np.float64)) for start in starts) / flat.size
    squares = sum(float(np.square(flat[start: start + block].astype(np.float64) - mean).sum()) for start in starts)
    return mean, (squares / flat.size) ** 0.5


def target_shape(volume: Volume, spacing) -> tuple[int, int, int]:
    """The (z, y, x) size of ``volume``'s physical box sampled at ``spacing`` (x, y, z)."""
    extent = np.asarray(volume.shape[::-1]) * np.asarray(volume.spacing)
    size_xyz = np.maximum(np.round(extent / np.asarray(spacing)).astype(int), 1)
    return int3(size_xyz[::-1])


def _grid(volume: Volume, spacing, shape=None, origin=None) -> sitk.Image:
    """An empty image with ``volume``'s direction, sampled at ``spacing`` (x, y, z), of ``shape``
    (z, y, x; default: the same box) and ``origin`` (default: ``volume``'s)."""
    shape = target_shape(volume, spacing) if shape is None else shape
    reference = sitk.Image([int(s) for s in shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing([float(s) for s in spacing])
    reference.SetOrigin([float(value) for value in (volume.origin if origin is None else origin)])
    reference.SetDirection(volume.direction.flatten().tolist())
    return reference


def resized_spacing(volume: Volume, size) -> tuple[float, float, float]:
    """The spacing (x, y, z) mm of ``volume``'s physical box cut into ``size`` (z, y, x) voxels."""
    return float3(np.asarray(volume.spacing) * np.asarray(volume.shape[::-1]) / np.asarray(size[::-1]))


def resize(volume: Volume, size, interpolation: str = "linear") -> Volume:
    """Resample ``volume`` to ``size`` (z, y, x) voxels over the same physical box.

    The box's outer corners stay in place (not the first voxel's centre), so every voxel of the
    input lies inside the resized grid and resampling back needs no extrapolation.
    """
    size = int3(size)
    if tuple(volume.shape) == size:
        return volume
    spacing = np.asarray(resized_spacing(volume, size))
    origin = np.asarray(volume.origin) + volume.direction @ ((spacing - np.asarray(volume.spacing)) / 2)
    return resample_to_grid(volume, _grid(volume, spacing, size, origin), interpolation)


def resample_to_grid(volume: Volume, reference: Volume | sitk.Image, interpolation: str = "linear",
                     extrapolate: bool = False) -> Volume:
    """Resample ``volume`` (any number of channels) onto the grid of ``reference``.

    ``interpolation``: 'linear', 'nearest' (labels) or 'onehot' (labels, by linear interpolation of
    each class mask and argmax). Points outside ``volume`` get 0, or with ``extrapolate`` the value
    of the nearest voxel.
    """
    reference_image = reference if isinstance(reference, sitk.Image) else to_sitk(
        reference.with_array(np.zeros(reference.shape, np.uint8)))
    if interpolation == "onehot":
        return _resample_labels_onehot(volume, reference_image)
    interpolator = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolation]
    channels = volume.array if volume.array.ndim == 4 else volume.array[None]
    resampled = [
        sitk.GetArrayFromImage(sitk.Resample(to_sitk(volume.with_array(channel)), reference_image,
                                             sitk.Transform(), interpolator, 0.0, sitk.sitkUnknown, extrapolate))
        for channel in channels
    ]
    array = np.stack(resampled) if volume.array.ndim == 4 else resampled[0]
    result = from_sitk(reference_image)
    return result.with_array(array.astype(volume.array.dtype, copy=False))


def _resample_labels_onehot(labels: Volume, reference_image: sitk.Image) -> Volume:
    values = np.unique(labels.array)
    grid = from_sitk(reference_image)
    best = np.full(grid.shape, values[0], labels.array.dtype)
    best_probability = np.full(grid.shape, -1.0, np.float32)
    for value in values:
        mask = labels.with_array((labels.array == value).astype(np.float32))
        probability = resample_to_grid(mask, reference_image, "linear").array
        better = probability > best_probability
        best[better] = value
        best_probability = np.maximum(best_probability, probability)
    return grid.with_array(best)


def resample_to_spacing(volume: Volume, spacing, interpolation: str = "linear") -> Volume:
    """Resample ``volume`` to ``spacing`` (x, y, z) mm over the same physical box."""
    if spacing is None or np.allclose(volume.spacing, spacing, rtol=1e-5):
        return volume
    return resample_to_grid(volume, _grid(volume, spacing), interpolation)


def resample_for_model(volume: Volume, preprocessing: Preprocessing, interpolation: str = "linear") -> Volume:
    """``volume`` on the grid the network works on: resized when ``preprocessing.size`` says so,
    else resampled to ``preprocessing.spacing`` (or kept when that is None)."""
    if preprocessing.size is not None:
        return resize(volume, preprocessing.size, interpolation)
    return resample_to_spacing(volume, preprocessing.spacing, interpolation)


def preprocess_image(volume: Volume, preprocessing: Preprocessing) -> Volume:
    """Resample and normalise an image; the result is float32 with a channel axis (c, z, y, x)."""
    array = volume.array if volume.array.ndim == 4 else volume.array[None]
    volume = volume.with_array(array.astype(np.float32, copy=False))
    volume = resample_for_model(volume, preprocessing, "linear")
    return volume.with_array(normalize(volume.array, preprocessing))
