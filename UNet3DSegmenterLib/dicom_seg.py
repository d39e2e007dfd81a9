"""DICOM Segmentation objects (DICOM SEG): a labelmap as a PACS stores it, written with highdicom, read with pydicom.

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

:func:`read_dicom_seg` reads a SEG back into a labelmap, each frame placed by its own position and
orientation (not by highdicom's volume, which infers the slice spacing from the frames and, in tests
here, made 13 or 23 slices of a 12-slice series): on the grid the frames span,
or, when a grid is given (the source series, the image a SEG is compared with), on that grid, which
its frames must lie on. highdicom and pydicom are an optional extra (``pip install "UNet3DSegmenter[dicom-seg]"``);
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

from .atomic import WRITE_STOPPED, atomic_path, write_stopped
from .errors import UserError
from .labels import Label
from .volume import Volume, float3

SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"
SEG_SUFFIX = ".dcm"
INSTALL_HINT = 'DICOM SEG needs highdicom: pip install "UNet3DSegmenter[dicom-seg]" (or pip install highdicom)'
_MANUFACTURER = "UNet3DSegmenter"
_MAX_FRACTION = 255  # a FRACTIONAL SEG stores probabilities in 0..255

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


def require_highdicom():
    """The highdicom module, or a one-line refusal with the way to install it (asked before any work)."""
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


def _slice_of_each(datasets: list, labelmap: Volume, source: Path) -> list[int]:
    """The labelmap's slice (z index) at each source image, found from the image's position and orientation;
    the frames of the SEG are the source images' own (highdicom takes their geometry from them)."""
    to_index = np.linalg.inv(labelmap.index_to_physical())
    slices = []
    for dataset in datasets:
        try:
            position = [float(value) for value in dataset.ImagePositionPatient]
            orientation = np.array([float(value) for value in dataset.ImageOrientationPatient])
        except (AttributeError, TypeError, ValueError):
            raise UserError(f"{source}: an image has no position or orientation, which a DICOM SEG needs") from None
        x, y, z, _ = to_index @ np.array([*position, 1.0])
        if (len(orientation) != 6 or not np.allclose(orientation, labelmap.direction[:, :2].T.reshape(-1), atol=1e-4)
                or abs(x) > 1e-2 or abs(y) > 1e-2 or abs(z - round(z)) > 1e-2 or not 0 <= round(z) < labelmap.shape[0]):
            raise UserError(f"{source}: an image does not lie on the segmented grid (a series of several stacks or "
                            "orientations): it cannot be referenced by a DICOM SEG")
        slices.append(int(round(z)))
    return slices


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
    hd = require_highdicom()
    import pydicom

    from . import __version__

    path, source = Path(path), Path(source)
    datasets = [pydicom.dcmread(name, stop_before_pixels=True) for name in series_files(source)]
    foreground = [label for label in labels if label.value != 0]
    if not foreground:
        raise UserError(f"cannot write {path}: the model has no foreground label to make a segment of")
    descriptions = _segment_descriptions(hd, foreground, _algorithm(hd, model))
    slices = _slice_of_each(datasets, labelmap, source)
    if probabilities is None:
        numbers = np.zeros(int(labelmap.array.max()) + 1, np.uint16)
        for number, label in enumerate(foreground, start=1):
            if label.value < len(numbers):
                numbers[label.value] = number
        pixels = numbers[labelmap.array[slices]].astype(np.uint8 if len(foreground) < 256 else np.uint16)
    else:
        index = [position for position, label in enumerate(labels) if label.value != 0]
        pixels = np.moveaxis(np.clip(probabilities.array[index][:, slices], 0, 1).astype(np.float32), 0, -1)
    first = datasets[0]
    try:
        segmentation = hd.seg.Segmentation(
            source_images=datasets, pixel_array=pixels, max_fractional_value=_MAX_FRACTION,
            segmentation_type="BINARY" if probabilities is None else "FRACTIONAL",
            segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=_series_number(first),
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=_MANUFACTURER,
            manufacturer_model_name=_MANUFACTURER, software_versions=__version__,
            device_serial_number="0", content_label="UNET3D", content_description=f"segmentation by {model}"[:64],
            series_description=f"Segmentation {model}"[:64] if model else "Segmentation",
        )
    except (ValueError, TypeError, AttributeError) as error:  # what highdicom finds missing in the source
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot write {path}: the series in {source} lacks what a DICOM SEG must reference "
                        f"({reason})") from None
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
        path.parent.mkdir(parents=True, exist_ok=True)
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
        if error.errno in WRITE_STOPPED:
            raise write_stopped(path, error.strerror or str(error)) from None
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None


