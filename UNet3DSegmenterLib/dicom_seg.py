"""DICOM Segmentation objects (DICOM SEG): a labelmap as a PACS stores it, written and read through highdicom.

:func:`write_dicom_seg` turns a labelmap on a DICOM series' grid into one SEG file that references
that series (study, series, SOP instance and frame-of-reference UIDs, each frame's source image), with
one segment per foreground label: its name, its colour, a coded category and type, and this tool as
the algorithm (name, version, the model file's name). The SEG is BINARY, or FRACTIONAL (probability,
0..255) when the class probabilities are given.

Choices the standard leaves open, made here:

- Segment numbers run 1, 2, ... over the foreground labels in the order of their values; a model
  whose values are 1..n keeps them as segment numbers, and a SEG reads back as those numbers.
- A label whose name (or the last word of it) names a known structure gets its SNOMED CT code
  (category "Anatomical Structure", or "Morphologically Abnormal Structure" for a tumour or lesion);
  any other gets the generic code "Tissue" for both, and keeps its name as the segment label.
- Every label is a segment, found or not, so that an empty result says "looked for, not found";
  frames (slices) that hold nothing are left out, as the standard allows, which keeps files small.

:func:`read_dicom_seg` reads a SEG back into a labelmap: on the grid of the frames it holds, or, when a
grid is given (the source series, the image a SEG is compared with), on that grid, which its frames
must lie on. highdicom and pydicom are an optional extra (``pip install "UNet3DSegmenter[dicom-seg]"``);
without them the functions here refuse in one line that says so.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, write_stopped
from .errors import UserError
from .labels import Label
from .volume import Volume, float3

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
SEG_SUFFIX = ".dcm"
INSTALL_HINT = 'DICOM SEG needs highdicom: pip install "UNet3DSegmenter[dicom-seg]" (or pip install highdicom)'
_MANUFACTURER = "UNet3DSegmenter"

# A structure's name (lower case) -> SNOMED CT keywords of pydicom's code dictionary: (category, type).
_ANATOMY = "AnatomicalStructure"
_ABNORMAL = "MorphologicallyAbnormalStructure"
_KNOWN_STRUCTURES = {
    **{name: (_ANATOMY, keyword) for name, keyword in {
        "liver": "Liver", "spleen": "Spleen", "kidney": "Kidney", "pancreas": "Pancreas",
        "hippocampus": "Hippocampus", "brain": "Brain", "lung": "Lung", "heart": "Heart", "prostate": "Prostate",
        "stomach": "Stomach", "gallbladder": "Gallbladder", "aorta": "Aorta", "colon": "Colon",
        "esophagus": "Esophagus", "oesophagus": "Esophagus", "duodenum": "Duodenum", "bone": "Bone",
        "vertebra": "Vertebra", "trachea": "Trachea", "brainstem": "BrainStem", "cerebellum": "Cerebellum",
        "thalamus": "Thalamus", "skull": "Skull", "rib": "Rib", "femur": "Femur", "uterus": "Uterus",
        "thyroid": "Thyroid",
    }.items()},
    **{name: (_ABNORMAL, keyword) for name, keyword in {
        "tumour": "Neoplasm", "tumor": "Neoplasm", "neoplasm": "Neoplasm", "cancer": "Neoplasm",
        "lesion": "Lesion", "mass": "Mass", "edema": "Edema", "oedema": "Edema", "necrosis": "Necrosis",
    }.items()},
}
_GENERIC = ("Tissue", "Tissue")


def segment_codes(name: str) -> tuple[Any, Any, bool]:
    """The SNOMED CT (category, type) codes of a segment named ``name``, and whether the name was known
    (False: the generic "Tissue" codes)."""
    from pydicom.sr.codedict import codes

    words = name.lower().replace("_", " ").replace("-", " ").split()
    whole = "".join(words)
    known = _KNOWN_STRUCTURES.get(whole) or next(
        (_KNOWN_STRUCTURES[word] for word in reversed(words) if word in _KNOWN_STRUCTURES), None)
    category, kind = known or _GENERIC
    return getattr(codes.SCT, category), getattr(codes.SCT, kind), known is not None


def is_dicom_seg_name(path: str | os.PathLike) -> bool:
    """True for an output name that asks for a DICOM SEG file: one ending in .dcm."""
    return Path(path).name.lower().endswith(SEG_SUFFIX)


def is_dicom_seg_file(path: str | os.PathLike) -> bool:
    """True for a DICOM file whose file meta information names the Segmentation storage class (no
    library needed: the meta group is read by hand)."""
    return _media_storage_class(Path(path)) == SEG_SOP_CLASS_UID


def _media_storage_class(path: Path) -> str:
    """(0002,0002) Media Storage SOP Class UID of a DICOM file, or '' when it is none or has none."""
    try:
        if not path.is_file():
            return ""
        with open(path, "rb") as file:
            head = file.read(4096)
    except OSError:
        return ""
    if head[128:132] != b"DICM":
        return ""
    position = 132
    while position + 8 <= len(head):  # group 0002 is explicit VR little endian
        group, element = struct.unpack_from("<HH", head, position)
        if group != 0x0002:
            return ""
        vr = head[position + 4: position + 6]
        if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR", b"OD", b"OF", b"OL", b"OV"):
            length, position = struct.unpack_from("<I", head, position + 8)[0], position + 12
        else:
            length, position = struct.unpack_from("<H", head, position + 6)[0], position + 8
        if element == 0x0002:
            return head[position: position + length].decode("ascii", "replace").strip("\0 ")
        position += length
    return ""


def _highdicom():
    """The highdicom module, or a one-line refusal with the way to install it."""
    try:
        import highdicom
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return highdicom


def series_files(folder: str | os.PathLike) -> list[Path]:
    """The files of the one DICOM series in ``folder``, in the order the volume reader stacks them."""
    import SimpleITK as sitk

    ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise UserError(f"{folder} holds {len(ids)} DICOM series: a DICOM SEG references exactly one")
    return [Path(name) for name in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])]


def _affine(volume: Volume) -> np.ndarray:
    """highdicom's affine of a volume: LPS, the array's axes (slices, rows, columns) = our (z, y, x)."""
    affine = np.eye(4)
    for column, axis in enumerate((2, 1, 0)):
        affine[:3, column] = volume.direction[:, axis] * volume.spacing[axis]
    affine[:3, 3] = volume.origin
    return affine


def _volume_from_affine(array: np.ndarray, affine: np.ndarray) -> Volume:
    columns = [affine[:3, column] for column in (2, 1, 0)]  # x, y, z
    spacing = [float(np.linalg.norm(column)) for column in columns]
    direction = np.stack([column / size for column, size in zip(columns, spacing)], axis=1)
    return Volume(array, float3(spacing), float3(affine[:3, 3]), direction)


def _algorithm(hd, model: str) -> Any:
    """What made the segmentation: this tool, its version, and the model file's name as its parameter."""
    from pydicom.sr.codedict import codes

    from . import __version__

    return hd.AlgorithmIdentificationSequence(name=_MANUFACTURER, family=codes.cid7162.ArtificialIntelligence,
                                              version=__version__, parameters={"model": model} if model else None)


