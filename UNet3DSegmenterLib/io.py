"""Reading and writing volumes: NIfTI, NRRD, MHA files and DICOM series folders, through SimpleITK.

Every reader returns a :class:`Volume` and every writer takes one; geometry passes through untouched
because Volume uses SimpleITK's own convention. Writes are atomic: the file appears whole or not at all.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path
from .errors import UserError
from .volume import Volume

# ITK prints warnings (e.g. "no DICOM series found") straight to stderr; errors are ours to word.
sitk.ProcessObject_SetGlobalWarningDisplay(False)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha")
_DICOM_SUFFIXES = (".dcm", ".ima", "")


def volume_suffix(path: str | os.PathLike) -> str:
    """The volume file extension of ``path`` ('.nii.gz', '.nrrd', ...) or '' when it has none we know."""
    name = Path(path).name.lower()
    return next((suffix for suffix in VOLUME_SUFFIXES if name.endswith(suffix)), "")


def case_name(path: str | os.PathLike) -> str:
    """The name of a case: the file name without its volume extension (a folder's own name)."""
    path = Path(path)
    suffix = volume_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def list_volume_files(folder: str | os.PathLike) -> list[Path]:
    """The volume files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(
        path for path in Path(folder).iterdir()
        if path.is_file() and not path.name.startswith(".") and volume_suffix(path)
    )


def is_dicom_folder(folder: str | os.PathLike) -> bool:
    return Path(folder).is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def from_sitk(image: sitk.Image) -> Volume:
    """Convert a SimpleITK image (3D scalar, 3D multi-component or 4D) to a Volume."""
    dimension = image.GetDimension()
    array = sitk.GetArrayFromImage(image)
    if dimension == 3 and image.GetNumberOfComponentsPerPixel() > 1:
        array = np.moveaxis(array, -1, 0)  # (z, y, x, c) -> (c, z, y, x)
    elif dimension == 4 and image.GetNumberOfComponentsPerPixel() == 1:
        pass  # already (t, z, y, x): each 3D frame is a channel
    elif dimension != 3:
        raise ValueError(f"{dimension}D image with {image.GetNumberOfComponentsPerPixel()} components")
    direction = np.asarray(image.GetDirection()).reshape(dimension, dimension)[:3, :3]
    return Volume(np.ascontiguousarray(array), image.GetSpacing()[:3], image.GetOrigin()[:3], direction)


def to_sitk(volume: Volume) -> sitk.Image:
    """Convert a Volume to a SimpleITK image (several channels become a multi-component image)."""
    if volume.array.ndim == 4:
        image = sitk.GetImageFromArray(np.moveaxis(volume.array, 0, -1), isVector=True)
    else:
        image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(volume.direction.flatten().tolist())
    return image


def read_volume(path: str | os.PathLike, check_finite: bool = True) -> Volume:
    """Read a volume file (NIfTI, NRRD, MHA) or a DICOM series folder.

    Raises :class:`UserError` with a one-line explanation for a missing, unreadable, 2D or
    non-finite input.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"input not found: {path}: check the path")
    try:
        image = _read_dicom_series(path) if path.is_dir() else sitk.ReadImage(str(path))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown reason"
        raise UserError(
            f"cannot read {path}: not a readable NIfTI, NRRD, MHA or DICOM image ({reason.strip()[:160]})"
        ) from None
    if image.GetDimension() < 3 or (image.GetDimension() == 3 and _is_flat(image)):
        raise UserError(
            f"{path} is a {image.GetDimension()}D image of size {image.GetSize()}: a 3D volume is needed"
        )
    if image.GetDimension() > 4:
        raise UserError(f"{path} is a {image.GetDimension()}D image: a 3D volume is needed")
    try:
        volume = from_sitk(image)
    except ValueError as error:
        raise UserError(f"{path}: unsupported image layout ({error}): a 3D volume is needed") from None
    if check_finite:
        _check_finite(volume.array if not volume_suffix(path).startswith(".nii") else _nifti_data(path), path)
    return volume


