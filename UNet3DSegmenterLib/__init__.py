"""UNet3DSegmenter's engine: 3D U-Net / VNet segmentation of medical volumes.

The core (top level) holds what both pipelines share; two subpackages hold the pipelines, one the
command line::

    core:       volume (the Volume type), io (read/write NIfTI, NRRD, MHA, NumPy, DICOM series),
                integrity (truncated files), dicom (sort DICOM files by their tags), preprocess,
                models, checkpoint, metrics, evaluation, datalist, labels, choices, runtime (device,
                precision), progress, protocol (what a parent process and the command line agree
                on), atomic, errors, phantom (generated data), plots, fingerprint (what the training
                images were like), roi (segment inside a box), segment_options (every segmentation
                option, declared once)
    inference:  io.read_volume -> preprocess -> inference.predictor (inference.fast + models,
                inference.sliding_window) -> inference.postprocess -> io.write_volume
    training:   training.config -> datalist -> training.splits -> training.planning ->
                training.patches -> training.augment -> training.step (losses) ->
                training.validation -> checkpoint; training.trainer runs the loop;
                training.cross_validation runs every fold, then joins them as an ensemble
    commands:   commands.cli and one module per command (predict, train, evaluate, overlay, convert,
                dicom_sort, ensemble, demo, info)

Typical use::

    from UNet3DSegmenterLib import Predictor, read_volume, write_volume
    result = Predictor("model.pt").predict(read_volume("ct.nii.gz"))
    write_volume(result.labelmap, "ct_seg.nii.gz")
    result.warnings                         # where the input lies far outside the training data
    box = RegionOfInterest.from_values([-40, -30, -30, 0, 20, 10])   # two corners, RAS mm
    Predictor("hippocampus.pt").predict(read_volume("head.nii.gz"), roi=box)
    ensemble = Predictor("runs/cv")         # a folder of fold checkpoints (or a list of .pt files)

Importing this package imports no torch: the public names below load their module on first use.
The engine never imports slicer, qt, ctk or vtk; ``UNet3DSegmenterLib.slicer`` is the Slicer side.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import _moved

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    "Checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "save_checkpoint": "checkpoint",
    "Ensemble": "checkpoint", "load_ensemble": "checkpoint",
    "Label": "labels", "UserError": "errors", "Volume": "volume",
    "read_volume": "io", "write_volume": "io",
    "UNet3D": "models", "ResidualUNet3D": "models", "ResNet18UNet3D": "models", "VNet": "models",
    "build_model": "models",
    "Predictor": "inference.predictor", "Prediction": "inference.predictor",
    "Preprocessing": "preprocess", "RegionOfInterest": "roi", "TrainingFingerprint": "fingerprint",
    "SegmentOptions": "segment_options",
    "patchify": "inference.sliding_window", "unpatchify": "inference.sliding_window",
    "sliding_window_inference": "inference.sliding_window",
    "get_dataloader": "training.patches",
    "TrainingConfig": "training.config", "train": "training.trainer",
    "cross_validate": "training.cross_validation",
    "IGNORE_NAME": "labels", "mark_unannotated_slices": "sparse", "keep_every_nth_slice": "sparse",
}

__all__ = [
    "Checkpoint", "Ensemble", "Label", "Prediction", "Predictor", "Preprocessing", "RegionOfInterest",
    "ResNet18UNet3D", "ResidualUNet3D", "SegmentOptions", "TrainingConfig", "TrainingFingerprint", "UNet3D", "UserError", "VNet", "Volume", "build_model", "cross_validate",
    "get_dataloader", "load_checkpoint", "load_ensemble", "patchify", "read_volume", "save_checkpoint",
    "sliding_window_inference", "train", "unpatchify", "write_volume",
    "IGNORE_NAME", "keep_every_nth_slice", "mark_unannotated_slices",
]

_moved.install(__name__)


def __getattr__(name: str):
    """Load a public name's module on first use (PEP 562), and old module paths (see ``_moved``)."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"{__name__}.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    if name in _moved.MOVED:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # what type checkers and editors see
    from .checkpoint import Checkpoint, Ensemble, load_checkpoint, load_ensemble, save_checkpoint
    from .errors import UserError
    from .fingerprint import TrainingFingerprint
    from .inference.predictor import Prediction, Predictor
    from .inference.sliding_window import patchify, sliding_window_inference, unpatchify
    from .io import read_volume, write_volume
    from .labels import Label
    from .models import ResidualUNet3D, ResNet18UNet3D, UNet3D, VNet, build_model
    from .preprocess import Preprocessing
    from .roi import RegionOfInterest
    from .segment_options import SegmentOptions
    from .training.config import TrainingConfig
    from .training.cross_validation import cross_validate
    from .training.patches import get_dataloader
    from .training.trainer import train
    from .volume import Volume
