"""Pictures: training curves and the image | reference | prediction overlay."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from UNet3DSegmenterLib.phantom import make_phantom
from UNet3DSegmenterLib.plots import save_curves, save_overlay
from UNet3DSegmenterLib.volume import Volume


def test_overlay_shows_image_reference_and_prediction(tmp_path):
    image, reference = make_phantom(shape=(24, 32, 32), spacing=(1.0, 1.0, 2.5), seed=1)
    prediction = reference.with_array(np.roll(reference.array, 2, axis=2))
    path = save_overlay(image, reference, prediction, tmp_path / "overlay.png", colors={1: (1.0, 0.0, 0.0)})
    picture = matplotlib.image.imread(path)
    assert picture.shape[0] > 500 and picture.shape[1] > 500
    assert (picture[..., 0] > 0.6).any() and not list(tmp_path.glob(".*partial*"))


def test_overlay_without_reference_and_with_mismatched_grids(tmp_path):
    image, labels = make_phantom(shape=(16, 24, 24), seed=2)
    assert save_overlay(image, None, labels, tmp_path / "no_reference.png").is_file()
    with pytest.raises(ValueError, match="differs from the image grid"):
        save_overlay(image, None, Volume(np.zeros((8, 8, 8), np.uint8)), tmp_path / "bad.png")


def test_curves_draw_loss_then_dice_and_iou_per_class(tmp_path):
    rows = [{"epoch": 1, "train_loss": 1.2, "lr": 1e-3, "seconds": 3.0},
            {"epoch": 2, "train_loss": 0.9, "val_loss": 1.0, "dice": {"organ": 0.5, "lesion": 0.2},
             "iou": {"organ": 0.33, "lesion": 0.11}, "mean_dice": 0.35, "lr": 9e-4, "seconds": 3.0}]
    path = save_curves(rows, ["organ", "lesion"], tmp_path / "curves.png")
    picture = matplotlib.image.imread(path)
    assert picture.shape[1] >= 1500  # three panels side by side
    third = picture[:, 2 * picture.shape[1] // 3:, :3]
    assert (np.abs(third[..., 0] - third[..., 2]) > 0.3).any()  # the IoU panel has coloured class lines
