"""The Segment job (UNet3DSegmenterLib.slicer.segmentation): waiting and in the background, on a real scene.

Both paths share one prepare step (every check, before any work) and one finish step (the scene);
the background path runs the engine's command line in a real child process.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402
from child_processes import Recorder, alive  # noqa: E402
from slicer_harness import scene_state, tiny_checkpoint  # noqa: E402

from UNet3DSegmenterLib import Checkpoint, Label, Predictor, Preprocessing, UNet3D, Volume  # noqa: E402
from UNet3DSegmenterLib.phantom import make_phantom  # noqa: E402
from UNet3DSegmenterLib.slicer import selftest  # noqa: E402

posix = pytest.mark.skipif(os.name == "nt", reason="process-group checks are written for POSIX")

LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "liver", (0.9, 0.4, 0.3))]


def _volume(shape=(9, 11, 13)) -> Volume:
    array = np.random.default_rng(0).integers(-1000, 3000, shape).astype(np.int16)
    return Volume(array, (1.1, 0.6, 2.5), (101.3, -7.7, 55.0))


# --- segment --------------------------------------------------------------------------------------


def _phantom_node(slicer_scene, seed: int = 2):
    return selftest.addPhantom(seed=seed)


def test_segment_gives_named_segments_on_the_input_grid_under_its_study(slicer_scene, logic, checkpoint_path):
    node, _ = _phantom_node(slicer_scene)
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer_scene.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "patient")
    study = hierarchy.CreateStudyItem(patient, "study")
    item = hierarchy.GetItemByDataNode(node) or hierarchy.CreateItem(study, node)
    hierarchy.SetItemParent(item, study)

    segmentation = logic.segment(node, checkpoint_path, device="cpu")

    assert segmentation.GetName() == "phantom segmentation"
    assert logic.segmentNames(segmentation) == ["organ", "lesion"]
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation)) == study
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is node
    assert segmentation.GetDisplayNode() is not None
    # the segments hold exactly what the engine predicts for this volume
    expected = Predictor(checkpoint_path, device="cpu").predict(logic.volumeFromNode(node)).labelmap.array
    assert np.count_nonzero(expected == 1) > 0
    np.testing.assert_array_equal(logic.labelmapFromSegmentation(segmentation, node, ["organ", "lesion"]), expected)


def test_segment_again_into_the_same_node_replaces_its_segments(slicer_scene, logic, checkpoint_path):
    node, _ = _phantom_node(slicer_scene)
    segmentation = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "mine")
    segmentation.GetSegmentation().AddEmptySegment("old", "old")
    result = logic.segment(node, checkpoint_path, outputSegmentation=segmentation, device="cpu")
    first = logic.labelmapFromSegmentation(segmentation, node)
    nodes = slicer_scene.scene.GetNumberOfNodes()
    again = logic.segment(node, checkpoint_path, outputSegmentation=segmentation, device="cpu")
    assert result is segmentation and again is segmentation
    assert logic.segmentNames(segmentation) == ["organ", "lesion"]
    assert slicer_scene.scene.GetNumberOfNodes() == nodes
    np.testing.assert_array_equal(logic.labelmapFromSegmentation(segmentation, node), first)


def test_segment_reports_progress_and_follows_the_parent_transform(slicer_scene, logic, checkpoint_path):
    node, _ = _phantom_node(slicer_scene)
    transform = slicer_scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    calls = []
    segmentation = logic.segment(node, checkpoint_path, device="cpu", overlap=0.5, progress=lambda *args: calls.append(args))
    assert calls and calls[-1][0] == calls[-1][1]
    assert segmentation.GetTransformNodeID() == transform.GetID()


def test_a_result_under_the_inputs_transform_keeps_the_inputs_geometry(slicer_scene, logic, checkpoint_path):
    """The reference geometry is set once the node is under the input's transform, so it is not moved twice."""
    node, _ = _phantom_node(slicer_scene)
    untransformed = logic.segment(node, checkpoint_path, device="cpu")
    geometryParameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    expected = untransformed.GetSegmentation().GetConversionParameter(geometryParameter)
    expectedLabelmap = logic.labelmapFromSegmentation(untransformed, node)
    transform = slicer_scene.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 30.0)
    shift.SetElement(2, 3, -12.5)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    result = logic.segment(node, checkpoint_path, device="cpu")
    assert result.GetTransformNodeID() == transform.GetID()
    assert result.GetSegmentation().GetConversionParameter(geometryParameter) == expected
    np.testing.assert_array_equal(logic.labelmapFromSegmentation(result, node), expectedLabelmap)


