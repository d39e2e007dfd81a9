"""nnU-Net v2's preprocessing and export, step by step as its plans record them.

A model trained by nnU-Net saw images prepared exactly one way, so inference repeats that way, not
this engine's own (see preprocess.py):

1. the axes are transposed as the plans' ``transpose_forward`` says;
2. the image is cropped to the box of its non-zero voxels (any channel; holes filled);
3. each channel is normalised by its scheme: CT (clip to the training foreground's 0.5 and 99.5
   percentiles, then subtract its mean and divide by its std), z-score (over the whole crop, or over
   the non-zero mask when the plans say so), rescale to 0..1, RGB to 0..1, or none;
4. the crop is resampled to the plans' spacing: third-order splines, except that an anisotropic
   grid (largest spacing over smallest above 3) is resampled slice by slice in plane and by the
   nearest slice across (``order_z`` 0);
5. the sliding window runs on that grid (padded to the patch, centred, where it is smaller);
6. the averaged logits are resampled back to the crop's grid (first order, the same rule for a
   separate z axis), turned into labels by argmax, put back into the uncropped grid (background
   outside the box) and transposed back.

Resampling calls scipy.ndimage as scikit-image's ``resize`` (what nnU-Net calls) does: ``zoom``
with ``grid_mode=True`` and edge values repeated, then clipped to the input's range.

The plan (what the steps need of nnU-Net's plans.json and dataset.json) is a plain dictionary, stored
in :class:`~UNet3DSegmenterLib.preprocess.Preprocessing` as ``nnunet``; see :func:`plan_record`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .volume import Volume

ANISOTROPY_THRESHOLD = 3.0
"""nnU-Net's ANISO_THRESHOLD: a grid whose largest spacing exceeds 3 times its smallest is resampled with a
separate z axis."""

NORMALIZATION_SCHEMES = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
                         "RGBTo01Normalization")


@dataclass
class Prepared:
    """An image on the network's grid, and what is needed to put the result back on the input's grid.

    ``array`` is (channels, z, y, x) float32 in nnU-Net's (transposed) axis order; ``box`` the
    [start, stop) per axis of the non-zero crop in the transposed uncropped grid.
    """

    array: np.ndarray
    shape_before_cropping: tuple[int, ...]
    box: list[tuple[int, int]]
    shape_after_cropping: tuple[int, ...]
    spacing: list[float]


def plan_record(plans: dict, configuration: dict, mirror_axes) -> dict:
    """What nnU-Net's preprocessing and export need, from its plans and one configuration of them."""
    properties = plans.get("foreground_intensity_properties_per_channel") or {}
    schemes = list(configuration["normalization_schemes"])
    use_mask = list(configuration.get("use_mask_for_norm") or [False] * len(schemes))
    normalization = []
    for channel, scheme in enumerate(schemes):
        if scheme not in NORMALIZATION_SCHEMES:
            raise ValueError(f"normalisation {scheme} of channel {channel} is not one of nnU-Net's own "
                             f"({', '.join(NORMALIZATION_SCHEMES)})")
        record = {"scheme": scheme, "use_mask": bool(use_mask[channel])}
        if scheme == "CTNormalization":
            numbers = properties.get(str(channel)) or {}
            record.update({key: float(numbers[key]) for key in ("mean", "std", "percentile_00_5", "percentile_99_5")})
        normalization.append(record)
    return {
        "transpose_forward": [int(axis) for axis in plans["transpose_forward"]],
        "transpose_backward": [int(axis) for axis in plans["transpose_backward"]],
        "spacing": [float(value) for value in configuration["spacing"]],
        "normalization": normalization,
        "resampling_data": _resampling(configuration.get("resampling_fn_data_kwargs"), 3),
        "resampling_probabilities": _resampling(configuration.get("resampling_fn_probabilities_kwargs"), 1),
        "mirror_axes": None if mirror_axes is None else [int(axis) for axis in mirror_axes],
    }


def _resampling(arguments: dict | None, order: int) -> dict:
    arguments = dict(arguments or {})
    force = arguments.get("force_separate_z")
    return {"order": int(arguments.get("order", order)), "order_z": int(arguments.get("order_z", 0)),
            "force_separate_z": None if force is None else bool(force)}


def describe(plan: dict) -> str:
    """The plan in words, as ``info`` prints it."""
    words = {"ZScoreNormalization": "z-score", "CTNormalization": "CT", "NoNormalization": "none",
             "RescaleTo01Normalization": "rescale to 0..1", "RGBTo01Normalization": "RGB to 0..1"}
    channels = []
    for channel, record in enumerate(plan["normalization"]):
        text = words[record["scheme"]]
        if record["scheme"] == "CTNormalization":
            text += (f" (clip {record['percentile_00_5']:g}..{record['percentile_99_5']:g}, then "
                     f"(x - {record['mean']:.4g}) / {record['std']:.4g})")
        elif record["use_mask"]:
            text += " inside the non-zero mask"
        channels.append(f"channel {channel}: {text}")
    mirroring = ", ".join(str(axis) for axis in plan["mirror_axes"] or ()) or "none"
    return "nnU-Net's, " + "; ".join(channels) + f" (with --tta mirrored on its axes {mirroring})"


