"""Synthetic labelled phantoms: a small abdomen-like body with an organ, a lesion and other structures.

The demo, the Slicer self-test and the tests use these instead of downloaded data. A phantom is an
elliptic "body" (a fat shell around soft tissue, air outside) holding:

- label 1, ``organ``: a lobed ellipsoid with random size, position and orientation;
- label 2, ``lesion``: a smaller ellipsoid inside the organ or on its border;
- label 3, ``vessel``: a gently curved tube running head to foot beside the organ;
- label 4, ``bone``: a segmented column at the back of the body, like a spine;
- label 5, ``cyst``: a small sphere on the other side of the body.

Only the first ``classes`` structures are drawn, in the labelmap and in the image alike. Each tissue
has its own mean intensity and texture; a smooth bias field (MR) or shading (CT), partial-volume
blurring and Gaussian noise complete the picture. Intensities overlap between classes, so a model
has to use shape and context, not a single threshold.

The anatomy is laid out in millimetres relative to the field of view (shape times spacing), so two
grids covering the same field of view show the same anatomy whatever their spacing, and anisotropic
voxels do not squash it. Everything is drawn from the seed alone: the same seed gives the same phantom.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .io import write_volume
from .volume import Volume, float3, int3

PHANTOM_LABELS: dict[int, tuple[str, tuple[float, float, float]]] = {
    1: ("organ", (0.87, 0.51, 0.40)),
    2: ("lesion", (0.56, 0.93, 0.56)),
    3: ("vessel", (0.85, 0.26, 0.30)),
    4: ("bone", (0.95, 0.92, 0.84)),
    5: ("cyst", (0.40, 0.60, 0.90)),
}
"""Label value -> (name, RGB colour with components in 0..1) for every class a phantom can hold."""

MODALITIES = ("MR", "CT")

# Tissue indices of the intensity model: air, fat and soft tissue are all label 0.
_AIR, _FAT, _SOFT = 0, 1, 2
_TISSUE_OF_LABEL = 2  # tissue index = label + 2 for labels 1..5

# Per tissue (air, fat, soft, organ, lesion, vessel, bone, cyst):
# mean, its random jitter, fine texture and coarse texture amplitudes (standard deviations).
# MR values are arbitrary units and their jitter and textures are fractions of the mean; CT values
# are Hounsfield units throughout.
_MR_TISSUES = np.array([
    # mean  jitter  fine  coarse
    [0.0, 0.00, 0.00, 0.00],
    [380.0, 0.08, 0.05, 0.05],
    [250.0, 0.08, 0.06, 0.10],
    [420.0, 0.08, 0.08, 0.05],
    [580.0, 0.08, 0.06, 0.12],
    [760.0, 0.08, 0.03, 0.03],
    [140.0, 0.10, 0.10, 0.10],
    [880.0, 0.06, 0.02, 0.02],
])
_CT_TISSUES = np.array([
    # mean HU  jitter  fine  coarse
    [-1000.0, 0.0, 0.0, 0.0],
    [-100.0, 10.0, 8.0, 10.0],
    [35.0, 5.0, 8.0, 8.0],
    [90.0, 10.0, 6.0, 6.0],
    [150.0, 20.0, 10.0, 15.0],
    [200.0, 20.0, 5.0, 5.0],
    [650.0, 100.0, 60.0, 90.0],
    [10.0, 5.0, 3.0, 3.0],
])
_CT_RANGE = (-1024.0, 3071.0)

# Classes are painted in this order, so that later ones win where shapes overlap; the lesion comes
# last so that it is never hidden.
_PAINT_ORDER = (1, 3, 4, 5, 2)

_FINE_TEXTURE_MM = 2.5
_COARSE_TEXTURE_MM = 8.0
_BIAS_MM = 60.0
_PARTIAL_VOLUME_SIGMA_VOXELS = 0.6


def make_phantom(
    shape: Sequence[int] = (48, 64, 64),
    spacing: Sequence[float] = (1.0, 1.0, 2.0),
    seed: int = 0,
    classes: int = 2,
    modality: str = "MR",
    direction: np.ndarray | None = None,
) -> tuple[Volume, Volume]:
    """Generate one synthetic image and its labelmap.

    Args:
        shape: grid size (z, y, x) in voxels.
        spacing: voxel size (x, y, z) in millimetres; anisotropic by default, like thick-slice scans.
        seed: any non-negative integer; the same seed gives the same phantom.
        classes: how many foreground classes (1 to 5, see :data:`PHANTOM_LABELS`).
        modality: ``"MR"`` (positive arbitrary units, with a bias field) or ``"CT"`` (Hounsfield units).
        direction: 3x3 matrix whose columns are the LPS directions of the x, y and z axes
            (identity by default). The field of view is centred on the LPS origin.

    Returns:
        ``(image, labelmap)``: float32 intensities and uint8 labels 0..classes on the same grid.

    Example::

        >>> image, labels = make_phantom(seed=3, classes=2, modality="CT")
        >>> image.shape, int(labels.array.max())
        ((48, 64, 64), 2)
    """
    size, voxel, modality, direction = _check_arguments(shape, spacing, seed, classes, modality, direction)
    geometry_rng, appearance_rng, texture_rng, noise_rng = (
        np.random.default_rng(stream) for stream in np.random.SeedSequence(seed).spawn(4)
    )
    grid = _Grid(size, voxel)
    # All five shapes are drawn whatever `classes` is, so that the organ and lesion of a seed stay
    # the same when more classes are asked for.
    body, shapes = _draw_anatomy(geometry_rng, grid.extent)
    labels = _paint_labels(grid, shapes, classes)
    tissues = _tissue_map(grid, body, labels)
    image = _render(grid, tissues, modality, appearance_rng, texture_rng, noise_rng)
    origin = float3(-direction @ (np.asarray(voxel) * (np.asarray(size[::-1]) - 1) / 2))
    return Volume(image, voxel, origin, direction), Volume(labels, voxel, origin, direction)


def write_phantom_dataset(
    folder: str | os.PathLike,
    cases: int = 8,
    shape: Sequence[int] = (48, 64, 64),
    spacing: Sequence[float] = (1.0, 1.0, 2.0),
    seed: int = 0,
    classes: int = 2,
    modality: str = "MR",
) -> Path:
    """Write ``cases`` phantoms as a labelled dataset and return ``folder``.

    Layout: ``images/phantom_000.nii.gz`` and ``labels/phantom_000.nii.gz`` (same names), and a
    ``dataset.json`` in the Medical Segmentation Decathlon style listing every pair. Case ``i`` is
    ``make_phantom(seed=case_seeds(seed, cases)[i], ...)``; different dataset seeds give unrelated
    cases, so a training and a test set can come from seeds 0 and 1.

    Example::

        >>> folder = write_phantom_dataset("/tmp/phantoms", cases=4)
        >>> sorted(path.name for path in (folder / "images").iterdir())[:2]
        ['phantom_000.nii.gz', 'phantom_001.nii.gz']
    """
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    folder = Path(folder)
    modality = modality.upper()
    training = []
    for index, case_seed in enumerate(case_seeds(seed, cases)):
        image, labels = make_phantom(shape, spacing, case_seed, classes, modality)
        name = f"phantom_{index:03d}.nii.gz"
        write_volume(image, folder / "images" / name)
        write_volume(labels, folder / "labels" / name)
        training.append({"image": f"./images/{name}", "label": f"./labels/{name}"})
    from .datalist import write_datalist  # beside its reader; imported here, as generating volumes needs neither
    from .labels import Label

    names = [Label(value, *PHANTOM_LABELS[value]) for value in range(1, classes + 1)]
    write_datalist(folder, training, names, "phantom",
                   f"Synthetic {modality} phantoms from UNet3DSegmenterLib.phantom, seed {seed}, grid (z, y, x) "
                   f"{tuple(shape)}, spacing (x, y, z) {tuple(spacing)} mm", modality)
    return folder


def case_seeds(seed: int, cases: int) -> list[int]:
    """The seeds of the cases of a dataset written by :func:`write_phantom_dataset` with ``seed``."""
    return [int(value) for value in np.random.SeedSequence(seed).generate_state(cases, dtype=np.uint32)]


def _check_arguments(shape, spacing, seed, classes, modality, direction):
    if len(shape) != 3 or min(int(size) for size in shape) < 1:
        raise ValueError(f"shape must be three positive sizes (z, y, x), got {tuple(shape)}")
    if len(spacing) != 3 or min(float(size) for size in spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes (x, y, z) in mm, got {tuple(spacing)}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 1 <= classes <= len(PHANTOM_LABELS):
        raise ValueError(f"classes must be between 1 and {len(PHANTOM_LABELS)}, got {classes}")
    if str(modality).upper() not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise ValueError(f"direction must be an orthonormal 3x3 matrix, got {direction.tolist()}")
    return int3(shape), float3(spacing), str(modality).upper(), direction


class _Grid:
    """Voxel-centre coordinates in mm relative to the centre of the field of view, per axis."""

    def __init__(self, shape: tuple[int, int, int], spacing: tuple[float, float, float]):
        self.shape = shape
        self.spacing_zyx = np.asarray(spacing[::-1])
        self.extent = np.asarray(spacing) * np.asarray(shape[::-1])  # field of view (x, y, z) mm
        self.axes_zyx = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, self.spacing_zyx)]

    def coordinates(self, box: tuple[slice, ...] = (slice(None),) * 3):
        """Broadcastable x, y, z coordinate arrays (mm) of the voxels in ``box``."""
        z, y, x = (axis[part] for axis, part in zip(self.axes_zyx, box))
        return x[None, None, :], y[None, :, None], z[:, None, None]

    def box(self, centre: np.ndarray, reach: np.ndarray) -> tuple[slice, ...]:
        """Index slices (z, y, x) of the voxels within ``reach`` mm of ``centre`` along each axis."""
        slices = []
        for n, s, c, r in zip(self.shape, self.spacing_zyx, centre[::-1], reach[::-1]):
            low = np.floor((c - r) / s + (n - 1) / 2) if np.isfinite(r) else 0
            high = np.ceil((c + r) / s + (n - 1) / 2) + 1 if np.isfinite(r) else n
            slices.append(slice(int(np.clip(low, 0, n)), int(np.clip(high, 0, n))))
        return tuple(slices)

    def nearest_index(self, point: np.ndarray) -> tuple[int, int, int]:
        return int3(
            int(np.clip(np.rint(c / s + (n - 1) / 2), 0, n - 1))
            for n, s, c in zip(self.shape, self.spacing_zyx, point[::-1])
        )


@dataclass
class _Ellipsoid:
    """An ellipsoid whose surface is gently lobed by a few sinusoids of the direction."""

    centre: np.ndarray  # (x, y, z) mm
    semi_axes: np.ndarray  # mm, along the columns of `rotation`
    rotation: np.ndarray
    lobes: np.ndarray  # rows (amplitude, frequency x, y, z, phase), in units of the semi-axes

    @property
    def reach(self) -> np.ndarray:
        return np.full(3, self.semi_axes.max() * (1 + np.abs(self.lobes[:, 0]).sum()))

    def inside(self, x, y, z) -> np.ndarray:
        offset = (x - self.centre[0], y - self.centre[1], z - self.centre[2])
        local = [
            sum(self.rotation[row, axis] * offset[row] for row in range(3)) / self.semi_axes[axis]
            for axis in range(3)
        ]
        radius = 1.0
        for amplitude, fx, fy, fz, phase in self.lobes:
            radius = radius + amplitude * np.sin(fx * local[0] + fy * local[1] + fz * local[2] + phase)
        return local[0] ** 2 + local[1] ** 2 + local[2] ** 2 < radius**2


@dataclass
class _Tube:
    """A tube running along z whose centre line drifts and bends in the axial plane."""

    centre: np.ndarray  # (x, y, 0) mm: where the centre line crosses z = 0
    slope: np.ndarray  # (dx/dz, dy/dz)
    bend: np.ndarray  # (amplitude mm, angular frequency rad/mm, phase)
    radius: float
    half_length: float  # mm: half the z extent of the field of view

    @property
    def reach(self) -> np.ndarray:
        sideways = np.abs(self.slope) * self.half_length + self.bend[0] + self.radius
        return np.array([sideways[0], sideways[1], np.inf])

    def inside(self, x, y, z) -> np.ndarray:
        wave = self.bend[0] * np.sin(self.bend[1] * z + self.bend[2])
        centre_x = self.centre[0] + self.slope[0] * z + wave
        centre_y = self.centre[1] + self.slope[1] * z + 0.5 * wave
        return (x - centre_x) ** 2 + (y - centre_y) ** 2 < self.radius**2


@dataclass
class _Column:
    """A rounded-square column along z, cut into blocks by thin gaps, like vertebrae and discs."""

    centre: np.ndarray  # (x, y, 0) mm
    semi_axes: np.ndarray  # (x, y) mm
    period: float  # mm from one block to the next
    gap: float  # mm of each gap
    phase: float  # mm

    @property
    def reach(self) -> np.ndarray:
        return np.array([self.semi_axes[0], self.semi_axes[1], np.inf])

    def inside(self, x, y, z) -> np.ndarray:
        section = ((x - self.centre[0]) / self.semi_axes[0]) ** 4 + ((y - self.centre[1]) / self.semi_axes[1]) ** 4
        return (section < 1) & (np.mod(z - self.phase, self.period) > self.gap)


@dataclass
class _Body:
    """An elliptic cylinder along z (the body outline) with an inner cylinder (inside the fat shell)."""

    semi_axes: np.ndarray  # (x, y) mm
    inner_fraction: float

    def tissue(self, x, y) -> np.ndarray:
        """Tissue index per (y, x) position: air, fat or soft tissue."""
        radius = (x / self.semi_axes[0]) ** 2 + (y / self.semi_axes[1]) ** 2
        return np.where(radius < self.inner_fraction**2, _SOFT, np.where(radius < 1, _FAT, _AIR)).astype(np.uint8)


def _draw_anatomy(rng: np.random.Generator, extent: np.ndarray) -> tuple[_Body, dict[int, object]]:
    """Random body and shapes (label -> shape) for a field of view of ``extent`` (x, y, z) mm."""
    body = _Body(extent[:2] * (0.46, 0.40) * rng.uniform(0.92, 1.0), rng.uniform(0.82, 0.9))
    side = rng.choice((-1.0, 1.0))
    organ = _Ellipsoid(
        centre=extent * (side * rng.uniform(0.06, 0.14), rng.uniform(-0.10, 0.02), rng.uniform(-0.08, 0.08)),
        semi_axes=extent * rng.uniform((0.20, 0.18, 0.22), (0.27, 0.25, 0.32)),
        rotation=_rotation(rng, (25.0, 25.0, 40.0)),
        lobes=_lobes(rng, count=3, amplitude=0.05, frequency=2.5),
    )
    return body, {
        1: organ,
        2: _draw_lesion(rng, organ),
        3: _draw_vessel(rng, organ, side, extent),
        4: _draw_spine(rng, extent),
        5: _Ellipsoid(
            centre=extent * (-side * rng.uniform(0.25, 0.30), rng.uniform(-0.1, 0.1), rng.uniform(-0.15, 0.15)),
            semi_axes=np.full(3, extent[:2].min() * rng.uniform(0.07, 0.09)),
            rotation=np.eye(3),
            lobes=np.zeros((0, 5)),
        ),
    }


def _draw_lesion(rng: np.random.Generator, organ: _Ellipsoid) -> _Ellipsoid:
    # Most lesions sit inside the organ; one in four bulges out of its surface.
    depth = rng.uniform(0.8, 1.0) if rng.random() < 0.25 else rng.uniform(0.2, 0.6)
    heading = rng.normal(size=3)
    heading /= np.linalg.norm(heading)
    size = organ.semi_axes.mean() * rng.uniform(0.26, 0.38)
    return _Ellipsoid(
        centre=organ.centre + organ.rotation @ (organ.semi_axes * heading * depth),
        semi_axes=size * rng.uniform(0.85, 1.15, size=3),
        rotation=_rotation(rng, (90.0, 90.0, 90.0)),
        lobes=_lobes(rng, count=2, amplitude=0.04, frequency=3.0),
    )


def _draw_vessel(rng: np.random.Generator, organ: _Ellipsoid, side: float, extent: np.ndarray) -> _Tube:
    # Along the inner edge of the organ, like a large vein beside the liver.
    inner_edge = organ.centre[0] - side * organ.semi_axes[0] * rng.uniform(0.6, 0.9)
    return _Tube(
        centre=np.array([inner_edge, organ.centre[1] + organ.semi_axes[1] * rng.uniform(-0.5, 0.5), 0.0]),
        slope=rng.uniform(-0.25, 0.25, size=2),
        bend=np.array([
            extent[:2].min() * rng.uniform(0.0, 0.05), 2 * np.pi / rng.uniform(60, 120), rng.uniform(0, 6.3)
        ]),
        radius=extent[:2].min() * rng.uniform(0.035, 0.05),
        half_length=extent[2] / 2,
    )


def _draw_spine(rng: np.random.Generator, extent: np.ndarray) -> _Column:
    # y grows towards the patient's back (LPS), so the column sits at positive y.
    return _Column(
        centre=np.array([extent[0] * rng.uniform(-0.02, 0.02), extent[1] * rng.uniform(0.22, 0.26), 0.0]),
        semi_axes=extent[:2] * rng.uniform((0.07, 0.06), (0.09, 0.08)),
        period=rng.uniform(22.0, 30.0),
        gap=rng.uniform(4.0, 6.0),
        phase=rng.uniform(0.0, 30.0),
    )


def _rotation(rng: np.random.Generator, max_degrees: Sequence[float]) -> np.ndarray:
    """A rotation by random angles about x, y and z, each within +-``max_degrees``."""
    angles = np.radians(rng.uniform(-1, 1, size=3) * np.asarray(max_degrees))
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        first, second = [other for other in range(3) if other != axis]
        turn = np.eye(3)
        turn[first, first] = turn[second, second] = np.cos(angle)
        turn[first, second], turn[second, first] = -np.sin(angle), np.sin(angle)
        matrix = turn @ matrix
    return matrix


def _lobes(rng: np.random.Generator, count: int, amplitude: float, frequency: float) -> np.ndarray:
    heading = rng.normal(size=(count, 3))
    heading *= frequency / np.linalg.norm(heading, axis=1, keepdims=True)
    amplitudes = amplitude * rng.uniform(0.5, 1.0, size=(count, 1))
    return np.hstack([amplitudes, heading, rng.uniform(0, 2 * np.pi, size=(count, 1))])


def _paint_labels(grid: _Grid, shapes: dict[int, Any], classes: int) -> np.ndarray:
    labels = np.zeros(grid.shape, np.uint8)
    for value in (value for value in _PAINT_ORDER if value <= classes):
        shape = shapes[value]
        box = grid.box(shape.centre, shape.reach)
        part = labels[box]
        part[shape.inside(*grid.coordinates(box))] = value
    # On a very coarse grid a small shape can fall between voxel centres: keep every class present.
    for value in range(1, classes + 1):
        if not np.any(labels == value):
            labels[grid.nearest_index(shapes[value].centre)] = value
    return labels


def _tissue_map(grid: _Grid, body: _Body, labels: np.ndarray) -> np.ndarray:
    x, y, _ = grid.coordinates()
    tissues = np.broadcast_to(body.tissue(x, y), grid.shape).copy()
    foreground = labels > 0
    tissues[foreground] = labels[foreground] + _TISSUE_OF_LABEL
    return tissues


def _render(grid, tissues, modality, appearance_rng, texture_rng, noise_rng) -> np.ndarray:
    """Intensities: tissue means with texture, partial volume blur, bias or shading, then noise."""
    means, fine_amplitudes, coarse_amplitudes = _tissue_appearance(modality, appearance_rng)
    fine = _smooth_field(texture_rng, grid, _FINE_TEXTURE_MM)
    coarse = _smooth_field(texture_rng, grid, _COARSE_TEXTURE_MM)
    smooth = _smooth_field(texture_rng, grid, _BIAS_MM)
    image = means[tissues] + fine_amplitudes[tissues] * fine + coarse_amplitudes[tissues] * coarse
    image = _blur(image, _PARTIAL_VOLUME_SIGMA_VOXELS)
    noise = noise_rng.standard_normal(grid.shape, dtype=np.float32)
    if modality == "MR":
        gain = appearance_rng.uniform(0.6, 1.6)
        image *= gain * np.exp(appearance_rng.uniform(0.08, 0.15) * smooth)
        image += noise * np.float32(gain * means[_TISSUE_OF_LABEL + 1] * appearance_rng.uniform(0.05, 0.08))
        return np.abs(image)  # magnitude images: the background noise is Rician-like and positive
    # CT has no coil bias field; a faint smooth shading inside the body stands in for beam hardening.
    image += np.float32(appearance_rng.uniform(4.0, 8.0)) * smooth * (tissues != _AIR)
    image += noise * np.float32(appearance_rng.uniform(10, 20))
    return np.clip(image, *_CT_RANGE)


def _tissue_appearance(modality: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tissue index: mean intensity and signed fine and coarse texture amplitudes of this case."""
    table = (_MR_TISSUES if modality == "MR" else _CT_TISSUES).copy()
    jitter = rng.uniform(-1, 1, size=len(table))
    signs = rng.choice((-1.0, 1.0), size=(2, len(table)))
    if modality == "MR":
        table[:, 0] *= 1 + table[:, 1] * jitter
        table[:, 2:] *= table[:, :1]  # texture amplitudes become absolute
    else:
        table[:, 0] += table[:, 1] * jitter
    return (table[:, 0].astype(np.float32), (signs[0] * table[:, 2]).astype(np.float32),
            (signs[1] * table[:, 3]).astype(np.float32))


