"""DICOM files by their tags: sort a tree of mixed files into one folder per patient, study and series.

Scanners and archives hand out DICOM files of many patients and series mixed in one tree, often
with meaningless names (``IM000123``, UIDs). :func:`sort_dicom` reads each file's tags and gives
every series a folder of its own, named so that a person can find it::

    OUTPUT/<patient name>_<patient ID>/<study date>_<study description>/<series number>_<series description>/IM0001.dcm

Names keep letters, digits and ``. + -``; anything else becomes ``_`` (``Doe^John`` -> ``Doe_John``).
A name two patients, studies or series would share gets ``-2``, ``-3``, ... in order of their UIDs.
Files are named by instance number (``IM0001.dcm``), so a file manager lists them in slice order;
a file without one keeps its own name. Files are copied (moved only when asked), each atomically, and
a file already at its place with the same bytes is left alone (and, when moving, left in the input),
so running the sort again after more files arrive adds only those. Files that are not DICOM (no ``DICM`` marker after the 128-byte
preamble), DICOM files that hold no image (DICOMDIR, reports, structure sets), and second copies of
an image (the same SOP instance UID) are skipped and reported.

Example::

    >>> report = sort_dicom("export/", "sorted/")
    >>> print("\\n".join(report.summary()))
"""

from __future__ import annotations

import filecmp
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk

from .atomic import atomic_path
from .errors import UserError
from .io import instance_file_name, is_dicom_file
from .paths import safe_file_name

