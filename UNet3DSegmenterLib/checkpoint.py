"""Self-describing checkpoints: one ``.pt`` file that holds everything inference needs.

A checkpoint is a plain dictionary of tensors, numbers, strings and lists, so that it loads with
``torch.load(weights_only=True)``: a file that tries to run code (a pickled object) is refused and
nothing in it runs. Writes go to a temporary file that is renamed into place, so a crash never
leaves a broken checkpoint.

Record::

    format_version     int: 1, or 2 when the preprocessing resizes to a fixed grid or scales a window
    architecture       a name of models.ARCHITECTURES ('unet3d', 'resunet3d', 'resnet18unet', 'vnet')
    architecture_args  constructor arguments of the network
    state_dict         weights
    labels             [{value, name, color: [r, g, b] in 0..1}], in output-channel order (0 = background)
    preprocessing      see preprocess.Preprocessing.to_dict (format 2 adds 'size' and the 'window' normalisation)
    inference          {patch_size: [z, y, x], overlap}
    training           free-form record of how it was made (data, epochs, metrics)

A checkpoint is written in the oldest format that holds it, so that older versions of this tool keep
reading what they can, and refuse (rather than silently mis-read) what they cannot: a format-1
reader would ignore a resize and predict on the wrong grid.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path
from .errors import UserError
from .labels import Label
from .models import architecture_name, build_model, count_parameters
from .preprocess import Preprocessing
from .volume import float3, int3

FORMAT_VERSION = 2
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

    @property
    def in_channels(self) -> int:
        return int(self.architecture_args["in_channels"])

    @property
    def foreground_labels(self) -> list[Label]:
        return [label for label in self.labels if label.value != 0]

    @classmethod
    def from_model(cls, model: nn.Module, labels: list[Label], preprocessing: Preprocessing,
                   patch_size, overlap: float = 0.5, training: dict | None = None) -> Checkpoint:
        """Describe a trained network (weights are copied to the CPU)."""
        arguments: dict = dict(getattr(model, "architecture_args"))  # noqa: B009  (set by every registered network)
        if len(labels) != arguments["out_channels"]:
            raise ValueError(f"{len(labels)} labels for a network with {arguments['out_channels']} output channels")
        state_dict = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
        return cls(architecture_name(model), arguments, state_dict, list(labels),
                   preprocessing, int3(patch_size), float(overlap), dict(training or {}))

    def build_model(self) -> nn.Module:
        """The network with these weights, in eval mode, on the CPU."""
        model = build_model(self.architecture, self.architecture_args)
        model.load_state_dict(self.state_dict)
        return model.eval()

    def format_version(self) -> int:
        """The oldest format that holds this checkpoint (see the module docstring)."""
        preprocessing = self.preprocessing
        return 2 if preprocessing.size is not None or preprocessing.normalization == "window" else 1

    def to_dict(self) -> dict:
        return {
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

    def describe(self) -> str:
        """The record in words, as ``unet3d-segmenter info`` prints it."""
        model = build_model(self.architecture, self.architecture_args)
        args = self.architecture_args
        lines = [
            f"architecture:   {self.architecture} (depth {args.get('depth')}, base width {args.get('base_width')}, "
            f"{args.get('norm')} norm, dropout {args.get('dropout')})",
            f"parameters:     {count_parameters(model):,}",
            f"input channels: {self.in_channels}",
            "labels:         " + ", ".join(
                f"{label.value} {label.name} (rgb {_hex(label.color)})" for label in self.labels),
            f"grid:           {_grid(self.preprocessing)}",
            f"normalisation:  {self.preprocessing.describe()}",
            f"patch size:     {' x '.join(map(str, self.patch_size))} voxels (z, y, x), overlap {self.overlap:g}",
        ]
        training = self.training
        if training:
            summary = ", ".join(f"{key} {_short(value)}" for key, value in training.items()
                                if not isinstance(value, (dict, list)))
            lines.append(f"training:       {summary or 'recorded'}")
            for key, value in training.items():
                if isinstance(value, dict) and value and all(not isinstance(v, (dict, list)) for v in value.values()):
                    lines.append(f"  {key}: " + ", ".join(f"{k} {_short(v)}" for k, v in value.items()))
        else:
            lines.append("training:       not recorded")
        return "\n".join(lines)


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


def save_checkpoint(checkpoint: Checkpoint, path: str | os.PathLike) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        torch.save(checkpoint.to_dict(), temporary)
    return path


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint safely; every problem is a :class:`UserError` that names the file."""
    path = Path(path)
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
    return _from_record(record, path)


def _from_record(record, path: Path) -> Checkpoint:
    if not isinstance(record, dict) or "format_version" not in record:
        raise UserError(f"{path} is a PyTorch file but not a unet3d-segmenter checkpoint (no format_version)")
    version = record["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UserError(f"{path} has checkpoint format {version}, newer than this version reads "
                        f"({FORMAT_VERSION}): upgrade UNet3DSegmenter")
    missing = [key for key in _REQUIRED if key not in record]
    if missing:
        raise UserError(f"{path} is missing checkpoint fields: {', '.join(missing)}")
    try:
        labels = [Label(int(item["value"]), str(item["name"]), float3(item["color"]))
                  for item in record["labels"]]
        checkpoint = Checkpoint(
            architecture=record["architecture"],
            architecture_args=dict(record["architecture_args"]),
            state_dict=record["state_dict"],
            labels=labels,
            preprocessing=Preprocessing.from_dict(record["preprocessing"]),
            patch_size=int3(record["inference"]["patch_size"]),
            overlap=float(record["inference"].get("overlap", 0.5)),
            training=dict(record.get("training") or {}),
        )
        checkpoint.build_model()  # the weights must fit the architecture
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        reason = str(error).splitlines()[0][:160]
        raise UserError(f"{path} is an inconsistent checkpoint ({type(error).__name__}: {reason})") from None
    return checkpoint
