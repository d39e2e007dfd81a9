"""Segmenting inside a markups ROI, and the out-of-range warning, from the Logic and the panel, on real MRML."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")

import vtk  # noqa: E402
from child_processes import Recorder, eventually  # noqa: E402
from slicer_harness import scene_state, tiny_checkpoint  # noqa: E402

from UNet3DSegmenterLib import Predictor, RegionOfInterest, save_checkpoint  # noqa: E402
from UNet3DSegmenterLib.fingerprint import TrainingFingerprint  # noqa: E402
from UNet3DSegmenterLib.phantom import make_phantom  # noqa: E402
from UNet3DSegmenterLib.slicer import panel, selftest  # noqa: E402

posix = pytest.mark.skipif(os.name == "nt", reason="child-process runs are checked on POSIX")
LPS_AS_NIFTI = np.diag([-1.0, -1.0, 1.0])
SMALL_CROPS = TrainingFingerprint.from_measurements([(30, 36, 40)], [(3, 3, 4)], [])
"""A training fingerprint that the 72 x 72 x 64 mm phantom lies far outside (twice 36 mm < 72 mm)."""


@pytest.fixture(scope="module")
def crops_checkpoint_path(tmp_path_factory, slicer_harness):
    """The self-test's tiny model, recorded as trained on crops smaller than the phantoms."""
    checkpoint = dataclasses.replace(tiny_checkpoint(), fingerprint=SMALL_CROPS)
    return save_checkpoint(checkpoint, tmp_path_factory.mktemp("crops") / "crops.pt")


def _axis_aligned_phantom(logic, seed: int = 2):
    image, _ = make_phantom(shape=selftest.SHAPE, spacing=selftest.SPACING, seed=seed, classes=2,
                            direction=LPS_AS_NIFTI)
    return logic.addVolumeNode(image, "phantom")


def _roi(centre, size, name: str = "box"):
    node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    node.SetCenter(list(centre))
    node.SetSize(list(size))
    return node


def _centre(volumeNode) -> np.ndarray:
    bounds = [0.0] * 6
    volumeNode.GetRASBounds(bounds)
    return np.array([(bounds[2 * axis] + bounds[2 * axis + 1]) / 2 for axis in range(3)])


# --- the Logic -------------------------------------------------------------------------------------


def test_segment_inside_an_roi_equals_the_engine_inside_the_box_and_is_empty_outside(slicer_scene, logic,
                                                                                      checkpoint_path):
    node = _axis_aligned_phantom(logic)
    roiNode = _roi(_centre(node), (36, 39, 30))
    segmentation = logic.segment(node, checkpoint_path, device="cpu", roi=roiNode)
    labelmap = logic.labelmapFromSegmentation(segmentation, node, ["organ", "lesion"])
    bounds = [0.0] * 6
    roiNode.GetRASBounds(bounds)
    region = RegionOfInterest(tuple(bounds[0::2]), tuple(bounds[1::2]))
    volume = logic.volumeFromNode(node)
    expected = Predictor(checkpoint_path, device="cpu").predict(volume, roi=region).labelmap.array
    np.testing.assert_array_equal(labelmap, expected)
    block = region.block(volume)
    outside = np.ones(volume.shape, bool)
    outside[block] = False
    assert labelmap[block].any() and not labelmap[outside].any()
    # centred on voxel 7.5, 11.5, 11.5 (z, y, x): 30 mm of 4 mm voxels hold 8 centres, 36 mm of 3 mm 12, and
    # 39 mm of 3 mm 14: its faces fall on voxel centres, which count as inside
    assert block == (slice(4, 12), slice(5, 19), slice(6, 18))


def test_an_roi_under_a_transform_is_taken_where_it_is_shown(slicer_scene, logic, checkpoint_path):
    node = _axis_aligned_phantom(logic)
    roiNode = _roi(_centre(node) - (200, 0, 0), (36, 39, 30))  # far to the left of the volume ...
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 200)  # ... moved back over it
    transform.SetMatrixTransformToParent(matrix)
    roiNode.SetAndObserveTransformNodeID(transform.GetID())
    moved = logic.segment(node, checkpoint_path, device="cpu", roi=roiNode)
    placed = logic.segment(node, checkpoint_path, device="cpu", roi=_roi(_centre(node), (36, 39, 30)))
    np.testing.assert_array_equal(logic.labelmapFromSegmentation(moved, node),
                                  logic.labelmapFromSegmentation(placed, node))


