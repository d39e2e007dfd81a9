"""Pictures of a scene as 3D Slicer's own views show it, rendered offscreen.

The views are made of the parts the application makes its views of, all in slicer-core:

- a slice view (:class:`SliceView`) is a ``vtkMRMLSliceLogic`` (the scene's volumes resliced to the
  view's pixels, with their window/level and colour table) drawn as a 2D image, under the slice-view
  displayable managers, among them ``vtkMRMLSegmentationsDisplayableManager2D``, which fills and
  outlines the segments in their colours;
- a 3D view (:class:`ThreeDView`) is a view node under the 3D-view displayable managers: camera,
  background and ``vtkMRMLSegmentationsDisplayableManager3D`` for the segment surfaces.

They render into offscreen VTK windows; without a display, VTK uses EGL (or OSMesa), so no X server
is needed. A VTK that finds no OpenGL at all crashes instead of raising: :func:`renderingProblem`
asks a child process first. :func:`renderFourUp` composes Slicer's Four-Up layout of a volume and its
segmentation into one picture, and :func:`writePng` saves it.

A view adds its own view nodes to the scene and removes them again in :meth:`close`. Its layout name
is a new one when the scene already has a view of that name, so that it never drives the
application's own views. Example::

    with SliceView(scene, "Red", applicationLogic=applicationLogic) as view:
        view.show(volumeNode)
        pixels = view.capture()  # (height, width, 3) uint8, top row first
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from UNet3DSegmenterLib.atomic import atomic_path
from UNet3DSegmenterLib.errors import UserError

# Slicer's slice views: layout name -> orientation.
SLICE_VIEWS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}

# What the pictures need; the application registers these and more at start-up.
SLICE_VIEW_DISPLAYABLE_MANAGERS = ("vtkMRMLSegmentationsDisplayableManager2D",)
THREE_D_VIEW_DISPLAYABLE_MANAGERS = ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                                     "vtkMRMLSegmentationsDisplayableManager3D")

# Renders a few pixels and reads them back; run in a child process, since a failure may crash it.
_PROBE = """
import vtk
window = vtk.vtkRenderWindow()
window.SetOffScreenRendering(1)
window.SetSize(4, 4)
renderer = vtk.vtkRenderer()
renderer.SetBackground(0.0, 1.0, 0.0)
window.AddRenderer(renderer)
window.Render()
grab = vtk.vtkWindowToImageFilter()
grab.SetInput(window)
grab.Update()
print("rendered" if grab.GetOutput().GetScalarComponentAsDouble(2, 2, 0, 1) == 255 else "wrong pixels")
"""


@functools.cache
def renderingProblem() -> str | None:
    """Why VTK cannot render offscreen on this machine, in one line; None when it can."""
    _preferHeadlessOpenGL()
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"could not test offscreen rendering: {error}"
    if result.returncode == 0 and result.stdout.strip() == "rendered":
        return None
    return ("VTK cannot render offscreen on this machine: it could not make an OpenGL context (no usable display, "
            "EGL or OSMesa); install Mesa's EGL (Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri) "
            "or run under xvfb-run")


def _preferHeadlessOpenGL() -> None:
    """Without a display, go straight to EGL (VTK's wheel tries X first, and warns when it fails)."""
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


class _View:
    """What slice and 3D views share: an offscreen window, its renderer, displayable managers, nodes to remove."""

    def __init__(self, scene, size: Sequence[int], applicationLogic) -> None:
        self.scene = scene
        self.width, self.height = (int(size[0]), int(size[1]))
        if self.width < 1 or self.height < 1:
            raise ValueError(f"a view needs a size of at least 1 x 1 pixels, not {self.width} x {self.height}")
        self.applicationLogic = applicationLogic if applicationLogic is not None else _applicationLogic(scene)
        _preferHeadlessOpenGL()
        self.renderWindow = vtk.vtkRenderWindow()
        self.renderWindow.SetOffScreenRendering(1)
        self.renderWindow.SetMultiSamples(0)  # the same pixels on every machine, as in Slicer's rendering tests
        self.renderWindow.SetSize(self.width, self.height)
        self.renderer = vtk.vtkRenderer()
        self.renderWindow.AddRenderer(self.renderer)
        # Displayable managers reach the view's interactor through the render window.
        self.interactor = vtk.vtkGenericRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.renderWindow)
        self.displayableManagerGroup: Any = None
        self._addedNodes: list = []

    def _addDisplayableManagers(self, factory, names: Sequence[str], viewNode) -> None:
        """The factory's displayable managers on this view's renderer, as the application's view widgets make them."""
        for name in names:
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)
        # The factory hands its application logic to each manager it makes; in the application it is the
        # application's own, which is left as it was.
        previous = factory.GetMRMLApplicationLogic()
        factory.SetMRMLApplicationLogic(self.applicationLogic)
        try:
            self.displayableManagerGroup = slicer.vtkMRMLDisplayableManagerGroup()
            self.displayableManagerGroup.Initialize(factory, self.renderer)
        finally:
            factory.SetMRMLApplicationLogic(previous)
        self.displayableManagerGroup.SetMRMLDisplayableNode(viewNode)

    def capture(self) -> np.ndarray:
        """Render the view and return its pixels: (height, width, 3) uint8 RGB, top row first."""
        if self.renderWindow is None:
            raise RuntimeError("this view is closed")
        self.renderWindow.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.renderWindow)
        grab.SetInputBufferTypeToRGB()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, 3)
        return np.ascontiguousarray(pixels[::-1])  # VTK's rows start at the bottom

    def close(self) -> None:
        """Release the window and remove the nodes this view added to the scene."""
        if self.displayableManagerGroup is not None:
            self.displayableManagerGroup.SetMRMLDisplayableNode(None)
            self.displayableManagerGroup = None
        for node in reversed(self._addedNodes):
            if node.GetScene() is self.scene:
                self.scene.RemoveNode(node)
        self._addedNodes.clear()
        if self.renderWindow is not None:
            self.renderWindow.Finalize()
            self.renderWindow = None

    def __enter__(self):
        return self

    def __exit__(self, *exception) -> None:
        self.close()


