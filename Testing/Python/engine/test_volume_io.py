"""Volumes keep their exact place in the patient through every reader and writer."""

from __future__ import annotations

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.io import case_name, list_volume_files, read_volume, write_dicom_series, write_volume
from UNet3DSegmenterLib.volume import Volume


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    angle = np.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def oblique_volume(left_handed: bool = False, dtype=np.float32) -> Volume:
    generator = np.random.default_rng(0)
    direction = rotation(np.array([1.0, 2.0, 3.0]), 27.0)
    if left_handed:
        direction[:, 2] *= -1
    array = generator.normal(100, 20, size=(7, 9, 11)).astype(dtype)
    return Volume(array, spacing=(0.7, 1.3, 3.1), origin=(-12.5, 40.25, 7.0), direction=direction)


def assert_same_geometry(actual: Volume, expected: Volume, tolerance: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.spacing, expected.spacing, atol=tolerance)
    np.testing.assert_allclose(actual.origin, expected.origin, atol=tolerance)
    np.testing.assert_allclose(actual.direction, expected.direction, atol=tolerance)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("left_handed", [False, True])
def test_file_formats_round_trip_oblique_anisotropic_geometry(tmp_path, suffix, left_handed):
    volume = oblique_volume(left_handed)
    path = write_volume(volume, tmp_path / f"case{suffix}")
    loaded = read_volume(path)
    assert_same_geometry(loaded, volume)
    np.testing.assert_array_equal(loaded.array, volume.array)


def test_nifti_geometry_agrees_with_nibabel(tmp_path):
    volume = oblique_volume()
    path = write_volume(volume, tmp_path / "case.nii.gz")
    image = nibabel.load(path)
    # nibabel speaks RAS with (i, j, k) = (x, y, z) array order: flip LPS to RAS and compare the affine.
    np.testing.assert_allclose(image.affine, volume.ijk_to_ras(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(image.dataobj).transpose(2, 1, 0), volume.array, atol=1e-5)


def test_real_nifti_geometry_agrees_with_nibabel(shared_dataset):
    path = sorted((shared_dataset("pyradiomics_brain_tumor") / "images").glob("*.nii.gz"))[0]
    volume = read_volume(path)
    image = nibabel.load(path)
    np.testing.assert_allclose(volume.ijk_to_ras(), image.affine, atol=1e-4)
    assert volume.shape == image.shape[::-1]


def test_ijk_to_ras_round_trips_left_handed_matrices():
    volume = oblique_volume(left_handed=True)
    rebuilt = Volume.from_ijk_to_ras(volume.array, volume.ijk_to_ras())
    assert_same_geometry(rebuilt, volume, tolerance=1e-9)
    assert np.linalg.det(volume.ijk_to_ras()[:3, :3]) < 0


def test_dicom_series_round_trips_geometry_and_values(tmp_path):
    volume = oblique_volume(dtype=np.int16)
    volume.array[...] = np.arange(volume.array.size).reshape(volume.shape) % 2000 - 1000
    folder = write_dicom_series(volume, tmp_path / "series")
    assert len(list(folder.iterdir())) == volume.shape[0]
    loaded = read_volume(folder)
    assert_same_geometry(loaded, volume, tolerance=1e-4)
    np.testing.assert_array_equal(loaded.array, volume.array)


def test_dicom_series_keeps_float_values_through_rescale(tmp_path):
    volume = oblique_volume()
    loaded = read_volume(write_dicom_series(volume, tmp_path / "series"))
    value_range = volume.array.max() - volume.array.min()
    np.testing.assert_allclose(loaded.array, volume.array, atol=value_range / 20000)


def test_multicomponent_image_reads_channels_first(tmp_path):
    array = np.random.default_rng(1).random((5, 6, 7, 2)).astype(np.float32)
    image = sitk.GetImageFromArray(array, isVector=True)
    image.SetSpacing((1.0, 2.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "two.nrrd"))
    volume = read_volume(tmp_path / "two.nrrd")
    assert volume.channels == 2 and volume.shape == (5, 6, 7)
    np.testing.assert_array_equal(volume.array[1], array[..., 1])


def test_4d_nifti_reads_each_frame_as_a_channel(tmp_path):
    data = np.random.default_rng(2).random((7, 6, 5, 3)).astype(np.float32)  # x, y, z, t
    nibabel.save(nibabel.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "four.nii.gz")
    volume = read_volume(tmp_path / "four.nii.gz")
    assert volume.channels == 3 and volume.shape == (5, 6, 7)
    np.testing.assert_allclose(volume.array[2], data[..., 2].transpose(2, 1, 0))


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_volume(tmp_path / "absent.nii.gz")


def test_corrupt_file_is_a_user_error(tmp_path):
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(b"this is not an image at all")
    with pytest.raises(UserError, match="cannot read"):
        read_volume(path)


def test_2d_image_is_refused(tmp_path):
    sitk.WriteImage(sitk.Image(10, 12, sitk.sitkFloat32), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(UserError, match="3D volume is needed"):
        read_volume(tmp_path / "flat.nii.gz")


def test_nan_values_are_refused(tmp_path):
    volume = oblique_volume()
    volume.array[1, 2, 3] = np.nan
    write_volume(volume, tmp_path / "nan.nrrd")
    with pytest.raises(UserError, match="NaN"):
        read_volume(tmp_path / "nan.nrrd")


def test_folder_without_images_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no DICOM series"):
        read_volume(tmp_path)


def test_write_leaves_no_partial_file_when_it_fails(tmp_path, monkeypatch):
    def failing_write(*args, **kwargs):
        open(args[1], "wb").write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", failing_write)
    with pytest.raises(UserError, match="disk full"):
        write_volume(oblique_volume(), tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_case_names_and_listing_ignore_other_files(tmp_path):
    for name in ["b.nii.gz", "a.nrrd", "c.seg.nrrd", "notes.txt", ".hidden.nii.gz"]:
        (tmp_path / name).write_bytes(b"")
    assert [case_name(path) for path in list_volume_files(tmp_path)] == ["a", "b", "c"]
