"""Reading and writing volumes: NIfTI, NRRD, MHA files and DICOM series folders (through SimpleITK), and
NumPy ``.npy`` arrays.

Every reader returns a :class:`Volume` and every writer takes one; geometry passes through untouched
because Volume uses SimpleITK's own convention. Writes are atomic: the file appears whole or not at all.

A ``.npy`` file holds an array and nothing else. It is read in the engine's own order, ``[z, y, x]``
(or ``[channel, z, y, x]``), with an identity direction, origin 0 and a spacing of 1 mm unless the
caller gives one; written, it keeps the array and drops the geometry.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import SimpleITK as sitk

from .atomic import WRITE_STOPPED, atomic_path, write_stopped
from .dicom_seg import is_dicom_seg_file, read_dicom_seg
from .errors import UserError
from .integrity import check_whole, shortfall
from .volume import Volume, float3

# ITK prints warnings (e.g. "no DICOM series found") straight to stderr, and nibabel logs its repairs of
# headers ("setting 0 dims to 1"); errors are ours to word.
sitk.ProcessObject_SetGlobalWarningDisplay(False)
logging.getLogger("nibabel").setLevel(logging.ERROR)

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mha", ".npy")
FORMATS = ".nii.gz, .nii, .nrrd, .mha, .npy"
"""The file formats, as messages name them."""


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


def list_volumes(folder: str | os.PathLike) -> list[Path]:
    """The volumes directly inside ``folder``, sorted by case name: volume files, and subfolders holding
    DICOM files (a series each)."""
    folder = Path(folder)
    series = [path for path in folder.iterdir()
              if path.is_dir() and not path.name.startswith(".") and holds_dicom_files(path)]
    return sorted(list_volume_files(folder) + series, key=lambda path: (case_name(path), path.name))


def volume_files(source: str | os.PathLike) -> list[Path]:
    """The volumes a path stands for: itself, or the volumes of a folder that is not one DICOM series."""
    source = Path(source)
    return list_volumes(source) if source.is_dir() and not is_dicom_folder(source) else [source]


def volumes_by_case(folder: str | os.PathLike) -> dict[str, Path]:
    """The volumes of :func:`list_volumes` by case name; two volumes with one case name are refused."""
    volumes: dict[str, Path] = {}
    for path in list_volumes(folder):
        name = case_name(path)
        if name in volumes:
            raise UserError(f"{folder} holds two volumes for case {name}: {volumes[name].name} and {path.name}; "
                            "keep one")
        volumes[name] = path
    return volumes


def is_dicom_folder(folder: str | os.PathLike) -> bool:
    return Path(folder).is_dir() and bool(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a DICOM file as the standard stores it: 128 bytes of preamble, then 'DICM'. Only regular
    files are opened: reading a named pipe would wait for ever."""
    if not Path(path).is_file():
        return False
    try:
        with open(path, "rb") as file:
            return file.read(132)[128:] == b"DICM"
    except OSError:
        return False


def holds_dicom_files(folder: Path) -> bool:
    """True when a file directly inside ``folder`` is a DICOM file (a quick look, not a full read)."""
    return any(path.is_file() and not path.name.startswith(".") and is_dicom_file(path)
               for path in sorted(folder.iterdir()))


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


def read_volume(path: str | os.PathLike, check_finite: bool = True,
                spacing: Sequence[float] | None = None) -> Volume:
    """Read a volume file (NIfTI, NRRD, MHA, NumPy .npy), a DICOM series folder, or a DICOM SEG file (as the
    labelmap of its segment numbers on the grid its frames span; see :func:`dicom_seg.read_dicom_seg`).

    ``spacing`` (x, y, z) in mm is that of a ``.npy`` array, which records none (default 1 mm);
    files that record their own geometry keep it. Raises :class:`UserError` with a one-line
    explanation for a missing, unreadable, truncated, 2D or non-finite input.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"input not found: {path}: check the path")
    if not (path.is_file() or path.is_dir()):  # /dev/zero under a volume's name would be read for ever
        raise UserError(f"{path} is not a regular file (a device, pipe or socket): give a volume file")
    if volume_suffix(path) == ".npy":
        return _read_npy(path, spacing, check_finite)
    if is_dicom_seg_file(path):  # a segmentation object: its frames, on the grid they span
        return read_dicom_seg(path).labelmap
    if path.is_file():
        check_whole(path)
    try:
        with _native_messages_held():
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
    _check_geometry(volume, path)
    if check_finite:
        _check_finite(volume.array if not volume_suffix(path).startswith(".nii") else _nifti_data(path), path)
    return volume


def check_input_spacing(spacing: Sequence[float] | None, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an ``--input-spacing`` that nothing would use (no .npy among ``inputs``) or that is not positive."""
    if spacing is None:
        return
    if len(spacing) != 3 or not all(0 < value < math.inf for value in spacing):
        raise UserError(f"--input-spacing must be three positive numbers X Y Z in mm, got {' '.join(map(str, spacing))}")
    if not any(volume_suffix(path) == ".npy" for path in inputs):
        raise UserError(f"--input-spacing gives the spacing of .npy arrays, and {Path(inputs[0]) if inputs else 'the input'} "
                        "records its own (no .npy input): leave it out")