class SliceView(_View):
    """One of Slicer's slice views, offscreen: the volume layers of a ``vtkMRMLSliceLogic`` and the segments.

    Args:
        scene: the MRML scene to show.
        layoutName: ``"Red"``, ``"Yellow"`` or ``"Green"`` (or any name, with ``orientation`` given).
        orientation: ``"Axial"``, ``"Sagittal"`` or ``"Coronal"``; by default the layout's own.
        size: (width, height) in pixels.
        applicationLogic: the scene's ``vtkMRMLApplicationLogic`` (in Slicer, ``slicer.app.applicationLogic()``);
            by default the displayable manager factory's when it serves ``scene``, else a new one.
    """

    def __init__(self, scene, layoutName: str = "Red", orientation: str | None = None,
                 size: Sequence[int] = (320, 320), applicationLogic=None) -> None:
        orientation = orientation or SLICE_VIEWS.get(layoutName)
        if orientation not in SLICE_VIEWS.values():
            raise ValueError(f"slice view {layoutName!r} needs an orientation, one of {sorted(SLICE_VIEWS.values())}, "
                             f"not {orientation!r}")
        super().__init__(scene, size, applicationLogic)
        self.sliceLogic = slicer.vtkMRMLSliceLogic()
        self.sliceLogic.SetMRMLApplicationLogic(self.applicationLogic)
        self.sliceLogic.SetMRMLScene(scene)
        self.sliceNode = self.sliceLogic.AddSliceNode(_freeLayoutName(scene, layoutName, "vtkMRMLSliceNode"))
        self._addedNodes += [self.sliceNode, self.sliceLogic.GetSliceCompositeNode()]
        self.sliceNode.SetDefaultOrientation(orientation)  # as the layout logic sets up a layout's views
        self.sliceNode.SetOrientation(orientation)
        if layoutName in SLICE_VIEWS:
            self.sliceNode.SetLayoutColor(getattr(slicer.vtkMRMLSliceNode, f"Get{layoutName}Color")())
        self.sliceLogic.ResizeSliceNode(self.width, self.height)
        self.renderer.SetBackground(self.sliceNode.GetBackgroundColor())

        # The volume layers, blended by the slice logic, drawn pixel for pixel as CTK's slice view draws them.
        self._imageMapper = vtk.vtkImageMapper()
        self._imageMapper.SetColorWindow(255)
        self._imageMapper.SetColorLevel(127.5)
        imageActor = vtk.vtkActor2D()
        imageActor.SetMapper(self._imageMapper)
        self.renderer.AddViewProp(imageActor)
        self._addDisplayableManagers(slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance(),
                                     SLICE_VIEW_DISPLAYABLE_MANAGERS, self.sliceNode)

    @property
    def layoutName(self) -> str:
        return self.sliceNode.GetLayoutName()

    def close(self) -> None:
        # The slice logic also made the model that shows this slice in 3D views: a model, its display and transform.
        sliceModel = [self.sliceLogic.GetSliceModelTransformNode(), self.sliceLogic.GetSliceModelDisplayNode(),
                      self.sliceLogic.GetSliceModelNode()]
        self._addedNodes += [node for node in sliceModel if node is not None]
        self.sliceLogic.SetMRMLScene(None)  # or it makes them anew when its slice node goes
        super().close()

    @property
    def orientation(self) -> str:
        return self.sliceNode.GetOrientation()

    def show(self, volumeNode, fit: bool = True) -> None:
        """Show ``volumeNode`` as the background layer and, with ``fit``, fit the view to it."""
        self.sliceLogic.GetSliceCompositeNode().SetBackgroundVolumeID(volumeNode.GetID() if volumeNode else None)
        if fit:
            self.sliceLogic.FitSliceToBackground(self.width, self.height)

    def capture(self) -> np.ndarray:
        # The slice logic makes a new pipeline output when its layers change; the application's slice
        # widget follows it the same way.
        self._imageMapper.SetInputConnection(self.sliceLogic.GetImageDataConnection())
        return super().capture()

    def jumpTo(self, ras: Sequence[float]) -> None:
        """Move the slice through the point ``ras`` (mm), keeping what the view shows in plane."""
        self.sliceNode.JumpSliceByOffsetting(*(float(value) for value in ras))

    def xyToRas(self) -> np.ndarray:
        """The 4x4 matrix from view pixels (x right, y up, from the bottom-left pixel) to RAS millimetres."""
        return slicer.util.arrayFromVTKMatrix(self.sliceNode.GetXYToRAS())


