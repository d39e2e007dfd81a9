"""Self-describing checkpoints: one ``.pt`` file that holds everything inference needs.

A checkpoint is a plain dictionary of tensors, numbers, strings and lists, so that it loads with
``torch.load(weights_only=True)``: a file that tries to run code (a pickled object) is refused and
nothing in it runs. Writes go to a temporary file that is renamed into place, so a crash never
leaves a broken checkpoint.

One network::

    format_version     int: 1, or 2 when the preprocessing resizes to a fixed grid or scales a window, or 3
                       when the network was trained by nnU-Net (preprocessing 'nnunet': its own steps)
    architecture       a name of models.ARCHITECTURES ('unet3d', 'resunet3d', 'resnet18unet', 'vnet')
    architecture_args  constructor arguments of the network
    state_dict         weights
    labels             [{value, name, color: [r, g, b] in 0..1}], in output-channel order (0 = background)
    preprocessing      see preprocess.Preprocessing.to_dict (format 2 adds 'size' and the 'window' normalisation)
    inference          {patch_size: [z, y, x], overlap}
    training           free-form record of how it was made (data, epochs, metrics; 'ignore_label': the
                       label value that marked unannotated voxels, which the network never outputs)
    fingerprint        optional: what the training images were like (extent, spacing and intensity
                       ranges, modality; see fingerprint.TrainingFingerprint.to_dict); inference warns
                       about inputs far outside it. Checkpoints without one load and predict as before.

An ensemble (format version 2) holds several
networks that segment the same labels from the same preprocessed image, e.g. the folds of a
cross-validation; inference averages their softmax probabilities::

    format_version     2
    labels             shared, as above
    preprocessing      shared, as above
    inference          {overlap}, shared
    members            [{architecture, architecture_args, state_dict, inference: {patch_size}, training,
                         fingerprint (optional)}]
    training           how the ensemble was made (e.g. the cross-validation's scores)

Members must agree on labels (values and names, in order), input channels and preprocessing
(spacing, normalisation and its numbers); each has its own architecture, weights and patch size.

A checkpoint is written in the oldest format that holds it, so that older versions of this tool keep
reading what they can, and refuse (rather than silently mis-read) what they cannot: a format-1
reader would ignore a resize and predict on the wrong grid, and cannot average an ensemble.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .atomic import WRITE_STOPPED, atomic_path, write_stopped
from .checkpoint_checks import check_record
from .errors import UserError
from .fingerprint import TrainingFingerprint
from .labels import Label
from .models import NNUNET_ARCHITECTURES, architecture_name, build_model, count_parameters
from .nnunet_folder import load_nnunet_folder, nnunet_model_files, nnunet_source
from .nnunet_networks import describe as describe_nnunet_network
from .preprocess import Preprocessing
from .volume import float3, int3

ENSEMBLE_FORMAT = 2
FORMAT_VERSION = 3
"""The newest checkpoint format this version reads (3: a network trained by nnU-Net, with its preprocessing)."""
_REQUIRED = ("format_version", "architecture", "architecture_args", "state_dict", "labels",
             "preprocessing", "inference")


@dataclass
class Checkpoint:
    """Everything needed to rebuild a network and run it exactly as it was trained."""

    architecture: str
    architecture_args: dict
    state_dict: dict
    labels: list[Label]
    preprocessing: Preprocessing
    patch_size: tuple[int, int, int]
    overlap: float = 0.5
    training: dict = field(default_factory=dict)
    fingerprint: TrainingFingerprint | None = None

    @property
    def in_channels(self) -> int:
        return int(self.architecture_args["in_channels"])

    @property
    def foreground_labels(self) -> list[Label]:
        return [label for label in self.labels if label.value != 0]

    @property
    def ignore_value(self) -> int | None:
        """The label value that marked unannotated voxels in the training labelmaps (sparse
        annotation), or None; it is no output class, so a prediction never holds it."""
        value = self.training.get("ignore_label")
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    @classmethod
    def from_model(cls, model: nn.Module, labels: list[Label], preprocessing: Preprocessing,
                   patch_size, overlap: float = 0.5, training: dict | None = None,
                   fingerprint: TrainingFingerprint | None = None) -> Checkpoint:
        """Describe a trained network (weights are copied to the CPU)."""
        arguments: dict = dict(getattr(model, "architecture_args"))  # noqa: B009  (set by every registered network)
        if len(labels) != arguments["out_channels"]:
            raise ValueError(f"{len(labels)} labels for a network with {arguments['out_channels']} output channels")
        state_dict = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
        return cls(architecture_name(model), arguments, state_dict, list(labels),
                   preprocessing, int3(patch_size), float(overlap), dict(training or {}), fingerprint)

    def build_model(self, share_weights: bool = False) -> nn.Module:
        """The network with these weights, in eval mode, on the CPU.

        ``share_weights``: its parameters are this checkpoint's own tensors rather than a copy of them
        (a second copy of a large 3D network is hundreds of megabytes), for a network that is only
        run; training it would change the checkpoint too. Tensors whose type or shape differ from
        the network's own are copied all the same."""
        model = build_model(self.architecture, self.architecture_args)
        own = model.state_dict()
        fits = share_weights and all(
            key in own and tensor.dtype == own[key].dtype and tensor.shape == own[key].shape
            for key, tensor in self.state_dict.items())
        model.load_state_dict(self.state_dict, assign=fits)
        return model.eval()

    def format_version(self) -> int:
        """The oldest format that holds this checkpoint (see the module docstring)."""
        preprocessing = self.preprocessing
        if preprocessing.nnunet is not None:
            return 3
        return 2 if preprocessing.size is not None or preprocessing.normalization == "window" else 1

    def to_dict(self) -> dict:
        record = {
            "format_version": self.format_version(),
            "architecture": self.architecture,
            "architecture_args": dict(self.architecture_args),
            "state_dict": self.state_dict,
            "labels": [{"value": int(label.value), "name": label.name, "color": [float(c) for c in label.color]}
                       for label in self.labels],
            "preprocessing": self.preprocessing.to_dict(),
            "inference": {"patch_size": list(self.patch_size), "overlap": self.overlap},
            "training": self.training,
        }
        if self.fingerprint is not None:
            record["fingerprint"] = self.fingerprint.to_dict()
        return record

    def describe(self) -> str:
        """The record in words, as ``unet3d-segmenter info`` prints it."""
        return _lines(self._description())

    def _description(self) -> list[tuple[str | None, str]]:
        """(heading, text) pairs of :meth:`describe`; a None heading is a line of its own."""
        model = build_model(self.architecture, self.architecture_args)
        args = self.architecture_args
        items: list[tuple[str | None, str]] = [
            ("architecture", describe_nnunet_network(args) if self.architecture in NNUNET_ARCHITECTURES else
                             f"{self.architecture} (depth {args.get('depth')}, base width {args.get('base_width')}, "
                             f"{args.get('norm')} norm, dropout {args.get('dropout')})"),
            ("parameters", f"{count_parameters(model):,}"),
            ("input channels", f"{self.in_channels}"),
            ("labels", ", ".join(f"{label.value} {label.name} (rgb {_hex(label.color)})" for label in self.labels)),
            ("grid", _grid(self.preprocessing)),
            ("normalisation", self.preprocessing.describe()),
            ("patch size", f"{' x '.join(map(str, self.patch_size))} voxels (z, y, x), overlap {self.overlap:g}"),
        ]
        return items + _training_items(self.training) + _fingerprint_items(self.fingerprint)


