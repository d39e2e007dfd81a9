"""Everything the module panel decides, without Qt, so that it is tested on a real MRML scene.

:class:`PanelState` holds the training pairs, the model list, the device choices, which buttons
can be pressed, the start, progress and end of each background run, and what a closed or loaded
scene changes. The Widget (``UNet3DSegmenter.py``) only wires Qt to it: each user action or scene
event calls one method, then the Widget shows :meth:`PanelState.view`.

Decisions kept here, and why:

- Each training pair is one node reference role of the parameter node holding the volume and its
  segmentation, so that deleting either node removes exactly its pair (two parallel reference
  lists lose their alignment when MRML drops a deleted node from one of them).
- The model box always shows what Segment uses: the model list is rebuilt from the parameter node
  whenever it changes (a closed scene empties it: the last model shown is chosen again; a loaded
  scene brings its own, which is listed even when it is not a bundled one).
- The device choices are computed once (CUDA is offered only when PyTorch sees a GPU) and applied
  again after every binding of the panel to the parameter node, which refills the combo boxes.
- Closing the scene, or deleting the input volume, cancels a running segmentation (its input is gone;
  nothing is added to the scene and no error is shown); a training run goes on, since it works on
  files, not on the scene.
- PyTorch is checked once, when the panel first shows, and again after an install; during an install
  (Slicer processes events while pip prints) Install, Segment and Train are disabled, so that no
  click starts a second install or a run on half-installed packages.
- A finished segmentation refits the views only while the module is shown (``shown``).
- A model whose card names a share-alike licence (the bundled hippocampus model: CC-BY-SA 4.0) is used
  from the panel (Segment, or fine-tuning from it) only once the user has accepted that licence, once,
  remembered in the application's settings.
- Segment works on the whole volume or inside an ROI (``region``). 'Place ROI' adds one at the
  volume's centre, the size of the model's typical training image (its fingerprint's median extent;
  half the volume for a model that records none), and switches to it: the user drags it over the
  structure. Segment is enabled inside an ROI only once one is chosen.
- The overlap follows the model: when the chosen model changes (and PyTorch can read it), the overlap
  becomes the one that model records (its training's), so that a checkpoint's overlap reaches the
  user; one the user then sets holds until the model changes. A scene that names a model keeps its
  own overlap. Every other Segment option goes from the parameter node to the engine through the
  engine's ``SegmentOptions`` (its ``parameter`` names), declared once.
- A warning from the engine (the input lies far outside the model's training data) stays in the
  status line, after the progress and after the result, until the next run.
- Every training run gets a folder of its own under the models folder (the name given, else the
  labels and the date and time; made unique), so that no run replaces another's model. The model
  box names a trained model by its run folder, and lists the runs found in the models folder.
- A click on Cancel or Stop that comes within :data:`DOUBLE_CLICK_SECONDS` of the start is the
  second click of a double-click on Segment or Train: it is ignored.
- Training time is asked in minutes (``trainingMinutes``, the trainer's time budget); 0 trains for
  the given epochs instead. A pair is added as "only some slices are annotated" when that box
  (``sparsePair``) is ticked: the mark is an attribute of its segmentation node
  (``export.markSparselyAnnotated``), so it is saved with the scene and Logic.train and the export
  read it from the node; to change it, remove the pair and add it again.
"""

from __future__ import annotations

import json
import logging
import pathlib
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..choices import DEVICES
from ..segment_options import SegmentOptions
from .export import ExportStopped, isSparselyAnnotated, markSparselyAnnotated, segmentedPairs
from .install import asValueError
from .process import EngineProcess, stopAll
from .scene import segmentNames
from .translation import _

log = logging.getLogger("UNet3DSegmenter")

REGIONS = ("whole volume", "inside an ROI")
"""What Segment segments: the whole input volume, or only the voxels inside the chosen ROI."""
START_FROM = ("new network", "selected model")
"""Where a training run starts: a new network, or the model selected in the Segment section (fine-tuning)."""
PAIR_ROLE = "UNet3DSegmenter.TrainingPair"
CHOOSE_FILE = "Choose a checkpoint file..."
CHOOSE_FOLDER = "Choose a folder of fold checkpoints..."
CHOOSE_NNUNET = "Choose an nnU-Net model folder..."
SHUTDOWN_SECONDS = 10.0
"""Longest wait for background runs at Reload or application exit."""
DOUBLE_CLICK_SECONDS = 1.0
"""A Cancel or Stop this soon after the start is the second click of a double-click on Segment or Train."""
DEFAULT_TRAINING_MINUTES = 5.0
"""The panel's time budget for a training run: on the hippocampus data it gave 94 to 98% of the Dice of 15
minutes from 4 labelled cases up (bench/RESULTS.md, "Sparse annotation")."""
SPARSE_TEXT = "Only some slices are annotated"
"""The mark of a pair whose segmentation was painted on some slices only (sparse annotation)."""
MAX_OVERLAP = 0.9
"""The top of the panel's overlap slider; a model that records more is segmented at this overlap from the panel."""
STOPPED_MARK = " (stopped)"
INSTALLING = _("Waiting for the install to finish.")
NOT_ACCEPTED = _("Not started: the model's licence was not accepted.")
LICENCE_SETTING = "UNet3DSegmenter/AcceptedModelLicences"
"""Settings group: model name -> the licence the user accepted for it."""
"""Added to the name of a stopped run's last.pt in the model box."""


@dataclass
class Button:
    text: str
    enabled: bool
    toolTip: str = ""