def write_dicom_seg(labelmap: Volume, source: str | os.PathLike, labels: Sequence[Label], path: str | os.PathLike,
                    model: str = "", probabilities: Volume | None = None) -> Path:
    """Write ``labelmap`` (on the grid of the DICOM series in the folder ``source``) as a DICOM SEG file.

    Args:
        labelmap: label values on the source series' grid (as :func:`io.read_volume` read it).
        source: the folder of the DICOM series that was segmented; the SEG references its files.
        labels: the model's labels (value, name, colour); value 0 is background and gets no segment.
        path: the ``.dcm`` file to write (atomically: whole or not at all).
        model: the model file's name, recorded as the algorithm's parameter.
        probabilities: class probabilities (classes, z, y, x) in the order of ``labels``: written as a
            FRACTIONAL (probability) SEG instead of a BINARY one.
    """
    hd = _highdicom()
    import pydicom

    from . import __version__

    path, source = Path(path), Path(source)
    datasets = [pydicom.dcmread(name, stop_before_pixels=True) for name in series_files(source)]
    foreground = [label for label in labels if label.value != 0]
    if not foreground:
        raise UserError(f"cannot write {path}: the model has no foreground label to make a segment of")
    descriptions = _segment_descriptions(hd, foreground, _algorithm(hd, model))
    frame_of_reference = getattr(datasets[0], "FrameOfReferenceUID", None)
    if probabilities is None:
        numbers = np.zeros(int(labelmap.array.max()) + 1, np.uint16)
        for number, label in enumerate(foreground, start=1):
            if label.value < len(numbers):
                numbers[label.value] = number
        pixels = hd.Volume(numbers[labelmap.array].astype(np.uint8 if len(foreground) < 256 else np.uint16),
                           _affine(labelmap), "PATIENT", frame_of_reference)
    else:
        index = [position for position, label in enumerate(labels) if label.value != 0]
        stacked = np.moveaxis(np.clip(probabilities.array[index], 0, 1).astype(np.float32), 0, -1)
        pixels = hd.Volume(stacked, _affine(labelmap), "PATIENT", frame_of_reference,
                           channels={"SegmentNumber": list(range(1, len(foreground) + 1))})
    first = datasets[0]
    segmentation = hd.seg.Segmentation(
        source_images=datasets, pixel_array=pixels,
        segmentation_type="BINARY" if probabilities is None else "FRACTIONAL",
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=_series_number(first),
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=_MANUFACTURER,
        manufacturer_model_name=_MANUFACTURER, software_versions=__version__,
        device_serial_number="0", content_label="UNET3D", content_description=f"segmentation by {model}"[:64],
        series_description=f"Segmentation {model}"[:64] if model else "Segmentation",
    )
    _save(segmentation, path)
    return path


