"""Pictures for people: training curves and image | reference | prediction overlays (PNG).

matplotlib's Agg backend draws without a display, so this works on servers and inside Slicer's
child processes alike. Files are written atomically like every other output.

Example::

    >>> save_overlay(image, reference, prediction, "overlay.png")
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .labels import default_color
from .volume import Volume, int3


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as pyplot

    return pyplot


def _save(figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path, ".png") as temporary:
            figure.savefig(temporary, dpi=100)
    finally:
        _pyplot().close(figure)
    return path


def save_curves(rows: Sequence[dict], class_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Loss (training, and validation where measured), then validation Dice and IoU per class and
    their means over epochs, side by side."""
    pyplot = _pyplot()
    figure, (loss_axes, dice_axes, iou_axes) = pyplot.subplots(1, 3, figsize=(16, 4))
    epochs = [row["epoch"] for row in rows]
    loss_axes.plot(epochs, [row["train_loss"] for row in rows], label="training")
    validated = [row for row in rows if row.get("val_loss") is not None]
    if validated:
        loss_axes.plot([row["epoch"] for row in validated], [row["val_loss"] for row in validated], "o-",
                       label="validation")
    loss_axes.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axes.legend(loc="upper right", fontsize="small")
    loss_axes.grid(alpha=0.3)
    for axes, metric, title in ((dice_axes, "dice", "Dice"), (iou_axes, "iou", "IoU")):
        _plot_per_class(axes, validated, class_names, metric, title)
    figure.tight_layout()
    return _save(figure, path)


def _plot_per_class(axes, validated: Sequence[dict], class_names: Sequence[str], metric: str, title: str) -> None:
    """One line per class of ``row[metric]`` over the validated epochs, and their mean dashed."""
    if validated:
        epochs = [row["epoch"] for row in validated]
        for name in class_names:
            axes.plot(epochs, [row[metric][name] for row in validated], "o-", label=name)
        axes.plot(epochs, [float(np.mean([row[metric][name] for name in class_names])) for row in validated], "k--",
                  label="mean")
        axes.legend(loc="lower right", fontsize="small")
    else:
        axes.text(0.5, 0.5, "no validation cases", ha="center", va="center", transform=axes.transAxes)
    axes.set(xlabel="epoch", ylabel=title, title=f"validation {title} per class", ylim=(0, 1))
    axes.grid(alpha=0.3)


def save_overlay(image: Volume, reference: Volume | None, prediction: Volume, path: str | os.PathLike,
                 colors: Mapping[int, Sequence[float]] | None = None) -> Path:
    """Axial, coronal and sagittal slices through the labelled region: image | reference | prediction.

    ``reference`` may be None (then that column says so); labelmaps must share the image's grid.
    ``colors`` maps label value -> (r, g, b) in 0..1 (default: a qualitative palette).
    Slices are drawn with their physical aspect ratio, so anisotropic voxels are not squashed.
    """
    for labels in (reference, prediction):
        if labels is not None and labels.shape != image.shape:
            raise ValueError(f"labelmap grid {labels.shape} differs from the image grid {image.shape}")
    pyplot = _pyplot()
    array = image.array if image.array.ndim == 3 else image.array[0]
    focus = reference if reference is not None and np.any(reference.array) else prediction
    centre = _centre(focus.array)
    low, high = np.percentile(array, (0.5, 99.5))
    spacing_zyx = image.spacing_zyx
    figure, axes = pyplot.subplots(3, 3, figsize=(10, 10))
    for row, (plane, axis) in enumerate((("axial", 0), ("coronal", 1), ("sagittal", 2))):
        aspect = _aspect(spacing_zyx, axis)
        for column, (title, labels) in enumerate((("image", None), ("reference", reference),
                                                 ("prediction", prediction))):
            ax = axes[row, column]
            ax.imshow(_slice(array, axis, centre[axis]), cmap="gray", vmin=low, vmax=high, aspect=aspect,
                      origin="lower" if axis else "upper", interpolation="nearest")
            if labels is not None:
                ax.imshow(_rgba(_slice(labels.array, axis, centre[axis]), colors), aspect=aspect,
                          origin="lower" if axis else "upper", interpolation="nearest")
            elif column == 1:
                ax.text(0.5, 0.5, "no reference", color="white", ha="center", transform=ax.transAxes)
            ax.set_axis_off()
            ax.set_title(f"{title} ({plane})" if row == 0 else plane, fontsize="small")
    figure.tight_layout()
    return _save(figure, path)


def _centre(labels: np.ndarray) -> tuple[int, int, int]:
    """The voxel at the centre of the labelled region, or of the volume when nothing is labelled."""
    found = np.argwhere(labels > 0)
    if not len(found):
        return int3(size // 2 for size in labels.shape)
    return int3(round(value) for value in found.mean(axis=0))


def _slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(array, index, axis=axis)


def _aspect(spacing_zyx, axis: int) -> float:
    rows, columns = [spacing for other, spacing in enumerate(spacing_zyx) if other != axis]
    return rows / columns


def _rgba(labels: np.ndarray, colors: Mapping[int, Sequence[float]] | None) -> np.ndarray:
    rgba = np.zeros((*labels.shape, 4), np.float32)
    for value in (int(value) for value in np.unique(labels) if value != 0):
        color = (colors or {}).get(value, default_color(value))
        rgba[labels == value] = (*color[:3], 0.45)
    return rgba
