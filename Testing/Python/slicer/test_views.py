"""Slicer's own views, offscreen (slicer-core's slice logic and displayable managers): what the pixels show.

A small scene: a textured volume on an oblique, anisotropic grid and a segmentation imported from a
labelmap with two labels in colours of their own. Each slice view is rendered with the segmentation
shown and hidden, and every pixel is mapped through the view's XY-to-RAS matrix and the volume's
RAS-to-IJK matrix to the label under it.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
import vtk  # noqa: E402  (comes with slicer-core)
from vtk.util import numpy_support  # noqa: E402

from UNet3DSegmenterLib.errors import UserError  # noqa: E402
from UNet3DSegmenterLib.slicer import views  # noqa: E402

SHAPE = (20, 36, 44)  # k, j, i
SPACING = (1.1, 0.9, 2.0)  # mm along i, j, k
ORIGIN = (-20.5, 13.0, 7.0)
TURN = math.radians(20.0)  # about the S axis: the views cut the voxels obliquely
COLORS = {1: (0.90, 0.20, 0.10), 2: (0.95, 0.85, 0.10)}  # unlike the 3D view's blue background
VIEW_SIZE = (200, 180)


def _ijk_to_ras() -> np.ndarray:
    rotation = np.array([[math.cos(TURN), -math.sin(TURN), 0.0], [math.sin(TURN), math.cos(TURN), 0.0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag(SPACING)
    matrix[:3, 3] = ORIGIN
    return matrix


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    """A smoothly varying volume, so that the fill blends over many greys, and a labelmap with two labels."""
    k, j, i = np.indices(SHAPE)
    volume = (300 + 120 * np.sin(i / 3.0) + 80 * np.cos(j / 4.0) + 15 * k).astype(np.int16)
    labels = np.zeros(SHAPE, np.uint8)
    labels[((k - 10) / 6.5) ** 2 + ((j - 18) / 10.5) ** 2 + ((i - 13) / 8.5) ** 2 <= 1] = 1  # an ellipsoid
    labels[4:16, 8:29, 26:39] = 2  # a box
    return volume, labels


def _grow(mask: np.ndarray) -> np.ndarray:
    """``mask`` and every voxel that touches it (26-neighbourhood)."""
    grown = mask.copy()
    padded = np.pad(mask, 1)
    for dk in range(3):
        for dj in range(3):
            for di in range(3):
                grown |= padded[dk:dk + mask.shape[0], dj:dj + mask.shape[1], di:di + mask.shape[2]]
    return grown


@pytest.fixture(scope="module")
def rendering():
    problem = views.renderingProblem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def scene(slicer_harness, rendering):
    """The harness's scene holding the phantom volume and its two-segment segmentation."""
    slicer_harness.clear()
    volume, labels = _phantom()
    volumeNode = slicer.util.addVolumeFromArray(volume, _ijk_to_ras(), name="phantom")
    labelmapNode = slicer.util.addVolumeFromArray(labels, _ijk_to_ras(), name="labels",
                                                  nodeClassName="vtkMRMLLabelMapVolumeNode")
    segmentationNode = slicer_harness.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segments")
    segmentationNode.CreateDefaultDisplayNodes()
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode)
    slicer_harness.scene.RemoveNode(labelmapNode)
    segmentation = segmentationNode.GetSegmentation()
    for value, color in COLORS.items():
        segment = segmentation.GetNthSegment(value - 1)
        assert segment.GetLabelValue() == value
        segment.SetColor(*color)
    yield slicer_harness, volumeNode, segmentationNode, labels
    slicer_harness.clear()


def _labels_under_pixels(view: views.SliceView, labels: np.ndarray) -> np.ndarray:
    """The voxel (k, j, i) index under the centre of each pixel of ``view``, top row first; -1 outside the grid."""
    rows, columns = np.mgrid[0:view.height, 0:view.width]
    xy = np.stack([columns, view.height - 1 - rows, np.zeros_like(rows), np.ones_like(rows)], axis=-1)
    ijk = xy @ (np.linalg.inv(_ijk_to_ras()) @ view.xyToRas()).T
    index = np.rint(ijk[..., 2::-1]).astype(int)  # (k, j, i)
    inside = np.all((index >= 0) & (index < np.array(labels.shape)), axis=-1)
    return np.where(inside[..., None], index, -1)


