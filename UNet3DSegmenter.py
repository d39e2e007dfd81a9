"""UNet3DSegmenter: 3D U-Net / VNet segmentation of CT and MRI volumes inside 3D Slicer.

Five classes, in the order of Slicer's scripted-module template:

- ``UNet3DSegmenter``: the module's name, category, help and acknowledgement.
- ``UNet3DSegmenterParameterNode``: the panel's state, saved with the scene.
- ``UNet3DSegmenterWidget``: the panel; it only binds the .ui to the parameter node and calls the Logic.
- ``UNet3DSegmenterLogic``: all the work, usable from the Python console without the panel.
- ``UNet3DSegmenterTest``: the self-test (Reload and Test), on a generated phantom.

``EngineProcess`` wraps the child process that runs the engine's command line for the panel.

The engine (``UNet3DSegmenterLib``, which needs PyTorch) is imported only when it is used, so that the
module loads, and its panel opens, on a Slicer that has no PyTorch yet: the panel then offers to
install it.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import logging
import math
import os
import pathlib
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from vtk.util import numpy_support

MODULE_DIRECTORY = pathlib.Path(__file__).resolve().parent
ENGINE_PACKAGE = "UNet3DSegmenterLib"

# Python packages the engine needs beyond what Slicer ships (numpy and SimpleITK come with Slicer),
# as pyproject.toml lists them: import name -> pip requirement.
ENGINE_REQUIREMENTS = {"torch": "torch>=2.1", "nibabel": "nibabel>=5.0", "matplotlib": "matplotlib>=3.7"}

ARCHITECTURES = ["unet3d", "resunet3d", "resnet18unet", "vnet"]
DEVICES = ["auto", "cpu", "cuda"]


#
# UNet3DSegmenter
#


class UNet3DSegmenter(ScriptedLoadableModule):
    """The module's description, as the Modules menu and the Help section show it."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UNet3D Segmenter"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["UNet3DSegmenter contributors"]
        self.parent.helpText = """
<p>Segments CT and MRI volumes with 3D U-Net, residual U-Net, ResNet-18 U-Net or VNet models, and trains new models
from segmentations you already have in the scene.</p>
<p><b>Segment</b>: choose the input volume and a model (the bundled models are listed with the
structures they segment; <i>Choose a checkpoint file...</i> opens any <code>.pt</code> checkpoint made
by UNet3DSegmenter), then click <b>Segment</b>. The result is a segmentation with one named, coloured
segment per structure, shown over the input. A GPU is used when PyTorch sees one; on a CPU a
typical scan takes a minute or two.</p>
<p><b>Train</b>: add pairs of a volume and its segmentation (the segment names become the model's
labels), choose an output folder and click <b>Train</b>. Loss and Dice per structure are plotted as
training goes; when it finishes the new model is selected in the Segment section.</p>
<p>The first time, the module offers to install PyTorch (through the PyTorch extension when it is
installed, otherwise with pip). From the Python console:
<code>UNet3DSegmenterLogic().segment(volumeNode, "model.pt")</code>.</p>
"""
        self.parent.acknowledgementText = """
<p>The segmentation engine implements the 3D U-Net (Cicek et al., MICCAI 2016), a residual U-Net and
VNet (Milletari et al., 3DV 2016) in PyTorch.</p>
<p>Bundled models come with a model card in <code>Resources/Models/</code> that names the data they
were trained on and its license. The hippocampus model was trained on the Medical Segmentation
Decathlon Task04 Hippocampus data (Simpson et al., arXiv:1902.09063; Antonelli et al., Nature
Communications 2022), shared under CC-BY-SA 4.0; the model is shared under the same license.</p>
"""


#
# UNet3DSegmenterParameterNode
#