SortProgress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)``; stage is 'reading' or 'copying' (or 'moving')."""

# The tags that place a file: DICOM keyword -> tag as GDCM names it.
_TAGS = {
    "patient_name": "0010|0010", "patient_id": "0010|0020",
    "study_uid": "0020|000d", "study_date": "0008|0020", "study_description": "0008|1030",
    "series_uid": "0020|000e", "series_number": "0020|0011", "series_description": "0008|103e",
    "modality": "0008|0060", "instance_number": "0020|0013", "sop_instance_uid": "0008|0018",
}


@dataclass(frozen=True)
class DicomHeader:
    """The tags of one DICOM image file that say where it belongs ('' where a tag is absent)."""

    path: Path
    patient_name: str = ""
    patient_id: str = ""
    study_uid: str = ""
    study_date: str = ""
    study_description: str = ""
    series_uid: str = ""
    series_number: str = ""
    series_description: str = ""
    modality: str = ""
    instance_number: str = ""
    sop_instance_uid: str = ""

    @property
    def instance(self) -> int | None:
        """The instance number, or None where the tag holds none that could be one (text, inf, NaN, or a
        number beyond the 32 bits DICOM gives it)."""
        try:
            number = int(float(self.instance_number))
        except (ValueError, OverflowError):
            return None
        return number if 0 <= number < 2**31 else None


def read_dicom_header(path: str | os.PathLike) -> DicomHeader | None:
    """The placing tags of a DICOM image file, or None when GDCM cannot read it as an image."""
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    values = {name: reader.GetMetaData(tag).strip(" \0") for name, tag in _TAGS.items() if reader.HasMetaDataKey(tag)}
    return DicomHeader(Path(path), **values)


@dataclass
class SortedSeries:
    """One series as sorted: its folder (relative to the output), modality and number of image files."""

    folder: Path
    modality: str
    files: int


@dataclass
class SortReport:
    """What :func:`sort_dicom` found and did."""

    source: Path
    output: Path
    action: str  # 'copied', 'moved', or 'would copy' / 'would move' for a dry run
    patients: int = 0
    studies: int = 0
    series: list[SortedSeries] = field(default_factory=list)
    not_dicom: list[Path] = field(default_factory=list)
    without_image: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)
    written: int = 0
    already_there: int = 0

    @property
    def images(self) -> int:
        return sum(series.files for series in self.series)

    def summary(self) -> list[str]:
        """The report in lines a person reads: counts, one line per series, what was skipped and done."""
        lines = [f"found {_count(self.patients, 'patient')}, {_count(self.studies, 'study', 'studies')}, "
                 f"{_count(len(self.series), 'series', 'series')}, {_count(self.images, 'image file')} in {self.source}"]
        width = max((len(str(series.folder)) for series in self.series), default=0)
        lines += [f"  {str(series.folder):<{width}}  {_count(series.files, 'file'):>11}  {series.modality}".rstrip()
                  for series in self.series]
        for paths, what in ((self.not_dicom, "not DICOM"),
                            (self.without_image, "DICOM without an image (DICOMDIR, report, structure set, ...)"),
                            (self.duplicates, "a second copy of an image already sorted (same SOP instance UID)")):
            if paths:
                lines.append(f"skipped {_count(len(paths), 'file')}, {what}: {_some(paths, self.source)}")
        done = f"{self.action} {_count(self.written, 'file')} into {self.output}"
        if self.already_there:
            done += f"; {self.already_there} {'was' if self.already_there == 1 else 'were'} already there"
        return lines + [done]


def sort_dicom(source: str | os.PathLike, output: str | os.PathLike, move: bool = False, dry_run: bool = False,
               progress: SortProgress | None = None) -> SortReport:
    """Sort the DICOM files under ``source`` into ``output``/patient/study/series (see the module's doc).

    Copies unless ``move``; with ``dry_run`` only reports. Raises :class:`UserError` when ``source`` is
    not a folder, ``output`` is ``source``, or no DICOM image is found.
    """
    source, output = Path(source), Path(output)
    _check_folders(source, output)
    action = ("would move" if move else "would copy") if dry_run else ("moved" if move else "copied")
    report = SortReport(source, output, action)
    files = _files_under(source, output)
    headers = []
    for index, path in enumerate(files, start=1):
        if not is_dicom_file(path):
            report.not_dicom.append(path)
        elif (header := read_dicom_header(path)) is None:
            report.without_image.append(path)
        else:
            headers.append(header)
        if progress is not None:
            progress("reading", index, len(files))
    if not headers:
        raise UserError(f"found no DICOM image in {source} ({_count(len(files), 'file')} looked at): check the folder")
    plan = _plan(headers, report)
    if not dry_run:
        _carry_out(plan, output, move, report, progress)
    else:
        report.written = len(plan)
    return report


def _check_folders(source: Path, output: Path) -> None:
    if not source.is_dir():
        raise UserError(f"{source} is not a folder: give the folder that holds the DICOM files")
    if output.exists() and not output.is_dir():
        raise UserError(f"{output} is a file: give a folder for the sorted series")
    if output.resolve() == source.resolve():
        raise UserError(f"the output folder is the input folder {source}: give another folder for the sorted series")


def _files_under(source: Path, output: Path) -> list[Path]:
    """Every file under ``source`` in name order, leaving out ``output`` when it lies inside."""
    excluded = output.resolve()
    files = []
    for folder, subfolders, names in os.walk(source):
        if Path(folder).resolve() == excluded:
            subfolders.clear()
            continue
        subfolders.sort()
        files += [Path(folder) / name for name in sorted(names)]
    return files


def _plan(headers: list[DicomHeader], report: SortReport) -> list[tuple[Path, Path]]:
    """(source file, path relative to the output) for every image to sort; fills the report's counts."""
    patients = _group(headers, lambda h: (h.patient_id, h.patient_name))
    plan = []
    report.patients = len(patients)
    for patient_folder, patient_headers in _named(patients, lambda h: _readable(
            *dict.fromkeys([h.patient_name, h.patient_id]), fallback="unknown_patient")):
        studies = _group(patient_headers, lambda h: h.study_uid)
        report.studies += len(studies)
        for study_folder, study_headers in _named(studies, lambda h: _readable(
                h.study_date, h.study_description, fallback="study")):
            for series_folder, series_headers in _named(_group(study_headers, lambda h: h.series_uid), _series_name):
                folder = Path(patient_folder, study_folder, series_folder)
                files = _file_names(series_headers, report)
                plan += [(path, folder / name) for path, name in files]
                report.series.append(SortedSeries(folder, series_headers[0].modality, len(files)))
    return plan


def _group(headers: Iterable[DicomHeader], key) -> dict:
    groups: dict = {}
    for header in headers:
        groups.setdefault(key(header), []).append(header)
    return groups


def _named(groups: dict, name) -> list[tuple[str, list[DicomHeader]]]:
    """Each group with its folder name; a name already taken gets -2, -3, ... in order of the groups' keys."""
    taken: dict[str, int] = {}
    named = []
    for key in sorted(groups, key=lambda key: (name(groups[key][0]), str(key))):
        base = name(groups[key][0])
        taken[base] = taken.get(base, 0) + 1
        named.append((base if taken[base] == 1 else f"{base}-{taken[base]}", groups[key]))
    return named


def _series_name(header: DicomHeader) -> str:
    number = header.series_number
    number = f"{int(number):03d}" if number.isdigit() else number
    return _readable(number, header.series_description or header.modality, fallback="series")


def _file_names(headers: list[DicomHeader], report: SortReport) -> list[tuple[Path, str]]:
    """Each image's file name in its series folder: IM<instance number>.dcm; second copies are skipped."""
    ordered = sorted(headers, key=lambda h: (h.instance is None, h.instance or 0, str(h.path)))
    count = max((h.instance or 0 for h in headers), default=0)
    names: list[tuple[Path, str]] = []
    seen_uids, taken = set(), set()
    for header in ordered:
        if header.sop_instance_uid and header.sop_instance_uid in seen_uids:
            report.duplicates.append(header.path)
            continue
        seen_uids.add(header.sop_instance_uid)
        name = instance_file_name(header.instance, count) if header.instance is not None else \
            _readable(header.path.stem, fallback="image") + ".dcm"
        stem, number = name[:-4], 1
        while name in taken:
            number += 1
            name = f"{stem}_{number}.dcm"
        taken.add(name)
        names.append((header.path, name))
    return names


def _carry_out(plan: list[tuple[Path, Path]], output: Path, move: bool, report: SortReport,
               progress: SortProgress | None) -> None:
    for index, (path, relative) in enumerate(plan, start=1):
        target = _free_target(output / relative, path)
        if target is None:
            report.already_there += 1
        else:
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(target, ".dcm") as temporary:
                    if move:
                        shutil.move(path, temporary)
                    else:
                        shutil.copy2(path, temporary)
            except OSError as error:
                raise UserError(f"cannot write {target}: {error.strerror or error} "
                                f"({_count(report.written, 'file')} {report.action} so far; run again to finish)") from None
            report.written += 1
        if progress is not None:
            progress("moving" if move else "copying", index, len(plan))


def _free_target(target: Path, source: Path) -> Path | None:
    """``target``, or None when it already holds the same bytes, or the next free ``_2``, ``_3`` name."""
    candidate, number = target, 1
    while candidate.exists():
        if filecmp.cmp(candidate, source, shallow=False):
            return None
        number += 1
        candidate = target.with_name(f"{target.stem}_{number}{target.suffix}")
    return candidate


def _readable(*parts: str, fallback: str) -> str:
    """A folder or file name from tag values: letters, digits and . + - kept, the rest '_', at most 64 characters."""
    return safe_file_name("_".join(part for part in parts if part), fallback, limit=64)


def _count(number: int, singular: str, plural: str | None = None) -> str:
    return f"{number} {singular if number == 1 else plural or singular + 's'}"


def _some(paths: list[Path], source: Path, shown: int = 5) -> str:
    names = [str(path.relative_to(source)) if path.is_relative_to(source) else str(path) for path in paths[:shown]]
    return ", ".join(names) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")
