"""The training plan: labels, spacing, patch size, normalisation and network, chosen from the data.

What the user does not say is taken from the training cases, the way nnU-Net plans: the median
spacing (so that most cases are resampled little), a patch as large as the median case (rounded up
to what the network can divide, and capped to keep memory bounded), z-score normalisation for MR
and a foreground intensity window for CT. A resumed run takes its plan from its own ``last.pt``;
fine-tuning takes the network and preprocessing of the ``init`` checkpoint, so that its weights
see the inputs they were trained on, unless a preprocessing option (spacing, resize, window) is
given: then the preprocessing is planned from the data as for a new run.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from torch import nn

from ..checkpoint import Checkpoint, load_single_checkpoint
from ..datalist import Case, Datalist, load_case
from ..errors import UserError
from ..fingerprint import TrainingFingerprint, intensity_percentiles
from ..io import read_volume
from ..labels import IGNORE_NAME, Label, default_color, ignore_value
from ..models import ARCHITECTURES, build_model, default_arguments
from ..preprocess import Preprocessing
from ..volume import float3, int3
from .losses import build_loss, inverse_frequency_weights
from .patches import PreparedCase, discover_label_values

log = logging.getLogger("UNet3DSegmenterLib")

CT_PERCENTILES = (0.5, 99.5)
_CT_CASES, _CT_VOXELS_PER_CASE = 32, 20_000


@dataclass
class TrainingPlan:
    """The decisions a run is trained with; all of them end up in the checkpoint."""

    labels: list[Label]
    preprocessing: Preprocessing
    patch_size: tuple[int, int, int]
    architecture: str
    architecture_args: dict
    base_lr: float
    weight_decay: float
    loss_name: str
    class_weights: list[float] | None = None
    init: Checkpoint | None = None
    median_spacing: tuple[float, float, float] | None = None  # (x, y, z) of the cases once resized
    fingerprint: TrainingFingerprint | None = None
    ignore_value: int | None = None  # the label value of unannotated voxels (sparse annotation)

    @property
    def label_values(self) -> list[int]:
        """The label value of each output class, in order (the ``ignore`` value is none of them)."""
        return [label.value for label in self.labels]

    @property
    def label_map(self) -> dict[int, str]:
        """Every value a training labelmap may hold, with its name: the classes, and ``ignore``."""
        ignored = {self.ignore_value: IGNORE_NAME} if self.ignore_value is not None else {}
        return {label.value: label.name for label in self.labels} | ignored

    def spacing_zyx(self) -> tuple[float, float, float]:
        """The voxel size of the training patches in mm: the spacing, or the median one after resizing."""
        spacing = self.preprocessing.spacing or self.median_spacing
        assert spacing is not None  # a plan always resamples, to a spacing or a size
        return float3(spacing[::-1])

    def build_model(self, seed: int) -> nn.Module:
        """The network with seeded initial weights, or the ``init`` checkpoint's where they fit."""
        torch.manual_seed(seed)
        model = build_model(self.architecture, self.architecture_args)
        if self.init is not None:
            _load_matching_weights(model, self.init, self.labels)
        return model

    def loss_weights(self, cases: Sequence[PreparedCase]) -> list[float] | None:
        """The class weights the loss is trained with: the user's, or for 'weighted_dice' without them
        the inverse frequencies of the foreground classes in the (annotated voxels of the) training
        cases, background weighed zero. The one place they are resolved: the checkpoint records them
        and cross-validation scores its test loss with them."""
        if self.loss_name != "weighted_dice" or self.class_weights is not None:
            return self.class_weights
        counts = np.zeros(len(self.labels), np.int64)
        for case in cases:  # the ignore index lies beyond the classes, so it is not counted
            counts += np.bincount(np.asarray(case.target).ravel(), minlength=len(self.labels))[:len(self.labels)]
        return [0.0] + inverse_frequency_weights(counts[1:].tolist())

    def loss(self, weights: list[float] | None) -> nn.Module:
        return build_loss(self.loss_name, len(self.labels), weights)