def _segment_descriptions(hd, labels: Sequence[Label], algorithm) -> list:
    descriptions = []
    for number, label in enumerate(labels, start=1):
        category, kind, _ = segment_codes(label.name)
        red, green, blue = (int(round(min(max(value, 0.0), 1.0) * 255)) for value in label.color)
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label.name[:64] or f"label {label.value}",
            segmented_property_category=category, segmented_property_type=kind,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            display_color=hd.color.CIELabColor.from_rgb(red, green, blue)))
    return descriptions


def _series_number(source) -> int:
    """The SEG's series number: the source's plus 1000 (so PACS lists it near the source), or 1000."""
    try:
        number = int(source.SeriesNumber) + 1000
    except (AttributeError, TypeError, ValueError):
        return 1000
    return number if number < 2**31 else 1000


def _save(segmentation, path: Path) -> None:
    """Write through a temporary file that is read back whole before it takes its name."""
    import pydicom

    try:
        with atomic_path(path, ".dcm") as temporary:
            segmentation.save_as(temporary)
            try:
                written = pydicom.dcmread(temporary)
                complete = len(written.PixelData) >= len(segmentation.PixelData)
            except Exception:  # a file cut short reads as anything from garbage to an error
                complete = False
            if not complete:
                raise write_stopped(path, f"{temporary.stat().st_size} bytes written, not a readable DICOM SEG")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


@dataclass
class DicomSegmentation:
    """A DICOM SEG as read: the labelmap (values = segment numbers), the segments as labels, and its type."""

    labelmap: Volume
    labels: list[Label]
    segmentation_type: str


def read_dicom_seg(path: str | os.PathLike, grid: Volume | None = None) -> DicomSegmentation:
    """Read a DICOM SEG file as a labelmap whose values are the segment numbers.

    Without ``grid`` the labelmap spans the frames the file holds; with one, it lies on that grid (the
    SEG's frames must fall on its slices). A FRACTIONAL SEG reads as the labelmap of its most probable
    segment at each voxel, background where the segments' probabilities add up to less than what is left.
    """
    hd = _highdicom()
    path = Path(path)
    segmentation = _read_segmentation(hd, path)
    fractional = segmentation.SegmentationType == "FRACTIONAL"
    try:
        read = segmentation.get_volume(combine_segments=not fractional, relabel=False,
                                       **({"rescale_fractional": True} if fractional else {}))
    except (ValueError, RuntimeError) as error:
        raise UserError(f"cannot read {path}: its frames do not make one volume ({str(error)[:160]})") from None
    array = read.array
    if fractional:
        background = 1.0 - array.sum(axis=-1, keepdims=True)
        array = np.argmax(np.concatenate([background, array], axis=-1), axis=-1)
    volume = _volume_from_affine(np.ascontiguousarray(array.astype(np.uint16 if array.max() > 255 else np.uint8)),
                                 read.affine)
    labels = [Label(int(item.SegmentNumber), str(item.SegmentLabel),
                    _rgb(item) or (0.5, 0.5, 0.5)) for item in segmentation.SegmentSequence]
    return DicomSegmentation(volume if grid is None else place_on_grid(volume, grid, path), labels,
                             str(segmentation.SegmentationType))


