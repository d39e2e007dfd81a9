"""After Segment, the model's confidence as a volume over the image, on real MRML."""

from __future__ import annotations

import os

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

from child_processes import eventually  # noqa: E402

from UNet3DSegmenterLib import Predictor  # noqa: E402
from UNet3DSegmenterLib.slicer import panel, selftest  # noqa: E402
from UNet3DSegmenterLib.slicer.scene import CONFIDENCE_ROLE  # noqa: E402


def test_segment_with_confidence_shows_the_predictors_uncertainty_over_the_image(slicer_scene, logic,
                                                                                   checkpoint_path):
    volume = selftest.addPhantom(seed=3)[0]
    views = [slicer_scene.scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    segmentation = logic.segment(volume, checkpoint_path, device="cpu", confidence=True)
    node = segmentation.GetNodeReference(CONFIDENCE_ROLE)
    assert node is not None and node.IsA("vtkMRMLScalarVolumeNode")
    shown = slicer.util.arrayFromVolume(node)
    expected = Predictor(checkpoint_path, device="cpu").predict(logic.volumeFromNode(volume), uncertainty="entropy")
    np.testing.assert_allclose(shown, expected.uncertainty.array, atol=1e-5)
    assert logic.volumeFromNode(node).same_grid(logic.volumeFromNode(volume), tolerance=1e-4)
    assert all(view.GetForegroundVolumeID() == node.GetID() and view.GetBackgroundVolumeID() == volume.GetID()
               and view.GetForegroundOpacity() == 0.5 for view in views)
    nodes = slicer_scene.scene.GetNumberOfNodes()
    logic.segment(volume, checkpoint_path, segmentation, device="cpu", confidence=True)  # again: replaced
    assert slicer_scene.scene.GetNumberOfNodes() == nodes and segmentation.GetNodeReference(CONFIDENCE_ROLE) is node


def test_segment_without_confidence_adds_no_volume(slicer_scene, logic, checkpoint_path):
    volume = selftest.addPhantom(seed=3)[0]
    volumes = slicer_scene.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    segmentation = logic.segment(volume, checkpoint_path, device="cpu")
    assert segmentation.GetNodeReference(CONFIDENCE_ROLE) is None
    assert slicer_scene.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes


@pytest.mark.skipif(os.name == "nt", reason="process-group checks are written for POSIX")
def test_the_panels_show_confidence_box_brings_the_confidence_of_a_background_run(slicer_scene, logic,
                                                                                   checkpoint_path):
    state = panel.PanelState(logic, notify=print)
    state.setParameterNode(logic.getParameterNode())
    state.checkEngine()
    state.parameters.inputVolume = selftest.addPhantom(seed=3)[0]
    state.addModel(checkpoint_path)
    state.parameters.device, state.parameters.showConfidence = "cpu", True
    assert state.startSegmentation()
    assert eventually(lambda: not state.poll(), 300), "the background run did not end"
    segmentation = state.parameters.outputSegmentation or next(
        slicer_scene.scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        for index in range(slicer_scene.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")))
    node = segmentation.GetNodeReference(CONFIDENCE_ROLE)
    assert node is not None and 0 <= slicer.util.arrayFromVolume(node).min() <= slicer.util.arrayFromVolume(node).max() <= 1
