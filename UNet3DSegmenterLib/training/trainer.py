"""The patch-based trainer: labelled volumes in, a self-describing checkpoint out.

The flow::

    datalist -> split -> plan (spacing, patch size, normalisation from the data) -> cases prepared once
    -> patches (foreground oversampling) -> augment on the device -> model -> loss -> optimiser
    -> validation on whole cases (the inference sliding window) -> log, curves, best.pt / last.pt

Every epoch writes ``last.pt`` (the checkpoint) and ``last.state.pt`` (weights, optimiser, step and
history, loadable with ``weights_only=True``), each atomically, so a run killed at any moment leaves
a loadable checkpoint and ``resume`` continues it exactly. Randomness is a function of
``(seed, rank, step)`` and patches of ``(seed, sample id)``, so the step counter is the whole random
state: the same seed on the CPU gives the same losses, and a resumed run the same as an unbroken one.

With a time budget (``time_budget`` minutes) the trainer times its first iterations and plans the
epochs that fit (see :mod:`~UNet3DSegmenterLib.training.time_budget`); ``run.json`` records the plan.

Launched by ``torchrun`` (``WORLD_SIZE`` > 1), it trains with DistributedDataParallel (NCCL on
CUDA, gloo on CPU); each rank draws its own patches and only rank 0 validates and writes.

Example::

    >>> result = train(TrainingConfig(data="Task04_Hippocampus", output="runs/hippocampus", epochs=50))
    >>> result.best_checkpoint, result.best_dice
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..atomic import atomic_path, remove_stale_partials, write_json
from ..checkpoint import Checkpoint, save_checkpoint
from ..datalist import load_datalist
from ..errors import UserError
from ..paths import check_outputs
from ..protocol import DoneEvent, EpochEvent, IterationEvent, PreparingEvent, TrainingEvent
from ..runtime import reuse_freed_memory, training_dtype
from .augment import Augmenter
from .config import TrainingConfig
from .distributed import Distributed
from .patches import EpochSampler, PatchDataset, make_loader, prepare_cases
from .planning import plan_training
from .splits import check_groups, check_split_cases, make_split, read_split, write_split
from .step import TrainingLog, TrainingStep, learning_rate
from .time_budget import (
    PROBE_ITERATIONS,
    PROBE_WARM_UP,
    TimePlan,
    estimated_validation_seconds,
    final_seconds,
    plan_epochs,
)
from .validation import case_report, test_event, validate, validation_windows, write_validation_report

log = logging.getLogger("UNet3DSegmenterLib")

ProgressCallback = Callable[[TrainingEvent], None]
STATE_FORMAT = 1


@dataclass
class TrainingResult:
    """What a run produced. ``stopped`` is 'completed', 'patience', 'dice_threshold', 'time_budget' (an
    epoch ended early to keep the budget) or 'cancelled'; ``best_dice`` is the mean foreground Dice of
    best.pt (NaN without validation cases); ``time_plan`` what a time budget planned."""

    output: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_dice: float
    best_epoch: int
    epochs_completed: int
    stopped: str
    history: list[dict] = field(default_factory=list)
    validation_report: Path | None = None
    test_report: Path | None = None
    time_plan: TimePlan | None = None


def train(config: TrainingConfig, progress: ProgressCallback | None = None,
          cancel: Callable[[], bool] | None = None) -> TrainingResult:
    """Train a network as ``config`` says; see the module docstring for what is written.

    ``progress`` receives event dictionaries (the JSON lines of ``train --progress-json``);
    ``cancel`` is polled after every iteration, and when it returns True the run stops with a
    loadable ``last.pt`` that ``resume`` continues from. With ``--folds K`` and no ``--fold``, use
    :func:`~UNet3DSegmenterLib.training.cross_validation.cross_validate`, which trains every fold.
    """
    if config.cross_validation:
        raise UserError(f"{config.folds} folds and no fold to train: give one fold (--fold I), or train every fold "
                        "with cross_validate(config) (the train command does)")
    config.check_output()
    distributed = Distributed.start(config.device)
    try:
        with reuse_freed_memory():  # every step frees and allocates the same large activations
            return _Run(config, distributed, progress or (lambda event: None), cancel).run()
    finally:
        distributed.stop()


class _Run:
    """One training run: set up from the config (or from last.state.pt to resume), then epochs."""

    def __init__(self, config: TrainingConfig, distributed: Distributed, progress: ProgressCallback, cancel):
        self.config, self.distributed, self.progress, self.cancel = config, distributed, progress, cancel
        self.clock_started = time.perf_counter()  # a time budget counts from here, preparation included
        self.time_plan: TimePlan | None = None
        self.out_of_time = False
        self.device = distributed.device
        self.output = config.output
        self.paths = {name: self.output / name for name in
                      ("best.pt", "last.pt", "last.state.pt", "run.json", "log.csv", "curves.png",
                       "split.json", "validation_report.json", "test_report.json")}

    # --- set-up -------------------------------------------------------------------------------

    def run(self) -> TrainingResult:
        config = self.config
        datalist = load_datalist(config.data, config.input_spacing, config.case_pattern)
        # Resuming reads last.pt, last.state.pt and split.json to write them on: those are the run's own.
        check_outputs([path for name, path in self.paths.items() if not config.resume or name not in
                       ("last.pt", "last.state.pt", "split.json")],
                      [config.init, *(file for case in datalist.cases for file in (case.image, case.label))])
        if self.distributed.main:  # the one process that writes them
            remove_stale_partials(self.paths.values())
        self.split = self._split([case.name for case in datalist.cases])
        train_cases, validation_cases = datalist.subset(self.split.train), datalist.subset(self.split.validation)
        self.test_files = datalist.subset(self.split.test)
        # The folds of a cross-validation share one plan (made from all their cases), so that their
        # checkpoints preprocess alike and can be averaged as an ensemble.
        plan_cases = datalist.subset(sorted(self.split.train + self.split.validation)) if config.folds else train_cases
        state = self._load_state() if config.resume else None
        self.plan = plan_training(config, datalist, plan_cases, self.paths["last.pt"] if state else None,
                                  train_cases)
        self.log = TrainingLog([label.name for label in self.plan.labels[1:]])
        prepared = self._prepare(train_cases, config.crop_foreground, "training")
        self.validation_files = validation_cases
        self.validation_cases = self._prepare(validation_cases, False, "validation") if self.distributed.main else []
        self.loss_weights = self.plan.loss_weights(prepared)
        self.step_fn = TrainingStep.create(
            self.plan.build_model(config.seed), self.plan.loss(self.loss_weights), config.optimizer, self.plan.base_lr,
            self.plan.weight_decay, config.grad_clip, self.device, training_dtype(config.precision, self.device),
            self.distributed.enabled, deep_supervision=config.deep_supervision)
        self._set_epochs(config.epochs)
        self.epoch, self.iteration, self.partial = 0, 0, {"loss_sum": 0.0, "seconds": 0.0}
        self.best: dict[str, Any] = {"dice": -math.inf, "epoch": 0}
        if state:
            self._restore(state)
        elif self.distributed.main:
            self.output.mkdir(parents=True, exist_ok=True)
            for stale in ("best.pt", "validation_report.json", "test_report.json"):
                self.paths[stale].unlink(missing_ok=True)
            write_split(self.split, self.paths["split.json"])
            dataclasses.replace(config, resume=False, overwrite=False).save(self.paths["run.json"])
            self._save_last()  # from now on a kill always leaves a loadable last.pt
        dataset = PatchDataset(prepared, self.plan.patch_size, config.foreground_fraction, config.seed)
        self.sampler = EpochSampler(config.iterations_per_epoch * config.batch_size, self.distributed.rank,
                                    self.distributed.world_size)
        self.loader = make_loader(dataset, self.sampler, config.batch_size, config.workers,
                                  pin_memory=self.device.type == "cuda")
        self.augmenter = Augmenter(self.plan.spacing_zyx(), enabled=config.augment)
        self.generator = torch.Generator(self.device)
        return self._epochs()

    def _split(self, names: list[str]):
        config = self.config
        if config.resume and self.paths["split.json"].is_file():
            split = read_split(self.paths["split.json"])
            missing = sorted(set(split.train + split.validation + split.test) - set(names))
            if missing:
                raise UserError(f"cannot resume: case {missing[0]} of {self.paths['split.json']} is no longer in "
                                f"{config.data}")
            return split
        if config.split_file is not None:
            split = read_split(config.split_file)
            check_split_cases(split, names, str(config.split_file), str(config.data))
            if config.group_by is not None:
                check_groups(split, config.group_by, str(config.split_file))
            return split
        return make_split(names, config.validation_fraction, config.folds, config.fold, config.seed,
                          config.test_fraction, config.group_by)

    def _prepare(self, cases, crop: bool, kind: Literal["training", "validation"]):
        if not cases:
            return []

        def report(done: int, total: int) -> None:
            if self.distributed.main:
                self.progress(PreparingEvent(event="preparing", kind=kind, done=done, total=total))

        return prepare_cases(cases, self.plan.preprocessing, self.plan.label_values, crop, self.config.resample_labels,
                             self.plan.label_map, self.config.cache_dir, report, self.plan.ignore_value)

    def _set_epochs(self, epochs: int) -> None:
        """Train ``epochs`` epochs in all; the learning-rate schedule stretches over them."""
        config = self.config
        self.epochs = epochs
        if self.time_plan is not None:
            self.time_plan.epochs = epochs
        self.total_steps = epochs * config.iterations_per_epoch
        self.warmup_steps = min(config.warmup_epochs * config.iterations_per_epoch, self.total_steps // 10)

    # --- the loop ----------------------------------------------------------------------------

    def _epochs(self) -> TrainingResult:
        config = self.config
        started, steps_at_start = time.perf_counter(), self._step()
        probe = min(PROBE_ITERATIONS, config.iterations_per_epoch)
        warm_up = min(PROBE_WARM_UP, probe - 1)  # the loader's start and the first kernels are not the pace
        probe_started = started
        stopped = "completed"
        while self.epoch < self.epochs:
            epoch_started = time.perf_counter() - self.partial["seconds"]
            self.sampler.set_epoch(self.epoch, self.iteration * config.batch_size)
            self.out_of_time = False
            for images, labels in self.loader:
                loss = self._train_step(images, labels)
                self.iteration += 1
                self.partial["loss_sum"] += loss
                done = self._step() - steps_at_start
                if config.time_budget is not None and done == warm_up:
                    probe_started = time.perf_counter()
                if config.time_budget is not None and done == probe:
                    self._plan_time((time.perf_counter() - probe_started) / (probe - warm_up))
                eta = self._budget_left() if config.time_budget is not None else \
                    (time.perf_counter() - started) / done * (self.total_steps - self._step())
                self._emit(IterationEvent(event="iteration", epoch=self.epoch + 1, epochs=self.epochs,
                                          iteration=self.iteration, iterations=config.iterations_per_epoch,
                                          loss=loss, eta=round(eta, 1)))
                if self.distributed.any(bool(self.cancel and self.cancel())):
                    self.partial["seconds"] = time.perf_counter() - epoch_started
                    if self.distributed.main:
                        self._save_last()
                        self.log.write(self.paths["log.csv"], self.paths["curves.png"])
                    return self._result("cancelled")
                if self.time_plan is not None and self.distributed.any(self._past_deadline()):
                    self.out_of_time = True  # the end of the run must still fit: this epoch is the last
                    self._set_epochs(self.epoch + 1)
                    self._record_plan()
                    break
            stopped = self._end_epoch(time.perf_counter() - epoch_started, started, steps_at_start)
            if self.out_of_time and stopped == "completed":
                stopped = "time_budget"
            if stopped != "completed":
                break
        self._finish()
        return self._result(stopped)

    def _step(self) -> int:
        return self.epoch * self.config.iterations_per_epoch + self.iteration

    # --- the time budget ---------------------------------------------------------------------

    def _plan_time(self, seconds_per_iteration: float) -> None:
        """The first plan, once the first iterations are timed; written to run.json."""
        config = self.config
        assert config.time_budget is not None
        seconds_per_iteration = self.distributed.maximum(seconds_per_iteration)
        windows = validation_windows(self.validation_cases, self.plan.patch_size, config.overlap)
        validation = self.distributed.maximum(estimated_validation_seconds(windows, seconds_per_iteration,
                                                                           config.batch_size))
        self.time_plan = TimePlan(config.time_budget * 60, seconds_per_iteration, validation, 0.0, 0,
                                  min(PROBE_ITERATIONS, config.iterations_per_epoch))
        self._replan()

    def _replan(self) -> None:
        """The epochs that fit what is left of the budget, from the latest times: the epoch under way
        counts from its start, so it is planned as a whole."""
        plan, config = self.time_plan, self.config
        assert plan is not None
        plan.validation_seconds = self.distributed.maximum(plan.validation_seconds)
        plan.final_seconds = final_seconds(plan.validation_seconds, len(self.split.validation), len(self.split.test))
        seconds_left = plan.budget_seconds - (time.perf_counter() - self.clock_started)
        seconds_left += self.iteration * plan.seconds_per_iteration
        epochs = self.epoch + plan_epochs(seconds_left, config.iterations_per_epoch, plan.seconds_per_iteration,
                                          plan.validation_seconds, config.val_every, plan.final_seconds)
        self._set_epochs(max(epochs, self.epoch + 1) if self.iteration else epochs)
        self._record_plan()

    def _record_plan(self) -> None:
        """run.json records the budget and the latest plan, the one the run then follows."""
        if self.distributed.main and self.time_plan is not None:
            dataclasses.replace(self.config, resume=False, overwrite=False).save(self.paths["run.json"],
                                                                                 self.time_plan.to_json())

    def _budget_left(self) -> float:
        """Seconds left in the time budget: what a run with one reports as its ``eta``."""
        assert self.config.time_budget is not None
        return max(0.0, self.config.time_budget * 60 - (time.perf_counter() - self.clock_started))

    def _past_deadline(self) -> bool:
        """True when one more iteration would leave too little for the end of the run."""
        plan = self.time_plan
        assert plan is not None
        elapsed = time.perf_counter() - self.clock_started
        return elapsed + plan.seconds_per_iteration + plan.validation_seconds + plan.final_seconds >= plan.budget_seconds

    def _train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        step = self._step()
        seed = int(np.random.SeedSequence([self.config.seed, self.distributed.rank, step]).generate_state(1)[0])
        torch.manual_seed(seed)  # dropout
        self.generator.manual_seed(seed)
        for group in self.step_fn.optimizer.param_groups:
            group["lr"] = learning_rate(self.plan.base_lr, self.config.schedule, self.warmup_steps, step,
                                        self.total_steps)
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        images, labels = self.augmenter(images, labels, self.generator)
        return self.step_fn(images, labels)

    def _end_epoch(self, seconds: float, started: float, steps_at_start: int) -> str:
        config = self.config
        train_loss = self.distributed.mean(self.partial["loss_sum"] / max(1, self.iteration))
        lr = self.step_fn.optimizer.param_groups[0]["lr"]
        self.epoch, self.iteration, self.partial = self.epoch + 1, 0, {"loss_sum": 0.0, "seconds": 0.0}
        row = {"epoch": self.epoch, "train_loss": train_loss, "lr": lr}
        validating = self.validation_cases and (self.epoch % config.val_every == 0 or self.epoch == self.epochs)
        if validating:
            row.update(validate(self.step_fn.module, self.validation_cases, self.log.class_names,
                                self.plan.patch_size, self.device, self.step_fn.loss, config.overlap))
        validation_seconds = row.pop("validation_seconds", None)
        if self.time_plan is not None and validation_seconds is not None:
            self.time_plan.validation_seconds = validation_seconds
        row["seconds"] = seconds + (validation_seconds or 0.0)
        if self.time_plan is not None and not self.out_of_time:
            self._replan()  # before the epoch is announced, so that its event says how many epochs remain
        self.log.rows.append(row)
        stopped = "completed"
        if self.distributed.main:
            if validating and row["mean_dice"] > self.best["dice"]:
                self.best = {"dice": row["mean_dice"], "epoch": self.epoch}
                save_checkpoint(self._checkpoint(), self.paths["best.pt"])
            elif not self.validation_cases:
                self.best["epoch"] = self.epoch
            self._save_last()
            if not self.validation_cases:
                save_checkpoint(self._checkpoint(), self.paths["best.pt"])
            self.log.write(self.paths["log.csv"], self.paths["curves.png"])
            stopped = self._stopping(row if validating else None)
            eta = self._budget_left() if config.time_budget is not None else \
                (time.perf_counter() - started) / max(1, self._step() - steps_at_start) * \
                (self.total_steps - self._step())
            ended = EpochEvent(event="epoch", epoch=self.epoch, epochs=self.epochs, train_loss=train_loss, lr=lr,
                               seconds=round(row["seconds"], 2), eta=round(eta, 1))
            if validating:
                ended["dice"], ended["mean_dice"] = row["dice"], row["mean_dice"]
            if "scored_on" in row:
                ended["scored_on"] = row["scored_on"]
            self._emit(ended)
        codes = ("completed", "patience", "dice_threshold")
        flag = [self.distributed.any(stopped == code) for code in codes[1:]]
        return codes[1 + flag.index(True)] if any(flag) else "completed"

    def _stopping(self, row: dict | None) -> str:
        config = self.config
        if row is not None and config.dice_threshold is not None and \
                all(value >= config.dice_threshold for value in row["dice"].values()):
            return "dice_threshold"
        if config.patience is not None and self.validation_cases and self.epoch - self.best["epoch"] >= config.patience:
            return "patience"
        return "completed"

    def _finish(self) -> None:
        if self.distributed.main and self.validation_cases:
            write_validation_report(self.paths["best.pt"], self.validation_files, str(self.device),
                                    self.paths["validation_report.json"], self.config.resample_labels,
                                    self.plan.ignore_value)
        if self.distributed.main and self.test_files:
            report = case_report(self.paths["best.pt"], self.test_files, str(self.device), self.config.resample_labels,
                                 self.step_fn.loss, self.plan.ignore_value)
            write_json(report, self.paths["test_report.json"])
            self._emit(test_event(report, self.paths["best.pt"], self.paths["test_report.json"]))

    # --- writing ------------------------------------------------------------------------------

    def _emit(self, event: TrainingEvent) -> None:
        if self.distributed.main:
            self.progress(event)

    def _checkpoint(self) -> Checkpoint:
        plan, config = self.plan, self.config
        best_row = next((row for row in self.log.rows if row["epoch"] == self.best["epoch"] and "dice" in row), None)
        training = {
            "data": str(config.data), "training_cases": len(self.split.train),
            "validation_cases": len(self.split.validation),
            **({"test_cases": len(self.split.test)} if self.split.test else {}),
            **({"folds": config.folds, "fold": config.fold} if config.folds else {}), "epochs": self.epoch,
            "iterations_per_epoch": config.iterations_per_epoch, "batch_size": config.batch_size,
            "world_size": self.distributed.world_size, "loss": config.loss, "optimizer": config.optimizer,
            "lr": plan.base_lr, "seed": config.seed, "augment": config.augment,
            "best_epoch": self.best["epoch"],
        }
        if config.init:
            training["init"] = str(config.init)
        if config.class_weights is not None:
            training["class_weights"] = list(config.class_weights)
        if self.loss_weights is not None:
            training["loss_class_weights"] = [float(weight) for weight in self.loss_weights]
        if plan.ignore_value is not None:
            training["ignore_label"] = plan.ignore_value
        if self.time_plan is not None:
            training["time_budget_minutes"] = config.time_budget
        if best_row is not None:
            training["best_mean_dice"] = float(best_row["mean_dice"])
            training["validation_dice"] = {name: float(value) for name, value in best_row["dice"].items()}
            training["validation_iou"] = {name: float(value) for name, value in best_row["iou"].items()}
        return Checkpoint.from_model(self.step_fn.module, plan.labels, plan.preprocessing, plan.patch_size,
                                     config.overlap, training, plan.fingerprint)

    def _save_last(self) -> None:
        """last.state.pt first, then last.pt: the state holds its own weights, so the pair is
        consistent for resuming even if a kill falls between the two writes."""
        state = {
            "format": STATE_FORMAT, "epoch": self.epoch, "iteration": self.iteration, "partial": dict(self.partial),
            "model": {key: value.detach().cpu() for key, value in self.step_fn.module.state_dict().items()},
            "auxiliary": self.step_fn.auxiliary_state(),
            "optimizer": self.step_fn.optimizer.state_dict(), "scaler": self.step_fn.scaler_state(),
            "history": self.log.rows, "best": dict(self.best), "base_lr": self.plan.base_lr,
        }
        with atomic_path(self.paths["last.state.pt"]) as temporary:
            torch.save(state, temporary)
        save_checkpoint(self._checkpoint(), self.paths["last.pt"])

    def _load_state(self) -> dict:
        path = self.paths["last.state.pt"]
        if not path.is_file() or not self.paths["last.pt"].is_file():
            raise UserError(f"cannot resume: {self.output} holds no last.pt and last.state.pt; "
                            "start a new run without --resume")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file raises many kinds
            raise UserError(f"cannot resume from {path}: unreadable ({type(error).__name__}); "
                            "start a new run without --resume") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError(f"cannot resume from {path}: not a training state of this version")
        return state

    def _restore(self, state: dict) -> None:
        self.step_fn.module.load_state_dict(state["model"])
        self.step_fn.load_auxiliary_state(state.get("auxiliary", {}))
        self.step_fn.optimizer.load_state_dict(state["optimizer"])
        self.step_fn.load_scaler_state(state["scaler"])
        self.epoch, self.iteration, self.partial = state["epoch"], state["iteration"], dict(state["partial"])
        self.log.rows, self.best = list(state["history"]), dict(state["best"])
        if self.epoch >= self.epochs:
            log.info("the run in %s already finished %d epochs; raise --epochs to train longer",
                     self.output, self.epoch)

    def _result(self, stopped: str) -> TrainingResult:
        report, test_report = self.paths["validation_report.json"], self.paths["test_report.json"]
        best_dice = self.best["dice"] if self.best["dice"] > -math.inf else math.nan
        if self.distributed.main:
            self._emit(DoneEvent(event="done", best_checkpoint=str(self.paths["best.pt"]),
                                 last_checkpoint=str(self.paths["last.pt"]), best_dice=best_dice, stopped=stopped))
        return TrainingResult(self.output, self.paths["best.pt"], self.paths["last.pt"], best_dice,
                              self.best["epoch"], self.epoch, stopped, list(self.log.rows),
                              report if report.is_file() else None, test_report if test_report.is_file() else None,
                              self.time_plan)
