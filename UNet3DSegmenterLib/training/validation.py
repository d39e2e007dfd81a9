"""Validation during training, and the final per-case report.

During training, whole validation cases go through the very sliding window (and the same fast
inference rewrite) that ``predict`` uses, on the prepared grid, so the Dice that picks ``best.pt``
is the Dice inference will give. At the end, ``best.pt`` segments the original validation files
through :class:`~UNet3DSegmenterLib.predictor.Predictor` and every case is scored on its own grid
with Dice, IoU, HD95, ASD and voxel accuracy: that is ``validation_report.json``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..inference.fast import input_layout, prepare_for_inference
from ..inference.sliding_window import sliding_window_inference
from ..metrics import dice, iou, voxel_accuracy
from ..runtime import resolve_precision
from .patches import PreparedCase


def validate(module: nn.Module, cases: Sequence[PreparedCase], class_names: Sequence[str],
             patch_size: Sequence[int], device: torch.device, loss: nn.Module, overlap: float = 0.5) -> dict:
    """Mean loss, per-class Dice and IoU over ``cases``, their means over the foreground classes and
    the voxel accuracy, as ``{"val_loss", "dice": {name: value}, "iou": {...}, "mean_dice",
    "mean_iou", "accuracy", "validation_seconds"}``.

    ``class_names`` names the foreground classes 1, 2, ... of the network's output."""
    started = time.perf_counter()
    dtype = resolve_precision("auto", device)
    model = prepare_for_inference(module, device, dtype)
    names = list(class_names)
    losses: list[float] = []
    accuracies: list[float] = []
    scores: dict[str, dict[str, list[float]]] = {"dice": {name: [] for name in names}, "iou": {name: [] for name in names}}
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
            accuracies.append(voxel_accuracy(predicted, expected))
            for index, name in enumerate(names, start=1):
                scores["dice"][name].append(dice(predicted == index, expected == index))
                scores["iou"][name].append(iou(predicted == index, expected == index))
    means = {metric: {name: float(np.mean(values)) for name, values in per_class.items()}
             for metric, per_class in scores.items()}
    return {"val_loss": float(np.mean(losses)), **means, "mean_dice": float(np.mean(list(means["dice"].values()))),
            "mean_iou": float(np.mean(list(means["iou"].values()))), "accuracy": float(np.mean(accuracies)),
            "validation_seconds": time.perf_counter() - started}


def write_validation_report(checkpoint_path: Path, cases, device: str, path: Path,
                            resample_labels: bool = False) -> Path:
    """Segment each validation case's original image with the checkpoint and score it on its own grid:
    ``{"checkpoint", "labels": {value: name}}`` and :func:`~UNet3DSegmenterLib.evaluation.summarize`'s report."""
    from ..atomic import write_json
    from ..datalist import load_case
    from ..evaluation import score_case, summarize
    from ..inference.predictor import Predictor

    predictor = Predictor(checkpoint_path, device=device)
    labels = predictor.checkpoint.foreground_labels
    names = {label.value: label.name for label in predictor.checkpoint.labels}
    scores, accuracy = {}, {}
    for case in cases:
        image, reference = load_case(case, names, resample_labels)
        prediction = predictor.predict(image).labelmap
        scores[case.name], accuracy[case.name] = score_case(prediction, reference, [label.value for label in labels])
    report = {"checkpoint": str(checkpoint_path), "labels": {label.value: label.name for label in labels},
              **summarize(scores, accuracy)}
    return write_json(report, path)
