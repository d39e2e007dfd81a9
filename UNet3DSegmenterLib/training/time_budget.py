"""Minutes, not epochs: how many epochs fit a time budget (``train --time-budget MINUTES``).

An epoch's cost depends on the machine, the patch and the network, so it is measured, not guessed:
the trainer times its first iterations (after two that warm up) and plans the epochs that fit what is left of the budget,
keeping back the time that the end of the run needs (validation of the last epoch, the validation
report on the original files, the test report). A validation's time is first estimated from the
number of sliding windows it runs (a window's forward pass costs about a third of a training patch's
forward and backward pass) and then measured at every validated epoch, which plans the rest again.
If an epoch still runs late, the trainer ends it early and finishes, so that the run ends with
validation and a saved model inside the budget. ``run.json`` records the budget and the plan.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PROBE_ITERATIONS = 10
"""Iterations run before the first plan (fewer when an epoch is shorter)."""
PROBE_WARM_UP = 2
"""Of those, the first ones are not timed: the loader starts and the kernels warm up."""
_FORWARD_SHARE = 1 / 3  # of a training iteration's time, per patch, spent in the forward pass
_MARGIN = 1.25  # the end of a run is kept back with this margin
_MARGIN_SECONDS = 5.0


@dataclass
class TimePlan:
    """What the trainer planned for a budget: all times in seconds."""

    budget_seconds: float
    seconds_per_iteration: float
    validation_seconds: float
    final_seconds: float
    epochs: int
    timed_iterations: int

    def to_json(self) -> dict:
        return {key: round(value, 3) if isinstance(value, float) else value for key, value in asdict(self).items()}


def estimated_validation_seconds(windows: int, seconds_per_iteration: float, batch_size: int) -> float:
    """A validation's time before one was measured: its sliding ``windows`` (see
    :func:`~UNet3DSegmenterLib.training.validation.validation_windows`), each a forward pass of one patch."""
    return windows * seconds_per_iteration / batch_size * _FORWARD_SHARE


def final_seconds(validation_seconds: float, validation_cases: int, test_cases: int) -> float:
    """Time kept back for the end of the run: the validation report segments the validation cases
    once more, the test report the test cases (about a validation's time per validation case each)."""
    per_case = validation_seconds / validation_cases if validation_cases else 0.0
    return (validation_seconds + per_case * test_cases) * _MARGIN + _MARGIN_SECONDS


def plan_epochs(seconds_left: float, iterations_per_epoch: int, seconds_per_iteration: float,
                validation_seconds: float, val_every: int, end_seconds: float) -> int:
    """The whole epochs that fit ``seconds_left``, with their validations (every ``val_every``-th,
    and the last) and ``end_seconds`` kept back; 0 when not one fits."""
    training = iterations_per_epoch * seconds_per_iteration
    per_epoch = training + validation_seconds / val_every
    usable = seconds_left - end_seconds - validation_seconds * (1 - 1 / val_every)  # the last epoch validates
    return max(0, math.floor(usable / per_epoch)) if per_epoch > 0 else 1