def _rgb(item) -> tuple[float, float, float] | None:
    from highdicom.color import CIELabColor

    if "RecommendedDisplayCIELabValue" not in item:
        return None
    red, green, blue = CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
    return red / 255, green / 255, blue / 255


def _read_segmentation(hd, path: Path):
    """The file as a highdicom Segmentation, once its declared size is checked against what it holds."""
    import pydicom

    if not is_dicom_seg_file(path):
        raise UserError(f"{path} is not a DICOM SEG file (no Segmentation storage class in its header)")
    try:
        dataset = pydicom.dcmread(path)
        rows, columns, frames = int(dataset.Rows), int(dataset.Columns), int(getattr(dataset, "NumberOfFrames", 1))
        bits = int(dataset.BitsAllocated)
        data = len(dataset.PixelData)
    except Exception as error:  # pydicom raises many kinds for a damaged file
        raise UserError(f"cannot read {path}: not a readable DICOM SEG ({str(error)[:160]})") from None
    _check_declared_size(path, rows, columns, frames, bits, data, dataset.file_meta.TransferSyntaxUID)
    try:
        return hd.seg.Segmentation.from_dataset(dataset, copy=False)
    except Exception as error:
        raise UserError(f"cannot read {path}: not a valid DICOM SEG ({str(error)[:160]})") from None


def _check_declared_size(path: Path, rows: int, columns: int, frames: int, bits: int, data: int,
                         transfer_syntax) -> None:
    from .integrity import MAX_SIZE, MAX_VOXELS

    voxels = rows * columns * frames
    if min(rows, columns, frames) < 1 or max(rows, columns, frames) > MAX_SIZE or voxels > MAX_VOXELS:
        raise UserError(f"cannot read {path}: it declares {frames} frames of {rows} x {columns} pixels, which no "
                        "segmentation has; the file is damaged")
    if transfer_syntax.is_encapsulated:
        return  # compressed frames: their size says nothing of the image's
    expected = (voxels * bits + 7) // 8
    if data < expected:
        raise UserError(f"cannot read {path}: it holds {data} bytes of pixel data where its header needs {expected}: "
                        "the file is cut short; copy it again")


def place_on_grid(volume: Volume, grid: Volume, path: str | os.PathLike = "") -> Volume:
    """``volume``'s labels on ``grid``, whose voxel lattice it must share (as a SEG's frames share their
    source series'): each voxel goes to the grid voxel at its place, 0 elsewhere."""
    to_grid = np.linalg.inv(grid.index_to_physical()) @ volume.index_to_physical()  # (x, y, z, 1) indices
    rotation, offset = to_grid[:3, :3], to_grid[:3, 3]
    if not (np.allclose(rotation, np.round(rotation), atol=1e-3) and np.allclose(offset, np.round(offset), atol=1e-2)
            and np.allclose(np.abs(np.round(rotation)).sum(axis=0), 1)):
        raise UserError(f"{path or 'the segmentation'} does not lie on the grid of the image it is compared with "
                        f"({volume.describe_grid_beside(grid)})")
    placed = np.zeros(grid.shape, volume.array.dtype)
    xyz = np.indices(volume.shape[::-1]).reshape(3, -1)[:, ::1]  # (x, y, z) indices of every voxel
    values = np.transpose(volume.array, (2, 1, 0)).reshape(-1)
    target = (np.round(rotation) @ xyz + np.round(offset)[:, None]).astype(np.int64)
    inside = np.all((target >= 0) & (target < np.array(grid.shape[::-1])[:, None]), axis=0)
    if values[~inside].any():
        raise UserError(f"{path or 'the segmentation'} reaches outside the image it is compared with "
                        f"({volume.describe_grid_beside(grid)})")
    placed[target[2, inside], target[1, inside], target[0, inside]] = values[inside]
    return grid.with_array(placed)
