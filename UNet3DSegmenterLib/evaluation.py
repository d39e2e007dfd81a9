"""Scoring predicted label maps against reference label maps: per case, per class, and the mean.

``evaluate`` takes two files, or two folders whose files are matched by case name (the file name
without its volume extension, so ``case_007.nii.gz`` pairs with ``case_007.nrrd``). Every reference
case needs a prediction: a missing one is an error rather than a silently smaller average. Predictions
without a reference are skipped and listed under ``"ignored_predictions"``.

With ``ignore`` (the reference's value for unannotated voxels, sparse annotation), every metric is
computed on the annotated voxels only, and the report says so under ``"scored_on"``.

Every case is scored on the same labels (all non-zero values found in any prediction or reference),
so that the mean over cases is a mean over the same set; a class absent from both sides of a case
counts as correct (see :mod:`UNet3DSegmenterLib.metrics` for this and the other conventions). Each
case also gets its voxel accuracy (all voxels, background included).

:func:`summarize` turns per-case scores into the report every scoring writes (``evaluate``, and the
validation report of a training run), so that all of them have the same keys and the same means.

Example::

    >>> result = evaluate("predictions/", "labelsTr/")        # doctest: +SKIP
    >>> print(format_table(result))                           # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import FORMATS, case_name, is_dicom_folder, read_volume, volumes_by_case
from .metrics import METRIC_NAMES, annotated_mask, found_labels, segmentation_metrics, voxel_accuracy
from .volume import Volume

# What a class absent from both prediction and reference of a case scores (see metrics.dice).
_ABSENT_FROM_BOTH = {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}
_LISTED_NAMES = 5


def evaluate(prediction_path: str | os.PathLike, reference_path: str | os.PathLike, ignore: int | None = None) -> dict:
    """Score predictions against references (two files, or two folders matched by case name);
    ``ignore`` is the references' value for unannotated voxels, left out of every metric.

    Returns:
        :func:`summarize`'s report, and ``"ignored_predictions": [case, ...]``.

    Raises:
        UserError: a path is missing, one is a file and the other a folder, a reference case has no
            prediction, or a pair is not on the same voxel grid.
    """
    pairs, ignored = _case_pairs(Path(prediction_path), Path(reference_path))
    scores, accuracy = {}, {}
    for name, prediction, reference in pairs:
        scores[name], accuracy[name] = _score_files(prediction, reference, ignore)
    return {**summarize(scores, accuracy, ignore), "ignored_predictions": ignored}


def score_case(prediction: Volume, reference: Volume, labels: list[int] | None = None,
               prediction_name: str = "prediction", reference_name: str = "reference",
               ignore: int | None = None) -> tuple[dict[int, dict[str, float]], float]:
    """Per-label Dice, IoU, HD95 and ASD (see :func:`~UNet3DSegmenterLib.metrics.segmentation_metrics`)
    and the voxel accuracy of one case; ``labels`` default to those found in either label map, and
    with ``ignore`` only the reference's annotated voxels count."""
    labels = found_labels(prediction, reference) if labels is None else labels
    scores = segmentation_metrics(prediction, reference, labels, prediction_name, reference_name, ignore)
    return scores, voxel_accuracy(prediction.array, reference.array, annotated_mask(reference.array, ignore))


ANNOTATED_ONLY = "annotated voxels only"
"""What scores on sparsely annotated references say they cover."""


def scored_on(ignore: int | None) -> str:
    """Which voxels a report's scores cover, in words."""
    if ignore is None:
        return "all voxels"
    return f"{ANNOTATED_ONLY} (label {ignore}, 'ignore', left out)"


def summarize(cases: dict[str, dict[int, dict[str, float]]], accuracy: dict[str, float],
              ignore: int | None = None) -> dict:
    """Per-case scores (``{case: {label: {"dice", "iou", "hd95", "asd"}}}``) and voxel accuracies
    (``{case: value}``) as a report with the means over cases.

    Returns:
        ``{"cases": {case: {label: {...}}}, "accuracy": {case: value}, "mean": {label: {...}},
        "mean_foreground_dice": float, "mean_foreground_iou": float, "mean_accuracy": float}``, and
        with ``ignore`` (scores on annotated voxels only) ``"scored_on"`` saying so.
        A label missing from a case scores as absent from both sides. Distances are in mm and
        ``inf`` where a class is present on one side only; a mean over cases that include such a
        case is ``inf`` too. The two foreground means are means over labels of the mean per label
        (1.0 when no case has any foreground).
    """
    labels = sorted({label for scores in cases.values() for label in scores})
    cases = {name: {label: scores.get(label, dict(_ABSENT_FROM_BOTH)) for label in labels}
             for name, scores in cases.items()}
    mean = {label: {metric: float(np.mean([cases[name][label][metric] for name in cases]))
                    for metric in METRIC_NAMES} for label in labels}

    def over_labels(metric: str) -> float:
        return float(np.mean([mean[label][metric] for label in labels])) if labels else 1.0

    report = {"cases": cases, "accuracy": {name: float(value) for name, value in accuracy.items()}, "mean": mean,
              "mean_foreground_dice": over_labels("dice"), "mean_foreground_iou": over_labels("iou"),
              "mean_accuracy": float(np.mean(list(accuracy.values()))) if accuracy else 1.0}
    return report if ignore is None else {"scored_on": scored_on(ignore), **report}


