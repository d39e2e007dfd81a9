"""A region of interest: segment inside a box, give the result on the whole input grid.

A network trained on crops around a structure must see such a crop: the user draws a box around
the structure (``predict --roi``, ``Predictor.predict(roi=...)``, an ROI in the Slicer panel), the
voxels inside it are segmented, and the labelmap is written on the input's whole grid with 0
outside (class probabilities: background 1 outside).

The box is given by two opposite corners in RAS millimetres, as Slicer shows coordinates, and is
aligned with the RAS axes. The voxels segmented are those whose centres lie in it; for a volume
whose axes are oblique to RAS, the block of voxels (along the volume's own axes) that holds the box.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import UserError
from .volume import Volume, float3, lps_from_ras

Block = tuple[slice, slice, slice]
"""A block of voxels, as slices of the (z, y, x) array."""
_INSIDE_MM = 1e-4  # a voxel centre this close to a face of the box counts as inside


@dataclass(frozen=True)
class RegionOfInterest:
    """An axis-aligned box in RAS millimetres, by two opposite corners (any two, in any order).

    Example::

        >>> roi = RegionOfInterest.from_values([-40, -30, -30, 0, 20, 10])   # R1 A1 S1 R2 A2 S2
        >>> Predictor("hippocampus.pt").predict(read_volume("head.nii.gz"), roi=roi).labelmap
    """

    first: tuple[float, float, float]
    second: tuple[float, float, float]

    @classmethod
    def from_values(cls, values: Sequence[float]) -> RegionOfInterest:
        """From six numbers R1 A1 S1 R2 A2 S2 (``predict --roi``); UserError for another count or a flat box."""
        numbers = [float(value) for value in values]
        if len(numbers) != 6 or not all(math.isfinite(value) for value in numbers):
            raise UserError(f"an ROI is six finite numbers R1 A1 S1 R2 A2 S2 (two opposite corners in RAS mm), "
                            f"got {' '.join(str(value) for value in values)}")
        return cls(float3(numbers[:3]), float3(numbers[3:]))

    @property
    def lowest(self) -> np.ndarray:
        return np.minimum(self.first, self.second)

    @property
    def highest(self) -> np.ndarray:
        return np.maximum(self.first, self.second)

    def describe(self) -> str:
        """'R -40..0, A -30..20, S -30..10 mm'."""
        return ", ".join(f"{axis} {low:g}..{high:g}" for axis, low, high in zip("RAS", self.lowest, self.highest)) + " mm"

    def block(self, volume: Volume) -> Block:
        """The voxels of ``volume`` to segment (see the module docstring); UserError when the box misses it."""
        corners_ras = [np.where(choice, self.highest, self.lowest) for choice in itertools.product((0, 1), repeat=3)]
        to_index = np.linalg.inv(volume.index_to_physical())
        indices = np.array([(to_index @ np.append(lps_from_ras(corner), 1.0))[:3] for corner in corners_ras])
        tolerance = _INSIDE_MM / np.asarray(volume.spacing)
        start = np.ceil(indices.min(0) - tolerance).astype(int)
        stop = np.floor(indices.max(0) + tolerance).astype(int) + 1
        size = np.asarray(volume.shape[::-1])
        start, stop = np.clip(start, 0, size), np.clip(stop, 0, size)
        if np.any(stop <= start):
            raise UserError(f"the ROI ({self.describe()}) holds no voxel of the volume, which spans "
                            f"{_ras_extent(volume)}: place the box over the volume")
        return tuple(slice(int(low), int(high)) for low, high in zip(start[::-1], stop[::-1]))  # type: ignore[return-value]


def crop(volume: Volume, block: Block) -> Volume:
    """The voxels of ``block`` as a Volume of their own, in the same place in the patient."""
    corner = np.asarray([part.start for part in block[::-1]], np.float64)  # (i, j, k)
    origin = np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * corner)
    return Volume(np.ascontiguousarray(volume.array[(Ellipsis, *block)]), volume.spacing, tuple(origin),
                  volume.direction.copy())


def paste(inside: np.ndarray, grid: Volume, block: Block, outside: Sequence[float] | float = 0) -> np.ndarray:
    """``inside`` (the result on ``block``) on the whole of ``grid``; ``outside`` fills the rest, one value
    per channel for a (c, z, y, x) result (e.g. background probability 1, the others 0)."""
    channels = inside.shape[:-3]
    whole = np.empty(channels + grid.shape, inside.dtype)
    whole[...] = np.reshape(np.asarray(outside, inside.dtype), channels + (1, 1, 1)) if channels else outside
    whole[(Ellipsis, *block)] = inside
    return whole


def _ras_extent(volume: Volume) -> str:
    """The RAS box of a volume's voxel centres, in words."""
    size = np.asarray(volume.shape[::-1]) - 1
    corners = [volume.index_to_physical() @ np.append(np.asarray(choice) * size, 1.0)
               for choice in itertools.product((0, 1), repeat=3)]
    ras = np.array([lps_from_ras(corner[:3]) for corner in corners])
    return ", ".join(f"{axis} {low:.1f}..{high:.1f}" for axis, low, high in zip("RAS", ras.min(0), ras.max(0))) + " mm"
