"""Scene conversion (UNet3DSegmenterLib.slicer.scene) through the Logic, on a real MRML scene (slicer-core)."""

from __future__ import annotations

import math

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402  (comes with slicer-core)
from slicer_harness import scene_state  # noqa: E402

from UNet3DSegmenterLib import Label, Volume, read_volume, write_volume  # noqa: E402


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
    before = scene_state(slicer_scene.scene)
    logic.labelmapFromSegmentation(segmentation, node)
    assert scene_state(slicer_scene.scene) == before


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
