"""`unet3d-segmenter dicom-sort`: the report a person reads, and mistakes in one line."""

from __future__ import annotations

import numpy as np

from UNet3DSegmenterLib.commands.cli import main
from UNet3DSegmenterLib.io import read_volume, write_dicom_series
from UNet3DSegmenterLib.volume import Volume


def scanner_export(folder):
    """Two series of two patients in one folder, under names that say nothing, and a stray file."""
    for index, (name, patient_id) in enumerate([("Doe^Jane", "P1"), ("Roe^Richard", "P2")]):
        volume = Volume(np.full((3, 4, 5), index, np.int16), (0.5, 0.5, 2.0))
        series = write_dicom_series(volume, folder / f"tmp{index}", modality="CT", patient_name=name,
                                    patient_id=patient_id, series_description="chest")
        for path in series.iterdir():
            path.rename(folder / f"{index}_{path.stem}")
        series.rmdir()
    (folder / "index.html").write_text("<html></html>")


def test_sort_prints_what_it_found_and_did(tmp_path, capsys):
    scanner_export(tmp_path / "export")
    assert main(["dicom-sort", str(tmp_path / "export"), str(tmp_path / "sorted")]) == 0
    out = capsys.readouterr().out
    assert "found 2 patients, 2 studies, 2 series, 6 image files" in out
    assert "skipped 1 file, not DICOM: index.html" in out
    assert f"copied 6 files into {tmp_path / 'sorted'}" in out
    (jane,) = (tmp_path / "sorted" / "Doe_Jane_P1").glob("*/001_chest")
    assert read_volume(jane).array.max() == 0 and len(list((tmp_path / "export").iterdir())) == 7


def test_dry_run_and_move(tmp_path, capsys):
    scanner_export(tmp_path / "export")
    assert main(["dicom-sort", str(tmp_path / "export"), str(tmp_path / "sorted"), "--dry-run"]) == 0
    assert "would copy 6 files" in capsys.readouterr().out and not (tmp_path / "sorted").exists()
    assert main(["dicom-sort", str(tmp_path / "export"), str(tmp_path / "sorted"), "--move"]) == 0
    assert "moved 6 files" in capsys.readouterr().out
    assert [path.name for path in (tmp_path / "export").iterdir()] == ["index.html"]


def test_folder_without_dicom_is_one_line(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"\xff\xd8\xff")
    assert main(["dicom-sort", str(tmp_path / "photos"), str(tmp_path / "sorted")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: found no DICOM image in {tmp_path / 'photos'} (1 file looked at): check the folder"]


def retag(path, tags: dict[str, str]) -> None:
    """Rewrite one DICOM file with some of its tags replaced, as a careless or hostile exporter might."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOn()
    image = reader.Execute()
    for key in reader.GetMetaDataKeys():
        image.SetMetaData(key, reader.GetMetaData(key))
    for key, value in tags.items():
        image.SetMetaData(key, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(image)


def test_hostile_tags_never_place_files_outside_the_output(tmp_path, capsys):
    """Names from tags become file names only once made safe; an instance number of inf is no number."""
    series = write_dicom_series(Volume(np.zeros((3, 4, 5), np.int16)), tmp_path / "export" / "series", modality="CT")
    files = sorted(series.iterdir())
    retag(files[0], {"0010|0010": "../../../escaped", "0010|0020": "/tmp/absolute", "0008|103e": "..",
                     "0020|0013": "inf"})
    for path in files[1:]:
        retag(path, {"0010|0010": "../../../escaped", "0010|0020": "/tmp/absolute", "0008|103e": "..",
                     "0020|0013": "nan" if path == files[1] else "1e30"})
    assert main(["dicom-sort", str(tmp_path / "export"), str(tmp_path / "sorted")]) == 0, capsys.readouterr().err
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert len([path for path in written if path.is_relative_to(tmp_path / "sorted")]) == 3
    assert len(written) == 6  # the three inputs and their three copies, nothing elsewhere
    assert all(".." not in path.parts and not path.name.startswith(".") for path in written)


def test_a_named_pipe_among_the_files_is_skipped_not_waited_on(tmp_path):
    import os
    import subprocess
    import sys

    scanner_export(tmp_path / "export")
    os.mkfifo(tmp_path / "export" / "pipe")
    result = subprocess.run([sys.executable, "-m", "UNet3DSegmenterLib", "dicom-sort", str(tmp_path / "export"),
                             str(tmp_path / "sorted")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "copied 6 files" in result.stdout and "pipe" in result.stdout
