"""The Segment job: one prepare step and one finish step, shared by the waiting and the background path.

:func:`prepare` checks everything that can be checked before any work (the volume, the checkpoint,
the options) and raises ``ValueError`` with one line; :func:`finish` puts the labelmap into the
scene. In between, :func:`predict` runs the engine in this process (Python console, tests), and
:func:`startInBackground` runs ``unet3d-segmenter predict`` in a child process (the panel), so that
Slicer stays responsive and the run can be cancelled.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..segment_options import SegmentOptions
from .install import asValueError, engine, oneLine
from .process import EngineProcess, engineCommand
from .scene import regionFromRoiNode, storeConfidence, storeSegmentation, volumeFromNode

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint, Ensemble
    from ..volume import Volume

log = logging.getLogger("UNet3DSegmenter")


@dataclass
class SegmentationJob:
    """What one segmentation needs, checked: the input node and its Volume, the loaded checkpoint, the options
    (``options.roi`` holds the ROI node's box in RAS mm)."""

    inputVolume: Any  # vtkMRMLScalarVolumeNode
    volume: Volume
    checkpoint: Checkpoint | Ensemble
    checkpointPath: pathlib.Path | None  # None: an in-memory Checkpoint
    options: SegmentOptions
    outputSegmentation: Any = None  # vtkMRMLSegmentationNode, or None for a new one
    confidence: bool = False  # also show where the model is unsure (options.uncertainty_measure)
    uncertainty: Any = None  # the engine's uncertainty Volume, once computed

    @property
    def checkpointName(self) -> str:
        return str(self.checkpointPath) if self.checkpointPath is not None else "in-memory checkpoint"

    @property
    def region(self):
        """The engine's RegionOfInterest, or None for the whole volume."""
        return self.options.region()


def loadCheckpoint(checkpoint):
    """A checkpoint from a path (or the Checkpoint itself); ValueError when it cannot be used."""
    package = engine()
    if isinstance(checkpoint, package.Checkpoint):
        return checkpoint
    if checkpoint is None or str(checkpoint) == "":
        raise ValueError("no model chosen: choose a checkpoint (.pt) file")
    with asValueError():
        return package.load_checkpoint(checkpoint)


def segmentOptions(options: SegmentOptions | None = None, **keywords) -> SegmentOptions:
    """``options`` (default: every default) with ``keywords`` (``largestComponent`` or ``largest_component``, ...)
    on top; ValueError with one line for a value out of range, TypeError for an unknown keyword."""
    with asValueError():
        return (options or SegmentOptions()).with_keywords(**keywords)


def segmentDefaults(checkpoint) -> SegmentOptions:
    """The options ``checkpoint`` runs with when none is chosen: every default, and the overlap it records."""
    loaded = loadCheckpoint(checkpoint)
    return SegmentOptions(overlap=SegmentOptions().overlap_for(loaded))


def prepare(inputVolume, checkpoint, outputSegmentation=None, options: SegmentOptions | None = None, roi=None,
            confidence: bool = False, **keywords) -> SegmentationJob:
    """Check the inputs of a segmentation; ValueError, and nothing changed, when one cannot work.

    ``options`` and ``keywords`` are those of :func:`segmentOptions` (an overlap left unset is the
    checkpoint's); ``roi`` (a vtkMRMLMarkupsROINode, or None for the whole volume) restricts the
    work to its box; ``confidence`` also shows the model's confidence over the image
    (``scene.storeConfidence``), computed in the same pass.
    """
    options = segmentOptions(options, **keywords)
    volume = volumeFromNode(inputVolume)
    region = regionFromRoiNode(roi, inputVolume) if roi is not None else None
    if region is not None:
        with asValueError():
            region.block(volume)  # a box that misses the volume is refused now, not in the child
        options = dataclasses.replace(options, roi=(*region.first, *region.second))
    loaded = loadCheckpoint(checkpoint)
    if volume.channels != loaded.in_channels:
        raise ValueError(f"volume {inputVolume.GetName()} has {volume.channels} channel(s) but the model expects "
                         f"{loaded.in_channels}: choose a model made for this kind of image")
    path = pathlib.Path(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else None
    return SegmentationJob(inputVolume, volume, loaded, path, options, outputSegmentation, bool(confidence))


def predict(job: SegmentationJob, progress=None, warn=None):
    """Run the engine on the job in this process; the labelmap (an engine Volume on the input's grid).

    Each warning about the input (far outside the model's training data) goes to ``warn(message)``
    (default: the log)."""
    with asValueError():
        prediction = engine().Predictor(job.checkpoint, job.options).predict(
            job.volume, progress=progress, warn=warn, uncertainty=job.options.uncertainty_measure if job.confidence
            else None)
    job.uncertainty = prediction.uncertainty
    return prediction.labelmap


def finish(job: SegmentationJob, labelmap):
    """Store ``labelmap`` as the job's segmentation node (see ``scene.storeSegmentation``), and the job's
    uncertainty as its confidence volume when there is one (``scene.storeConfidence``); return the segmentation."""
    for result in (labelmap, job.uncertainty):
        if result is not None and (result.shape != job.volume.shape or not result.same_grid(job.volume, tolerance=1e-3)):
            raise ValueError(f"the engine wrote a result on another grid ({result.describe_grid()}) "
                             f"than the input ({job.volume.describe_grid()})")
    node = storeSegmentation(job.volume.with_array(labelmap.array), job.checkpoint.labels, job.inputVolume,
                             job.outputSegmentation, job.checkpointName)
    if job.uncertainty is not None:
        storeConfidence(job.volume.with_array(job.uncertainty.array), job.options.uncertainty_measure, node,
                        job.inputVolume)
    return node


def startInBackground(job: SegmentationJob, python: str, environment: dict, onProgress=None, onFinished=None,
                      onError=None, onWarning=None) -> EngineProcess:
    """Run the job as ``unet3d-segmenter predict`` in a child process; return the started process.

    The process reports ``onWarning(message)`` when the input lies far outside the model's training
    data (before the work; it goes on), ``onProgress(done, total)`` (windows), then
    ``onFinished(segmentationNode)`` or ``onError(message)``; after ``cancel()`` it reports nothing
    more and adds nothing to the scene.
    Its temporary folder (``process.temporaryFolder``) is gone once it has ended.
    """
    package = engine()
    folder = pathlib.Path(tempfile.mkdtemp(prefix="UNet3DSegmenter-"))
    inputPath, outputPath, uncertaintyPath = folder / "input.nrrd", folder / "segmentation.nrrd", folder / "unsure.nrrd"
    try:
        checkpointPath = job.checkpointPath or package.save_checkpoint(job.checkpoint, folder / "model.pt")
        with asValueError():
            package.write_volume(job.volume, inputPath, compress=False)
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    arguments = engineCommand(python, "predict", "--checkpoint", checkpointPath, "--input", inputPath,
                              "--output", outputPath, *job.options.to_arguments(), "--progress-json")
    arguments += ["--uncertainty", str(uncertaintyPath)] if job.confidence else []

    def progress(event: dict) -> None:
        if process.cancelled:
            return
        if event.get("event") == "progress" and onProgress is not None:
            onProgress(int(event["done"]), int(event["total"]))
        elif event.get("event") == "warning":
            log.warning("%s", event.get("message"))
            if onWarning is not None:
                onWarning(str(event.get("message")))

    def finished() -> None:
        try:
            with asValueError():
                labelmap = package.read_volume(outputPath)
                job.uncertainty = package.read_volume(uncertaintyPath) if job.confidence else None
            node = finish(job, labelmap)
        except Exception as error:  # reported like the child's own errors: one line
            if not isinstance(error, ValueError):
                log.exception("storing the segmentation failed")
            process.errorMessage = oneLine(error)
            if onError is not None:
                onError(process.errorMessage)
            return
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if onFinished is not None:
            onFinished(node)

    def failed(message: str) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        if onError is not None:
            onError(message)

    process = EngineProcess(arguments, onProgress=progress, onFinished=finished, onError=failed,
                            onCancelled=lambda: shutil.rmtree(folder, ignore_errors=True), environment=environment)
    process.temporaryFolder = folder
    try:
        return process.start()
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