@dataclass
class ModelItem:
    """One entry of the model box; ``path`` is empty for the entries that open a dialog, whose ``dialog``
    says which: 'file' (a checkpoint), 'folder' (a cross-validation's folds, used as one ensemble) or
    'nnunet' (an nnU-Net v2 model folder, its trained folds used as one ensemble)."""

    text: str
    path: str
    toolTip: str = ""
    dialog: str = ""


@dataclass
class DeviceChoice:
    name: str
    enabled: bool
    toolTip: str = ""


@dataclass
class PanelView:
    """What the panel shows, as plain values (see :meth:`PanelState.view`)."""

    installVisible: bool
    installText: str
    installEnabled: bool
    installCollapsed: bool
    openVINO: Button
    models: list
    modelIndex: int
    modelLabels: str
    devices: list
    segment: Button
    segmentProgress: tuple
    segmentStatus: str
    roiEnabled: bool
    placeRoi: Button
    pairs: list
    addPair: Button
    removePair: Button
    addSegmented: Button
    architectureEnabled: bool
    train: Button
    trainingProgress: int
    trainingStatus: str
    resume: Button = field(default_factory=lambda: Button(_("Resume"), False))
    runNamePlaceholder: str = ""


@dataclass
class _Run:
    """A background run and what the panel says about it."""

    process: EngineProcess | None = None
    status: str = ""
    progress: tuple = (0, 100)
    stopping: bool = False
    started: float = field(default_factory=time.monotonic)
    inputVolume: Any = None  # the volume node a segmentation works on
    warnings: list = field(default_factory=list)
    folder: pathlib.Path | None = None  # a training run's output folder
    exporting: bool = False  # a training run's pairs are being exported, case by case, in the GUI thread

    def say(self, status: str) -> None:
        """Show ``status``, followed by the run's warnings, which stay until the next run."""
        self.status = " ".join([status] + [f"Warning: {warning}" for warning in self.warnings])

    def justStarted(self) -> bool:
        """True within DOUBLE_CLICK_SECONDS of the start: a Cancel or Stop now is a double-click's second click."""
        return time.monotonic() - self.started < DOUBLE_CLICK_SECONDS

    @property
    def live(self) -> EngineProcess | None:
        """The process while it runs, else None."""
        return self.process if self.process is not None and self.process.running else None

    @property
    def running(self) -> bool:
        return self.live is not None