def test_a_volume_under_a_transform_is_segmented_where_the_roi_lies_over_it_in_the_views(slicer_scene, logic,
                                                                                        checkpoint_path):
    node = _axis_aligned_phantom(logic)
    centre = _centre(node)
    untransformed = logic.segment(node, checkpoint_path, device="cpu", roi=_roi(centre, (36, 39, 30)))
    expected = logic.labelmapFromSegmentation(untransformed, node)
    transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(1, 3, -150)  # the volume is shown 150 mm posterior
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_allclose(_centre(node), centre - (0, 150, 0))  # where the views show it
    shown = logic.segment(node, checkpoint_path, device="cpu", roi=_roi(centre - (0, 150, 0), (36, 39, 30)))
    np.testing.assert_array_equal(logic.labelmapFromSegmentation(shown, node), expected)
    assert expected.any()


@pytest.mark.parametrize("case, message", [
    ("rotated", r"^the ROI box is rotated: only a box aligned with the R, A, S axes can be segmented; reset its "
                r"rotation"),
    ("elsewhere", r"^the ROI \(R .*\) holds no voxel of the volume, which spans R .*: place the box over the volume$"),
    ("not placed", r"^the ROI box is not placed yet: place it over the volume$"),
])
def test_an_roi_that_cannot_be_segmented_is_one_line_and_changes_nothing(slicer_scene, logic, checkpoint_path, case,
                                                                         message):
    node = _axis_aligned_phantom(logic)
    if case == "not placed":
        roiNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    else:
        roiNode = _roi(_centre(node) + ((500, 0, 0) if case == "elsewhere" else (0, 0, 0)), (36, 39, 30))
    if case == "rotated":
        rotation = vtk.vtkTransform()
        rotation.RotateZ(20)
        roiNode.SetAndObserveObjectToNodeMatrix(rotation.GetMatrix())
    before = scene_state(slicer_scene.scene)
    with pytest.raises(ValueError, match=message):
        logic.segment(node, checkpoint_path, device="cpu", roi=roiNode)
    with pytest.raises(ValueError, match=message):
        logic.segmentInBackground(node, checkpoint_path, device="cpu", roi=roiNode)
    assert scene_state(slicer_scene.scene) == before


def test_a_quarter_turn_is_still_an_axis_aligned_box(slicer_scene, logic, checkpoint_path):
    node = _axis_aligned_phantom(logic)
    roiNode = _roi(_centre(node), (36, 39, 30))
    rotation = vtk.vtkTransform()
    rotation.Translate(*_centre(node))
    rotation.RotateZ(90)  # R and A swap sides: the box is the same shape, turned
    roiNode.SetAndObserveObjectToNodeMatrix(rotation.GetMatrix())
    logic.segment(node, checkpoint_path, device="cpu", roi=roiNode)  # accepted


def test_warnings_go_to_the_callers_callback_in_the_console(slicer_scene, logic, crops_checkpoint_path):
    node = _axis_aligned_phantom(logic)
    heard: list[str] = []
    logic.segment(node, crops_checkpoint_path, device="cpu", warn=heard.append)
    assert len(heard) == 1 and heard[0].startswith("this volume covers 72 x 72 x 64 mm; the model was trained on "
                                                   "crops of about 30 x 36 x 40 mm")
    heard.clear()
    logic.segment(node, crops_checkpoint_path, device="cpu", warn=heard.append, roi=_roi(_centre(node), (30, 36, 36)))
    assert heard == []  # computed on what is segmented: the box