class ThreeDView(_View):
    """Slicer's 3D view, offscreen: camera, background and the segment surfaces.

    Args:
        scene: the MRML scene to show.
        layoutName: the view's name (the application's first 3D view is ``"1"``).
        size: (width, height) in pixels.
        applicationLogic: as for :class:`SliceView`.
    """

    def __init__(self, scene, layoutName: str = "1", size: Sequence[int] = (320, 320), applicationLogic=None) -> None:
        super().__init__(scene, size, applicationLogic)
        self.viewLogic = slicer.vtkMRMLViewLogic()
        self.viewLogic.SetMRMLApplicationLogic(self.applicationLogic)
        self.viewLogic.SetMRMLScene(scene)
        self.viewNode = self.viewLogic.AddViewNode(_freeLayoutName(scene, layoutName, "vtkMRMLViewNode"))
        self._addedNodes.append(self.viewNode)
        self._addDisplayableManagers(slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance(),
                                     THREE_D_VIEW_DISPLAYABLE_MANAGERS, self.viewNode)
        cameraNode = slicer.vtkMRMLViewLogic.GetCameraNode(scene, self.viewNode.GetLayoutName())
        if cameraNode is not None:  # made for this view by the camera displayable manager
            self._addedNodes.insert(0, cameraNode)

    def lookFrom(self, direction: Sequence[float], viewUp: Sequence[float] = (0.0, 0.0, 1.0),
                 zoom: float = 1.0) -> None:
        """Look from ``direction`` (RAS) at all that is shown, fitted to the view; ``zoom`` > 1 comes closer."""
        camera = self.renderer.GetActiveCamera()
        direction = np.asarray(direction, float) / np.linalg.norm(direction)
        focalPoint = np.asarray(camera.GetFocalPoint())
        camera.SetPosition(*(focalPoint + direction * camera.GetDistance()))
        camera.SetViewUp(*(float(value) for value in viewUp))
        self.renderer.ResetCamera()  # what the view's "center view" does: fit the visible bounds
        camera.Zoom(zoom)
        self.renderer.ResetCameraClippingRange()