def _read_npy(path: Path, spacing: Sequence[float] | None, check_finite: bool) -> Volume:
    """A NumPy array in the engine's order, [z, y, x] or [channel, z, y, x], on an identity grid."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise UserError(f"cannot read {path}: not a readable NumPy .npy file ({str(error)[:160]})") from None
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise UserError(f"{path} holds a {array.dtype} array: a volume needs numbers (integers or floats)")
    if array.ndim not in (3, 4) or sum(size > 1 for size in array.shape[-3:]) < 3:
        raise UserError(f"{path} holds an array of shape {array.shape}: a 3D volume (z, y, x), or "
                        "(channel, z, y, x), is needed")
    if array.dtype == np.float16 or not array.dtype.isnative:  # ITK stores neither half floats nor big-endian
        array = array.astype(np.float32 if array.dtype == np.float16 else array.dtype.newbyteorder("="))
    try:
        grid_spacing = float3(spacing) if spacing is not None else (1.0, 1.0, 1.0)
        volume = Volume(array, grid_spacing)
    except ValueError as error:
        raise UserError(f"{path}: {error}") from None
    if check_finite:
        _check_finite(volume.array, path)
    return volume


def _nifti_data(path: Path) -> np.ndarray:
    """The stored values of a NIfTI file as nibabel sees them: ITK's reader turns NaN into 0."""
    image: Any  # a Nifti1Image; nibabel's annotation is its base class
    try:
        try:
            image = nibabel.load(path)
        except nibabel.filebasedimages.ImageFileError:  # a plain NIfTI under a .nii.gz name, which ITK reads
            image = nibabel.Nifti1Image.from_bytes(path.read_bytes())
    except Exception:  # a header nibabel cannot read, which ITK read: ITK's values stand
        return np.zeros(0)
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return np.zeros(0)
    return np.asanyarray(image.dataobj)


