"""The Volume type: a voxel array with its place in the patient, in one convention.

Convention (the one SimpleITK uses, so readers and writers convert nothing):

- ``array`` is indexed ``[z, y, x]`` for a scalar image, ``[channel, z, y, x]`` for several channels.
- ``spacing`` is ``(x, y, z)`` in millimetres.
- ``origin`` is the LPS position in millimetres of voxel ``[0, 0, 0]``.
- ``direction`` is a 3x3 matrix whose columns are the LPS directions of the x, y and z index axes.

A voxel at index ``(i, j, k)`` = ``array[..., k, j, i]`` lies at ``origin + direction @ (spacing * (i, j, k))``.
Slicer's RAS and IJK matrices are converted here and nowhere else (:meth:`Volume.from_ijk_to_ras`,
:meth:`Volume.ijk_to_ras`, :func:`lps_from_ras` for points such as the corners of a region of interest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def float3(values) -> tuple[float, float, float]:
    """Three floats, e.g. a spacing (x, y, z); ValueError for any other count."""
    items = [float(value) for value in values]
    if len(items) != 3:
        raise ValueError(f"expected three values, got {len(items)}")
    return items[0], items[1], items[2]


def int3(values) -> tuple[int, int, int]:
    """Three integers, e.g. a shape or patch size (z, y, x); ValueError for any other count."""
    items = [int(value) for value in values]
    if len(items) != 3:
        raise ValueError(f"expected three values, got {len(items)}")
    return items[0], items[1], items[2]


def lps_from_ras(point) -> np.ndarray:
    """A point in Slicer's RAS millimetres as LPS millimetres, the engine's convention (and back: the
    flip is its own inverse)."""
    return _LPS_TO_RAS @ np.asarray(point, dtype=np.float64)


@dataclass
class Volume:
    """A 3D image (optionally several channels) with spacing, origin and direction.

    Example::

        >>> vol = Volume(np.zeros((40, 64, 64), np.float32), spacing=(0.8, 0.8, 2.5))
        >>> vol.shape, vol.channels
        ((40, 64, 64), 1)
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim not in (3, 4):
            raise ValueError(f"a Volume array must be 3D (z, y, x) or 4D (c, z, y, x), got shape {self.array.shape}")
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise ValueError("spacing and origin must have three values (x, y, z)")
        self.spacing = float3(self.spacing)
        self.origin = float3(self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if not all(0 < value < math.inf for value in self.spacing):
            raise ValueError(f"spacing must be positive, got {self.spacing}")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The spatial shape (z, y, x)."""
        return tuple(self.array.shape[-3:])

    @property
    def channels(self) -> int:
        return 1 if self.array.ndim == 3 else self.array.shape[0]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Spacing in array order, for code that works on the array."""
        return self.spacing[::-1]

    def with_array(self, array: np.ndarray) -> Volume:
        """A new Volume with the same geometry and another array of the same spatial shape."""
        array = np.asarray(array)
        if array.shape[-3:] != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the volume grid {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    def index_to_physical(self) -> np.ndarray:
        """The 4x4 matrix from (i, j, k, 1) index to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        matrix[:3, 3] = self.origin
        return matrix

    def same_grid(self, other: Volume, tolerance: float = 1e-4) -> bool:
        """True when both volumes have the same shape and voxel-to-LPS mapping (within tolerance mm)."""
        return self.shape == other.shape and np.allclose(
            self.index_to_physical(), other.index_to_physical(), atol=tolerance
        )

    def describe_grid(self) -> str:
        spacing = ", ".join(f"{s:g}" for s in self.spacing)
        return f"shape (z, y, x) {self.shape}, spacing (x, y, z) ({spacing}) mm"

    def describe_grid_beside(self, other: Volume) -> str:
        """:meth:`describe_grid`, with the origin and direction when shape and spacing alone would read the
        same for ``other``: a message about two grids must show where they differ."""
        if self.describe_grid() != other.describe_grid():
            return self.describe_grid()
        origin = ", ".join(f"{value:g}" for value in self.origin)
        direction = ", ".join(f"{value:g}" for value in self.direction.flatten())
        return f"{self.describe_grid()}, origin ({origin}) mm, direction ({direction})"

    # Slicer's IJK-to-RAS matrix: the only place RAS appears in the engine.
    def ijk_to_ras(self) -> np.ndarray:
        """The 4x4 IJK-to-RAS matrix Slicer uses for this grid (array order stays k, j, i)."""
        lps = self.index_to_physical()
        ras = np.eye(4)
        ras[:3, :] = _LPS_TO_RAS @ lps[:3, :]
        return ras

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray) -> Volume:
        """Build a Volume from an array in Slicer's (k, j, i) order and its IJK-to-RAS matrix."""
        ijk_to_ras = np.asarray(ijk_to_ras, dtype=np.float64)
        axes = ijk_to_ras[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        if np.any(spacing <= 0):
            raise ValueError(f"IJK-to-RAS matrix has a zero-length axis: {ijk_to_ras.tolist()}")
        direction = _LPS_TO_RAS @ (axes / spacing[None, :])
        origin = _LPS_TO_RAS @ ijk_to_ras[:3, 3]
        return cls(array, tuple(spacing), tuple(origin), direction)
