"""`unet3d-segmenter overlay`: image | reference | prediction for one's own case, or one clear line."""

from __future__ import annotations

import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label, save_checkpoint
from UNet3DSegmenterLib.io import write_volume
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.phantom import make_phantom
from UNet3DSegmenterLib.preprocess import Preprocessing


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "UNet3DSegmenterLib", "overlay", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("case")
    image, reference = make_phantom(shape=(20, 32, 32), spacing=(1.0, 1.0, 2.5), seed=4)
    prediction = reference.with_array(np.roll(reference.array, 2, axis=1))
    for name, volume in (("image", image), ("reference", reference), ("prediction", prediction)):
        write_volume(volume, folder / f"{name}.nii.gz")
    return folder


def test_overlay_draws_image_reference_and_prediction_in_the_checkpoint_colours(case, tmp_path):
    torch.manual_seed(0)
    labels = [Label(0, "background"), Label(1, "organ", (0.0, 1.0, 0.0)), Label(2, "lesion", (0.0, 1.0, 0.0))]
    model = build_model("unet3d", dict(in_channels=1, out_channels=3, depth=2, base_width=2))
    checkpoint = save_checkpoint(Checkpoint.from_model(model, labels, Preprocessing(), (8, 8, 8)), tmp_path / "m.pt")
    output = tmp_path / "figures" / "overlay.png"
    result = run_cli("--image", case / "image.nii.gz", "--reference", case / "reference.nii.gz",
                     "--prediction", case / "prediction.nii.gz", "--output", output, "--checkpoint", checkpoint)
    assert result.returncode == 0, result.stderr
    picture = matplotlib.image.imread(output)[..., :3]
    assert picture.shape[0] > 500 and picture.shape[1] > 500
    green = (picture[..., 1] > picture[..., 0] + 0.2) & (picture[..., 1] > picture[..., 2] + 0.2)
    columns = np.nonzero(green.any(axis=0))[0] / picture.shape[1]
    assert (columns > 1 / 3).any() and (columns > 2 / 3).any()  # labels drawn in the reference and prediction
    assert not (columns < 0.3).any()  # and not over the plain image


def test_overlay_without_a_reference(case, tmp_path):
    result = run_cli("-i", case / "image.nii.gz", "-p", case / "prediction.nii.gz", "-o", tmp_path / "only.png")
    assert result.returncode == 0, result.stderr
    assert matplotlib.image.imread(tmp_path / "only.png").shape[0] > 500


def test_a_prediction_on_another_grid_is_one_line_and_writes_nothing(case, tmp_path):
    image, labels = make_phantom(shape=(10, 16, 16), seed=5)
    write_volume(labels, tmp_path / "other.nii.gz")
    result = run_cli("-i", case / "image.nii.gz", "-p", tmp_path / "other.nii.gz", "-o", tmp_path / "bad.png")
    assert_one_line_error(result, "is not on the grid of the image")
    assert not (tmp_path / "bad.png").exists()


def test_a_probability_map_and_a_non_png_output_are_refused(case, tmp_path):
    image, _ = make_phantom(shape=(20, 32, 32), spacing=(1.0, 1.0, 2.5), seed=4)
    write_volume(image.with_array(np.full(image.shape, 0.5, np.float32)), tmp_path / "probabilities.nii.gz")
    result = run_cli("-i", case / "image.nii.gz", "-p", tmp_path / "probabilities.nii.gz", "-o", tmp_path / "p.png")
    assert_one_line_error(result, "non-integer values")
    result = run_cli("-i", case / "image.nii.gz", "-p", case / "prediction.nii.gz", "-o", tmp_path / "overlay.jpg")
    assert_one_line_error(result, "ending in .png")
