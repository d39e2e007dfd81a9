"""Datalists: which image goes with which labelmap, and what the label values mean.

Three layouts are understood, so that data can be used where it lies:

- a folder pair: ``images/`` and ``labels/`` side by side, matched by case name
  (``images/case_01.nii.gz`` with ``labels/case_01.nii.gz``); a case may also be a subfolder holding
  a DICOM series (``images/case_01/`` with ``labels/case_01/`` or ``labels/case_01.nrrd``); where
  image and label files are named differently, a pattern (a regular expression whose first group
  is the case name) finds the case in both: ``'^(.+?)(?:_SEMANTIC)?_LFOV$'`` pairs the HipMRI data
  set's ``B006_Week0_LFOV.nii.gz`` with ``B006_Week0_SEMANTIC_LFOV.nii.gz``;
- a Medical Segmentation Decathlon folder: ``dataset.json`` (its ``training`` list, ``labels`` and
  ``modality``) with ``imagesTr/`` and ``labelsTr/``;
- a JSON list: a ``.json`` file holding ``[{"image": ..., "label": ...}, ...]`` with paths relative
  to the file (files or DICOM series folders), or an object with such a list under ``"training"``
  and optional ``labels``/``modality``. An entry may add ``"name"`` (the case's name, e.g. where
  series folders share one) and ``"spacing": [x, y, z]`` (mm, for ``.npy`` arrays).

A ``.npy`` array has no geometry: its spacing is the entry's, else the one given to
:func:`load_datalist` (``train --input-spacing``), else 1 mm.

Loading a case checks that image and labelmap share one grid (or resamples the labels onto the
image when asked), casts labels to integers and refuses values that the label map does not name.

Example::

    >>> datalist = load_datalist("Task04_Hippocampus")
    >>> image, labels = load_case(datalist.cases[0], datalist.label_names)
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .io import FORMATS, case_name, check_input_spacing, read_volume, volume_suffix, volumes_by_case
from .labels import Label
from .preprocess import resample_to_grid
from .volume import Volume


@dataclass
class Case:
    """One labelled example: its name (file name without extension), the two files (or DICOM series
    folders), and the spacing (x, y, z) in mm of its ``.npy`` arrays when one was given."""

    name: str
    image: Path
    label: Path
    spacing: tuple[float, float, float] | None = None


@dataclass
class Datalist:
    """The labelled cases of a dataset, with label names and modality when the dataset says them.

    ``label_names`` maps label value -> name (0 is background) or is None when the layout does not
    name them (a folder pair); ``label_colors`` maps value -> (r, g, b) in 0..1 where the dataset
    gives colours (``label_colors`` in dataset.json, as the Slicer module writes it);
    ``modality`` is e.g. 'CT' or 'MRI', or None when unknown.
    """

    cases: list[Case]
    label_names: dict[int, str] | None = None
    modality: str | None = None
    source: Path = field(default_factory=Path)
    label_colors: dict[int, tuple[float, float, float]] | None = None

    def subset(self, names: list[str]) -> list[Case]:
        """The cases called ``names``, in that order."""
        by_name = {case.name: case for case in self.cases}
        return [by_name[name] for name in names]


def load_datalist(path: str | os.PathLike, input_spacing: tuple[float, float, float] | None = None,
                  case_pattern: str | None = None) -> Datalist:
    """Discover the cases at ``path``: a folder pair, a Decathlon folder, or a JSON list file.

    ``input_spacing`` (x, y, z) in mm is the spacing of ``.npy`` cases that a JSON list gives none for;
    ``case_pattern`` matches the image and label files of a folder pair (see :func:`folder_pair`).
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"training data not found: {path}: give a folder with images/ and labels/, "
                        "a Decathlon folder with dataset.json, or a JSON list")
    if path.is_file():
        datalist = _from_json(path)
    elif (path / "dataset.json").is_file():
        datalist = _from_json(path / "dataset.json")
    elif (path / "images").is_dir() and (path / "labels").is_dir():
        datalist = folder_pair(path / "images", path / "labels", case_pattern)
    else:
        raise UserError(f"{path} holds neither images/ and labels/ folders nor a dataset.json: "
                        "see 'unet3d-segmenter train --help' for the layouts")
    if input_spacing is not None:
        check_input_spacing(input_spacing, [file for case in datalist.cases for file in (case.image, case.label)])
        for case in datalist.cases:
            case.spacing = case.spacing or input_spacing
    return datalist


