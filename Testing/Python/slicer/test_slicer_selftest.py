"""The module's own self-test (what Reload and Test runs in Slicer), and its helpers (UNet3DSegmenterLib.slicer.selftest)."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core is not installed")

from UNet3DSegmenterLib.slicer import selftest  # noqa: E402


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


def test_the_self_test_trains_and_scores_with_the_engines_own_loss_and_dice():
    tree = ast.parse(inspect.getsource(selftest))
    imported = {(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names}
    assert ("training.losses", "build_loss") in imported and ("metrics", "dice") in imported
    calls = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    assert not calls & {"cross_entropy", "one_hot", "softmax"}, "a loss written by hand"


def test_self_test_dice_is_the_engines():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    prediction = np.zeros_like(truth)
    prediction[:1] = 1
    assert selftest.dice(prediction, truth, 1) == pytest.approx(2 * 16 / (16 + 32))
    assert selftest.dice(prediction, truth, 2) == 1.0  # absent from both: agreement, as metrics.dice says
