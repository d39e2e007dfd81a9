"""Fixtures of the command-line tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label, save_checkpoint
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    """A tiny two-class checkpoint (background, organ; 1 mm, 16^3 windows) for commands that need one."""
    torch.manual_seed(0)
    model = build_model("unet3d", dict(in_channels=1, out_channels=2, depth=2, base_width=2))
    checkpoint = Checkpoint.from_model(model, [Label(0, "background"), Label(1, "organ")],
                                       Preprocessing(spacing=(1.0, 1.0, 1.0)), (16, 16, 16))
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("model") / "model.pt")


@pytest.fixture(scope="module")
def organ_model(tmp_path_factory) -> Path:
    """A tiny untrained three-class network (background, liver, spleen; 1 x 1 x 2 mm) whose output on the
    DICOM test series (dicom_series.py) holds every class."""
    torch.manual_seed(8)
    model = build_model("unet3d", dict(in_channels=1, out_channels=3, depth=2, base_width=4))
    labels = [Label(0, "background"), Label(1, "liver", (0.8, 0.3, 0.2)), Label(2, "spleen", (0.6, 0.2, 0.8))]
    checkpoint = Checkpoint.from_model(model, labels, Preprocessing(spacing=(1.0, 1.0, 2.0)), (16, 16, 16))
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("model") / "organs.pt")
