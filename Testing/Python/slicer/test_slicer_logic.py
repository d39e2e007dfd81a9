"""The module's Logic against a real MRML scene (slicer-core): conversions, segment, storage, bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402  (comes with slicer-core)

from UNet3DSegmenterLib import (  # noqa: E402  # noqa: E402
    Checkpoint,
    Label,
    Predictor,
    Preprocessing,
    UNet3D,
    Volume,
    read_volume,
    save_checkpoint,
    write_volume,
)


def _rotation(angles) -> np.ndarray:
    a, b, c = angles
    x = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    y = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    z = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return z @ y @ x


GEOMETRIES = {
    "axis-aligned anisotropic": (np.eye(3), (0.7, 0.9, 3.0), (-40.5, 12.25, 7.0)),
    "oblique": (_rotation((0.3, -0.5, 1.1)), (1.1, 0.6, 2.5), (101.3, -7.7, 55.0)),
    "left-handed oblique": (_rotation((0.2, 0.4, -0.7)) @ np.diag([1.0, -1.0, 1.0]), (0.8, 1.3, 1.9), (3.0, 4.0, -5.0)),
    "axes permuted": (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), (2.0, 1.0, 0.5), (0.0, 0.0, 0.0)),
}


def _volume(geometry: str, shape=(9, 11, 13), dtype=np.int16, seed: int = 0) -> Volume:
    direction, spacing, origin = GEOMETRIES[geometry]
    array = np.random.default_rng(seed).integers(-1000, 3000, shape).astype(dtype)
    return Volume(array, spacing, origin, direction)


def _labelmap(volume: Volume, values=(0, 1, 3), seed: int = 1) -> Volume:
    array = np.random.default_rng(seed).choice(np.asarray(values, np.uint8), size=volume.shape)
    return volume.with_array(array)


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


LABELS = [Label(0, "background", (0, 0, 0)), Label(1, "liver", (0.9, 0.4, 0.3)), Label(2, "spleen", (0.2, 0.8, 0.1)),
          Label(3, "left kidney", (0.1, 0.3, 0.95))]




def _scene_state(scene) -> list[tuple[str, str]]:
    return [(scene.GetNthNode(index).GetID(), scene.GetNthNode(index).GetName())
            for index in range(scene.GetNumberOfNodes())]


# --- volumes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_volume_round_trip_through_a_node_is_exact(logic, geometry):
    volume = _volume(geometry)
    node = logic.addVolumeNode(volume, "input")
    back = logic.volumeFromNode(node)
    np.testing.assert_array_equal(back.array, volume.array)
    assert back.array.dtype == volume.array.dtype
    np.testing.assert_allclose(back.spacing, volume.spacing, rtol=1e-13)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-12)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-13)
    np.testing.assert_allclose(_ijk_to_ras(node), volume.ijk_to_ras(), atol=1e-12)


def _assert_same_voxels_in_space(array, ijk_to_ras, other_array, other_ijk_to_ras) -> None:
    """Both images hold the same value at every physical point (their voxel orders may differ)."""
    to_other = np.linalg.inv(other_ijk_to_ras) @ ijk_to_ras
    np.testing.assert_allclose(to_other, np.round(to_other), atol=1e-6)  # a signed axis permutation
    k, j, i = np.indices(array.shape).reshape(3, -1)
    ijk = np.round(to_other @ np.stack([i, j, k, np.ones_like(i)])).astype(int)[:3]
    np.testing.assert_array_equal(other_array[ijk[2], ijk[1], ijk[0]], array.reshape(-1))


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_volume_written_by_engine_loads_in_slicer_on_the_same_grid(slicer_scene, logic, geometry, tmp_path):
    """Slicer's own NRRD reader is the independent judge of where the engine puts each voxel."""
    volume = _volume(geometry)
    path = write_volume(volume, tmp_path / "volume.nrrd")
    node = slicer_scene.logics["volumes"].AddArchetypeVolume(str(path), "loaded")
    assert node is not None
    _assert_same_voxels_in_space(slicer.util.arrayFromVolume(node), _ijk_to_ras(node), volume.array, volume.ijk_to_ras())
    back = logic.volumeFromNode(node)
    _assert_same_voxels_in_space(back.array, back.ijk_to_ras(), volume.array, volume.ijk_to_ras())


def test_volume_saved_by_slicer_reads_in_engine_on_the_same_grid(slicer_scene, logic, tmp_path):
    volume = _volume("left-handed oblique")
    node = logic.addVolumeNode(volume, "input")
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "saved.nrrd"))
    assert storage.WriteData(node)
    read = read_volume(tmp_path / "saved.nrrd")
    np.testing.assert_array_equal(read.array, volume.array)
    np.testing.assert_allclose(read.index_to_physical(), volume.index_to_physical(), atol=1e-9)


