"""`predict --uncertainty PATH`: where the model is unsure, written beside the labelmap from one pass."""

from __future__ import annotations

import numpy as np
import pytest
from cli_runs import refused, run_cli

from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.inference.predictor import Predictor
from UNet3DSegmenterLib.io import read_volume, write_volume
from UNet3DSegmenterLib.volume import Volume


@pytest.fixture
def case(tmp_path):
    volume = Volume(np.random.default_rng(0).normal(size=(20, 24, 28)).astype(np.float32), spacing=(0.8, 0.8, 1.2))
    return write_volume(volume, tmp_path / "case.nii.gz")


@pytest.mark.parametrize("measure", ["entropy", "probability"])
def test_predict_writes_the_uncertainty_the_predictor_computes(model_path, case, tmp_path, measure):
    output, uncertainty = tmp_path / "seg.nii.gz", tmp_path / "unsure.nrrd"
    assert main(["predict", "-c", str(model_path), "-i", str(case), "-o", str(output), "--device", "cpu",
                 "--uncertainty", str(uncertainty), "--uncertainty-measure", measure]) == 0
    written, image = read_volume(uncertainty), read_volume(case)
    expected = Predictor(model_path, device="cpu").predict(image, uncertainty=measure).uncertainty
    assert written.same_grid(image) and written.array.dtype == np.float32
    np.testing.assert_array_equal(written.array, expected.array)


def test_a_folder_of_inputs_writes_a_folder_of_uncertainties(model_path, case, tmp_path):
    outputs, unsure = tmp_path / "segs", tmp_path / "unsure"
    assert main(["predict", "-c", str(model_path), "-i", str(case.parent), "-o", str(outputs), "--device", "cpu",
                 "--uncertainty", str(unsure)]) == 0
    assert sorted(path.name for path in unsure.iterdir()) == ["case.nii.gz"]


def test_an_uncertainty_file_that_is_the_input_is_refused(model_path, case, tmp_path):
    result = run_cli("predict", "-c", model_path, "-i", case, "-o", tmp_path / "seg.nii.gz", "--uncertainty", case)
    refused(result, str(case))
    assert read_volume(case).array.dtype == np.float32


def test_a_second_folder_run_redoes_a_case_whose_uncertainty_is_missing(model_path, case, tmp_path):
    write_volume(read_volume(case), case.parent / "other.nii.gz")
    outputs, unsure = tmp_path / "segs", tmp_path / "unsure"
    command = ["predict", "-c", model_path, "-i", case.parent, "-o", outputs, "--device", "cpu", "--uncertainty", unsure]
    assert run_cli(*command).returncode == 0
    kept = (outputs / "other.nii.gz").stat().st_mtime_ns
    (unsure / "case.nii.gz").unlink()  # as if the run had been cut off between the two files of this case
    again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    assert "skipped 1 cases already done" in again.stderr
    assert (unsure / "case.nii.gz").exists() and (outputs / "other.nii.gz").stat().st_mtime_ns == kept
