"""Helpers for tests that run real child processes: is it alive, wait for a condition, Slicer's launcher.

Standard library only, like ``UNet3DSegmenterLib.slicer.process`` which these tests exercise.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def eventually(condition, seconds: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (a bound for a hung test, not a timing claim)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def write_launcher(folder: pathlib.Path, slicerPaths: list[pathlib.Path] | None = None) -> pathlib.Path:
    """A stand-in for Slicer's ``PythonSlicer``: it runs the real interpreter as its own child, with the
    same arguments, and exits with its status. Like the real launcher it passes no signal on: a SIGTERM
    ends the launcher alone, at once, and leaves the interpreter running; and, like ctkAppLauncher's
    environment building, it puts Slicer's own paths (``slicerPaths``, e.g. its site-packages) before
    the PYTHONPATH it inherits."""
    path = pathlib.Path(folder) / "PythonSlicer"
    first = [str(slicerPath) for slicerPath in slicerPaths or []]
    path.write_text(f"#!{sys.executable}\n"
                    "import os, subprocess, sys\n"
                    f"paths = {first!r} + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]\n"
                    "environment = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))\n"
                    f"sys.exit(subprocess.call([{sys.executable!r}, *sys.argv[1:]], env=environment))\n")
    path.chmod(0o755)
    return path


class Recorder:
    """Collects what an engine process reports: progress (one event, or the callback's arguments), ends."""

    def __init__(self):
        self.progress, self.finished, self.errors, self.cancelled = [], [], [], 0

    def onProgress(self, *args):
        self.progress.append(args[0] if len(args) == 1 else args)

    def onFinished(self, *args):
        self.finished.append(args)

    def onError(self, message):
        self.errors.append(message)

    def onCancelled(self):
        self.cancelled += 1

    def callbacks(self) -> dict:
        return dict(onProgress=self.onProgress, onFinished=self.onFinished, onError=self.onError,
                    onCancelled=self.onCancelled)
