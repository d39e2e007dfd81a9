"""`ensemble`, `predict --checkpoint A B` and `info` on ensembles: one file, the same labelmaps, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Ensemble, load_checkpoint, save_checkpoint
from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.io import read_volume, write_volume
from UNet3DSegmenterLib.labels import Label
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.volume import Volume

LABELS = [Label(0, "background"), Label(1, "anterior", (1, 0, 0)), Label(2, "posterior", (0, 0, 1))]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("models")
    paths = []
    for seed, architecture in enumerate(("unet3d", "vnet")):
        torch.manual_seed(seed)
        model = build_model(architecture, dict(in_channels=1, out_channels=3, depth=3, base_width=4))
        checkpoint = Checkpoint.from_model(model, LABELS, Preprocessing(spacing=(1.0, 1.0, 1.0)), (16, 16, 16))
        paths.append(save_checkpoint(checkpoint, folder / f"{architecture}.pt"))
    return paths


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    array = np.random.default_rng(0).normal(100, 10, size=(18, 20, 22)).astype(np.float32)
    return write_volume(Volume(array, spacing=(1.0, 1.2, 1.5)), tmp_path_factory.mktemp("input") / "case.nii.gz")


def segment(image: Path, output: Path, *checkpoints: Path) -> np.ndarray:
    assert main(["predict", "--checkpoint", *map(str, checkpoints), "--input", str(image), "--output", str(output),
                 "--device", "cpu", "--precision", "fp32"]) == 0
    return read_volume(output).array


def test_ensemble_file_predicts_as_its_checkpoints_together_and_info_says_so(models, image, tmp_path, capsys):
    assert main(["ensemble", *map(str, models), "--output", str(tmp_path / "ensemble.pt")]) == 0
    assert "an ensemble of 2 networks" in capsys.readouterr().err
    ensemble = load_checkpoint(tmp_path / "ensemble.pt")
    assert isinstance(ensemble, Ensemble) and [m.architecture for m in ensemble.members] == ["unet3d", "vnet"]
    from_file = segment(image, tmp_path / "file.nii.gz", tmp_path / "ensemble.pt")
    from_list = segment(image, tmp_path / "list.nii.gz", *models)
    np.testing.assert_array_equal(from_file, from_list)
    assert not np.array_equal(from_list, segment(image, tmp_path / "one.nii.gz", models[0]))
    capsys.readouterr()
    assert main(["info", str(tmp_path / "ensemble.pt")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ensemble:       2 networks") and "member 2 of 2:" in out and "posterior" in out


def test_the_same_checkpoint_twice_segments_exactly_as_once(models, image, tmp_path):
    once = segment(image, tmp_path / "once.nii.gz", models[0])
    twice = segment(image, tmp_path / "twice.nii.gz", models[0], models[0])
    np.testing.assert_array_equal(twice, once)


def test_an_ensemble_of_mismatched_checkpoints_is_one_line_and_writes_nothing(models, tmp_path, capsys):
    torch.manual_seed(0)
    other = build_model("unet3d", dict(in_channels=1, out_channels=2, depth=3, base_width=4))
    odd = save_checkpoint(Checkpoint.from_model(other, LABELS[:2], Preprocessing(spacing=(1.0, 1.0, 1.0)),
                                                (16, 16, 16)), tmp_path / "odd.pt")
    assert main(["ensemble", str(models[0]), str(odd), "--output", str(tmp_path / "bad.pt")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "\n" not in error
    assert "odd.pt cannot join an ensemble" in error and "every member must segment the same labels" in error
    assert not (tmp_path / "bad.pt").exists()
    assert main(["ensemble", str(models[0]), "--output", str(tmp_path / "ensemble.nii.gz")]) == 2
    assert "give a file name ending in .pt" in capsys.readouterr().err
