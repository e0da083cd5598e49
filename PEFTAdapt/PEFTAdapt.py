"""PEFTAdapt: adapt a pretrained segmentation model to your site inside 3D Slicer.

The Widget maps Qt signals to Logic calls and a run's state (`RunState`) to widgets. The Logic binds the shared scene
logic (`PEFTAdaptLib.mrml.logic.SceneLogic`: nodes → job → background worker → tables, plots, segmentations) to
Slicer's scene, parameter node and PythonSlicer. Jobs are built, launched, polled and cancelled by the engine's job
client; nothing here starts a process or reads a worker's events.

Supported: 3D Slicer 5.10 or later (Python 3.12). This file stays valid Python 3.9 and imports the engine only on a
supported Slicer, so that Slicer 5.6/5.8 load it and say what to install instead of printing a traceback.
"""
import contextlib
import importlib
import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
import time
import unittest
from pathlib import Path
from typing import Annotated, NamedTuple

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: the oldest Slicer this module runs on: 5.10 ships Python 3.12 (5.6 and 5.8 ship 3.9, too old for the engine)
MINIMUM_SLICER = (5, 10)
MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
#: the panel's own Segment Editor parameter node (the Segment Editor module keeps its singleton to itself)
SEGMENT_EDITOR_TAG = "PEFTAdaptSegmentEditor"
#: packages that Slicer or the PyTorch extension own: pip may not replace them while installing the requirements
KEEP_INSTALLED = ("torch", "numpy", "scipy", "SimpleITK", "requests")


def unsupportedReason() -> str:
    """Why this Slicer cannot run PEFTAdapt, or "" when it can."""
    version = (slicer.app.majorVersion, slicer.app.minorVersion)
    if version >= MINIMUM_SLICER:
        return ""
    return _("PEFTAdapt needs 3D Slicer {minimum} or later (Python 3.12); this is Slicer {version} with Python "
             "{python}. Install a current release from https://download.slicer.org").format(
        minimum=".".join(map(str, MINIMUM_SLICER)), version=".".join(map(str, version)),
        python=".".join(map(str, sys.version_info[:2])))


def engineFolder() -> str:
    """The folder holding the engine package PEFTAdaptLib: beside this file in an installed extension, the
    repository root when the module is used from a checkout (Additional module paths → <checkout>/PEFTAdapt)."""
    for folder in (MODULE_DIR, os.path.dirname(MODULE_DIR)):
        if os.path.isfile(os.path.join(folder, "PEFTAdaptLib", "__init__.py")):
            return folder
    return MODULE_DIR