class PanelState:
    """The panel's decisions over the module's Logic and its parameter node (see the module docstring).

    ``notify(message)`` shows an error to the user (the Widget passes an error dialog);
    ``showSegmentation(volume, segmentation, fit)`` and ``showChart(chartNode)`` put a result in the views
    (``fit``: refit them; not while the user works in another module, see :attr:`shown`); ``refresh()``
    shows the state at once and lets the application handle events, between the cases of an export.
    ``confirm(question)`` asks the user yes or no; ``settings`` (``value(key)``, ``setValue(key, value)``:
    a QSettings) keeps the answers that outlive the session (a model's licence, once accepted).
    """

    def __init__(self, logic, notify=None, showSegmentation=None, showChart=None, refresh=None, confirm=None,
                 settings=None) -> None:
        self.logic = logic
        self.parameters: Any = None  # the module's parameter node wrapper
        self.notify = notify or (lambda message: log.error("%s", message))
        self.showSegmentation = showSegmentation or (lambda volume, segmentation, fit: None)
        self.showChart = showChart or (lambda chart: None)
        self.refresh = refresh or (lambda: None)
        self.confirm = confirm or (lambda question: False)  # no way to ask: nothing is accepted for the user
        self.settings = settings if settings is not None else _MemorySettings()
        self.engineChecked = False
        self.engineProblem: str | None = None
        self.missing: list[str] = []  # the engine's pip requirements not installed, as the last check found
        self.installText = ""
        self.installing = False  # an install runs (Slicer processes events while pip prints)
        self.shown = True  # the module is the one shown: a finished run may refit the views
        self.cuda = False
        self.mps = False
        self.openVINOOffer: str | None = None
        self.extraModels: list[str] = []
        self.lastModel = ""
        self.segmentation = _Run()
        self.training = _Run()
        self.stoppedRun: pathlib.Path | None = None  # the folder of the run stopped last, which Resume continues
        self._descriptions: dict = {}
        self._channels: dict = {}
        self.overlapModel: str | None = None  # the model the overlap parameter was last set from (or kept for)

    # --- the parameter node and the scene ----------------------------------------------------------

    def setParameterNode(self, parameters) -> None:
        """Follow a new parameter node (module entered, scene closed or loaded): re-sync everything it holds."""
        self.parameters = parameters
        if parameters is None:
            return
        self.overlapModel = parameters.checkpointPath or None  # a node that names a model keeps its overlap
        self.cleanPairs()
        self.syncModels()
        self.applyDeviceChoices()
        self.followModelOverlap()

    def nodeRemoved(self) -> None:
        """A node left the scene: drop what it leaves of its pair, and cancel quietly a segmentation whose input
        it was (as closing the scene does: the result would have nowhere to go)."""
        self.cleanPairs()
        if self.segmentation.running and self.segmentation.inputVolume is not None \
                and self.segmentation.inputVolume.GetScene() is None:
            self.cancelSegmentation("Cancelled: the input volume was deleted.")

    def sceneStartClose(self) -> None:
        """The scene is about to close: cancel a segmentation (its input goes), forget the parameter node."""
        if self.segmentation.running:
            self.cancelSegmentation("Cancelled: the scene was closed.")
        if self.parameters is not None and self.parameters.checkpointPath:
            self.lastModel = self.parameters.checkpointPath  # shown again in the new scene
        self.parameters = None

    def ensureEngineChecked(self) -> None:
        """:meth:`checkEngine` the first time; later (the module entered again) what it found holds."""
        if not self.engineChecked:
            self.checkEngine()

    def checkEngine(self) -> None:
        """Whether the engine loads, and whether PyTorch sees a GPU (imports torch: call once the panel shows,
        and again after an install); what it finds is kept for :meth:`view`."""
        self.missing = self.logic.missingRequirements()
        self.engineProblem = self.logic.engineProblem()
        self.cuda = self.engineProblem is None and self.logic.cudaAvailable()
        self.mps = self.engineProblem is None and self.logic.mpsAvailable()
        self.openVINOOffer = self.logic.openVINOOffer() if self.engineProblem is None else None
        needed = bool(self.missing) or self.engineProblem is not None
        self.installText = self.logic.installDescription(self.engineProblem) if needed else ""
        self.engineChecked = True
        self._descriptions.clear()
        self._channels.clear()
        self.applyDeviceChoices()
        self.followModelOverlap()

    def beginInstall(self) -> bool:
        """An install starts (the user confirmed it); False when one runs already: a click that came while pip
        printed, which must not start a second one. Install, Segment and Train wait until :meth:`endInstall`."""
        if self.installing:
            return False
        self.installing = True
        return True

    def endInstall(self) -> None:
        """The install ended, well or not: check the engine again and let the buttons go."""
        self.installing = False
        self.checkEngine()

    @property
    def engineReady(self) -> bool:
        return self.engineChecked and self.engineProblem is None

    # --- models ----------------------------------------------------------------------------------

    def modelItems(self) -> list[ModelItem]:
        """The bundled models, the runs in the models folder, those trained or opened here, the parameter node's,
        and the file-dialog entries."""
        paths = [str(path) for path in self.logic.availableModels()]
        chosen = self.parameters.checkpointPath if self.parameters is not None else ""
        for path in self.trainedModels() + self.extraModels + [chosen]:
            if path and path not in paths:
                paths.append(path)
        items = []
        for path in paths:
            location = pathlib.Path(path)
            missing = "" if location.exists() else " (file not found)"
            items.append(ModelItem(modelName(location) + missing, path, path))
        return items + [
            ModelItem(CHOOSE_FILE, "", "Open any UNet3DSegmenter checkpoint (.pt), one network or an ensemble", "file"),
            ModelItem(CHOOSE_FOLDER, "", "Open the folder of a cross-validation (fold_*/best.pt) or a folder of "
                      ".pt files: its networks segment together, as one ensemble", "folder"),
            ModelItem(CHOOSE_NNUNET, "", "Open a model trained with nnU-Net v2: its Trainer__Plans__configuration "
                      "folder (plans.json, dataset.json, fold_*); its folds segment together, as nnU-Net runs them",
                      "nnunet"),
        ]

    def modelsFolder(self) -> pathlib.Path | None:
        """The folder under which each training run gets its own folder; None while it is not set."""
        folder = self.parameters.trainingOutputFolder if self.parameters is not None else None
        return None if folder is None or str(folder) in ("", ".") else pathlib.Path(folder)

    def trainedModels(self) -> list[str]:
        """The model of each run folder in the models folder: its best.pt, else the last.pt of a stopped run
        (the run going on now is not listed until it ends)."""
        folder = self.modelsFolder()
        if folder is None or not folder.is_dir():
            return []
        models = []
        running = self.training.folder if self.training.running else None
        for run in sorted(path for path in folder.iterdir() if path.is_dir() and path != running):
            model = next((run / name for name in ("best.pt", "last.pt") if (run / name).is_file()), None)
            if model is not None:
                models.append(str(model))
        return models

    def modelIndex(self) -> int:
        """The index in :meth:`modelItems` of the model Segment uses, -1 for none."""
        if self.parameters is None or not self.parameters.checkpointPath:
            return -1
        paths = [item.path for item in self.modelItems()]
        return paths.index(self.parameters.checkpointPath)

    def syncModels(self) -> None:
        """Make the parameter node name a model: a reset node gets the last model shown, else the first bundled."""
        if self.parameters is None:
            return
        if self.parameters.checkpointPath:
            self.lastModel = self.parameters.checkpointPath
            return
        bundled = [str(path) for path in self.logic.availableModels()]
        choice = self.lastModel or (bundled[0] if bundled else "")
        if choice:
            self.parameters.checkpointPath = choice
            self.lastModel = choice

    def selectModel(self, index: int) -> str:
        """The user picked entry ``index`` of the model box; the dialog to open ('file' or 'folder'), or ''."""
        items = self.modelItems()
        if not 0 <= index < len(items) or self.parameters is None:
            return ""
        if not items[index].path:
            return items[index].dialog
        self.parameters.checkpointPath = items[index].path
        self.lastModel = items[index].path
        self.followModelOverlap()
        return ""

    def addModel(self, path) -> None:
        """A checkpoint (or folder of them) chosen in a dialog, or trained here: listed from now on, and selected."""
        path = str(path)
        if path not in self.extraModels:
            self.extraModels.append(path)
        if self.parameters is not None:
            self.parameters.checkpointPath = path
        self.lastModel = path
        self.followModelOverlap()

    def describeModel(self, path: str) -> str:
        """The structures a model segments, for the label under the model box (read once per file version)."""
        if not path:
            return ""
        if not self.engineReady:
            return "Install PyTorch to read the model." if self.missing else ""
        file = pathlib.Path(path)
        if not file.exists():
            return f"The file {path} does not exist."
        key = (path, file.stat().st_mtime_ns)
        if key not in self._descriptions:
            self._descriptions[key] = self.logic.describeModel(path)
        return self._descriptions[key]

    def followModelOverlap(self) -> None:
        """Set the overlap to the one the chosen model records, once per change of model (see the module docstring)."""
        parameters = self.parameters
        if parameters is None or not self.engineReady or not parameters.checkpointPath \
                or parameters.checkpointPath == self.overlapModel:
            return
        self.overlapModel = parameters.checkpointPath
        if not pathlib.Path(parameters.checkpointPath).exists():
            return
        try:
            recorded = self.logic.segmentDefaults(parameters.checkpointPath).overlap
        except ValueError:
            return  # the Segment button and the label under the model box say what is wrong with it
        parameters.overlap = min(recorded, MAX_OVERLAP)

    def acceptLicence(self, model: str) -> bool:
        """True when ``model`` may be used: it names no share-alike licence, or the user accepted that licence
        once (remembered in the settings), here or before."""
        licence = modelLicence(pathlib.Path(model))
        if licence is None:
            return True
        key = f"{LICENCE_SETTING}/{pathlib.Path(model).stem}"
        if self.settings.value(key) == licence:
            return True
        question = _("The model '{name}' is shared under {licence}: it was trained on data under that licence, and what "
                     "you make with it (segmentations, models fine-tuned from it) that you share must be shared under "
                     "the same licence, with attribution. Its model card ({card}, beside the model) says more.\n\n"
                     "Use this model under {licence}?")
        card = pathlib.Path(model).with_suffix(".md").name
        if not self.confirm(question.format(name=pathlib.Path(model).stem, licence=licence, card=card)):
            return False
        self.settings.setValue(key, licence)
        return True

    # --- devices ---------------------------------------------------------------------------------

    def deviceChoices(self) -> list[DeviceChoice]:
        """The device choices in their combo-box order; a GPU only when PyTorch sees it."""
        seen = {"auto": True, "cpu": True, "cuda": self.cuda, "mps": self.mps}
        tips = {"auto": "The NVIDIA GPU when PyTorch sees one, else the CPU.", "cpu": "The processor.",
                "cuda": "The NVIDIA GPU." if self.cuda else "PyTorch sees no CUDA GPU on this computer.",
                "mps": "The Apple GPU (Metal)." if self.mps else "PyTorch sees no Apple GPU on this computer."}
        return [DeviceChoice(name, seen[name], tips[name]) for name in DEVICES]

    def applyDeviceChoices(self) -> None:
        """A device that is not available here (a scene saved on a GPU computer) becomes 'auto'."""
        if self.parameters is None or not self.engineChecked:
            return
        available = {choice.name for choice in self.deviceChoices() if choice.enabled}
        for name in ("device", "trainingDevice"):
            if getattr(self.parameters, name) not in available:
                setattr(self.parameters, name, "auto")

    # --- training pairs --------------------------------------------------------------------------

    def _pairEntries(self) -> list[tuple]:
        """(role, volume, segmentation) of each complete pair, in the order they were added."""
        if self.parameters is None:
            return []
        node = self.parameters.parameterNode
        entries = []
        for role in self._pairRoles():
            if node.GetNumberOfNodeReferences(role) != 2:
                continue  # one of its nodes was deleted: the pair is gone
            volume, segmentation = node.GetNthNodeReference(role, 0), node.GetNthNodeReference(role, 1)
            if volume is not None and segmentation is not None and segmentation.IsA("vtkMRMLSegmentationNode"):
                entries.append((role, volume, segmentation))
        return entries

    def _pairRoles(self) -> list[str]:
        node = self.parameters.parameterNode
        roles = [node.GetNthNodeReferenceRole(index) for index in range(node.GetNumberOfNodeReferenceRoles())]
        roles = [role for role in roles if role.startswith(PAIR_ROLE + ".") and role.rsplit(".", 1)[1].isdigit()]
        return sorted(roles, key=lambda role: int(role.rsplit(".", 1)[1]))

    def pairs(self) -> list[tuple]:
        """The (volume, segmentation) pairs to train on, in the order they were added."""
        return [(volume, segmentation) for _role, volume, segmentation in self._pairEntries()]

    def addPair(self, volume, segmentation) -> bool:
        """Add a pair (as one reference role), marked as painted on some slices only when ``sparsePair`` is
        ticked; False when it is incomplete or already there."""
        if self.parameters is None or volume is None or segmentation is None or (volume, segmentation) in self.pairs():
            return False
        markSparselyAnnotated(segmentation, self.parameters.sparsePair)
        node = self.parameters.parameterNode
        roles = self._pairRoles()
        role = f"{PAIR_ROLE}.{int(roles[-1].rsplit('.', 1)[1]) + 1 if roles else 0}"
        wasModifying = node.StartModify()
        node.AddNodeReferenceID(role, volume.GetID())
        node.AddNodeReferenceID(role, segmentation.GetID())
        node.EndModify(wasModifying)
        return True

    def removePair(self, row: int) -> bool:
        """Remove the pair shown in table row ``row``; False when no such row."""
        entries = self._pairEntries()
        if not 0 <= row < len(entries):
            return False
        self.parameters.parameterNode.RemoveNodeReferenceIDs(entries[row][0])
        return True

    def setPairSparse(self, row: int, sparse: bool) -> bool:
        """Mark the pair in table row ``row`` as annotated on some slices only (or not); False when no such row."""
        pairs = self.pairs()
        if not 0 <= row < len(pairs):
            return False
        markSparselyAnnotated(pairs[row][1], sparse)
        return True

    def segmentedPairsToAdd(self) -> list[tuple]:
        """Volumes the module segmented that are not in the list yet, each once, with its most recently
        modified segmentation (see ``export.segmentedPairs``): a volume already paired keeps the pair chosen."""
        if self.parameters is None:
            return []
        paired = [volume for volume, _ in self.pairs()]
        return [pair for pair in segmentedPairs(self.parameters.parameterNode.GetScene()) if pair[0] not in paired]

    def addSegmentedVolumes(self) -> int:
        """Add every pair of :meth:`segmentedPairsToAdd` (one click to fine-tune on corrected results)."""
        return sum(self.addPair(volume, segmentation) for volume, segmentation in self.segmentedPairsToAdd())

    def cleanPairs(self) -> None:
        """Drop what deleted nodes left of their pairs, so that the saved scene holds complete pairs only."""
        if self.parameters is None:
            return
        node = self.parameters.parameterNode
        for role in self._pairRoles():
            if node.GetNumberOfNodeReferences(role) not in (0, 2):
                node.RemoveNodeReferenceIDs(role)

    # --- region ----------------------------------------------------------------------------------

    def usesRoi(self) -> bool:
        return self.parameters is not None and self.parameters.region == REGIONS[1]

    def placeRoi(self):
        """Add an ROI at the input volume's centre (see the module docstring for its size), choose it and
        segment inside it from now on; the new node, or None (user told) without an input volume."""
        parameters = self.parameters
        if parameters is None or not parameters.inputVolume:
            self.notify("Choose an input volume first: the ROI is placed at its centre.")
            return None
        size = None
        if self.engineReady and parameters.checkpointPath and pathlib.Path(parameters.checkpointPath).exists():
            try:
                size = self.logic.trainingExtent(parameters.checkpointPath)
            except ValueError:
                size = None  # the Segment button says what is wrong with the model
        roiNode = self.logic.addRoi(parameters.inputVolume, size)
        parameters.roiNode = roiNode
        parameters.region = REGIONS[1]
        return roiNode

    # --- segment ---------------------------------------------------------------------------------

    def chooseDefaultInput(self) -> None:
        """No input volume yet: take the scene's first plain scalar volume. A labelmap or an RGB volume (a
        subclass, which the selector does not show) is never chosen for the user."""
        if self.parameters is None or self.parameters.inputVolume is not None:
            return
        scene = self.parameters.parameterNode.GetScene()
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
            node = scene.GetNthNodeByClass(index, "vtkMRMLScalarVolumeNode")
            if _plainScalarVolume(node):
                self.parameters.inputVolume = node
                return

    def pressSegment(self) -> bool:
        """The Segment / Cancel button: start a segmentation, or cancel the running one unless the click is the
        second of a double-click on Segment. True when a run started."""
        if self.segmentation.running:
            if not self.segmentation.justStarted():
                self.cancelSegmentation()
            return False
        return self.startSegmentation()

    def startSegmentation(self) -> bool:
        """Segment the chosen input with the chosen model in the background; False (user told) when it cannot start."""
        parameters = self.parameters
        if not self.acceptLicence(parameters.checkpointPath):
            self.segmentation = _Run(status=NOT_ACCEPTED)
            return False
        self.segmentation = _Run(status="Starting the engine...", inputVolume=parameters.inputVolume)
        try:
            self.segmentation.process = self.logic.segmentInBackground(
                parameters.inputVolume, parameters.checkpointPath, parameters.outputSegmentation,
                options=self.segmentOptions(), onProgress=self._segmentProgress,
                onFinished=self._segmentFinished, onError=self._segmentFailed,
                roi=parameters.roiNode if self.usesRoi() else None, onWarning=self._segmentWarning,
                confidence=parameters.showConfidence)
        except ValueError as error:
            self.segmentation.status = "Segmentation could not start."
            self.notify(f"Segmentation could not start: {error}")
            return False
        return True

    def segmentOptions(self) -> SegmentOptions:
        """The Segment options the parameter node holds (ValueError for a value out of range)."""
        with asValueError():
            return SegmentOptions.from_parameters(self.parameters)

    def cancelSegmentation(self, status: str = "Cancelled.") -> None:
        """Stop the running segmentation; nothing is added to the scene."""
        process = self.segmentation.live
        if process is not None:
            process.cancel()
        self.segmentation.status, self.segmentation.progress = status, (0, 100)

    def _segmentWarning(self, message: str) -> None:
        self.segmentation.warnings.append(message)
        self.segmentation.say("Segmenting...")

    def _segmentProgress(self, done: int, total: int) -> None:
        self.segmentation.progress = (done, max(total, 1))
        self.segmentation.say(f"Segmenting: window {done} of {total}.")

    def _segmentFinished(self, segmentationNode) -> None:
        seconds = time.monotonic() - self.segmentation.started
        names = segmentNames(segmentationNode)
        self.segmentation.say(f"Done in {seconds:.0f} s: {', '.join(names)}.")
        self.segmentation.progress = (self.segmentation.progress[1], self.segmentation.progress[1])
        self.showSegmentation(self.segmentation.inputVolume, segmentationNode, self.shown)

    def _segmentFailed(self, message: str) -> None:
        self.segmentation.say("Segmentation failed.")
        self.notify(f"Segmentation failed: {message}")

    # --- train -----------------------------------------------------------------------------------

    def fineTuning(self) -> bool:
        return self.parameters is not None and self.parameters.startFrom == START_FROM[1]

    def defaultRunName(self) -> str:
        """The run folder's name when none is given: the pairs' segment names and the date and time."""
        names: list[str] = []
        for _volume, segmentation in self.pairs():
            names += [name for name in segmentNames(segmentation) if name not in names]
        return defaultRunName(names)

    def newRunFolder(self) -> pathlib.Path | None:
        """The next run's own folder under the models folder: the name given (else the default), made unique."""
        folder = self.modelsFolder()
        if folder is None:
            return None
        return uniqueFolder(folder, safeRunName(self.parameters.trainingRunName) or self.defaultRunName())

    def pressTrain(self) -> bool:
        """The Train / Stop button: start a run, or stop the running one unless the click is the second of a
        double-click on Train. True when a run started."""
        if self.training.running or self.training.exporting:
            if not self.training.justStarted():
                self.stopTraining()
            return False
        return self.startTraining()

    def startTraining(self) -> bool:
        """Train on the pairs in the background, in a new run folder; False (user told) when it cannot start."""
        parameters = self.parameters
        initCheckpoint = parameters.checkpointPath if self.fineTuning() else None
        folder = self.newRunFolder()
        if folder is None:
            self.notify("Training could not start: choose the models folder first.")
            return False
        if initCheckpoint and not self.acceptLicence(initCheckpoint):
            self.training = _Run(status=NOT_ACCEPTED)
            return False
        return self._startTrainingRun(folder, "Exporting the training pairs...", lambda **callbacks: (
            self.logic.trainInBackground(
                self.pairs(), folder, architecture=None if initCheckpoint else parameters.architecture,
                epochs=parameters.epochs, patchSize=parameters.patchSize or None, batchSize=parameters.batchSize,
                learningRate=parameters.learningRate or None, device=parameters.trainingDevice,
                initCheckpoint=initCheckpoint, exportProgress=self._exportProgress,
                time_budget=parameters.trainingMinutes or None, **callbacks)))

    def resumeFolder(self) -> pathlib.Path | None:
        """The stopped run that Resume continues: the selected model's run if it was stopped, else the run stopped
        last in this panel; None when neither can be continued."""
        chosen = pathlib.Path(self.parameters.checkpointPath) if self.parameters is not None and \
            self.parameters.checkpointPath else None
        for folder in ([chosen.parent] if chosen is not None and chosen.name in ("best.pt", "last.pt") else []) + \
                [self.stoppedRun]:
            if folder is not None and _stoppedRun(folder):
                return folder
        return None

    def startResume(self) -> bool:
        """Continue the stopped run of :meth:`resumeFolder` in the background; False (user told) when it cannot."""
        folder = self.resumeFolder()
        if folder is None:
            self.notify("Training could not resume: no stopped run is selected.")
            return False
        return self._startTrainingRun(folder, f"Resuming {folder.name}...", lambda **callbacks: (
            self.logic.trainInBackground([], folder, resume=True, **callbacks)))

    def _startTrainingRun(self, folder: pathlib.Path, status: str, start) -> bool:
        self.training = _Run(status=status, folder=folder)
        try:
            process = start(onProgress=self._trainingProgress, onFinished=self._trainingFinished,
                            onError=self._trainingFailed, onCancelled=self._trainingStopped)
        except ExportStopped:
            self.training.status, self.training.progress = "Stopped during the export; nothing was trained.", (0, 100)
            self.training.stopping = False
            return False
        except ValueError as error:
            self.training.status = "Training could not start."
            self.notify(f"Training could not start: {error}")
            return False
        finally:
            self.training.exporting = False
        self.training.process = process
        self.training.status = f"Preparing the training cases of {folder.name}..."
        if self.parameters is not None:  # the scene may have closed while the export let Slicer handle events
            self.parameters.trainingTable = process.tableNode
        self.showChart(process.chartNode)
        if self.training.stopping:  # Stop came after the last case: the run saves what it has, as any stopped run
            self.training.stopping = False
            self.stopTraining()
        return True

    def _exportProgress(self, done: int, total: int) -> bool:
        """One more case exported: say so, let Slicer handle clicks (Stop among them); False once Stop was pressed."""
        self.training.exporting = True
        if not self.training.stopping:
            self.training.status = f"Exporting the training pairs: {done} of {total}..."
            self.training.progress = (int(100 * done / max(total, 1) / 10), 100)  # the export: the first tenth
        self.refresh()
        return not self.training.stopping

    def stopTraining(self) -> None:
        """Ask the run to stop after its current iteration; it saves last.pt, log.csv and the curves first. During
        the export, stop it after the current case."""
        if self.training.exporting and not self.training.stopping:
            self.training.stopping = True
            self.training.status = "Stopping the export after this case..."
            return
        process = self.training.live
        if process is not None and not self.training.stopping:
            process.cancel()
            self.training.stopping = True
            self.training.status = "Stopping after this iteration; last.pt is saved first..."

    def _trainingProgress(self, event: dict) -> None:
        if self.training.stopping:
            return
        kind = event.get("event")
        epochs, epoch = int(event.get("epochs") or 1), int(event.get("epoch") or 0)
        if kind == "preparing":
            self.training.status = f"Preparing {event.get('kind')} cases: {event.get('done')} of {event.get('total')}"
        elif kind == "iteration":
            fraction = (epoch - 1 + int(event.get("iteration") or 0) / max(int(event.get("iterations") or 1), 1)) / epochs
            loss = event.get("loss")
            lossText = f"{loss:.3f}" if isinstance(loss, (int, float)) else "not a number"
            eta = event.get("eta")
            remaining = f", about {_duration(eta)} left" if eta is not None else ""
            self.training.status = f"Epoch {epoch} of {epochs}, loss {lossText}{remaining}"
            self.training.progress = (int(100 * max(0.0, min(fraction, 1.0))), 100)
        elif kind == "epoch":
            self.training.progress = (int(100 * min(epoch / epochs, 1.0)), 100)

    def _trainingFinished(self, checkpointPath) -> None:
        self.training.status = f"Done: {checkpointPath}"
        self.training.progress = (100, 100)
        self.addModel(checkpointPath)

    def _trainingFailed(self, message: str) -> None:
        self.training.status = "Training failed."
        self.notify(f"Training failed: {message}")

    def _trainingStopped(self) -> None:
        assert self.training.folder is not None  # every training run has its folder
        folder = self.training.folder
        last, best = folder / "last.pt", folder / "best.pt"
        if not last.is_file():
            self.training.status = "Stopped before the first checkpoint was saved."
            return
        model = str(best if best.is_file() else last)
        if model not in self.extraModels:
            self.extraModels.append(model)  # listed, not selected: the user decides whether to use it
        self.stoppedRun = folder
        self.training.status = f"Stopped: {last} holds the weights so far; Resume continues the run."

    # --- runs ------------------------------------------------------------------------------------

    def poll(self) -> bool:
        """Let the background runs report; True while one still runs (the Widget polls on a timer)."""
        running = False
        for run in (self.segmentation, self.training):
            process = run.live
            if process is not None:
                running = process.poll() or running
        return running

    def shutdown(self, seconds: float = SHUTDOWN_SECONDS) -> None:
        """Stop every background run within ``seconds`` (Reload, application exit); a training run saves first."""
        stopAll([self.segmentation.process, self.training.process], seconds)

    # --- what the panel shows --------------------------------------------------------------------

    def view(self, trainingVolume=None, trainingSegmentation=None, selectedPairRow: int = -1) -> PanelView:
        """Everything the panel shows, given the two pair selectors' nodes and the selected table row."""
        parameters = self.parameters
        models = self.modelItems()
        index = self.modelIndex()
        chosen = models[index].path if index >= 0 else ""
        pairs = self.pairs()
        missing = self.missing
        needed = bool(missing) or self.engineProblem is not None
        offer = None if needed else self.openVINOOffer  # an optional speed-up: shown, but folded away
        installText = self.installText if needed else offer or ""
        if self.installing:
            installText = "Installing... Slicer may pause while the packages download; Segment and Train wait."
        return PanelView(
            installVisible=needed or offer is not None,
            installText=installText,
            installEnabled=bool(missing) and not self.installing,
            installCollapsed=not needed,
            openVINO=Button(_("Install OpenVINO"), offer is not None and not self.installing, offer or ""),
            models=models, modelIndex=index, modelLabels=self.describeModel(chosen),
            devices=self.deviceChoices(),
            segment=self._segmentButton(chosen),
            segmentProgress=self.segmentation.progress, segmentStatus=self.segmentation.status,
            roiEnabled=self.usesRoi(),
            placeRoi=Button(_("Place ROI"), parameters is not None and bool(parameters.inputVolume)
                            and not self.segmentation.running,
                            "Add a box at the volume's centre, the size of the model's training images; drag it "
                            "over the structure, then Segment segments inside it only."),
            pairs=[(volume.GetName(), f"{segmentation.GetName()} ({', '.join(segmentNames(segmentation))})"
                    + (f"; {SPARSE_TEXT.lower()}" if isSparselyAnnotated(segmentation) else ""))
                   for volume, segmentation in pairs],
            addPair=Button(_("Add pair"), parameters is not None and trainingVolume is not None
                           and trainingSegmentation is not None and (trainingVolume, trainingSegmentation) not in pairs,
                           "Add the volume and segmentation above to the training pairs."),
            removePair=Button(_("Remove pair"), 0 <= selectedPairRow < len(pairs), "Remove the selected training pair."),
            addSegmented=Button(_("Add the segmented volumes"), bool(self.segmentedPairsToAdd()),
                                "Add each volume segmented here with its segmentation (corrected in Segment Editor, "
                                "if need be) to the training pairs."),
            architectureEnabled=not self.fineTuning(),
            train=self._trainButton(pairs, chosen),
            trainingProgress=self.training.progress[0], trainingStatus=self.training.status,
            resume=self._resumeButton(), runNamePlaceholder=self.defaultRunName())

    def _resumeButton(self) -> Button:
        busy = self.training.running or self.training.exporting or self.installing
        folder = None if busy or not self.engineReady else self.resumeFolder()
        if folder is None:
            return Button(_("Resume"), False, "Continue a stopped run: select its model (or stop a run) first.")
        return Button(_("Resume"), True, f"Continue the stopped run {folder.name} from its last.pt.")

    def _segmentButton(self, model: str) -> Button:
        if self.segmentation.running:
            return Button(_("Cancel"), True, "Stop the segmentation; nothing is added to the scene.")
        parameters = self.parameters
        if self.installing:
            return Button(_("Segment"), False, INSTALLING)
        if not self.engineReady:
            return Button(_("Segment"), False, "Install PyTorch first (Install section)." if self.engineChecked
                          else "Checking that PyTorch loads...")
        if parameters is None or not _segmentableVolume(parameters.inputVolume) or not model:
            return Button(_("Segment"), False, "Choose an input volume and a model.")
        if not pathlib.Path(model).exists():
            return Button(_("Segment"), False, f"The model {model} does not exist: choose another model.")
        mismatch = self._channelMismatch(parameters.inputVolume, model)
        if mismatch:
            return Button(_("Segment"), False, mismatch)
        if self.usesRoi():
            if not parameters.roiNode:
                return Button(_("Segment"), False, "Choose an ROI, or click Place ROI, to segment inside it.")
            return Button(_("Segment"), True, f"Segment the input volume inside {parameters.roiNode.GetName()}.")
        return Button(_("Segment"), True, "Segment the input volume with the chosen model.")

    def _channelMismatch(self, volume, model: str) -> str:
        """Why ``model`` cannot segment ``volume`` (its channels differ: e.g. an RGB volume and a CT model); ''."""
        expected = self.modelChannels(model)
        channels = volumeChannels(volume)
        if expected is None or channels == expected:
            return ""
        kind = "one channel (a scalar volume)" if channels == 1 else f"{channels} channels (an RGB or vector volume)"
        return (f"{volume.GetName()} has {kind}, but the model expects {expected}: choose a model made for this kind "
                "of image, or another volume.")

    def modelChannels(self, path: str) -> int | None:
        """The input channels of a model (read once per file version); None when it cannot be read here."""
        if not self.engineReady:
            return None
        key = (path, pathlib.Path(path).stat().st_mtime_ns)
        if key not in self._channels:
            try:
                self._channels[key] = int(self.logic.loadCheckpoint(path).in_channels)
            except ValueError:
                self._channels[key] = None  # the label under the model box says what is wrong with it
        return self._channels[key]

    def _trainButton(self, pairs, model: str) -> Button:
        if self.training.running or self.training.exporting:
            if self.training.stopping:
                return Button(_("Stopping..."), False, "The run ends its iteration and saves last.pt.")
            return Button(_("Stop"), True, "Stop after the current iteration; last.pt keeps the weights so far.")
        if self.installing:
            return Button(_("Train"), False, INSTALLING)
        if not self.engineReady:
            return Button(_("Train"), False, "Install PyTorch first (Install section)." if self.engineChecked
                          else "Checking that PyTorch loads...")
        if not pairs:
            return Button(_("Train"), False, "Add at least one pair of a volume and its segmentation.")
        if self.fineTuning() and not (model and pathlib.Path(model).is_file()):
            return Button(_("Train"), False, "Choose the model to fine-tune in the Segment section.")
        if self.modelsFolder() is None:
            return Button(_("Train"), False, "Choose the models folder, under which each run gets a folder of its own.")
        what = f"Fine-tune {modelName(pathlib.Path(model))}" if self.fineTuning() else "Train a new network"
        return Button(_("Train"), True, f"{what} on the pairs above, in a new folder under {self.modelsFolder()}.")


