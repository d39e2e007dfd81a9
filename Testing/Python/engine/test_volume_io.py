"""Volumes keep their exact place in the patient through every reader and writer."""

from __future__ import annotations

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.io import (
    case_name,
    list_volume_files,
    list_volumes,
    read_volume,
    write_dicom_series,
    write_volume,
)
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
    np.testing.assert_allclose(loaded.array, volume.array, atol=value_range / 2**31)


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
    with pytest.raises(UserError, match="stopped part-way.*disk is full"):
        write_volume(oblique_volume(), tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_case_names_and_listing_ignore_other_files(tmp_path):
    for name in ["b.nii.gz", "a.nrrd", "c.seg.nrrd", "notes.txt", ".hidden.nii.gz"]:
        (tmp_path / name).write_bytes(b"")
    assert [case_name(path) for path in list_volume_files(tmp_path)] == ["a", "b", "c"]


# --- DICOM series: values, geometry, tags --------------------------------------------------------

def dicom_tags(folder, *tags: str) -> list[str]:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(sorted(folder.iterdir())[0]))
    reader.ReadImageInformation()
    return [reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else "" for tag in tags]


@pytest.mark.parametrize("dtype, low, high", [(np.uint8, 0, 255), (np.uint16, 0, 65535), (np.int16, -32768, 32767),
                                              (np.int32, -2_000_000_000, 2_000_000_000)])
def test_dicom_series_keeps_integer_values_exactly(tmp_path, dtype, low, high):
    volume = oblique_volume()
    volume = volume.with_array(np.random.default_rng(3).integers(low, high, volume.shape, endpoint=True).astype(dtype))
    volume.array[0, 0, :2] = low, high
    loaded = read_volume(write_dicom_series(volume, tmp_path / "series"))
    assert np.issubdtype(loaded.array.dtype, np.integer)
    np.testing.assert_array_equal(loaded.array, volume.array)
    assert_same_geometry(loaded, volume, tolerance=1e-4)


def test_labelmap_keeps_its_label_values_through_dicom(tmp_path):
    volume = oblique_volume()
    labels = volume.with_array(np.digitize(volume.array, [90, 110]).astype(np.uint8) * 7)  # values 0, 7, 14
    loaded = read_volume(write_volume(labels, tmp_path / "labels_series"))
    assert sorted(np.unique(loaded.array)) == [0, 7, 14]
    np.testing.assert_array_equal(loaded.array, labels.array)


def test_left_handed_grid_comes_back_on_the_same_points_through_dicom(tmp_path):
    volume = oblique_volume(left_handed=True)
    loaded = read_volume(write_dicom_series(volume, tmp_path / "series"))
    # DICOM orders slices along row x column, so the k axis comes back reversed, on the same points.
    last = np.array([0, 0, volume.shape[0] - 1, 1])
    np.testing.assert_allclose(loaded.index_to_physical() @ last, volume.index_to_physical() @ [0, 0, 0, 1], atol=1e-4)
    np.testing.assert_allclose(loaded.spacing, volume.spacing, atol=1e-5)
    np.testing.assert_allclose(loaded.array[::-1], volume.array, atol=np.ptp(volume.array) / 2**31)


def test_dicom_series_files_are_named_by_instance_and_carry_readable_tags(tmp_path):
    volume = oblique_volume(dtype=np.int16)
    folder = write_dicom_series(volume, tmp_path / "ct", modality="CT", patient_name="Doe^Jane", patient_id="P7",
                                series_description="abdomen")
    assert sorted(path.name for path in folder.iterdir()) == [f"IM{k:04d}.dcm" for k in range(1, volume.shape[0] + 1)]
    sop_class, modality, name, patient, description, spacing = dicom_tags(
        folder, "0008|0016", "0008|0060", "0010|0010", "0010|0020", "0008|103e", "0028|0030")
    assert (modality, name, patient, description) == ("CT", "Doe^Jane", "P7", "abdomen")
    assert sop_class == "1.2.840.10008.5.1.4.1.1.2"  # CT image storage
    assert [float(value) for value in spacing.split("\\")] == [1.3, 0.7]  # rows (y), then columns (x)


def test_float_dicom_series_is_secondary_capture_named_after_its_folder(tmp_path):
    folder = write_dicom_series(oblique_volume(), tmp_path / "knee_07", modality="MR")
    assert dicom_tags(folder, "0008|0016", "0010|0010", "0028|0100") == ["1.2.840.10008.5.1.4.1.1.7", "knee_07", "32"]


def test_write_volume_to_a_folder_path_writes_a_dicom_series(tmp_path):
    volume = oblique_volume(dtype=np.int16)
    folder = write_volume(volume, tmp_path / "series.1.2")
    assert folder.is_dir() and len(list(folder.iterdir())) == volume.shape[0]
    np.testing.assert_array_equal(read_volume(folder).array, volume.array)