@posix
def test_the_background_run_reports_the_warning_and_segments_inside_the_roi(slicer_scene, logic, crops_checkpoint_path):
    node = _axis_aligned_phantom(logic)
    recorder, warnings = Recorder(), []
    process = logic.segmentInBackground(node, crops_checkpoint_path, device="cpu", onProgress=recorder.onProgress,
                                        onFinished=recorder.onFinished, onError=recorder.onError,
                                        onWarning=warnings.append)
    assert process.wait(timeout=120), recorder.errors
    assert len(warnings) == 1 and warnings[0].startswith("this volume covers 72 x 72 x 64 mm")
    roiNode = _roi(_centre(node), (36, 39, 30))
    process = logic.segmentInBackground(node, crops_checkpoint_path, device="cpu", roi=roiNode,
                                        onFinished=recorder.onFinished, onError=recorder.onError,
                                        onWarning=warnings.append)
    assert process.wait(timeout=120), recorder.errors
    assert len(warnings) == 1, "a warning for a box the size of the training crops"
    background = logic.labelmapFromSegmentation(recorder.finished[-1][0], node)
    synchronous = logic.segment(node, crops_checkpoint_path, device="cpu", roi=roiNode)
    np.testing.assert_array_equal(background, logic.labelmapFromSegmentation(synchronous, node))


# --- the panel -------------------------------------------------------------------------------------


@pytest.fixture
def state(logic):
    messages: list[str] = []
    panelState = panel.PanelState(logic, notify=messages.append)
    panelState.messages = messages
    panelState.setParameterNode(logic.getParameterNode())
    panelState.checkEngine()
    return panelState


def test_place_roi_puts_a_box_of_the_training_size_at_the_volume_centre_and_segments_inside_it(
        slicer_scene, logic, state, crops_checkpoint_path):
    node = _axis_aligned_phantom(logic)
    state.parameters.inputVolume = node
    state.addModel(crops_checkpoint_path)
    assert state.parameters.region == panel.REGIONS[0] and not state.view().roiEnabled
    roiNode = state.placeRoi()
    assert state.parameters.roiNode is roiNode and state.parameters.region == panel.REGIONS[1]
    np.testing.assert_allclose(roiNode.GetCenter(), _centre(node))
    np.testing.assert_allclose(roiNode.GetSize(), (30, 36, 40))  # the training crops' median, x y z = R A S here
    assert roiNode.GetDisplayNode() is not None, "not shown in the views: nothing to drag"
    view = state.view()
    assert view.roiEnabled and view.segment.enabled and roiNode.GetName() in view.segment.toolTip


def test_place_roi_without_a_fingerprint_takes_half_the_volume_and_needs_a_volume(slicer_scene, logic, state,
                                                                                 checkpoint_path):
    state.addModel(checkpoint_path)
    assert not state.view().placeRoi.enabled
    assert state.placeRoi() is None and state.messages == [
        "Choose an input volume first: the ROI is placed at its centre."]
    node = _axis_aligned_phantom(logic)
    state.parameters.inputVolume = node
    assert state.view().placeRoi.enabled
    np.testing.assert_allclose(state.placeRoi().GetSize(), (36, 36, 32))  # 72 x 72 x 64 mm / 2


def test_inside_an_roi_segment_waits_for_one(slicer_scene, logic, state, checkpoint_path):
    state.parameters.inputVolume = _axis_aligned_phantom(logic)
    state.addModel(checkpoint_path)
    state.parameters.region = panel.REGIONS[1]
    button = state.view().segment
    assert not button.enabled and button.toolTip == "Choose an ROI, or click Place ROI, to segment inside it."
    state.parameters.roiNode = _roi(_centre(state.parameters.inputVolume), (10, 10, 10))
    assert state.view().segment.enabled
    state.parameters.region = panel.REGIONS[0]
    assert not state.view().roiEnabled and state.view().segment.toolTip == \
        "Segment the input volume with the chosen model."


@posix
def test_the_warning_stays_in_the_status_after_the_result(slicer_scene, logic, state, crops_checkpoint_path):
    state.parameters.inputVolume = _axis_aligned_phantom(logic)
    state.addModel(crops_checkpoint_path)
    state.parameters.device = "cpu"
    assert state.startSegmentation()
    assert eventually(lambda: not state.poll(), 120), "the background run did not end"
    status = state.view().segmentStatus
    assert status.startswith("Done in ") and "organ, lesion. Warning: this volume covers 72 x 72 x 64 mm" in status
    state.placeRoi()
    assert state.startSegmentation()
    assert "Warning" not in state.view().segmentStatus  # a new run starts without the last one's warning
    assert eventually(lambda: not state.poll(), 120), "the background run did not end"
    assert state.view().segmentStatus.startswith("Done in ") and "Warning" not in state.view().segmentStatus
    assert state.messages == []
