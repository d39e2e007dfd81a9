"""Training data from the scene: (volume, segmentation) pairs written as a dataset the trainer reads.

Segment names become label names, matched across pairs; a label's colour is that of the first
segment with its name. When fine-tuning, the model's own labels keep their values (so that its
output layer is kept) and new names follow. The dataset is the Medical Segmentation Decathlon
layout that ``datalist.write_datalist`` writes and ``datalist.load_datalist`` reads back, colours
included, so a run started from Slicer can be repeated with ``unet3d-segmenter train``.

A segmentation marked "only some slices are annotated" (:func:`markSparselyAnnotated`) is sparse
annotation: its slices, along the axis the user painted, that hold no segment at all are exported
as the label ``ignore`` (a value after the segments'), which training leaves out; an annotated
slice counts as fully labelled, background included (``UNet3DSegmenterLib.sparse``).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import numpy as np

from ..labels import IGNORE_NAME
from ..paths import safe_file_name
from .install import asValueError, engine
from .scene import (
    CHECKPOINT_ATTRIBUTE,
    INPUT_VOLUME_ROLE,
    checkVolumeNode,
    labelmapFromSegmentation,
    segmentNames,
    volumeFromNode,
)

SPARSE_ATTRIBUTE = "UNet3DSegmenter.OnlySomeSlicesAnnotated"
"""Segmentation node attribute ("1") that marks a segmentation painted on some slices only."""
IGNORE_COLOR = (0.5, 0.5, 0.5)


def markSparselyAnnotated(segmentationNode, sparse: bool = True) -> None:
    """Mark (or unmark) ``segmentationNode`` as painted on some slices only; saved with the scene."""
    segmentationNode.SetAttribute(SPARSE_ATTRIBUTE, "1" if sparse else None)


def isSparselyAnnotated(segmentationNode) -> bool:
    return segmentationNode is not None and segmentationNode.GetAttribute(SPARSE_ATTRIBUTE) == "1"


def trainingLabels(pairs, initLabels=None) -> list:
    """The engine Label of each segment name across ``pairs``: values 1, 2, ... in order of first appearance.

    ``initLabels`` (a checkpoint's labels, when fine-tuning) come first with their own values;
    names they lack follow. Colours come from the first segment with that name. When a pair is
    annotated sparsely, a last label named ``ignore`` marks its unannotated slices.
    """
    Label = engine().Label
    labels: dict[str, Any] = {}
    colors: dict[str, tuple] = {}
    for _, segmentationNode in pairs:
        segmentation = segmentationNode.GetSegmentation()
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            colors.setdefault(segment.GetName(), tuple(float(c) for c in segment.GetColor()))
    for label in initLabels or []:
        if label.value != 0:
            labels[label.name] = Label(label.value, label.name, colors.get(label.name, tuple(label.color)))
    nextValue = max([label.value for label in labels.values()], default=0) + 1
    for name, color in colors.items():
        if name not in labels:
            labels[name] = Label(nextValue, name, color)
            nextValue += 1
    if any(isSparselyAnnotated(segmentationNode) for _, segmentationNode in pairs):
        return [*labels.values(), Label(nextValue, IGNORE_NAME, IGNORE_COLOR)]
    return list(labels.values())


def checkPairs(pairs) -> None:
    """ValueError, one line, for the first pair that cannot be trained on."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no training pairs: add at least one volume with its segmentation")
    for volumeNode, segmentationNode in pairs:
        checkVolumeNode(volumeNode)
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise ValueError(f"volume {volumeNode.GetName()} has no segmentation: pair it with a segmentation node")
        names = segmentNames(segmentationNode)
        if not names:
            raise ValueError(f"segmentation {segmentationNode.GetName()} has no segments: "
                             "draw at least one segment (Segment Editor) or choose another segmentation")
        duplicate = next((name for name in names if names.count(name) > 1), None)
        if duplicate:
            raise ValueError(f"segmentation {segmentationNode.GetName()} has two segments named {duplicate!r}: "
                             "rename one, segment names become label names")


class ExportStopped(Exception):
    """The user stopped an export between two cases; nothing was written."""