def _at(mask: np.ndarray, index: np.ndarray) -> np.ndarray:
    inside = index[..., 0] >= 0
    result = np.zeros(index.shape[:2], bool)
    result[inside] = mask[tuple(index[inside].T)]
    return result


@pytest.fixture(scope="module")
def slice_views(scene):
    """Per layout and per label: the view's pixels with the segments shown and hidden, and the voxel under each."""
    harness, volumeNode, segmentationNode, labels = scene
    displayNode = segmentationNode.GetDisplayNode()
    centers = {value: np.argwhere(labels == value).mean(axis=0)[::-1] for value in COLORS}  # (i, j, k)
    captures = []
    for layoutName in views.SLICE_VIEWS:
        with views.SliceView(harness.scene, layoutName, size=VIEW_SIZE, applicationLogic=harness.applicationLogic) as view:
            view.show(volumeNode)
            for value, center in centers.items():
                view.jumpTo((_ijk_to_ras() @ np.append(center, 1.0))[:3])
                shown = view.capture()
                displayNode.SetVisibility(False)
                hidden = view.capture()
                displayNode.SetVisibility(True)
                captures.append((f"{layoutName} through label {value}", shown, hidden,
                                 _labels_under_pixels(view, labels)))
    return captures


def _fill_opacity(segmentationNode, value: int) -> float:
    displayNode = segmentationNode.GetDisplayNode()
    segmentId = segmentationNode.GetSegmentation().GetNthSegmentID(value - 1)
    return (displayNode.GetOpacity2DFill() * displayNode.GetSegmentOpacity2DFill(segmentId)
            * displayNode.GetOpacity())


def test_slice_views_fill_each_segment_in_its_colour_where_the_labelmap_has_it(scene, slice_views):
    _, _, segmentationNode, labels = scene
    for name, shown, hidden, index in slice_views:
        for value, color in COLORS.items():
            # Well inside the label: no voxel of another value within one voxel, so no outline either.
            interior = _at(~_grow(labels != value), index)
            if not interior.any():
                continue
            opacity = _fill_opacity(segmentationNode, value)
            expected = (1 - opacity) * hidden[interior] + opacity * 255 * np.array(color)
            difference = np.abs(shown[interior].astype(float) - expected)
            assert difference.max() <= 2.0, f"{name}: label {value} filled wrongly, off by up to {difference.max()}"
        assert any(_at(~_grow(labels != value), index).sum() > 200 for value in COLORS), f"{name} cuts no segment"


def test_slice_views_outline_each_segment_in_its_colour(scene, slice_views):
    _, _, _, labels = scene
    for name, shown, _, index in slice_views:
        for value, color in COLORS.items():
            inside = _at(labels == value, index)
            if inside.sum() < 200:
                continue
            edge = _at(_grow(labels == value) & _grow(labels != value), index)
            pure = np.all(np.abs(shown.astype(float) - 255 * np.array(color)) <= 2, axis=-1)
            assert (pure & edge).sum() > 40, f"{name}: label {value} has no outline in its colour"
            assert not (pure & ~edge).any(), f"{name}: label {value}'s outline colour away from its border"


def test_slice_views_show_no_segment_colour_outside_the_segments(scene, slice_views):
    _, _, _, labels = scene
    for name, shown, hidden, index in slice_views:
        outside = ~_at(_grow(labels > 0), index)
        assert outside.sum() > 1000
        assert np.array_equal(shown[outside], hidden[outside]), f"{name}: segment colour outside the segments"