def test_segment_accepts_a_checkpoint_object_and_test_time_augmentation(slicer_scene, logic):
    node, _ = _phantom_node(slicer_scene)
    segmentation = logic.segment(node, tiny_checkpoint(), device="cpu", tta=True, largestComponent=True)
    assert logic.segmentNames(segmentation) == ["organ", "lesion"]


# --- bad inputs -----------------------------------------------------------------------------------


def _untrained(in_channels: int = 1) -> Checkpoint:
    model = UNet3D(in_channels=in_channels, out_channels=2, depth=2, base_width=2)
    return Checkpoint.from_model(model, LABELS[:2], Preprocessing(channels=in_channels), (8, 8, 8))


BAD_INPUTS = {
    "no volume": lambda scene, logic, folder: (None, _untrained(), {}),
    "2D image": lambda scene, logic, folder: (
        slicer.util.addVolumeFromArray(np.zeros((1, 20, 20), np.int16), name="slice"), _untrained(), {}),
    "empty volume node": lambda scene, logic, folder: (
        scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty"), _untrained(), {}),
    "missing checkpoint": lambda scene, logic, folder: (
        logic.addVolumeNode(_volume(), "input"), folder / "nowhere.pt", {}),
    "damaged checkpoint": lambda scene, logic, folder: (
        logic.addVolumeNode(_volume(), "input"), _write(folder / "broken.pt", b"not a checkpoint at all"), {}),
    "no checkpoint chosen": lambda scene, logic, folder: (logic.addVolumeNode(_volume(), "input"), "", {}),
    "channel mismatch": lambda scene, logic, folder: (
        logic.addVolumeNode(_volume().with_array(np.zeros((2, 9, 11, 13), np.float32)), "two"), _untrained(), {}),
    "overlap out of range": lambda scene, logic, folder: (
        logic.addVolumeNode(_volume(), "input"), _untrained(), {"overlap": 1.5}),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_one_clear_line_and_leave_the_scene_unchanged(slicer_scene, logic, tmp_path, case):
    volume, checkpoint, options = BAD_INPUTS[case](slicer_scene.scene, logic, tmp_path)
    existing = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    existing.GetSegmentation().AddEmptySegment("kept", "kept")
    before = scene_state(slicer_scene.scene)
    for output in (None, existing):
        with pytest.raises(ValueError) as raised:
            logic.segment(volume, checkpoint, outputSegmentation=output, device="cpu", **options)
        message = str(raised.value)
        assert message and "\n" not in message and len(message) < 400
        assert scene_state(slicer_scene.scene) == before
        assert logic.segmentNames(existing) == ["kept"]


def test_bad_input_messages_say_what_is_wrong(slicer_scene, logic, tmp_path):
    def message(case):
        volume, checkpoint, options = BAD_INPUTS[case](slicer_scene.scene, logic, tmp_path)
        with pytest.raises(ValueError) as raised:
            logic.segment(volume, checkpoint, device="cpu", **options)
        return str(raised.value)

    assert "volume" in message("no volume")
    assert "2D" in message("2D image")
    assert "nowhere.pt" in message("missing checkpoint")
    assert "broken.pt" in message("damaged checkpoint")
    assert "2 channel" in message("channel mismatch")
    assert "overlap" in message("overlap out of range")


# --- segmentInBackground ------------------------------------------------------------------------


@posix
def test_background_segmentation_streams_progress_and_equals_the_synchronous_one(slicer_scene, logic, checkpoint_path):
    node, _ = selftest.addPhantom(seed=3)
    recorder = Recorder()
    process = logic.segmentInBackground(node, checkpoint_path, device="cpu", overlap=0.5,
                                        onProgress=recorder.onProgress, onFinished=recorder.onFinished,
                                        onError=recorder.onError)
    assert process.running
    assert process.wait(timeout=120), recorder.errors
    assert recorder.errors == [] and len(recorder.finished) == 1
    assert recorder.progress and recorder.progress[-1][0] == recorder.progress[-1][1]
    assert [done for done, _ in recorder.progress] == sorted(done for done, _ in recorder.progress)
    segmentation = recorder.finished[0][0]
    assert logic.segmentNames(segmentation) == ["organ", "lesion"]
    assert segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole()) is node
    assert not process.temporaryFolder.exists()

    synchronous = logic.segment(node, checkpoint_path, device="cpu", overlap=0.5)
    np.testing.assert_array_equal(logic.labelmapFromSegmentation(segmentation, node),
                                  logic.labelmapFromSegmentation(synchronous, node))


@posix
def test_cancel_ends_the_child_and_adds_nothing_to_the_scene(slicer_scene, logic, checkpoint_path):
    image, _ = make_phantom(shape=(64, 96, 96), spacing=(1.0, 1.0, 1.0), seed=4, classes=2)
    node = logic.addVolumeNode(image, "large")
    before = scene_state(slicer_scene.scene)
    recorder = Recorder()
    process = None

    def cancelOnFirstProgress(done, total):
        recorder.onProgress(done, total)
        process.cancel()

    process = logic.segmentInBackground(node, checkpoint_path, device="cpu", overlap=0.75,
                                        onProgress=cancelOnFirstProgress, onFinished=recorder.onFinished,
                                        onError=recorder.onError)
    assert not process.wait(timeout=120)
    assert process.cancelled and not process.running
    assert len(recorder.progress) == 1, "no progress is reported once cancelled"
    assert recorder.progress[0][0] < recorder.progress[0][1], "the child finished before it could be cancelled"
    assert process.returncode == -signal.SIGTERM
    assert recorder.finished == [] and recorder.errors == []
    assert not alive(process.pid)
    assert scene_state(slicer_scene.scene) == before
    assert not process.temporaryFolder.exists()


def test_engine_failure_in_the_child_is_one_readable_message(slicer_scene, logic, checkpoint_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to make the child fail")
    node, _ = selftest.addPhantom(seed=3)
    before = scene_state(slicer_scene.scene)
    recorder = Recorder()
    process = logic.segmentInBackground(node, checkpoint_path, device="cuda", onFinished=recorder.onFinished,
                                        onError=recorder.onError)
    assert not process.wait(timeout=120)
    assert recorder.finished == [] and len(recorder.errors) == 1
    message = recorder.errors[0]
    assert "cuda" in message and "\n" not in message and not message.startswith("error:")
    assert process.returncode == 2
    assert scene_state(slicer_scene.scene) == before
    assert not process.temporaryFolder.exists()


def test_background_segmentation_refuses_bad_inputs_before_starting(slicer_scene, logic, checkpoint_path, tmp_path):
    node, _ = selftest.addPhantom(seed=3)
    before = scene_state(slicer_scene.scene)
    (tmp_path / "broken.pt").write_bytes(b"nothing")
    for volume, checkpoint, options in [(None, checkpoint_path, {}), (node, tmp_path / "broken.pt", {}),
                                        (node, checkpoint_path, {"overlap": 1.0}),
                                        (node, checkpoint_path, {"device": "tpu"})]:
        with pytest.raises(ValueError):
            logic.segmentInBackground(volume, checkpoint, **options)
    assert scene_state(slicer_scene.scene) == before




@posix
def test_closing_the_scene_during_a_background_segmentation_adds_nothing_and_says_why(slicer_scene, logic,
                                                                                      checkpoint_path):
    node, _ = selftest.addPhantom(seed=3)
    recorder = Recorder()
    process = logic.segmentInBackground(node, checkpoint_path, device="cpu", onFinished=recorder.onFinished,
                                        onError=recorder.onError)
    slicer_scene.clear()  # File > Close Scene while the child runs
    closed = scene_state(slicer_scene.scene)
    assert not process.wait(timeout=120)
    assert recorder.finished == [] and len(recorder.errors) == 1
    assert "removed from the scene" in recorder.errors[0] and "NoneType" not in recorder.errors[0]
    assert scene_state(slicer_scene.scene) == closed
    assert not process.temporaryFolder.exists()


def test_a_result_for_a_deleted_output_segmentation_goes_to_a_new_one(slicer_scene, logic, checkpoint_path):
    from UNet3DSegmenterLib.slicer import segmentation

    node, _ = selftest.addPhantom(seed=3)
    chosen = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen")
    job = segmentation.prepare(node, checkpoint_path, chosen, device="cpu")
    slicer_scene.scene.RemoveNode(chosen)  # deleted while the engine ran
    result = segmentation.finish(job, segmentation.predict(job))
    assert result is not chosen and result.GetScene() is slicer_scene.scene
    assert logic.segmentNames(result) == ["organ", "lesion"]


# --- options ------------------------------------------------------------------------------------------


def _windows(logic, node, checkpoint, **options) -> int:
    totals = []
    logic.segment(node, checkpoint, device="cpu", progress=lambda done, total: totals.append(total), **options)
    return totals[-1]


@posix
def test_an_overlap_left_unset_is_the_checkpoints_in_both_paths(slicer_scene, logic, checkpoint_path, tmp_path):
    import dataclasses

    from UNet3DSegmenterLib import load_checkpoint, save_checkpoint

    recorded = save_checkpoint(dataclasses.replace(load_checkpoint(checkpoint_path), overlap=0.75), tmp_path / "m.pt")
    image, _ = make_phantom(shape=(64, 96, 96), spacing=(1.0, 1.0, 1.0), seed=4, classes=2)
    node = logic.addVolumeNode(image, "large")
    windows = _windows(logic, node, recorded)
    assert windows == _windows(logic, node, recorded, overlap=0.75) != _windows(logic, node, recorded, overlap=0.5)
    recorder = Recorder()
    process = logic.segmentInBackground(node, recorded, device="cpu", largestComponent=True,
                                        onProgress=recorder.onProgress, onFinished=recorder.onFinished,
                                        onError=recorder.onError)
    assert "--overlap" not in process.arguments and "--largest-component" in process.arguments
    assert process.wait(timeout=120), recorder.errors
    assert recorder.progress[-1][1] == windows


def test_the_job_holds_the_options_as_given_with_the_roi_nodes_box(slicer_scene, logic, checkpoint_path):
    from UNet3DSegmenterLib.segment_options import SegmentOptions
    from UNet3DSegmenterLib.slicer import segmentation

    node, _ = selftest.addPhantom(seed=3)
    roiNode = logic.addRoi(node)
    job = segmentation.prepare(node, checkpoint_path, options=SegmentOptions(precision="fp32"), roi=roiNode,
                               device="cpu", tta=True, batchSize=3)
    assert (job.options.precision, job.options.device, job.options.tta, job.options.batch_size) == ("fp32", "cpu",
                                                                                                   True, 3)
    assert job.region is not None and job.options.roi == (*job.region.first, *job.region.second)
    with pytest.raises(TypeError, match="unknown segment option"):
        segmentation.prepare(node, checkpoint_path, mirror=True)