def _fingerprint_items(fingerprint: TrainingFingerprint | None) -> list[tuple[str | None, str]]:
    if fingerprint is None:
        return [("trained on", "not recorded (inputs are not compared with the training data)")]
    items: list[tuple[str | None, str]] = [*fingerprint.describe()]
    return items


def _training_items(training: dict) -> list[tuple[str | None, str]]:
    if not training:
        return [("training", "not recorded")]
    summary = ", ".join(f"{key} {_short(value)}" for key, value in training.items()
                        if not isinstance(value, (dict, list)))
    items: list[tuple[str | None, str]] = [("training", summary or "recorded")]
    for key, value in training.items():
        if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
            items.append((None, f"  {key}: " + ", ".join(f"{k} {_short(v)}" for k, v in value.items())))
    return items


def _lines(items: list[tuple[str | None, str]], indent: str = "") -> str:
    return "\n".join(indent + (text if heading is None else f"{heading + ':':<16}{text}") for heading, text in items)


@dataclass
class Ensemble:
    """Several networks that segment the same labels from the same preprocessed image; inference
    averages their softmax probabilities.

    It answers the questions a single :class:`Checkpoint` does (``labels``, ``preprocessing``,
    ``in_channels``, ``overlap``), so code that only reads those takes either. ``training`` records
    how the ensemble was made; each member keeps its own record.

    Example::

        >>> ensemble = Ensemble([load_checkpoint(f"cv/fold_{fold}/best.pt") for fold in range(5)])
        >>> save_checkpoint(ensemble, "model.pt")
    """

    members: list[Checkpoint]
    training: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_members(self.members, [f"member {index}" for index in range(1, len(self.members) + 1)])

    @property
    def labels(self) -> list[Label]:
        return self.members[0].labels

    @property
    def foreground_labels(self) -> list[Label]:
        return self.members[0].foreground_labels

    @property
    def preprocessing(self) -> Preprocessing:
        return self.members[0].preprocessing

    @property
    def in_channels(self) -> int:
        return self.members[0].in_channels

    @property
    def overlap(self) -> float:
        return self.members[0].overlap

    @property
    def fingerprint(self) -> TrainingFingerprint | None:
        """The first member's that has one: the folds of a cross-validation are planned from the same cases."""
        return next((member.fingerprint for member in self.members if member.fingerprint is not None), None)

    def to_dict(self) -> dict:
        shared = self.members[0].to_dict()
        members = []
        for member in self.members:
            record = member.to_dict()
            members.append({"architecture": record["architecture"], "architecture_args": record["architecture_args"],
                            "state_dict": record["state_dict"],
                            "inference": {"patch_size": record["inference"]["patch_size"]},
                            "training": record["training"],
                            **({"fingerprint": record["fingerprint"]} if "fingerprint" in record else {})})
        return {"format_version": max(ENSEMBLE_FORMAT, shared["format_version"]), "labels": shared["labels"],
                "preprocessing": shared["preprocessing"], "inference": {"overlap": shared["inference"]["overlap"]},
                "members": members, "training": self.training}

    def describe(self) -> str:
        """The ensemble in words: what every member shares once, then what each member has of its own."""
        descriptions = [member._description() for member in self.members]
        shared = [item for item in descriptions[0]
                  if item[0] not in ("training", None) and all(item in other for other in descriptions[1:])]
        averaged = "logits, as nnU-Net does" if self.preprocessing.nnunet is not None else "softmax probabilities"
        lines = [_lines([("ensemble", f"{len(self.members)} networks; predictions average their {averaged} "
                                      "(the lines below hold for every network)")] + shared)]
        if self.training:
            made = _training_items(self.training)
            lines.append(_lines([("made by", made[0][1])] + made[1:]))
        for index, description in enumerate(descriptions, start=1):
            lines.append(f"member {index} of {len(self.members)}:")
            lines.append(_lines([item for item in description if item not in shared], indent="  "))
        return "\n".join(lines)