def format_table(result: dict) -> str:
    """The result of :func:`evaluate` (or :func:`summarize`) as a text table: one row per case and
    label with the case's voxel accuracy on its first row, then the means."""
    accuracy = {**result["accuracy"], "mean": result["mean_accuracy"]}
    rows = [(name, label, scores) for name, case in result["cases"].items() for label, scores in case.items()]
    rows += [("mean", label, scores) for label, scores in result["mean"].items()]
    width = max([len("case")] + [len(name) for name, _, _ in rows])
    header = f"{'case':<{width}}  label    dice     iou  hd95 mm   asd mm  accuracy"
    lines = [header, "-" * len(header)]
    for index, (name, label, scores) in enumerate(rows):
        first_of_case = index == 0 or rows[index - 1][0] != name  # accuracy is per case: shown once
        lines.append(
            f"{name:<{width}}  {label:>5}  {scores['dice']:6.4f}  {scores['iou']:6.4f}"
            f"  {_millimetres(scores['hd95'])}  {_millimetres(scores['asd'])}"
            + (f"    {accuracy[name]:6.4f}" if first_of_case else "")
        )
    lines.append(f"mean foreground Dice: {result['mean_foreground_dice']:.4f}")
    lines.append(f"mean foreground IoU:  {result['mean_foreground_iou']:.4f}")
    if "scored_on" in result:
        lines.append(f"mean voxel accuracy:  {result['mean_accuracy']:.4f} (background included)")
        lines.append(f"scored on {result['scored_on']}")
    else:
        lines.append(f"mean voxel accuracy:  {result['mean_accuracy']:.4f} (all voxels, background included)")
    if result.get("ignored_predictions"):
        ignored = result["ignored_predictions"]
        lines.append(f"note: {len(ignored)} prediction(s) without a reference ignored: {_list_names(ignored)}")
    return "\n".join(lines)


def _case_pairs(prediction: Path, reference: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """(case, prediction file, reference file) for every reference case, and the unmatched predictions."""
    for path in (prediction, reference):
        if not path.exists():
            raise UserError(f"{path} not found: check the path")
    if _holds_cases(prediction) != _holds_cases(reference):
        raise UserError(
            f"give two files or two folders: {prediction} is a {_kind(prediction)} "
            f"and {reference} is a {_kind(reference)}"
        )
    if not _holds_cases(reference):
        return [(case_name(reference), prediction, reference)], []
    predictions, references = _cases_in(prediction), _cases_in(reference)
    missing = sorted(set(references) - set(predictions))
    if missing:
        raise UserError(
            f"{prediction} has no prediction for {len(missing)} of the {len(references)} cases in {reference}: "
            f"{_list_names(missing)} (file names must match without their extension)"
        )
    ignored = sorted(set(predictions) - set(references))
    return [(name, predictions[name], references[name]) for name in sorted(references)], ignored


def _cases_in(folder: Path) -> dict[str, Path]:
    cases = volumes_by_case(folder)
    if not cases:
        raise UserError(f"{folder} holds no volume files ({FORMATS}) and no DICOM series folders: check the folder")
    return cases


def _score_files(prediction_path: Path, reference_path: Path,
                 ignore: int | None = None) -> tuple[dict[int, dict[str, float]], float]:
    prediction, reference = read_volume(prediction_path), read_volume(reference_path)
    return score_case(prediction, reference, prediction_name=str(prediction_path),
                      reference_name=str(reference_path), ignore=ignore)


def _holds_cases(path: Path) -> bool:
    """A folder of cases, not a single volume (a file or a DICOM series folder)."""
    return path.is_dir() and not is_dicom_folder(path)


def _kind(path: Path) -> str:
    return "folder" if _holds_cases(path) else "DICOM series" if path.is_dir() else "file"


def _list_names(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED_NAMES])
    return shown + (f" and {len(names) - _LISTED_NAMES} more" if len(names) > _LISTED_NAMES else "")


def _millimetres(value: float) -> str:
    return f"{'inf':>7}" if math.isinf(value) else f"{value:7.2f}"
