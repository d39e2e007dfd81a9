"""Paths made from names, and outputs that never land on inputs.

Case names come from datalists, DICOM tags and scene node names that the user may not have written:
``"../../escaped"`` or ``"/etc/x"`` must not pick where a file goes. :func:`safe_file_name` turns any
name into one harmless file name, and every place that makes a path from a name goes through it.

A command that writes over a file it reads loses that file for good, and with a symlink or a hard
link the two paths need not even look alike. :func:`check_outputs` compares real files (device and
inode where the file exists, the resolved path where it does not yet) before anything is written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from .errors import UserError

_UNSAFE = re.compile(r"[^\w.+-]+|_+")


def safe_file_name(name: str, fallback: str = "case", limit: int = 100) -> str:
    """``name`` as a single file name: letters, digits and ``. + -`` kept, runs of anything else one ``_``,
    no leading or trailing dots (so never ``..`` or a hidden file), at most ``limit`` characters;
    ``fallback`` where nothing is left.

    Example::

        >>> safe_file_name("../../escaped")
        'escaped'
    """
    text = _UNSAFE.sub("_", str(name)).strip("._-")[:limit].rstrip("._-")
    return text or fallback


def check_outputs(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse outputs that are one of the ``inputs``, or one another: the same file by any path.

    ``inputs`` are the files a command reads (a folder of volumes is given as its volumes, so that a
    report written beside them is not taken for one). ``None`` entries (an option not given) are
    skipped. Raises :class:`UserError` naming both paths.
    """
    read: dict[tuple, Path] = {}
    for source in (Path(item) for item in inputs if item is not None):
        read.setdefault(_identity(source), source)
    written: dict[tuple, Path] = {}
    for output in (Path(item) for item in outputs if item is not None):
        identity = _identity(output)
        if identity in read:
            same = "" if read[identity] == output else f" (the same file as {read[identity]})"
            raise UserError(f"the output {output} is an input{same}: writing it would destroy the input; "
                            "choose another output path")
        if identity in written:
            raise UserError(f"two outputs are the same file, {written[identity]} and {output}: give each its own path")
        written[identity] = output


def _identity(path: Path) -> tuple:
    """What makes two paths one file: device and inode where it exists (symlinks and hard links
    included), else the real path it would be created at."""
    try:
        status = os.stat(path)
        return ("inode", status.st_dev, status.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))