def check_members(members: Sequence[Checkpoint], names: Sequence[str]) -> None:
    """Refuse networks that cannot be averaged: they must share labels, input channels and preprocessing."""
    if not members:
        raise UserError("an ensemble needs at least one checkpoint")
    first = members[0]
    for member, name in zip(members[1:], names[1:]):
        problem = None
        if [(label.value, label.name) for label in member.labels] != \
                [(label.value, label.name) for label in first.labels]:
            problem = (f"its labels ({_label_list(member)}) differ from those of {names[0]} ({_label_list(first)}): "
                       "every member must segment the same labels")
        elif member.in_channels != first.in_channels:
            problem = (f"it takes {member.in_channels} input channel(s) and {names[0]} {first.in_channels}")
        elif member.preprocessing != first.preprocessing:
            problem = (f"its preprocessing ({_preprocessing_words(member)}) differs from that of {names[0]} "
                       f"({_preprocessing_words(first)}): train the members with the same --spacing and "
                       "normalisation (the folds of one 'train --folds K' run always share them)")
        if problem:
            raise UserError(f"{name} cannot join an ensemble with {names[0]}: {problem}")


def _label_list(checkpoint: Checkpoint) -> str:
    return ", ".join(f"{label.value} {label.name}" for label in checkpoint.foreground_labels)


def _preprocessing_words(checkpoint: Checkpoint) -> str:
    return f"{_grid(checkpoint.preprocessing)}, {checkpoint.preprocessing.describe()}"