def exportTrainingPairs(pairs, folder, labels=None, progress=None) -> pathlib.Path:
    """Write (volume, segmentation) pairs as a training dataset in ``folder``; return the folder.

    Layout: ``images/<case>.nii.gz``, ``labels/<case>.nii.gz`` (the segments as one labelmap on the
    volume's grid) and ``dataset.json`` (case list, value -> name and colour). ``labels`` default to
    :func:`trainingLabels`. Every pair is checked before anything is written; the folder appears
    complete or not at all (a previous export there is replaced); the scene is left as it was.
    ``progress(done, total)`` is called before the first case and after each; when it returns False
    the export stops with :class:`ExportStopped`, leaving nothing.
    """
    pairs = list(pairs)
    checkPairs(pairs)
    labels = trainingLabels(pairs) if labels is None else list(labels)
    ignore = next((label.value for label in labels if label.name == IGNORE_NAME), None)
    names = [label.name for label in labels if label.value != ignore]
    values = np.array([0] + [label.value for label in labels if label.value != ignore], np.uint16)
    folder = pathlib.Path(folder)
    _checkReplaceable(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    entries = []

    def goOn(done: int) -> None:
        if progress is not None and progress(done, len(pairs)) is False:
            raise ExportStopped(f"the export stopped after {done} of {len(pairs)} cases")

    try:
        goOn(0)
        with asValueError():
            writeVolume = engine().write_volume
            for index, (volumeNode, segmentationNode) in enumerate(pairs):
                case = f"case_{index:03d}_{safe_file_name(volumeNode.GetName(), fallback='volume')}"
                volume = volumeFromNode(volumeNode)
                labelmap = values[labelmapFromSegmentation(segmentationNode, volumeNode, names)]
                if isSparselyAnnotated(segmentationNode):
                    labelmap = _unannotatedSlicesIgnored(labelmap, ignore, segmentationNode)
                labelmap = labelmap.astype(np.uint8 if labelmap.max(initial=0) < 256 else np.uint16)
                writeVolume(volume, partial / "images" / f"{case}.nii.gz")
                writeVolume(volume.with_array(labelmap), partial / "labels" / f"{case}.nii.gz")
                entries.append({"image": f"./images/{case}.nii.gz", "label": f"./labels/{case}.nii.gz",
                                "volume": volumeNode.GetName(), "segmentation": segmentationNode.GetName()})
                goOn(index + 1)
            from ..datalist import write_datalist

            write_datalist(partial, entries, labels, DATASET_NAME,
                           "Volumes and segmentations exported from 3D Slicer by UNet3DSegmenter")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


DATASET_NAME = "UNet3DSegmenter training data"


def _unannotatedSlicesIgnored(labelmap, ignore, segmentationNode):
    """The slices of a sparsely annotated segmentation that hold no segment, set to ``ignore``."""
    if ignore is None:
        raise ValueError(f"segmentation {segmentationNode.GetName()} is marked 'only some slices are annotated', "
                         f"but the labels have none named {IGNORE_NAME!r}: leave labels to the export")
    from ..sparse import mark_unannotated_slices  # loaded when a run needs it, as the engine is

    try:
        return mark_unannotated_slices(labelmap, ignore)
    except ValueError as error:
        raise ValueError(f"segmentation {segmentationNode.GetName()}: {error}") from None


def _checkReplaceable(folder: pathlib.Path) -> None:
    """An export replaces a previous export, never a folder of the user's: ValueError for anything else there."""
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return
    try:
        ours = json.loads((folder / "dataset.json").read_text(encoding="utf-8")).get("name") == DATASET_NAME
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise ValueError(f"{folder} already holds files that this module did not export: "
                         "choose another output folder for the training run")


def segmentedPairs(scene) -> list[tuple]:
    """(input volume, segmentation) for each volume still in ``scene`` that the module segmented, once each.

    These are the cases to fine-tune on once their segments have been corrected in Segment Editor. A
    volume segmented several times comes with its most recently modified segmentation (the one just
    corrected), never twice: two labelmaps of one image, one of them uncorrected, would teach both.
    """
    latest: dict[str, tuple] = {}
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentationNode = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        volumeNode = segmentationNode.GetNodeReference(INPUT_VOLUME_ROLE)
        if segmentationNode.GetAttribute(CHECKPOINT_ATTRIBUTE) is None or volumeNode is None:
            continue
        known = latest.get(volumeNode.GetID())
        if known is None or lastModified(segmentationNode) > lastModified(known[1]):
            latest[volumeNode.GetID()] = (volumeNode, segmentationNode)
    return list(latest.values())


def lastModified(segmentationNode) -> int:
    """When the segmentation last changed, as a VTK modification time: painting in Segment Editor changes a
    segment's labelmap, not the node itself, so the segments and their source representation count too."""
    segmentation = segmentationNode.GetSegmentation()
    source = segmentation.GetSourceRepresentationName()
    times = [segmentationNode.GetMTime(), segmentation.GetMTime()]
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        representation = segment.GetRepresentation(source)
        times += [segment.GetMTime()] + ([representation.GetMTime()] if representation is not None else [])
    return max(times)