def plan_training(config, datalist: Datalist, train_cases: list[Case], resume_from: Path | None = None,
                  fingerprint_cases: list[Case] | None = None) -> TrainingPlan:
    """Decide the plan for ``config`` (a :class:`~UNet3DSegmenterLib.trainer.TrainingConfig`).

    The training fingerprint is that of ``fingerprint_cases`` (default ``train_cases``): the cases the
    network learns from, where the plan is shared by the folds of a cross-validation."""
    fingerprint_cases = train_cases if fingerprint_cases is None else fingerprint_cases
    lr, weight_decay = _optimiser_defaults(config)
    if resume_from is not None:
        previous = load_single_checkpoint(resume_from, "resuming")
        _check_resume_options(config, previous, resume_from)
        return TrainingPlan(previous.labels, previous.preprocessing, previous.patch_size, previous.architecture,
                            previous.architecture_args, lr, weight_decay, config.loss, config.class_weights,
                            median_spacing=_median_resized_spacing(train_cases, previous.preprocessing),
                            fingerprint=previous.fingerprint or training_fingerprint(fingerprint_cases, datalist.modality),
                            ignore_value=previous.ignore_value)
    labels, ignored = _labels(config, datalist)
    init = load_single_checkpoint(config.init, "fine-tuning (--init)") if config.init else None
    if init is not None and init.preprocessing.nnunet is not None:
        raise UserError(f"--init {config.init} was trained by nnU-Net, whose preprocessing this trainer does not "
                        "repeat: fine-tune it with nnU-Net, or train a new network here")
    if init is not None:
        architecture, arguments = _init_architecture(config, init, len(labels))
    else:
        architecture = config.architecture or "unet3d"
        if architecture not in ARCHITECTURES:
            raise UserError(f"unknown architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
        defaults = default_arguments(architecture)
        arguments = dict(in_channels=_channels(train_cases[0]), out_channels=len(labels),
                         depth=config.depth if config.depth is not None else defaults["depth"],
                         base_width=config.base_width if config.base_width is not None else defaults["base_width"],
                         norm=config.norm, dropout=config.dropout)
        _check_architecture(architecture, arguments)
    divisor = 2 ** (arguments["depth"] - 1)
    keep_init_preprocessing = init is not None and config.spacing is None and config.resize is None and \
        config.window is None
    if keep_init_preprocessing:
        assert init is not None
        preprocessing = init.preprocessing
    else:
        preprocessing = _preprocessing(config, datalist, train_cases, labels, ignored)
    if config.patch_size is not None:
        patch_size = _checked_patch_size(config.patch_size, divisor)
    elif keep_init_preprocessing:
        assert init is not None
        patch_size = init.patch_size
    else:
        median_shape = preprocessing.size or _median_shape(train_cases, preprocessing.spacing)
        patch_size = plan_patch_size(median_shape, divisor, config.max_patch_size, config.max_patch_voxels)
    if config.class_weights is not None and len(config.class_weights) != len(labels):
        raise UserError(f"{len(config.class_weights)} class weights for {len(labels)} classes: give one per class, "
                        "background first")
    return TrainingPlan(labels, preprocessing, patch_size, architecture, arguments, lr, weight_decay, config.loss,
                        config.class_weights, init, _median_resized_spacing(train_cases, preprocessing),
                        training_fingerprint(fingerprint_cases, datalist.modality), ignored)


def _check_architecture(architecture: str, arguments: dict) -> None:
    """Build the network without memory (on PyTorch's meta device) to turn a bad combination of
    options into a clear error before any data is read."""
    try:
        with torch.device("meta"):
            build_model(architecture, arguments)
    except ValueError as error:
        raise UserError(f"--arch {architecture}: {error}") from None


def _optimiser_defaults(config) -> tuple[float, float]:
    defaults = {"adamw": (1e-3, 1e-2), "adam": (1e-3, 0.0), "sgd": (1e-2, 3e-5)}[config.optimizer]
    return (config.lr if config.lr is not None else defaults[0],
            config.weight_decay if config.weight_decay is not None else defaults[1])


def _labels(config, datalist: Datalist) -> tuple[list[Label], int | None]:
    """Label values with names and colours: the user's, else the dataset's, else those in the files;
    and the value named ``ignore`` (unannotated voxels, not a class), if any."""
    names = config.label_names or datalist.label_names
    if names is None:
        names = {value: f"label {value}" for value in discover_label_values(datalist.cases)}
    names = {int(value): str(name) for value, name in names.items()}
    try:
        ignored = ignore_value(names)
    except ValueError as error:
        raise UserError(f"{config.data}: {error}") from None
    if ignored is not None:
        del names[ignored]
    names.setdefault(0, "background")
    if len(names) < 2:
        raise UserError(f"the labelmaps of {config.data} hold no foreground label: nothing to learn")
    if len(names) > 255:
        raise UserError(f"{len(names)} labels: at most 255 classes are supported")
    colors = config.label_colors or datalist.label_colors or {}
    return [Label(value, name, tuple(colors.get(value, default_color(index))))
            for index, (value, name) in enumerate(sorted(names.items()))], ignored


def _init_architecture(config, init: Checkpoint, classes: int) -> tuple[str, dict]:
    if config.architecture and config.architecture != init.architecture:
        raise UserError(f"--init {config.init} is a {init.architecture} network, but --arch {config.architecture} was "
                        f"asked for: leave out --arch to fine-tune it")
    return init.architecture, {**init.architecture_args, "out_channels": classes}


def _load_matching_weights(model: nn.Module, init: Checkpoint, labels: list[Label]) -> None:
    """All of ``init``'s weights; when the labels differ, all but the output layer (a new one)."""
    same_labels = [label.value for label in init.labels] == [label.value for label in labels]
    own = model.state_dict()
    kept = {key: value for key, value in init.state_dict.items()
            if key in own and own[key].shape == value.shape and (same_labels or not key.startswith("head."))}
    model.load_state_dict(kept, strict=False)
    if not same_labels:
        log.info("fine-tuning %s with a new output layer for %d classes", init.architecture, len(labels))


def _channels(case: Case) -> int:
    return _header(case.image, case.spacing)[2]


def _header(path: Path, spacing: tuple[float, float, float] | None = None) -> tuple[tuple[float, ...], tuple[int, ...], int]:
    """(spacing xyz, size xyz, channels) from the file header, without reading the voxels (``spacing``:
    that of a .npy array)."""
    if path.is_file():
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
            channels = reader.GetNumberOfComponents() * (reader.GetSize()[3] if reader.GetDimension() == 4 else 1)
            return reader.GetSpacing()[:3], reader.GetSize()[:3], channels
        except RuntimeError:
            pass  # read_volume below explains the problem
    volume = read_volume(path, spacing=spacing)
    return volume.spacing, volume.shape[::-1], volume.channels


def training_fingerprint(cases: Sequence[Case], modality: str | None = None) -> TrainingFingerprint:
    """What the training images are like (see fingerprint.py): extent and spacing of every case from
    its header, intensities from up to 32 cases chosen evenly (the voxels must be read for those)."""
    headers = [_header(case.image, case.spacing) for case in cases]
    extents = [(np.asarray(size, np.float64) * np.asarray(spacing)).tolist() for spacing, size, _ in headers]
    chosen = np.unique(np.linspace(0, len(cases) - 1, min(len(cases), _CT_CASES)).round().astype(int))
    percentiles = [intensity_percentiles(read_volume(cases[index].image, spacing=cases[index].spacing), int(index))
                   for index in chosen]
    return TrainingFingerprint.from_measurements(extents, [spacing for spacing, _, _ in headers], percentiles, modality)


def _median_spacing(cases: list[Case]) -> tuple[float, float, float]:
    """Rounded to 0.01 micrometre: headers store float32, and 0.800000011920929 reads worse than 0.8."""
    return float3(round(float(value), 5) for value in np.median([_header(case.image, case.spacing)[0] for case in cases], axis=0))


def _median_resized_spacing(cases: list[Case], preprocessing: Preprocessing) -> tuple[float, float, float] | None:
    """The median spacing (x, y, z) of ``cases`` once resized to ``preprocessing.size`` (None
    without resizing): the voxel size augmentation works in."""
    if preprocessing.size is None:
        return None
    size_xyz = np.asarray(preprocessing.size[::-1], np.float64)
    spacings = [np.asarray(spacing) * np.asarray(size) / size_xyz
                for spacing, size, _ in (_header(case.image) for case in cases)]
    return float3(np.median(spacings, axis=0))


def _median_shape(cases: list[Case], spacing) -> tuple[int, int, int]:
    """Median (z, y, x) size of the cases once resampled to ``spacing``."""
    sizes = [np.asarray(size) * np.asarray(own) / np.asarray(spacing)
             for own, size, _ in (_header(case.image, case.spacing) for case in cases)]
    return int3(round(value) for value in np.median(sizes, axis=0)[::-1])


def plan_patch_size(median_shape: Sequence[int], divisor: int, max_size: int = 128,
                    max_voxels: int = 128**3) -> tuple[int, int, int]:
    """The median shape (z, y, x) rounded up to multiples of ``divisor``, each axis at most
    ``max_size``, and the whole at most ``max_voxels``: while too large, the axis that covers the
    most of its median size shrinks, so the patch keeps the data's proportions."""
    largest = max(divisor, max_size // divisor * divisor)
    patch = [min(max(divisor, math.ceil(size / divisor) * divisor), largest) for size in median_shape]
    while math.prod(patch) > max_voxels and max(patch) > divisor:
        coverage = [(size / max(median, 1), size) if size > divisor else (0, 0)
                    for size, median in zip(patch, median_shape)]
        patch[coverage.index(max(coverage))] -= divisor
    return int3(patch)


def _check_resume_options(config, previous: Checkpoint, path: Path) -> None:
    """A resumed run keeps its network and preprocessing: refuse options that ask for others, rather than
    ignore them and let the user believe they took effect."""
    arguments, preprocessing = previous.architecture_args, previous.preprocessing
    asked = [
        ("--arch", config.architecture, previous.architecture),
        ("--depth", config.depth, arguments.get("depth")),
        ("--base-width", config.base_width, arguments.get("base_width")),
        ("--norm", None if config.norm == "instance" else config.norm, arguments.get("norm")),
        ("--dropout", config.dropout or None, arguments.get("dropout")),
        ("--spacing", config.spacing and float3(config.spacing), preprocessing.spacing),
        ("--resize", config.resize and int3(config.resize), preprocessing.size),
        ("--patch-size", config.patch_size and int3(config.patch_size), previous.patch_size),
        ("--window", config.window and tuple(map(float, config.window)), preprocessing.clip),
    ]
    for flag, given, recorded in asked:
        if given is not None and given != recorded:
            shown = " ".join(map(str, given)) if isinstance(given, tuple) else given
            raise UserError(f"--resume continues the run in {path.parent} as it was set up ({flag[2:]} {recorded}), "
                            f"but {flag} {shown} asks for another: leave {flag} out, or start a new run in another "
                            "--output")


def _checked_patch_size(patch_size, divisor: int) -> tuple[int, int, int]:
    patch_size = tuple(int(size) for size in patch_size)
    if len(patch_size) != 3 or any(size < divisor or size % divisor for size in patch_size):
        suggestion = tuple(max(divisor, round(size / divisor) * divisor) for size in patch_size)
        raise UserError(f"patch size {patch_size} must be three multiples of {divisor} for this network's depth: "
                        f"try {' '.join(map(str, suggestion))}")
    return patch_size


def _preprocessing(config, datalist: Datalist, train_cases: list[Case], labels: list[Label],
                   ignored: int | None) -> Preprocessing:
    if config.resize is not None:
        spacing, size = None, config.resize
    else:
        spacing, size = tuple(config.spacing) if config.spacing is not None else _median_spacing(train_cases), None
    normalization = config.normalization
    if normalization == "auto":
        normalization = "window" if config.window is not None else "ct" if _is_ct(datalist.modality) else "zscore"
    channels = _channels(train_cases[0])
    if normalization == "window":
        return Preprocessing(spacing, "window", config.window, channels=channels, size=size)
    if normalization != "ct":
        return Preprocessing(spacing, normalization, channels=channels, size=size)
    names = {label.value: label.name for label in labels} | ({ignored: IGNORE_NAME} if ignored is not None else {})
    clip, mean, std = ct_statistics(train_cases, names, config.resample_labels, ignore=ignored)
    return Preprocessing(spacing, "ct", clip, mean, std, channels, size)


def _is_ct(modality: str | None) -> bool:
    return modality is not None and re.search(r"\bCT\b", modality.upper()) is not None


def ct_statistics(cases: Sequence[Case], label_names: dict[int, str], resample_labels: bool = False,
                  seed: int = 0, ignore: int | None = None) -> tuple[tuple[float, float], float, float]:
    """The CT window (0.5 and 99.5 percentiles of foreground intensities) and the mean and std of
    foreground intensities inside it, over (a sample of) the training cases, as nnU-Net does;
    ``ignore`` (the value of unannotated voxels) is not foreground."""
    rng = np.random.default_rng(seed)
    chosen = np.unique(np.linspace(0, len(cases) - 1, min(len(cases), _CT_CASES)).round().astype(int))
    samples = []
    for case in (cases[index] for index in chosen):
        image, labels = load_case(case, label_names, resample_labels)
        channels = image.array if image.array.ndim == 4 else image.array[None]
        values = channels[:, (labels.array > 0) & (labels.array != (-1 if ignore is None else ignore))].ravel()
        values = values if values.size else channels.ravel()
        samples.append(rng.choice(values, min(values.size, _CT_VOXELS_PER_CASE), replace=False))
    values = np.concatenate(samples).astype(np.float64)
    low, high = np.percentile(values, CT_PERCENTILES)
    clipped = np.clip(values, low, high)
    return (float(low), float(high)), float(clipped.mean()), float(max(clipped.std(), 1e-6))