@parameterNodeWrapper
class UNet3DSegmenterParameterNode:
    """The panel's state, saved with the scene.

    Segment: inputVolume, checkpointPath (the model file), device, overlap (fraction of a window
    shared with its neighbours), testTimeAugmentation (average over axis flips, 8x slower),
    largestComponent (keep the largest connected piece of each structure), outputSegmentation
    (None: a new segmentation is created).
    Train: trainingOutputFolder, architecture, epochs, patchSize (voxels per side, 0: chosen from the
    data), batchSize, learningRate (0: the trainer's default), trainingDevice, trainingTable (loss and
    Dice per epoch).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    checkpointPath: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    testTimeAugmentation: bool = False
    largestComponent: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    trainingOutputFolder: pathlib.Path
    architecture: Annotated[str, Choice(ARCHITECTURES)] = "unet3d"
    epochs: Annotated[int, WithinRange(1, 10000)] = 100
    patchSize: Annotated[int, WithinRange(0, 512)] = 0
    batchSize: Annotated[int, WithinRange(1, 64)] = 2
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    trainingDevice: Annotated[str, Choice(DEVICES)] = "auto"
    trainingTable: vtkMRMLTableNode


#
# UNet3DSegmenterWidget
#


class UNet3DSegmenterWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: binds Resources/UI/UNet3DSegmenter.ui to the parameter node, calls the Logic."""

    CHOOSE_FILE = "Choose a checkpoint file..."
    PAIR_VOLUME_ROLE = "UNet3DSegmenterTrainingVolume"
    PAIR_SEGMENTATION_ROLE = "UNet3DSegmenterTrainingSegmentation"

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._segmentation = None  # the running EngineProcess, if any
        self._training = None
        self._pollTimer = None
        self._engineReady = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UNet3DSegmenter.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UNet3DSegmenterLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPair)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePair)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.installButton.connect("clicked(bool)", self.onInstallButton)
        self.ui.trainingVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateButtons)
        self.ui.trainingSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateButtons)

        # Child processes report through stdout; the panel reads them on a timer so Slicer stays responsive.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self.onPoll)

        self._updateInstallSection()
        self.initializeParameterNode()
        self._populateModels()

    def cleanup(self) -> None:
        for process in (self._segmentation, self._training):
            if process is not None and process.running:
                process.cancel()
                process.wait(timeout=10)
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume
        if str(self._parameterNode.trainingOutputFolder) in ("", "."):
            self._parameterNode.trainingOutputFolder = pathlib.Path.home() / "UNet3DSegmenter" / "models"

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._refreshPairsTable()
            self._updateButtons()

    # --- state of the buttons -----------------------------------------------------------------

    def _updateButtons(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        engineReady = self._engineReady
        segmenting = self._segmentation is not None and self._segmentation.running
        if segmenting:
            self.ui.segmentButton.text = "Cancel"
            self.ui.segmentButton.toolTip = "Stop the segmentation; nothing is added to the scene."
            self.ui.segmentButton.enabled = True
        else:
            self.ui.segmentButton.text = "Segment"
            ready = bool(parameters and parameters.inputVolume and parameters.checkpointPath)
            self.ui.segmentButton.enabled = ready and engineReady
            self.ui.segmentButton.toolTip = (
                "Install PyTorch first (Install section)." if not engineReady
                else "Segment the input volume with the chosen model." if ready
                else "Choose an input volume and a model.")
        training = self._training is not None and self._training.running
        if training:
            self.ui.trainButton.text = "Stop"
            self.ui.trainButton.enabled = True
        else:
            self.ui.trainButton.text = "Train"
            self.ui.trainButton.enabled = engineReady and bool(self._pairs())
        self.ui.addPairButton.enabled = bool(self.ui.trainingVolumeSelector.currentNode()
                                             and self.ui.trainingSegmentationSelector.currentNode())
        self.ui.removePairButton.enabled = self.ui.trainingPairsTable.rowCount > 0

    def _updateInstallSection(self) -> None:
        missing = self.logic.missingRequirements()
        self._engineReady = not missing
        self.ui.installCollapsibleButton.visible = bool(missing)
        self.ui.installCollapsibleButton.collapsed = not missing
        if missing:
            self.ui.installLabel.text = self.logic.installDescription()
        else:
            qt.QTimer.singleShot(0, self._updateDevices)  # importing torch takes a moment: after the panel shows

    def _updateDevices(self) -> None:
        """Offer the GPU only when PyTorch sees one."""
        cuda = self.logic.cudaAvailable()
        for comboBox in (self.ui.deviceComboBox, self.ui.trainingDeviceComboBox):
            item = comboBox.model().item(DEVICES.index("cuda"))
            if item is not None:
                item.setEnabled(cuda)
                item.setToolTip("" if cuda else "PyTorch sees no CUDA GPU on this computer.")

    # --- models -------------------------------------------------------------------------------

    def _populateModels(self, select: str | None = None) -> None:
        wasBlocked = self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        paths = [str(path) for path in self.logic.availableModels()]
        chosen = select or (self._parameterNode.checkpointPath if self._parameterNode else "")
        if chosen and chosen not in paths:
            paths.append(chosen)
        for path in paths:
            self.ui.modelSelector.addItem(pathlib.Path(path).stem, path)
            self.ui.modelSelector.setItemData(self.ui.modelSelector.count - 1, path, qt.Qt.ToolTipRole)
        self.ui.modelSelector.addItem(self.CHOOSE_FILE, "")
        index = paths.index(chosen) if chosen in paths else (0 if paths else -1)
        self.ui.modelSelector.setCurrentIndex(index)
        self.ui.modelSelector.blockSignals(wasBlocked)
        self.onModelSelected(index)

    def onModelSelected(self, index: int) -> None:
        if index < 0 or not self._parameterNode:
            self.ui.modelLabelsLabel.text = ""
            return
        path = self.ui.modelSelector.itemData(index)
        if not path:
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), "Choose a UNet3DSegmenter checkpoint", "", "PyTorch checkpoint (*.pt)")
            if not path:
                self._populateModels()  # back to the previous choice
                return
            self._populateModels(select=path)
            return
        self._parameterNode.checkpointPath = path
        self.ui.modelLabelsLabel.text = self.logic.describeModel(path)

    # --- segment ------------------------------------------------------------------------------

    def onSegmentButton(self) -> None:
        if self._segmentation is not None and self._segmentation.running:
            self._segmentation.cancel()
            self.ui.statusLabel.text = "Cancelled."
            self.ui.segmentProgressBar.value = 0
            self._updateButtons()
            return
        parameters = self._parameterNode
        self.ui.statusLabel.text = "Starting the engine..."
        self.ui.segmentProgressBar.value = 0
        self._segmentationStarted = time.perf_counter()
        try:
            with slicer.util.tryWithErrorDisplay("Segmentation could not start.", waitCursor=True):
                self._segmentation = self.logic.segmentInBackground(
                    parameters.inputVolume, parameters.checkpointPath, parameters.outputSegmentation,
                    device=parameters.device, overlap=parameters.overlap, tta=parameters.testTimeAugmentation,
                    largestComponent=parameters.largestComponent, onProgress=self.onSegmentProgress,
                    onFinished=self.onSegmentFinished, onError=self.onSegmentError)
                self._pollTimer.start()
        except Exception:
            self.ui.statusLabel.text = "Segmentation could not start."
            raise
        finally:
            self._updateButtons()

    def onSegmentProgress(self, done: int, total: int) -> None:
        self.ui.segmentProgressBar.maximum = max(total, 1)
        self.ui.segmentProgressBar.value = done
        self.ui.statusLabel.text = f"Segmenting: window {done} of {total}"

    def onSegmentFinished(self, segmentationNode) -> None:
        seconds = time.perf_counter() - self._segmentationStarted
        self._parameterNode.outputSegmentation = segmentationNode
        slicer.util.setSliceViewerLayers(background=self._parameterNode.inputVolume, fit=True)
        names = self.logic.segmentNames(segmentationNode)
        self.ui.statusLabel.text = f"Done in {seconds:.0f} s: {', '.join(names)}."
        self.ui.segmentProgressBar.value = self.ui.segmentProgressBar.maximum
        self._updateButtons()

    def onSegmentError(self, message: str) -> None:
        self.ui.statusLabel.text = "Segmentation failed."
        self._updateButtons()
        slicer.util.errorDisplay(f"Segmentation failed: {message}")

    # --- train --------------------------------------------------------------------------------

    def _pairs(self) -> list:
        """The (volume, segmentation) pairs chosen for training, stored in the parameter node."""
        if not self._parameterNode:
            return []
        node = self._parameterNode.parameterNode
        count = min(node.GetNumberOfNodeReferences(self.PAIR_VOLUME_ROLE),
                    node.GetNumberOfNodeReferences(self.PAIR_SEGMENTATION_ROLE))
        pairs = [(node.GetNthNodeReference(self.PAIR_VOLUME_ROLE, index),
                  node.GetNthNodeReference(self.PAIR_SEGMENTATION_ROLE, index)) for index in range(count)]
        return [(volume, segmentation) for volume, segmentation in pairs if volume and segmentation]

    def onAddPair(self) -> None:
        volume = self.ui.trainingVolumeSelector.currentNode()
        segmentation = self.ui.trainingSegmentationSelector.currentNode()
        if not volume or not segmentation:
            return
        node = self._parameterNode.parameterNode
        node.AddNodeReferenceID(self.PAIR_VOLUME_ROLE, volume.GetID())
        node.AddNodeReferenceID(self.PAIR_SEGMENTATION_ROLE, segmentation.GetID())
        self._refreshPairsTable()

    def onRemovePair(self) -> None:
        row = self.ui.trainingPairsTable.currentRow()
        pairs = self._pairs()
        if not pairs:
            return
        del pairs[row if 0 <= row < len(pairs) else len(pairs) - 1]
        node = self._parameterNode.parameterNode
        node.RemoveNodeReferenceIDs(self.PAIR_VOLUME_ROLE)
        node.RemoveNodeReferenceIDs(self.PAIR_SEGMENTATION_ROLE)
        for volume, segmentation in pairs:
            node.AddNodeReferenceID(self.PAIR_VOLUME_ROLE, volume.GetID())
            node.AddNodeReferenceID(self.PAIR_SEGMENTATION_ROLE, segmentation.GetID())
        self._refreshPairsTable()

    def _refreshPairsTable(self) -> None:
        table = self.ui.trainingPairsTable
        pairs = self._pairs()
        table.setRowCount(len(pairs))
        for row, (volume, segmentation) in enumerate(pairs):
            names = ", ".join(self.logic.segmentNames(segmentation))
            table.setItem(row, 0, qt.QTableWidgetItem(volume.GetName()))
            table.setItem(row, 1, qt.QTableWidgetItem(f"{segmentation.GetName()} ({names})"))
        self._updateButtons()

    def onTrainButton(self) -> None:
        if self._training is not None and self._training.running:
            self._training.cancel()
            self.ui.trainingStatusLabel.text = "Stopped."
            self._updateButtons()
            return
        parameters = self._parameterNode
        self.ui.trainingStatusLabel.text = "Exporting the training pairs..."
        self.ui.trainingProgressBar.value = 0
        try:
            with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
                self._training = self.logic.trainInBackground(
                    self._pairs(), parameters.trainingOutputFolder, architecture=parameters.architecture,
                    epochs=parameters.epochs, patchSize=parameters.patchSize or None, batchSize=parameters.batchSize,
                    learningRate=parameters.learningRate or None, device=parameters.trainingDevice,
                    onProgress=self.onTrainingProgress, onFinished=self.onTrainingFinished,
                    onError=self.onTrainingError)
                parameters.trainingTable = self._training.tableNode
                slicer.modules.plots.logic().ShowChartInLayout(self._training.chartNode)
                self.ui.trainingStatusLabel.text = "Preparing the training cases..."
                self._pollTimer.start()
        except Exception:
            self.ui.trainingStatusLabel.text = "Training could not start."
            raise
        finally:
            self._updateButtons()

    def onTrainingProgress(self, event: dict) -> None:
        epochs = int(event.get("epochs") or 1)
        epoch = int(event.get("epoch") or 0)
        if event.get("event") == "preparing":
            self.ui.trainingStatusLabel.text = (
                f"Preparing {event.get('kind')} cases: {event.get('done')} of {event.get('total')}")
            return
        if event.get("event") == "iteration":
            iterations = max(int(event.get("iterations") or 1), 1)
            fraction = (epoch - 1 + int(event.get("iteration") or 0) / iterations) / epochs
            eta = event.get("eta")
            remaining = f", about {_duration(eta)} left" if eta is not None else ""
            loss = event.get("loss")
            lossText = f"{loss:.3f}" if isinstance(loss, (int, float)) else "not a number"
            self.ui.trainingStatusLabel.text = f"Epoch {epoch} of {epochs}, loss {lossText}{remaining}"
        else:
            fraction = epoch / epochs
        self.ui.trainingProgressBar.value = int(100 * max(0.0, min(fraction, 1.0)))

    def onTrainingFinished(self, checkpointPath) -> None:
        self.ui.trainingStatusLabel.text = f"Done: {checkpointPath}"
        self.ui.trainingProgressBar.value = 100
        self._populateModels(select=str(checkpointPath))
        self._updateButtons()

    def onTrainingError(self, message: str) -> None:
        self.ui.trainingStatusLabel.text = "Training failed."
        self._updateButtons()
        slicer.util.errorDisplay(f"Training failed: {message}")

    # --- child processes and installation -----------------------------------------------------

    def onPoll(self) -> None:
        running = False
        for process in (self._segmentation, self._training):
            if process is not None and process.running:
                running = process.poll() or running
        if not running:
            self._pollTimer.stop()
            self._updateButtons()

    def onInstallButton(self) -> None:
        with slicer.util.tryWithErrorDisplay("Installation failed.", waitCursor=True):
            if self.logic.installRequirements(askConfirmation=True):
                slicer.util.infoDisplay("PyTorch is installed. If Segment stays disabled, restart Slicer.")
        self._updateInstallSection()
        self._populateModels()
        self._updateButtons()


