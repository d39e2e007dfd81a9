"""``predict -c`` and ``info`` take an nnU-Net model folder, one of its folds, or a fold's checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import refused, run_cli

from UNet3DSegmenterLib.io import read_volume, write_volume

FIXTURE = Path(__file__).parents[1] / "engine" / "data" / "nnunet"
PLAIN = FIXTURE / "nnUNetTrainerTiny__nnUNetPlans__3d_fullres"
CASE = "hippocampus_017"


@pytest.fixture
def two_channel_case(tmp_path, shared_dataset) -> Path:
    """The case as nnU-Net saw it (the MRI as both of the model's channels), as one 4D NIfTI file."""
    volume = read_volume(shared_dataset("msd_hippocampus") / "images" / f"{CASE}.nii.gz")
    return write_volume(volume.with_array(np.stack([volume.array, volume.array])), tmp_path / "case.nii.gz")


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints", [[PLAIN], [PLAIN / "fold_0", PLAIN / "fold_1" / "checkpoint_final.pth"]],
                         ids=["folder", "folds"])
def test_predict_with_an_nnunet_folder_gives_nnunets_segmentation(checkpoints, two_channel_case, tmp_path):
    output = tmp_path / "segmentation.nii.gz"
    result = run_cli("predict", "-c", *checkpoints, "-i", two_channel_case, "-o", output, "--precision", "fp32")
    assert result.returncode == 0, result.stderr
    reference = read_volume(FIXTURE / "predictions" / "plain_folds01" / f"{CASE}.nii.gz")
    assert (read_volume(output).array == reference.array).mean() >= 0.999


def test_info_describes_an_nnunet_folder():
    result = run_cli("info", PLAIN / "fold_1")
    assert result.returncode == 0, result.stderr
    for words in ("nnU-Net's U-Net (3 stages, 4-8-16 features", "input channels: 2", "1 anterior", "2 posterior",
                  "channel 1: CT (clip", "trainer nnUNetTrainerTiny", "fold 1"):
        assert words in result.stdout


def test_predict_never_writes_into_the_model_it_reads(tmp_path):
    before = hashlib.sha256((PLAIN / "dataset.json").read_bytes()).hexdigest()
    image = write_volume(read_volume(FIXTURE / "predictions" / "plain_fold0" / f"{CASE}.nii.gz"), tmp_path / "in.nii.gz")
    refused(run_cli("predict", "-c", PLAIN, "-i", image, "-o", PLAIN / "fold_0" / "checkpoint_final.pth"), "output")
    refused(run_cli("predict", "-c", PLAIN, "-i", image, "-o", tmp_path / "out.nii.gz"), "2 channel")
    assert hashlib.sha256((PLAIN / "dataset.json").read_bytes()).hexdigest() == before


def test_ensemble_imports_an_nnunet_folder_into_one_checkpoint_file(tmp_path):
    """One self-describing file (format 3) that predicts exactly as the folder and keeps where it came from."""
    from UNet3DSegmenterLib.checkpoint import load_checkpoint
    from UNet3DSegmenterLib.inference.predictor import Predictor
    from UNet3DSegmenterLib.volume import Volume

    result = run_cli("ensemble", PLAIN, "-o", tmp_path / "imported.pt")
    assert result.returncode == 0, result.stderr
    assert torch.load(tmp_path / "imported.pt", weights_only=True)["format_version"] == 3
    imported = load_checkpoint(tmp_path / "imported.pt")
    assert [member.training["fold"] for member in imported.members] == ["0", "1"]
    assert imported.members[0].training["dataset licence"] == "CC-BY-SA 4.0"
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(300, 80, size=(2, 30, 44, 36)).astype(np.float32), spacing=(1.0, 1.0, 1.2))
    from_folder = Predictor(PLAIN, device="cpu", precision="fp32").predict(volume).labelmap.array
    from_file = Predictor(imported, device="cpu", precision="fp32").predict(volume).labelmap.array
    np.testing.assert_array_equal(from_file, from_folder)
    info = run_cli("info", tmp_path / "imported.pt")
    assert "nnUNetTrainerTiny" in info.stdout and "logits, as nnU-Net does" in info.stdout


def test_fine_tuning_an_nnunet_model_is_refused_in_one_line(tmp_path):
    """This trainer does not repeat nnU-Net's preprocessing: fine-tuning would silently train on other inputs."""
    from UNet3DSegmenterLib.checkpoint import load_checkpoint, save_checkpoint
    from UNet3DSegmenterLib.volume import Volume

    save_checkpoint(load_checkpoint(PLAIN / "fold_0"), tmp_path / "imported.pt")
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        write_volume(Volume(rng.normal(size=(12, 16, 16)).astype(np.float32)), tmp_path / "images" / f"{case}.nii.gz")
        write_volume(Volume((rng.uniform(size=(12, 16, 16)) > 0.5).astype(np.uint8)),
                     tmp_path / "labels" / f"{case}.nii.gz")
    result = run_cli("train", "--data", tmp_path, "--output", tmp_path / "run", "--init", tmp_path / "imported.pt")
    refused(result, "was trained by nnU-Net")
    assert not (tmp_path / "run").exists()
