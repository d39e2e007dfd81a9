"""Between the MRML scene and the engine: volume nodes <-> Volume, segmentations <-> labelmaps.

This is the one place where Slicer's IJK-to-RAS matrix meets the engine's geometry (converted by
``Volume.from_ijk_to_ras`` / ``Volume.ijk_to_ras``), and where results are stored in the scene: one
segment per label with its name and colour, on the input's grid, beside the input in the subject
hierarchy. Mistakes the user can fix raise ``ValueError`` with one line and leave the scene as it was.
"""

from __future__ import annotations

import itertools

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .install import engine

CHECKPOINT_ATTRIBUTE = "UNet3DSegmenter.Checkpoint"
"""Attribute of a segmentation made by the module: the checkpoint that made it."""
INPUT_VOLUME_ROLE = "UNet3DSegmenter.InputVolume"
"""Node reference of a segmentation made by the module: the volume it segments."""


def checkVolumeNode(volumeNode) -> None:
    """ValueError unless ``volumeNode`` is a scalar or vector volume node holding a 3D image."""
    if volumeNode is None:
        raise ValueError("no input volume: choose a volume")
    if not volumeNode.IsA("vtkMRMLScalarVolumeNode") and not volumeNode.IsA("vtkMRMLVectorVolumeNode"):
        raise ValueError(f"{volumeNode.GetName()} is a {volumeNode.GetClassName()}, not a scalar or vector volume")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise ValueError(f"volume {volumeNode.GetName()} holds no voxels: load an image into it first")
    dimensions = imageData.GetDimensions()
    if min(dimensions) < 2:
        raise ValueError(f"volume {volumeNode.GetName()} is a 2D image ({' x '.join(map(str, dimensions))} "
                         "voxels): a 3D volume is needed")


def volumeFromNode(volumeNode):
    """The engine Volume of a scalar or vector volume node: voxels copied, geometry exact.

    The node's own IJK-to-RAS matrix is used; a parent transform is not applied (results are
    placed under the same transform instead).
    """
    checkVolumeNode(volumeNode)
    array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
    if array.ndim == 4:  # vector volume: (k, j, i, component) -> (channel, k, j, i)
        array = np.ascontiguousarray(np.moveaxis(array, -1, 0))
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return engine().Volume.from_ijk_to_ras(array, slicer.util.arrayFromVTKMatrix(matrix))


def addVolumeNode(volume, name: str = "volume", labelmap: bool = False):
    """Add an engine Volume to the scene as a scalar (or labelmap, or vector) volume node."""
    array = volume.array if volume.array.ndim == 3 else np.moveaxis(volume.array, 0, -1)
    nodeClass = ("vtkMRMLLabelMapVolumeNode" if labelmap else
                 "vtkMRMLVectorVolumeNode" if volume.array.ndim == 4 else "vtkMRMLScalarVolumeNode")
    return slicer.util.addVolumeFromArray(np.ascontiguousarray(array), volume.ijk_to_ras(),
                                          name=slicer.mrmlScene.GenerateUniqueName(name), nodeClassName=nodeClass)


def segmentNames(segmentationNode) -> list[str]:
    """The names of the segments, in the segmentation's order."""
    segmentation = segmentationNode.GetSegmentation()
    return [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]


def updateSegmentationFromLabelmap(segmentationNode, labelmap, labels, referenceVolumeNode=None) -> None:
    """Replace all segments of ``segmentationNode`` by one segment per label of ``labelmap``.

    ``labels`` are engine Labels (value, name, colour); a label absent from the labelmap still gets
    its (empty) segment, so that every structure the model knows is listed.
    """
    foreground = [label for label in labels if label.value != 0]
    index = np.zeros(labelmap.shape, np.uint16 if len(foreground) > 255 else np.uint8)
    for number, label in enumerate(foreground, start=1):
        index[labelmap.array == label.value] = number
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(index.shape[::-1])
    image.AllocateScalars(vtk.VTK_UNSIGNED_SHORT if index.dtype == np.uint16 else vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    voxels[:] = index.ravel()
    image.SetImageToWorldMatrix(slicer.util.vtkMatrixFromArray(labelmap.ijk_to_ras()))

    wasModifying = segmentationNode.StartModify()
    try:
        if referenceVolumeNode is not None:
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolumeNode)
        segmentation = segmentationNode.GetSegmentation()
        segmentation.RemoveAllSegments()
        segmentIds = vtk.vtkStringArray()
        for label in foreground:
            segmentId = segmentation.AddEmptySegment(label.name, label.name, tuple(float(c) for c in label.color))
            segment = segmentation.GetSegment(segmentId)
            segment.SetNameAutoGenerated(False)
            segment.SetColorAutoGenerated(False)
            segmentIds.InsertNextValue(segmentId)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
                image, segmentationNode, segmentIds, None):
            raise RuntimeError(f"could not import the labelmap into {segmentationNode.GetName()}")
    finally:
        segmentationNode.EndModify(wasModifying)


