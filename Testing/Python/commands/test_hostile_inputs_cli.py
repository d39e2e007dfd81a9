"""Careless and hostile input files through the real CLI: one line naming the file and the problem, exit 2,
nothing written; and a folder that an interrupted run left behind is cleaned on the next run."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import SimpleITK as sitk
from cli_runs import refused, run_cli

from UNet3DSegmenterLib.io import write_volume
from UNet3DSegmenterLib.volume import Volume

SHAPE = (10, 12, 14)


def image_array(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 10, SHAPE).astype(np.float32)


def labels_array() -> np.ndarray:
    labels = np.zeros(SHAPE, np.uint8)
    labels[3:7, 4:9, 4:10] = 1
    return labels


def test_nifti_with_zero_voxel_size_is_refused(tmp_path):
    """ITK reads pixdim 0 as 1 mm without a word: the grid would be invented."""
    path = write_volume(Volume(image_array()), tmp_path / "flat.nii")
    data = bytearray(path.read_bytes())
    data[80:84] = struct.pack("<f", 0.0)
    path.write_bytes(bytes(data))
    refused(run_cli("convert", path, tmp_path / "out.nrrd"), "flat.nii", "voxel size of (0.0, 1.0, 1.0)")
    assert not (tmp_path / "out.nrrd").exists()


@pytest.mark.parametrize("name", ["zero.nii", "zero.nrrd", "zero.npy"])
def test_a_device_under_a_volume_name_is_refused(tmp_path, name):
    (tmp_path / name).symlink_to("/dev/zero")
    refused(run_cli("convert", tmp_path / name, tmp_path / "out.nii.gz"), name, "not a regular file")


def test_skewed_grid_is_refused(tmp_path):
    image = sitk.GetImageFromArray(image_array())
    image.SetDirection((1, 0.3, 0, 0, 1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "skewed.nrrd"))
    refused(run_cli("convert", tmp_path / "skewed.nrrd", tmp_path / "out.nii.gz"), "skewed.nrrd", "skewed grid")


def test_float64_values_beyond_float32_are_refused_before_they_become_nan(model_path, tmp_path):
    huge = (np.random.default_rng(0).random(SHAPE) * 2 - 1) * 1e308
    sitk.WriteImage(sitk.GetImageFromArray(huge), str(tmp_path / "huge.nrrd"))
    refused(run_cli("predict", "-c", model_path, "-i", tmp_path / "huge.nrrd", "-o", tmp_path / "seg.nii.gz"),
            "huge.nrrd", "values as large as")
    assert not (tmp_path / "seg.nii.gz").exists()


@pytest.mark.parametrize("options, message", [
    (["--batch-size", "0"], "batch size must be at least 1"),
    (["--batch-size", "-1"], "batch size must be at least 1"),
    (["--overlap", "nan"], "overlap must be"),
    (["--input-spacing", "nan", "1", "1"], "--input-spacing must be three positive numbers"),
    (["--input-spacing", "0", "1", "1"], "--input-spacing must be three positive numbers"),
])
def test_predict_options_out_of_range_are_refused(model_path, tmp_path, options, message):
    np.save(tmp_path / "array.npy", image_array())
    refused(run_cli("predict", "-c", model_path, "-i", tmp_path / "array.npy", "-o", tmp_path / "seg.nii.gz",
                    *options), message)
    assert not (tmp_path / "seg.nii.gz").exists()


def test_evaluate_refuses_an_image_given_as_the_prediction(tmp_path):
    ct = np.random.default_rng(0).integers(0, 3000, SHAPE).astype(np.int16)
    write_volume(Volume(ct), tmp_path / "ct.nii.gz")
    write_volume(Volume(labels_array()), tmp_path / "reference.nii.gz")
    refused(run_cli("evaluate", "--prediction", tmp_path / "ct.nii.gz", "--reference", tmp_path / "reference.nii.gz"),
            "ct.nii.gz", "different values", "looks like an image")
    write_volume(Volume(ct - 1000), tmp_path / "hounsfield.nii.gz")
    refused(run_cli("evaluate", "--prediction", tmp_path / "hounsfield.nii.gz", "--reference",
                    tmp_path / "reference.nii.gz"), "hounsfield.nii.gz", "negative values")


def test_a_labelmap_3_mm_off_is_refused_showing_both_origins(tmp_path):
    write_volume(Volume(labels_array(), origin=(10.0, 20.0, 30.0)), tmp_path / "reference.nii.gz")
    write_volume(Volume(labels_array(), origin=(13.0, 20.0, 30.0)), tmp_path / "prediction.nii.gz")
    line = refused(run_cli("evaluate", "--prediction", tmp_path / "prediction.nii.gz", "--reference",
                           tmp_path / "reference.nii.gz"), "different voxel grids")
    assert "origin (13, 20, 30)" in line and "origin (10, 20, 30)" in line


def test_training_labelmap_3_mm_off_names_both_origins(tmp_path):
    from UNet3DSegmenterLib.datalist import load_case, load_datalist
    from UNet3DSegmenterLib.errors import UserError

    write_volume(Volume(image_array(), origin=(10.0, 20.0, 30.0)), tmp_path / "images" / "a.nii.gz")
    write_volume(Volume(labels_array(), origin=(10.0, 23.0, 30.0)), tmp_path / "labels" / "a.nii.gz")
    with pytest.raises(UserError, match=r"origin \(10, 20, 30\).*origin \(10, 23, 30\)"):
        load_case(load_datalist(tmp_path).cases[0])


def test_a_folder_predict_clears_what_a_killed_run_left(model_path, tmp_path):
    """A process killed with SIGKILL cleans nothing: its hidden temporary files stay until the next run."""
    for name in ("a", "b"):
        write_volume(Volume(image_array()), tmp_path / "in" / f"{name}.nrrd")
    output = tmp_path / "out"
    output.mkdir()
    leftovers = [output / ".a.nrrd.0123abcd.partial.nrrd", output / ".b.nrrd.89abcdef.partial.nrrd"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    (output / ".notes").write_text("the user's own")
    result = run_cli("predict", "-c", model_path, "-i", tmp_path / "in", "-o", output)
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in output.iterdir()) == [".notes", "a.nrrd", "b.nrrd"]


def test_convert_to_dicom_clears_the_staging_folder_a_killed_run_left(tmp_path):
    image = write_volume(Volume(image_array().astype(np.int16)), tmp_path / "image.nrrd")
    stale = tmp_path / ".series.partial-k1ll3d00"
    stale.mkdir()
    (stale / "IM0001.dcm").write_bytes(b"half a slice")
    result = run_cli("convert", image, tmp_path / "series")
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["image.nrrd", "series"]
