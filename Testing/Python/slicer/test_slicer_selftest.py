"""The module's own self-test (what Reload and Test runs in Slicer), here against the real MRML core."""

from __future__ import annotations

import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed")


def test_module_self_test_passes(slicer_scene):
    module, _ = slicer_scene.loadModule()
    module.runTest(msec=0)  # raises on any failure, as in Slicer


def test_self_test_leaves_no_temporary_files(slicer_scene):
    test = slicer_scene.module.UNet3DSegmenterTest()
    test.setUp()
    folder = test.temporaryFolder
    assert folder.is_dir()
    test.tearDown()
    assert not folder.exists()