def installedVersion(distribution: str):
    """The installed version of a Python distribution from its metadata, or None: nothing is imported (importing
    torch would load CUDA into Slicer's process and block a later upgrade)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


UNSUPPORTED = unsupportedReason()


class PairList(NamedTuple):
    """One of the panel's lists of (case, segmentation) pairs: its parameter-node fields. A case's first image channel
    is in `volumes` (the field of scenes saved before cases of several channels), its other channels in `channels`."""

    volumes: str
    channels: str
    segmentations: str


TRAINING_PAIRS = PairList("trainingVolumes", "trainingChannels", "trainingSegmentations")
AUDIT_PAIRS = PairList("auditVolumes", "auditChannels", "auditSegmentations")


class ChannelRow(NamedTuple):
    """The labelled volume selectors of an image channel after the first: for the pair to add and the volume to
    segment (the first channel's are in the .ui; a model of more channels adds rows)."""

    pairLabel: "qt.QLabel"
    pairSelector: "slicer.qMRMLNodeComboBox"
    targetLabel: "qt.QLabel"
    targetSelector: "slicer.qMRMLNodeComboBox"


if not UNSUPPORTED:
    if engineFolder() not in sys.path:
        sys.path.insert(0, engineFolder())

    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

    from PEFTAdaptLib.jobs import JobClient, SubprocessRunner, load_job
    from PEFTAdaptLib.jobs.spec import DEVICES, TrainSpec
    from PEFTAdaptLib.methods import DEFAULT_METHOD, Budget, default_budget, method_class, method_names
    from PEFTAdaptLib.models.registry import DEFAULT_MODEL
    from PEFTAdaptLib.mrml.logic import AdaptationRequest, SceneLogic, audit_advice, channels_of
    from PEFTAdaptLib.mrml.scene_io import SceneError, import_prediction, labels_from_card

    TRAIN_DEFAULTS = TrainSpec()

    @parameterNodeWrapper
    class PEFTAdaptParameterNode:
        """Scene-saved settings of the panel. Model, method and rank are mapped to their combo boxes by the Widget
        (their choices come from the model catalog and the method registry, which a `Choice` cannot list)."""

        modelId: str = DEFAULT_MODEL
        #: the folder of a model loaded with "Load from folder…": a restored scene loads it again
        modelFolder: str = ""
        method: str = DEFAULT_METHOD
        trainingVolumes: list[slicer.vtkMRMLScalarVolumeNode]
        #: each training pair's volumes of the model's channels after the first (FLAIR, T1c: its T1c); none for a
        #: single-channel model
        trainingChannels: list[list[slicer.vtkMRMLScalarVolumeNode]]
        trainingSegmentations: list[slicer.vtkMRMLSegmentationNode]
        auditVolumes: list[slicer.vtkMRMLScalarVolumeNode]
        auditChannels: list[list[slicer.vtkMRMLScalarVolumeNode]]
        auditSegmentations: list[slicer.vtkMRMLSegmentationNode]
        #: percent of the model's parameters; 0 takes the model's default budget
        budgetPercent: Annotated[float, WithinRange(0.0, 20.0)] = 0.0
        #: 0 lets the method choose (from the budget, or its default rank)
        rank: int = 0
        steps: Annotated[int, WithinRange(1, 100000)] = TRAIN_DEFAULTS.steps
        #: edge of the cubic training patch in voxels; 0 takes the model card's
        patchSize: Annotated[int, WithinRange(0, 512)] = 0
        device: Annotated[str, Choice(list(DEVICES))] = TRAIN_DEFAULTS.device
        seed: Annotated[int, WithinRange(0, 2147483647)] = TRAIN_DEFAULTS.seed
        targetVolume: slicer.vtkMRMLScalarVolumeNode
        #: the volume to segment's other channels, in the model's order
        targetChannels: list[slicer.vtkMRMLScalarVolumeNode]
        outputSegmentation: slicer.vtkMRMLSegmentationNode
        useCorrectedForTraining: bool = True
        adapterFolder: str = ""


#
# PEFTAdapt
#


class PEFTAdapt(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("PEFTAdapt")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["The PEFTAdapt authors"]
        self.parent.helpText = _(
            "Adapt a pretrained 3D segmentation model to your images from a few annotated volumes. Pick a model, "
            "training pairs, audit pairs and a method; adapters train in a background process while the audit "
            "Dice is plotted live. Correct the result in the Segment Editor and re-adapt."
        )
        if UNSUPPORTED:
            logging.error(UNSUPPORTED)
            self.parent.helpText = UNSUPPORTED + "\n\n" + self.parent.helpText
        self.parent.acknowledgementText = _(
            "Default model: deepbet (Fisch et al. 2024, MIT). Methods: SEA-PEFT, SALT, LoRA, ConvLoRA, AdaBN."
        )


#
# PEFTAdaptWidget
#


class PEFTAdaptWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the SceneRun the panel follows
        self._adaptedRun = None  # the last adaptation that finished: Re-adapt continues it
        self._checkedRun = None  # the last run whose segmentation came in: "Next slice to check" walks its ranking
        self._shownSlice = None  # the SliceToCheck that "Next slice to check" showed last
        self._runIsSegmentation = False
        self._cancelRequested = False
        self._rankMethod = None  # the method whose ranks the rank combo box lists
        self._channels = None  # the names of the image channels the volume selectors are shown for
        self._channelRows = []  # a ChannelRow per channel after the first, made when a model first needs it
        self._jobs = []  # the JobInfo of each row of the jobs table
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(500)
        self._pollTimer.connect("timeout()", self.onPoll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PEFTAdapt.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = PEFTAdaptLogic()

        for card in self.logic.sceneLogic.modelCards():
            self.ui.modelComboBox.addItem(card["title"], card["id"])
        unlisted = self.logic.sceneLogic.unlistedModels()
        self.ui.unlistedModelsLabel.text = "\n".join([_("Not offered from the model folder:")] + unlisted)
        self.ui.unlistedModelsLabel.visible = bool(unlisted)
        for name in method_names():
            self.ui.methodComboBox.addItem(method_class(name).label, name)
        for table in (self.ui.trainingTable, self.ui.auditTable):
            table.setHorizontalHeaderLabels([_("Volume"), _("Segmentation")])
            table.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)
        self.ui.jobsTable.setHorizontalHeaderLabels([_("Job"), _("Method"), _("State"), _("Step"), _("Audit Dice")])
        self.plotWidget = self._addPlotWidget(self.ui.plotContainer)
        self.allocationPlotWidget = self._addPlotWidget(self.ui.allocationPlotContainer)

        # the embedded Segment Editor, set up as Modules/Scripted/SegmentEditor sets up its own
        self.ui.segmentEditorWidget.setMaximumNumberOfUndoStates(10)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        self.effectFactory = slicer.qSlicerSegmentEditorEffectFactory.instance()
        self.effectFactory.connect("effectRegistered(QString)", self.onEffectRegistered)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.addPairButton.connect("clicked(bool)", lambda: self.onAddPair(TRAINING_PAIRS))
        self.ui.removePairButton.connect("clicked(bool)", lambda: self.onRemovePair(TRAINING_PAIRS))
        self.ui.addAuditPairButton.connect("clicked(bool)", lambda: self.onAddPair(AUDIT_PAIRS))
        self.ui.removeAuditPairButton.connect("clicked(bool)", lambda: self.onRemovePair(AUDIT_PAIRS))
        self.ui.loadModelFolderButton.connect("clicked(bool)", self.onLoadModelFolder)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.readaptButton.connect("clicked(bool)", self.onReadapt)
        self.ui.nextSliceButton.connect("clicked(bool)", self.onNextSlice)
        self.ui.markCheckedButton.connect("clicked(bool)", self.onMarkChecked)
        self.ui.saveAdapterButton.connect("clicked(bool)", self.onSaveAdapter)
        self.ui.loadAdapterButton.connect("clicked(bool)", self.onLoadAdapter)
        self.ui.refreshJobsButton.connect("clicked(bool)", self.refreshJobs)
        self.ui.openJobButton.connect("clicked(bool)", self.onOpenJob)
        self.ui.resumeJobButton.connect("clicked(bool)", self.onResumeJob)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodSelected)
        self.ui.rankComboBox.connect("currentIndexChanged(int)", self.onRankSelected)
        self.ui.pairSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onAnnotationSelected)
        self.onAnnotationSelected(self.ui.pairSegmentationSelector.currentNode())

        self.ui.deviceInfoLabel.text = self.logic.deviceDescription()
        self.initializeParameterNode()
        self.refreshJobs()

    def _addPlotWidget(self, container: "qt.QWidget") -> "slicer.qMRMLPlotWidget":
        plotWidget = slicer.qMRMLPlotWidget()
        plotWidget.setMRMLScene(slicer.mrmlScene)
        qt.QVBoxLayout(container).addWidget(plotWidget)
        return plotWidget

    def cleanup(self) -> None:
        """The module is unloaded (Slicer closes, or the module is reloaded): stop the worker with it."""
        self._stopFollowing()
        self.removeObservers()
        self.effectFactory.disconnect("effectRegistered(QString)", self.onEffectRegistered)

    def enter(self) -> None:
        self.initializeParameterNode()
        editor = self.ui.segmentEditorWidget
        editor.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
        editor.installKeyboardShortcuts()
        editor.updateWidgetFromMRML()
        self.refreshJobs()

    def exit(self) -> None:
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onEffectRegistered(self, effectName=None) -> None:
        self.ui.segmentEditorWidget.updateEffectList()

    def onSceneStartClose(self, caller, event) -> None:
        """The scene's nodes are about to go: stop following the run (cancelling it only if its worker still runs)
        and let go of every node of the closing scene; the labels say no run is followed any more."""
        cancelled = self._running()
        self._stopFollowing()
        self._checkedRun = self._shownSlice = self._adaptedRun = None
        self.setParameterNode(None)
        self._showNoRun(_("Cancelled (scene closed)") if cancelled else "")
        self.plotWidget.setMRMLPlotViewNode(None)
        self.allocationPlotWidget.setMRMLPlotViewNode(None)
        self.ui.unitsTableView.setMRMLTableNode(None)
        editor = self.ui.segmentEditorWidget
        editor.setSegmentationNode(None)
        editor.removeViewObservations()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())
            self.ui.segmentEditorWidget.updateWidgetFromMRML()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode):
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent,
                                    self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    # -- parameter node → widgets ---------------------------------------------------------------------------------
    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        """The widgets the parameter node wrapper does not bind: model, method and rank combo boxes, the fields the
        chosen method takes, the model description, the pair tables and the buttons."""
        p = self._parameterNode
        if p is None:
            return
        restored = self.logic.restoreModel(p)
        if restored:
            self._listModel(restored)
        self._selectData(self.ui.modelComboBox, p.modelId)
        self._selectData(self.ui.methodComboBox, p.method)
        method = method_class(p.method)
        self._listRanks(method)
        self._selectData(self.ui.rankComboBox, p.rank)
        for widget in (self.ui.budgetLabel, self.ui.budgetSlider, self.ui.budgetCountLabel):
            widget.visible = method.takes_budget
        for widget in (self.ui.rankLabel, self.ui.rankComboBox):
            widget.visible = bool(method.ranks)
        self.ui.budgetCountLabel.text = self.logic.budgetText(p) if method.takes_budget else ""
        self.ui.modelDescriptionLabel.text = self.logic.modelDescription(p.modelId)
        self._showChannels(self.logic.channelNames(p.modelId))
        self._showTargetChannels(p)
        for pairList in (TRAINING_PAIRS, AUDIT_PAIRS):
            self._refreshPairTable(pairList)
        self.ui.auditAdviceLabel.text = audit_advice(len(p.auditVolumes))
        self._updateButtons()

    def _listModel(self, card: dict) -> None:
        if self.ui.modelComboBox.findData(card["id"]) < 0:
            self.ui.modelComboBox.addItem(card["title"], card["id"])

    @staticmethod
    def _selectData(comboBox: "qt.QComboBox", data) -> None:
        index = comboBox.findData(data)
        if index != comboBox.currentIndex:
            comboBox.setCurrentIndex(index)

    def _listRanks(self, method) -> None:
        if self._rankMethod is method:
            return
        self._rankMethod = method
        comboBox = self.ui.rankComboBox
        wasBlocked = comboBox.blockSignals(True)
        comboBox.clear()
        if method.takes_budget:
            comboBox.addItem(_("Automatic (from the budget)"), 0)
        else:
            comboBox.addItem(_("Default ({rank})").format(rank=method.default_rank), 0)
        for rank in method.ranks:
            comboBox.addItem(str(rank), rank)
        comboBox.blockSignals(wasBlocked)

    def _showChannels(self, names: list) -> None:
        """A volume selector per image channel of the model, for the pair to add and for the volume to segment, each
        labelled with its channel ("FLAIR:"); a single-channel model shows the one selector of each, unlabelled."""
        if names == self._channels:
            return
        self._channels = names
        while len(self._channelRows) < len(names) - 1:
            self._channelRows.append(self._addChannelRow(len(self._channelRows) + 1))
        labels = [_("{channel}:").format(channel=name) for name in names]
        for label in (self.ui.pairVolumeChannelLabel, self.ui.targetVolumeChannelLabel):
            label.text, label.visible = labels[0], len(names) > 1
        for index, row in enumerate(self._channelRows):
            for widget in row:
                widget.visible = index + 1 < len(names)
            if index + 1 < len(names):
                row.pairLabel.text = row.targetLabel.text = labels[index + 1]

    def _addChannelRow(self, row: int) -> ChannelRow:
        """The selectors of one more channel, in row `row` of the pair's and the target's volume grids; the target's
        are mapped to the parameter node by hand (a list of nodes has no GUI connector)."""
        pairLabel, targetLabel = qt.QLabel(), qt.QLabel()
        pairSelector = self._addChannelSelector(self.ui.pairVolumesWidget, row, pairLabel, self.ui.pairVolumeSelector)
        targetSelector = self._addChannelSelector(self.ui.targetVolumesWidget, row, targetLabel,
                                                  self.ui.targetVolumeSelector)
        targetSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onTargetChannelSelected)
        return ChannelRow(pairLabel, pairSelector, targetLabel, targetSelector)

    @staticmethod
    def _addChannelSelector(grid: "qt.QWidget", row: int, label: "qt.QLabel",
                            first: "slicer.qMRMLNodeComboBox") -> "slicer.qMRMLNodeComboBox":
        """A volume selector set up as the first channel's (`first`, from the .ui), with its label, in row `row` of
        the grid of `first`."""
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes, selector.hideChildNodeTypes = first.nodeTypes, first.hideChildNodeTypes
        selector.noneEnabled, selector.addEnabled, selector.removeEnabled = \
            first.noneEnabled, first.addEnabled, first.removeEnabled
        selector.toolTip = first.toolTip
        selector.setMRMLScene(slicer.mrmlScene)
        grid.layout().addWidget(label, row, 0)
        grid.layout().addWidget(selector, row, 1)
        return selector

    def _shownChannelRows(self) -> list:
        return self._channelRows[:len(self._channels) - 1]

    def _showTargetChannels(self, p) -> None:
        """The volume to segment's channels after the first, from the parameter node (the wrapper binds the first)."""
        channels = list(p.targetChannels)
        for index, row in enumerate(self._shownChannelRows()):
            wasBlocked = row.targetSelector.blockSignals(True)
            row.targetSelector.setCurrentNode(channels[index] if index < len(channels) else None)
            row.targetSelector.blockSignals(wasBlocked)

    def _pairTable(self, pairList: PairList):
        return self.ui.trainingTable if pairList is TRAINING_PAIRS else self.ui.auditTable

    def _refreshPairTable(self, pairList: PairList) -> None:
        pairs, table = self.logic.pairs(self._parameterNode, pairList), self._pairTable(pairList)
        table.setRowCount(len(pairs))
        for row, (case, segmentation) in enumerate(pairs):
            names = ", ".join(volume.GetName() if volume else "" for volume in channels_of(case))
            table.setItem(row, 0, qt.QTableWidgetItem(names))
            table.setItem(row, 1, qt.QTableWidgetItem(segmentation.GetName() if segmentation else ""))

    def _running(self) -> bool:
        return self._run is not None and not self._run.state.finished

    def _updateButtons(self) -> None:
        p = self._parameterNode
        running = self._running()
        problem = self.logic.startProblem(p) if p else _("No parameter node")
        self.ui.applyButton.enabled = (running and not self._cancelRequested) or (not running and not problem)
        if running:
            self.ui.applyButton.text = _("Cancelling…") if self._cancelRequested else _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the background job, keeping its last checkpoint")
        else:
            self.ui.applyButton.text = _("Start")
            self.ui.applyButton.toolTip = problem or _("Start adaptation in a background process")
        segmentProblem = self.logic.segmentProblem(p) if p else _("No parameter node")
        self.ui.segmentButton.enabled = not running and not segmentProblem
        self.ui.segmentButton.toolTip = segmentProblem
        self.ui.readaptButton.enabled = bool(p and p.adapterFolder and method_class(p.method).warm_startable) \
            and not running
        self.ui.nextSliceButton.enabled = self._checkedRun is not None and not running
        self.ui.markCheckedButton.enabled = bool(self._shownSlice and p and p.outputSegmentation) and not running
        self.ui.openJobButton.enabled = self.ui.resumeJobButton.enabled = bool(self._jobs) and not running

    def refreshJobs(self) -> None:
        """The work folder's adaptation jobs, newest first; each row's tooltip says what happened to the job (for
        one whose worker died: interrupted, and how it continues)."""
        self._jobs = self.logic.sceneLogic.adaptationJobs()
        table = self.ui.jobsTable
        table.setRowCount(len(self._jobs))
        for row, info in enumerate(self._jobs):
            step = f"{info.step}/{info.steps}" if info.steps else ""
            for column, text in enumerate((info.folder.name, info.method, info.state, step, info.dice_text)):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(info.message)
                table.setItem(row, column, item)
        self._updateButtons()

    # -- widgets → parameter node ---------------------------------------------------------------------------------
    def onModelSelected(self, index) -> None:
        modelId = self.ui.modelComboBox.itemData(index)
        if self._parameterNode and modelId and modelId != self._parameterNode.modelId:
            self.logic.selectModel(self._parameterNode, modelId)

    def onMethodSelected(self, index) -> None:
        name = self.ui.methodComboBox.itemData(index)
        p = self._parameterNode
        if p and name and name != p.method:
            with slicer.util.NodeModify(p):
                p.method = name
                if p.rank not in method_class(name).ranks:
                    p.rank = 0

    def onRankSelected(self, index) -> None:
        rank = self.ui.rankComboBox.itemData(index)
        if self._parameterNode and rank is not None and rank != self._parameterNode.rank:
            self._parameterNode.rank = rank

    def onAnnotationSelected(self, node) -> None:
        """The label map field shows for a label map volume, the annotation it maps."""
        labelmap = node is not None and node.IsA("vtkMRMLLabelMapVolumeNode")
        self.ui.labelMapLabel.visible = self.ui.labelMapPathLineEdit.visible = labelmap

    def onTargetChannelSelected(self) -> None:
        p = self._parameterNode
        channels = [row.targetSelector.currentNode() for row in self._shownChannelRows()]
        if p and channels != list(p.targetChannels):
            p.targetChannels = channels

    def onAddPair(self, pairList: PairList) -> None:
        volumes = [self.ui.pairVolumeSelector.currentNode()] + [
            row.pairSelector.currentNode() for row in self._shownChannelRows()]
        annotation = self.ui.pairSegmentationSelector.currentNode()
        if not volumes[0] or not annotation:
            slicer.util.warningDisplay(_("Select a volume and its annotation first."))
            return
        missing = self.logic.volumeToChoose(self._channels, volumes)
        if missing:
            slicer.util.warningDisplay(_("Select {volume} of the pair first.").format(volume=missing))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not add the pair."), waitCursor=True):
            segmentation = self.logic.addPair(self._parameterNode, pairList, volumes, annotation,
                                              self.ui.labelMapPathLineEdit.currentPath)
            self.ui.pairSegmentationSelector.setCurrentNode(segmentation)

    def onRemovePair(self, pairList: PairList) -> None:
        row = self._pairTable(pairList).currentRow()
        if row >= 0:
            self.logic.removePair(self._parameterNode, pairList, row)

    # -- actions --------------------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._running():
            self._run.cancel()
            self._cancelRequested = True
            self._updateButtons()
            return
        self._start(lambda log: self.logic.startAdaptation(self._parameterNode, log=log))

    def onReadapt(self) -> None:
        self._start(lambda log: self.logic.readapt(self._parameterNode, self._adaptedRun, log=log))

    def onNextSlice(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to move to the next slice."), waitCursor=True):
            found = self._shownSlice = self._checkedRun.nextSliceToCheck()
            if found is None:
                self.ui.statusLabel.text = _("Every ranked slice was shown.")
            else:
                why = _("where the model is least sure") if found.reason == "uncertain" else \
                    _("far from every slice checked so far (a confident miss shows no uncertainty)")
                self.ui.statusLabel.text = _("{volume}: axial slice {index}, {why}. Correct it, then Re-adapt.").format(
                    volume=found.volume.GetName(), index=found.index, why=why)
        self._updateButtons()

    def onMarkChecked(self) -> None:
        shown = self._shownSlice
        self.logic.sceneLogic.markSlicesChecked(self._parameterNode.outputSegmentation, shown.axis, [shown.index])
        self.ui.statusLabel.text = _("{volume}: axial slice {index} marked as right; Re-adapt trains on it.").format(
            volume=shown.volume.GetName(), index=shown.index)

    def _start(self, start) -> None:
        """`start(log)` submits the adaptation job and returns its run."""
        with slicer.util.tryWithErrorDisplay(_("Failed to start adaptation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self.ui.logTextEdit.clear()
            self._follow(start(self.ui.logTextEdit.appendPlainText), isSegmentation=False)

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self.ui.logTextEdit.clear()
            self._follow(self.logic.segment(self._parameterNode, log=self.ui.logTextEdit.appendPlainText),
                         isSegmentation=True)

    def onOpenJob(self) -> None:
        self._openJob(resume=False)

    def onResumeJob(self) -> None:
        self._openJob(resume=True)

    def _openJob(self, resume: bool) -> None:
        """The selected job back in the panel (its cases, settings, chart and results); `resume` restarts its
        worker from the last checkpoint."""
        row = self.ui.jobsTable.currentRow()
        if not 0 <= row < len(self._jobs):
            slicer.util.warningDisplay(_("Select a job in the list first."))
            return
        failure = _("Failed to resume the job.") if resume else _("Failed to open the job.")
        with slicer.util.tryWithErrorDisplay(failure, waitCursor=True):
            if resume and not self.logic.ensureDependencies():
                return
            self.ui.logTextEdit.clear()
            run = self.logic.openJob(self._parameterNode, self._jobs[row].folder, resume,
                                     log=self.ui.logTextEdit.appendPlainText)
            self._follow(run, isSegmentation=False)

    def _follow(self, run, isSegmentation: bool) -> None:
        """Show a background job's tables and plots and poll it from the timer (the GUI stays responsive)."""
        self._run, self._runIsSegmentation, self._cancelRequested = run, isSegmentation, False
        if not isSegmentation:
            self._showChart(self.plotWidget, run.monitor.chart)
            self._showChart(self.allocationPlotWidget, run.monitor.layers_chart)
            self.ui.unitsTableView.setMRMLTableNode(run.monitor.units_table)
        self._showState(run.state)
        self._pollTimer.start()
        self.refreshJobs()

    def _showChart(self, plotWidget: "slicer.qMRMLPlotWidget", chartNode) -> None:
        viewNode = plotWidget.mrmlPlotViewNode()
        if viewNode is None:
            viewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode")
            plotWidget.setMRMLPlotViewNode(viewNode)
        viewNode.SetPlotChartNodeID(chartNode.GetID())

    def _stopFollowing(self) -> None:
        """Stop polling; cancel the run only if its worker still runs (a finished worker's PID may be reused)."""
        self._pollTimer.stop()
        if self._running():
            self._run.cancel()
        self._run = None

    def onPoll(self) -> None:
        run = self._run
        state = run.poll()
        self._showState(state)
        if state.finished:
            self._pollTimer.stop()
            self._run = None
            if state.succeeded and not self._runIsSegmentation:
                self._adaptedRun = run
            if state.succeeded:
                with slicer.util.tryWithErrorDisplay(_("Failed to load the results."), waitCursor=True):
                    segmentation = self.logic.importResults(self._parameterNode, run, self._runIsSegmentation)
                    if segmentation is not None:
                        self._checkedRun, self._shownSlice = run, None  # its ranking drives "Next slice to check"
                        self.ui.segmentEditorWidget.setSegmentationNode(segmentation)
                        self.ui.segmentEditorWidget.setSourceVolumeNode(self._parameterNode.targetVolume)
            elif not self._cancelRequested:
                slicer.util.errorDisplay(state.describe())
            self.refreshJobs()
        self._updateButtons()

    def _showState(self, state) -> None:
        if state.steps:
            self.ui.progressBar.setRange(0, state.steps)
            self.ui.progressBar.value = state.step
        else:  # busy until the worker reports its steps; a prediction has none
            self.ui.progressBar.setRange(0, 1 if state.finished else 0)
            self.ui.progressBar.value = 1 if state.finished else 0
        self.ui.progressBar.setFormat(state.phase + (" %v/%m" if state.steps else ""))
        self.ui.statusLabel.text = state.describe()
        self.ui.runInfoLabel.text = "\n".join(
            text for text in (state.trainable_text, state.rank_reason, state.budget_reason) if text)
        self.ui.bestDiceLabel.text = self._diceText(state)
        self.ui.allocationSummaryLabel.text = state.allocation_summary

    @staticmethod
    def _diceText(state) -> str:
        """While training, the latest and best audit; once finished, what the command line reports: the start, the
        kept state and its gain, per class when there are several ("best" may be a state that was not kept)."""
        if state.best_dice is None or (state.finished and not state.succeeded):
            return ""
        if state.finished:
            return "\n".join(text for text in (state.dice_text, state.class_text) if text)
        return _("Audit Dice: current {current:.3f}, best {best:.3f} (zero-shot {zero:.3f})").format(
            current=state.last_dice, best=state.best_dice, zero=state.first_dice)

    def _showNoRun(self, status: str) -> None:
        """No run followed any more (the scene closed): nothing of the last run stays on the panel."""
        self.ui.progressBar.setRange(0, 1)
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat("")
        self.ui.statusLabel.text = status
        for label in (self.ui.runInfoLabel, self.ui.bestDiceLabel, self.ui.allocationSummaryLabel):
            label.text = ""
        self._updateButtons()

    def onLoadModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Model folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the model."), waitCursor=True):
            untrusted = self.logic.sceneLogic.untrustedTorchScript(folder)
            if untrusted:
                path, digest = untrusted
                if not slicer.util.confirmOkCancelDisplay(
                        _("{path} is a TorchScript model: a program that can read and write your files when it is "
                          "loaded or run. Load it only if you trust where it came from.\n\nsha256 {digest}\n\n"
                          "Trust this exact file?").format(path=path, digest=digest),
                        _("Trust this TorchScript model?")):
                    return
                self.logic.sceneLogic.trustTorchScript(path)
            card = self.logic.sceneLogic.registerModelFolder(folder)
            self._listModel(card)
            self.logic.selectModel(self._parameterNode, card["id"])

    def onSaveAdapter(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Save adapter to folder"))
        if folder and self._parameterNode.adapterFolder:
            with slicer.util.tryWithErrorDisplay(_("Could not save the adapter."), waitCursor=True):
                self.logic.saveAdapter(self._parameterNode.adapterFolder, folder)

    def onLoadAdapter(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(
            None, _("Adapter folder (adapter.json + adapter.safetensors), or the adaptation job's folder"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Not a usable adapter."), waitCursor=True):
                self._parameterNode.adapterFolder = self.logic.sceneLogic.checkAdapter(
                    self._parameterNode.modelId, folder)


class PEFTAdaptUnsupportedWidget(ScriptedLoadableModuleWidget):
    """What Slicer older than MINIMUM_SLICER shows instead of the panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.moduleName = "PEFTAdapt"  # the base class derives it from the class name

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        label = qt.QLabel(UNSUPPORTED)
        label.wordWrap = True
        self.layout.addWidget(label)
        self.layout.addStretch(1)


if UNSUPPORTED:
    PEFTAdaptWidget = PEFTAdaptUnsupportedWidget  # noqa: F811 - the panel needs the engine, which needs Python 3.12


#
# PEFTAdaptLogic
#


class PEFTAdaptLogic(ScriptedLoadableModuleLogic):
    """The shared scene logic bound to Slicer's scene, the panel's parameter node and PythonSlicer; what needs Slicer
    itself (installing packages, Segment Editor node) lives here, the rest in `PEFTAdaptLib.mrml.logic`."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        runner = SubprocessRunner(python=shutil.which("PythonSlicer") or sys.executable, python_path=[engineFolder()])
        self.sceneLogic = SceneLogic(slicer.mrmlScene, JobClient(self.workFolder(), runner))
        #: (model id, folder) → why a saved model folder could not be loaded again ("": it was)
        self._restoreProblems = {}

    @staticmethod
    def workFolder() -> str:
        """Where job folders go: <Slicer temporary folder>/PEFTAdapt (Application settings → General)."""
        return slicer.util.tempDirectory("PEFTAdapt", includeDateTime=False)

    @staticmethod
    def resourcePath(relativePath: str) -> str:
        return os.path.join(MODULE_DIR, "Resources", relativePath)

    def getParameterNode(self):
        return PEFTAdaptParameterNode(super().getParameterNode())

    @staticmethod
    def segmentEditorNode():
        node = slicer.mrmlScene.GetSingletonNode(SEGMENT_EDITOR_TAG, "vtkMRMLSegmentEditorNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLSegmentEditorNode")
            node.UnRegister(None)
            node.SetSingletonTag(SEGMENT_EDITOR_TAG)
            node = slicer.mrmlScene.AddNode(node)
        return node

    # -- what the panel shows ---------------------------------------------------------------------------------------
    def modelDescription(self, modelId: str) -> str:
        try:
            card = self.sceneLogic.card(modelId)
        except SceneError as exc:
            return str(exc)
        labels = ", ".join(label["name"] for label in card["labels"] if label["value"] != 0)
        return _("{description}\nModality: {modality} — labels: {labels} — license: {license}").format(
            description=card["description"], modality=card["modality"], labels=labels, license=card["license"])

    def channelNames(self, modelId: str) -> list:
        """The image channels of a case of the model, as the panel labels its volume selectors; an unknown model
        (whose problem is said) takes one."""
        try:
            return self.sceneLogic.channelNames(modelId)
        except SceneError:
            return [""]

    def budgetText(self, p) -> str:
        try:
            extra = self.sceneLogic.card(p.modelId).get("extra", {})
        except SceneError:
            return ""
        text = (Budget(fraction=p.budgetPercent / 100) if p.budgetPercent else default_budget(extra)).describe(
            extra.get("parameters"))
        return text if p.budgetPercent else _("Model default: {budget}").format(budget=text)

    def modelProblem(self, p) -> str:
        """Why the chosen model cannot run from the panel ("" when it can): it is unknown."""
        if self.modelKnown(p.modelId):
            return ""
        return self._restoreProblems.get((p.modelId, p.modelFolder)) or _(
            "Unknown model '{model}': choose a model, or load its folder with Load model from folder…").format(
            model=p.modelId)

    def startProblem(self, p) -> str:
        """Why Start cannot run yet ("" when it can); the job builder checks everything else when it runs (a pair
        of another channel count than the model's, left by another model, is refused there in one line)."""
        problem = self.modelProblem(p)
        if problem:
            return problem
        if method_class(p.method).needs_labels:  # without audit pairs the job holds out a slab of each training pair
            return "" if p.trainingVolumes else _("Add at least one training pair (volume and segmentation)")
        missing = self.targetToChoose(p)
        return _("Label-free: choose {volume} to adapt to (Segment volume)").format(volume=missing) if missing else ""

    def segmentProblem(self, p) -> str:
        """Why Segment cannot run yet ("" when it can): the model's problem, or a channel of the volume to segment."""
        missing = self.targetToChoose(p)
        return self.modelProblem(p) or (_("Choose {volume} to segment").format(volume=missing) if missing else "")

    def targetToChoose(self, p) -> str:
        """The first channel of the volume to segment not chosen yet, as the panel asks for it ("" when each is)."""
        return self.volumeToChoose(self.channelNames(p.modelId), self.targetVolumes(p))

    @staticmethod
    def volumeToChoose(names: list, volumes: list) -> str:
        """The first volume not chosen among `volumes` (one per channel of `names`) as the panel asks for it: "the
        T1c volume" for a model of several channels, "the volume" for one of a single channel; "" when each is."""
        missing = [name for name, volume in zip(names, volumes) if volume is None]
        if not missing:
            return ""
        return _("the {channel} volume").format(channel=missing[0]) if len(names) > 1 else _("the volume")

    def deviceDescription(self) -> str:
        """The installed PyTorch build, read from package metadata; the worker's `started` line in the log names
        the device a run actually uses."""
        from packaging.version import Version

        version = installedVersion("torch")
        if version is None:
            return _("PyTorch is not installed yet: it is installed when you first press Start.")
        local = Version(version).local or ""
        if local == "cpu":
            build = _("CPU-only build")
        elif local.startswith("cu") and local[2:].isdigit():
            build = _("CUDA {cuda} build").format(cuda=f"{local[2:-1]}.{local[-1]}")
        elif local.startswith("rocm"):
            build = _("ROCm build")
        else:
            build = _("default build for this platform")
        return _("PyTorch {version} ({build}). The log of each run names the device it uses.").format(
            version=version, build=build)

    # -- parameter node edits -----------------------------------------------------------------------------------------
    def selectModel(self, p, modelId: str) -> None:
        with slicer.util.NodeModify(p):
            p.modelId, p.modelFolder = modelId, self.sceneLogic.modelFolder(modelId)

    def restoreModel(self, p):
        """The card of a folder-loaded model of a restored scene, loaded again from the folder the scene saved (tried
        once; `startProblem` says why it failed); None when there is nothing to load."""
        key = (p.modelId, p.modelFolder)
        if not p.modelFolder or key in self._restoreProblems or self.modelKnown(p.modelId):
            return None
        try:
            card = self.sceneLogic.restoreModelFolder(*key)
        except SceneError as exc:
            self._restoreProblems[key] = str(exc)
            return None
        self._restoreProblems[key] = ""
        return card

    def modelKnown(self, modelId: str) -> bool:
        try:
            self.sceneLogic.card(modelId)
        except SceneError:
            return False
        return True

    @staticmethod
    def case(volumes: list):
        """A case as the shared logic takes it (`channels_of`): its volume for a single channel, else a tuple of one
        volume per channel, in the model's order."""
        return tuple(volumes) if len(volumes) > 1 else volumes[0]

    def targetVolumes(self, p) -> list:
        """The volume to segment of each of the model's channels, as its selectors show them (None where none is
        chosen; channels a model of more channels left are not the model's)."""
        count = len(self.channelNames(p.modelId))
        volumes = [p.targetVolume, *p.targetChannels][:count]
        return volumes + [None] * (count - len(volumes))

    def targetCase(self, p):
        """The volume to segment as a case (`case`), or None when none of its channels is chosen."""
        volumes = self.targetVolumes(p)
        return self.case(volumes) if any(volume is not None for volume in volumes) else None

    @classmethod
    def pairs(cls, p, pairList: PairList) -> list:
        """(case, segmentation) of each pair, its case as added (`case`): a pair listed without its other channels
        (a scene saved before them, a script) is its first channel's volume."""
        others = list(getattr(p, pairList.channels))
        cases = [cls.case([volume, *(others[row] if row < len(others) else [])])
                 for row, volume in enumerate(getattr(p, pairList.volumes))]
        return list(zip(cases, getattr(p, pairList.segmentations)))

    @staticmethod
    def setPairs(p, pairList: PairList, pairs: list) -> None:
        cases = [channels_of(case) for case, _segmentation in pairs]
        with slicer.util.NodeModify(p):
            setattr(p, pairList.volumes, [case[0] for case in cases])
            setattr(p, pairList.channels, [list(case[1:]) for case in cases])
            setattr(p, pairList.segmentations, [segmentation for _case, segmentation in pairs])

    def addPair(self, p, pairList: PairList, volumes: list, annotation, labelMap: str = ""):
        """Add the case of `volumes` (one per channel of the model) with its annotation to the list, and return its
        segmentation: a label map volume annotation (a mask, FreeSurfer's aseg…) becomes a segmentation in the
        model's classes first, through `labelMap` (the command line's --label-map file) when its values are in
        another numbering."""
        case = self.case(volumes)
        if annotation.IsA("vtkMRMLLabelMapVolumeNode"):
            annotation = self.sceneLogic.segmentationFromLabelmap(annotation, case, p.modelId,
                                                                  Path(labelMap).expanduser() if labelMap else None)
        pairs = self.pairs(p, pairList)
        if (case, annotation) not in pairs:
            self.setPairs(p, pairList, pairs + [(case, annotation)])
        return annotation

    @classmethod
    def removePair(cls, p, pairList: PairList, row: int) -> None:
        pairs = cls.pairs(p, pairList)
        del pairs[row]
        cls.setPairs(p, pairList, pairs)

    # -- jobs -------------------------------------------------------------------------------------------------------
    def request(self, p, warmStart: bool = False):
        target = self.targetCase(p)
        return AdaptationRequest(
            modelId=p.modelId,
            trainingPairs=self.pairs(p, TRAINING_PAIRS),
            auditPairs=self.pairs(p, AUDIT_PAIRS),
            method=p.method,
            budgetPercent=p.budgetPercent or None,
            rank=p.rank or None,
            steps=p.steps,
            patchSize=p.patchSize or None,
            device=p.device,
            seed=p.seed,
            warmStartAdapter=p.adapterFolder if warmStart and p.adapterFolder else None,
            targetVolumes=[target] if target is not None else [],
        )

    def _useDevice(self, device: str) -> None:
        """`cpu` also hides the GPUs from the worker, so a broken CUDA driver cannot stop a CPU run."""
        environment = self.sceneLogic.client.runner.environment
        if device == "cpu":
            environment["CUDA_VISIBLE_DEVICES"] = "-1"
        else:
            environment.pop("CUDA_VISIBLE_DEVICES", None)

    def startAdaptation(self, p, warmStart: bool = False, log=None):
        """Export the nodes, make the job and start its worker in the background; returns the SceneRun to poll."""
        self._useDevice(p.device)
        return self.sceneLogic.startAdaptation(self.request(p, warmStart), log=log)

    def readapt(self, p, previous, log=None):
        """The next round after `previous` (the last adaptation that finished): its cases, every earlier round's
        corrections included, plus the corrected result when the box is ticked. The parameter node's pairs are left
        as they are, and the result comes into a new segmentation: the correction stays as the user made it. Without
        a previous run of this adapter (loaded from a folder, or a restored scene) the adapter warm-starts Start."""
        target = self.targetCase(p)
        corrected = [(target, p.outputSegmentation)] \
            if p.useCorrectedForTraining and target is not None and p.outputSegmentation else []
        self._useDevice(p.device)
        if previous is not None and str(previous.adapterFolder) == p.adapterFolder:
            return self.sceneLogic.startReadaptation(previous, corrected, log=log)
        request = self.request(p, warmStart=True)
        request.trainingPairs += corrected
        return self.sceneLogic.startAdaptation(request, log=log)

    def segment(self, p, log=None):
        """Segment the target volume (one per channel) with the model (and adapter, if any) in a background predict
        job."""
        self._useDevice(p.device)
        return self.sceneLogic.segment(p.modelId, self.targetCase(p), p.adapterFolder or None, device=p.device,
                                       log=log)

    def openJob(self, p, folder, resume: bool = False, log=None):
        """A job of the work folder back in the panel: its cases as nodes, its settings in the parameter node;
        returns the run to follow (restarted from its last checkpoint when `resume`)."""
        if resume:
            self._useDevice(load_job(folder).train.device)
        run, request = self.sceneLogic.openJob(folder, log=log, resume=resume)
        with slicer.util.NodeModify(p):
            self.selectModel(p, request.modelId)
            p.method = request.method
            self.setPairs(p, TRAINING_PAIRS, request.trainingPairs)
            self.setPairs(p, AUDIT_PAIRS, request.auditPairs)
            p.budgetPercent = request.budgetPercent or 0.0
            p.rank = request.rank or 0
            p.steps, p.patchSize, p.seed = request.steps, request.patchSize or 0, request.seed
            p.device = request.device
            target = channels_of(request.targetVolumes[0]) if request.targetVolumes else (None,)
            p.targetVolume, p.targetChannels = target[0], list(target[1:])
        return run

    @staticmethod
    def importResults(p, run, isSegmentation: bool):
        """Load a finished run's segmentation into the output node (a new node for a run that trains on it, such as a
        re-adapt); an adaptation also becomes the current adapter. Returns the segmentation node, or None when the
        run predicted nothing."""
        if not isSegmentation:
            p.adapterFolder = str(run.adapterFolder)
        segmentations = run.importResults(p.outputSegmentation)
        if not segmentations:
            return None
        p.outputSegmentation = segmentations[0]
        return segmentations[0]

    @staticmethod
    def saveAdapter(adapterFolder: str, destination: str) -> None:
        shutil.copytree(adapterFolder, destination, dirs_exist_ok=True)

    # -- dependencies -------------------------------------------------------------------------------------------------
    def requirements(self) -> list:
        """The worker's packages (Resources/requirements.txt, the engine's dependencies less Slicer's own)."""
        from packaging.requirements import Requirement

        with open(self.resourcePath("requirements.txt")) as file:
            lines = [line.split("#")[0].strip() for line in file]
        return [Requirement(line) for line in lines if line]

    def missingDependencies(self) -> list:
        """The requirements that are not installed at a suitable version (read from package metadata)."""
        missing = []
        for requirement in self.requirements():
            version = installedVersion(requirement.name)
            if version is None or not requirement.specifier.contains(version, prereleases=True):
                missing.append(requirement)
        return missing

    def ensureDependencies(self) -> bool:
        """Install what the worker needs, once, after the user agreed: torch through the PyTorch extension (it
        picks the build for the GPU and driver), then the rest of requirements.txt. Nothing is imported here."""
        requirements = self.requirements()
        torch = next(requirement for requirement in requirements if requirement.name == "torch")
        if not self._ensureTorch(torch):
            return False
        return self._ensurePackages([requirement for requirement in requirements if requirement.name != "torch"])

    @staticmethod
    def _ensureTorch(requirement) -> bool:
        version = installedVersion("torch")
        if version is not None:
            if requirement.specifier.contains(version, prereleases=True):
                return True
            slicer.util.errorDisplay(_(
                "PyTorch {version} is installed, but PEFTAdapt needs torch{specifier}. In the PyTorch Utils module, "
                "uninstall PyTorch, install it again with the version requirement {specifier}, then restart "
                "Slicer.").format(version=version, specifier=requirement.specifier))
            return False
        try:
            import PyTorchUtils  # the PyTorch extension
        except ImportError:
            slicer.util.errorDisplay(_("PEFTAdapt needs the PyTorch extension: install it from the Extensions Manager "
                                       "and restart Slicer."))
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        return torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=str(requirement.specifier)) \
            is not None

    def _ensurePackages(self, requirements) -> bool:
        missingNow = self.missingDependencies()
        missing = [requirement for requirement in requirements if requirement in missingNow]
        if not missing:
            return True
        try:
            packaging = importlib.import_module("slicer.packaging")  # Slicer 5.12 and later
        except ImportError:
            packaging = None
        if packaging is None and not slicer.util.confirmOkCancelDisplay(
                _("PEFTAdapt needs these Python packages to run its background worker. Install them now (needs a "
                  "network connection, takes a few minutes)?"),
                _("PEFTAdapt - Install Python packages"),
                detailedText="\n".join(str(requirement) for requirement in missing)):
            return False
        with self._constraintsFile() as constraints:
            if packaging is None:
                slicer.util.pip_install([str(requirement) for requirement in missing] + ["--constraint", constraints])
                return True
            try:
                packaging.pip_ensure(requirements, constraints=constraints, requester="PEFTAdapt")
            except RuntimeError:  # the user declined
                return False
            return True

    @staticmethod
    @contextlib.contextmanager
    def _constraintsFile():
        """A temporary pip constraints file pinning the installed versions of the packages Slicer and the PyTorch
        extension own: installing the requirements may not replace them (a conflict fails instead of breaking
        Slicer). Made only for an install, and removed after it."""
        pins = [f"{name}=={installedVersion(name)}" for name in KEEP_INSTALLED if installedVersion(name)]
        with tempfile.NamedTemporaryFile("w", prefix="PEFTAdapt-constraints-", suffix=".txt", delete=False) as file:
            file.write("\n".join(pins) + "\n")
        try:
            yield file.name
        finally:
            os.remove(file.name)


#
# PEFTAdaptTest
#


class PEFTAdaptTest(ScriptedLoadableModuleTest):
    """The module self-test. `test_PanelWithoutDownloads` needs no network, no torch and no worker: scene export and
    import, the parameter node and the panel's state. `test_ShortAdaptation` runs a real adaptation on the CPU and
    skips, saying why, where its packages or sample data are missing (it installs nothing)."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        for test in (self.test_PanelWithoutDownloads, self.test_ShortAdaptation):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:
                self.delayDisplay(f"{test.__name__} skipped: {reason}")

    def test_PanelWithoutDownloads(self):
        import numpy as np

        self.delayDisplay("Synthetic volume and segmentation")
        logic = PEFTAdaptLogic()
        volume, segmentation = self._syntheticCase(logic, np)
        p = logic.getParameterNode()
        p.trainingVolumes, p.trainingSegmentations = [volume], [segmentation]  # no audit pair: the job holds out a slab

        self.delayDisplay("Scene export into a job folder, checked as the worker will read it")
        folder = Path(logic.sceneLogic.client.new_folder("selftest"))
        try:
            with tempfile.TemporaryDirectory() as export:
                spec = logic.sceneLogic.jobRequest(logic.request(p), Path(export))
                logic.sceneLogic.client.create(spec, folder)
            label = next((folder / "inputs").glob("support0_label*"))
            self.delayDisplay("Import of a label file as a segmentation with the model's segment names")
            labels = labels_from_card(logic.sceneLogic.card(p.modelId)["labels"])
            imported = import_prediction(slicer.mrmlScene, label, volume, labels, "self-test import")
            names = {imported.GetSegmentation().GetNthSegment(i).GetName()
                     for i in range(imported.GetSegmentation().GetNumberOfSegments())}
            self.assertEqual(names, {label.name for label in labels if label.value != 0})
        finally:
            shutil.rmtree(folder, ignore_errors=True)

        self.delayDisplay("Panel state follows the parameter node")
        widget = slicer.modules.peftadapt.widgetRepresentation().self()
        widget.setParameterNode(p)
        self.assertTrue(widget.ui.applyButton.enabled)
        p.method = "label-free"  # isHidden: `visible` is also false while the module panel is not shown
        self.assertTrue(widget.ui.budgetSlider.isHidden())
        self.assertFalse(widget.ui.rankComboBox.isHidden())
        self.assertFalse(widget.ui.applyButton.enabled)  # label-free needs the volume to adapt to
        p.targetVolume = volume
        self.assertTrue(widget.ui.applyButton.enabled)
        self.delayDisplay("Test passed")

    @staticmethod
    def _syntheticCase(logic, np):
        """A 64³ volume with a bright sphere and its segmentation in the default model's classes, made from a label
        map volume as the panel's "Add" makes it."""
        grid = np.mgrid[:64, :64, :64]
        sphere = ((grid - 32) ** 2).sum(axis=0) < 18 ** 2
        volume = slicer.util.addVolumeFromArray((sphere * 100.0 + 10.0).astype(np.float32), name="self-test volume")
        labelmap = slicer.util.addVolumeFromArray(sphere.astype(np.uint8), nodeClassName="vtkMRMLLabelMapVolumeNode")
        segmentation = logic.sceneLogic.segmentationFromLabelmap(labelmap, volume, DEFAULT_MODEL)
        slicer.mrmlScene.RemoveNode(labelmap)
        return volume, segmentation

    def test_ShortAdaptation(self):
        logic = PEFTAdaptLogic()
        missing = logic.missingDependencies()
        if missing:
            self.skipTest(f"needs {', '.join(map(str, missing))} (installed by pressing Start in the panel)")
        import SampleData

        try:
            volume = SampleData.downloadSample("MRHead")
        except Exception as exc:  # no network: a skip, not a failure of the module
            self.skipTest(f"the MRHead sample could not be downloaded ({exc})")
        p = logic.getParameterNode()
        p.targetVolume, p.device = volume, "cpu"
        self.delayDisplay("Zero-shot brain mask as the starting annotation (background predict job)")
        reference = logic.importResults(p, self._waitFor(logic.segment(p)), isSegmentation=True)
        self.assertGreater(reference.GetSegmentation().GetNumberOfSegments(), 0)
        p.trainingVolumes, p.trainingSegmentations = [volume], [reference]  # audited on a slab the job holds out
        p.targetVolume, p.outputSegmentation = None, None
        p.method, p.rank, p.steps, p.patchSize = "lora", 2, 3, 64
        self.delayDisplay("Adapting for 3 steps on the CPU")
        run = self._waitFor(logic.startAdaptation(p))
        self.assertGreaterEqual(len(run.monitor.dice_values()), 2)
        self.delayDisplay("Test passed")

    def _waitFor(self, run, seconds: float = 900):
        """Poll a run, keeping the application responsive; fail with the worker's message if it does not succeed."""
        deadline = time.monotonic() + seconds
        while not run.poll().finished and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.2)
        if not run.state.finished:
            run.cancel()
        self.assertTrue(run.state.succeeded, run.state.describe())
        return run
