"""``predict`` to DICOM SEG, and ``evaluate`` and ``convert`` reading DICOM SEG: the SEG reads back, through
highdicom's writer and two readers (ours and dcmqi), to exactly the labelmap ``predict`` writes as NIfTI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from cli_runs import refused, run_cli
from dicom_series import ORIENTATIONS, dcmqi_converter, dcmqi_labelmap, write_ct_series

from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.dicom_seg import INSTALL_HINT, read_dicom_seg
from UNet3DSegmenterLib.io import read_volume, write_volume


def predict(*args) -> None:
    assert main(["predict", "--device", "cpu", *map(str, args)]) == 0


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_predicted_seg_reads_back_to_the_nifti_labelmap(organ_model, tmp_path, orientation):
    series = tmp_path / "series"
    write_ct_series(series, orientation)
    predict("-c", organ_model, "-i", series, "-o", tmp_path / "labels.nii.gz")
    predict("-c", organ_model, "-i", series, "-o", tmp_path / "result.dcm")
    nifti = read_volume(tmp_path / "labels.nii.gz")
    assert len(np.unique(nifti.array)) == 3, "the test needs every class in the prediction"
    read = read_dicom_seg(tmp_path / "result.dcm", grid=read_volume(series))
    assert read.labelmap.same_grid(nifti)
    np.testing.assert_array_equal(read.labelmap.array, nifti.array)
    assert [label.name for label in read.labels] == ["liver", "spleen"]
    if dcmqi_converter() is not None:  # in the test extra; test_dicom_seg.py says so where it is missing
        np.testing.assert_array_equal(dcmqi_labelmap(tmp_path / "result.dcm", nifti, tmp_path / "dcmqi"), nifti.array)


def test_output_format_dicom_seg_names_the_result_after_the_series(organ_model, tmp_path):
    series = tmp_path / "abdomen"
    write_ct_series(series)
    predict("-c", organ_model, "-i", series, "-o", tmp_path / "out", "--output-format", "dicom-seg")
    dataset = pydicom.dcmread(tmp_path / "out" / "abdomen.dcm")
    assert dataset.Modality == "SEG" and dataset.SegmentationType == "BINARY"
    algorithm = dataset.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "organs.pt" in algorithm.AlgorithmParameters


def test_probabilities_named_dcm_make_a_fractional_seg(organ_model, tmp_path):
    series = tmp_path / "series"
    write_ct_series(series)
    predict("-c", organ_model, "-i", series, "-o", tmp_path / "labels.nii.gz", "--probabilities", tmp_path / "p.dcm")
    dataset = pydicom.dcmread(tmp_path / "p.dcm")
    assert dataset.SegmentationType == "FRACTIONAL" and len(dataset.SegmentSequence) == 2
    read = read_dicom_seg(tmp_path / "p.dcm", grid=read_volume(series))
    agreement = np.mean(read.labelmap.array == read_volume(tmp_path / "labels.nii.gz").array)
    assert agreement > 0.99  # the same argmax, but for voxels whose probabilities tie once stored in 8 bits


def test_seg_output_for_a_volume_file_is_refused(model_path, tmp_path):
    image = tmp_path / "ct.nii.gz"
    write_volume(read_volume(_series(tmp_path)), image)
    refused(run_cli("predict", "-c", model_path, "-i", image, "-o", tmp_path / "result.dcm"),
            "result.dcm", "not a DICOM series", ".nii.gz")
    refused(run_cli("predict", "-c", model_path, "-i", image, "-o", tmp_path / "out", "--output-format", "dicom-seg"),
            "not a DICOM series")
    assert not (tmp_path / "result.dcm").exists() and not (tmp_path / "out").exists()


def test_uncertainty_is_never_written_as_a_seg(model_path, tmp_path):
    series = _series(tmp_path)
    refused(run_cli("predict", "-c", model_path, "-i", series, "-o", tmp_path / "result.dcm", "--uncertainty",
                    tmp_path / "unsure.dcm"), "--uncertainty", "unsure.dcm", ".nii.gz")
    refused(run_cli("predict", "-c", model_path, "-i", series, "-o", tmp_path / "out", "--output-format", "dicom-seg",
                    "--uncertainty", tmp_path / "unsure"), "--uncertainty", "DICOM SEG")
    assert sorted(path.name for path in tmp_path.iterdir()) == [series.name]


def test_output_format_that_contradicts_the_output_name_is_refused(model_path, tmp_path):
    refused(run_cli("predict", "-c", model_path, "-i", _series(tmp_path), "-o", tmp_path / "labels.nii.gz",
                    "--output-format", "dicom-seg"), "--output-format dicom-seg", "labels.nii.gz")


def test_evaluate_takes_a_seg_as_reference(organ_model, tmp_path):
    series = _series(tmp_path)
    predict("-c", organ_model, "-i", series, "-o", tmp_path / "labels.nii.gz")
    predict("-c", organ_model, "-i", series, "-o", tmp_path / "result.dcm")
    result = run_cli("evaluate", "--prediction", tmp_path / "labels.nii.gz", "--reference", tmp_path / "result.dcm",
                     "--json", tmp_path / "scores.json")
    assert result.returncode == 0, result.stderr
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["mean_accuracy"] == 1.0 and set(scores["mean"]) == {"1", "2"}


def test_convert_writes_a_seg_as_a_labelmap(organ_model, tmp_path):
    series = _series(tmp_path)
    predict("-c", organ_model, "-i", series, "-o", tmp_path / "labels.nii.gz")
    predict("-c", organ_model, "-i", series, "-o", tmp_path / "result.dcm")
    result = run_cli("convert", tmp_path / "result.dcm", tmp_path / "back.nii.gz", "--grid", series)
    assert result.returncode == 0, result.stderr
    back, labels = read_volume(tmp_path / "back.nii.gz"), read_volume(tmp_path / "labels.nii.gz")
    assert back.same_grid(labels)
    np.testing.assert_array_equal(back.array, labels.array)
    assert run_cli("convert", tmp_path / "result.dcm", tmp_path / "span.nrrd").returncode == 0
    span = read_volume(tmp_path / "span.nrrd")  # only the slices the frames span
    assert np.bincount(span.array.ravel(), minlength=3)[1:].tolist() == np.bincount(labels.array.ravel())[1:].tolist()


def test_convert_grid_needs_a_seg(tmp_path):
    series = _series(tmp_path)
    refused(run_cli("convert", series, tmp_path / "x.nii.gz", "--grid", series), "--grid", "not one")


def _series(tmp_path: Path) -> Path:
    series = tmp_path / "series"
    if not series.exists():
        write_ct_series(series, "oblique")
    return series


def test_without_highdicom_predict_refuses_a_seg_output_before_any_work(model_path, tmp_path):
    series = _series(tmp_path)
    script = ("import sys; sys.modules['highdicom'] = None\n"
              "from UNet3DSegmenterLib.commands.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-c", script, "predict", "-c", str(model_path), "-i", str(series),
                             "-o", str(tmp_path / "result.dcm")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {INSTALL_HINT}", result.stderr
    assert not (tmp_path / "result.dcm").exists()