def _check_finite(array: np.ndarray, path: Path) -> None:
    """Refuse NaN and infinite values, and values beyond float32's range, which the engine computes in
    (they would turn into infinities, then NaN, on the way)."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        count = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise UserError(f"{path} contains {count} NaN or infinite voxel values: fix or mask them first")
    if np.issubdtype(array.dtype, np.floating) and array.dtype.itemsize > 4 and array.size:
        largest = float(max(-array.min(), array.max()))
        if largest > float(np.finfo(np.float32).max):
            raise UserError(f"{path} holds values as large as {largest:.3g}, beyond the {np.finfo(np.float32).max:.3g} "
                            "that single-precision computation holds: rescale the image")


def _nifti_voxel_size(path: Path) -> tuple[float, ...] | None:
    """pixdim[1:4] as the file stores it (nibabel and ITK both replace a 0 with 1), or None when unreadable."""
    try:
        with open(path, "rb") as file:
            compressed = file.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as file:
            header = file.read(348)
    except (OSError, EOFError):
        return None
    if len(header) < 348:
        return None
    endian = "<" if struct.unpack("<i", header[:4])[0] == 348 else ">"
    return struct.unpack(f"{endian}3f", header[80:92])


def _check_geometry(volume: Volume, path: Path) -> None:
    """Refuse a grid that cannot be what the file means: a zero voxel size (ITK's NIfTI reader quietly makes it
    1 mm) or a skewed, non-orthonormal direction (which a spacing and a rotation cannot hold)."""
    zooms = _nifti_voxel_size(path) if volume_suffix(path).startswith(".nii") else None
    if zooms is not None and not all(np.isfinite(zoom) and zoom > 0 for zoom in zooms):
        raise UserError(f"{path} has a voxel size of {tuple(float(zoom) for zoom in zooms)} mm in its header "
                        "(pixdim): every size must be positive; fix the header")
    direction = volume.direction
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise UserError(f"{path} has a skewed grid (its axes are not at right angles: direction "
                        f"{np.round(direction, 4).tolist()}): resample it onto a rectangular grid first")


def _is_flat(image: sitk.Image) -> bool:
    """A 3D file holding a single slice is a 2D picture: refuse it rather than segment a sheet."""
    return sum(size > 1 for size in image.GetSize()[:3]) < 3


def _read_dicom_series(folder: Path) -> sitk.Image:
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series:
        if list_volume_files(folder):
            hint = " (it holds volume files: pass one of them)"
        elif any(path.is_dir() for path in folder.iterdir()):
            hint = " (DICOM files in subfolders: 'unet3d-segmenter dicom-sort' gathers them into one folder per series)"
        else:
            hint = ""
        raise UserError(f"{folder} is a folder with no DICOM series in it{hint}")
    if len(series) > 1:
        raise UserError(f"{folder} holds {len(series)} DICOM series: point to a folder with one series "
                        "('unet3d-segmenter dicom-sort' puts each series in a folder of its own)")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    _check_even_slices(reader, image, folder)
    return image


def _check_even_slices(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path) -> None:
    """A missing or unreadable slice (a half-copied file, which GDCM leaves out) would shift every slice
    after it: refuse a series whose slices are not evenly spaced."""
    files = len(reader.GetFileNames())
    if files < 3 or image.GetDimension() != 3 or image.GetSize()[2] != files:
        return
    try:
        positions = np.array([[float(value) for value in reader.GetMetaData(index, "0020|0032").split("\\")]
                              for index in range(files)])
    except (RuntimeError, ValueError):
        return  # no positions to check: ITK spaced the slices from the header
    normal = np.asarray(image.GetDirection()).reshape(3, 3)[:, 2]
    gaps = np.diff(positions @ normal)
    typical = float(np.median(np.abs(gaps)))
    if typical > 0 and np.ptp(gaps) > max(1e-3, 0.01 * typical):
        smallest, largest = float(np.abs(gaps).min()), float(np.abs(gaps).max())
        missing = round(largest / typical) - 1
        where = f", about {missing} missing in the largest gap" if missing >= 1 else ""
        raise UserError(f"the DICOM series in {folder} has unevenly spaced slices ({smallest:.4g} to {largest:.4g} mm "
                        f"apart{where}): a slice file is missing or unreadable, or the scan varies its slice spacing, "
                        "which one grid cannot hold")


def write_volume(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write a volume atomically (a temporary file or folder beside it, then a rename).

    The format follows the extension: .nii, .nii.gz, .nrrd, .seg.nrrd, .mha, or .npy (the array
    alone: the geometry is dropped). A path without an extension is a folder for a DICOM series
    (:func:`write_dicom_series` with its defaults). ``compress`` applies to NRRD and MHA; NIfTI
    compression follows the extension.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if not suffix:
        if is_series_folder_name(path):
            return write_dicom_series(volume, path)
        raise UserError(f"cannot write {path}: use a file name ending in {FORMATS}, "
                        "or a folder name without an extension for a DICOM series")
    _check_writable_folder(path.parent)
    try:
        with atomic_path(path, suffix) as temporary:
            try:
                with _native_messages_held():
                    if suffix == ".npy":
                        np.save(temporary, volume.array)
                    else:
                        sitk.WriteImage(to_sitk(volume), str(temporary), compress)
            except (RuntimeError, OSError) as error:
                raise _write_error(path, temporary, error) from None
            _check_written(temporary, volume, path)
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    return path


def _check_written(temporary: Path, volume: Volume, path: Path) -> None:
    """Read back the header, and check the data's size, of a file just written, before it takes its name.

    ITK's NIfTI writer reports a short write (a full disk) only on stderr and carries on, and a full
    disk can leave an empty compressed file: without this check the command would say it wrote them.
    """
    size = temporary.stat().st_size
    try:
        if volume_suffix(temporary) == ".npy":
            shape, expected = np.load(temporary, mmap_mode="r").shape, volume.array.shape
        else:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(temporary))
            with _native_messages_held():
                reader.ReadImageInformation()
            shape = (reader.GetNumberOfComponents(), *reversed(reader.GetSize()))
            expected = (volume.channels, *volume.shape)
    except (RuntimeError, OSError, ValueError):
        raise write_stopped(path, f"{size} bytes written, not a readable header") from None
    if tuple(shape) != tuple(expected):
        raise UserError(f"cannot write {path}: it reads back with shape {shape} instead of {expected}")
    missing = shortfall(temporary)
    if missing is not None:
        raise write_stopped(path, missing)


def _write_error(path: Path, temporary: Path, error: Exception) -> UserError:
    """One line for a writer's failure: a write cut short (a file begun but not finished, or the
    system's 'no space' or 'file too large') says so, rather than the writer's own guess at a cause."""
    begun = temporary.is_file() and temporary.stat().st_size > 0
    if begun or (isinstance(error, OSError) and error.errno in WRITE_STOPPED):
        return write_stopped(path, f"{temporary.stat().st_size if begun else 0} bytes written")
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).strip()
    return UserError(f"cannot write {path}: {(reason.splitlines() or ['unknown reason'])[-1][:160]}")


_NATIVE_NOISE = re.compile(r"^(\*\* ERROR|Meta\w*:|ITK ERROR|WARNING: In |ERROR: In |\w+ required and not defined)")


class _NativeStderr:
    """Where fd 2 points while ITK's readers and writers run: a temporary file, shared by the threads that
    hold it at once (predict reads one case while it writes another), given back when the last one is done."""

    lock = threading.Lock()
    holders = 0
    saved: int | None = None
    held: Any = None

    @classmethod
    def enter(cls) -> None:
        with cls.lock:
            if cls.holders == 0:
                cls.saved = cls.held = None  # unless fd 2 can be held below: then messages go through
                try:
                    held = tempfile.TemporaryFile()
                    _flush_stderr()
                    saved = os.dup(2)
                except OSError:
                    pass
                else:
                    try:
                        os.dup2(held.fileno(), 2)
                        cls.saved, cls.held = saved, held
                    except OSError:
                        os.close(saved)
                        held.close()
            cls.holders += 1

    @classmethod
    def leave(cls) -> None:
        with cls.lock:
            cls.holders -= 1
            if cls.holders or cls.saved is None:
                return
            _flush_stderr()
            os.dup2(cls.saved, 2)
            os.close(cls.saved)
            cls.held.seek(0)
            text = cls.held.read().decode("utf-8", "replace")
            cls.held.close()
            cls.saved = cls.held = None
        kept = "".join(line for line in text.splitlines(keepends=True) if not _NATIVE_NOISE.match(line))
        if kept:
            os.write(2, kept.encode())


def _flush_stderr() -> None:
    """Flush Python's stderr before fd 2 changes hands; an application may have none, or its own kind."""
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass


