"""Sorting a tree of mixed DICOM files into one readable folder per patient, study and series."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from UNet3DSegmenterLib.dicom import read_dicom_header, sort_dicom
from UNet3DSegmenterLib.errors import UserError
from UNet3DSegmenterLib.io import read_volume, write_dicom_series
from UNet3DSegmenterLib.volume import Volume

_UIDS = iter(range(1000, 100000))


def uid() -> str:
    return f"1.2.826.0.1.3680043.10.999.{next(_UIDS)}"


def write_series(paths: list[Path], patient: tuple[str, str], study: tuple[str, str, str],
                 series: tuple[str, str, str], first_value: int = 0, instances: list[int] | None = None) -> np.ndarray:
    """One slice per path, written by GDCM with the tags given; returns the volume's array (z, y, x)."""
    series_uid = uid()
    array = (np.arange(len(paths) * 4 * 5).reshape(len(paths), 4, 5) + first_value).astype(np.int16)
    for k, path in enumerate(paths):
        image = sitk.GetImageFromArray(array[k])
        image.SetSpacing((0.5, 0.5))
        tags = {"0010|0010": patient[0], "0010|0020": patient[1], "0020|000d": study[0], "0008|0020": study[1],
                "0008|1030": study[2], "0020|000e": series_uid, "0020|0011": series[0], "0008|103e": series[1],
                "0008|0060": series[2], "0020|0013": str((instances or list(range(1, len(paths) + 1)))[k]),
                "0008|0018": uid(), "0020|0032": f"0\\0\\{2.5 * k}", "0020|0037": "1\\0\\0\\0\\1\\0"}
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetImageIO("GDCMImageIO")  # the file names have no .dcm
        writer.SetFileName(str(path))
        writer.Execute(image)
    return array