def _nifti_data(path: Path) -> np.ndarray:
    """The stored values of a NIfTI file as nibabel sees them: ITK's reader turns NaN into 0."""
    image: Any = nibabel.load(path)  # a Nifti1Image; nibabel's annotation is its base class
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return np.zeros(0)
    return np.asanyarray(image.dataobj)


def _check_finite(array: np.ndarray, path: Path) -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise UserError(f"{path} contains {count} NaN or infinite voxel values: fix or mask them first")


def _is_flat(image: sitk.Image) -> bool:
    """A 3D file holding a single slice is a 2D picture: refuse it rather than segment a sheet."""
    return sum(size > 1 for size in image.GetSize()[:3]) < 3


def _read_dicom_series(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        volumes = list_volume_files(folder)
        hint = " (it holds volume files: pass one of them, or use predict on the folder)" if volumes else ""
        raise UserError(f"{folder} is a folder with no DICOM series in it{hint}")
    if len(series) > 1:
        raise UserError(f"{folder} holds {len(series)} DICOM series: point to a folder with one series")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    return reader.Execute()


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a volume file atomically (temporary file in the same folder, then rename).

    The format follows the extension: .nii, .nii.gz, .nrrd, .seg.nrrd or .mha. A folder path without
    an extension writes a DICOM series (see :func:`write_dicom_series`).
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if not suffix:
        raise UserError(f"cannot write {path}: use a file name ending in .nii.gz, .nii, .nrrd or .mha")
    _check_writable_folder(path.parent)
    try:
        with atomic_path(path, suffix) as temporary:
            sitk.WriteImage(to_sitk(volume), str(temporary), compress)
    except RuntimeError as error:
        raise UserError(f"cannot write {path}: {str(error).strip().splitlines()[-1][:160]}") from None
    return path


def _check_writable_folder(folder: Path) -> None:
    folder = folder if str(folder) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {folder}: {error.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder} is not writable: choose another output path")


def write_dicom_series(volume: Volume, folder: str | os.PathLike, modality: str = "OT") -> Path:
    """Write a scalar volume as a DICOM series, one file per slice, into ``folder``.

    Integer images that fit are stored as they are (int16); others are stored as int16 times the
    DICOM rescale slope, so that readers get the values back to within 1/32000 of the largest value.
    """
    if volume.channels != 1:
        raise UserError("a DICOM series can hold one channel only")
    folder = Path(folder)
    _check_writable_folder(folder.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    array = volume.array
    storage = {}
    if np.issubdtype(array.dtype, np.integer) and array.min() >= -32768 and array.max() <= 32767:
        image = to_sitk(volume.with_array(array.astype(np.int16)))
    else:  # GDCM stores floats as signed 16-bit integers times a rescale slope (intercept 0)
        slope = float(np.abs(array).max()) / 32000.0 or 1.0
        image = to_sitk(volume.with_array(array.astype(np.float64)))
        storage = {"0028|1053": f"{slope:.10g}", "0028|1052": "0", "0028|0100": "16", "0028|0101": "16",
                   "0028|0102": "15", "0028|0103": "1"}
    study, series = _new_uid(), _new_uid()
    row, column = volume.direction[:, 0], volume.direction[:, 1]
    orientation = "\\".join(f"{value:.10g}" for value in (*row, *column))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": modality,
            "0020|000d": study,
            "0020|000e": series,
            "0008|0018": _new_uid(),
            "0020|0013": str(k + 1),
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{value:.10g}" for value in position),
            "0018|0050": f"{volume.spacing[2]:.10g}",
            **storage,
        }.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(staging / f"slice{k:04d}.dcm"))
        writer.Execute(slice_image)
    if folder.exists():
        raise UserError(f"{folder} already exists: choose a new folder for the DICOM series")
    os.replace(staging, folder)
    return folder


def _new_uid() -> str:
    return "2.25." + str(uuid.uuid4().int)
