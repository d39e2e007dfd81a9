"""Many cases in one run: which cases a folder or a tree holds, where their outputs go, which are done,
and which share of them this process takes.

- **Cases**: the volume files directly inside the input folder, and every DICOM series folder at any
  depth below it (a tree that ``dicom-sort`` made, or any tree of series folders). Series of modality
  SEG (segmentations, not images) are left out.
- **Filter**: :class:`SeriesFilter` keeps the series whose modality and series description match
  (``modality=CT``, ``description=*portal*``: shell patterns, any case).
- **Mirrored outputs**: a case's outputs lie at its own place relative to the input, under the
  output folder: ``sorted/Doe/20240101_CT/002_Abdomen`` -> ``out/Doe/20240101_CT/002_Abdomen.dcm``.
- **Done**: outputs are written whole or not at all, so a case whose outputs all exist is done, and a
  run started again skips it.
- **Shares**: :func:`share` gives process ``index`` of ``count`` every count-th case of the whole list
  (before anything is skipped, so that every process agrees on who does what whatever is done
  already): ``--shard i/N`` for a Slurm array job, the rank and world size under ``torchrun``.

Example::

    >>> cases = find_cases("sorted/", "results/", output_format="dicom-seg",
    ...                    series_filter=SeriesFilter.parse(["modality=CT"]))   # doctest: +SKIP
    >>> todo = [case for case in share(cases, 0, 1) if not case.done]          # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .choices import OUTPUT_FORMATS
from .errors import UserError
from .io import FORMATS, case_name, holds_dicom_files, list_volume_files, volume_suffix

FORMAT_SUFFIXES = dict(zip(OUTPUT_FORMATS, (".nii.gz", ".nrrd", ".mha", ".dcm")))
"""The file extension of each ``--output-format`` (choices.OUTPUT_FORMATS)."""

_FILTER_KEYS = ("modality", "description")


@dataclass(frozen=True)
class SeriesFilter:
    """Which DICOM series to segment: shell patterns (any case) for the modality and series description;
    ``None`` accepts any. Volume files carry no such tags and are always kept."""

    modality: str | None = None
    description: str | None = None

    @classmethod
    def parse(cls, items: Sequence[str] | None) -> SeriesFilter:
        """From ``KEY=PATTERN`` strings, KEY one of modality, description."""
        values: dict[str, str] = {}
        for item in items or []:
            key, _, pattern = item.partition("=")
            key = key.strip().lower()
            if key not in _FILTER_KEYS or not pattern:
                raise UserError(f"--series-filter {item!r}: write KEY=PATTERN with KEY one of "
                                f"{', '.join(_FILTER_KEYS)}, e.g. modality=CT or 'description=*portal*'")
            if key in values:
                raise UserError(f"--series-filter gives {key} twice ({values[key]!r} and {pattern!r}): give it once")
            values[key] = pattern
        return cls(**values)

    def accepts(self, modality: str, description: str) -> bool:
        return all(pattern is None or fnmatch.fnmatch(value.lower(), pattern.lower())
                   for pattern, value in ((self.modality, modality), (self.description, description)))


@dataclass
class Case:
    """One input and where its outputs go (``probabilities`` None when not asked for)."""

    source: Path
    output: Path
    probabilities: Path | None = None
    name: str = field(default="")

    @property
    def outputs(self) -> list[Path]:
        return [self.output] + ([self.probabilities] if self.probabilities is not None else [])

    @property
    def done(self) -> bool:
        """All outputs exist: they were written whole (atomically) by an earlier run."""
        return all(path.exists() for path in self.outputs)


def find_cases(source: str | os.PathLike, output: str | os.PathLike, probabilities: str | os.PathLike | None = None,
               output_format: str | None = None, series_filter: SeriesFilter | None = None) -> list[Case]:
    """The cases of the folder ``source`` (see the module's doc) with their mirrored outputs, in path order.

    ``output_format`` is one of ``choices.OUTPUT_FORMATS``; by default a file keeps its format and a
    DICOM series becomes NIfTI. Raises :class:`UserError` when nothing is left to segment, or when
    DICOM SEG output is asked for a case that is not a DICOM series.
    """
    source, output = Path(source), Path(output)
    series_filter = series_filter or SeriesFilter()
    found = list_volume_files(source) + _series_folders(source, output)
    kept = [path for path in found if path.is_file() or _wanted(path, series_filter)]
    if not found:
        raise UserError(f"{source} holds no volume files ({FORMATS}) and no DICOM series")
    if not kept:
        raise UserError(f"no series in {source} passes --series-filter ({_describe(series_filter)}); "
                        f"{len(found)} series or volumes were looked at")
    cases = []
    for path in kept:
        if output_format == "dicom-seg" and path.is_file():
            raise UserError(f"{path} is not a DICOM series: DICOM SEG output (--output-format dicom-seg) references "
                            "the DICOM series it segments; choose another --output-format for volume files")
        relative = path.relative_to(source)
        name = case_name(relative.name) + (FORMAT_SUFFIXES[output_format] if output_format else
                                           volume_suffix(path) or ".nii.gz")
        place = relative.parent / name
        cases.append(Case(path, output / place, Path(probabilities) / place if probabilities else None,
                          "/".join(relative.parent.parts + (case_name(relative.name),))))
    return cases


def _series_folders(source: Path, output: Path) -> list[Path]:
    """Every folder below ``source`` that holds DICOM files (the output folder and hidden ones left out)."""
    excluded = output.resolve()
    series = []
    for folder, subfolders, _ in os.walk(source):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        path = Path(folder)
        if path.resolve() == excluded:
            subfolders.clear()
        elif path != source and holds_dicom_files(path):
            series.append(path)
    return series


def _wanted(folder: Path, series_filter: SeriesFilter) -> bool:
    """A series to segment: not a segmentation, and passing the filter."""
    modality, description = _series_tags(folder)
    return modality.upper() != "SEG" and series_filter.accepts(modality, description)


def _series_tags(folder: Path) -> tuple[str, str]:
    """Modality and series description of the series in ``folder`` (from its first DICOM file)."""
    from .dicom import read_dicom_header
    from .dicom_seg import is_dicom_seg_file
    from .io import is_dicom_file

    for path in sorted(folder.iterdir()):
        if is_dicom_seg_file(path):
            return "SEG", ""
        if is_dicom_file(path) and (header := read_dicom_header(path)) is not None:
            return header.modality, header.series_description
    return "", ""


def _describe(series_filter: SeriesFilter) -> str:
    return ", ".join(f"{key}={getattr(series_filter, key)}" for key in _FILTER_KEYS
                     if getattr(series_filter, key) is not None) or "none"


def parse_shard(text: str) -> tuple[int, int]:
    """``'i/N'`` -> (i, N): share i (0 <= i < N) of N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or int(match[2]) < 1 or int(match[1]) >= int(match[2]):
        raise UserError(f"--shard {text!r}: write i/N with 0 <= i < N, e.g. --shard 0/4 for the first of four shares "
                        "(a Slurm array job: --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT with --array=0-3)")
    return int(match[1]), int(match[2])


def share(cases: list[Case], index: int, count: int) -> list[Case]:
    """Process ``index``'s share of ``count``: cases index, index + count, index + 2 count, ..."""
    return cases[index::count]
