"""Progress for people (a bar in the terminal) and for programs (one JSON object per line).

What the JSON lines carry (the events), and the rest of what a parent process and the engine's
command line agree on, is declared in ``protocol.py``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import TextIO

import numpy as np


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class ProgressBar:
    """A one-line bar with count, elapsed time and an estimate of the time left.

    Redraws in place on a terminal; elsewhere (a log file, a pipe) it prints nothing until
    :meth:`close`, which writes a single summary line.
    """

    def __init__(self, label: str, unit: str = "", stream: TextIO | None = None, width: int = 28):
        self.label, self.unit, self.width = label, unit, width
        self.stream = stream or sys.stderr
        self.interactive = getattr(self.stream, "isatty", lambda: False)()
        self.started = time.perf_counter()
        self.done = self.total = 0
        self.note = ""

    def update(self, done: int, total: int, note: str = "") -> None:
        self.done, self.total, self.note = done, total, note
        if self.interactive:
            self.stream.write("\r" + self._line())
            self.stream.flush()

    def close(self) -> None:
        if self.total:
            self.stream.write(("\r" if self.interactive else "") + self._line() + "\n")
            self.stream.flush()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.started
        fraction = self.done / self.total if self.total else 0.0
        filled = int(self.width * fraction)
        bar = "#" * filled + "." * (self.width - filled)
        remaining = elapsed / fraction - elapsed if 0 < fraction < 1 else 0.0
        eta = f" eta {_duration(remaining)}" if 0 < fraction < 1 else ""
        note = f" {self.note}" if self.note else ""
        return f"{self.label} [{bar}] {self.done}/{self.total} {self.unit} {_duration(elapsed)}{eta}{note}"

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def json_ready(value):
    """``value`` as plain JSON data: string keys, numpy numbers as Python numbers, NaN and infinity as
    None (JSON has neither, and Python's ``Infinity`` is not valid JSON for other readers)."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def emit_json(stream: TextIO | None = None, **fields) -> None:
    """Write one JSON object on one line and flush, for a parent process to read as it happens."""
    stream = stream or sys.stdout
    stream.write(json.dumps(json_ready(fields), allow_nan=False, default=str) + "\n")
    stream.flush()
