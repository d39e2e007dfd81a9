"""Fixtures of the Slicer side's tests: a headless Slicer (slicer-core) with the module imported.

The tests mirror ``UNet3DSegmenterLib/slicer/``: test_slicer_<module>.py for each of its modules,
test_slicer_module.py for the module file, its .ui and CMakeLists.txt, test_slicer_boundaries.py
for what may import what. (The ``test_slicer_`` prefix keeps the names apart from the engine's tests.)
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest

# slicer-core's ``slicer`` package takes every ``<entry>/slicer`` folder on sys.path for a part of itself
# and imports each module in it (pkgutil.extend_path). Pytest puts Testing/Python on the path for the
# root conftest, so this folder would be imported as slicer.test_slicer_... and its names copied into
# ``slicer``. Import slicer-core once, now, with Testing/Python off the path, so that it never sees it.
_TESTING = str(Path(__file__).resolve().parents[1])
if "slicer" not in sys.modules:
    _entries = [entry for entry in sys.path if entry and Path(entry).resolve() == Path(_TESTING)]
    for _entry in _entries:
        sys.path.remove(_entry)
    try:
        with contextlib.suppress(ImportError):  # no slicer-core: the tests skip, saying so
            import slicer  # noqa: F401
    finally:
        sys.path[:0] = _entries


@pytest.fixture(autouse=True)
def one_thread_per_child(monkeypatch):
    """Engine child processes use one thread: the tests share a small machine, and idle OpenMP threads
    spinning on a busy core slow tiny networks down many times over."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="module")
def slicer_harness():
    """A headless 3D Slicer with the UNet3DSegmenter module imported (see slicer_harness.py).

    The MRML scene, nodes, storage nodes and module logics are the real ones from slicer-core; only
    slicer.app, qt, ctk, slicer.ScriptedLoadableModule and slicer.parameterNodeWrapper are stood in
    for, and they are removed again after the test module.
    """
    pytest.importorskip("slicer", reason="slicer-core is not installed: pip install slicer-core==5.13.31053.0")
    from slicer_harness import SlicerHarness

    harness = SlicerHarness()
    harness.install()
    try:
        yield harness
    finally:
        harness.uninstall()


@pytest.fixture
def slicer_scene(slicer_harness):
    """The harness with an empty scene (cleared before the test)."""
    slicer_harness.clear()
    return slicer_harness


@pytest.fixture
def logic(slicer_scene):
    """The module's Logic, on a cleared scene."""
    return slicer_scene.module.UNet3DSegmenterLogic()


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory, slicer_harness):
    """A checkpoint from the self-test's tiny trained model (organ, lesion): real, non-trivial output."""
    from slicer_harness import tiny_checkpoint

    from UNet3DSegmenterLib import save_checkpoint

    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_checkpoint(tiny_checkpoint(), path)
    return path