@pytest.mark.parametrize("name", ["picture.png", "slices.dcm"])
def test_write_volume_refuses_an_unknown_file_extension(tmp_path, name):
    with pytest.raises(UserError, match="folder name without an extension"):
        write_volume(oblique_volume(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_dicom_series_is_not_written_over_an_existing_folder_nor_left_half_written(tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        write_dicom_series(oblique_volume(), tmp_path / "taken")
    with pytest.raises(UserError, match="one channel"):
        write_dicom_series(Volume(np.zeros((2, 4, 5, 6), np.float32)), tmp_path / "two")
    nan = oblique_volume()
    nan.array[1, 1, 1] = np.nan
    with pytest.raises(UserError, match="NaN"):
        write_dicom_series(nan, tmp_path / "nan")
    assert [path.name for path in tmp_path.iterdir()] == ["taken"]


@pytest.mark.parametrize("damage", ["remove", "truncate"])
def test_dicom_series_with_a_missing_middle_slice_is_refused(tmp_path, damage):
    volume = oblique_volume(dtype=np.int16)
    folder = write_dicom_series(volume, tmp_path / "series")
    middle = folder / "IM0004.dcm"
    if damage == "remove":
        middle.unlink()
    else:  # a half-copied file: GDCM leaves it out of the series
        middle.write_bytes(middle.read_bytes()[:400])
    with pytest.raises(UserError, match="unevenly spaced slices .* a slice file is missing or unreadable"):
        read_volume(folder)


def test_series_folder_in_subfolders_points_to_dicom_sort(tmp_path):
    write_dicom_series(oblique_volume(dtype=np.int16), tmp_path / "export" / "deep")
    with pytest.raises(UserError, match="dicom-sort"):
        read_volume(tmp_path / "export")


def test_list_volumes_holds_files_and_dicom_series_folders(tmp_path):
    write_volume(oblique_volume(), tmp_path / "b.nii.gz")
    write_dicom_series(oblique_volume(dtype=np.int16), tmp_path / "a")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a series")
    assert [path.name for path in list_volumes(tmp_path)] == ["a", "b.nii.gz"]


# --- NumPy arrays ----------------------------------------------------------------------------------

def test_npy_is_read_in_engine_order_on_an_identity_grid(tmp_path):
    array = np.random.default_rng(4).normal(size=(5, 6, 7)).astype(np.float32)
    np.save(tmp_path / "case.npy", array)
    volume = read_volume(tmp_path / "case.npy")
    np.testing.assert_array_equal(volume.array, array)
    assert volume.shape == (5, 6, 7)
    assert volume.spacing == (1.0, 1.0, 1.0) and volume.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(volume.direction, np.eye(3))
    assert read_volume(tmp_path / "case.npy", spacing=(0.5, 0.6, 2.0)).spacing == (0.5, 0.6, 2.0)


def test_npy_spacing_does_not_change_a_file_that_records_its_own(tmp_path):
    path = write_volume(oblique_volume(), tmp_path / "case.nrrd")
    assert read_volume(path, spacing=(9.0, 9.0, 9.0)).spacing == pytest.approx((0.7, 1.3, 3.1))


def test_npy_channels_and_booleans(tmp_path):
    np.save(tmp_path / "two.npy", np.zeros((2, 4, 5, 6), np.float64))
    np.save(tmp_path / "mask.npy", np.ones((4, 5, 6), bool))
    assert read_volume(tmp_path / "two.npy").channels == 2
    mask = read_volume(tmp_path / "mask.npy")
    assert mask.array.dtype == np.uint8 and mask.array.min() == 1


@pytest.mark.parametrize("array, message", [
    (np.zeros((5, 6)), "3D volume"), (np.zeros((1, 5, 6)), "3D volume"), (np.array(["a", "b"]), "numbers"),
    (np.full((3, 4, 5), np.nan), "NaN"),
])
def test_npy_that_is_no_volume_is_refused(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(UserError, match=message):
        read_volume(tmp_path / "bad.npy")


def test_truncated_npy_is_a_user_error(tmp_path):
    np.save(tmp_path / "case.npy", np.zeros((10, 10, 10), np.float32))
    data = (tmp_path / "case.npy").read_bytes()
    (tmp_path / "case.npy").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read .*case.npy"):
        read_volume(tmp_path / "case.npy")


def test_npy_written_holds_the_array_and_reads_back_with_a_given_spacing(tmp_path):
    volume = oblique_volume(dtype=np.int16)
    path = write_volume(volume, tmp_path / "case.npy")
    np.testing.assert_array_equal(np.load(path), volume.array)
    assert read_volume(path, spacing=volume.spacing).spacing == volume.spacing
    assert [p.name for p in tmp_path.iterdir()] == ["case.npy"]
