"""Validation during training, and the final per-case report.

During training, whole validation cases go through the very sliding window (and the same fast
inference rewrite) that ``predict`` uses, on the prepared grid, so the Dice that picks ``best.pt``
is the Dice inference will give. At the end, ``best.pt`` segments the original validation files
through :class:`~UNet3DSegmenterLib.predictor.Predictor` and every case is scored on its own grid
with Dice, IoU, HD95, ASD and voxel accuracy: that is ``validation_report.json``; the test cases, scored the same
way and with the training loss, make ``test_report.json``.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointSource
from ..evaluation import ANNOTATED_ONLY
from ..inference.fast import input_layout, prepare_for_inference
from ..inference.sliding_window import sliding_window_inference, window_positions
from ..labels import IGNORE_INDEX, IGNORE_NAME
from ..metrics import dice, iou, voxel_accuracy
from ..protocol import TestEvent
from ..runtime import resolve_precision
from .patches import PreparedCase


def validate(module: nn.Module, cases: Sequence[PreparedCase], class_names: Sequence[str],
             patch_size: Sequence[int], device: torch.device, loss: nn.Module, overlap: float = 0.5) -> dict:
    """Mean loss, per-class Dice and IoU over ``cases``, their means over the foreground classes and
    the voxel accuracy, as ``{"val_loss", "dice": {name: value}, "iou": {...}, "mean_dice",
    "mean_iou", "accuracy", "validation_seconds"}``.

    ``class_names`` names the foreground classes 1, 2, ... of the network's output. Where targets hold
    unannotated voxels (sparse annotation), every score is on the annotated voxels only, and the
    result says so under ``"scored_on"``."""
    started = time.perf_counter()
    dtype = resolve_precision("auto", device)
    model = prepare_for_inference(module, device, dtype)
    names = list(class_names)
    losses: list[float] = []
    accuracies: list[float] = []
    scores: dict[str, dict[str, list[float]]] = {"dice": {name: [] for name in names}, "iou": {name: [] for name in names}}
    sparse = False
    autocast = torch.autocast("cuda", dtype=dtype, enabled=device.type == "cuda" and dtype != torch.float32)
    with torch.inference_mode(), autocast:
        for case in cases:
            logits = sliding_window_inference(
                torch.from_numpy(np.asarray(case.image)), model, patch_size, len(names) + 1,
                overlap=overlap, batch_size=4 if device.type == "cuda" else 2,
                prepare_batch=lambda batch: input_layout(batch, device, dtype), accumulate_device=device)
            target = torch.from_numpy(np.asarray(case.target, np.int64)).to(device)
            losses.append(float(loss(logits[None], target[None])))
            predicted, expected = logits.argmax(0).cpu().numpy(), np.asarray(case.target)
            annotated = expected != IGNORE_INDEX
            sparse = sparse or not annotated.all()
            accuracies.append(voxel_accuracy(predicted, expected, annotated))
            for index, name in enumerate(names, start=1):
                scores["dice"][name].append(dice((predicted == index) & annotated, expected == index))
                scores["iou"][name].append(iou((predicted == index) & annotated, expected == index))
    means = {metric: {name: float(np.mean(values)) for name, values in per_class.items()}
             for metric, per_class in scores.items()}
    return {"val_loss": float(np.mean(losses)), **means, "mean_dice": float(np.mean(list(means["dice"].values()))),
            "mean_iou": float(np.mean(list(means["iou"].values()))), "accuracy": float(np.mean(accuracies)),
            "validation_seconds": time.perf_counter() - started, **({"scored_on": ANNOTATED_ONLY} if sparse
                                                                    else {})}


def validation_windows(cases: Sequence[PreparedCase], patch_size: Sequence[int], overlap: float) -> int:
    """How many sliding windows :func:`validate` runs over ``cases`` (what a time budget plans with)."""
    return sum(len(window_positions(tuple(case.target.shape), tuple(patch_size), overlap)) for case in cases)


def write_validation_report(checkpoint_path: Path, cases, device: str, path: Path,
                            resample_labels: bool = False, ignore: int | None = None) -> Path:
    """Segment each validation case's original image with the checkpoint and score it on its own grid."""
    from ..atomic import write_json

    return write_json(case_report(checkpoint_path, cases, device, resample_labels, ignore=ignore), path)


