"""The Train job: one prepare step and one finish step, shared by the waiting and the background path.

:func:`prepare` checks the pairs and the options, builds the engine's ``TrainingConfig`` (label
names and colours from the segments, ``init`` when fine-tuning a model) and exports the pairs;
:func:`finish` names the checkpoint the run produced. In between, :func:`run` trains in this process
(Python console, tests) and :func:`startInBackground` runs ``unet3d-segmenter train --config
run.json --progress-json`` in a child process (the panel), stopped by a stop file (``protocol.py``) so that it
always saves. Both fill a table of loss and Dice per epoch, plotted by a chart in the scene.
A new run refuses a folder that holds a model before it exports anything (the engine's
``TrainingConfig.check_output``); :func:`prepareResume` continues a stopped run from its run.json.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import pathlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import slicer
import vtk

from ..protocol import TrainingEvent, stop_file, withdraw_stop_request
from .export import ExportStopped, checkPairs, exportTrainingPairs, trainingLabels
from .install import asValueError, engine
from .process import EngineProcess, engineCommand
from .segmentation import loadCheckpoint

if TYPE_CHECKING:
    from ..training.config import TrainingConfig

CHART_ROLE = "UNet3DSegmenter.Chart"

# TrainingConfig fields that prepare() sets from its own arguments, the pairs and the output folder.
_SET_HERE = {"data", "output", "architecture", "epochs", "patch_size", "batch_size", "lr", "device", "init",
             "label_names", "label_colors"}

STOP_GRACE_SECONDS = 30.0
"""How long a stopping run may take to finish its iteration and save before it is killed."""


@dataclass
class TrainingJob:
    """A checked training run: the engine's configuration, the labels, and the curves in the scene."""

    config: TrainingConfig
    pairs: list
    labels: list
    tableNode: Any  # vtkMRMLTableNode
    chartNode: Any  # vtkMRMLPlotChartNode
    result: dict | None = None  # the trainer's 'done' event, once it came

    @property
    def outputFolder(self) -> pathlib.Path:
        return pathlib.Path(self.config.output)


def prepare(pairs, outputFolder, architecture: str | None = None, epochs: int = 100, patchSize=None,
            batchSize: int = 2, learningRate=None, device: str = "auto", initCheckpoint=None, tableNode=None,
            exportProgress=None, **options) -> TrainingJob:
    """Check a training run and export its pairs to ``outputFolder/data``; ValueError, nothing written, when it cannot run.

    ``initCheckpoint`` (a path or a Checkpoint) makes it fine-tune that model: its labels keep their
    values, new segment names get a new output layer, its architecture and preprocessing are kept.
    With fewer than two pairs nothing can be held out, so ``val_fraction`` defaults to 0. A folder
    that holds a model is refused unless ``overwrite=True``; ``resume=True`` continues the stopped
    run in ``outputFolder`` instead (see :func:`prepareResume`).
    """
    if options.get("resume"):
        return prepareResume(pairs, outputFolder, tableNode, **options)
    pairs = list(pairs)
    checkPairs(pairs)
    outputFolder = pathlib.Path(outputFolder)
    init = loadCheckpoint(initCheckpoint) if initCheckpoint is not None and str(initCheckpoint) else None
    if isinstance(init, engine().Ensemble):
        raise ValueError(f"{initCheckpoint} is an ensemble of {len(init.members)} networks, but fine-tuning takes one "
                         "network: choose one of its checkpoints (e.g. a fold's best.pt)")
    labels = trainingLabels(pairs, init.labels if init is not None else None)
    if init is not None and not isinstance(initCheckpoint, (str, pathlib.PurePath)):
        initCheckpoint = None  # an in-memory model: written beside the run once the checks have passed
    if len(pairs) < 2:
        options.setdefault("val_fraction", 0.0)
    patch = None
    if patchSize:
        sizes = [int(size) for size in (patchSize if isinstance(patchSize, (tuple, list)) else [patchSize] * 3)]
        if len(sizes) != 3:
            raise ValueError(f"patchSize is one edge length or three (z, y, x) in voxels, got {patchSize}")
        patch = (sizes[0], sizes[1], sizes[2])
    TrainingConfig = engine().TrainingConfig
    unknown = sorted(set(options) - {field.name for field in dataclasses.fields(TrainingConfig)})
    if unknown:
        raise ValueError(f"unknown training option {unknown[0]!r}: the options are the fields of TrainingConfig "
                         "('unet3d-segmenter train --help')")
    given = sorted(set(options) & _SET_HERE)
    if given:
        raise ValueError(f"training option {given[0]!r} comes from the pairs, the output folder or an argument of its "
                         "own (architecture, epochs, patchSize, batchSize, learningRate, device, initCheckpoint)")
    with asValueError():
        config = TrainingConfig(
            data=outputFolder / "data", output=outputFolder, architecture=architecture, epochs=int(epochs),
            patch_size=patch, batch_size=int(batchSize), lr=learningRate or None, device=device,
            init=pathlib.Path(initCheckpoint) if initCheckpoint is not None else None,
            label_names={label.value: label.name for label in labels},
            label_colors={label.value: tuple(label.color) for label in labels}, **options)
        config.check_output()  # before the export: a model there stays as it was
    try:
        exportTrainingPairs(pairs, config.data, labels, exportProgress)
    except ExportStopped:
        with contextlib.suppress(OSError):
            outputFolder.rmdir()  # the run's new folder, left empty: no trace of a run that never started
        raise
    if init is not None and config.init is None:
        config.init = engine().save_checkpoint(init, outputFolder / "init.pt")
    return _job(config, pairs, labels, tableNode)


