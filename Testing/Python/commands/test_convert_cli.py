"""`unet3d-segmenter convert`: any volume to any other, geometry and values kept; mistakes in one line."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.io import read_volume, write_dicom_series, write_volume
from UNet3DSegmenterLib.volume import Volume


def rotation(degrees: float) -> np.ndarray:
    angle = np.radians(degrees)
    return np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]) @ \
        np.array([[1, 0, 0], [0, np.cos(angle / 2), -np.sin(angle / 2)], [0, np.sin(angle / 2), np.cos(angle / 2)]])


def ct_volume(dtype=np.float32) -> Volume:
    """Oblique, anisotropic, with values like a CT in HU."""
    array = np.random.default_rng(0).normal(0, 300, (9, 14, 16)).astype(dtype)
    return Volume(array, spacing=(0.75, 0.9, 2.5), origin=(-120.5, 33.0, 410.25), direction=rotation(20))


def labelmap() -> Volume:
    volume = ct_volume()
    return volume.with_array(np.digitize(volume.array, [-200, 0, 300]).astype(np.uint8))  # labels 0..3


def convert(*args) -> int:
    return main(["convert", *map(str, args)])


def assert_one_line_error(capsys, code: int, *fragments: str) -> None:
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize("middle", ["series", "case.nrrd", "case.mha", "case.nii", "case.seg.nrrd"])
def test_labelmap_round_trips_through_every_format(tmp_path, middle):
    source = write_volume(labelmap(), tmp_path / "labels.nii.gz")
    assert convert(source, tmp_path / middle) == 0
    assert convert(tmp_path / middle, tmp_path / "back.nii.gz") == 0
    original, back = read_volume(source), read_volume(tmp_path / "back.nii.gz")
    assert back.same_grid(original, tolerance=1e-4)
    assert np.issubdtype(back.array.dtype, np.integer)
    np.testing.assert_array_equal(back.array, original.array)


def test_float_ct_goes_to_dicom_and_back_on_its_grid(tmp_path):
    volume = ct_volume()
    source = write_volume(volume, tmp_path / "ct.nrrd")
    assert convert(source, tmp_path / "ct_dicom", "--modality", "CT") == 0
    assert convert(tmp_path / "ct_dicom", tmp_path / "ct.nii.gz") == 0
    back = read_volume(tmp_path / "ct.nii.gz")
    assert back.same_grid(volume, tolerance=1e-4)
    np.testing.assert_allclose(back.array, volume.array, atol=np.ptp(volume.array) / 2**31)


def test_dicom_tags_come_from_the_options_or_the_input_name(tmp_path):
    source = write_volume(ct_volume(np.int16), tmp_path / "abdomen.nii.gz")
    assert convert(source, tmp_path / "default") == 0
    assert convert(source, tmp_path / "named", "--modality", "MR", "--patient-name", "Doe^Jane",
                   "--patient-id", "P7", "--series-description", "T2 axial") == 0

    def tags(folder):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(folder / "IM0001.dcm"))
        reader.ReadImageInformation()
        return [reader.GetMetaData(tag).strip() for tag in ("0008|0060", "0010|0010", "0010|0020", "0008|103e")]

    assert tags(tmp_path / "default") == ["OT", "abdomen", "abdomen", "abdomen"]
    assert tags(tmp_path / "named") == ["MR", "Doe^Jane", "P7", "T2 axial"]


def test_dicom_series_folder_converts_to_a_file(tmp_path):
    volume = ct_volume(np.int16)
    write_dicom_series(volume, tmp_path / "series")
    assert convert(tmp_path / "series", tmp_path / "out.mha") == 0
    back = read_volume(tmp_path / "out.mha")
    assert back.same_grid(volume, tolerance=1e-4) and back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, volume.array)


def test_npy_takes_the_spacing_given_and_keeps_its_array(tmp_path, capsys):
    array = np.random.default_rng(1).random((6, 7, 8)).astype(np.float32)
    np.save(tmp_path / "case.npy", array)
    assert convert(tmp_path / "case.npy", tmp_path / "case.nii.gz", "--input-spacing", "0.8", "0.9", "2.5") == 0
    volume = read_volume(tmp_path / "case.nii.gz")
    assert volume.spacing == pytest.approx((0.8, 0.9, 2.5)) and volume.origin == (0, 0, 0)
    np.testing.assert_array_equal(volume.array, array)
    capsys.readouterr()
    assert convert(tmp_path / "case.nii.gz", tmp_path / "again.npy") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), array)
    assert "holds the array only" in capsys.readouterr().err


def test_truncated_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    path = write_volume(ct_volume(), tmp_path / "ct.nii.gz")
    path.write_bytes(path.read_bytes()[:-500])
    assert_one_line_error(capsys, convert(path, tmp_path / "out.nrrd"), "ct.nii.gz is truncated or corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_mistakes_are_one_line(tmp_path, capsys):
    source = write_volume(ct_volume(), tmp_path / "ct.nii.gz")
    assert_one_line_error(capsys, convert(source, tmp_path / "o.nrrd", "--input-spacing", "1", "1", "2"),
                          "--input-spacing", "records its own")
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 5)))
    assert_one_line_error(capsys, convert(tmp_path / "a.npy", tmp_path / "o.nrrd", "--input-spacing", "1", "0", "2"),
                          "three positive numbers")
    assert_one_line_error(capsys, convert(source, tmp_path / "o.nrrd", "--modality", "CT"),
                          "--modality is for DICOM output")
    assert_one_line_error(capsys, convert(source, tmp_path / "o.png"), "o.png", "extension")
    (tmp_path / "taken").mkdir()
    assert_one_line_error(capsys, convert(source, tmp_path / "taken"), "already exists")
    write_volume(Volume(np.zeros((2, 4, 5, 6), np.float32)), tmp_path / "two.nrrd")
    assert_one_line_error(capsys, convert(tmp_path / "two.nrrd", tmp_path / "two_series"), "one channel")
    assert_one_line_error(capsys, convert(tmp_path / "absent.nii.gz", tmp_path / "o.nrrd"), "not found")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "ct.nii.gz", "taken", "two.nrrd"]