def test_a_hidden_segment_leaves_the_volume_as_it_is(scene):
    harness, volumeNode, segmentationNode, labels = scene
    displayNode = segmentationNode.GetDisplayNode()
    hiddenId = segmentationNode.GetSegmentation().GetNthSegmentID(1)
    with views.SliceView(harness.scene, "Red", size=VIEW_SIZE, applicationLogic=harness.applicationLogic) as view:
        view.show(volumeNode)
        view.jumpTo((_ijk_to_ras() @ np.append(np.argwhere(labels == 2).mean(axis=0)[::-1], 1.0))[:3])
        displayNode.SetSegmentVisibility(hiddenId, False)
        try:
            withoutOne = view.capture()
        finally:
            displayNode.SetSegmentVisibility(hiddenId, True)
        displayNode.SetVisibility(False)
        try:
            withoutAny = view.capture()
        finally:
            displayNode.SetVisibility(True)
        index = _labels_under_pixels(view, labels)
    box = _at(_grow(labels == 2), index) & ~_at(_grow(labels == 1), index)
    assert box.sum() > 200
    assert np.array_equal(withoutOne[box], withoutAny[box])


def _shades_of(pixels: np.ndarray, color) -> np.ndarray:
    """Pixels whose colour is ``color`` lit more or less brightly (cosine similarity of RGB above 0.995)."""
    pixels = pixels.reshape(-1, 3).astype(float)
    norms = np.linalg.norm(pixels, axis=1) * np.linalg.norm(color)
    return (pixels @ np.asarray(color)) / np.maximum(norms, 1e-9) > 0.995


def test_three_d_view_shows_each_segment_surface_in_its_colour(scene):
    harness, _, segmentationNode, _ = scene
    segmentationNode.CreateClosedSurfaceRepresentation()
    displayNode = segmentationNode.GetDisplayNode()
    with views.ThreeDView(harness.scene, size=VIEW_SIZE, applicationLogic=harness.applicationLogic) as view:
        view.lookFrom((0.3, 1.0, 0.6))
        shown = view.capture()
        displayNode.SetVisibility3D(False)
        try:
            hidden = view.capture()
        finally:
            displayNode.SetVisibility3D(True)
        bottom, top = view.viewNode.GetBackgroundColor(), view.viewNode.GetBackgroundColor2()
    for value, color in COLORS.items():
        assert _shades_of(shown, color).sum() > 300, f"segment {value}'s surface is not in the 3D view"
        assert not _shades_of(hidden, color).any()
    # the view node's gradient background, as the view displayable manager sets it
    assert np.abs(hidden[-1].astype(float) - 255 * np.array(bottom)).max() <= 3
    assert np.abs(hidden[0].astype(float) - 255 * np.array(top)).max() <= 3


def test_views_remove_their_nodes_and_leave_the_applications_views_alone(scene):
    harness, volumeNode, _, _ = scene
    applicationNodes = [harness.scene.AddNewNodeByClass(className) for className in
                        ("vtkMRMLSliceNode", "vtkMRMLSliceCompositeNode", "vtkMRMLViewNode")]
    for node, layoutName in zip(applicationNodes, ("Red", "Red", "1")):
        node.SetLayoutName(layoutName)
    applicationSlice, applicationComposite, _ = applicationNodes
    sliceToRas = slicer.util.arrayFromVTKMatrix(applicationSlice.GetSliceToRAS()).copy()
    before = {harness.scene.GetNthNode(index).GetID() for index in range(harness.scene.GetNumberOfNodes())}
    try:
        with views.SliceView(harness.scene, "Red", applicationLogic=harness.applicationLogic) as sliceView, \
                views.ThreeDView(harness.scene, applicationLogic=harness.applicationLogic) as threeDView:
            sliceView.show(volumeNode)
            sliceView.jumpTo((1.0, 2.0, 3.0))
            assert sliceView.layoutName != "Red" and sliceView.orientation == "Axial"
            assert threeDView.viewNode.GetLayoutName() != "1"
            assert sliceView.capture().shape == (320, 320, 3)
            assert threeDView.capture().shape == (320, 320, 3)
        after = {harness.scene.GetNthNode(index).GetID() for index in range(harness.scene.GetNumberOfNodes())}
        assert after == before
        assert applicationComposite.GetBackgroundVolumeID() is None
        assert np.array_equal(slicer.util.arrayFromVTKMatrix(applicationSlice.GetSliceToRAS()), sliceToRas)
    finally:
        for node in applicationNodes:
            harness.scene.RemoveNode(node)