def _duration(seconds) -> str:
    seconds = int(round(float(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


#
# UNet3DSegmenterLogic
#


class UNet3DSegmenterLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, callable without the panel (Python console, scripts, tests).

    This is the one place that knows both MRML and the engine. Volumes cross between the two only
    through :meth:`volumeFromNode` and :meth:`addVolumeNode` (Slicer's IJK-to-RAS matrix, converted by
    the engine's ``Volume.from_ijk_to_ras`` / ``Volume.ijk_to_ras``), and segmentations through
    :meth:`updateSegmentationFromLabelmap` and :meth:`labelmapFromSegmentation`.

    Mistakes the user can fix (no input, a 2D image, a checkpoint that does not load, ...) raise
    ``ValueError`` with a one-line message and leave the scene as it was.

    Example (Python console)::

        logic = slicer.util.getModuleLogic("UNet3DSegmenter")  # or UNet3DSegmenterLogic()
        segmentation = logic.segment(getNode("MRHead"), "/path/to/model.pt")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.pythonExecutable = shutil.which("PythonSlicer") or sys.executable

    def getParameterNode(self):
        return UNet3DSegmenterParameterNode(super().getParameterNode())

    # --- dependencies -------------------------------------------------------------------------

    @staticmethod
    def missingRequirements() -> list[str]:
        """pip requirements of the engine that are not installed (empty when it can run)."""
        missing = []
        for name, requirement in ENGINE_REQUIREMENTS.items():
            if name in sys.modules:
                installed = sys.modules[name] is not None
            else:
                try:
                    installed = importlib.util.find_spec(name) is not None
                except (ImportError, ValueError):
                    installed = False
            if not installed:
                missing.append(requirement)
        return missing

    @staticmethod
    def pyTorchExtensionAvailable() -> bool:
        """True when Slicer's PyTorch extension (module PyTorchUtils) is installed."""
        return hasattr(getattr(slicer, "modules", None), "pytorchutils")

    def installDescription(self) -> str:
        """What :meth:`installRequirements` will install and how, in words for the panel."""
        missing = self.missingRequirements()
        if not missing:
            return "Everything the engine needs is installed."
        others = [requirement for requirement in missing if not requirement.startswith("torch")]
        torchText = ""
        if any(requirement.startswith("torch") for requirement in missing):
            torchText = (
                "PyTorch (torch>=2.1, a download of 0.2 to 2.5 GB) will be installed by the PyTorch extension, "
                "which picks the CUDA build that fits this computer's GPU driver, or the CPU build."
                if self.pyTorchExtensionAvailable() else
                "PyTorch (torch>=2.1, a download of 0.2 to 2.5 GB) will be installed with pip. Install the "
                "PyTorch extension from the Extensions Manager first for a build matched to your GPU.")
        othersText = f" With pip: {', '.join(others)}." if others else ""
        return f"The segmentation engine needs Python packages that are not installed yet. {torchText}{othersText}"

    def installRequirements(self, askConfirmation: bool = True) -> bool:
        """Install the engine's missing packages into Slicer's Python; False when the user declines."""
        missing = self.missingRequirements()
        if not missing:
            return True
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(self.installDescription() + " Continue?"):
            return False
        torchRequirement = ENGINE_REQUIREMENTS["torch"]
        if torchRequirement in missing and self.pyTorchExtensionAvailable():
            import PyTorchUtils

            if PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=torchRequirement[len("torch"):]) is None:
                return False
            missing.remove(torchRequirement)
        if missing:
            slicer.util.pip_install(" ".join(missing))
        importlib.invalidate_caches()
        return not self.missingRequirements()

    @staticmethod
    def cudaAvailable() -> bool:
        """True when PyTorch sees a CUDA GPU (imports torch)."""
        try:
            import torch
        except ImportError:
            return False
        return bool(torch.cuda.is_available())

    # --- models -------------------------------------------------------------------------------

    @staticmethod
    def modelsFolder() -> pathlib.Path:
        return MODULE_DIRECTORY / "Resources" / "Models"

    def availableModels(self) -> list[pathlib.Path]:
        """The bundled checkpoints (Resources/Models/*.pt), sorted by name."""
        folder = self.modelsFolder()
        return sorted(folder.glob("*.pt")) if folder.is_dir() else []

    def describeModel(self, checkpoint) -> str:
        """The structures a checkpoint segments, e.g. 'anterior, posterior', for the model selector."""
        if self.missingRequirements():
            return "Install PyTorch to read the model."
        try:
            labels = self.loadCheckpoint(checkpoint).foreground_labels
        except ValueError as error:
            return f"Cannot read this model: {error}"
        return ", ".join(label.name for label in labels)

    def loadCheckpoint(self, checkpoint):
        """A checkpoint from a path (or the Checkpoint itself); ValueError when it cannot be used."""
        engine = _engine()
        if isinstance(checkpoint, engine.Checkpoint):
            return checkpoint
        if checkpoint is None or str(checkpoint) == "":
            raise ValueError("no model chosen: choose a checkpoint (.pt) file")
        with _asValueError():
            return engine.load_checkpoint(checkpoint)

    # --- volumes and segmentations <-> engine -------------------------------------------------

    @staticmethod
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

    @staticmethod
    def volumeFromNode(volumeNode):
        """The engine Volume of a scalar or vector volume node: voxels copied, geometry exact.

        The node's own IJK-to-RAS matrix is used; a parent transform is not applied (results are
        placed under the same transform instead).
        """
        engine = _engine()
        UNet3DSegmenterLogic.checkVolumeNode(volumeNode)
        array = np.array(slicer.util.arrayFromVolume(volumeNode), copy=True)
        if array.ndim == 4:  # vector volume: (k, j, i, component) -> (channel, k, j, i)
            array = np.ascontiguousarray(np.moveaxis(array, -1, 0))
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return engine.Volume.from_ijk_to_ras(array, slicer.util.arrayFromVTKMatrix(matrix))

    @staticmethod
    def addVolumeNode(volume, name: str = "volume", labelmap: bool = False):
        """Add an engine Volume to the scene as a scalar (or labelmap, or vector) volume node."""
        array = volume.array if volume.array.ndim == 3 else np.moveaxis(volume.array, 0, -1)
        nodeClass = ("vtkMRMLLabelMapVolumeNode" if labelmap else
                     "vtkMRMLVectorVolumeNode" if volume.array.ndim == 4 else "vtkMRMLScalarVolumeNode")
        return slicer.util.addVolumeFromArray(np.ascontiguousarray(array), volume.ijk_to_ras(),
                                              name=slicer.mrmlScene.GenerateUniqueName(name), nodeClassName=nodeClass)

    @staticmethod
    def segmentNames(segmentationNode) -> list[str]:
        segmentation = segmentationNode.GetSegmentation()
        return [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]

    def updateSegmentationFromLabelmap(self, segmentationNode, labelmap, labels, referenceVolumeNode=None) -> None:
        """Replace all segments of ``segmentationNode`` by one segment per label of ``labelmap``.

        ``labels`` are engine Labels (value, name, colour); a label absent from the labelmap still
        gets its (empty) segment, so that every structure the model knows is listed.
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

    def labelmapFromSegmentation(self, segmentationNode, referenceVolumeNode, segmentNames=None) -> np.ndarray:
        """The segments as one labelmap array (k, j, i) on the reference volume's grid.

        Segment ``segmentNames[n]`` gets value n + 1 (default: every segment, in the segmentation's
        order); where segments overlap, the later one wins. Names the segmentation lacks stay absent.
        """
        segmentation = segmentationNode.GetSegmentation()
        names = self.segmentNames(segmentationNode) if segmentNames is None else list(segmentNames)
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
            _removeNodeAndHelpers(scene, labelmapNode)
        return result

    def _placeInStudy(self, node, referenceNode) -> None:
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

    # --- segment ------------------------------------------------------------------------------

    def segment(self, inputVolume, checkpoint, outputSegmentation=None, device: str = "auto", overlap: float = 0.5,
                tta: bool = False, largestComponent: bool = False, progress=None):
        """Segment ``inputVolume`` with ``checkpoint`` (a .pt path or a Checkpoint); waits for the result.

        Returns ``outputSegmentation`` (a new segmentation node when None) holding one segment per
        label of the checkpoint, with its name and colour, on the input's geometry, placed beside the
        input in the subject hierarchy. Running again into the same node replaces its segments.
        ``progress(done, total)`` is called after each batch of windows. Nothing in the scene changes
        when this raises.
        """
        volume = self.volumeFromNode(inputVolume)
        loaded = self.loadCheckpoint(checkpoint)
        self._checkChannels(volume, loaded, inputVolume)
        engine = _engine()
        with _asValueError():
            predictor = engine.Predictor(loaded, device=device, overlap=overlap, tta=tta,
                                         largest_component=largestComponent)
            prediction = predictor.predict(volume, progress=progress)
        return self._storeSegmentation(prediction.labelmap, loaded, inputVolume, outputSegmentation,
                                       checkpointName=_checkpointName(checkpoint))

    @staticmethod
    def _checkChannels(volume, checkpoint, volumeNode) -> None:
        if volume.channels != checkpoint.in_channels:
            raise ValueError(f"volume {volumeNode.GetName()} has {volume.channels} channel(s) but the model expects "
                             f"{checkpoint.in_channels}: choose a model made for this kind of image")

    def _storeSegmentation(self, labelmap, checkpoint, inputVolume, outputSegmentation, checkpointName: str = ""):
        scene = inputVolume.GetScene()
        created = outputSegmentation is None
        if created:
            outputSegmentation = scene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{inputVolume.GetName()} segmentation"))
        try:
            self.updateSegmentationFromLabelmap(outputSegmentation, labelmap, checkpoint.labels, inputVolume)
        except Exception:
            if created:
                scene.RemoveNode(outputSegmentation)
            raise
        if outputSegmentation.GetDisplayNode() is None:
            outputSegmentation.CreateDefaultDisplayNodes()
        outputSegmentation.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        outputSegmentation.SetAttribute("UNet3DSegmenter.Checkpoint", checkpointName)
        outputSegmentation.SetNodeReferenceID("UNet3DSegmenter.InputVolume", inputVolume.GetID())
        self._placeInStudy(outputSegmentation, inputVolume)
        return outputSegmentation

    def segmentInBackground(self, inputVolume, checkpoint, outputSegmentation=None, device: str = "auto",
                            overlap: float = 0.5, tta: bool = False, largestComponent: bool = False,
                            onProgress=None, onFinished=None, onError=None) -> EngineProcess:
        """Start :meth:`segment` in a child process (the engine's command line) and return at once.

        The returned :class:`EngineProcess` reports through ``onProgress(done, total)``,
        ``onFinished(segmentationNode)`` and ``onError(message)``; call its ``poll()`` regularly (the
        panel does, on a timer) or ``wait()``. ``cancel()`` ends the child and its own children and adds
        nothing to the scene. Inputs are checked here, so a bad input raises ValueError at once.
        """
        volume = self.volumeFromNode(inputVolume)
        loaded = self.loadCheckpoint(checkpoint)
        self._checkChannels(volume, loaded, inputVolume)
        if not 0 <= overlap < 1:
            raise ValueError(f"overlap must be at least 0 and below 1, got {overlap}")
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
        engine = _engine()
        folder = pathlib.Path(tempfile.mkdtemp(prefix="UNet3DSegmenter-"))
        try:
            checkpointPath = pathlib.Path(checkpoint) if not isinstance(checkpoint, engine.Checkpoint) else (
                engine.save_checkpoint(loaded, folder / "model.pt"))
            inputPath, outputPath = folder / "input.nrrd", folder / "segmentation.nrrd"
            with _asValueError():
                engine.write_volume(volume, inputPath, compress=False)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        arguments = [self.pythonExecutable, "-m", ENGINE_PACKAGE, "predict", "--checkpoint", checkpointPath,
                     "--input", inputPath, "--output", outputPath, "--device", device, "--overlap", overlap,
                     "--progress-json"]
        arguments += ["--tta"] if tta else []
        arguments += ["--largest-component"] if largestComponent else []

        def progress(event: dict) -> None:
            if event.get("event") == "progress" and onProgress is not None:
                onProgress(int(event["done"]), int(event["total"]))

        def finished() -> None:
            try:
                with _asValueError():
                    labelmap = engine.read_volume(outputPath)
                if labelmap.shape != volume.shape or not labelmap.same_grid(volume, tolerance=1e-3):
                    raise ValueError(f"the engine wrote a segmentation on another grid ({labelmap.describe_grid()}) "
                                     f"than the input ({volume.describe_grid()})")
                node = self._storeSegmentation(volume.with_array(labelmap.array), loaded, inputVolume,
                                               outputSegmentation, checkpointName=_checkpointName(checkpoint))
            except Exception as error:  # reported like the child's own errors: one line
                logging.exception("UNet3DSegmenter: reading the segmentation failed")
                if onError is not None:
                    onError(_oneLine(error))
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
                                onCancelled=lambda: shutil.rmtree(folder, ignore_errors=True),
                                environment=self.childEnvironment())
        process.temporaryFolder = folder
        try:
            return process.start()
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def childEnvironment(self) -> dict:
        """Environment for engine child processes: this module's folder first on the Python path."""
        environment = dict(os.environ)
        paths = [str(MODULE_DIRECTORY)] + [path for path in environment.get("PYTHONPATH", "").split(os.pathsep) if path]
        environment["PYTHONPATH"] = os.pathsep.join(paths)
        environment["PYTHONUNBUFFERED"] = "1"
        return environment

    # --- training -----------------------------------------------------------------------------

    def trainingLabels(self, pairs) -> list:
        """The label of each segment name across ``pairs``: values 1, 2, ... in order of first appearance.

        Colours come from the first segment with that name.
        """
        engine = _engine()
        labels: dict[str, object] = {}
        for _, segmentationNode in pairs:
            segmentation = segmentationNode.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(index)
                if segment.GetName() not in labels:
                    labels[segment.GetName()] = engine.Label(len(labels) + 1, segment.GetName(),
                                                             tuple(float(c) for c in segment.GetColor()))
        return list(labels.values())

    def _checkPairs(self, pairs) -> None:
        pairs = list(pairs)
        if not pairs:
            raise ValueError("no training pairs: add at least one volume with its segmentation")
        for volumeNode, segmentationNode in pairs:
            self.checkVolumeNode(volumeNode)
            if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
                raise ValueError(f"volume {volumeNode.GetName()} has no segmentation: pair it with a segmentation node")
            names = self.segmentNames(segmentationNode)
            if not names:
                raise ValueError(f"segmentation {segmentationNode.GetName()} has no segments: "
                                 "draw at least one segment (Segment Editor) or choose another segmentation")
            duplicate = next((name for name in names if names.count(name) > 1), None)
            if duplicate:
                raise ValueError(f"segmentation {segmentationNode.GetName()} has two segments named {duplicate!r}: "
                                 "rename one, segment names become label names")

    def exportTrainingPairs(self, pairs, folder) -> pathlib.Path:
        """Write (volume, segmentation) pairs as a training dataset in ``folder``; return the folder.

        Layout: ``images/<case>.nii.gz``, ``labels/<case>.nii.gz`` (the segments as one labelmap on
        the volume's grid) and ``dataset.json`` (Medical Segmentation Decathlon style: the case list
        and value -> name). Segment names are matched across pairs; value n is the n-th name in order
        of first appearance, recorded with its colour in ``dataset.json``. Checks every pair before
        writing anything; the scene is left as it was.
        """
        engine = _engine()
        pairs = list(pairs)
        self._checkPairs(pairs)
        labels = self.trainingLabels(pairs)
        names = [label.name for label in labels]
        folder = pathlib.Path(folder)
        entries = []
        with _asValueError():
            for index, (volumeNode, segmentationNode) in enumerate(pairs):
                case = f"case_{index:03d}_{_safeName(volumeNode.GetName())}"
                volume = self.volumeFromNode(volumeNode)
                labelmap = self.labelmapFromSegmentation(segmentationNode, volumeNode, names)
                engine.write_volume(volume, folder / "images" / f"{case}.nii.gz")
                engine.write_volume(volume.with_array(labelmap), folder / "labels" / f"{case}.nii.gz")
                entries.append({"image": f"./images/{case}.nii.gz", "label": f"./labels/{case}.nii.gz",
                                "volume": volumeNode.GetName(), "segmentation": segmentationNode.GetName()})
        description = {
            "name": "UNet3DSegmenter training data",
            "description": "Volumes and segmentations exported from 3D Slicer by UNet3DSegmenter",
            "tensorImageSize": "3D",
            "labels": {"0": "background", **{str(label.value): label.name for label in labels}},
            "label_colors": {str(label.value): [round(float(c), 6) for c in label.color] for label in labels},
            "numTraining": len(entries),
            "training": entries,
        }
        (folder / "dataset.json").write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
        return folder

    def createTrainingCurves(self, labelNames, name: str = "UNet3DSegmenter training", scene=None):
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
        tableNode.SetNodeReferenceID("UNet3DSegmenter.Chart", chartNode.GetID())
        return tableNode, chartNode

    @staticmethod
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

    def _trainingConfig(self, data, outputFolder, labels, architecture, epochs, patchSize, batchSize, learningRate,
                        device, options) -> dict:
        patch = None
        if patchSize:
            patch = tuple(int(size) for size in patchSize) if isinstance(patchSize, (tuple, list)) else (int(patchSize),) * 3
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}: choose one of {', '.join(ARCHITECTURES)}")
        if device not in DEVICES:
            raise ValueError(f"unknown device {device!r}: choose one of {', '.join(DEVICES)}")
        config = dict(data=pathlib.Path(data), output=pathlib.Path(outputFolder), architecture=architecture,
                      epochs=int(epochs), patch_size=patch, batch_size=int(batchSize), lr=learningRate,
                      device=device, label_names={label.value: label.name for label in labels},
                      label_colors={label.value: tuple(label.color) for label in labels})
        config.update(options)
        return config

    def train(self, pairs, outputFolder, architecture: str = "unet3d", epochs: int = 100, patchSize=None,
              batchSize: int = 2, learningRate=None, device: str = "auto", tableNode=None, progress=None,
              cancel=None, **options) -> pathlib.Path:
        """Train a model on (volume, segmentation) pairs of the scene and wait for it; return best.pt.

        The pairs are exported to ``outputFolder/data`` (see :meth:`exportTrainingPairs`), the run
        writes best.pt, last.pt, log.csv and curves.png to ``outputFolder``. ``patchSize`` is an edge
        length or (z, y, x) in voxels (None: chosen from the data); ``options`` are further
        ``TrainingConfig`` fields (e.g. ``iterations_per_epoch=50``, ``depth=4``). Each trainer event goes
        to ``progress(event)``; epochs are added to ``tableNode`` (created with a chart when None, see
        :meth:`createTrainingCurves`). ``cancel()`` returning True stops after the current iteration.
        """
        self._checkPairs(pairs)
        labels = self.trainingLabels(pairs)
        outputFolder = pathlib.Path(outputFolder)
        data = self.exportTrainingPairs(pairs, outputFolder / "data")
        config = self._trainingConfig(data, outputFolder, labels, architecture, epochs, patchSize, batchSize,
                                      learningRate, device, options)
        if tableNode is None:
            tableNode, _ = self.createTrainingCurves([label.name for label in labels])

        def report(event: dict) -> None:
            if event.get("event") == "epoch":
                self.addTrainingEpoch(tableNode, event)
            if progress is not None:
                progress(event)

        if importlib.util.find_spec(f"{ENGINE_PACKAGE}.trainer") is not None:
            from UNet3DSegmenterLib.training.trainer import TrainingConfig
            from UNet3DSegmenterLib.training.trainer import train as runTraining

            with _asValueError():
                result = runTraining(TrainingConfig(**config), progress=report, cancel=cancel)
            return pathlib.Path(result.best_checkpoint)
        process = self._startTrainingProcess(config, report, None, None)
        if not process.wait(cancel=cancel):
            raise ValueError(process.errorMessage or "training was cancelled")
        self._applyLabelColors([outputFolder / "best.pt", outputFolder / "last.pt"], labels)
        return outputFolder / "best.pt"

    def trainInBackground(self, pairs, outputFolder, architecture: str = "unet3d", epochs: int = 100, patchSize=None,
                          batchSize: int = 2, learningRate=None, device: str = "auto", tableNode=None,
                          onProgress=None, onFinished=None, onError=None, **options) -> EngineProcess:
        """Start :meth:`train` in a child process (``train --progress-json``) and return at once.

        The returned :class:`EngineProcess` carries ``tableNode`` and ``chartNode`` (loss and Dice per
        epoch, updated as the trainer reports them) and reports ``onProgress(event)``,
        ``onFinished(bestCheckpointPath)`` and ``onError(message)`` when polled.
        """
        self._checkPairs(pairs)
        labels = self.trainingLabels(pairs)
        outputFolder = pathlib.Path(outputFolder)
        data = self.exportTrainingPairs(pairs, outputFolder / "data")
        config = self._trainingConfig(data, outputFolder, labels, architecture, epochs, patchSize, batchSize,
                                      learningRate, device, options)
        chartNode = None
        if tableNode is None:
            tableNode, chartNode = self.createTrainingCurves([label.name for label in labels])
        result = {}

        def report(event: dict) -> None:
            if event.get("event") == "epoch":
                self.addTrainingEpoch(tableNode, event)
            elif event.get("event") == "done":
                result.update(event)
            if onProgress is not None:
                onProgress(event)

        def finished() -> None:
            best = pathlib.Path(result.get("best_checkpoint") or outputFolder / "best.pt")
            try:
                self._applyLabelColors([best, outputFolder / "last.pt"], labels)
            except ValueError as error:
                if onError is not None:
                    onError(str(error))
                return
            if onFinished is not None:
                onFinished(best)

        process = self._startTrainingProcess(config, report, finished, onError)
        process.tableNode = tableNode
        process.chartNode = chartNode or tableNode.GetNodeReference("UNet3DSegmenter.Chart")
        return process

    def _startTrainingProcess(self, config: dict, report, finished, failed) -> EngineProcess:
        arguments = [self.pythonExecutable, "-m", ENGINE_PACKAGE, "train", "--progress-json"]
        arguments += _trainingArguments(config)
        # The trainer stops after the current iteration on SIGTERM and saves last.pt: give it time.
        process = EngineProcess(arguments, onProgress=report, onFinished=finished, onError=failed,
                                environment=self.childEnvironment(), cancelGraceSeconds=30.0)
        return process.start()

    @staticmethod
    def _applyLabelColors(paths, labels) -> None:
        """Give the labels of the checkpoints at ``paths`` the colours of the segments they were trained on."""
        engine = _engine()
        colors = {label.value: tuple(float(c) for c in label.color) for label in labels}
        for path in paths:
            if not pathlib.Path(path).is_file():
                continue
            with _asValueError():
                checkpoint = engine.load_checkpoint(path)
                for label in checkpoint.labels:
                    label.color = colors.get(label.value, label.color)
                engine.save_checkpoint(checkpoint, path)


# TrainingConfig fields whose command-line option has another name.
_TRAINING_OPTIONS = {"architecture": "--arch"}


def _trainingArguments(config: dict) -> list[str]:
    """``train`` command-line options for the fields of a TrainingConfig.

    Label names travel in the exported dataset.json; colours are not options of the command line, so
    :meth:`UNet3DSegmenterLogic.trainInBackground` writes them into the checkpoints afterwards.
    """
    arguments = ["--data", str(config["data"]), "--output", str(config["output"])]
    for key, value in config.items():
        if key in ("data", "output", "label_names", "label_colors") or value is None:
            continue
        if key == "augment":
            arguments += [] if value else ["--no-augment"]
            continue
        option = _TRAINING_OPTIONS.get(key, "--" + key.replace("_", "-"))
        if isinstance(value, bool):
            arguments += [option] if value else []
        elif isinstance(value, (tuple, list)):
            arguments += [option, *(str(item) for item in value)]
        else:
            arguments += [option, str(value)]
    return arguments


def _engine():
    """The engine package, imported on first use; ValueError naming what to install when it cannot load."""
    try:
        import torch  # noqa: F401  (the package itself imports lazily; the engine needs torch)

        import UNet3DSegmenterLib
    except ImportError as error:
        missing = getattr(error, "name", None) or "a required package"
        raise ValueError(f"the segmentation engine cannot start because the Python package {missing!r} is not "
                         "installed: open the UNet3DSegmenter module and click Install, or run "
                         "UNet3DSegmenterLogic().installRequirements()") from None
    return UNet3DSegmenterLib


@contextlib.contextmanager
def _asValueError():
    """Turn the engine's UserError (a mistake the user can fix) into ValueError, the module's one error type."""
    userError = _engine().UserError
    try:
        yield
    except userError as error:
        raise ValueError(str(error)) from None


def _checkpointName(checkpoint) -> str:
    return str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else "in-memory checkpoint"


def _oneLine(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def _safeName(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "volume"


def _removeNodeAndHelpers(scene, node) -> None:
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


class EngineProcess:
    """A child process running the engine's command line, read line by line without blocking.

    Each JSON object the child prints on stdout goes to ``onProgress(event)``; other lines are logged.
    When the child ends, exactly one of ``onFinished()``, ``onError(message)`` (the child's
    ``error: ...`` line, or the last line of its traceback) or ``onCancelled()`` is called. Callbacks
    run only inside :meth:`poll`, in the caller's thread: the panel calls it from a qt.QTimer,
    scripts and tests call :meth:`wait`.

    :meth:`cancel` asks the child to stop (SIGTERM: the trainer then saves its last checkpoint) and
    returns at once; once the child has exited, or ``cancelGraceSeconds`` later, every process left
    in its process group (the child's own children) is killed.

    Example::

        process = EngineProcess([sys.executable, "-m", "UNet3DSegmenterLib", "info", "model.pt"]).start()
        process.wait()
    """

    PIPE_GRACE_SECONDS = 2.0

    def __init__(self, arguments, onProgress=None, onFinished=None, onError=None, onCancelled=None,
                 environment=None, workingDirectory=None, cancelGraceSeconds: float = 5.0) -> None:
        self.arguments = [str(argument) for argument in arguments]
        self.onProgress, self.onFinished, self.onError, self.onCancelled = onProgress, onFinished, onError, onCancelled
        self.environment = environment
        self.workingDirectory = workingDirectory
        self.cancelGraceSeconds = cancelGraceSeconds
        self.returncode = None
        self.errorMessage = None
        self.cancelled = False
        self._process = None
        self._lines = queue.Queue()
        self._openStreams = 0
        self._stderrTail = collections.deque(maxlen=200)
        self._exitedAt = None
        self._killAt = None
        self._done = False

    @property
    def pid(self):
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True from :meth:`start` until the callbacks for the end have been called."""
        return self._process is not None and not self._done

    def start(self) -> EngineProcess:
        options = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            options["start_new_session"] = True  # its own process group, so that cancel reaches its children
        try:
            self._process = subprocess.Popen(
                self.arguments, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, encoding="utf-8", errors="replace", bufsize=1, env=self.environment,
                cwd=self.workingDirectory, **options)
        except OSError as error:
            raise ValueError(f"cannot start {self.arguments[0]}: {error.strerror or error}") from None
        for stream, name in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            self._openStreams += 1
            threading.Thread(target=self._read, args=(stream, name), daemon=True).start()
        return self

    def _read(self, stream, name: str) -> None:
        try:
            for line in stream:
                self._lines.put((name, line.rstrip("\r\n")))
        finally:
            self._lines.put((name, None))

    def poll(self) -> bool:
        """Handle what the child printed since the last call; False once it has ended and been reported."""
        if self._done or self._process is None:
            return False
        self._dispatch()
        if self._process.poll() is None:
            if self._killAt is not None and time.monotonic() > self._killAt:
                self._signalGroup(kill=True)
            return True
        if self._exitedAt is None:
            self._exitedAt = time.monotonic()
            if self.cancelled:
                self._signalGroup(kill=True)  # whatever the child left running
        # After the exit, wait a little for the pipes to close (a grandchild may still hold them).
        if self._openStreams > 0 and time.monotonic() - self._exitedAt < self.PIPE_GRACE_SECONDS:
            return True
        self._dispatch()
        self._finish()
        return False

    def wait(self, timeout: float | None = None, interval: float = 0.05, cancel=None) -> bool:
        """Poll until the child has ended; True when it succeeded. ``cancel()`` True or the timeout cancels it."""
        started = time.monotonic()
        while self.poll():
            if not self.cancelled and ((cancel is not None and cancel()) or
                                       (timeout is not None and time.monotonic() - started > timeout)):
                self.cancel()
            time.sleep(interval)
        return self.returncode == 0 and not self.cancelled

    def cancel(self) -> None:
        """Ask the child to stop and return at once; its whole process group ends (see the class)."""
        if not self.running or self.cancelled:
            return
        self.cancelled = True
        self._killAt = time.monotonic() + self.cancelGraceSeconds
        self._signalGroup(kill=os.name == "nt")

    def _signalGroup(self, kill: bool) -> None:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True, check=False)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # start_new_session made the child the leader of a group that its own children join
            os.killpg(self._process.pid, signal.SIGKILL if kill else signal.SIGTERM)

    def _dispatch(self) -> None:
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._openStreams -= 1
            elif name == "stdout":
                self._handleOutput(line)
            else:
                self._stderrTail.append(line)
                if line.strip():
                    logging.info("UNet3DSegmenter engine: %s", line)

    def _handleOutput(self, line: str) -> None:
        event = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
        if not isinstance(event, dict):
            if line.strip():
                logging.info("UNet3DSegmenter engine: %s", line)
            return
        if self.onProgress is not None and not self.cancelled:
            self.onProgress(event)

    def _finish(self) -> None:
        self._done = True
        self.returncode = self._process.poll()
        if self.cancelled:
            if self.onCancelled is not None:
                self.onCancelled()
        elif self.returncode == 0:
            if self.onFinished is not None:
                self.onFinished()
        else:
            self.errorMessage = self._errorMessage()
            if self.onError is not None:
                self.onError(self.errorMessage)

    def _errorMessage(self) -> str:
        lines = [line.strip() for line in self._stderrTail if line.strip()]
        for line in reversed(lines):
            if line.startswith("error:"):
                return line[len("error:"):].strip()
        if lines:
            return lines[-1]
        code = self.returncode
        if code is not None and code < 0:
            with contextlib.suppress(ValueError):
                return f"the engine was stopped by signal {signal.Signals(-code).name}"
        return f"the engine stopped with exit status {code} and no message"


#
# UNet3DSegmenterTest
#


class UNet3DSegmenterTest(ScriptedLoadableModuleTest):
    """End to end on a generated phantom, on the CPU, in seconds: train a tiny model, segment, check."""

    def setUp(self) -> None:
        missing = UNet3DSegmenterLogic.missingRequirements()
        if missing:  # e.g. a build machine's fresh Slicer: nothing to test until the engine can run
            raise unittest.SkipTest(f"the engine needs {', '.join(missing)}: install them from the module panel")
        slicer.mrmlScene.Clear(0)
        self.temporaryFolder = pathlib.Path(tempfile.mkdtemp(prefix="UNet3DSegmenterTest-"))

    def tearDown(self) -> None:
        shutil.rmtree(self.temporaryFolder, ignore_errors=True)

    def runTest(self) -> None:
        for test in (self.test_SegmentPhantom, self.test_BadInputsLeaveSceneUnchanged):
            try:
                self.setUp()
            except unittest.SkipTest as reason:
                self.delayDisplay(f"Self-test skipped: {reason}")
                return
            try:
                test()
            finally:
                self.tearDown()

    # Phantom grid (z, y, x) voxels and spacing (x, y, z) mm: small enough to train on a CPU in seconds.
    SHAPE = (16, 24, 24)
    SPACING = (3.0, 3.0, 4.0)
    # An oblique, left-handed direction (LPS columns) to check that geometry survives every step.
    DIRECTION = np.array([[0.0, 1.0, 0.0], [math.cos(0.3), 0.0, math.sin(0.3)], [math.sin(0.3), 0.0, -math.cos(0.3)]])

    @classmethod
    def trainTinyModel(cls, seed: int = 1, iterations: int = 100):
        """A 2-level U-Net (4 features) fitted to one phantom: organ Dice about 0.8 on other phantoms."""
        import torch
        import torch.nn.functional as functional

        from UNet3DSegmenterLib import Checkpoint, Label, Preprocessing, UNet3D
        from UNet3DSegmenterLib.phantom import PHANTOM_LABELS, make_phantom
        from UNet3DSegmenterLib.preprocess import normalize

        image, labels = make_phantom(shape=cls.SHAPE, spacing=cls.SPACING, seed=seed, classes=2)
        preprocessing = Preprocessing(normalization="zscore")
        inputs = torch.from_numpy(normalize(image.array[None], preprocessing))[None]
        target = torch.from_numpy(labels.array.astype(np.int64))[None]
        threads = torch.get_num_threads()
        torch.manual_seed(0)
        torch.set_num_threads(1)  # small tensors: one thread is fastest, and the result is reproducible
        try:
            model = UNet3D(in_channels=1, out_channels=3, depth=2, base_width=4)
            optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
            onehot = functional.one_hot(target, 3).permute(0, 4, 1, 2, 3).float()
            for _ in range(iterations):
                logits = model(inputs)
                probabilities = logits.softmax(1)
                overlap = (probabilities * onehot).sum((0, 2, 3, 4))
                dice = (2 * overlap + 1) / ((probabilities + onehot).sum((0, 2, 3, 4)) + 1)
                loss = functional.cross_entropy(logits, target) + 1 - dice[1:].mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            torch.set_num_threads(threads)
        names = [Label(0, "background", (0.0, 0.0, 0.0))] + [
            Label(value, *PHANTOM_LABELS[value]) for value in (1, 2)]
        return Checkpoint.from_model(model.eval(), names, preprocessing, cls.SHAPE)

    def addPhantom(self, seed: int = 2):
        """A phantom volume node in the scene (oblique, left-handed) and its true labelmap (engine Volume)."""
        from UNet3DSegmenterLib.phantom import make_phantom

        image, labels = make_phantom(shape=self.SHAPE, spacing=self.SPACING, seed=seed, classes=2,
                                     direction=self.DIRECTION)
        return UNet3DSegmenterLogic.addVolumeNode(image, "phantom"), labels

    def test_SegmentPhantom(self) -> None:
        self.delayDisplay("Training a tiny model on a phantom")
        logic = UNet3DSegmenterLogic()
        checkpoint = self.trainTinyModel()
        checkpointPath = _engine().save_checkpoint(checkpoint, self.temporaryFolder / "tiny.pt")

        self.delayDisplay("Segmenting another phantom")
        volumeNode, truth = self.addPhantom(seed=2)
        segmentation = logic.segment(volumeNode, checkpointPath, device="cpu")

        self.assertEqual(logic.segmentNames(segmentation), ["organ", "lesion"])
        organ = segmentation.GetSegmentation().GetSegment("organ")
        self.assertTrue(np.allclose(organ.GetColor(), checkpoint.labels[1].color))
        labelmap = logic.labelmapFromSegmentation(segmentation, volumeNode, ["organ", "lesion"])
        self.assertEqual(labelmap.shape, truth.shape)
        geometry = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(geometry)
        self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(geometry), truth.ijk_to_ras(), atol=1e-9))
        predicted, expected = labelmap == 1, truth.array == 1
        dice = 2 * np.count_nonzero(predicted & expected) / max(np.count_nonzero(predicted) + np.count_nonzero(expected), 1)
        self.assertGreater(dice, 0.5, f"organ Dice {dice:.3f} of the tiny model is below 0.5")

        self.delayDisplay("Segmenting again into the same node replaces its segments")
        again = logic.segment(volumeNode, checkpointPath, outputSegmentation=segmentation, device="cpu")
        self.assertIs(again, segmentation)
        self.assertEqual(logic.segmentNames(segmentation), ["organ", "lesion"])
        self.delayDisplay(f"Test passed: organ Dice {dice:.2f}")

    def test_BadInputsLeaveSceneUnchanged(self) -> None:
        logic = UNet3DSegmenterLogic()
        volumeNode, _ = self.addPhantom()
        broken = self.temporaryFolder / "broken.pt"
        broken.write_bytes(b"not a checkpoint")
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(ValueError):
            logic.segment(None, broken)
        with self.assertRaises(ValueError):
            logic.segment(volumeNode, broken)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.delayDisplay("Test passed: bad inputs are refused")
