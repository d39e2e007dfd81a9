"""Segmentation metrics: overlap (Dice, IoU) and surface distance (HD95, ASD) per class, in millimetres,
and voxel accuracy per case.

Conventions, chosen so that every case yields a number and the numbers agree with common practice
(MONAI's ``compute_hausdorff_distance`` and ``compute_average_surface_distance``):

- A class that is absent from both prediction and reference is a correct answer: Dice and IoU are
  1.0 and both distances are 0.0 mm.
- A class that is present on one side only has Dice and IoU 0.0 and infinite distances
  (``math.inf``): there is no surface on the other side to measure to. Writers of JSON must turn
  ``inf`` into ``null`` (see :func:`UNet3DSegmenterLib.evaluate.write_json`).
- The surface of a mask is its voxels with at least one of their six face neighbours outside the
  mask (voxels on the array border count as surface). Distances run between voxel centres and honour
  anisotropic spacing.
- HD95 is the larger of the two directed 95th percentiles (prediction to reference and reference to
  prediction); ASD is the mean of all distances from both surfaces, pooled (the average symmetric
  surface distance).
- Voxel accuracy is the share of all voxels, background included, whose label is right. On most
  volumes background dominates it, so it is high even for a poor segmentation: read it beside Dice.
- Sparse annotation: where the reference marks unannotated voxels with an ``ignore`` value, every
  metric looks at annotated voxels only: the prediction is cut to them before Dice, IoU and the
  surfaces are computed, and voxel accuracy counts them alone.

Example::

    >>> from UNet3DSegmenterLib.volume import Volume
    >>> reference = Volume(np.pad(np.ones((4, 4, 4), np.uint8), 2), spacing=(1.0, 1.0, 2.5))
    >>> segmentation_metrics(reference, reference)[1]["dice"]
    1.0
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

from .errors import UserError
from .volume import Volume

METRIC_NAMES = ("dice", "iou", "hd95", "asd")


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient 2|P∩R| / (|P| + |R|) of two boolean masks; 1.0 when both are empty.

    Both-empty counts as perfect agreement so that a correctly absent class does not pull a
    per-class mean down or turn it into NaN.
    """
    prediction, reference = _as_masks(prediction, reference)
    total = np.count_nonzero(prediction) + np.count_nonzero(reference)
    if total == 0:
        return 1.0
    return float(2.0 * np.count_nonzero(prediction & reference) / total)


