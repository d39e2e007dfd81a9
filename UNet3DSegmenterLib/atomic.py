"""Atomic file writes: an output appears whole, or not at all, whatever happens while it is written."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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


def write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)