def labelmapFromSegmentation(segmentationNode, referenceVolumeNode, names=None) -> np.ndarray:
    """The segments as one labelmap array (k, j, i) on the reference volume's grid.

    Segment ``names[n]`` gets value n + 1 (default: every segment, in the segmentation's order);
    where segments overlap, the later one wins. Names the segmentation lacks stay absent.
    """
    segmentation = segmentationNode.GetSegmentation()
    names = segmentNames(segmentationNode) if names is None else list(names)
    present = [(value, segmentation.GetSegmentIdBySegmentName(name)) for value, name in enumerate(names, start=1)]
    present = [(value, segmentId) for value, segmentId in present if segmentId]
    dimensions = referenceVolumeNode.GetImageData().GetDimensions()
    result = np.zeros(dimensions[::-1], np.uint16 if len(names) > 255 else np.uint8)
    if not present:
        return result
    segmentIds = vtk.vtkStringArray()
    for _, segmentId in present:
        segmentIds.InsertNextValue(segmentId)
    scene = segmentationNode.GetScene()
    labelmapNode = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelmapNode, referenceVolumeNode):
            raise ValueError(f"could not export the segments of {segmentationNode.GetName()} "
                             f"onto the grid of {referenceVolumeNode.GetName()}")
        exported = slicer.util.arrayFromVolume(labelmapNode)
        lookup = np.zeros(len(present) + 1, result.dtype)
        lookup[1:] = [value for value, _ in present]
        result[...] = lookup[exported]
    finally:
        removeNodeAndHelpers(scene, labelmapNode)
    return result


def storeSegmentation(labelmap, labels, inputVolume, outputSegmentation=None, checkpointName: str = ""):
    """Put a result into the scene: ``outputSegmentation`` (a new node when None) gets one segment per label.

    The segmentation lies on the input's geometry, under the input's transform and beside it in the
    subject hierarchy, and remembers the checkpoint and the input (see :func:`segmentedPairs` in
    ``export``). ValueError, and nothing added, when the input has left the scene meanwhile.
    """
    scene = inputVolume.GetScene()
    if scene is None:
        raise ValueError(f"volume {inputVolume.GetName()} was removed from the scene while it was segmented: "
                         "nothing was added")
    if outputSegmentation is not None and outputSegmentation.GetScene() is not scene:
        outputSegmentation = None  # the chosen output was deleted meanwhile: make a new one rather than lose the result
    created = outputSegmentation is None
    if created:
        outputSegmentation = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{inputVolume.GetName()} segmentation"))
    previousTransform = outputSegmentation.GetTransformNodeID()
    # The reference geometry is computed in the node's own frame: place it under the input's transform first,
    # or a transform between the two would be applied once now and once more by the node's own transform.
    outputSegmentation.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
    try:
        updateSegmentationFromLabelmap(outputSegmentation, labelmap, labels, inputVolume)
    except Exception:
        if created:
            scene.RemoveNode(outputSegmentation)
        else:
            outputSegmentation.SetAndObserveTransformNodeID(previousTransform)
        raise
    if outputSegmentation.GetDisplayNode() is None:
        outputSegmentation.CreateDefaultDisplayNodes()
    outputSegmentation.SetAttribute(CHECKPOINT_ATTRIBUTE, checkpointName)
    outputSegmentation.SetNodeReferenceID(INPUT_VOLUME_ROLE, inputVolume.GetID())
    placeInStudy(outputSegmentation, inputVolume)
    return outputSegmentation


CONFIDENCE_ROLE = "UNet3DSegmenter.Confidence"
"""Reference from a segmentation to the volume of the model's confidence that came with it."""


def storeConfidence(uncertainty, measure: str, segmentationNode, inputVolume):
    """Show where the model is unsure as a volume over the image: ``uncertainty`` (an engine Volume on the
    input's grid, see the predictor's ``uncertainty``) becomes a scalar volume node, the segmentation's
    confidence (replaced when it is segmented again), shown in every slice view as a half-transparent
    foreground over the input, 0 to 1 in a colour map. Return the node."""
    scene = inputVolume.GetScene()
    node = segmentationNode.GetNodeReference(CONFIDENCE_ROLE)
    if node is None:
        node = addVolumeNode(uncertainty, f"{inputVolume.GetName()} {measure}")
    else:
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(uncertainty.array))
    node.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    if scene.GetNodeByID(_CONFIDENCE_COLORS) is not None:
        display.SetAndObserveColorNodeID(_CONFIDENCE_COLORS)
    segmentationNode.SetNodeReferenceID(CONFIDENCE_ROLE, node.GetID())
    placeInStudy(node, inputVolume)
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(inputVolume.GetID())
        composite.SetForegroundVolumeID(node.GetID())
        composite.SetForegroundOpacity(0.5)
    return node


_CONFIDENCE_COLORS = "vtkMRMLColorTableNodeRainbow"