def prepare(volume: Volume, plan: dict) -> Prepared:
    """Steps 1-4 of the module docstring: ``volume`` as the network expects it."""
    array = volume.array if volume.array.ndim == 4 else volume.array[None]
    forward = plan["transpose_forward"]
    data = array.astype(np.float32).transpose([0, *[axis + 1 for axis in forward]])
    spacing_zyx = list(volume.spacing)[::-1]
    spacing = [float(spacing_zyx[axis]) for axis in forward]
    shape_before_cropping = tuple(data.shape[1:])
    mask = _nonzero_mask(data)
    box = _bounding_box(mask)
    crop = tuple(slice(start, stop) for start, stop in box)
    data, mask = data[(slice(None), *crop)], mask[crop]
    shape_after_cropping = tuple(data.shape[1:])
    for channel, record in enumerate(plan["normalization"]):
        data[channel] = _normalize(data[channel], record, mask)
    target_shape = new_shape(shape_after_cropping, spacing, plan["spacing"])
    data = resample(data, target_shape, spacing, plan["spacing"], **plan["resampling_data"])
    return Prepared(data, shape_before_cropping, box, shape_after_cropping, spacing)


def _nonzero_mask(data: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_fill_holes

    mask = data[0] != 0
    for channel in data[1:]:
        mask |= channel != 0
    return binary_fill_holes(mask)


def _bounding_box(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) of the True voxels along each axis; the whole grid where there are none."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(other for other in range(mask.ndim) if other != axis)))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return box


def _normalize(image: np.ndarray, record: dict, mask: np.ndarray) -> np.ndarray:
    scheme = record["scheme"]
    if scheme == "ZScoreNormalization":
        if record["use_mask"]:
            values = image[mask]
            image[mask] = (values - values.mean()) / max(float(values.std()), 1e-8)
        else:
            mean, std = image.mean(), image.std()
            image -= mean
            image /= max(float(std), 1e-8)
    elif scheme == "CTNormalization":
        np.clip(image, record["percentile_00_5"], record["percentile_99_5"], out=image)
        image -= record["mean"]
        image /= max(record["std"], 1e-8)
    elif scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= max(float(image.max()), 1e-8)
    elif scheme == "RGBTo01Normalization":
        image /= 255.0
    return image


def new_shape(shape, spacing, target_spacing) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: the shape of ``shape`` voxels of ``spacing`` at ``target_spacing``."""
    return tuple(int(round(old / new * size)) for old, new, size in zip(spacing, target_spacing, shape))


def separate_z_axis(current_spacing, new_spacing, force_separate_z: bool | None) -> int | None:
    """The axis resampled on its own (nnU-Net's ``determine_do_sep_z_and_axis``), or None."""
    def lowres_axes(spacing) -> list[int]:
        spacing = np.asarray(spacing, dtype=float)
        return list(np.flatnonzero(spacing.max() / spacing == 1))

    def anisotropic(spacing) -> bool:
        return bool(np.max(spacing) / np.min(spacing) > ANISOTROPY_THRESHOLD)

    if force_separate_z is not None:
        axes = lowres_axes(current_spacing) if force_separate_z else None
    elif anisotropic(current_spacing):
        axes = lowres_axes(current_spacing)
    elif anisotropic(new_spacing):
        axes = lowres_axes(new_spacing)
    else:
        axes = None
    return int(axes[0]) if axes is not None and len(axes) == 1 else None


def resample(data: np.ndarray, shape, current_spacing, new_spacing, order: int, order_z: int,
             force_separate_z: bool | None) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images and logits (c, z, y, x), in ``data``'s
    type, one channel at a time (nnU-Net converts all channels to float64 at once)."""
    shape = tuple(int(size) for size in shape)
    if tuple(data.shape[1:]) == shape:
        return data
    axis = separate_z_axis(current_spacing, new_spacing, force_separate_z)
    result = np.empty((data.shape[0], *shape), data.dtype)
    for channel in range(data.shape[0]):
        result[channel] = _resample_channel(data[channel], shape, axis, order, order_z)
    return result


def _resample_channel(image: np.ndarray, shape: tuple[int, ...], axis: int | None, order: int,
                      order_z: int) -> np.ndarray:
    if axis is None:
        return _resize(image.astype(np.float64), shape, order)
    in_plane = tuple(size for index, size in enumerate(shape) if index != axis)
    slices = np.moveaxis(image, axis, 0).astype(np.float64)
    resized = np.stack([_resize(piece, in_plane, order) for piece in slices])
    resized = np.moveaxis(resized, 0, axis)
    if image.shape[axis] == shape[axis]:
        return resized
    return _across(resized, shape, axis, order_z)


def _resize(image: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """scikit-image's ``resize(image, shape, order, mode='edge', anti_aliasing=False)``, as nnU-Net calls it."""
    from scipy import ndimage

    if tuple(image.shape) == tuple(shape):
        return image.copy()
    factors = np.divide(image.shape, shape)
    out = ndimage.zoom(image, [1 / factor for factor in factors], order=order, mode="nearest", grid_mode=True)
    return np.clip(out, image.min(), image.max(), out=out)


def _across(image: np.ndarray, shape: tuple[int, ...], axis: int, order_z: int) -> np.ndarray:
    """Resample along ``axis`` only, as nnU-Net's ``map_coordinates`` call on the whole grid does (the
    other axes already have their size, so their coordinates are whole numbers)."""
    from scipy import ndimage

    scale = image.shape[axis] / shape[axis]
    coordinates = scale * (np.arange(shape[axis]) + 0.5) - 0.5
    if order_z == 0:
        # order 0 picks one slice per output slice: find which on the indices, exactly as map_coordinates rounds
        indices = ndimage.map_coordinates(np.arange(image.shape[axis], dtype=np.float64), coordinates[None],
                                          order=0, mode="nearest").astype(np.int64)
        return np.take(image, indices, axis=axis)
    grid = np.meshgrid(*[coordinates if index == axis else np.arange(size, dtype=np.float64)
                         for index, size in enumerate(shape)], indexing="ij")
    return ndimage.map_coordinates(image, np.stack(grid), order=order_z, mode="nearest")


def pad_to_patch(array: np.ndarray, patch_size) -> tuple[np.ndarray, tuple[slice, ...]]:
    """nnU-Net's ``pad_nd_image``: zero-pad (c, z, y, x) to at least ``patch_size``, centred (the odd
    voxel after); returns the padded array and the slices that cut the padding off again."""
    missing = [max(0, int(patch) - size) for size, patch in zip(array.shape[1:], patch_size)]
    if not any(missing):
        return array, tuple(slice(0, size) for size in array.shape[1:])
    before = [count // 2 for count in missing]
    padded = np.pad(array, [(0, 0), *[(low, count - low) for low, count in zip(before, missing)]])
    return padded, tuple(slice(low, low + size) for low, size in zip(before, array.shape[1:]))


def gaussian_weights(patch_size) -> np.ndarray:
    """nnU-Net's window weights (``compute_gaussian``): a unit impulse at the centre voxel (size // 2)
    blurred by a Gaussian of sigma size / 8 cut at 4 sigma, scaled to 10 at the top and rounded to
    float16 as nnU-Net keeps it; zeros are raised to the smallest value. Kept per patch size, as nnU-Net
    keeps it: on small cases making it took a twentieth of the time. Callers must not change it."""
    return _gaussian_weights(tuple(int(size) for size in patch_size))


@functools.lru_cache(maxsize=8)
def _gaussian_weights(patch_size: tuple[int, ...]) -> np.ndarray:
    axes = []
    for size in patch_size:
        sigma = size / 8
        radius = int(4.0 * sigma + 0.5)
        offsets = np.arange(size) - size // 2
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2) * (np.abs(offsets) <= radius)
        total = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
        axes.append(kernel / total)
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weights = (weights / (weights.max() / 10)).astype(np.float16)
    weights[weights == 0] = weights[weights > 0].min()
    return weights.astype(np.float32)


def window_starts(size: int, patch: int, step: float) -> list[int]:
    """nnU-Net's ``compute_steps_for_sliding_window`` along one axis (``size`` >= ``patch``)."""
    count = int(np.ceil((size - patch) / (patch * step))) + 1
    if count == 1:
        return [0]
    return [int(np.round((size - patch) / (count - 1) * index)) for index in range(count)]


def labels_back(logits: np.ndarray, prepared: Prepared, plan: dict, values: list[int],
                probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Step 6: the labelmap (z, y, x) on the input's grid, and the class probabilities there when asked.

    ``logits`` (classes, z, y, x) lie on the network's grid (the padding cut off); ``values`` are the
    label values of the classes, in order. nnU-Net keeps logits in float16 from the sliding window to
    the argmax, and so do we, for its results.
    """
    logits = resample(logits.astype(np.float16, copy=False), prepared.shape_after_cropping, plan["spacing"], prepared.spacing,
                      **plan["resampling_probabilities"])
    dtype = np.uint8 if max(values) < 256 else np.uint16
    crop = tuple(slice(start, stop) for start, stop in prepared.box)
    labelmap = np.zeros(prepared.shape_before_cropping, dtype)
    labelmap[crop] = np.asarray(values, dtype)[logits.argmax(0)]
    backward = plan["transpose_backward"]
    if not probabilities:
        return labelmap.transpose(backward), None
    logits = logits.astype(np.float32)
    exponentials = np.exp(logits - logits.max(0, keepdims=True))
    exponentials /= exponentials.sum(0, keepdims=True)
    whole = np.zeros((len(values), *prepared.shape_before_cropping), np.float32)
    whole[values.index(0) if 0 in values else 0] = 1.0
    whole[(slice(None), *crop)] = exponentials
    return labelmap.transpose(backward), whole.transpose([0, *[axis + 1 for axis in backward]])