def folder_pair(image_dir: str | os.PathLike, label_dir: str | os.PathLike, case_pattern: str | None = None) -> Datalist:
    """Pair every volume (file or DICOM series folder) in ``image_dir`` with the one of the same case name
    in ``label_dir``; with ``case_pattern`` (a regular expression), the case name is its first group
    in each file name without extension."""
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise UserError(f"folder not found: {folder}: check the path")
    images, labels = volumes_by_case(image_dir), volumes_by_case(label_dir)
    if case_pattern is not None:
        pattern = compile_case_pattern(case_pattern)
        images, labels = _cases_by_pattern(images, pattern), _cases_by_pattern(labels, pattern)
    if not images:
        raise UserError(f"{image_dir} holds no volume files ({FORMATS}) and no DICOM series folders")
    unmatched = sorted(set(images) ^ set(labels))
    if unmatched:
        side = "label" if unmatched[0] in images else "image"
        raise UserError(f"case {unmatched[0]} has no {side} file ({len(unmatched)} unmatched in all): "
                        f"{image_dir} and {label_dir} must hold files with the same names")
    cases = [Case(name, images[name], labels[name]) for name in sorted(images)]
    return Datalist(cases, None, None, image_dir.parent)


def compile_case_pattern(case_pattern: str) -> re.Pattern:
    """``--case-pattern``, compiled: a regular expression with a group (the case name)."""
    try:
        pattern = re.compile(case_pattern)
    except re.error as error:
        raise UserError(f"--case-pattern {case_pattern!r} is not a valid regular expression ({error})") from None
    if pattern.groups < 1:
        raise UserError(f"--case-pattern {case_pattern!r} has no group: put the case name in parentheses, e.g. "
                        "'^(.+?)(?:_SEMANTIC)?_LFOV$'")
    return pattern


def _cases_by_pattern(files: dict[str, Path], pattern: re.Pattern) -> dict[str, Path]:
    """``files`` keyed by the first group of ``pattern`` in their names; refuses a name it misses or two
    files of one case."""
    cases: dict[str, Path] = {}
    for name, path in sorted(files.items()):
        found = pattern.search(name)
        if found is None or not found.group(1):
            raise UserError(f"{path} does not match --case-pattern {pattern.pattern!r}: fix the pattern, or move the "
                            "file out of the folder")
        if found.group(1) in cases:
            raise UserError(f"{cases[found.group(1)]} and {path} are both case {found.group(1)!r} by --case-pattern "
                            f"{pattern.pattern!r}: make the pattern tell them apart")
        cases[found.group(1)] = path
    return cases