def placeInStudy(node, referenceNode) -> None:
    """Put ``node`` beside ``referenceNode`` in the subject hierarchy (under its study or patient)."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    if hierarchy is None:
        return
    referenceItem = hierarchy.GetItemByDataNode(referenceNode)
    parent = hierarchy.GetItemParent(referenceItem) if referenceItem else hierarchy.GetSceneItemID()
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent)
    else:  # the application adds an item for every new node; a bare scene (a script's) may not have
        hierarchy.CreateItem(parent, node)


def removeNodeAndHelpers(scene, node) -> None:
    """Remove a temporary node with the display, storage and colour nodes that came with it."""
    helpers = []
    for index in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(index)
        if display is not None:
            helpers.append(display)
            color = display.GetColorNode()
            if color is not None and color.GetScene() is scene and not color.GetSingletonTag():
                helpers.append(color)
    helpers += [node.GetNthStorageNode(index) for index in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for helper in helpers:
        if helper is not None and helper.GetScene() is scene:
            scene.RemoveNode(helper)


def regionFromRoiNode(roiNode, volumeNode=None):
    """The engine's RegionOfInterest of a markups ROI node, in the RAS frame of ``volumeNode``'s voxels
    (the world when None): where the ROI is shown, its own and the volume's parent transforms applied.

    ValueError for an ROI that is not placed, an ROI that is rotated relative to the volume's frame
    (the engine's box is aligned with the R, A, S axes, as the voxels of most volumes are), or a
    non-linear transform between the two.
    """
    if roiNode is None or not roiNode.IsA("vtkMRMLMarkupsROINode"):
        raise ValueError("no region of interest: choose an ROI, or place one with 'Place ROI'")
    if roiNode.GetNumberOfControlPoints() == 0 and min(roiNode.GetSize()) <= 0:
        raise ValueError(f"the ROI {roiNode.GetName()} is not placed yet: place it over the volume")
    worldToVolume = vtk.vtkMatrix4x4()  # identity: the volume's voxels are placed in world RAS
    volumeTransform = volumeNode.GetParentTransformNode() if volumeNode is not None else None
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, volumeTransform, worldToVolume):
        raise ValueError(f"volume {volumeNode.GetName()} is under a non-linear transform: harden it first")
    roiTransform = roiNode.GetParentTransformNode()
    if roiTransform is not None and not roiTransform.IsTransformToWorldLinear():
        raise ValueError(f"the ROI {roiNode.GetName()} is under a non-linear transform: harden it first")
    objectToVolume = slicer.util.arrayFromVTKMatrix(worldToVolume) @ \
        slicer.util.arrayFromVTKMatrix(roiNode.GetObjectToWorldMatrix())
    axes = objectToVolume[:3, :3] / np.linalg.norm(objectToVolume[:3, :3], axis=0, keepdims=True)
    if not np.allclose(np.abs(axes).max(axis=0), 1.0, atol=1e-6):
        raise ValueError(f"the ROI {roiNode.GetName()} is rotated: only a box aligned with the R, A, S axes can "
                         "be segmented; reset its rotation (Markups module, or remove its rotating transform)")
    radius = np.asarray(roiNode.GetSize(), np.float64) / 2
    if np.any(radius <= 0):
        raise ValueError(f"the ROI {roiNode.GetName()} is empty (a side of length 0): give it a size")
    corners = np.array([(objectToVolume @ np.append(radius * np.array(signs), 1.0))[:3]
                        for signs in itertools.product((-1, 1), repeat=3)])
    return engine().RegionOfInterest(tuple(corners.min(axis=0)), tuple(corners.max(axis=0)))


def addRoiAroundVolumeCentre(volumeNode, sizeXYZ=None, name: str = "Segment region"):
    """A new markups ROI, aligned with R, A, S, centred on ``volumeNode``'s box: ``sizeXYZ`` mm along
    the volume's own x, y, z axes (e.g. the size of a model's training images; default half the
    volume), at most the volume's size."""
    checkVolumeNode(volumeNode)
    bounds = [0.0] * 6
    volumeNode.GetRASBounds(bounds)
    volumeSize = np.array([bounds[2 * axis + 1] - bounds[2 * axis] for axis in range(3)])
    if sizeXYZ is None:
        sizeRAS = volumeSize / 2
    else:
        directions = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASDirectionMatrix(directions)
        toRAS = np.abs(slicer.util.arrayFromVTKMatrix(directions)[:3, :3])
        sizeRAS = np.minimum(toRAS @ np.asarray(sizeXYZ, np.float64), volumeSize)
    roiNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", slicer.mrmlScene.GenerateUniqueName(name))
    roiNode.CreateDefaultDisplayNodes()  # shown, with handles to drag, in the slice and 3D views
    roiNode.SetCenter([(bounds[2 * axis] + bounds[2 * axis + 1]) / 2 for axis in range(3)])
    roiNode.SetSize([float(size) for size in sizeRAS])
    return roiNode
