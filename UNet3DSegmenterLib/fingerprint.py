"""The training fingerprint: what the training images were like, so that inference can tell when an
input lies far outside it.

A network trained on 35 x 50 x 35 mm crops around the hippocampus returns confident nonsense on a
whole head: nothing in the result says so. The checkpoint therefore records, from the training
cases, the physical extent of the images per axis (min, median, max), their spacing range per
axis, percentiles of their intensities and the modality when the dataset names it; each input is
compared with it before it is segmented (:meth:`TrainingFingerprint.warnings`).

Axes are the image's index axes (x, y, z), as for spacing everywhere in the engine: the network
sees the array in that order, so a volume whose axes are permuted is as foreign to it as a larger
one. An input is far outside when (thresholds in :data:`EXTENT_FACTOR` and friends):

- on some axis it covers more than twice the largest training extent on that axis, or its box
  holds more than four times the largest training box: the structure is a small part of what the
  network sees, and the rest is unlike anything it was trained on;
- on some axis its spacing is below half the finest or above twice the coarsest training spacing:
  resampling then invents (or discards) detail the network never saw.

Intensities are recorded (``info`` prints them) but not compared: the preprocessing normalises
each case (z-score for MR), so a different scale alone says little.

The record is plain numbers, strings and lists, so that a checkpoint stays loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .volume import Volume, float3

INTENSITY_PERCENTILES = (0.5, 50.0, 99.5)
EXTENT_FACTOR = 2.0
"""An input axis longer than this many times the longest training extent on that axis is far outside."""
BOX_FACTOR = 4.0
"""An input box (mm3) larger than this many times the largest training box is far outside."""
SPACING_FACTOR = 2.0
"""An input spacing finer than the finest training spacing divided by this, or coarser than the
coarsest times this, on some axis, is far outside."""
_INTENSITY_VOXELS = 20_000


@dataclass(frozen=True)
class TrainingFingerprint:
    """Extent, spacing and intensity ranges of the training images (axes x, y, z; mm).

    Example::

        >>> fingerprint = TrainingFingerprint.from_volumes([read_volume(path) for path in training_images])
        >>> fingerprint.warnings(read_volume("whole_head.nii.gz"))
        ['this volume covers 197 x 233 x 189 mm; the model was trained on crops of about 36 x 50 x 35 mm: ...']
    """

    cases: int
    extent_min: tuple[float, float, float]
    extent_median: tuple[float, float, float]
    extent_max: tuple[float, float, float]
    spacing_min: tuple[float, float, float]
    spacing_max: tuple[float, float, float]
    box_max: float
    """The largest training box (product of a case's three extents), mm3."""
    intensity_percentiles: tuple[float, ...] = INTENSITY_PERCENTILES
    intensity_median: tuple[float, ...] = ()
    """Per percentile, the median over the cases of each case's percentile (first channel)."""
    intensity_min: tuple[float, ...] = ()
    intensity_max: tuple[float, ...] = ()
    modality: str | None = None

    @classmethod
    def from_volumes(cls, volumes: Iterable[Volume], modality: str | None = None) -> TrainingFingerprint:
        """The fingerprint of training images (read one at a time, so that an iterator keeps memory low)."""
        extents: list[tuple[float, float, float]] = []
        spacings: list[tuple[float, float, float]] = []
        percentiles: list[list[float]] = []
        for volume in volumes:
            extents.append(physical_extent(volume))
            spacings.append(volume.spacing)
            percentiles.append(intensity_percentiles(volume, len(percentiles)))
        if not extents:
            raise ValueError("a training fingerprint needs at least one case")
        return cls.from_measurements(extents, spacings, percentiles, modality)

    @classmethod
    def from_measurements(cls, extents: Sequence[Sequence[float]], spacings: Sequence[Sequence[float]],
                          percentiles: Sequence[Sequence[float]], modality: str | None = None) -> TrainingFingerprint:
        """From each case's extent and spacing (x, y, z, mm) and intensity percentiles (may be empty)."""
        extent = np.asarray(extents, np.float64)
        spacing = np.asarray(spacings, np.float64)
        intensity = np.asarray([item for item in percentiles if len(item)], np.float64)
        median, lowest, highest = ((), (), ()) if intensity.size == 0 else (
            _rounded(np.median(intensity, axis=0)), _rounded(intensity.min(0)), _rounded(intensity.max(0)))
        return cls(len(extent), _rounded3(extent.min(0)), _rounded3(np.median(extent, 0)), _rounded3(extent.max(0)),
                   _rounded3(spacing.min(0)), _rounded3(spacing.max(0)), round(float(extent.prod(1).max()), 1),
                   INTENSITY_PERCENTILES, median, lowest, highest, modality or None)

    # --- the comparison ---------------------------------------------------------------------------

    def warnings(self, volume: Volume) -> list[str]:
        """One plain line for each way ``volume`` lies far outside the training images (none: [])."""
        found = []
        extent = physical_extent(volume)
        if any(own > EXTENT_FACTOR * largest for own, largest in zip(extent, self.extent_max)) or \
                math.prod(extent) > BOX_FACTOR * self.box_max:
            found.append(f"this volume covers {_mm(extent)} mm; the model was trained on crops of about "
                         f"{_mm(self.extent_median)} mm (at most {_mm(self.extent_max)} mm): segment inside a box around "
                         "the structure (--roi, or an ROI in the panel); results this far outside the training data "
                         "are unreliable")
        spacing = volume.spacing
        if any(own < finest / SPACING_FACTOR or own > coarsest * SPACING_FACTOR
               for own, finest, coarsest in zip(spacing, self.spacing_min, self.spacing_max)):
            found.append(f"this volume's spacing is {_spacing(spacing)} mm; the model was trained on spacings from "
                         f"{_spacing(self.spacing_min)} to {_spacing(self.spacing_max)} mm: results at a spacing this far "
                         "outside the training data are unreliable")
        return found

    # --- the record -------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain types only (a checkpoint loads with ``weights_only=True``)."""
        return {
            "cases": self.cases,
            "extent_mm": {"min": list(self.extent_min), "median": list(self.extent_median),
                          "max": list(self.extent_max)},
            "spacing_mm": {"min": list(self.spacing_min), "max": list(self.spacing_max)},
            "box_max_mm3": self.box_max,
            "intensity": {"percentiles": list(self.intensity_percentiles), "median": list(self.intensity_median),
                          "min": list(self.intensity_min), "max": list(self.intensity_max)},
            "modality": self.modality,
        }

    @classmethod
    def from_dict(cls, record: dict) -> TrainingFingerprint:
        """The inverse of :meth:`to_dict`; KeyError, TypeError or ValueError for a damaged record."""
        extent, spacing = record["extent_mm"], record["spacing_mm"]
        intensity = dict(record.get("intensity") or {})
        floats = lambda key: tuple(float(value) for value in intensity.get(key) or ())  # noqa: E731
        minimum, median, maximum = float3(extent["min"]), float3(extent["median"]), float3(extent["max"])
        modality = record.get("modality")
        return cls(int(record["cases"]), minimum, median, maximum, float3(spacing["min"]), float3(spacing["max"]),
                   float(record.get("box_max_mm3") or math.prod(maximum)),
                   floats("percentiles") or INTENSITY_PERCENTILES, floats("median"), floats("min"), floats("max"),
                   str(modality) if modality else None)

    def describe(self) -> list[tuple[str, str]]:
        """(heading, text) per fact, as ``unet3d-segmenter info`` prints them."""
        items = [("trained on", f"{self.cases} cases" + (f", modality {self.modality}" if self.modality else "")),
                 ("extent", f"median {_mm(self.extent_median)} mm (x, y, z), from {_mm(self.extent_min)} "
                            f"to {_mm(self.extent_max)} mm"),
                 ("spacing range", f"{_spacing(self.spacing_min)} to {_spacing(self.spacing_max)} mm (x, y, z)")]
        if self.intensity_median:
            names = ", ".join(f"{percentile:g}" for percentile in self.intensity_percentiles)
            items.append(("intensity", f"percentiles {names}: median over cases {_numbers(self.intensity_median)} "
                                       f"(lowest {_numbers(self.intensity_min)}, highest {_numbers(self.intensity_max)})"))
        return items


def physical_extent(volume: Volume) -> tuple[float, float, float]:
    """The length in mm of ``volume`` along each index axis (x, y, z): voxels times spacing."""
    return float3(size * spacing for size, spacing in zip(volume.shape[::-1], volume.spacing))


def intensity_percentiles(volume: Volume, seed: int = 0) -> list[float]:
    """:data:`INTENSITY_PERCENTILES` of the first channel, from a fixed-seed sample of its voxels."""
    values = (volume.array if volume.channels == 1 else volume.array[0]).ravel()
    if values.size > _INTENSITY_VOXELS:
        values = np.random.default_rng(seed).choice(values, _INTENSITY_VOXELS, replace=False)
    return [float(value) for value in np.percentile(values.astype(np.float64), INTENSITY_PERCENTILES)]


def _rounded(values) -> tuple[float, ...]:
    return tuple(float(f"{float(value):.6g}") for value in values)


def _rounded3(values) -> tuple[float, float, float]:
    return float3(_rounded(values))


def _mm(values: Sequence[float]) -> str:
    """Extents to the millimetre: '197 x 233 x 189'."""
    return " x ".join(f"{value:.0f}" for value in values)


def _spacing(values: Sequence[float]) -> str:
    return " x ".join(f"{value:.3g}" for value in values)


def _numbers(values: Sequence[float]) -> str:
    return ", ".join(f"{value:.4g}" for value in values)
