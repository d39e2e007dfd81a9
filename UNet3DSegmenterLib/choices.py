"""Every closed set of choices the engine offers, declared once and without importing torch.

The networks, losses, the ``train`` and ``predict`` options, the training configuration and the
Slicer panel's parameter node all take their choices from here, so that a new choice is added in
one place and everywhere agrees on the spelling.
"""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda", "mps")
"""Where to compute: 'auto' is CUDA when PyTorch sees a GPU, else the CPU; 'mps' is an Apple GPU (asked for only)."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
"""Compute precision: 'auto' is bf16 on CPUs with native bf16, fp16/bf16 autocast on CUDA, else fp32."""

DICOM_MODALITIES = ("OT", "CT", "MR", "PT", "NM", "US")
"""The modality a written DICOM series declares: 'OT' (other), CT, MR, PET, nuclear medicine, ultrasound."""

ARCHITECTURES = ("unet3d", "resunet3d", "resnet18unet", "vnet")
"""Networks of :mod:`UNet3DSegmenterLib.models`, by registry name."""

NORMS = ("instance", "batch", "none")
"""Normalisation layers of the networks ('none': plain convolutions with a bias, as the original VNet)."""

LOSSES = ("dicece", "dice", "focal", "dice_focal", "ce", "weighted_dice")
"""Training losses of :mod:`UNet3DSegmenterLib.training.losses`."""

OPTIMIZERS = ("adamw", "adam", "sgd")
"""Optimisers: AdamW, plain Adam (the optimiser of the original 3D U-Net ports), or SGD with Nesterov
momentum 0.99."""

SCHEDULES = ("poly", "cosine", "constant")
"""Learning-rate decay after the warm-up."""

UNCERTAINTIES = ("entropy", "probability")
"""Where a segmentation is unsure, per voxel: 'entropy' of the class probabilities (0 sure .. 1 all
classes alike), or the winning class's 'probability' (1 sure, low where unsure)."""

NORMALIZATIONS = ("auto", "zscore", "ct", "window", "none")
"""Intensity normalisation: 'auto' is 'window' when a window is given, else 'ct' for CT datasets and
'zscore' otherwise; 'window' clips to a given window and scales it to [0, 1]."""


MAX_PATCH_SIZE = 1024
"""The largest patch edge in voxels a network is trained or run on; more is a typing slip, not a plan."""

MAX_RESIZE = 4096
"""The largest edge in voxels of a fixed grid that inputs are resized to."""


def check_choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    """``value`` when it is one of ``allowed``; otherwise ValueError naming the choices."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}: choose one of {', '.join(allowed)}")
    return value
