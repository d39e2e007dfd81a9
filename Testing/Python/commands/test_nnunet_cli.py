"""``predict -c`` and ``info`` take an nnU-Net model folder, one of its folds, or a fold's checkpoint."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
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
