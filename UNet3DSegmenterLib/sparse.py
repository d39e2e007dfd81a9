"""Sparse annotation: labelmaps in which only some slices were annotated.

Çiçek et al.'s 3D U-Net learns a dense segmentation from a few annotated slices. Here the voxels
that nobody annotated carry the value of a label named ``ignore`` (see :mod:`labels`); training,
validation and every metric leave them out. This module makes such labelmaps:

- :func:`mark_unannotated_slices`: a segmentation painted on some slices only (the Slicer panel's
  "only some slices are annotated"): slices, along the axis the user painted, that hold no segment
  at all are unannotated; an annotated slice counts as fully labelled, background included.
- :func:`keep_every_nth_slice`: a dense labelmap thinned to every n-th slice, to measure how much
  annotation a model needs (``bench/sparse.py``).

Arrays are in the engine's (z, y, x) order, so axis 0 is the axial axis of an axial acquisition.

Example::

    >>> labels = np.zeros((8, 4, 4), np.uint8); labels[2, 1:3, 1:3] = 1; labels[6, 1, 1] = 2
    >>> sparse = mark_unannotated_slices(labels, ignore=3)
    >>> [int(sparse[z, 0, 0]) for z in range(8)]
    [3, 3, 0, 3, 3, 3, 0, 3]
"""

from __future__ import annotations

import numpy as np


def painted_axis(labels: np.ndarray) -> int:
    """The axis (0, 1 or 2 of z, y, x) along which ``labels`` was painted slice by slice: the one whose
    slices between the first and the last annotated one are most often empty; axis 0 when no axis
    has gaps (a dense labelmap) or nothing is annotated."""
    annotated = np.asarray(labels) != 0
    gaps = []
    for axis in range(3):
        present = annotated.any(axis=tuple(other for other in range(3) if other != axis))
        indices = np.flatnonzero(present)
        span = indices[-1] - indices[0] + 1 if len(indices) else 0
        gaps.append(1 - len(indices) / span if span else 0.0)
    return int(np.argmax(gaps)) if max(gaps) > 0 else 0


def mark_unannotated_slices(labels: np.ndarray, ignore: int, axis: int | None = None) -> np.ndarray:
    """``labels`` with every slice along ``axis`` (default: :func:`painted_axis`) that holds no label
    set to ``ignore``; annotated slices are kept whole, their background included.

    Raises ValueError when no slice holds a label (nothing would be left to learn from).
    """
    labels = np.asarray(labels)
    axis = painted_axis(labels) if axis is None else axis
    others = tuple(other for other in range(3) if other != axis)
    annotated = (labels != 0).any(axis=others)
    if not annotated.any():
        raise ValueError("no slice holds a segment: paint at least one slice")
    result = labels.astype(np.result_type(labels.dtype, np.min_scalar_type(ignore)), copy=True)
    index: list[slice | np.ndarray] = [slice(None)] * 3
    index[axis] = ~annotated
    result[tuple(index)] = ignore
    return result


def keep_every_nth_slice(labels: np.ndarray, every: int, ignore: int, axis: int = 0, offset: int = 0) -> np.ndarray:
    """``labels`` annotated on every ``every``-th slice along ``axis`` (starting at ``offset``), all
    other slices set to ``ignore``; ``every`` 1 returns a copy."""
    if every < 1:
        raise ValueError(f"every must be at least 1 slice, got {every}")
    labels = np.asarray(labels)
    result = labels.astype(np.result_type(labels.dtype, np.min_scalar_type(ignore)), copy=True)
    dropped = np.ones(labels.shape[axis], bool)
    dropped[offset % every::every] = False
    index: list[slice | np.ndarray] = [slice(None)] * 3
    index[axis] = dropped
    result[tuple(index)] = ignore
    return result