def test_vector_volume_becomes_channels_first(logic):
    volume = _volume("oblique", dtype=np.float32)
    two = volume.with_array(np.stack([volume.array, -volume.array]))
    node = logic.addVolumeNode(two, "two channels")
    assert node.IsA("vtkMRMLVectorVolumeNode")
    back = logic.volumeFromNode(node)
    assert back.channels == 2
    np.testing.assert_array_equal(back.array, two.array)


# --- segmentations ------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", ["oblique", "left-handed oblique"])
def test_labelmap_becomes_one_named_coloured_segment_per_label(slicer_scene, logic, geometry):
    volume = _volume(geometry)
    node = logic.addVolumeNode(volume, "input")
    labelmap = _labelmap(volume, values=(0, 1, 3))  # label 2 (spleen) absent
    segmentation = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic.updateSegmentationFromLabelmap(segmentation, labelmap, LABELS, node)

    assert logic.segmentNames(segmentation) == ["liver", "spleen", "left kidney"]
    segments = segmentation.GetSegmentation()
    for label in LABELS[1:]:
        segment = segments.GetSegment(segments.GetSegmentIdBySegmentName(label.name))
        np.testing.assert_allclose(segment.GetColor(), label.color)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segments.GetSegmentIdBySegmentName(label.name), node)
        np.testing.assert_array_equal(mask > 0, labelmap.array == label.value, err_msg=label.name)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_segmentation_round_trip_to_labelmap_is_exact(slicer_scene, logic, geometry):
    volume = _volume(geometry)
    node = logic.addVolumeNode(volume, "input")
    labelmap = _labelmap(volume, values=(0, 1, 2, 3))
    segmentation = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic.updateSegmentationFromLabelmap(segmentation, labelmap, LABELS, node)
    np.testing.assert_array_equal(logic.labelmapFromSegmentation(segmentation, node), labelmap.array)
    # another order of names gives other values; a name it lacks stays absent
    reordered = logic.labelmapFromSegmentation(segmentation, node, ["left kidney", "missing", "liver"])
    expected = np.select([labelmap.array == 3, labelmap.array == 1], [1, 3], 0)
    np.testing.assert_array_equal(reordered, expected)


def test_labelmap_from_segmentation_leaves_no_helper_nodes(slicer_scene, logic):
    volume = _volume("oblique")
    node = logic.addVolumeNode(volume, "input")
    segmentation = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    logic.updateSegmentationFromLabelmap(segmentation, _labelmap(volume), LABELS, node)
    before = _scene_state(slicer_scene.scene)
    logic.labelmapFromSegmentation(segmentation, node)
    assert _scene_state(slicer_scene.scene) == before


def test_seg_nrrd_written_and_read_back_with_the_storage_node(slicer_scene, logic, tmp_path):
    volume = _volume("left-handed oblique")
    node = logic.addVolumeNode(volume, "input")
    labelmap = _labelmap(volume, values=(0, 1, 2, 3))
    segmentation = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "written")
    logic.updateSegmentationFromLabelmap(segmentation, labelmap, LABELS, node)
    writer = segmentation.CreateDefaultStorageNode()
    writer.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert writer.WriteData(segmentation)

    loaded = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read")
    reader = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert reader.ReadData(loaded)
    assert logic.segmentNames(loaded) == ["liver", "spleen", "left kidney"]
    for label in LABELS[1:]:
        segment = loaded.GetSegmentation().GetSegment(loaded.GetSegmentation().GetSegmentIdBySegmentName(label.name))
        np.testing.assert_allclose(segment.GetColor(), label.color, atol=1e-6)
    np.testing.assert_array_equal(logic.labelmapFromSegmentation(loaded, node), labelmap.array)
    # the engine reads the same file as a labelmap on the volume's grid
    engine_view = read_volume(tmp_path / "result.seg.nrrd")
    np.testing.assert_allclose(engine_view.index_to_physical(), volume.index_to_physical(), atol=1e-9)


# --- segment --------------------------------------------------------------------------------------


def _phantom_node(slicer_scene, seed: int = 2):
    test = slicer_scene.module.UNet3DSegmenterTest()
    return test.addPhantom(seed=seed)


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


