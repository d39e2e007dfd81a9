"""Atomic file writes: an output appears whole, or not at all, whatever happens while it is written."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError
from .progress import json_ready


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` when the block succeeds.

    ``suffix`` ends the temporary name, for writers that choose the format by extension
    (e.g. '.nii.gz'). If the block raises, the temporary file is removed and ``path`` is untouched.

    Example::

        >>> with atomic_path("scores.json") as temporary:
        ...     temporary.write_text("{}")
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


WRITE_STOPPED = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
"""The system's reasons for a write that stopped part-way: no space, file too large, quota."""


def write_stopped(path: str | os.PathLike, detail: str) -> UserError:
    """One line for a write that stopped part-way: the disk (or a quota, or a file size limit) took no more.

    The atomic write has removed the partial file, so nothing lies under ``path``; the free space is
    given because a full disk is the usual cause.
    """
    path = Path(path)
    try:
        free = f"{shutil.disk_usage(path.parent).free / 1e6:.0f} MB free"
    except OSError:
        free = "free space unknown"
    return UserError(f"cannot write {path}: the write stopped part-way ({detail}; {free} there): the disk is "
                     "full or a file size limit was reached; nothing was written, free some space or write elsewhere")


_STALE_FILE = re.compile(r"\.(.+)\.[0-9a-f]{8}\.partial")  # atomic_path's temporary files
_STALE_FOLDER = re.compile(r"\.(.+)\.partial-")  # a DICOM series' staging folder (io.write_dicom_series)


def remove_stale_partials(paths: Iterable[str | os.PathLike]) -> None:
    """Remove what an interrupted earlier write of ``paths`` left (a killed process renames nothing and
    cleans nothing up): the temporary files of :func:`atomic_path` and the staging folders of a DICOM
    series. The next command that writes the same paths calls this first; each folder is listed once."""
    names_by_folder: dict[Path, set[str]] = {}
    for path in map(Path, paths):
        names_by_folder.setdefault(path.parent, set()).add(path.name)
    for folder, names in names_by_folder.items():
        try:
            entries = list(os.scandir(folder))
        except OSError:  # not there yet: nothing to clean
            continue
        for entry in entries:
            file, staging = _STALE_FILE.match(entry.name), _STALE_FOLDER.match(entry.name)
            if file and file.group(1) in names and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
            elif staging and staging.group(1) in names and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(result: dict, path: str | os.PathLike) -> Path:
    """Write ``result`` as JSON atomically (temporary file, then rename); infinite distances become null.

    JSON has no infinity, and Python's ``Infinity`` is not valid JSON for other readers.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write JSON to {path}: it is a folder; give a file name such as metrics.json")
    text = json.dumps(json_ready(result), indent=2, allow_nan=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, text)
    except OSError as error:
        if error.errno in WRITE_STOPPED:
            raise write_stopped(path, error.strerror or str(error)) from None
        raise UserError(f"cannot write {path}: {error.strerror or error}") from None
    return path
