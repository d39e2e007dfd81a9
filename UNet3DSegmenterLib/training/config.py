"""Every training option, declared once: :class:`TrainingConfig`.

Each field carries its help text, choices and command-line spelling in its metadata. From that one
declaration come the ``train`` command's parser (:func:`add_arguments`), the checks on values
(:meth:`TrainingConfig.__post_init__`), and ``run.json`` (:meth:`TrainingConfig.to_json` /
:meth:`TrainingConfig.from_json`), which every run writes beside its outputs and which
``train --config run.json`` runs again. The Slicer panel writes such a file too, so a run started
from Slicer can be repeated on the command line exactly.

Adding an option is one field here, for example::

    mirror_axes: tuple[int, ...] | None = option(None, "augmentation: flip only these axes (z=0, y=1, x=2)",
                                                 group="optimisation", metavar="AXIS")

and the trainer reading ``config.mirror_axes``.

This module imports no torch, so ``unet3d-segmenter train --help`` is quick and the Slicer side can
build configurations without loading the engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..choices import (
    ARCHITECTURES,
    DEVICES,
    LOSSES,
    MAX_PATCH_SIZE,
    MAX_RESIZE,
    NORMALIZATIONS,
    NORMS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
)
from ..errors import UserError
from .splits import compile_group_by

CONFIG_FORMAT = 1
MODEL_FILES = ("best.pt", "last.pt", "run.json")
"""Files that mark a folder as holding a model: a new run there (without --overwrite) is refused."""
TIME_PLAN = "time_plan"
"""The key of run.json that records what a time budget planned (seconds per iteration, epochs, ...)."""
INIT_COPY = "init.pt"
"""The one name in an output folder that --init may point at: no run writes or deletes it."""

# Argument groups of ``train --help``, in the order a newcomer reads them.
GROUPS = {
    "data": None,
    "model": "model",
    "preprocessing": "preprocessing (default: chosen from the training cases)",
    "optimisation": "optimisation",
    "validation": "validation and stopping",
    "run": "run",
}

_DATA_HELP = ("training data: a folder with images/ and labels/ (same file names; DICOM series as subfolders), a "
              "Medical Segmentation Decathlon folder (dataset.json, imagesTr/, labelsTr/), or a JSON list of "
              "{\"image\", \"label\"} pairs")


def option(default: Any, help: str, *, group: str, flag: str | None = None, short: str | None = None,
           choices: tuple[str, ...] | None = None, metavar: Any = None, item: str | None = None) -> Any:
    """A configuration field with what the command line and the checks need to know about it.

    ``flag`` overrides the option's spelling (default ``--field-name``; ``--no-x`` for a boolean
    that defaults to True); ``item`` names how one element of a mapping is written ('label' for
    VALUE=NAME, 'color' for VALUE=R,G,B).
    """
    metadata = {"help": help, "group": group, "flag": flag, "short": short, "choices": choices,
                "metavar": metavar, "item": item}
    return field(default=default, metadata=metadata)


def _required(help: str, short: str) -> Any:
    return field(metadata={"help": help, "group": "data", "flag": None, "short": short, "choices": None,
                           "metavar": None, "item": None})


@dataclass
class TrainingConfig:
    """Everything a training run needs; the defaults suit a first run on a new dataset.

    Each field's help (``unet3d-segmenter train --help`` prints it) says what it does; None means
    "chosen from the data" (spacing, patch size) or "the default of the chosen optimiser" (lr,
    weight decay). ``TrainingConfig(data="Task04_Hippocampus", output="runs/hippocampus")`` is a
    complete first run.
    """

    data: Path = _required(_DATA_HELP, "-d")
    output: Path = _required("folder for best.pt, last.pt, run.json, log.csv, curves.png, split.json, "
                             "validation_report.json and test_report.json", "-o")
    case_pattern: str | None = option(
        None, "in a folder pair, the case name is this regular expression's first group in each file name (without "
        "extension), so that differently named images and labels pair up; HipMRI: '^(.+?)(?:_SEMANTIC)?_LFOV$'",
        group="data", metavar="REGEX")
    input_spacing: tuple[float, float, float] | None = option(
        None, "voxel spacing in mm of .npy cases (default 1 1 1; other formats record their own)", group="data",
        metavar=("X", "Y", "Z"))
    # model
    architecture: str | None = option(None, "network (default unet3d, or the --init checkpoint's)", group="model",
                                      flag="--arch", choices=ARCHITECTURES)
    depth: int | None = option(None, "levels including the bottleneck (default 5; resnet18unet: its 4 stages)",
                               group="model")
    base_width: int | None = option(None, "channels at the first level, doubled per level (default 16; "
                                    "resnet18unet: 64)", group="model")
    norm: str = option("instance", "normalisation layers (none: convolutions with a bias, as the original VNet)",
                       group="model", choices=NORMS)
    dropout: float = option(0.0, "dropout probability in the bottleneck", group="model")
    # preprocessing
    spacing: tuple[float, float, float] | None = option(
        None, "resample to this spacing in mm (default: median case spacing)", group="preprocessing",
        metavar=("X", "Y", "Z"))
    resize: tuple[int, int, int] | None = option(
        None, "resample every case to this many voxels over its own box instead of to one spacing (e.g. 64 128 "
        "128); predictions are resampled back onto each input's grid", group="preprocessing",
        metavar=("Z", "Y", "X"))
    patch_size: tuple[int, int, int] | None = option(
        None, "patch in voxels (default: median case shape, rounded up and capped)", group="preprocessing",
        metavar=("Z", "Y", "X"))
    max_patch_size: int = option(128, "largest automatic patch edge in voxels", group="preprocessing")
    max_patch_voxels: int = option(128**3, "largest automatic patch in voxels", group="preprocessing")
    normalization: str = option("auto", "intensity normalisation; auto: a CT window for CT datasets, z-score "
                                "otherwise, or --window's", group="preprocessing", choices=NORMALIZATIONS)
    window: tuple[float, float] | None = option(
        None, "clip intensities to this window and scale it to [0, 1], e.g. -160 240 (HU) for CT",
        group="preprocessing", metavar=("LOW", "HIGH"))
    crop_foreground: bool = option(False, "cut training cases to their non-zero box (saves memory and time)",
                                   group="preprocessing")
    cache_dir: Path | None = option(None, "keep prepared cases here for later runs", group="preprocessing")
    label_names: dict[int, str] | None = option(
        None, "label names, e.g. 1=anterior 2=posterior (default: the dataset's, or 'label N'); they also "
        "define which values are allowed", group="preprocessing", flag="--labels", metavar="VALUE=NAME",
        item="label")
    label_colors: dict[int, tuple[float, float, float]] | None = option(
        None, "label colours in 0..1, e.g. 1=1,0,0 (default: the dataset's, or a palette)", group="preprocessing",
        metavar="VALUE=R,G,B", item="color")
    resample_labels: bool = option(False, "resample labelmaps that lie on another grid onto their image instead "
                                   "of refusing them", group="preprocessing")
    # optimisation
    epochs: int = option(100, "epochs to train (an epoch is --iterations-per-epoch patch batches, not a pass over "
                         "the cases)", group="optimisation")
    time_budget: float | None = option(
        None, "train for this many minutes instead of --epochs: the first iterations are timed and the epochs "
        "that fit are planned, ending with validation and a saved model inside the budget (per fold with --folds); "
        "run.json records the plan", group="optimisation", metavar="MINUTES")
    iterations_per_epoch: int = option(100, "patch batches per epoch", group="optimisation")
    batch_size: int = option(2, "patches per batch", group="optimisation")
    loss: str = option("dicece", "training loss", group="optimisation", choices=LOSSES)
    class_weights: list[float] | None = option(
        None, "one weight per class, background first, for every term of the loss (a background weight above 0 "
        "brings background into the Dice; default: equal, or inverse frequency for weighted_dice)",
        group="optimisation", metavar="W")
    optimizer: str = option("adamw", "optimiser (adam: plain Adam, no decoupled weight decay; sgd: Nesterov "
                            "momentum 0.99)", group="optimisation",
                            choices=OPTIMIZERS)
    lr: float | None = option(None, "learning rate (default 1e-3 with AdamW and Adam, 1e-2 with SGD)",
                              group="optimisation")
    weight_decay: float | None = option(None, "weight decay (default 1e-2 with AdamW, 0 with Adam, 3e-5 with SGD)",
                                        group="optimisation")
    schedule: str = option("poly", "learning-rate decay after the warm-up", group="optimisation", choices=SCHEDULES)
    warmup_epochs: int = option(1, "epochs of linear learning-rate warm-up", group="optimisation")
    grad_clip: float = option(12.0, "largest gradient norm (0: off)", group="optimisation")
    precision: str = option("auto", "auto: mixed precision on CUDA and on CPUs with native bf16, else fp32",
                            group="optimisation", choices=PRECISIONS)
    deep_supervision: bool = option(False, "also score the decoder's half- and quarter-resolution outputs "
                                    "(nnU-Net's deep supervision; training only)", group="optimisation")
    augment: bool = option(True, "switch data augmentation off", group="optimisation", flag="--no-augment")
    foreground_fraction: float = option(1 / 3, "share of patches centred on a labelled voxel",
                                        group="optimisation")
    # validation and stopping
    val_fraction: float = option(0.2, "share of cases held out for validation (0: none)", group="validation")
    split: tuple[float, float, float] | None = option(
        None, "training, validation and test shares of the cases, e.g. 0.8 0.1 0.1, instead of --val-fraction; "
        "best.pt is scored on the test cases at the end (test_report.json). With --folds: TRAIN 0 TEST",
        group="validation", metavar=("TRAIN", "VAL", "TEST"))
    split_file: Path | None = option(None, "use the split in this split.json (e.g. a run's own, or "
                                     "Resources/Models/hippocampus_split.json) instead of drawing one",
                                     group="validation", metavar="SPLIT_JSON")
    group_by: str | None = option(None, "cases whose names share this regular expression's first group are one "
                                  "subject, never split between sets or folds, e.g. '^(Case_[0-9]+)'",
                                  group="validation", metavar="REGEX")
    folds: int | None = option(None, "k-fold cross-validation: number of folds; without --fold every fold is "
                               "trained in turn (fold_0/, fold_1/, ...), then cv_report.json and ensemble.pt",
                               group="validation", metavar="K")
    fold: int | None = option(None, "train only this fold (0..K-1)", group="validation", metavar="I")
    val_every: int = option(1, "epochs between validations", group="validation")
    overlap: float = option(0.5, "sliding-window overlap for validation and the checkpoint's inference default",
                            group="validation")
    patience: int | None = option(None, "stop after this many epochs without a better mean Dice",
                                  group="validation")
    dice_threshold: float | None = option(None, "stop once every class reaches this Dice", group="validation")
    # run
    device: str = option("auto", "where to train", group="run", choices=DEVICES)
    seed: int = option(0, "seed of every random choice (split, weights, patches, augmentation)", group="run")
    workers: int | None = option(None, "patch loader processes (default: automatic)", group="run")
    resume: bool = option(False, "continue the run in --output from its last.pt", group="run")
    overwrite: bool = option(False, "start a new run in an --output that already holds a model (best.pt, last.pt or "
                             "run.json), replacing it", group="run")
    init: Path | None = option(None, "start from this checkpoint's weights (fine-tuning)", group="run",
                               metavar="CKPT")

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            setattr(self, item.name, _coerce(getattr(self, item.name), _hints()[item.name], item.name))
        for item in dataclasses.fields(self):
            allowed, value = item.metadata.get("choices"), getattr(self, item.name)
            if allowed and value is not None and value not in allowed:
                raise UserError(f"unknown {item.name.replace('_', ' ')} {value!r}: choose one of {', '.join(allowed)}")
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.time_budget is None or 0 < self.time_budget < math.inf,
             f"the time budget must be a positive number of minutes, got {self.time_budget}"),
            (self.iterations_per_epoch >= 1, f"iterations per epoch must be at least 1, got {self.iterations_per_epoch}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.val_every >= 1, f"val_every must be at least 1, got {self.val_every}"),
            (0 <= self.overlap < 1, f"overlap must be in [0, 1), got {self.overlap}"),
            (0 <= self.foreground_fraction <= 1, f"foreground fraction must be in [0, 1], got {self.foreground_fraction}"),
            (self.lr is None or 0 < self.lr < math.inf, f"learning rate must be positive, got {self.lr}"),
            (self.weight_decay is None or 0 <= self.weight_decay < math.inf,
             f"weight decay must be zero or more, got {self.weight_decay}"),
            (self.spacing is None or all(0 < s < math.inf for s in self.spacing),
             f"--spacing must be three positive sizes in mm, got {self.spacing}"),
            (self.patch_size is None or 1 <= min(self.patch_size) <= max(self.patch_size) <= MAX_PATCH_SIZE,
             f"patch size must be three sizes of 1 to {MAX_PATCH_SIZE} voxels, got {self.patch_size}"),
            (self.max_patch_size >= 1, f"max patch size must be at least 1 voxel, got {self.max_patch_size}"),
            (self.max_patch_voxels >= 1, f"max patch voxels must be at least 1, got {self.max_patch_voxels}"),
            (0 <= self.seed < 2**32, f"seed must be a whole number in 0..{2**32 - 1}, got {self.seed}"),
            (self.workers is None or self.workers >= 0, f"workers must be 0 or more, got {self.workers}"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (self.warmup_epochs >= 0, f"warm-up epochs must be 0 or more, got {self.warmup_epochs}"),
            (0 <= self.grad_clip < math.inf, f"gradient clip must be 0 (off) or more, got {self.grad_clip}"),
            (self.patience is None or self.patience >= 1, f"patience must be at least 1 epoch, got {self.patience}"),
            (self.dice_threshold is None or 0 <= self.dice_threshold <= 1,
             f"Dice threshold must be in [0, 1], got {self.dice_threshold}"),
            (0 <= self.val_fraction < 1, f"validation fraction must be in [0, 1), got {self.val_fraction}"),
            (self.input_spacing is None or all(0 < s < math.inf for s in self.input_spacing),
             f"input spacing must be positive, got {self.input_spacing}"),
            (not (self.resume and self.overwrite), "give --resume (continue the run) or --overwrite (replace it), "
             "not both"),
            (self.fold is None or self.folds is not None, "--fold I needs --folds K"),
            (self.folds is None or self.folds >= 2, f"--folds must be at least 2, got {self.folds}"),
            (self.fold is None or self.folds is None or 0 <= self.fold < self.folds,
             f"--fold must be in 0..{(self.folds or 0) - 1}, got {self.fold}"),
            (self.depth is None or self.depth >= 2, f"depth must be at least 2, got {self.depth}"),
            (self.base_width is None or self.base_width >= 1, f"base width must be at least 1, got {self.base_width}"),
            (self.resize is None or 1 <= min(self.resize) <= max(self.resize) <= MAX_RESIZE,
             f"resize needs three sizes of 1 to {MAX_RESIZE} voxels, got {self.resize}"),
            (self.resize is None or self.spacing is None, "give --resize or --spacing, not both: resizing decides "
             "each case's spacing"),
            (self.window is None or -math.inf < self.window[0] < self.window[1] < math.inf,
             f"window must be LOW HIGH with LOW below HIGH, got {self.window}"),
            (self.window is None or self.normalization in ("auto", "window"), f"--window scales intensities to "
             f"[0, 1] itself: leave out --normalization {self.normalization}"),
            (self.normalization != "window" or self.window is not None, "the window normalisation needs --window "
             "LOW HIGH"),
            (self.class_weights is None or (all(0 <= weight < math.inf for weight in self.class_weights)
                                           and max(self.class_weights[1:] or [0]) > 0),
             f"class weights must be zero or more, with at least one foreground class above zero, got "
             f"{self.class_weights}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        self._check_split_options()
        for flag, folder in (("--output", self.output), ("--cache-dir", self.cache_dir)):
            if folder is not None and folder.exists() and not folder.is_dir():
                raise UserError(f"{flag} {folder} is a file: give a folder")

    def _check_split_options(self) -> None:
        """--split, --split-file, --folds and --val-fraction each choose the sets: refuse combinations in
        which one would silently win over another."""
        default_fraction = next(item.default for item in dataclasses.fields(self) if item.name == "val_fraction")
        chosen_by = "--split" if self.split is not None else "--split-file" if self.split_file is not None else None
        if chosen_by and self.val_fraction != default_fraction:
            raise UserError(f"give {chosen_by} or --val-fraction, not both")
        if self.split_file is not None and (self.split is not None or self.folds is not None):
            raise UserError("--split-file fixes the sets: leave out " + ("--split" if self.split is not None else
                                                                        "--folds and --fold"))
        if self.group_by is not None:
            compile_group_by(self.group_by)
        if self.case_pattern is not None:
            from ..datalist import compile_case_pattern  # the datalist's readers load only here

            compile_case_pattern(self.case_pattern)
        if self.split is not None:
            shares = self.split
            if min(shares) < 0 or shares[0] <= 0 or abs(sum(shares) - 1) > 1e-6:
                raise UserError(f"--split {' '.join(f'{share:g}' for share in shares)}: give three shares that add "
                                "up to 1, training above 0, e.g. 0.8 0.1 0.1")
            if self.folds is not None and shares[1] != 0:
                raise UserError("with --folds the folds choose the validation cases: write the split as "
                                f"--split TRAIN 0 TEST, e.g. --split {1 - shares[2]:g} 0 {shares[2]:g}")

    def check_output(self) -> None:
        """Refuse to start a run that would destroy a model: a new run (neither --resume nor --overwrite) in a
        folder that holds one, or an --init checkpoint among the files the run writes."""
        if not self.resume and not self.overwrite:
            found = next((name for name in MODEL_FILES if (self.output / name).exists()), None)
            if found:
                raise UserError(f"{self.output} already holds a model ({found}): continue it with --resume, replace "
                                "it with --overwrite, or choose another --output")
        if self.init is not None and not self.resume:
            init, output = Path(self.init).resolve(), Path(self.output).resolve()
            if output in init.parents and init != output / INIT_COPY:
                raise UserError(f"--init {self.init} lies in the output folder {self.output}, which the run writes: "
                                f"choose another --output (or copy the checkpoint to {Path(self.output) / INIT_COPY})")

    @property
    def test_fraction(self) -> float:
        """The share of cases held out as a test set (0 without --split)."""
        return self.split[2] if self.split is not None else 0.0

    @property
    def validation_fraction(self) -> float:
        """The share of cases that validate: --split's second share, else --val-fraction."""
        return self.split[1] if self.split is not None else self.val_fraction

    @property
    def cross_validation(self) -> bool:
        """True when every fold is to be trained in turn (--folds without --fold)."""
        return self.folds is not None and self.fold is None

    def to_json(self) -> dict:
        """The configuration as plain JSON data, paths absolute, ready for ``run.json``."""
        record: dict[str, Any] = {"format": CONFIG_FORMAT}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, Path):
                value = str(value.resolve())
            elif isinstance(value, dict):
                value = {str(key): list(entry) if isinstance(entry, tuple) else entry for key, entry in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            record[item.name] = value
        return record

    @classmethod
    def from_json(cls, record: dict, source: str = "the configuration") -> TrainingConfig:
        """A configuration from :meth:`to_json`'s data; unknown keys are refused, missing keys take defaults."""
        if not isinstance(record, dict):
            raise UserError(f"{source} must hold a JSON object of training options")
        version = record.get("format", CONFIG_FORMAT)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise UserError(f"{source}: \"format\" is {version!r}, not a format number such as {CONFIG_FORMAT}")
        if version > CONFIG_FORMAT:
            raise UserError(f"{source} was written by a newer version (format {version}): update")
        names = {item.name for item in dataclasses.fields(cls)}
        record = {key: value for key, value in record.items() if key != TIME_PLAN}  # what a budget planned: a record
        unknown = sorted(set(record) - names - {"format"})
        if unknown:
            raise UserError(f"{source}: unknown option {unknown[0]!r}; known options are the fields of "
                            "'unet3d-segmenter train --help'")
        missing = [name for name in ("data", "output") if record.get(name) in (None, "")]
        if missing:
            raise UserError(f"{source} gives no {missing[0]}: add it, or give --{missing[0]} on the command line")
        return cls(**{key: value for key, value in record.items() if key != "format"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainingConfig:
        """Read a ``run.json`` written by :meth:`save` (or by hand)."""
        path = Path(path)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"cannot read the training configuration {path} ({error})") from None
        return cls.from_json(record, str(path))

    def save(self, path: str | os.PathLike, time_plan: dict | None = None) -> Path:
        """Write :meth:`to_json` atomically; ``train --config`` runs it again. ``time_plan`` (what a
        time budget planned) is kept beside the options, as a record: a run again plans anew."""
        from ..atomic import write_json

        return write_json(self.to_json() | ({TIME_PLAN: time_plan} if time_plan is not None else {}), path)


@functools.cache
def _hints() -> dict[str, Any]:
    """Field name -> type, evaluated once (annotations are strings under ``from __future__``)."""
    return typing.get_type_hints(TrainingConfig)


def _optional_inner(hint: Any) -> Any:
    """``X`` for ``X | None``, else ``hint``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        arguments = [argument for argument in typing.get_args(hint) if argument is not type(None)]
        return arguments[0] if len(arguments) == 1 else hint
    return hint


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the field's type: JSON lists to tuples, string keys to ints, strings to paths."""
    if value is None:
        return None
    hint = _optional_inner(hint)
    origin = typing.get_origin(hint)
    try:
        if hint is Path:
            return Path(value)
        if hint is bool:
            if not isinstance(value, bool):
                raise TypeError("true or false")
            return value
        if hint in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (hint is int and value != int(value)):
                raise TypeError("a whole number" if hint is int else "a number")
            return hint(value)
        if hint is str:
            return str(value)
        if origin is tuple:
            element = typing.get_args(hint)[0]
            values = tuple(element(item) for item in value)
            if len(values) != len(typing.get_args(hint)):
                raise TypeError(f"{len(typing.get_args(hint))} numbers")
            return values
        if origin is list:
            element = typing.get_args(hint)[0]
            return [element(item) for item in value]
        if origin is dict:
            _, element = typing.get_args(hint)
            element_origin = typing.get_origin(element)
            return {int(key): (tuple(float(c) for c in item) if element_origin is tuple else element(item))
                    for key, item in dict(value).items()}
    except (TypeError, ValueError) as error:
        raise UserError(f"option {name}: {value!r} is not {error if isinstance(error, TypeError) else 'valid'}") \
            from None
    return value


# --- the command line -------------------------------------------------------------------------


def _flag(item: dataclasses.Field) -> str:
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def _label_item(text: str) -> tuple[int, str]:
    value, separator, name = text.partition("=")
    if not separator or not value.strip().isdigit() or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: write each label as VALUE=NAME, e.g. 1=liver")
    return int(value), name.strip()


def _color_item(text: str) -> tuple[int, tuple[float, float, float]]:
    value, separator, rgb = text.partition("=")
    try:
        color = tuple(float(component) for component in rgb.split(","))
    except ValueError:
        color = ()
    if not separator or not value.strip().isdigit() or len(color) != 3 or not all(0 <= c <= 1 for c in color):
        raise argparse.ArgumentTypeError(f"{text!r}: write each colour as VALUE=R,G,B in 0..1, e.g. 1=1,0,0")
    return int(value), (color[0], color[1], color[2])


_ITEMS = {"label": _label_item, "color": _color_item}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`TrainingConfig` field, grouped; every default is left to the config.

    Options not given stay out of the parsed namespace (``argparse.SUPPRESS``), so that
    :func:`config_from_arguments` can tell "given" from "default" when a ``--config`` file is read.
    """
    groups = {key: parser.add_argument_group(title) if title else parser for key, title in GROUPS.items()}
    hints = _hints()
    for item in dataclasses.fields(TrainingConfig):
        meta, hint = item.metadata, _optional_inner(hints[item.name])
        names = [_flag(item)] + ([meta["short"]] if meta.get("short") else [])
        kwargs: dict[str, Any] = {"dest": item.name, "default": argparse.SUPPRESS, "help": meta["help"]}
        if hint is bool:
            kwargs["action"] = "store_false" if item.default is True else "store_true"
        else:
            origin = typing.get_origin(hint)
            if origin is tuple:
                kwargs.update(nargs=len(typing.get_args(hint)), type=typing.get_args(hint)[0])
            elif origin is list:
                kwargs.update(nargs="+", type=typing.get_args(hint)[0])
            elif origin is dict:
                kwargs.update(nargs="+", type=_ITEMS[meta["item"]])
            else:
                kwargs["type"] = hint
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
            if meta.get("metavar"):
                kwargs["metavar"] = meta["metavar"]
            if item.default not in (None, dataclasses.MISSING) and not isinstance(item.default, bool):
                kwargs["help"] += f" (default {item.default:.4g})" if isinstance(item.default, float) else \
                    f" (default {item.default})"
        groups[meta["group"]].add_argument(*names, **kwargs)
    parser.add_argument("--config", type=Path, metavar="RUN_JSON",
                        help="run the configuration in this file (a run.json); options given here override it")


def config_from_arguments(args: argparse.Namespace) -> TrainingConfig:
    """The configuration the options describe: ``--config``'s file, overridden by the options given."""
    given = {item.name: getattr(args, item.name) for item in dataclasses.fields(TrainingConfig)
             if hasattr(args, item.name)}
    for key, value in given.items():
        if isinstance(value, list) and value and isinstance(value[0], tuple) and key in ("label_names", "label_colors"):
            given[key] = dict(value)
    config_path = getattr(args, "config", None)
    if config_path is not None:
        record = TrainingConfig.load(config_path).to_json()
        return TrainingConfig.from_json({**record, **given}, str(config_path))
    missing = [name for name in ("data", "output") if name not in given]
    if missing:
        raise UserError(f"give --{missing[0]} (or --config run.json)")
    return TrainingConfig(**given)
