"""UNet3DSegmenter: 3D U-Net / VNet segmentation of CT and MRI volumes inside 3D Slicer.

Five classes, in the order of Slicer's scripted-module template:

- ``UNet3DSegmenter``: the module's name, category, help and acknowledgement.
- ``UNet3DSegmenterParameterNode``: the panel's state, saved with the scene.
- ``UNet3DSegmenterWidget``: the panel; it wires Qt to ``UNet3DSegmenterLib.slicer.panel.PanelState``.
- ``UNet3DSegmenterLogic``: all the work, usable from the Python console without the panel.
- ``UNet3DSegmenterTest``: the self-test (Reload and Test), on a generated phantom.

The work itself lives in ``UNet3DSegmenterLib/slicer/`` (see its package docstring). The engine,
which needs PyTorch, is imported only when it is used, so that the module loads, and its panel
opens, on a Slicer without PyTorch: the panel then offers to install it.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import shutil
import sys
import tempfile
import unittest
from typing import Annotated

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIRECTORY = pathlib.Path(__file__).resolve().parent


def _useTheEngineBesideThisFile() -> None:
    """Slicer appends module folders to ``sys.path``: an ``UNet3DSegmenterLib`` installed with pip (the
    engine's wheel, which has no Slicer side) would be found first. Put this folder's in front."""
    spec = importlib.util.find_spec("UNet3DSegmenterLib")
    if spec is not None and spec.origin and MODULE_DIRECTORY in pathlib.Path(spec.origin).resolve().parents:
        return
    sys.path.insert(0, str(MODULE_DIRECTORY))
    for name in [name for name in sys.modules if name.split(".")[0] == "UNet3DSegmenterLib"]:
        del sys.modules[name]


_useTheEngineBesideThisFile()

from UNet3DSegmenterLib.choices import ARCHITECTURES, DEVICES  # noqa: E402
from UNet3DSegmenterLib.slicer import (  # noqa: E402
    export,
    install,
    panel,
    process,
    samples,
    scene,
    segmentation,
    selftest,
    training,
    translation,
)

_ = translation._  # user-facing text marked for Slicer's translation

#
# UNet3DSegmenter
#


class UNet3DSegmenter(ScriptedLoadableModule):
    """The module's description, as the Modules menu and the Help section show it."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("UNet3D Segmenter")
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["UNet3DSegmenter contributors"]
        self.parent.helpText = _("""
<p>Segments CT and MRI volumes with 3D U-Net, residual U-Net, ResNet-18 U-Net or VNet models, and trains new models
from segmentations you already have in the scene.</p>
<p><b>Segment</b>: choose the input volume and a model (the bundled models are listed with the
structures they segment; <i>Choose a checkpoint file...</i> opens any <code>.pt</code> checkpoint made
by UNet3DSegmenter), then click <b>Segment</b>. The result is a segmentation with one named, coloured
segment per structure, shown over the input. A GPU is used when PyTorch sees one.</p>
<p><b>Train</b>: add pairs of a volume and its segmentation (the segment names become the model's
labels), name the run (or keep the proposed name) and click <b>Train</b>: each run gets a folder of
its own under the models folder, so no run replaces another's model. <i>Start from: selected model</i> fine-tunes
the model chosen above, for example on its own results corrected in Segment Editor (<b>Add the
segmented volumes</b> adds them in one click). Loss and Dice per structure are plotted as training
goes; <b>Stop</b> ends the run after its current iteration and keeps what it learnt, and
<b>Resume</b> continues it; when it finishes the new model is selected in the Segment section.</p>
<p><b>The bundled hippocampus model</b> was trained on crops of about 35 x 50 x 35 mm around the
hippocampus (the Sample Data module lists one as <i>HippocampusCrop</i>). On a larger volume, such as a
whole head, choose <i>Region: inside an ROI</i>, click <b>Place ROI</b> and drag the box over one
hippocampus. The status line warns when what is segmented lies far outside a model's training data.</p>
<p>The first time, the module offers to install PyTorch (through the PyTorch extension when it is
installed, otherwise with pip). From the Python console:
<code>UNet3DSegmenterLogic().segment(volumeNode, "model.pt")</code>.</p>
""") + _('<p>Documentation: <a href="{url}">README</a>, section <i>3D Slicer</i>, beside this module.</p>').format(
            url=(MODULE_DIRECTORY / "README.md").as_uri())
        self.parent.acknowledgementText = _("""
<p>The segmentation engine implements the 3D U-Net (Cicek et al., MICCAI 2016), a residual U-Net and
VNet (Milletari et al., 3DV 2016) in PyTorch.</p>
<p>Bundled models come with a model card in <code>Resources/Models/</code> that names the data they
were trained on and its license. The hippocampus model was trained on the Medical Segmentation
Decathlon Task04 Hippocampus data (Simpson et al., arXiv:1902.09063; Antonelli et al., Nature
Communications 2022), shared under CC-BY-SA 4.0; the model, and the sample crop from the same data
(<code>Resources/Samples/</code>), are shared under the same license.</p>
""")
        problem = install.slicerVersionProblem(slicerVersion=getattr(slicer.app, "applicationVersion", ""))
        if problem:  # say it where the user looks: the module's help, and the error log
            self.parent.helpText = f"<p><b>{problem}</b></p>" + self.parent.helpText
            logging.error(problem)
        # A hippocampus crop, the input the bundled model expects, in the Sample Data module.
        slicer.app.connect("startupCompleted()", lambda: samples.registerSampleData(MODULE_DIRECTORY))


#
# UNet3DSegmenterParameterNode
#


@parameterNodeWrapper
class UNet3DSegmenterParameterNode:
    """The panel's state, saved with the scene.

    Segment: inputVolume, checkpointPath (the model file), device, overlap (the model's own when the model changes),
    testTimeAugmentation (8x slower), largestComponent (largest piece of each structure), showConfidence (the model's
    confidence over the image), outputSegmentation (None: new), region (all, or roiNode).
    Train: startFrom (a new network, or fine-tune the selected model), trainingOutputFolder (a run gets a folder in it),
    trainingRunName (that folder; empty: labels, date, time), architecture, trainingMinutes (time budget; 0: epochs),
    epochs, patchSize (voxels per side; 0: from the data), batchSize, learningRate (0: default), trainingDevice,
    trainingTable (loss, Dice per epoch), sparsePair (Add pair marks it painted on some slices); pairs: panel.py.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    checkpointPath: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    overlap: Annotated[float, WithinRange(0.0, panel.MAX_OVERLAP)] = 0.5
    testTimeAugmentation: bool = False
    largestComponent: bool = False
    showConfidence: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    region: Annotated[str, Choice(panel.REGIONS)] = panel.REGIONS[0]
    roiNode: vtkMRMLMarkupsROINode
    startFrom: Annotated[str, Choice(panel.START_FROM)] = panel.START_FROM[0]
    trainingOutputFolder: pathlib.Path
    trainingRunName: str = ""
    architecture: Annotated[str, Choice(ARCHITECTURES)] = "unet3d"
    trainingMinutes: Annotated[float, WithinRange(0.0, 10000.0)] = panel.DEFAULT_TRAINING_MINUTES
    epochs: Annotated[int, WithinRange(1, 10000)] = 100
    patchSize: Annotated[int, WithinRange(0, 512)] = 0
    batchSize: Annotated[int, WithinRange(1, 64)] = 2
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    trainingDevice: Annotated[str, Choice(DEVICES)] = "auto"
    trainingTable: vtkMRMLTableNode
    sparsePair: bool = False


#
# UNet3DSegmenterWidget
#


class UNet3DSegmenterWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: loads Resources/UI/UNet3DSegmenter.ui and wires it to ``panel.PanelState``.

    Every user action and scene event calls one method of the state, then :meth:`updateGUI` shows
    the state's view; what the panel decides lives in the state, where it is tested.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.state = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._pollTimer = None
        self._shownModels = None
        self._shownPairs = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = install.slicerVersionProblem(slicerVersion=slicer.app.applicationVersion)
        if problem:
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            return
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UNet3DSegmenter.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UNet3DSegmenterLogic()
        self.state = panel.PanelState(self.logic, notify=slicer.util.errorDisplay,
                                      showSegmentation=self._showSegmentation, showChart=self._showChart,
                                      refresh=self._refresh, confirm=slicer.util.confirmYesNoDisplay,
                                      settings=qt.QSettings())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.updateGUI)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onNodeRemoved)

        self.ui.modelSelector.connect("activated(int)", self.onModelSelected)
        self.ui.segmentButton.connect("clicked()", self.onSegmentButton)
        self.ui.placeRoiButton.connect("clicked()", self.onPlaceRoi)
        self.ui.addPairButton.connect("clicked()", self.onAddPair)
        self.ui.removePairButton.connect("clicked()", self.onRemovePair)
        self.ui.addSegmentedButton.connect("clicked()", self.onAddSegmented)
        self.ui.trainButton.connect("clicked()", self.onTrainButton)
        self.ui.resumeButton.connect("clicked()", self.onResumeButton)
        self.ui.installButton.connect("clicked()", self.onInstallButton)
        self.ui.installOpenVINOButton.connect("clicked()", self.onInstallOpenVINOButton)
        self.ui.trainingVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUI)
        self.ui.trainingSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateGUI)
        self.ui.trainingPairsTable.connect("itemSelectionChanged()", self.updateGUI)

        # Child processes report through stdout; the panel reads them on a timer so Slicer stays responsive.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self.onPoll)

        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self.onCheckEngine)  # importing torch takes a moment: once the panel shows, once

    def cleanup(self) -> None:
        if self.state is not None:
            self.state.shutdown()  # at most panel.SHUTDOWN_SECONDS; a training run saves first
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def onReload(self) -> None:
        """Reload the module file and the UNet3DSegmenterLib modules (Slicer's reload covers the module file only)."""
        if self.state is not None:
            self.state.shutdown()
        install.forgetEngineModules()
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        if self.state is not None:
            self.state.shown = True
        self.initializeParameterNode()

    def exit(self) -> None:
        if self.state is not None:
            self.state.shown = False
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self.state.sceneStartClose()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller, event) -> None:
        self.initializeParameterNode()  # a loaded scene brings its own parameters: model, pairs, devices

    def onNodeRemoved(self, caller, event) -> None:
        self.state.nodeRemoved()
        self.updateGUI()

    def initializeParameterNode(self) -> None:
        if self.logic is None:
            return
        self.setParameterNode(self.logic.getParameterNode())
        self.state.chooseDefaultInput()
        if str(self._parameterNode.trainingOutputFolder) in ("", "."):
            self._parameterNode.trainingOutputFolder = pathlib.Path.home() / "UNet3DSegmenter" / "models"

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        self.state.setParameterNode(inputParameterNode)
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)  # refills the choice combo boxes
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.updateGUI()

    # --- showing the state -----------------------------------------------------------------------

    def updateGUI(self, caller=None, event=None) -> None:
        """Show :meth:`panel.PanelState.view`: models, devices, buttons, pairs, progress, install section."""
        if self.state is None or slicer.mrmlScene.IsBatchProcessing():  # a scene loading or closing: once, at its end
            return
        selected = self.ui.trainingPairsTable.selectionModel().selectedRows()
        view = self.state.view(self.ui.trainingVolumeSelector.currentNode(),
                               self.ui.trainingSegmentationSelector.currentNode(),
                               selected[0].row() if selected else -1)
        self.ui.installCollapsibleButton.visible = view.installVisible
        self.ui.installCollapsibleButton.collapsed = view.installCollapsed
        self.ui.installLabel.text = view.installText
        self.ui.installButton.visible = not view.openVINO.enabled
        self.ui.installButton.enabled = view.installEnabled
        self.ui.installOpenVINOButton.visible = view.openVINO.enabled
        self._showModels(view.models, view.modelIndex)
        self.ui.modelLabelsLabel.text = view.modelLabels
        for comboBox in (self.ui.deviceComboBox, self.ui.trainingDeviceComboBox):
            for index, choice in enumerate(view.devices):
                item = comboBox.model().item(index)
                if item is not None:
                    item.setEnabled(choice.enabled)
                    item.setToolTip(choice.toolTip)
        self._showPairs(view.pairs)
        self.ui.architectureComboBox.enabled = view.architectureEnabled
        self.ui.roiSelector.enabled = view.roiEnabled
        for button, state in ((self.ui.installOpenVINOButton, view.openVINO),
                              (self.ui.segmentButton, view.segment), (self.ui.placeRoiButton, view.placeRoi),
                              (self.ui.trainButton, view.train),
                              (self.ui.addPairButton, view.addPair), (self.ui.removePairButton, view.removePair),
                              (self.ui.addSegmentedButton, view.addSegmented), (self.ui.resumeButton, view.resume)):
            button.text, button.enabled, button.toolTip = state.text, state.enabled, state.toolTip
        self.ui.segmentProgressBar.maximum = view.segmentProgress[1]
        self.ui.segmentProgressBar.value = view.segmentProgress[0]
        self.ui.statusLabel.text = view.segmentStatus
        self.ui.trainingProgressBar.value = view.trainingProgress
        self.ui.trainingStatusLabel.text = view.trainingStatus
        self.ui.runNameLineEdit.placeholderText = view.runNamePlaceholder

    def _showModels(self, models, index: int) -> None:
        if models != self._shownModels:
            self.ui.modelSelector.clear()
            for position, item in enumerate(models):
                self.ui.modelSelector.addItem(item.text, item.path)
                self.ui.modelSelector.setItemData(position, item.toolTip, qt.Qt.ToolTipRole)
            self._shownModels = models
        self.ui.modelSelector.setCurrentIndex(index)

    def _showPairs(self, pairs) -> None:
        if pairs == self._shownPairs:
            return
        table = self.ui.trainingPairsTable
        table.setRowCount(len(pairs))
        for row, texts in enumerate(pairs):
            for column, text in enumerate(texts):
                table.setItem(row, column, qt.QTableWidgetItem(text))
        self._shownPairs = pairs

    def _showSegmentation(self, inputVolume, segmentationNode, fit: bool) -> None:
        slicer.util.setSliceViewerLayers(background=inputVolume, fit=fit)

    def _refresh(self) -> None:
        """Show the state now and let Slicer handle what the user did meanwhile (a long step in the GUI thread)."""
        self.updateGUI()
        slicer.app.processEvents()

    def _showChart(self, chartNode) -> None:
        slicer.modules.plots.logic().ShowChartInLayout(chartNode)

    # --- user actions ----------------------------------------------------------------------------

    def onCheckEngine(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Checking PyTorch failed."), waitCursor=True):
            self.state.ensureEngineChecked()
        self.updateGUI()

    def onModelSelected(self, index: int) -> None:
        dialog = self.state.selectModel(index)
        path = ""
        if dialog == "file":
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Choose a UNet3DSegmenter checkpoint"), "", _("PyTorch checkpoint (*.pt)"))
        elif dialog:  # a folder: a cross-validation's folds ('folder') or an nnU-Net model folder ('nnunet')
            path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a folder of fold checkpoints")
                                                       if dialog == "folder" else _("Choose an nnU-Net model folder"))
        if path:
            self.state.addModel(path)
        self.updateGUI()

    def onSegmentButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            if self.state.pressSegment():
                self._pollTimer.start()
        self.updateGUI()

    def onPlaceRoi(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("The ROI could not be placed."), waitCursor=True):
            self.state.placeRoi()
        self.updateGUI()

    def onTrainButton(self) -> None:
        # no wait cursor: the export goes case by case, with Slicer responsive and Stop working between cases
        with slicer.util.tryWithErrorDisplay(_("Training could not start.")):
            if self.state.pressTrain():
                self._pollTimer.start()
        self.updateGUI()

    def onResumeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Training could not resume."), waitCursor=True):
            if self.state.startResume():
                self._pollTimer.start()
        self.updateGUI()

    def onAddPair(self) -> None:
        self.state.addPair(self.ui.trainingVolumeSelector.currentNode(),
                           self.ui.trainingSegmentationSelector.currentNode())
        self.updateGUI()

    def onRemovePair(self) -> None:
        selected = self.ui.trainingPairsTable.selectionModel().selectedRows()
        if selected:
            self.state.removePair(selected[0].row())
        self.updateGUI()

    def onAddSegmented(self) -> None:
        self.state.addSegmentedVolumes()
        self.updateGUI()

    def onPoll(self) -> None:
        if not self.state.poll():
            self._pollTimer.stop()
        self.updateGUI()

    def onInstallOpenVINOButton(self) -> None:
        if self.state.installing or not slicer.util.confirmOkCancelDisplay(
                (self.logic.openVINOOffer() or "") + " " + _("Install it now?")):  # asked before the wait cursor
            return
        if self._install(_("Installing OpenVINO failed."), lambda: self.logic.installOpenVINO(askConfirmation=False)):
            slicer.util.infoDisplay(_("OpenVINO is installed. The next segmentation with each model measures it "
                                      "beside PyTorch and keeps the faster."))

    def onInstallButton(self) -> None:
        if self.state.installing or not slicer.util.confirmOkCancelDisplay(
                self.logic.installDescription() + " " + _("Continue?")):  # asked before the wait cursor
            return
        if self._install(_("Installation failed."), lambda: self.logic.installRequirements(askConfirmation=False)):
            slicer.util.infoDisplay(_("PyTorch is installed. If Segment stays disabled, restart Slicer."))

    def _install(self, failure: str, install) -> bool:
        """Run ``install()`` with Install, Segment and Train disabled (pip lets Slicer process clicks); True when done."""
        if not self.state.beginInstall():
            return False
        self.updateGUI()
        installed = False
        try:
            with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
                installed = bool(install())
        finally:
            self.state.endInstall()
            self.updateGUI()
        return installed


