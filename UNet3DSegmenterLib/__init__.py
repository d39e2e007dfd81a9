"""UNet3DSegmenter's engine: 3D U-Net / VNet segmentation of medical volumes.

One module per step; a volume flows through them in this order::

    inference:  io.read_volume -> volume.Volume -> preprocess -> predictor (fast_inference + models,
                sliding_window) -> postprocess -> io.write_volume
    training:   datalist -> splits -> planning -> dataset (cases prepared once, patches) -> augment
                -> models -> losses -> training_loop (step, optimiser, schedule, log) -> validation
                (the same sliding window) -> checkpoint; trainer runs the loop, distributed joins torchrun

Around them: checkpoint (the self-describing .pt file), metrics and evaluate (Dice, IoU, HD95, ASD),
cli with predict_command and train_command, demo with phantom (generated data), plots (curves and
overlays), progress (bars and JSON lines), atomic (whole-or-nothing writes), errors (UserError).

Typical use::

    from UNet3DSegmenterLib import Predictor, read_volume, write_volume
    result = Predictor("model.pt").predict(read_volume("ct.nii.gz"))
    write_volume(result.labelmap, "ct_seg.nii.gz")

This package never imports slicer, qt or vtk.
"""

from .checkpoint import Checkpoint, Label, load_checkpoint, save_checkpoint
from .errors import UserError
from .io import read_volume, write_volume
from .models import ResidualUNet3D, UNet3D, VNet, build_model
from .predictor import Prediction, Predictor
from .preprocess import Preprocessing
from .sliding_window import patchify, sliding_window_inference, unpatchify
from .volume import Volume

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "Label", "Prediction", "Predictor", "Preprocessing", "ResidualUNet3D", "UNet3D",
    "UserError", "VNet", "Volume", "build_model", "load_checkpoint", "patchify", "read_volume",
    "save_checkpoint", "sliding_window_inference", "unpatchify", "write_volume",
]
