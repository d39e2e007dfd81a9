"""DICOM series of several orientations written to disk for the DICOM SEG tests, and dcmqi as an independent
reader of DICOM SEG files."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from UNet3DSegmenterLib.io import read_volume, to_sitk, write_dicom_series
from UNet3DSegmenterLib.volume import Volume

ORIENTATIONS = ("axial", "oblique", "left-handed", "shuffled-files")


def _direction(orientation: str) -> np.ndarray:
    if orientation == "oblique":  # tilted about two axes
        first, second = np.radians(25), np.radians(-15)
        about_z = np.array([[np.cos(first), -np.sin(first), 0], [np.sin(first), np.cos(first), 0], [0, 0, 1]])
        about_x = np.array([[1, 0, 0], [0, np.cos(second), -np.sin(second)], [0, np.sin(second), np.cos(second)]])
        return about_z @ about_x
    if orientation == "left-handed":  # slices run feet-ward: a determinant of -1
        return np.diag([1.0, 1.0, -1.0])
    return np.eye(3)


def write_ct_series(folder: Path, orientation: str = "axial", shape: tuple[int, int, int] = (12, 20, 24),
                    seed: int = 0, modality: str = "CT", description: str | None = None) -> Volume:
    """A CT-like series (a bright ball in noise) in ``folder`` with the given orientation; returns the volume
    as the engine reads it back. 'shuffled-files' is axial with file names in no slice order."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    ball = ((z - shape[0] / 2) / 4) ** 2 + ((y - shape[1] / 2) / 6) ** 2 + ((x - shape[2] / 2) / 7) ** 2 < 1
    array = (rng.normal(0, 20, shape) + 300 * ball - 100).astype(np.int16)
    volume = Volume(array, (0.9, 0.8, 2.0), (-12.5, 30.0, 7.25), _direction(orientation))
    write_dicom_series(volume, folder, modality=modality, patient_name="Doe^Jane", patient_id="P1",
                       series_description=description or f"{orientation} {modality}")
    if orientation == "shuffled-files":
        files = sorted(folder.iterdir())
        names = [path.name for path in files]
        random.Random(seed).shuffle(names)
        for path, name in zip(files, names):
            path.rename(folder / f"x{name}")
        for path in folder.iterdir():
            path.rename(folder / path.name[1:])
    return read_volume(folder)


def dcmqi_converter() -> str | None:
    """dcmqi's segimage2itkimage: beside this Python (a virtual environment's scripts), else on the PATH."""
    beside = Path(sys.executable).with_name("segimage2itkimage")
    return str(beside) if beside.exists() else shutil.which("segimage2itkimage")


def dcmqi_labelmap(seg: Path, grid: Volume, work: Path) -> np.ndarray:
    """The labelmap dcmqi's segimage2itkimage reads from a DICOM SEG, placed on ``grid`` (nearest voxel: exact
    where dcmqi's grid shares its lattice): each segment's mask gets its segment number."""
    converter = dcmqi_converter()
    assert converter is not None, "dcmqi is not installed (pip install dcmqi)"
    work.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([converter, "--inputDICOM", str(seg), "--outputDirectory", str(work), "-t", "nrrd"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    labelmap = np.zeros(grid.shape, np.uint16)
    meta = json.loads((work / "meta.json").read_text())
    for segments in meta["segmentAttributes"]:
        for segment in segments:
            number = int(segment["labelID"])
            mask = sitk.ReadImage(str(work / f"{number}.nrrd"))
            placed = sitk.GetArrayFromImage(sitk.Resample(mask, to_sitk(grid), sitk.Transform(), sitk.sitkNearestNeighbor))
            assert not (labelmap[placed > 0]).any(), "dcmqi read overlapping segments"
            labelmap[placed > 0] = number
    return labelmap
