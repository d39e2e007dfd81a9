"""`unet3d-segmenter predict` end to end: real files in, labelmaps out, one clear line for mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from UNet3DSegmenterLib.checkpoint import Checkpoint, Label, save_checkpoint
from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.io import read_volume, write_dicom_series, write_volume
from UNet3DSegmenterLib.models import build_model
from UNet3DSegmenterLib.preprocess import Preprocessing
from UNet3DSegmenterLib.volume import Volume


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = build_model("unet3d", dict(in_channels=1, out_channels=3, depth=3, base_width=4))
    labels = [Label(0, "background"), Label(1, "anterior", (1, 0, 0)), Label(2, "posterior", (0, 0, 1))]
    checkpoint = Checkpoint.from_model(model, labels, Preprocessing(spacing=(1.0, 1.0, 1.0)), (32, 32, 32))
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("model") / "model.pt")


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "UNet3DSegmenterLib", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def small_volume(seed: int = 0) -> Volume:
    array = np.random.default_rng(seed).normal(100, 10, size=(20, 24, 28)).astype(np.float32)
    return Volume(array, spacing=(1.0, 1.2, 1.5), origin=(3, 4, 5))


def test_predict_real_hippocampus_case_keeps_its_grid(model_path, shared_dataset, tmp_path):
    source = shared_dataset("msd_hippocampus") / "images" / "hippocampus_001.nii.gz"
    output, probabilities = tmp_path / "seg.nii.gz", tmp_path / "prob.nii.gz"
    result = run_cli("predict", "-c", model_path, "-i", source, "-o", output, "--probabilities", probabilities,
                     "--largest-component", "--tta", "--overlap", "0.25")
    assert result.returncode == 0, result.stderr
    image, labelmap = read_volume(source), read_volume(output)
    assert labelmap.same_grid(image) and labelmap.array.dtype == np.uint8
    assert read_volume(probabilities).channels == 3


def test_predict_folder_writes_each_case_under_its_name(model_path, tmp_path):
    for name in ("alpha", "beta"):
        write_volume(small_volume(), tmp_path / "in" / f"{name}.nrrd")
    result = run_cli("predict", "-c", model_path, "-i", tmp_path / "in", "-o", tmp_path / "out", "--progress-json")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alpha.nrrd", "beta.nrrd"]
    assert '"event": "progress"' in result.stdout and '"event": "written"' in result.stdout


def test_predict_dicom_series_folder(model_path, tmp_path):
    volume = small_volume()
    write_dicom_series(volume.with_array(volume.array.astype(np.int16)), tmp_path / "dicom")
    result = run_cli("predict", "-c", model_path, "-i", tmp_path / "dicom", "-o", tmp_path / "seg.nii.gz")
    assert result.returncode == 0, result.stderr
    assert read_volume(tmp_path / "seg.nii.gz").same_grid(volume, tolerance=1e-3)


def test_missing_input(model_path, tmp_path):
    result = run_cli("predict", "-c", model_path, "-i", tmp_path / "nope.nii.gz", "-o", tmp_path / "o.nii.gz")
    assert_one_line_error(result, "not found", "nope.nii.gz")


def test_corrupt_input_leaves_no_output(model_path, tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    result = run_cli("predict", "-c", model_path, "-i", tmp_path / "bad.nii.gz", "-o", tmp_path / "o.nii.gz")
    assert_one_line_error(result, "bad.nii.gz is truncated or corrupt (damaged compressed data")
    assert not (tmp_path / "o.nii.gz").exists()


def test_2d_input(model_path, tmp_path):
    sitk.WriteImage(sitk.Image(30, 30, sitk.sitkFloat32), str(tmp_path / "flat.nrrd"))
    assert_one_line_error(run_cli("predict", "-c", model_path, "-i", tmp_path / "flat.nrrd", "-o", tmp_path / "o.nrrd"),
                          "3D volume is needed")


def test_nan_input(model_path, tmp_path):
    array = small_volume().array
    array[3, 3, 3] = np.nan
    nibabel.save(nibabel.Nifti1Image(array.transpose(2, 1, 0), np.eye(4)), tmp_path / "nan.nii.gz")
    assert_one_line_error(run_cli("predict", "-c", model_path, "-i", tmp_path / "nan.nii.gz", "-o", tmp_path / "o.nii.gz"),
                          "NaN")


def test_channel_mismatch(model_path, tmp_path):
    write_volume(Volume(np.zeros((2, 10, 12, 14), np.float32)), tmp_path / "two.nrrd")
    result = run_cli("predict", "-c", model_path, "-i", tmp_path / "two.nrrd", "-o", tmp_path / "o.nrrd")
    assert_one_line_error(result, "2 channels", "expects 1")
    assert not (tmp_path / "o.nrrd").exists()


def test_unreadable_checkpoint(tmp_path):
    write_volume(small_volume(), tmp_path / "in.nii.gz")
    (tmp_path / "model.pt").write_text("not a checkpoint")
    assert_one_line_error(run_cli("predict", "-c", tmp_path / "model.pt", "-i", tmp_path / "in.nii.gz",
                                  "-o", tmp_path / "o.nii.gz"), "model.pt")


def test_output_folder_not_writable(model_path, tmp_path):
    write_volume(small_volume(), tmp_path / "in.nii.gz")
    (tmp_path / "file").write_text("a file where a folder should be")
    result = run_cli("predict", "-c", model_path, "-i", tmp_path / "in.nii.gz", "-o", tmp_path / "file" / "o.nii.gz")
    assert_one_line_error(result, "not writable")


def test_folder_input_with_file_output_is_refused(model_path, tmp_path):
    write_volume(small_volume(), tmp_path / "in" / "a.nii.gz")
    assert_one_line_error(run_cli("predict", "-c", model_path, "-i", tmp_path / "in", "-o", tmp_path / "o.nii.gz"),
                          "must be a folder")



# In the test process (torch is loaded already), for speed; the tests above run the console command.
def predict(*args) -> int:
    return main(["predict", *map(str, args)])


def assert_one_line_error_in_process(capsys, code: int, *fragments: str) -> None:
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]


def test_predict_npy_takes_the_given_spacing(model_path, tmp_path):
    array = small_volume().array
    np.save(tmp_path / "case.npy", array)
    assert predict("-c", model_path, "-i", tmp_path / "case.npy", "-o", tmp_path / "seg.nii.gz",
                   "--input-spacing", "1.0", "1.2", "1.5", "--device", "cpu") == 0
    labelmap = read_volume(tmp_path / "seg.nii.gz")
    assert labelmap.shape == array.shape and labelmap.spacing == pytest.approx((1.0, 1.2, 1.5))


def test_predict_folder_of_npy_arrays_and_dicom_series(model_path, tmp_path):
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "alpha.npy", small_volume().array)
    volume = small_volume(1)
    write_dicom_series(volume.with_array(volume.array.astype(np.int16)), tmp_path / "in" / "beta")
    assert predict("-c", model_path, "-i", tmp_path / "in", "-o", tmp_path / "out", "--input-spacing", "1", "1", "2",
                   "--device", "cpu") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alpha.npy", "beta.nii.gz"]
    assert np.load(tmp_path / "out" / "alpha.npy").shape == small_volume().shape
    assert read_volume(tmp_path / "out" / "beta.nii.gz").same_grid(volume, tolerance=1e-3)


def test_half_downloaded_real_nifti_is_refused_and_nothing_written(model_path, shared_dataset, tmp_path, capsys):
    source = shared_dataset("msd_hippocampus") / "images" / "hippocampus_001.nii.gz"
    data = source.read_bytes()
    (tmp_path / "case.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    code = predict("-c", model_path, "-i", tmp_path / "case.nii.gz", "-o", tmp_path / "seg.nii.gz", "--device", "cpu")
    assert_one_line_error_in_process(capsys, code, "case.nii.gz is truncated or corrupt", "download it again")
    assert not (tmp_path / "seg.nii.gz").exists()


def test_input_spacing_for_a_file_with_its_own_is_refused(model_path, tmp_path, capsys):
    write_volume(small_volume(), tmp_path / "in.nii.gz")
    code = predict("-c", model_path, "-i", tmp_path / "in.nii.gz", "-o", tmp_path / "o.nii.gz",
                   "--input-spacing", "1", "1", "1")
    assert_one_line_error_in_process(capsys, code, "--input-spacing", "records its own")


def ras_corners(volume: Volume, first_ijk, last_ijk) -> list[float]:
    to_ras = volume.ijk_to_ras()
    return [*(to_ras @ np.append(first_ijk, 1))[:3], *(to_ras @ np.append(last_ijk, 1))[:3]]


def test_roi_segments_inside_the_box_and_writes_the_whole_grid(model_path, tmp_path):
    volume = small_volume()
    write_volume(volume, tmp_path / "in.nii.gz")
    corners = ras_corners(volume, (2, 3, 4), (21, 17, 13))
    result = run_cli("predict", "-c", model_path, "-i", tmp_path / "in.nii.gz", "-o", tmp_path / "seg.nii.gz",
                     "--probabilities", tmp_path / "prob.nii.gz", "--roi", *corners)
    assert result.returncode == 0, result.stderr
    labelmap, probabilities = read_volume(tmp_path / "seg.nii.gz"), read_volume(tmp_path / "prob.nii.gz")
    assert labelmap.same_grid(volume, tolerance=1e-3) and probabilities.same_grid(volume, tolerance=1e-3)
    inside = np.zeros(volume.shape, bool)
    inside[4:14, 3:18, 2:22] = True
    assert labelmap.array[inside].any() and not labelmap.array[~inside].any()
    assert np.all(probabilities.array[0][~inside] == 1)


def test_roi_that_misses_the_volume_is_one_line_and_writes_nothing(model_path, tmp_path):
    volume = small_volume()
    write_volume(volume, tmp_path / "in.nii.gz")
    result = run_cli("predict", "-c", model_path, "-i", tmp_path / "in.nii.gz", "-o", tmp_path / "seg.nii.gz",
                     "--roi", *ras_corners(volume, (100, 100, 100), (110, 110, 110)))
    assert_one_line_error(result, "the ROI (R ", "holds no voxel of the volume", "place the box over the volume")
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.fixture(scope="module")
def crops_model_path(tmp_path_factory) -> Path:
    """A model whose training fingerprint says it saw 10 mm crops: small_volume() lies far outside."""
    from UNet3DSegmenterLib.fingerprint import TrainingFingerprint

    torch.manual_seed(0)
    model = build_model("unet3d", dict(in_channels=1, out_channels=2, depth=2, base_width=4))
    fingerprint = TrainingFingerprint.from_measurements([(10, 10, 10)], [(1, 1, 1)], [])
    checkpoint = Checkpoint.from_model(model, [Label(0, "background"), Label(1, "organ", (1, 0, 0))],
                                       Preprocessing(spacing=(1.0, 1.0, 1.0)), (16, 16, 16), fingerprint=fingerprint)
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("crops") / "crops.pt")


def test_a_warning_is_a_progress_event_before_the_windows(crops_model_path, tmp_path):
    write_volume(small_volume(), tmp_path / "case.nii.gz")
    result = run_cli("predict", "-c", crops_model_path, "-i", tmp_path / "case.nii.gz", "-o", tmp_path / "seg.nii.gz",
                     "--progress-json")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [event["event"] for event in events][:2] == ["warning", "progress"]
    assert events[0]["case"] == "case" and events[0]["message"].startswith(
        "this volume covers 28 x 29 x 30 mm; the model was trained on crops of about 10 x 10 x 10 mm")
    assert events[-1]["event"] == "written" and (tmp_path / "seg.nii.gz").is_file()


def test_a_warning_is_one_line_on_stderr_for_people(crops_model_path, tmp_path):
    write_volume(small_volume(), tmp_path / "case.nii.gz")
    result = run_cli("predict", "-c", crops_model_path, "-i", tmp_path / "case.nii.gz", "-o", tmp_path / "seg.nii.gz")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: case: this volume covers 28 x 29 x 30 mm")
    corners = ras_corners(small_volume(), (0, 0, 0), (9, 7, 6))  # 10 x 9.6 x 10.5 mm: like the training crops
    quiet = run_cli("predict", "-c", crops_model_path, "-i", tmp_path / "case.nii.gz", "-o", tmp_path / "roi.nii.gz",
                    "--roi", *corners)
    assert quiet.returncode == 0 and "warning: " not in quiet.stderr
