"""What the engine's command line and the process that starts it (the Slicer module) agree on, declared once.

- Progress: with ``--progress-json`` a command prints one JSON object per line on stdout, each one of
  the events below: ``train`` (and the trainer's progress callback) carries :data:`TrainingEvent`,
  ``predict`` carries :data:`PredictEvent`.
- Errors: a mistake the user can fix ends in one line on stderr that starts with
  :data:`ERROR_PREFIX` (:func:`error_line`; a parent reads it back with :func:`error_message`), and
  exit status :data:`EXIT_USER_ERROR`.
- Stopping: a file named :data:`STOP_FILE` in a training run's output folder stops the run after its
  current iteration; it saves ``last.pt``, removes the file and exits :data:`EXIT_OK`. A parent
  withdraws a stale request (:func:`withdraw_stop_request`) before it starts a run there.

Standard library only, so that the Slicer side's process runner can use it anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, NotRequired, TypedDict

EXIT_OK = 0
EXIT_USER_ERROR = 2
"""A mistake in an input or an option (one ``error:`` line says which); argparse uses it for bad options too."""
EXIT_INTERRUPTED = 130
"""Ctrl-C pressed twice: stopped at once, without saving."""
ERROR_PREFIX = "error: "
STOP_FILE = "STOP"
"""A file of this name in a training run's output folder stops the run after the current iteration."""


def error_line(message: str) -> str:
    """The one line on stderr that reports a user's mistake."""
    return ERROR_PREFIX + message


def error_message(line: str) -> str | None:
    """The message of an :func:`error_line`; None for another line."""
    marker = ERROR_PREFIX.strip()
    stripped = line.strip()
    return stripped[len(marker):].strip() if stripped.startswith(marker) else None


def stop_file(folder: str | os.PathLike) -> Path:
    """The file that stops the training run in ``folder``."""
    return Path(folder) / STOP_FILE


def withdraw_stop_request(folder: str | os.PathLike) -> None:
    """Remove a stop request left in ``folder``, honoured or not, so that it cannot stop the next run there."""
    stop_file(folder).unlink(missing_ok=True)


# --- progress events ----------------------------------------------------------------------------


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
    scored_on: NotRequired[str]  # where the references are annotated sparsely


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