def _smooth_field(rng: np.random.Generator, grid: _Grid, correlation_mm: float) -> np.ndarray:
    """Zero-mean, unit-variance random field with features about ``correlation_mm`` across.

    Gaussian kernels centred on a lattice of random values, applied one axis at a time. The lattice
    depends only on the field of view, so the same seed gives the same field at any spacing.
    """
    weights = []
    for extent, axis in zip(grid.extent[::-1], grid.axes_zyx):
        knots = np.arange(-extent / 2 - 2 * correlation_mm, extent / 2 + 2.5 * correlation_mm, correlation_mm)
        kernel = np.exp(-0.5 * ((axis[:, None] - knots[None, :]) / (0.7 * correlation_mm)) ** 2)
        kernel /= np.linalg.norm(kernel, axis=1, keepdims=True)  # unit variance for unit-variance knots
        weights.append(kernel.astype(np.float32))
    values = rng.standard_normal(tuple(kernel.shape[1] for kernel in weights), dtype=np.float32)
    # One large matrix product per axis: many small ones are slow when other processes share the cores.
    values = np.tensordot(values, weights[2], axes=(2, 1))  # (knots z, knots y, x)
    values = np.tensordot(weights[1], values, axes=(1, 1))  # (y, knots z, x)
    return np.tensordot(weights[0], values, axes=(1, 1))  # (z, y, x)


def _blur(image: np.ndarray, sigma_voxels: float) -> np.ndarray:
    """Separable Gaussian blur with a 5-tap kernel, edges repeated: each voxel averages its neighbours."""
    taps = np.exp(-0.5 * (np.arange(-2, 3) / sigma_voxels) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in range(3):
        padding = [(2, 2) if dimension == axis else (0, 0) for dimension in range(3)]
        padded = np.pad(image, padding, mode="edge")
        length = image.shape[axis]
        window = [slice(None)] * 3
        blurred = np.zeros_like(image)
        for tap, weight in enumerate(taps):
            window[axis] = slice(tap, tap + length)
            blurred += weight * padded[tuple(window)]
        image = blurred
    return image