def prepareResume(pairs, outputFolder, tableNode=None, **options) -> TrainingJob:
    """Continue the stopped run in ``outputFolder`` as its run.json says, on the data it exported; ValueError
    when the folder holds no stopped run or when pairs or other options are given (they would not be used)."""
    outputFolder = pathlib.Path(outputFolder)
    others = sorted(set(options) - {"resume"})
    if list(pairs or []) or others:
        raise ValueError("a resumed run continues as its run.json says, on the data it exported: give no pairs"
                         + (f" and no option {others[0]!r}" if others else ""))
    if not (outputFolder / "run.json").is_file() or not (outputFolder / "last.state.pt").is_file():
        raise ValueError(f"{outputFolder} holds no stopped run to resume (run.json and last.state.pt): "
                         "choose the folder of a stopped run, or start a new run")
    with asValueError():
        config = dataclasses.replace(engine().TrainingConfig.load(outputFolder / "run.json"), output=outputFolder,
                                     resume=True, overwrite=False)
    Label = engine().Label
    labels = [Label(value, name, (config.label_colors or {}).get(value, (0.5, 0.5, 0.5)))
              for value, name in sorted((config.label_names or {}).items())]
    job = _job(config, [], labels, tableNode)
    if tableNode is None:  # a new table: its curves start at epoch 1, as the run's own log does
        addLoggedEpochs(job.tableNode, outputFolder / "log.csv", [label.name for label in labels])
    return job


def addLoggedEpochs(tableNode, logFile: pathlib.Path, labelNames) -> None:
    """Add the epochs of a run's log.csv to the curves table; a log that cannot be read adds nothing more."""

    def number(text):
        return float(text) if text not in (None, "") else None

    try:
        with open(logFile, newline="", encoding="utf-8") as stream:
            rows = list(csv.DictReader(stream))
        events = [{"epoch": number(row["epoch"]), "train_loss": number(row.get("train_loss")),
                   "mean_dice": number(row.get("mean_dice")),
                   "dice": {name: number(row.get(f"dice_{name}")) for name in labelNames}} for row in rows]
    except (OSError, ValueError, KeyError):
        return
    for event in events:
        addTrainingEpoch(tableNode, event)


def _job(config, pairs, labels, tableNode) -> TrainingJob:
    """The job, with a new table and chart of the curves unless ``tableNode`` is given."""
    withdraw_stop_request(config.output)  # a stale request must not stop this run
    chartNode = None
    if tableNode is None:
        tableNode, chartNode = createTrainingCurves([label.name for label in labels])
    return TrainingJob(config, pairs, labels, tableNode, chartNode or tableNode.GetNodeReference(CHART_ROLE))


def record(job: TrainingJob, event: dict) -> None:
    """Take in one trainer event: an epoch becomes a row of the curves table, 'done' is the result."""
    if event.get("event") == "epoch" and job.tableNode.GetScene() is not None:  # a closed scene took the table
        addTrainingEpoch(job.tableNode, event)
    elif event.get("event") == "done":
        job.result = dict(event)


