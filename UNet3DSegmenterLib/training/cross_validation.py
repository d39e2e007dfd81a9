"""Cross-validation: every fold of ``--folds K`` trained in turn, then the folds as one ensemble.

The output folder::

    run.json           the configuration (K folds, no single fold)
    fold_0/ ...        one ordinary training run per fold (best.pt, last.pt, log.csv, split.json,
                       validation_report.json, and test_report.json when there is a test set)
    cv_report.json     per fold and over the folds (mean and standard deviation), per class: Dice,
                       IoU, HD95 and ASD of each fold's best.pt on its validation cases; rewritten
                       after every fold, so it always says which folds are finished
    ensemble.pt        the folds' best.pt as one ensemble checkpoint (predict averages them)
    test_report.json   with a test set: the ensemble scored on the test cases

The test cases (``--split TRAIN 0 TEST``) are held out of every fold, the same cases for all. Each
fold's best.pt is scored on them (``fold_i/test_report.json``) and so is the ensemble; cv_report.json
sets the ensemble's scores beside the mean of the folds'. The folds share one plan (spacing, patch
size, normalisation, from all their cases), so their checkpoints can always be averaged.

``--resume`` keeps the folds that cv_report.json lists as finished, continues the fold that was cut
off from its ``last.pt``, then trains the rest: a cut-off run loses at most one fold's progress
since that fold's last epoch.

Example::

    >>> result = cross_validate(TrainingConfig(data="Task04_Hippocampus", output="runs/cv", folds=5))
    >>> result.ensemble      # runs/cv/ensemble.pt
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np

from ..atomic import write_json
from ..checkpoint import Checkpoint, Ensemble, load_single_checkpoint, save_checkpoint
from ..datalist import load_datalist
from ..errors import UserError
from ..metrics import METRIC_NAMES
from ..protocol import CrossValidationEvent, FoldEvent, TrainingEvent
from .config import TrainingConfig
from .distributed import Distributed
from .losses import build_loss
from .splits import read_split
from .trainer import ProgressCallback, TrainingResult, train
from .validation import case_report, test_event

CV_REPORT_FORMAT = 1


@dataclass
class CrossValidationResult:
    """What a cross-validation produced. ``stopped`` is 'completed' or 'cancelled'; ``report`` is the
    content of cv_report.json; ``ensemble`` and ``test_report`` are None until every fold is done."""

    output: Path
    stopped: str
    report: dict
    report_path: Path
    ensemble: Path | None = None
    test_report: Path | None = None


def cross_validate(config: TrainingConfig, progress: ProgressCallback | None = None,
                   cancel: Callable[[], bool] | None = None) -> CrossValidationResult:
    """Train every fold of ``config.folds`` in turn; see the module docstring for what is written.

    ``progress`` receives the events of each fold's training (a 'fold' event before each) and a
    final 'cross_validation' event; ``cancel`` stops the fold in progress, as in :func:`train`.
    """
    if not config.cross_validation:
        raise UserError("cross-validation needs --folds K and no --fold")
    config.check_output()
    distributed = Distributed.start(config.device)  # once for all folds; each fold's train() joins it
    try:
        return _CrossValidation(config, distributed.main, progress or (lambda event: None), cancel).run()
    finally:
        distributed.stop()


class _CrossValidation:
    def __init__(self, config: TrainingConfig, main: bool, progress: ProgressCallback, cancel):
        self.config, self.main, self.progress, self.cancel = config, main, progress, cancel
        self.folds = cast(int, config.folds)
        self.output = config.output
        self.paths = {name: self.output / name for name in ("run.json", "cv_report.json", "ensemble.pt",
                                                            "test_report.json")}

    def run(self) -> CrossValidationResult:
        finished = self._finished_folds() if self.config.resume else {}
        for fold in range(self.folds):  # before anything is written: no fold folder may hold a model either
            if fold not in finished:
                self._fold_config(fold).check_output()
        if self.main:
            self.output.mkdir(parents=True, exist_ok=True)
            if not self.config.resume:
                for stale in ("cv_report.json", "ensemble.pt", "test_report.json"):
                    self.paths[stale].unlink(missing_ok=True)
            dataclasses.replace(self.config, resume=False, overwrite=False).save(self.paths["run.json"])
        for fold in range(self.folds):
            if fold in finished:
                continue
            self._emit(FoldEvent(event="fold", fold=fold, folds=self.folds))
            result = train(self._fold_config(fold), self.progress, self.cancel)
            if result.stopped == "cancelled":
                return CrossValidationResult(self.output, "cancelled", self._report(finished),
                                             self.paths["cv_report.json"])
            if self.main:  # only the main process writes (and so reads) the fold's reports
                finished[fold] = _fold_entry(fold, result)
                write_json(self._report(finished), self.paths["cv_report.json"])
        if not self.main:
            return CrossValidationResult(self.output, "completed", {}, self.paths["cv_report.json"])
        return self._finish(finished)

    def _fold_config(self, fold: int) -> TrainingConfig:
        output = self.output / f"fold_{fold}"
        resume = self.config.resume and (output / "last.state.pt").is_file()
        # A resumed cross-validation starts again a fold that saved no state: it has nothing to continue.
        overwrite = not resume and (self.config.overwrite or self.config.resume)
        return dataclasses.replace(self.config, fold=fold, output=output, resume=resume, overwrite=overwrite)

    def _finished_folds(self) -> dict[int, dict]:
        """The folds an earlier run finished, from its cv_report.json (whose best.pt is still there)."""
        path = self.paths["cv_report.json"]
        if not path.is_file():
            return {}
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            entries = {int(entry["fold"]): entry for entry in report["per_fold"]}
            folds = int(report["folds"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise UserError(f"cannot resume from {path} ({error}): delete it to train every fold again") from None
        if folds != self.folds:
            raise UserError(f"cannot resume: {self.output} holds a {folds}-fold cross-validation, not {self.folds}; "
                            f"give --folds {folds}")
        return {fold: entry for fold, entry in entries.items()
                if (self.output / f"fold_{fold}" / "best.pt").is_file()}

    def _finish(self, finished: dict[int, dict]) -> CrossValidationResult:
        report = self._report(finished)
        members = [load_single_checkpoint(self.output / f"fold_{fold}" / "best.pt", "an ensemble member")
                   for fold in range(self.folds)]
        names = report["labels"]
        training = {"folds": self.folds, "data": str(self.config.data),
                    "cv_mean_dice": report["mean_foreground_dice"],
                    "cv_dice": {names[value]: scores["dice"] for value, scores in report["mean"].items()}}
        ensemble = save_checkpoint(Ensemble(members, training), self.paths["ensemble.pt"])
        report["ensemble"] = str(ensemble)
        test_path = self._test(report, members)
        write_json(report, self.paths["cv_report.json"])
        self._emit(CrossValidationEvent(event="cross_validation", report=str(self.paths["cv_report.json"]),
                                        ensemble=str(ensemble), folds=self.folds, dice=training["cv_dice"],
                                        mean_dice=report["mean_foreground_dice"]))
        return CrossValidationResult(self.output, "completed", report, self.paths["cv_report.json"], ensemble,
                                     test_path)

    def _test(self, report: dict, members: list[Checkpoint]) -> Path | None:
        """Score the ensemble on the test cases (held out of every fold) into test_report.json."""
        split = read_split(self.output / "fold_0" / "split.json")
        if not split.test:
            return None
        cases = load_datalist(self.config.data, self.config.input_spacing, self.config.case_pattern).subset(split.test)
        loss = build_loss(self.config.loss, len(members[0].labels), _trained_weights(members))
        scores = case_report(self.paths["ensemble.pt"], cases, self.config.device, self.config.resample_labels, loss,
                             members[0].ignore_value)
        write_json(scores, self.paths["test_report.json"])
        folds_mean = _mean_over([entry["test"]["mean"] for entry in report["per_fold"] if "test" in entry])
        report["test"] = {"cases": split.test, "ensemble": _summary(_as_json(scores)),
                          "mean_of_folds": folds_mean}
        self._emit(test_event(scores, self.paths["ensemble.pt"], self.paths["test_report.json"]))
        return self.paths["test_report.json"]

    def _report(self, finished: dict[int, dict]) -> dict:
        entries = [finished[fold] for fold in sorted(finished)]
        means = [entry["mean"] for entry in entries]
        mean = _mean_over(means)
        return {
            "format": CV_REPORT_FORMAT,
            "folds": self.folds,
            "complete": len(entries) == self.folds,
            "labels": entries[0]["labels"] if entries else {},
            "per_fold": entries,
            "mean": mean,
            "std": _mean_over(means, np.std),
            "mean_foreground_dice": float(np.mean([scores["dice"] for scores in mean.values()])) if mean else None,
        }

    def _emit(self, event: TrainingEvent) -> None:
        if self.main:
            self.progress(event)


def _trained_weights(members: list[Checkpoint]) -> list[float] | None:
    """The class weights the folds' losses were trained with (the trainer resolves them, e.g. the
    inverse frequencies of 'weighted_dice'), averaged over the folds; None when they used none."""
    weights = [member.training.get("loss_class_weights") for member in members]
    if any(weight is None for weight in weights):
        return None
    return [float(value) for value in np.mean(np.asarray(weights, np.float64), axis=0)]


def _fold_entry(fold: int, result: TrainingResult) -> dict:
    """One fold's line of cv_report.json, from its validation (and test) report."""
    if result.validation_report is None:
        raise UserError(f"fold {fold} has no validation cases: each fold needs some (use fewer --folds)")
    validation = json.loads(result.validation_report.read_text(encoding="utf-8"))
    entry = {"fold": fold, "checkpoint": str(result.best_checkpoint), "best_epoch": result.best_epoch,
             "epochs": result.epochs_completed, "stopped": result.stopped,
             "validation_cases": sorted(validation["cases"]), "labels": validation["labels"],
             **_summary(validation)}
    if result.test_report is not None:
        entry["test"] = _summary(json.loads(result.test_report.read_text(encoding="utf-8")))
    return entry


def _summary(report: dict) -> dict:
    """The means of a case report (validation or test), without its per-case scores."""
    return {key: report[key] for key in ("loss", "mean", "mean_foreground_dice") if key in report}


def _as_json(report: dict) -> dict:
    """``report`` as it reads back from JSON (label values as strings, infinities as None)."""
    from ..progress import json_ready

    return json.loads(json.dumps(json_ready(report)))


def _mean_over(means: list[dict], statistic=np.mean) -> dict:
    """Per label and metric, ``statistic`` over several reports' means (None, an infinite distance, stays one)."""
    if not means:
        return {}
    return {label: {metric: _statistic([scores[label][metric] for scores in means], statistic)
                    for metric in METRIC_NAMES} for label in means[0]}


def _statistic(values: list, statistic) -> float:
    numbers = [math.inf if value is None else float(value) for value in values]
    if any(math.isinf(number) for number in numbers):
        return math.inf
    return float(statistic(numbers))
