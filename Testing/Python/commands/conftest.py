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