def test_segment_accepts_a_checkpoint_object_and_test_time_augmentation(slicer_scene, logic):
    from slicer_harness import tiny_checkpoint

    node, _ = _phantom_node(slicer_scene)
    segmentation = logic.segment(node, tiny_checkpoint(slicer_scene), device="cpu", tta=True, largestComponent=True)
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
        logic.addVolumeNode(_volume("oblique"), "input"), folder / "nowhere.pt", {}),
    "damaged checkpoint": lambda scene, logic, folder: (
        logic.addVolumeNode(_volume("oblique"), "input"), _write(folder / "broken.pt", b"not a checkpoint at all"), {}),
    "no checkpoint chosen": lambda scene, logic, folder: (logic.addVolumeNode(_volume("oblique"), "input"), "", {}),
    "channel mismatch": lambda scene, logic, folder: (
        logic.addVolumeNode(_volume("oblique").with_array(np.zeros((2, 9, 11, 13), np.float32)), "two"), _untrained(), {}),
    "overlap out of range": lambda scene, logic, folder: (
        logic.addVolumeNode(_volume("oblique"), "input"), _untrained(), {"overlap": 1.5}),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_raise_one_clear_line_and_leave_the_scene_unchanged(slicer_scene, logic, tmp_path, case):
    volume, checkpoint, options = BAD_INPUTS[case](slicer_scene.scene, logic, tmp_path)
    existing = slicer_scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "existing")
    existing.GetSegmentation().AddEmptySegment("kept", "kept")
    before = _scene_state(slicer_scene.scene)
    for output in (None, existing):
        with pytest.raises(ValueError) as raised:
            logic.segment(volume, checkpoint, outputSegmentation=output, device="cpu", **options)
        message = str(raised.value)
        assert message and "\n" not in message and len(message) < 400
        assert _scene_state(slicer_scene.scene) == before
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


# --- parameters, models, module -------------------------------------------------------------------


def test_parameter_node_defaults_lie_within_their_ranges_and_choices(slicer_scene):
    import typing

    parameters = slicer_scene.module.UNet3DSegmenterParameterNode
    hints = typing.get_type_hints(parameters, include_extras=True)
    checked = 0
    for name, hint in hints.items():
        for annotation in getattr(hint, "__metadata__", ()):
            default = parameters.allParameters[name][1]
            if hasattr(annotation, "choices"):
                assert default in annotation.choices, name
            if hasattr(annotation, "minimum"):
                assert annotation.minimum <= default <= annotation.maximum, name
            checked += 1
    assert checked >= 8


def test_parameter_node_keeps_the_panel_state_in_the_scene(slicer_scene, logic):
    node = logic.addVolumeNode(_volume("oblique"), "input")
    parameters = logic.getParameterNode()
    parameters.inputVolume = node
    parameters.overlap = 0.25
    again = logic.getParameterNode()
    assert again.inputVolume is node and again.overlap == 0.25 and again.device == "auto"
    assert again.parameterNode.GetAttribute("ModuleName") == "UNet3DSegmenter"


def test_model_selector_lists_every_checkpoint_with_its_label_names(slicer_scene, logic, tmp_path, monkeypatch):
    save_checkpoint(_untrained(), tmp_path / "b_liver.pt")
    from slicer_harness import tiny_checkpoint

    save_checkpoint(tiny_checkpoint(slicer_scene), tmp_path / "a_phantom.pt")
    _write(tmp_path / "c_broken.pt", b"nothing")
    (tmp_path / "notes.md").write_text("model card")
    monkeypatch.setattr(slicer_scene.module.UNet3DSegmenterLogic, "modelsFolder", staticmethod(lambda: tmp_path))
    models = logic.availableModels()
    assert [path.name for path in models] == ["a_phantom.pt", "b_liver.pt", "c_broken.pt"]
    assert logic.describeModel(models[0]) == "organ, lesion"
    assert logic.describeModel(models[1]) == "liver"
    assert logic.describeModel(models[2]).startswith("Cannot read this model: ")


def test_bundled_models_folder_is_the_resources_folder(slicer_scene):
    folder = slicer_scene.module.UNet3DSegmenterLogic.modelsFolder()
    assert folder.parts[-2:] == ("Resources", "Models")
    assert folder.parent.parent / "UNet3DSegmenter.py" == slicer_scene.module.MODULE_DIRECTORY / "UNet3DSegmenter.py"


def test_module_describes_itself_and_registers_its_self_test(slicer_scene):
    _, parent = slicer_scene.loadModule()
    assert parent.title and parent.categories == ["Segmentation"] and parent.contributors
    assert "Segment" in parent.helpText and "Train" in parent.helpText
    assert "license" in parent.acknowledgementText.lower()
    assert "UNet3DSegmenter" in slicer.selfTests


def test_missing_packages_are_named_with_how_they_will_be_installed(slicer_scene, logic, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nibabel", None)
    assert logic.missingRequirements() == ["nibabel>=5.0"]
    assert "nibabel>=5.0" in logic.installDescription()
    monkeypatch.setitem(sys.modules, "torch", None)
    description = logic.installDescription()
    assert "torch>=2.1" in description and "pip" in description
    monkeypatch.setattr(slicer.modules, "pytorchutils", object(), raising=False)
    assert "PyTorch extension" in logic.installDescription()