#
# UNet3DSegmenterLogic
#


class UNet3DSegmenterLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, callable without the panel (Python console, scripts, tests).

    Each method is a short delegate to ``UNet3DSegmenterLib.slicer``: ``scene`` converts volumes and
    segmentations, ``export`` writes training data, ``segmentation`` and ``training`` run the two
    jobs, ``install`` handles PyTorch. Mistakes the user can fix (no input, a 2D image, a checkpoint
    that does not load, ...) raise ``ValueError`` with a one-line message and leave the scene as it was.

    Example (Python console)::

        logic = slicer.util.getModuleLogic("UNet3DSegmenter")  # or UNet3DSegmenterLogic()
        segmentation = logic.segment(getNode("MRHead"), "/path/to/model.pt")
    """
    markSparselyAnnotated = staticmethod(export.markSparselyAnnotated)  # a segmentation painted on some slices only

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        # The engine runs through Slicer's own Python; PythonSlicer is its launcher (it sets up the paths).
        self.pythonExecutable = shutil.which("PythonSlicer") or sys.executable

    def getParameterNode(self):
        return UNet3DSegmenterParameterNode(super().getParameterNode())

    # --- dependencies ----------------------------------------------------------------------------

    @staticmethod
    def missingRequirements() -> list[str]:
        """pip requirements of the engine that are not installed (empty when it can run)."""
        return install.missingRequirements()

    @staticmethod
    def engineProblem() -> str | None:
        """Why the engine cannot run (missing or broken PyTorch), in one line; None when it can."""
        return install.engineProblem()

    @staticmethod
    def pyTorchExtensionAvailable() -> bool:
        """True when Slicer's PyTorch extension (module PyTorchUtils) is installed."""
        return install.pyTorchExtensionAvailable()

    def installDescription(self, problem: str | None = None) -> str:
        """What :meth:`installRequirements` will install and how, in words for the panel."""
        return install.installDescription(problem)

    def installRequirements(self, askConfirmation: bool = True) -> bool:
        """Install the engine's missing packages into Slicer's Python; False when the user declines."""
        return install.installRequirements(askConfirmation)

    @staticmethod
    def openVINOOffer() -> str | None:
        """Why the optional OpenVINO runtime would make Segment faster on this computer; None where it would not."""
        return install.openVINOOffer()

    @staticmethod
    def installOpenVINO(askConfirmation: bool = True) -> bool:
        """Install the optional OpenVINO runtime into Slicer's Python; False when the user declines."""
        return install.installOpenVINO(askConfirmation)

    @staticmethod
    def cudaAvailable() -> bool:
        """True when PyTorch sees a CUDA GPU (imports torch)."""
        return install.cudaAvailable()

    @staticmethod
    def mpsAvailable() -> bool:
        """True when PyTorch sees an Apple GPU (imports torch)."""
        return install.mpsAvailable()

    # --- models ----------------------------------------------------------------------------------

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
            return ", ".join(label.name for label in self.loadCheckpoint(checkpoint).foreground_labels)
        except ValueError as error:
            return f"Cannot read this model: {error}"

    def loadCheckpoint(self, checkpoint):
        """A checkpoint from a path (or the Checkpoint itself); ValueError when it cannot be used."""
        return segmentation.loadCheckpoint(checkpoint)

    def segmentDefaults(self, checkpoint):
        """The engine's ``SegmentOptions`` as ``checkpoint`` would run by default: its recorded overlap filled in."""
        return segmentation.segmentDefaults(checkpoint)

    # --- volumes and segmentations <-> engine ----------------------------------------------------

    @staticmethod
    def checkVolumeNode(volumeNode) -> None:
        """ValueError unless ``volumeNode`` is a scalar or vector volume node holding a 3D image."""
        scene.checkVolumeNode(volumeNode)

    @staticmethod
    def volumeFromNode(volumeNode):
        """The engine Volume of a scalar or vector volume node: voxels copied, geometry exact."""
        return scene.volumeFromNode(volumeNode)

    @staticmethod
    def addVolumeNode(volume, name: str = "volume", labelmap: bool = False):
        """Add an engine Volume to the scene as a scalar (or labelmap, or vector) volume node."""
        return scene.addVolumeNode(volume, name, labelmap)

    @staticmethod
    def segmentNames(segmentationNode) -> list[str]:
        """The names of the segments, in the segmentation's order."""
        return scene.segmentNames(segmentationNode)

    def updateSegmentationFromLabelmap(self, segmentationNode, labelmap, labels, referenceVolumeNode=None) -> None:
        """Replace all segments of ``segmentationNode`` by one segment per label (engine Labels) of ``labelmap``."""
        scene.updateSegmentationFromLabelmap(segmentationNode, labelmap, labels, referenceVolumeNode)

    def labelmapFromSegmentation(self, segmentationNode, referenceVolumeNode, segmentNames=None) -> np.ndarray:
        """The segments as one labelmap array (k, j, i) on the reference volume's grid.

        Segment ``segmentNames[n]`` gets value n + 1 (default: every segment, in the segmentation's
        order); where segments overlap, the later one wins. Names the segmentation lacks stay absent.
        """
        return scene.labelmapFromSegmentation(segmentationNode, referenceVolumeNode, segmentNames)

    # --- segment ---------------------------------------------------------------------------------

    def segment(self, inputVolume, checkpoint, outputSegmentation=None, *, options=None, progress=None, roi=None,
                warn=None, **optionKeywords):
        """Segment ``inputVolume`` with ``checkpoint`` (a .pt path or a Checkpoint); waits for the result.

        Returns ``outputSegmentation`` (a new segmentation node when None) holding one segment per
        label of the checkpoint, with its name and colour, on the input's geometry, placed beside the
        input in the subject hierarchy. Running again into the same node replaces its segments.
        ``options`` (the engine's ``SegmentOptions``) and ``optionKeywords`` (``device="cpu"``,
        ``overlap=0.25``, ``tta=True``, ``largestComponent=True``, ``precision``, ``batchSize``) say how;
        an overlap left unset is the one the checkpoint records.
        ``roi`` (a vtkMRMLMarkupsROINode aligned with the R, A, S axes) segments only inside its box;
        the segments are empty outside it. ``progress(done, total)`` is called after each batch of
        windows; ``warn(message)`` (default: the log) when what is segmented lies far outside the
        model's training data. Nothing in the scene changes when this raises.
        """
        job = segmentation.prepare(inputVolume, checkpoint, outputSegmentation, options, roi, **optionKeywords)
        return segmentation.finish(job, segmentation.predict(job, progress, warn))

    def segmentInBackground(self, inputVolume, checkpoint, outputSegmentation=None, *, options=None, onProgress=None,
                            onFinished=None, onError=None, roi=None, onWarning=None, **optionKeywords):
        """Start :meth:`segment` in a child process (the engine's command line) and return at once.

        The returned ``EngineProcess`` reports through ``onWarning(message)``, ``onProgress(done, total)``,
        ``onFinished(segmentationNode)`` and ``onError(message)``; call its ``poll()`` regularly (the
        panel does, on a timer) or ``wait()``. ``cancel()`` ends the child and its own children and adds
        nothing to the scene. Inputs are checked here, so a bad input raises ValueError at once.
        """
        job = segmentation.prepare(inputVolume, checkpoint, outputSegmentation, options, roi, **optionKeywords)
        return segmentation.startInBackground(job, self.pythonExecutable, self.childEnvironment(), onProgress,
                                              onFinished, onError, onWarning)

    @staticmethod
    def addRoi(volumeNode, sizeXYZ=None):
        """A new ROI node centred on ``volumeNode``, ``sizeXYZ`` mm along the volume's own x, y, z axes
        (default: half the volume), for the user to drag over the structure to segment."""
        return scene.addRoiAroundVolumeCentre(volumeNode, sizeXYZ)

    def trainingExtent(self, checkpoint):
        """The median extent (x, y, z mm) of the images ``checkpoint`` was trained on; None when not recorded."""
        fingerprint = self.loadCheckpoint(checkpoint).fingerprint
        return fingerprint.extent_median if fingerprint is not None else None

    def childEnvironment(self) -> dict:
        """Environment for engine child processes: this module's folder first on the Python path."""
        return process.childEnvironment(MODULE_DIRECTORY)

    # --- training --------------------------------------------------------------------------------

    def trainingLabels(self, pairs, initCheckpoint=None) -> list:
        """The label of each segment name across ``pairs``: values 1, 2, ... in order of first appearance.

        Colours come from the first segment with that name. With ``initCheckpoint`` its labels keep
        their values and come first.
        """
        initLabels = self.loadCheckpoint(initCheckpoint).labels if initCheckpoint is not None else None
        return export.trainingLabels(pairs, initLabels)

    def exportTrainingPairs(self, pairs, folder) -> pathlib.Path:
        """Write (volume, segmentation) pairs as a training dataset in ``folder``; return the folder.

        Layout: ``images/<case>.nii.gz``, ``labels/<case>.nii.gz`` and ``dataset.json`` (case list,
        value -> name and colour). Checks every pair before writing anything; the scene is left as it was.
        """
        return export.exportTrainingPairs(pairs, folder)

    def segmentedPairs(self, mrmlScene=None) -> list[tuple]:
        """(input volume, segmentation) of each segmentation this module made, to fine-tune on once corrected."""
        return export.segmentedPairs(mrmlScene or slicer.mrmlScene)

    def createTrainingCurves(self, labelNames, name: str = "UNet3DSegmenter training", scene=None):
        """A table (epoch, train loss, mean Dice, Dice per label) and a chart plotting it."""
        return training.createTrainingCurves(labelNames, name, scene)

    @staticmethod
    def addTrainingEpoch(tableNode, event: dict) -> None:
        """Append one trainer 'epoch' event to the table; Dice is NaN on epochs without validation."""
        training.addTrainingEpoch(tableNode, event)

    def train(self, pairs, outputFolder, architecture: str | None = None, epochs: int = 100, patchSize=None,
              batchSize: int = 2, learningRate=None, device: str = "auto", initCheckpoint=None, tableNode=None,
              progress=None, cancel=None, **options) -> pathlib.Path:
        """Train a model on (volume, segmentation) pairs of the scene and wait for it; return its checkpoint.

        The pairs are exported to ``outputFolder/data`` (see :meth:`exportTrainingPairs`); the run
        writes best.pt, last.pt, run.json, log.csv and curves.png to ``outputFolder``.
        ``architecture`` is unet3d, resunet3d or vnet (None: unet3d, or the fine-tuned model's);
        ``patchSize`` is an edge length or (z, y, x) in voxels (None: chosen from the data);
        ``initCheckpoint`` (a path or a Checkpoint) fine-tunes that model: its labels keep their values,
        new segment names get a new output layer. ``options`` are further ``TrainingConfig`` fields
        (e.g. ``iterations_per_epoch=50``, ``time_budget=5`` minutes). Each trainer event goes to ``progress(event)``; epochs are
        added to ``tableNode`` (created with a chart when None). ``cancel()`` returning True stops after
        the current iteration. Returns best.pt (last.pt when it stopped before best.pt was written).
        A folder that holds a model (best.pt, last.pt or run.json) is refused unless ``overwrite=True``;
        ``resume=True``, with no pairs, continues the stopped run in ``outputFolder`` as its run.json says.
        """
        job = training.prepare(pairs, outputFolder, architecture, epochs, patchSize, batchSize, learningRate, device,
                               initCheckpoint, tableNode, **options)
        training.run(job, progress, cancel)
        return training.finish(job)

    def trainInBackground(self, pairs, outputFolder, architecture: str | None = None, epochs: int = 100,
                          patchSize=None, batchSize: int = 2, learningRate=None, device: str = "auto",
                          initCheckpoint=None, tableNode=None, onProgress=None, onFinished=None, onError=None,
                          onCancelled=None, exportProgress=None, **options):
        """Start :meth:`train` in a child process (``train --config run.json --progress-json``) and return at once.

        The returned ``EngineProcess`` carries ``tableNode`` and ``chartNode`` (loss and Dice per
        epoch, updated as the trainer reports them) and reports ``onProgress(event)``,
        ``onFinished(checkpointPath)``, ``onError(message)`` or ``onCancelled()`` when polled. Its
        ``cancel()`` stops the run gracefully: it ends its iteration and saves last.pt, log.csv and
        the curves (``process.job.result`` then holds the trainer's last event). With ``resume=True`` and no
        pairs it continues the stopped run in ``outputFolder`` (``train --config run.json --resume``).
        The pairs are exported here first, case by case: ``exportProgress(done, total)`` is called before
        and after each (the panel shows it and lets Slicer process events); when it returns False the
        export stops, nothing is written and ``export.ExportStopped`` is raised.
        """
        job = training.prepare(pairs, outputFolder, architecture, epochs, patchSize, batchSize, learningRate, device,
                               initCheckpoint, tableNode, exportProgress=exportProgress, **options)
        return training.startInBackground(job, self.pythonExecutable, self.childEnvironment(), onProgress,
                                          onFinished, onError, onCancelled)