def members_of(model: Checkpoint | Ensemble) -> list[Checkpoint]:
    """The networks of ``model``: itself for one network, the members of an ensemble."""
    return list(model.members) if isinstance(model, Ensemble) else [model]


def _hex(color) -> str:
    return "#" + "".join(f"{round(255 * float(channel)):02x}" for channel in color)


def _grid(preprocessing: Preprocessing) -> str:
    if preprocessing.size is not None:
        return "resized to " + " x ".join(map(str, preprocessing.size)) + " voxels (z, y, x) over each input's box"
    if preprocessing.spacing is None:
        return "spacing kept as in the input"
    return "spacing " + " x ".join(f"{s:g}" for s in preprocessing.spacing) + " mm (x, y, z)"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def save_checkpoint(checkpoint: Checkpoint | Ensemble, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as temporary:
            torch.save(checkpoint.to_dict(), temporary)
    except OSError as error:
        if error.errno in WRITE_STOPPED:
            raise write_stopped(path, error.strerror or str(error)) from None
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    except RuntimeError as error:  # PyTorch's writer reports a short write as its own error
        raise write_stopped(path, f"PyTorch: {str(error).strip().splitlines()[-1][:120]}") from None
    return path


CheckpointSource = str | os.PathLike | Sequence[str | os.PathLike]
"""A checkpoint file, a folder of checkpoints, an nnU-Net model folder (or one of its folds), or several."""


def load_checkpoint(source: CheckpointSource) -> Checkpoint | Ensemble:
    """Read a checkpoint safely; every problem is a :class:`UserError` that names the file.

    ``source`` is a ``.pt`` file (one network, or an ensemble file), a folder (see
    :func:`checkpoint_files`) or a list of either. One network gives a :class:`Checkpoint`; several
    give an :class:`Ensemble` of all their networks (an ensemble file counts as its members). An
    nnU-Net model folder, one of its ``fold_N`` folders or a fold's ``.pth`` file is read by
    :mod:`.nnunet_folder` (see :func:`~.nnunet_folder.nnunet_source`).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        nnunet = nnunet_source(path)
        if nnunet is not None:
            return load_nnunet_folder(*nnunet)
        if not path.is_dir():
            return _load_file(path)
        files = checkpoint_files(path)
    else:
        files = [Path(item) for item in source]
    if not files:
        raise UserError("no checkpoint given: give a .pt file or a folder of them")
    models = [load_checkpoint(file) for file in files]
    if len(models) == 1:
        return models[0]
    members, names = [], []
    for model, file in zip(models, files):
        networks = members_of(model)
        members += networks
        names += [str(file)] if len(networks) == 1 else [f"{file} (member {index})" for index in
                                                          range(1, len(networks) + 1)]
    check_members(members, names)
    return Ensemble(members, {"from": ", ".join(str(file) for file in files)})


def load_ensemble(source: CheckpointSource) -> Ensemble:
    """:func:`load_checkpoint`, always as an :class:`Ensemble` (one network is an ensemble of one)."""
    model = load_checkpoint(source)
    return model if isinstance(model, Ensemble) else Ensemble([model])


def load_single_checkpoint(path: str | os.PathLike, purpose: str) -> Checkpoint:
    """One network's checkpoint; an ensemble is refused with a message that says what ``purpose`` needs."""
    model = load_checkpoint(path)
    if isinstance(model, Ensemble):
        raise UserError(f"{path} is an ensemble of {len(model.members)} networks, but {purpose} takes one network: "
                        "give one of its checkpoints (e.g. a fold's best.pt)")
    return model


def checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """The checkpoints a folder stands for, as one model.

    A cross-validation output (``fold_0/best.pt``, ``fold_1/best.pt``, ...) stands for its folds'
    best checkpoints; a training output (``best.pt`` beside ``last.pt``) for its ``best.pt``; any
    other folder for every ``.pt`` file in it, in name order; an nnU-Net model folder for its records
    and the checkpoints of its trained folds.
    """
    folder = Path(folder)
    if nnunet_source(folder) is not None:
        return nnunet_model_files(folder)
    folds = sorted((path for path in folder.glob("fold_*") if path.is_dir() and path.name[5:].isdigit()),
                   key=lambda path: int(path.name[5:]))
    if folds:
        unfinished = [path.name for path in folds if not (path / "best.pt").is_file()]
        if unfinished:
            raise UserError(f"{folder / unfinished[0]} holds no best.pt yet: finish the cross-validation "
                            "(train ... --resume) or give the fold checkpoints you want")
        return [path / "best.pt" for path in folds]
    if (folder / "best.pt").is_file():
        return [folder / "best.pt"]
    files = sorted(path for path in folder.glob("*.pt") if path.is_file())
    if not files:
        raise UserError(f"{folder} holds no checkpoints (.pt files, or fold_*/best.pt of a cross-validation): "
                        "check the path")
    return files


def checkpoint_paths(sources: Sequence[str | os.PathLike]) -> list[Path]:
    """The checkpoint files that ``sources`` (files, or folders as :func:`checkpoint_files` reads them) stand for."""
    return [file for source in map(Path, sources)
            for file in (checkpoint_files(source) if source.is_dir() or nnunet_source(source) else [source])]


def _load_file(path: Path) -> Checkpoint | Ensemble:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}: check the path")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"refused to load {path}: it holds Python objects or code, not plain weights "
                        "(nothing in it was run); use a checkpoint written by unet3d-segmenter") from None
    except Exception as error:  # torch raises many kinds for a damaged or foreign file
        raise UserError(f"cannot read checkpoint {path}: not a PyTorch checkpoint or damaged "
                        f"({type(error).__name__})") from None
    if isinstance(record, dict) and "members" in record:
        return _ensemble_from_record(record, path)
    return _from_record(record, path)