def run(job: TrainingJob, progress=None, cancel=None) -> None:
    """Train in this process; ``progress(event)`` gets every trainer event, ``cancel()`` True stops after an iteration."""
    from ..training.trainer import train

    def report(event: TrainingEvent) -> None:
        record(job, dict(event))
        if progress is not None:
            progress(event)

    with asValueError():
        train(job.config, progress=report, cancel=cancel)


def finish(job: TrainingJob) -> pathlib.Path:
    """The checkpoint the run produced: best.pt, or last.pt when it stopped before best.pt was written."""
    best = pathlib.Path(job.result["best_checkpoint"]) if job.result else job.outputFolder / "best.pt"
    if best.is_file():
        return best
    last = job.outputFolder / "last.pt"
    if last.is_file():
        return last
    raise ValueError(f"the training run in {job.outputFolder} wrote no checkpoint")


def startInBackground(job: TrainingJob, python: str, environment: dict, onProgress=None, onFinished=None,
                      onError=None, onCancelled=None) -> EngineProcess:
    """Run the job as ``unet3d-segmenter train --config <output>/run.json --progress-json``; return the process.

    It reports ``onProgress(event)`` for each trainer event, then ``onFinished(checkpointPath)``,
    ``onError(message)`` or, after ``cancel()``, ``onCancelled()``. ``cancel()`` writes the run's
    ``STOP`` file: the trainer ends its iteration, saves last.pt, log.csv and the curves, and exits;
    it is killed only when it has not ended :data:`STOP_GRACE_SECONDS` later. The process carries
    ``job``, ``tableNode`` and ``chartNode``.
    """
    if job.config.resume:  # the run's own run.json, as it is
        configPath, how = job.outputFolder / "run.json", ["--resume", "--output", job.outputFolder]
    else:  # prepare() checked the folder, and this run.json is the child's own: --overwrite lets it start
        configPath = dataclasses.replace(job.config, overwrite=False).save(job.outputFolder / "run.json")
        how = ["--overwrite"]

    def report(event: dict) -> None:
        record(job, event)
        if onProgress is not None:
            onProgress(event)

    def finished() -> None:
        try:
            checkpoint = finish(job)
        except ValueError as error:
            process.errorMessage = str(error)
            if onError is not None:
                onError(process.errorMessage)
            return
        if onFinished is not None:
            onFinished(checkpoint)

    arguments = engineCommand(python, "train", "--config", configPath, *how, "--progress-json")
    process = EngineProcess(arguments, onProgress=report, onFinished=finished, onError=onError,
                            onCancelled=onCancelled, environment=environment,
                            stopFile=stop_file(job.outputFolder), cancelGraceSeconds=STOP_GRACE_SECONDS)
    process.job, process.tableNode, process.chartNode = job, job.tableNode, job.chartNode
    return process.start()


def createTrainingCurves(labelNames, name: str = "UNet3DSegmenter training", scene=None):
    """A table (epoch, train loss, mean Dice, Dice per label) and a chart plotting it."""
    scene = scene or slicer.mrmlScene
    tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    columns = ["epoch", "train loss", "mean Dice"] + [f"Dice {label}" for label in labelNames]
    for column in columns:
        array = vtk.vtkDoubleArray()
        array.SetName(column)
        tableNode.AddColumn(array)
    chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", tableNode.GetName() + " chart")
    chartNode.SetTitle("Training: loss and validation Dice")
    chartNode.SetXAxisTitle("epoch")
    chartNode.SetYAxisTitle("loss / Dice")
    for column in columns[1:]:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{tableNode.GetName()} {column}")
        series.SetAndObserveTableNodeID(tableNode.GetID())
        series.SetXColumnName("epoch")
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
        if column == "train loss":
            series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleDash)
        chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
    tableNode.SetNodeReferenceID(CHART_ROLE, chartNode.GetID())
    return tableNode, chartNode


def addTrainingEpoch(tableNode, event: dict) -> None:
    """Append one trainer 'epoch' event to the table; Dice is NaN on epochs without validation."""
    table = tableNode.GetTable()
    dice = event.get("dice") or {}
    values = {"epoch": event.get("epoch"), "train loss": event.get("train_loss"), "mean Dice": event.get("mean_dice")}
    values.update({f"Dice {name}": value for name, value in dice.items()})
    row = tableNode.AddEmptyRow()
    for column in range(table.GetNumberOfColumns()):
        array = table.GetColumn(column)
        value = values.get(array.GetName())
        array.SetValue(row, float("nan") if value is None else float(value))
    table.Modified()
    tableNode.Modified()
