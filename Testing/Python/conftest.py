"""Fixtures shared by the whole suite; the Slicer side's own are in slicer/conftest.py.

Tests mirror the package: engine/ (core, inference/, training/), commands/, slicer/. Markers:
``slow`` (a real training run or a real dataset, tens of seconds) and ``slicer`` (every test under
slicer/, which needs slicer-core); ``pytest -m "not slow"`` is the quick loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
# Test the working tree's engine, whether or not the package is also installed.
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

# Real labelled datasets live beside the repository, never inside it (see shared/data/README.md).
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def engine_cache(tmp_path_factory) -> Iterator[Path]:
    """The engine's cache folder (measured inference paths) for the whole session, never the user's;
    and the OpenVINO path off (inference/test_openvino_path.py turns it on where it is tested)."""
    folder = tmp_path_factory.mktemp("engine-cache")
    settings = {"UNET3D_SEGMENTER_CACHE": str(folder), "UNET3D_SEGMENTER_OPENVINO": "0"}
    previous = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield folder
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def shared_dataset() -> Callable[[str], Path]:
    """Locate a real dataset folder by name, e.g. ``shared_dataset("msd_hippocampus")``.

    The test is skipped, with the path it looked for, where the folder is absent: the real data
    is optional and the rest of the suite must run without it.
    """

    def locate(name: str) -> Path:
        folder = SHARED_DATA / name
        if not folder.is_dir():
            pytest.skip(f"real dataset {name!r} not found at {folder}: place it there to run this test")
        return folder

    return locate


@pytest.fixture
def watch_progress() -> Callable[..., tuple[subprocess.Popen, list[dict], str]]:
    """Run an engine command with ``--progress-json`` and act on its events as they come.

    ``act(process, event)`` sees each event; it returns True to stop reading (the caller then acts on
    the process itself, e.g. kills it). A watchdog kills a run that hangs. Returns the finished process,
    the events read and what it wrote to stderr.
    """

    def watch(command: list[str], env: dict[str, str], act) -> tuple[subprocess.Popen, list[dict], str]:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        watchdog = threading.Timer(300, process.kill)
        watchdog.start()
        events: list[dict] = []
        try:
            for line in process.stdout:
                events.append(json.loads(line))
                if act(process, events[-1]):
                    break
            stderr = process.stderr.read()
            process.wait()
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        return process, events, stderr

    return watch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One PyTorch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).

    The tests share a small machine, and idle OpenMP threads spinning on a busy core slow tiny
    convolutions down a hundredfold.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items) -> None:
    slicer_folder = Path(__file__).resolve().parent / "slicer"
    for item in items:
        if slicer_folder in Path(item.fspath).resolve().parents:
            item.add_marker(pytest.mark.slicer)