def segmentsCenter(segmentationNode) -> np.ndarray | None:
    """A point (RAS, mm) inside the segments near their middle, to put the slice views through; None if empty.

    It is the segment voxel nearest the centroid of all segment voxels, so that it lies in a segment
    even where the segments curve around their centroid.
    """
    points = _segmentVoxels(segmentationNode)
    if len(points) == 0:
        return None
    center = points[np.argmin(((points - points.mean(axis=0)) ** 2).sum(axis=1))]
    parent = segmentationNode.GetParentTransformNode()
    if parent is not None:
        toWorld = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, toWorld)
        center = np.asarray(toWorld.TransformPoint(*center))
    return center


def _segmentVoxels(segmentationNode) -> np.ndarray:
    """The centres (segmentation coordinates, mm) of every voxel of every segment's binary labelmap."""
    segmentation = segmentationNode.GetSegmentation()
    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation.CreateRepresentation(representation)
    points = [np.zeros((0, 3))]
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        image = segment.GetRepresentation(representation)
        extent = image.GetExtent() if image is not None else (0, -1, 0, -1, 0, -1)
        if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
            continue
        dimensions = [extent[2 * axis + 1] - extent[2 * axis] + 1 for axis in range(3)]
        voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dimensions[::-1])
        ijk = np.argwhere(voxels == segment.GetLabelValue())[:, ::-1] + np.asarray(extent[0::2])
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        imageToWorld = slicer.util.arrayFromVTKMatrix(matrix)
        points.append(ijk @ imageToWorld[:3, :3].T + imageToWorld[:3, 3])
    return np.concatenate(points)


def renderFourUp(volumeNode, segmentationNode, size: int = 320, center: Sequence[float] | None = None,
                 cameraDirection: Sequence[float] = (-1.0, 0.6, 0.5), applicationLogic=None) -> np.ndarray:
    """Slicer's Four-Up layout of ``volumeNode`` and ``segmentationNode``, as one RGB picture.

    Top: the axial slice view and the 3D view; bottom: the sagittal and coronal slice views, as in the
    application. The slice views show the volume with the segments filled and outlined in their
    colours, all through ``center`` (RAS, mm; by default :func:`segmentsCenter`); the 3D view shows
    the segment surfaces from ``cameraDirection`` (RAS), with the segment names in their colours.
    Each view is ``size`` pixels square. The segmentation gets a closed-surface representation, as
    its *Show 3D* button gives it.

    Returns:
        (2 * size + 2, 2 * size + 2, 3) uint8 RGB, top row first.
    """
    scene = volumeNode.GetScene()
    if applicationLogic is None:
        applicationLogic = _applicationLogic(scene)
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()
    segmentationNode.CreateClosedSurfaceRepresentation()
    point = segmentsCenter(segmentationNode) if center is None else np.asarray(center, float)
    tiles = {}
    for layoutName, orientation in SLICE_VIEWS.items():
        with SliceView(scene, layoutName, orientation, (size, size), applicationLogic) as view:
            view.show(volumeNode)
            if point is not None:
                view.jumpTo(point)
            _addLabel(view.renderer, orientation, view.sliceNode.GetLayoutColor(), 6, size - 6, hangs=True)
            tiles[layoutName] = view.capture()
    with ThreeDView(scene, "1", (size, size), applicationLogic) as view:
        view.viewNode.SetBoxVisible(False)  # the box frames the whole scene's field of view, not the segments
        view.viewNode.SetAxisLabelsVisible(False)
        view.lookFrom(cameraDirection, zoom=1.1)
        _addLabel(view.renderer, "3D", view.viewNode.GetLayoutColor(), 6, size - 6, hangs=True)
        for row, (name, color) in enumerate(reversed(_visibleSegments(segmentationNode))):  # the legend
            _addLabel(view.renderer, name, color, 6, 6 + row * 22)
        tiles["3D"] = view.capture()
    gap = 2
    picture = np.full((2 * size + gap, 2 * size + gap, 3), 40, np.uint8)
    for (row, column), name in {(0, 0): "Red", (0, 1): "3D", (1, 0): "Yellow", (1, 1): "Green"}.items():
        top, left = row * (size + gap), column * (size + gap)
        picture[top:top + size, left:left + size] = tiles[name]
    return picture