def _ensemble_from_record(record: dict, path: Path) -> Ensemble:
    _check_version(record, path)
    missing = [key for key in ("labels", "preprocessing", "inference", "members") if key not in record]
    if missing:
        raise UserError(f"{path} is missing ensemble fields: {', '.join(missing)}")
    members = record["members"]
    if not isinstance(members, list) or not members or not all(isinstance(member, dict) for member in members):
        raise UserError(f"{path} is an inconsistent ensemble: its members must be a non-empty list of networks")
    shared = {key: record[key] for key in ("labels", "preprocessing")}
    networks = []
    for index, member in enumerate(members, start=1):
        inference = {**dict(member.get("inference") or {}), "overlap": dict(record["inference"]).get("overlap", 0.5)}
        network = {**member, **shared, "inference": inference, "format_version": record["format_version"]}
        networks.append(_from_record(network, path, f" (member {index})"))
    return Ensemble(networks, dict(record.get("training") or {}))


def _check_version(record: dict, path: Path) -> None:
    version = record["format_version"] if "format_version" in record else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {version}, newer than this version reads "
                        f"({FORMAT_VERSION}): upgrade UNet3DSegmenter")


def _from_record(record, path: Path, part: str = "") -> Checkpoint:
    if not isinstance(record, dict) or "format_version" not in record:
        raise UserError(f"{path} is a PyTorch file but not a unet3d-segmenter checkpoint (no format_version)")
    _check_version(record, path)
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise UserError(f"{path}{part} is missing checkpoint fields: {', '.join(missing)}")

    def make() -> Checkpoint:
        labels = [Label(int(item["value"]), str(item["name"]), float3(item["color"]))
                  for item in record["labels"]]
        return Checkpoint(
            architecture=record["architecture"],
            architecture_args=dict(record["architecture_args"]),
            state_dict=record["state_dict"],
            labels=labels,
            preprocessing=Preprocessing.from_dict(record["preprocessing"]),
            patch_size=int3(record["inference"]["patch_size"]),
            overlap=float(record["inference"].get("overlap", 0.5)),
            training=dict(record.get("training") or {}),
            fingerprint=TrainingFingerprint.from_dict(record["fingerprint"]) if record.get("fingerprint") else None,
        )

    return checked_checkpoint(make, f"{path}{part}")


def checked_checkpoint(make: Callable[[], Checkpoint], source: str) -> Checkpoint:
    """The checkpoint ``make()`` describes, its record checked as a whole before a network is built from it
    and its weights loaded once; any inconsistency is a one-line :class:`UserError` naming ``source``."""
    try:
        checkpoint = make()
        check_record(checkpoint)
        checkpoint.build_model()
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0][:160]
        raise UserError(f"{source} is an inconsistent checkpoint ({type(error).__name__}: {reason})") from None
    return checkpoint