def case_report(checkpoint: CheckpointSource, cases, device: str, resample_labels: bool = False,
                loss: nn.Module | None = None, ignore: int | None = None) -> dict:
    """Segment each case's original image with ``checkpoint`` (a path, a folder or an ensemble) and score
    it on its own grid: Dice, IoU, HD95 and ASD per case and class, the voxel accuracy per case, and
    their means (:func:`~UNet3DSegmenterLib.evaluation.summarize`).

    With ``loss`` (a training loss), also the loss of the predicted probabilities against the
    reference, per case (``case_loss``) and on average (``loss``): the loss of what inference
    outputs, an ensemble's averaged probabilities included.

    ``ignore`` is the label value of unannotated voxels in the references (sparse annotation): every
    score and the loss then cover annotated voxels only, and the report says so (``"scored_on"``).
    """
    from ..datalist import load_case
    from ..evaluation import score_case, summarize
    from ..inference.predictor import Predictor

    def _scored_anyway(warning: str) -> None:
        """A validation case unlike the training cases is scored as it is (its Dice shows the effect)."""

    predictor = Predictor(checkpoint, device=device)
    labels = predictor.checkpoint.foreground_labels
    values = [label.value for label in predictor.checkpoint.labels]
    names = {label.value: label.name for label in predictor.checkpoint.labels} | \
        ({ignore: IGNORE_NAME} if ignore is not None else {})
    loss = copy.deepcopy(loss).cpu() if loss is not None else None
    scores: dict[str, dict[int, dict[str, float]]] = {}
    accuracy: dict[str, float] = {}
    losses: dict[str, float] = {}
    for case in cases:
        image, reference = load_case(case, names, resample_labels)
        prediction = predictor.predict(image, probabilities=loss is not None, warn=_scored_anyway)
        scores[case.name], accuracy[case.name] = score_case(prediction.labelmap, reference,
                                                            [label.value for label in labels], ignore=ignore)
        if loss is not None and prediction.probabilities is not None:
            losses[case.name] = _probability_loss(loss, prediction.probabilities.array, reference.array, values,
                                                  ignore)
    report: dict = {
        "checkpoint": str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else [str(path) for path in checkpoint],
        "labels": {label.value: label.name for label in labels},
        **summarize(scores, accuracy, ignore),
    }
    if losses:
        report = {"loss": float(np.mean(list(losses.values()))), **report, "case_loss": losses}
    return report


def _probability_loss(loss: nn.Module, probabilities: np.ndarray, reference: np.ndarray, values: list[int],
                      ignore: int | None = None) -> float:
    """``loss`` of class probabilities (c, z, y, x): their logarithms are logits whose softmax is exactly them."""
    lookup = np.zeros(max(values + [ignore or 0]) + 1, np.int64)
    lookup[values] = np.arange(len(values))
    if ignore is not None:
        lookup[ignore] = IGNORE_INDEX
    target = torch.from_numpy(lookup[np.asarray(reference, np.int64)])
    logits = torch.from_numpy(np.asarray(probabilities, np.float32)).clamp_min(1e-8).log()
    with torch.no_grad():
        return float(loss(logits[None], target[None]))


def test_event(report: dict, checkpoint: Path, path: Path) -> TestEvent:
    """The progress event that announces a test report (class names instead of label values)."""
    names, mean = report["labels"], report["mean"]
    event: TestEvent = {
        "event": "test", "checkpoint": str(checkpoint), "report": str(path), "cases": len(report["cases"]),
        "loss": report["loss"], "dice": {names[value]: scores["dice"] for value, scores in mean.items()},
        "iou": {names[value]: scores["iou"] for value, scores in mean.items()},
        "hd95": {names[value]: scores["hd95"] for value, scores in mean.items()},
        "mean_dice": report["mean_foreground_dice"]}
    if "scored_on" in report:
        event["scored_on"] = report["scored_on"]
    return event