def iou(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Intersection over union |P∩R| / |P∪R| (Jaccard index) of two boolean masks; 1.0 when both are empty."""
    prediction, reference = _as_masks(prediction, reference)
    union = np.count_nonzero(prediction | reference)
    if union == 0:
        return 1.0
    return float(np.count_nonzero(prediction & reference) / union)


def voxel_accuracy(prediction: np.ndarray, reference: np.ndarray, annotated: np.ndarray | None = None) -> float:
    """The share of voxels whose label in ``prediction`` equals that in ``reference`` (all labels,
    background included), among the ``annotated`` voxels when that mask is given."""
    prediction, reference = np.asarray(prediction), np.asarray(reference)
    if prediction.shape != reference.shape:
        raise ValueError(f"label maps differ in shape: {prediction.shape} and {reference.shape}")
    if annotated is None:
        return float(np.count_nonzero(prediction == reference) / max(prediction.size, 1))
    annotated_voxels = int(np.count_nonzero(annotated))
    return float(np.count_nonzero((prediction == reference) & annotated) / max(annotated_voxels, 1))


def annotated_mask(reference: np.ndarray, ignore: int | None) -> np.ndarray | None:
    """The voxels of ``reference`` that carry a label (not ``ignore``); None when nothing is ignored."""
    return None if ignore is None else np.asarray(reference) != ignore


def surface_distances(
    prediction_mask: np.ndarray,
    reference_mask: np.ndarray,
    spacing_zyx: tuple[float, float, float],
) -> tuple[float, float]:
    """Symmetric 95th percentile Hausdorff distance and average symmetric surface distance, in mm.

    Args:
        prediction_mask: boolean array indexed [z, y, x].
        reference_mask: boolean array of the same shape.
        spacing_zyx: voxel size in millimetres in array order (``Volume.spacing_zyx``).

    Returns:
        ``(hd95_mm, asd_mm)``: ``(0.0, 0.0)`` when both masks are empty, ``(inf, inf)`` when exactly
        one is empty.
    """
    prediction_mask, reference_mask = _as_masks(prediction_mask, reference_mask)
    if len(spacing_zyx) != 3 or min(spacing_zyx) <= 0:
        raise ValueError(f"spacing_zyx must be three positive values in mm, got {spacing_zyx}")
    has_prediction, has_reference = prediction_mask.any(), reference_mask.any()
    if not has_prediction and not has_reference:
        return 0.0, 0.0
    if not has_prediction or not has_reference:
        return math.inf, math.inf
    # Nearest surface points of either mask lie inside the union of their bounding boxes, so the
    # distance maps need only that box: much less work on large volumes with small structures.
    box = _union_bounding_box(prediction_mask, reference_mask)
    prediction_surface = _surface(prediction_mask[box])
    reference_surface = _surface(reference_mask[box])
    to_reference = _distance_to(reference_surface, spacing_zyx)[prediction_surface]
    to_prediction = _distance_to(prediction_surface, spacing_zyx)[reference_surface]
    hd95 = max(np.percentile(to_reference, 95), np.percentile(to_prediction, 95))
    asd = np.concatenate([to_reference, to_prediction]).mean()
    return float(hd95), float(asd)


def segmentation_metrics(
    prediction: Volume,
    reference: Volume,
    labels: list[int] | None = None,
    prediction_name: str = "prediction",
    reference_name: str = "reference",
    ignore: int | None = None,
) -> dict[int, dict[str, float]]:
    """Dice, IoU, HD95 (mm) and ASD (mm) for each label of two label maps on the same grid.

    Args:
        prediction: label map to judge (integer values; 0 is background).
        reference: ground-truth label map on the same grid (shape, spacing, origin, direction).
        labels: the labels to score; by default every non-zero value found in either volume.
        prediction_name, reference_name: how error messages name the two inputs (file paths).
        ignore: the reference's value for unannotated voxels: every metric is then computed on the
            annotated voxels only, and the value itself is not scored.

    Returns:
        ``{label: {"dice": ..., "iou": ..., "hd95": ..., "asd": ...}}`` in ascending label order.

    Raises:
        UserError: when the grids differ (a metric on misaligned voxels would be meaningless), or
            when an input is not a single-channel label map.
    """
    check_label_map(prediction, prediction_name)
    check_label_map(reference, reference_name)
    _check_same_grid(prediction, reference, prediction_name, reference_name)
    if labels is None:
        labels = found_labels(prediction, reference)
    annotated = annotated_mask(reference.array, ignore)
    return {int(label): _label_metrics(prediction, reference, int(label), annotated)
            for label in sorted(labels) if label != ignore}


def found_labels(*volumes: Volume) -> list[int]:
    """The sorted non-zero label values present in any of ``volumes``."""
    values: set[int] = set()
    for volume in volumes:
        values.update(int(value) for value in np.unique(volume.array) if value != 0)
    return sorted(values)


def _label_metrics(prediction: Volume, reference: Volume, label: int,
                   annotated: np.ndarray | None = None) -> dict[str, float]:
    predicted = prediction.array == label
    if annotated is not None:
        predicted &= annotated
    expected = reference.array == label
    hd95, asd = surface_distances(predicted, expected, reference.spacing_zyx)
    return {"dice": dice(predicted, expected), "iou": iou(predicted, expected), "hd95": hd95, "asd": asd}


def _as_masks(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    first, second = np.asarray(first, dtype=bool), np.asarray(second, dtype=bool)
    if first.shape != second.shape:
        raise ValueError(f"masks differ in shape: {first.shape} and {second.shape}")
    return first, second


def _union_bounding_box(first: np.ndarray, second: np.ndarray) -> tuple[slice, ...]:
    occupied = np.argwhere(first | second)
    low, high = occupied.min(axis=0), occupied.max(axis=0) + 1
    return tuple(slice(start, stop) for start, stop in zip(low, high))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with a face neighbour outside the mask; outside the array counts as outside."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = mask.copy()
    for axis in range(3):
        for start in (0, 2):
            neighbours = [slice(1, -1)] * 3
            neighbours[axis] = slice(start, start + mask.shape[axis])
            interior &= padded[tuple(neighbours)]
    return mask & ~interior


def _distance_to(surface: np.ndarray, spacing_zyx: tuple[float, float, float]) -> np.ndarray:
    """Euclidean distance in mm from every voxel centre to the nearest voxel of ``surface``."""
    image = sitk.GetImageFromArray(surface.astype(np.uint8))
    image.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    distance = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True
    )
    # Surface voxels themselves come out as -0.0 or a float32 rounding below it: they are at 0 mm.
    return np.maximum(sitk.GetArrayFromImage(distance).astype(np.float64), 0.0)


MAX_LABELS = 1000
"""More distinct labels than any segmentation has (whole-body atlases have a few hundred): such a map is an image."""


def check_label_map(volume: Volume, name: str) -> None:
    """UserError naming ``name`` unless ``volume`` is a single-channel map of integer labels, none negative
    and at most :data:`MAX_LABELS` of them (a CT image given as a label map would otherwise be scored as
    thousands of 'labels')."""
    if volume.channels != 1:
        raise UserError(f"{name} has {volume.channels} channels: a single-channel label map is needed")
    array = volume.array
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise UserError(
            f"{name} holds non-integer values (a probability map?): a label map of integer labels is needed"
        )
    if array.size and array.min() < 0:
        raise UserError(f"{name} holds negative values (down to {array.min():g}): it looks like an image, "
                        "not a label map of labels 0, 1, 2, ...")
    count = len(np.unique(array)) if array.size and array.dtype.itemsize > 1 else 0  # a byte holds 256 at most
    if count > MAX_LABELS:
        raise UserError(f"{name} holds {count} different values, more than the {MAX_LABELS} labels a label map "
                        "has: it looks like an image; give the label map")


def _check_same_grid(prediction: Volume, reference: Volume, prediction_name: str, reference_name: str) -> None:
    if prediction.same_grid(reference):
        return
    raise UserError(
        f"{prediction_name} and {reference_name} are on different voxel grids "
        f"({prediction_name}: {prediction.describe_grid_beside(reference)}; "
        f"{reference_name}: {reference.describe_grid_beside(prediction)}): "
        "resample the prediction onto the reference image first"
    )