def _from_json(path: Path) -> Datalist:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path} as JSON ({error})") from None
    entries = record.get("training") if isinstance(record, dict) else record
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{path} lists no cases: expected a list of {{\"image\": ..., \"label\": ...}} "
                        "(or one under \"training\")")
    cases = [_case_from_entry(entry, path, index) for index, entry in enumerate(entries)]
    names = [case.name for case in cases]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise UserError(f"{path} lists case {duplicate} twice: case file names must be unique, or give each entry "
                        "a \"name\"")
    label_names = _label_names(record.get("labels"), path) if isinstance(record, dict) else None
    label_colors = _label_colors(record.get("label_colors"), path) if isinstance(record, dict) else None
    return Datalist(cases, label_names, _modality(record), path.parent, label_colors)


def _case_from_entry(entry, path: Path, index: int) -> Case:
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise UserError(f"{path}: entry {index} must be an object with \"image\" and \"label\" paths")
    image, label = (path.parent / str(entry[key]) for key in ("image", "label"))
    for file in (image, label):
        if not file.exists():
            raise UserError(f"{path}: entry {index} names {file}, which does not exist")
    return Case(str(entry.get("name") or case_name(image)), image, label, _entry_spacing(entry, path, index))


def _entry_spacing(entry: dict, path: Path, index: int) -> tuple[float, float, float] | None:
    if "spacing" not in entry:
        return None
    spacing = entry["spacing"]
    if not (isinstance(spacing, list) and len(spacing) == 3 and all(isinstance(value, (int, float)) and value > 0
                                                                     for value in spacing)):
        raise UserError(f"{path}: entry {index}: \"spacing\" must be three positive numbers [x, y, z] in mm")
    if not any(volume_suffix(str(entry[key])) == ".npy" for key in ("image", "label")):
        raise UserError(f"{path}: entry {index} gives a \"spacing\", but its files record their own: "
                        "\"spacing\" is for .npy arrays")
    return float(spacing[0]), float(spacing[1]), float(spacing[2])


def _label_names(labels, path: Path) -> dict[int, str] | None:
    if labels is None:
        return None
    try:
        names = {int(value): str(name) for value, name in labels.items()}
    except (AttributeError, ValueError):
        raise UserError(f"{path}: \"labels\" must map integer values to names, e.g. {{\"0\": \"background\"}}") \
            from None
    names.setdefault(0, "background")
    return dict(sorted(names.items()))


def _label_colors(colors, path: Path) -> dict[int, tuple[float, float, float]] | None:
    if colors is None:
        return None
    try:
        parsed = {int(value): tuple(float(c) for c in color) for value, color in colors.items()}
    except (AttributeError, TypeError, ValueError):
        parsed = {}
    if not parsed or any(len(color) != 3 or not all(0 <= c <= 1 for c in color) for color in parsed.values()):
        raise UserError(f"{path}: \"label_colors\" must map label values to [r, g, b] in 0..1, "
                        "e.g. {\"1\": [1, 0, 0]}")
    return {value: (color[0], color[1], color[2]) for value, color in parsed.items()}


def write_datalist(folder: str | os.PathLike, entries: list[dict], labels: list[Label], name: str,
                   description: str = "", modality: str | None = None) -> Path:
    """Write ``folder/dataset.json`` in the Decathlon layout that :func:`load_datalist` reads back.

    ``entries`` are ``{"image": ..., "label": ...}`` with paths relative to ``folder`` (other keys are
    kept as they are); ``labels`` give value -> name and colour (background is added).
    """
    from .atomic import write_json

    record: dict = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "labels": {"0": "background", **{str(label.value): label.name for label in labels if label.value != 0}},
        "label_colors": {str(label.value): [round(float(c), 6) for c in label.color]
                         for label in labels if label.value != 0},
        "numTraining": len(entries),
        "training": entries,
    }
    if modality:
        record["modality"] = {"0": modality}
    return write_json(record, Path(folder) / "dataset.json")


def _modality(record) -> str | None:
    modality = record.get("modality") if isinstance(record, dict) else None
    if isinstance(modality, dict):
        modality = modality.get("0", next(iter(modality.values()), None))
    return str(modality) if modality else None


def load_case(case: Case, label_names: dict[int, str] | None = None,
              resample_labels: bool = False) -> tuple[Volume, Volume]:
    """Read a case's image and labels; the labels come back as integers on the image's grid.

    Raises :class:`UserError` when the grids differ (unless ``resample_labels``: then the labels are
    resampled onto the image by nearest neighbour), when a label is not a whole number, or when a
    value is missing from ``label_names``.
    """
    image, labels = read_volume(case.image, spacing=case.spacing), read_volume(case.label, spacing=case.spacing)
    if labels.channels != 1:
        raise UserError(f"case {case.name}: the labelmap {case.label} has {labels.channels} channels; "
                        "a labelmap must be a single 3D volume")
    if not image.same_grid(labels):
        if not resample_labels:
            raise UserError(
                f"case {case.name}: image and labels lie on different grids (image {image.describe_grid_beside(labels)}"
                f"; labels {labels.describe_grid_beside(image)}): fix the files, or ask to resample the labels onto the image "
                "(--resample-labels)")
        labels = resample_to_grid(labels, image, "nearest")
    return image, labels.with_array(integer_labels(labels.array, case, label_names))


def integer_labels(array: np.ndarray, case: Case, label_names: dict[int, str] | None) -> np.ndarray:
    """``array`` as the smallest fitting integer type, refusing fractions and unnamed values."""
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise UserError(f"case {case.name}: the labelmap {case.label} holds non-integer values; "
                            "labels must be whole numbers")
    values = np.unique(array)
    if values.min() < 0 or values.max() > 65535:
        raise UserError(f"case {case.name}: label values must lie in 0..65535, found {values.min()}..{values.max()}")
    if label_names is not None:
        unknown = sorted(int(value) for value in values if int(value) not in label_names)
        if unknown:
            raise UserError(f"case {case.name}: the labelmap holds value(s) {unknown} that the label map does not "
                            f"name (known: {sorted(label_names)}): fix the labels or the dataset's \"labels\"")
    return array.astype(np.uint8 if values.max() < 256 else np.uint16)