def _stoppedRun(folder: pathlib.Path) -> bool:
    """True when ``folder`` holds a run that can go on: its saved state, fewer epochs logged than it was to train,
    and no validation report (written when a run ends, early stopping included; never when it is stopped)."""
    try:
        record = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        epochs = int((record.get("time_plan") or record)["epochs"])  # a time budget plans its own
        logged = (folder / "log.csv").read_text(encoding="utf-8").count("\n") - 1 if (folder / "log.csv").is_file() else 0
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (folder / "last.state.pt").is_file() and logged < epochs and not (folder / "validation_report.json").exists()


def modelLicence(path: pathlib.Path) -> str | None:
    """The share-alike licence (e.g. 'CC-BY-SA 4.0') that a model's card (its .md beside it) names; None for none."""
    card = path.with_suffix(".md")
    try:
        match = re.search(r"CC[- ]BY[- ]SA(?: [0-9.]+)?", card.read_text(encoding="utf-8")) if card.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None
    return match.group(0) if match else None


class _MemorySettings:
    """Settings kept for this session only: where no application settings are given (scripts, tests)."""

    def __init__(self) -> None:
        self.values: dict[str, str] = {}

    def value(self, key: str) -> str | None:
        return self.values.get(key)

    def setValue(self, key: str, value: str) -> None:
        self.values[key] = value