def _visibleSegments(segmentationNode) -> list[tuple[str, tuple[float, float, float]]]:
    """(name, displayed colour) of each segment that is shown, in the segmentation's order."""
    segmentation = segmentationNode.GetSegmentation()
    displayNode = segmentationNode.GetDisplayNode()
    shown = []
    for index in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(index)
        if displayNode is None or displayNode.GetSegmentVisibility(segmentId):
            color = displayNode.GetSegmentColor(segmentId) if displayNode else segmentation.GetSegment(segmentId).GetColor()
            shown.append((segmentation.GetSegment(segmentId).GetName(), tuple(color)))
    return shown


def _addLabel(renderer, text: str, color: Sequence[float], x: int, y: int, *, hangs: bool = False) -> None:
    """``text`` on a chip of ``color`` with its bottom-left corner at pixel (x, y); its top-left if it ``hangs``."""
    actor = vtk.vtkTextActor()
    actor.SetInput(f" {text} ")
    properties = actor.GetTextProperty()
    properties.SetFontFamilyToArial()
    properties.SetFontSize(14)
    properties.SetBold(True)
    properties.SetBackgroundColor(*color)
    properties.SetBackgroundOpacity(1.0)
    luminance = 0.2126 * color[0] + 0.7152 * color[1] + 0.0722 * color[2]
    properties.SetColor(*((0.0, 0.0, 0.0) if luminance > 0.5 else (1.0, 1.0, 1.0)))
    if hangs:
        properties.SetVerticalJustificationToTop()
    actor.SetDisplayPosition(x, y)
    renderer.AddViewProp(actor)


def writePng(picture: np.ndarray, path: str | os.PathLike) -> Path:
    """Write an (height, width, 3) uint8 RGB picture as a PNG, atomically (the file appears whole or not at all)."""
    picture = np.ascontiguousarray(picture, np.uint8)
    if picture.ndim != 3 or picture.shape[2] != 3:
        raise ValueError(f"a picture is (height, width, 3) RGB, not an array of shape {picture.shape}")
    image = vtk.vtkImageData()
    image.SetDimensions(picture.shape[1], picture.shape[0], 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(picture[::-1].reshape(-1, 3), deep=True))
    writer = vtk.vtkPNGWriter()
    writer.SetInputData(image)
    writer.SetCompressionLevel(9)
    writer.WriteToMemoryOn()
    writer.Write()
    data = numpy_support.vtk_to_numpy(writer.GetResult()).tobytes()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, suffix=".png") as temporary:
            temporary.write_bytes(data)
    except OSError as error:
        raise UserError(f"cannot write the picture {path}: {error.strerror or error}") from None
    return path


def _applicationLogic(scene):
    """The application logic serving ``scene``: the displayable manager factories' if theirs, else a new one."""
    logic = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().GetMRMLApplicationLogic()
    if logic is not None and logic.GetMRMLScene() is scene:
        return logic
    logic = slicer.vtkMRMLApplicationLogic()
    logic.SetMRMLScene(scene)
    return logic


def _freeLayoutName(scene, name: str, className: str) -> str:
    """``name``, or a new name like it if the scene already has a view of ``className`` with that layout name."""
    taken = {scene.GetNthNodeByClass(index, className).GetLayoutName()
             for index in range(scene.GetNumberOfNodesByClass(className))}
    if name not in taken:
        return name
    return next(f"{name}{number}" for number in range(2, len(taken) + 3) if f"{name}{number}" not in taken)
