"""Progress for people (a bar in the terminal) and for programs (one JSON object per line).

The events are declared here, once: the trainer's progress callback and ``train --progress-json``
carry :data:`TrainingEvent`, ``predict --progress-json`` carries :data:`PredictEvent`, and the
Slicer module reads both from its child process.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Literal, NotRequired, TextIO, TypedDict

import numpy as np


class PreparingEvent(TypedDict):
    """Cases read, resampled and normalised before training: ``done`` of ``total`` ``kind`` cases."""

    event: Literal["preparing"]
    kind: Literal["training", "validation"]
    done: int
    total: int


class IterationEvent(TypedDict):
    """One optimiser step; ``eta`` is the estimated seconds left in the whole run (with a time budget: in it)."""

    event: Literal["iteration"]
    epoch: int
    epochs: int
    iteration: int
    iterations: int
    loss: float
    eta: float


class _EpochEventRequired(TypedDict):
    event: Literal["epoch"]
    epoch: int
    epochs: int
    train_loss: float
    lr: float
    seconds: float
    eta: float


class EpochEvent(_EpochEventRequired, total=False):
    """The end of an epoch; ``dice`` (class name -> Dice) and ``mean_dice`` only after a validation,
    ``scored_on`` only where the validation cases are annotated sparsely (Dice on annotated voxels)."""

    dice: dict[str, float]
    mean_dice: float
    scored_on: str


class DoneEvent(TypedDict):
    """The run ended (completed, stopped early or cancelled); ``best_dice`` is None without validation."""

    event: Literal["done"]
    best_checkpoint: str
    last_checkpoint: str
    best_dice: float | None
    stopped: str


class TestEvent(TypedDict):
    """best.pt (or a cross-validation's ensemble) scored on the held-out test cases: the loss, and per
    class name Dice, IoU and HD95 in mm (None where a class is missing on one side), all case means."""

    event: Literal["test"]
    checkpoint: str
    report: str
    cases: int
    loss: float
    dice: dict[str, float]
    iou: dict[str, float]
    hd95: dict[str, float | None]
    mean_dice: float
    scored_on: NotRequired[str]


class FoldEvent(TypedDict):
    """Cross-validation starts (or resumes) training fold ``fold`` (0-based) of ``folds``."""

    event: Literal["fold"]
    fold: int
    folds: int


class CrossValidationEvent(TypedDict):
    """Every fold is trained: the mean over folds of each fold's validation Dice per class name."""

    event: Literal["cross_validation"]
    report: str
    ensemble: str
    folds: int
    dice: dict[str, float]
    mean_dice: float


class WindowsEvent(TypedDict):
    """Sliding-window progress of one case of ``predict``."""

    event: Literal["progress"]
    case: str
    done: int
    total: int


class WarningEvent(TypedDict):
    """A case of ``predict`` lies far outside the model's training data (see fingerprint.py): one
    plain line, before its windows run. The case is segmented all the same."""

    event: Literal["warning"]
    case: str
    message: str


class WrittenEvent(TypedDict):
    """A case's labelmap was written by ``predict``."""

    event: Literal["written"]
    case: str
    output: str


TrainingEvent = PreparingEvent | IterationEvent | EpochEvent | DoneEvent | TestEvent | FoldEvent | CrossValidationEvent
PredictEvent = WindowsEvent | WarningEvent | WrittenEvent


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressBar:
    """A one-line bar with count, elapsed time and an estimate of the time left.

    Redraws in place on a terminal; elsewhere (a log file, a pipe) it prints nothing until
    :meth:`close`, which writes a single summary line.
    """

    def __init__(self, label: str, unit: str = "", stream: TextIO | None = None, width: int = 28):
        self.label, self.unit, self.width = label, unit, width
        self.stream = stream or sys.stderr
        self.interactive = getattr(self.stream, "isatty", lambda: False)()
        self.started = time.perf_counter()
        self.done = self.total = 0
        self.note = ""

    def update(self, done: int, total: int, note: str = "") -> None:
        self.done, self.total, self.note = done, total, note
        if self.interactive:
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self) -> None:
        if self.total:
            self.stream.write(("\r" if self.interactive else "") + self._line() + "\n")
            self.stream.flush()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.started
        fraction = self.done / self.total if self.total else 0.0
        filled = int(self.width * fraction)
        bar = "#" * filled + "." * (self.width - filled)
        remaining = elapsed / fraction - elapsed if 0 < fraction < 1 else 0.0
        eta = f" eta {_duration(remaining)}" if 0 < fraction < 1 else ""
        note = f" {self.note}" if self.note else ""
        return f"{self.label} [{bar}] {self.done}/{self.total} {self.unit} {_duration(elapsed)}{eta}{note}"

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def json_ready(value):
    """``value`` as plain JSON data: string keys, numpy numbers as Python numbers, NaN and infinity as
    None (JSON has neither, and Python's ``Infinity`` is not valid JSON for other readers)."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def emit_json(stream: TextIO | None = None, **fields) -> None:
    """Write one JSON object on one line and flush, for a parent process to read as it happens."""
    stream = stream or sys.stdout
    stream.write(json.dumps(json_ready(fields), allow_nan=False, default=str) + "\n")
    stream.flush()