def _plainScalarVolume(node) -> bool:
    """A scalar volume of the class the input selector shows: not a labelmap, vector (RGB) or other subclass."""
    return node is not None and node.GetClassName() == "vtkMRMLScalarVolumeNode"


def _segmentableVolume(node) -> bool:
    """A volume of a class the input selector shows: scalar, or vector (RGB, multi-channel); not a labelmap."""
    return node is not None and node.GetClassName() in ("vtkMRMLScalarVolumeNode", "vtkMRMLVectorVolumeNode")


def volumeChannels(node) -> int:
    """The channels a volume node holds: its voxels' components (1 for a scalar volume, 3 for RGB)."""
    image = node.GetImageData()
    return image.GetNumberOfScalarComponents() if image is not None else 1


def modelName(path: pathlib.Path) -> str:
    """The name a model goes by in the model box: a run's checkpoint by its run folder (a stopped run's
    last.pt marked so), a folder of checkpoints by its name, any other file by its stem."""
    if path.name == "best.pt":
        return path.parent.name
    if path.name == "last.pt":
        return path.parent.name + STOPPED_MARK
    if isNnunetFolder(path):
        return f"{path.parent.name} (nnU-Net {path.name.split('__')[-1]})"
    return path.name if path.is_dir() else path.stem


def isNnunetFolder(path: pathlib.Path) -> bool:
    """Whether ``path`` is an nnU-Net model folder, as the engine tells them (nnunet_folder.is_nnunet_folder,
    which this side cannot import before PyTorch is installed)."""
    return path.is_dir() and (path / "plans.json").is_file() and (path / "dataset.json").is_file()


def defaultRunName(labelNames, now: datetime | None = None) -> str:
    """A run folder's name from the labels it learns and the date and time, e.g. 'organ-lesion 2026-03-14 0930'."""
    labels = "-".join(safeRunName(name) for name in labelNames[:3]) or "model"
    return f"{labels[:40]} {(now or datetime.now()).strftime('%Y-%m-%d %H%M')}"


def safeRunName(name: str) -> str:
    """``name`` as one folder name: path separators and characters that some systems refuse become '_'."""
    return re.sub(r'[\\/:*?"<>|\x00-\x1f]+', "_", name).strip(" .") or ""


def uniqueFolder(parent: pathlib.Path, name: str) -> pathlib.Path:
    """``parent / name``, or with ' 2', ' 3', ... added when that exists: a new run never lands in an old one's folder."""
    folder, number = parent / name, 1
    while folder.exists():
        number += 1
        folder = parent / f"{name} {number}"
    return folder


def _duration(seconds) -> str:
    seconds = int(round(float(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