@dataclass
class DicomSegmentation:
    """A DICOM SEG as read: the labelmap (values = segment numbers), the segments as labels, and its type."""

    labelmap: Volume
    labels: list[Label]
    segmentation_type: str


def read_dicom_seg(path: str | os.PathLike, grid: Volume | None = None) -> DicomSegmentation:
    """Read a DICOM SEG file as a labelmap whose values are the segment numbers (pydicom alone).

    Each frame goes to its place by its own position and orientation. Without ``grid`` the labelmap spans
    the frames the file holds; with one, it lies on that grid, whose slices the frames must lie on. A
    FRACTIONAL SEG reads as the labelmap of its most probable segment at each voxel, background where the
    segments leave more probability than any of them holds.
    """
    path = Path(path)
    dataset = _read_dataset(path)
    frames = _frames(dataset, path)
    if grid is None:
        grid = _grid_of(frames, dataset, path)
    slices = _slices_on(grid, frames, path)
    pixels = _pixels(dataset, path)
    fractional = str(dataset.SegmentationType) == "FRACTIONAL"
    labelmap = np.zeros(grid.shape, np.uint16 if len(dataset.SegmentSequence) > 255 else np.uint8)
    best = np.zeros(grid.shape, np.float32)
    total = np.zeros(grid.shape, np.float32) if fractional else None
    scale = 1.0 / float(getattr(dataset, "MaximumFractionalValue", _MAX_FRACTION) or 1) if fractional else 1.0
    for (segment, _, _), z, frame in zip(frames, slices, pixels):
        values = frame.astype(np.float32) * scale
        if total is not None:
            total[z] += values
        wins = values > best[z]
        labelmap[z][wins], best[z][wins] = segment, values[wins]
    if total is not None:
        labelmap[best <= 1 - total] = 0  # background keeps what the segments leave
    labels = [Label(int(item.SegmentNumber), str(getattr(item, "SegmentLabel", "")), _rgb(item) or (0.5, 0.5, 0.5))
              for item in dataset.SegmentSequence]
    return DicomSegmentation(grid.with_array(labelmap), labels, str(dataset.SegmentationType))


def _rgb(item) -> tuple[float, float, float] | None:
    """A segment's recommended colour as RGB in 0..1 (DICOM stores CIELab), or None when it has none."""
    if "RecommendedDisplayCIELabValue" not in item:
        return None
    try:
        from highdicom.color import CIELabColor
    except ImportError:
        return None
    red, green, blue = CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
    return red / 255, green / 255, blue / 255


def _read_dataset(path: Path):
    """The SEG file's dataset, once its declared size is checked against the pixel data it holds."""
    if not path.is_file():
        raise UserError(f"{path} not found: check the path" if not path.exists() else f"{path} is not a file")
    if not is_dicom_seg_file(path):
        raise UserError(f"{path} is not a DICOM SEG file (no Segmentation storage class in its header)")
    try:
        import pydicom
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    try:
        dataset = pydicom.dcmread(path)
        rows, columns, frames = int(dataset.Rows), int(dataset.Columns), int(getattr(dataset, "NumberOfFrames", 1))
        bits, data = int(dataset.BitsAllocated), len(dataset.PixelData)
        dataset.SegmentSequence, dataset.SegmentationType  # noqa: B018 (required: their absence is damage)
    except Exception as error:  # pydicom raises many kinds for a damaged file
        raise UserError(f"cannot read {path}: not a readable DICOM SEG ({str(error)[:160]})") from None
    _check_declared_size(path, rows, columns, frames, bits, data, dataset.file_meta.TransferSyntaxUID)
    return dataset


_Frame = tuple[int, np.ndarray, np.ndarray]  # segment number, position (LPS mm), orientation (row, column)