#
# UNet3DSegmenterTest
#


class UNet3DSegmenterTest(ScriptedLoadableModuleTest):
    """End to end on a generated phantom, on the CPU, in seconds: train a tiny model, segment, check."""

    def setUp(self) -> None:
        missing = install.missingRequirements()
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

    def test_SegmentPhantom(self) -> None:
        self.delayDisplay("Training a tiny model on a phantom")
        logic = UNet3DSegmenterLogic()
        checkpoint = selftest.trainTinyModel()
        checkpointPath = install.engine().save_checkpoint(checkpoint, self.temporaryFolder / "tiny.pt")

        self.delayDisplay("Segmenting another phantom")
        volumeNode, truth = selftest.addPhantom(seed=2)
        result = logic.segment(volumeNode, checkpointPath, device="cpu")

        self.assertEqual(logic.segmentNames(result), ["organ", "lesion"])
        organ = result.GetSegmentation().GetSegment("organ")
        self.assertTrue(np.allclose(organ.GetColor(), checkpoint.labels[1].color))
        labelmap = logic.labelmapFromSegmentation(result, volumeNode, ["organ", "lesion"])
        self.assertEqual(labelmap.shape, truth.shape)
        geometry = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(geometry)
        self.assertTrue(np.allclose(slicer.util.arrayFromVTKMatrix(geometry), truth.ijk_to_ras(), atol=1e-9))
        dice = selftest.dice(labelmap, truth.array, 1)
        self.assertGreater(dice, 0.5, f"organ Dice {dice:.3f} of the tiny model is below 0.5")

        self.delayDisplay("Segmenting again into the same node replaces its segments")
        again = logic.segment(volumeNode, checkpointPath, outputSegmentation=result, device="cpu")
        self.assertIs(again, result)
        self.assertEqual(logic.segmentNames(result), ["organ", "lesion"])

        self.delayDisplay("Segmenting inside an ROI leaves the segments empty outside its box")
        roiNode = logic.addRoi(volumeNode)  # half the volume, at its centre
        inside = logic.segment(volumeNode, checkpointPath, device="cpu", roi=roiNode)
        block = scene.regionFromRoiNode(roiNode, volumeNode).block(logic.volumeFromNode(volumeNode))
        outside = np.ones(truth.shape, bool)
        outside[block] = False
        boxed = logic.labelmapFromSegmentation(inside, volumeNode, ["organ", "lesion"])
        self.assertFalse(boxed[outside].any())
        self.assertTrue(boxed[block].any())
        self.delayDisplay(f"Test passed: organ Dice {dice:.2f}")

    def test_BadInputsLeaveSceneUnchanged(self) -> None:
        logic = UNet3DSegmenterLogic()
        volumeNode, _ = selftest.addPhantom()
        broken = self.temporaryFolder / "broken.pt"
        broken.write_bytes(b"not a checkpoint")
        nodes = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(ValueError):
            logic.segment(None, broken)
        with self.assertRaises(ValueError):
            logic.segment(volumeNode, broken)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes)
        self.delayDisplay("Test passed: bad inputs are refused")