@contextmanager
def _native_messages_held() -> Iterator[None]:
    """Hold what ITK's C and C++ code prints to the process's stderr while a file is read or written.

    Its NIfTI and MetaImage writers print their failures there ('** ERROR: NWAD: wrote only 0 of
    ... bytes'), and the MetaImage reader its complaints about a header, which would stand beside the
    one line the command prints. Lines of theirs are dropped; anything else printed meanwhile (another
    thread's progress) is passed on afterwards.
    """
    _NativeStderr.enter()
    try:
        yield
    finally:
        _NativeStderr.leave()


def is_series_folder_name(path: str | os.PathLike) -> bool:
    """True when ``path`` names a folder for a DICOM series: an existing folder, or a name with no file
    extension (a dot followed by letters, as in '.png' or '.dcm'; 'series.1.2' is a folder name)."""
    path = Path(path)
    return path.is_dir() or not (volume_suffix(path) or re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]*", path.suffix))


def _check_writable_folder(folder: Path) -> None:
    folder = folder if str(folder) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output folder {folder}: {error.strerror}") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder} is not writable: choose another output path")


# SOP classes: CT and MR image storage where the data fit their 16-bit pixels, else secondary capture.
_SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def write_dicom_series(volume: Volume, folder: str | os.PathLike, modality: str = "OT",
                       patient_name: str | None = None, patient_id: str | None = None,
                       series_description: str | None = None) -> Path:
    """Write a scalar volume as a DICOM series into the new folder ``folder``, one file per slice.

    Files are ``IM0001.dcm``, ``IM0002.dcm``, ... in slice order, as their instance numbers. Each
    carries its position, orientation, pixel spacing and slice spacing, so the series reads back on
    the same grid (a left-handed grid comes back with its slices in the other order, on the same points).

    Values: integers are stored exactly (16 bits where they fit, else 32), so labelmaps stay
    labelmaps; floats holding whole numbers that fit 16 bits are stored exactly too; other floats
    are stored as 32-bit integers with a rescale slope and intercept, which give them back to
    within (max - min) / 2**32.

    Tags: modality; SOP class CT or MR image storage for 16-bit CT or MR data, else secondary
    capture; patient name, patient ID and series description (default: the folder's name); new
    study, series and frame-of-reference UIDs; study date and time now; series number 1.
    """
    if volume.channels != 1:
        raise UserError(f"cannot write {folder}: a DICOM series holds one channel, the volume has {volume.channels}")
    folder = Path(folder)
    if folder.exists():
        raise UserError(f"{folder} already exists: choose a new folder for the DICOM series")
    _check_writable_folder(folder.parent)
    pixels, pixel_tags = _dicom_pixels(volume.array, folder)
    image = to_sitk(volume.with_array(pixels))
    sop_class = _SOP_CLASSES.get(modality, _SECONDARY_CAPTURE) if pixels.dtype.itemsize == 2 else _SECONDARY_CAPTURE
    now = time.localtime()
    normal = volume.direction[:, 2]
    series_tags = {
        "0008|0016": sop_class, "0008|0060": modality, "0008|0008": "DERIVED\\SECONDARY",
        "0008|0020": time.strftime("%Y%m%d", now), "0008|0030": time.strftime("%H%M%S", now),
        "0010|0010": patient_name if patient_name is not None else folder.name,
        "0010|0020": patient_id if patient_id is not None else folder.name,
        "0008|103e": series_description if series_description is not None else folder.name,
        "0020|000d": _new_uid(), "0020|000e": _new_uid(), "0020|0052": _new_uid(),
        "0020|0010": "1", "0020|0011": "1",
        "0020|0037": _decimals(*volume.direction[:, 0], *volume.direction[:, 1]),
        "0028|0030": _decimals(volume.spacing[1], volume.spacing[0]),
        "0018|0050": _decimals(volume.spacing[2]), "0018|0088": _decimals(volume.spacing[2]),
        **pixel_tags,
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(image.GetDepth()):
            slice_image = image[:, :, k]
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            slice_tags = {"0008|0018": _new_uid(), "0020|0013": str(k + 1), "0020|0032": _decimals(*position),
                          "0020|1041": _decimals(float(np.dot(position, normal)))}
            for tag, value in {**series_tags, **slice_tags}.items():
                slice_image.SetMetaData(tag, value)
            slice_file = staging / instance_file_name(k + 1, image.GetDepth())
            writer.SetFileName(str(slice_file))
            try:
                with _native_messages_held():
                    writer.Execute(slice_image)
            except (RuntimeError, OSError) as error:
                raise _write_error(folder, slice_file, error) from None
        os.rename(staging, folder)
    except OSError as error:
        raise _write_error(folder, staging, error) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def instance_file_name(number: int, count: int = 1) -> str:
    """``IM0001.dcm`` for instance 1: four digits, more when ``count`` needs them, so names sort in order."""
    return f"IM{number:0{max(4, len(str(count)))}d}.dcm"


def _dicom_pixels(array: np.ndarray, folder: Path) -> tuple[np.ndarray, dict[str, str]]:
    """The array as the series stores it, and the pixel tags that tell readers how to get the values back."""
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise UserError(f"cannot write {folder}: the volume holds NaN or infinite values, which DICOM cannot store")
        if np.array_equal(array, np.round(array)) and array.min() >= -32768 and array.max() <= 32767:
            return array.astype(np.int16), {}
        low, high = float(array.min()), float(array.max())
        # GDCM turns floats into integers with the slope and intercept given; a little margin keeps the
        # rounding of their decimal strings from overflowing 32 bits.
        slope, intercept = (high - low) / 2**32 * 1.001 or 1.0, (high + low) / 2
        return array.astype(np.float64), {"0028|1053": _decimals(slope), "0028|1052": _decimals(intercept),
                                           "0028|0100": "32", "0028|0101": "32", "0028|0102": "31", "0028|0103": "1"}
    for dtype in (np.int16, np.uint16, np.int32):
        if array.min() >= np.iinfo(dtype).min and array.max() <= np.iinfo(dtype).max:
            return array.astype(dtype), {}
    raise UserError(f"cannot write {folder}: values {array.min()}..{array.max()} do not fit the 32-bit integers "
                    "DICOM stores")


def _decimals(*values: float) -> str:
    """DICOM decimal strings (at most 16 characters each), backslash-separated."""
    return "\\".join(f"{value:.10g}" for value in values)


def _new_uid() -> str:
    return "2.25." + str(uuid.uuid4().int)
