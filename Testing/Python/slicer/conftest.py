"""Fixtures of the Slicer side's tests: a headless Slicer (slicer-core) with the module imported."""

from __future__ import annotations

import pytest


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
    save_checkpoint(tiny_checkpoint(slicer_harness), path)
    return path