@pytest.fixture
def export(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """An archive export: two patients, three studies, four series, scattered over folders with names that
    say nothing and clash, plus files that are not DICOM and a second copy of one image."""
    root = tmp_path / "export"
    jane, richard = ("Doe^Jane", "P1"), ("Roe^Richard", "P2")
    first, second = (uid(), "20240131", "CT abdomen"), (uid(), "20240301", "CT abdomen")
    knee = (uid(), "20230505", "MR knee/left")
    arrays = {
        "Doe_Jane_P1/20240131_CT_abdomen/002_arterial": write_series(
            [root / "a" / f"IMG{k}" for k in range(4)], jane, first, ("2", "arterial", "CT"), 0),
        "Doe_Jane_P1/20240131_CT_abdomen/003_venous": write_series(
            [root / "b" / f"IMG{k}" for k in range(4)], jane, first, ("3", "venous", "CT"), 100),
        "Doe_Jane_P1/20240301_CT_abdomen/002_arterial": write_series(
            [root / "a" / "x" / f"IMG{k}" for k in range(3)], jane, second, ("2", "arterial", "CT"), 200),
        "Roe_Richard_P2/20230505_MR_knee_left/001_T1_sag": write_series(
            [root / "b" / f"1.3.{k}" for k in range(3)], richard, knee, ("1", "T1 (sag)", "MR"), 300),
    }
    (root / "notes.txt").write_text("scanned on Tuesday")
    (root / "a" / "scan.nii.gz").write_bytes(b"\x1f\x8b not DICOM")
    (root / "b" / "DICM.txt").write_bytes(b"DICM" + bytes(200))  # the marker, but not after the preamble
    (root / "b" / "broken.dcm").write_bytes(bytes(128) + b"DICM" + b"\xff" * 64)  # DICOM, but no image in it
    shutil.copy(root / "a" / "IMG0", root / "copy_of_IMG0")
    return root, arrays


def tree(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_mixed_export_is_sorted_into_readable_series_folders(export, tmp_path):
    source, arrays = export
    before = tree(source)
    report = sort_dicom(source, tmp_path / "sorted")
    assert (report.patients, report.studies, len(report.series), report.images) == (2, 3, 4, 14)
    assert sorted(str(series.folder) for series in report.series) == sorted(arrays)
    for folder, array in arrays.items():
        files = sorted(path.name for path in (tmp_path / "sorted" / folder).iterdir())
        assert files == [f"IM{k:04d}.dcm" for k in range(1, len(array) + 1)]
        volume = read_volume(tmp_path / "sorted" / folder)
        np.testing.assert_array_equal(volume.array, array)
        assert volume.spacing == pytest.approx((0.5, 0.5, 2.5))
    assert tree(source) == before  # copied, nothing moved or changed


def test_files_that_are_not_dicom_images_and_second_copies_are_skipped_and_reported(export, tmp_path):
    source, _ = export
    report = sort_dicom(source, tmp_path / "sorted")
    assert sorted(path.name for path in report.not_dicom) == ["DICM.txt", "notes.txt", "scan.nii.gz"]
    assert [path.name for path in report.without_image] == ["broken.dcm"]
    assert [path.name for path in report.duplicates] == ["copy_of_IMG0"]  # the first in name order is sorted
    assert report.written == 14
    summary = "\n".join(report.summary())
    assert "found 2 patients, 3 studies, 4 series, 14 image files" in summary
    assert "skipped 3 files, not DICOM: " in summary and "notes.txt" in summary
    assert "skipped 1 file, DICOM without an image (DICOMDIR, report, structure set, ...): b/broken.dcm" in summary
    assert "Roe_Richard_P2/20230505_MR_knee_left/001_T1_sag      3 files  MR" in summary
    assert f"copied 14 files into {tmp_path / 'sorted'}" in summary


def test_move_empties_the_source_of_its_images_only(export, tmp_path):
    source, arrays = export
    report = sort_dicom(source, tmp_path / "sorted", move=True)
    assert report.action == "moved" and report.written == 14
    left = sorted(str(path.relative_to(source)) for path in source.rglob("*") if path.is_file())
    assert left == ["a/scan.nii.gz", "b/DICM.txt", "b/broken.dcm", "copy_of_IMG0", "notes.txt"]  # the second copy stays
    for folder, array in arrays.items():
        np.testing.assert_array_equal(read_volume(tmp_path / "sorted" / folder).array, array)


def test_sorting_again_adds_only_new_files(export, tmp_path):
    source, _ = export
    sort_dicom(source, tmp_path / "sorted")
    write_series([source / "late" / "new1"], ("Doe^Jane", "P1"), (uid(), "20250101", ""), ("9", "", "CT"))
    report = sort_dicom(source, tmp_path / "sorted")
    assert (report.written, report.already_there) == (1, 14)
    assert (tmp_path / "sorted" / "Doe_Jane_P1" / "20250101" / "009_CT" / "IM0001.dcm").is_file()


def test_dry_run_writes_nothing(export, tmp_path):
    source, _ = export
    report = sort_dicom(source, tmp_path / "sorted", dry_run=True)
    assert report.action == "would copy" and report.written == 14 and len(report.series) == 4
    assert not (tmp_path / "sorted").exists()


def test_output_inside_the_input_is_not_sorted_again(export):
    source, _ = export
    sort_dicom(source, source / "sorted")
    report = sort_dicom(source, source / "sorted")
    assert report.images == 14 and report.already_there == 14 and report.written == 0


def test_series_that_would_share_a_name_get_numbered_folders(tmp_path):
    patient, study = ("Doe^Jane", "P1"), (uid(), "20240131", "CT")
    write_series([tmp_path / "in" / f"a{k}" for k in range(2)], patient, study, ("2", "arterial", "CT"))
    write_series([tmp_path / "in" / f"b{k}" for k in range(2)], patient, study, ("2", "arterial", "CT"))
    report = sort_dicom(tmp_path / "in", tmp_path / "out")
    assert sorted(series.folder.name for series in report.series) == ["002_arterial", "002_arterial-2"]


def test_repeated_instance_numbers_keep_every_image(tmp_path):
    write_series([tmp_path / "in" / f"s{k}" for k in range(3)], ("A", "1"), (uid(), "20240101", ""),
                 ("1", "scout", "CT"), instances=[1, 1, 2])
    sort_dicom(tmp_path / "in", tmp_path / "out")
    assert sorted(path.name for path in (tmp_path / "out" / "A_1" / "20240101" / "001_scout").iterdir()) == \
        ["IM0001.dcm", "IM0001_2.dcm", "IM0002.dcm"]


def test_patient_without_name_or_id_and_unicode_names(tmp_path):
    write_series([tmp_path / "in" / "x"], ("", ""), (uid(), "", ""), ("", "", "OT"))
    write_series([tmp_path / "in" / "y"], ("Müller^Jürgen", "Q/7"), (uid(), "20240101", ""), ("4", "", "MR"))
    report = sort_dicom(tmp_path / "in", tmp_path / "out")
    assert sorted(str(series.folder) for series in report.series) == [
        "Müller_Jürgen_Q_7/20240101/004_MR", "unknown_patient/study/OT"]


def test_series_written_by_the_engine_is_sorted_by_its_tags(tmp_path):
    volume = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), (0.8, 0.8, 3.0))
    write_dicom_series(volume, tmp_path / "in" / "ct", modality="CT", patient_name="Doe^Jane", patient_id="P1",
                       series_description="converted")
    header = read_dicom_header(tmp_path / "in" / "ct" / "IM0001.dcm")
    assert header is not None and (header.patient_name, header.modality, header.instance) == ("Doe^Jane", "CT", 1)
    report = sort_dicom(tmp_path / "in", tmp_path / "out")
    folder = tmp_path / "out" / report.series[0].folder
    assert folder.parent.parent.name == "Doe_Jane_P1" and folder.name == "001_converted"
    np.testing.assert_array_equal(read_volume(folder).array, volume.array)


def test_refused_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match="found no DICOM image in .*1 file looked at"):
        sort_dicom(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(UserError, match="is the input folder"):
        sort_dicom(tmp_path / "empty", tmp_path / "empty")
    with pytest.raises(UserError, match="is not a folder"):
        sort_dicom(tmp_path / "absent", tmp_path / "out")
    assert not (tmp_path / "out").exists()