def test_four_up_puts_each_view_where_slicer_puts_it(scene):
    harness, volumeNode, segmentationNode, labels = scene
    size = 160
    center = (_ijk_to_ras() @ np.append(np.argwhere(labels == 1).mean(axis=0)[::-1], 1.0))[:3]
    picture = views.renderFourUp(volumeNode, segmentationNode, size=size, center=center,
                                 applicationLogic=harness.applicationLogic)
    assert picture.shape == (2 * size + 2, 2 * size + 2, 3) and picture.dtype == np.uint8
    for (top, left), layoutName in {(0, 0): "Red", (1, 0): "Yellow", (1, 1): "Green"}.items():
        with views.SliceView(harness.scene, layoutName, size=(size, size),
                             applicationLogic=harness.applicationLogic) as view:
            view.show(volumeNode)
            view.jumpTo(center)
            alone = view.capture()
        tile = picture[top * (size + 2):top * (size + 2) + size, left * (size + 2):left * (size + 2) + size]
        below_label = slice(size // 4, size)  # the view's name is written in its top-left corner
        assert np.array_equal(tile[below_label], alone[below_label]), layoutName
    threeD = picture[:size, size + 2:]
    for color in COLORS.values():
        assert _shades_of(threeD, color).sum() > 100


def test_a_bare_scene_renders_without_an_application(rendering):
    """No application logic given, none in the factories for this scene: the view makes its own."""
    scene = slicer.vtkMRMLScene()
    labels = np.zeros((5, 30, 30), np.uint8)
    labels[:, 10:20, 5:15] = 1
    image = vtk.vtkImageData()
    image.SetDimensions(30, 30, 5)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = labels.ravel()
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    labelmapNode.SetAndObserveImageData(image)
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentationNode.CreateDefaultDisplayNodes()
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmapNode, segmentationNode)
    segmentationNode.GetSegmentation().GetNthSegment(0).SetColor(*COLORS[1])
    with views.SliceView(scene, "Red", size=(60, 60)) as view:
        view.show(labelmapNode)
        view.jumpTo((0.0, 0.0, 2.0))
        pixels = view.capture().reshape(-1, 3).astype(float)
    opacity = segmentationNode.GetDisplayNode().GetOpacity2DFill()
    filled = np.all(np.abs(pixels - opacity * 255 * np.array(COLORS[1])) <= 2, axis=1)  # over black
    assert 0.05 < filled.mean() < 0.2  # about the label's share of the volume's square (1/9), less its outline


def test_write_png_reads_back_the_same_pixels(tmp_path):
    picture = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    path = views.writePng(picture, tmp_path / "folder" / "picture.png")
    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(7, 11, 3)[::-1]
    assert np.array_equal(pixels, picture)
    assert [entry.name for entry in path.parent.iterdir()] == ["picture.png"]


def test_write_png_into_a_folder_it_cannot_create_says_so_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="cannot write the picture"):
        views.writePng(np.zeros((2, 2, 3), np.uint8), blocker / "picture.png")
    assert list(tmp_path.iterdir()) == [blocker]


def test_a_machine_that_cannot_render_is_told_why_instead_of_crashing(monkeypatch):
    # what VTK does where it finds no OpenGL: the process dies (here by a signal that leaves no core file)
    monkeypatch.setattr(views, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    views.renderingProblem.cache_clear()
    try:
        problem = views.renderingProblem()
    finally:
        views.renderingProblem.cache_clear()
    assert problem is not None and "cannot render offscreen" in problem and "EGL" in problem


def test_importing_the_views_imports_no_torch():
    code = "import sys; from UNet3DSegmenterLib.slicer import views; assert 'torch' not in sys.modules, 'torch'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(views.__file__).resolve().parents[2])
    assert result.returncode == 0, result.stderr