def _frames(dataset, path: Path) -> list[_Frame]:
    """Each frame's segment number, position and orientation (per frame, else shared)."""
    shared = dataset.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in dataset else None
    segments = {int(item.SegmentNumber) for item in dataset.SegmentSequence}
    frames = []
    try:
        for item in dataset.PerFrameFunctionalGroupsSequence:
            def group(name: str, item=item):
                return (item if name in item or shared is None else shared)[name][0]

            segment = int(group("SegmentIdentificationSequence").ReferencedSegmentNumber)
            position = np.array([float(value) for value in group("PlanePositionSequence").ImagePositionPatient])
            orientation = np.array([float(value) for value in
                                    group("PlaneOrientationSequence").ImageOrientationPatient]).reshape(2, 3)
            if segment not in segments or position.shape != (3,) or not np.isfinite(position).all():
                raise ValueError(f"a frame of segment {segment} at {position.tolist()}")
            frames.append((segment, position, orientation))
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as error:
        raise UserError(f"cannot read {path}: its frames do not say where they lie ({str(error)[:120]})") from None
    if len(frames) != int(getattr(dataset, "NumberOfFrames", 1)):
        raise UserError(f"cannot read {path}: it describes {len(frames)} frames and holds {dataset.NumberOfFrames}")
    return frames


def _grid_of(frames: list[_Frame], dataset, path: Path) -> Volume:
    """The smallest grid that holds every frame: the frames' orientation and pixel spacing, slices from the
    first to the last frame at the declared spacing between slices where the frames keep to it."""
    row, column = frames[0][2]
    if any(not np.allclose(frame[2], frames[0][2], atol=1e-4) for frame in frames):
        raise UserError(f"cannot read {path}: its frames lie in several orientations, which one volume cannot hold")
    normal = np.cross(row, column)
    heights = np.array([float(position @ normal) for _, position, _ in frames])
    try:
        measures = dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        row_spacing, column_spacing = (float(value) for value in measures.PixelSpacing)
        declared = float(getattr(measures, "SpacingBetweenSlices", 0) or 0)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        raise UserError(f"cannot read {path}: it declares no pixel spacing") from None
    distinct = np.unique(np.round(heights - heights.min(), 3))
    gaps = np.diff(distinct)
    spacing = declared if declared > 0 and _on_lattice(distinct, declared) else float(gaps.min()) if len(gaps) else 1.0
    if not _on_lattice(distinct, spacing):
        raise UserError(f"cannot read {path}: its frames are not evenly spaced, which one volume cannot hold")
    count = int(round(distinct[-1] / spacing)) + 1
    from .integrity import MAX_SIZE, MAX_VOXELS

    if count > MAX_SIZE or count * int(dataset.Rows) * int(dataset.Columns) > MAX_VOXELS:
        raise UserError(f"cannot read {path}: its frames span {count} slices, which no scan has; the file is damaged")
    origin = frames[int(np.argmin(heights))][1]
    return Volume(np.zeros((count, int(dataset.Rows), int(dataset.Columns)), np.uint8),
                  (column_spacing, row_spacing, spacing), float3(origin), np.stack([row, column, normal], axis=1))


def _on_lattice(heights: np.ndarray, spacing: float) -> bool:
    steps = heights / spacing
    return bool(np.allclose(steps, np.round(steps), atol=1e-2))


def _slices_on(grid: Volume, frames: list[_Frame], path: Path) -> list[int]:
    """The grid slice of each frame; every frame must be one of the grid's slices, in its orientation."""
    to_index = np.linalg.inv(grid.index_to_physical())
    slices = []
    for _, position, orientation in frames:
        x, y, z, _ = to_index @ np.array([*position, 1.0])
        if (not np.allclose(orientation, grid.direction[:, :2].T, atol=1e-3) or abs(x) > 1e-2 or abs(y) > 1e-2
                or abs(z - round(z)) > 1e-2 or not 0 <= round(z) < grid.shape[0]):
            raise UserError(f"{path} does not lie on the grid of the image it is compared with (a frame at "
                            f"{np.round(position, 3).tolist()} mm is not one of its slices: "
                            f"{grid.describe_grid()})")
        slices.append(int(round(z)))
    return slices


def _pixels(dataset, path: Path) -> np.ndarray:
    """The frames' pixels, (frames, rows, columns)."""
    try:
        pixels = dataset.pixel_array
    except Exception as error:  # a codec missing or damaged data: pydicom's kinds vary
        raise UserError(f"cannot read {path}: its pixel data do not decode ({str(error)[:160]})") from None
    return pixels.reshape(-1, int(dataset.Rows), int(dataset.Columns))


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
