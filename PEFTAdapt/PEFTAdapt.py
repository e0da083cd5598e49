"""PEFTAdapt: adapt a pretrained segmentation model to your site inside 3D Slicer.

The Widget only wires Qt to the Logic. Everything below it — exporting nodes, running the background worker,
turning its events into table/plot rows, importing predictions — lives in `PEFTAdaptSlicer` (MRML only, scene
passed in) and in the engine `PEFTAdaptLib`, both tested outside Slicer.
"""

import enum
import os
import shutil
import sys
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from PEFTAdaptLib.jobs import JobClient, RunState, SubprocessRunner
from PEFTAdaptLib.mrml import logic as sceneLogic


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
            "training pairs, an audit volume and a parameter budget; adapters train in a background process while "
            "the audit Dice is plotted live. Correct the result in the Segment Editor and re-adapt."
        )
        self.parent.acknowledgementText = _(
            "Default model: deepbet (Fisch et al. 2024, MIT). Methods: SEA-PEFT, SALT, LoRA, ConvLoRA, AdaBN."
        )


#
# Parameter node
#


class AdaptationMethod(enum.Enum):
    AUTOMATIC = "sea-peft"
    SALT = "salt"
    LORA = "lora"
    CONVLORA = "convlora"
    NORM_AFFINE = "norm-affine"
    LABEL_FREE = "label-free"  # no annotation: ConvLoRA + AdaBN self-training on the target volume


@parameterNodeWrapper
class PEFTAdaptParameterNode:
    """Scene-saved settings of the panel. Training pairs are node lists kept in step with the table."""

    modelId: str = "deepbet-brain"
    trainingVolumes: list[slicer.vtkMRMLScalarVolumeNode]
    trainingSegmentations: list[slicer.vtkMRMLSegmentationNode]
    auditVolume: slicer.vtkMRMLScalarVolumeNode
    auditSegmentation: slicer.vtkMRMLSegmentationNode
    method: AdaptationMethod = AdaptationMethod.AUTOMATIC
    budgetPercent: Annotated[float, WithinRange(0.01, 20.0)] = 1.0
    steps: Annotated[int, WithinRange(1, 100000)] = 200
    patchSize: Annotated[int, WithinRange(16, 512)] = 128
    device: str = "auto"
    forceCpu: bool = False
    seed: Annotated[int, WithinRange(0, 2147483647)] = 0
    targetVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    useCorrectedForTraining: bool = True
    adapterFolder: str = ""


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
        self._run = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(500)
        self._pollTimer.timeout.connect(self.onPoll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/PEFTAdapt.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = PEFTAdaptLogic()

        for model in self.logic.sceneLogic.modelCards():
            self.ui.modelComboBox.addItem(model["title"], model["id"])
        for method in AdaptationMethod:
            self.ui.methodComboBox.addItem(method.value)
        for device in ("auto", "cuda", "mps", "cpu"):
            self.ui.deviceComboBox.addItem(device)
        self.ui.trainingTable.setHorizontalHeaderLabels([_("Volume"), _("Segmentation")])
        self.ui.trainingTable.horizontalHeader().setSectionResizeMode(qt.QHeaderView.Stretch)

        self.plotWidget = slicer.qMRMLPlotWidget()
        self.plotWidget.setMRMLScene(slicer.mrmlScene)
        self.plotViewNode = None
        qt.QVBoxLayout(self.ui.plotContainer).addWidget(self.plotWidget)
        self.allocationPlotWidget = slicer.qMRMLPlotWidget()
        self.allocationPlotWidget.setMRMLScene(slicer.mrmlScene)
        self.allocationPlotViewNode = None
        qt.QVBoxLayout(self.ui.allocationPlotContainer).addWidget(self.allocationPlotWidget)
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(self.logic.segmentEditorNode())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPair)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePair)
        self.ui.loadModelFolderButton.connect("clicked(bool)", self.onLoadModelFolder)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.readaptButton.connect("clicked(bool)", self.onReadapt)
        self.ui.saveAdapterButton.connect("clicked(bool)", self.onSaveAdapter)
        self.ui.loadAdapterButton.connect("clicked(bool)", self.onLoadAdapter)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.updateModelDescription)

        self.initializeParameterNode()
        self.updateModelDescription()
        self.ui.deviceInfoLabel.text = self.logic.deviceDescription()

    def cleanup(self) -> None:
        self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._refreshTrainingTable()
            self._checkCanApply()

    # -- panel state ---------------------------------------------------------------------------------------------
    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self._run is not None and not self._run.state.finished
        if p and p.method == AdaptationMethod.LABEL_FREE:
            ready = bool(p.targetVolume)
        else:
            ready = bool(p and p.trainingVolumes and p.auditVolume and p.auditSegmentation)
        self.ui.applyButton.enabled = running or ready
        self.ui.applyButton.text = _("Cancel") if running else _("Start")
        self.ui.applyButton.toolTip = _("Stop the background adaptation, keeping its last checkpoint") if running else (
            _("Start adaptation in a background process") if ready
            else _("Label-free: choose the target volume to adapt to") if p and p.method == AdaptationMethod.LABEL_FREE
            else _("Add at least one training pair and choose an audit volume and segmentation"))
        budget = self.logic.sceneLogic.budgetParameters(p.modelId, p.budgetPercent) if p else None
        self.ui.budgetCountLabel.text = _("{count:,} trainable parameters").format(count=budget) if budget else ""
        self.ui.readaptButton.enabled = bool(p and p.adapterFolder and not running)
        self.ui.segmentButton.enabled = bool(p and p.targetVolume and not running)

    def updateModelDescription(self, index=None) -> None:
        modelId = self.ui.modelComboBox.currentData
        card = next((m for m in self.logic.sceneLogic.modelCards() if m["id"] == modelId), None)
        if card:
            labels = ", ".join(label["name"] for label in card["labels"][1:])
            self.ui.modelDescriptionLabel.text = f"{card['description']}\n{_('Modality')}: {card['modality']} — " \
                f"{_('labels')}: {labels} — {_('license')}: {card['license']}"

    def _refreshTrainingTable(self) -> None:
        p = self._parameterNode
        pairs = list(zip(p.trainingVolumes, p.trainingSegmentations))
        self.ui.trainingTable.setRowCount(len(pairs))
        for row, (volume, segmentation) in enumerate(pairs):
            self.ui.trainingTable.setItem(row, 0, qt.QTableWidgetItem(volume.GetName() if volume else ""))
            self.ui.trainingTable.setItem(row, 1, qt.QTableWidgetItem(segmentation.GetName() if segmentation else ""))

    def onAddPair(self) -> None:
        volume = self.ui.pairVolumeSelector.currentNode()
        segmentation = self.ui.pairSegmentationSelector.currentNode()
        if not volume or not segmentation:
            slicer.util.warningDisplay(_("Select a volume and its segmentation first."))
            return
        self._parameterNode.trainingVolumes = list(self._parameterNode.trainingVolumes) + [volume]
        self._parameterNode.trainingSegmentations = list(self._parameterNode.trainingSegmentations) + [segmentation]
        self._refreshTrainingTable()

    def onRemovePair(self) -> None:
        row = self.ui.trainingTable.currentRow()
        if row < 0:
            return
        volumes, segmentations = list(self._parameterNode.trainingVolumes), list(self._parameterNode.trainingSegmentations)
        del volumes[row], segmentations[row]
        self._parameterNode.trainingVolumes, self._parameterNode.trainingSegmentations = volumes, segmentations
        self._refreshTrainingTable()

    # -- actions -------------------------------------------------------------------------------------------------
    def onApplyButton(self) -> None:
        if self._run is not None and not self._run.state.finished:
            self._run.cancel()
            self.ui.applyButton.text = _("Cancelling…")
            return
        self._start(warmStart=False)

    def onReadapt(self) -> None:
        p = self._parameterNode
        if p.useCorrectedForTraining and p.outputSegmentation and p.targetVolume:
            p.trainingVolumes = list(p.trainingVolumes) + [p.targetVolume]
            p.trainingSegmentations = list(p.trainingSegmentations) + [p.outputSegmentation]
            self._refreshTrainingTable()
        self._start(warmStart=True)

    def _start(self, warmStart: bool) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start adaptation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self.ui.logTextEdit.clear()
            self._run = self.logic.startAdaptation(self._parameterNode, warmStart=warmStart, log=self._appendLog)
            self.plotViewNode = self.plotViewNode or slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode")
            self.plotViewNode.SetPlotChartNodeID(self._run.monitor.chart.GetID())
            self.plotWidget.setMRMLPlotViewNode(self.plotViewNode)
            self.ui.unitsTableView.setMRMLTableNode(self._run.monitor.units_table)
            self.allocationPlotViewNode = self.allocationPlotViewNode or slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLPlotViewNode")
            self.allocationPlotViewNode.SetPlotChartNodeID(self._run.monitor.layers_chart.GetID())
            self.allocationPlotWidget.setMRMLPlotViewNode(self.allocationPlotViewNode)
            self.ui.progressBar.setRange(0, self._parameterNode.steps)
            self._pollTimer.start()
            self._checkCanApply()

    def onPoll(self) -> None:
        state: RunState = self._run.poll()
        self.ui.progressBar.value = state.step
        self.ui.progressBar.setFormat(f"{state.phase} %v/%m")
        self.ui.statusLabel.text = state.describe()
        if state.best_dice is not None:
            self.ui.bestDiceLabel.text = _("Audit Dice: current {current:.3f}, best {best:.3f} (zero-shot {zero:.3f})").format(
                current=state.last_dice, best=state.best_dice, zero=state.first_dice)
        self.ui.allocationSummaryLabel.text = state.allocation_summary
        if state.finished:
            self._pollTimer.stop()
            if state.outcome == "finished":
                with slicer.util.tryWithErrorDisplay(_("Failed to load results."), waitCursor=True):
                    segmentations = self._run.importResults()
                    self._parameterNode.adapterFolder = str(self._run.adapterFolder)
                    if segmentations:
                        self._parameterNode.outputSegmentation = segmentations[0]
                        self.ui.segmentEditorWidget.setSegmentationNode(segmentations[0])
            elif state.outcome == "failed":
                slicer.util.errorDisplay(_("Adaptation failed: {reason}").format(reason=state.message))
            self._checkCanApply()

    def onSegment(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Segmentation failed."), waitCursor=True):
            p = self._parameterNode
            run = self.logic.sceneLogic.segment(p.modelId, p.targetVolume, p.adapterFolder or None)
            run.wait()
            [segmentation] = run.importResults(p.outputSegmentation)
            p.outputSegmentation = segmentation
            self.ui.segmentEditorWidget.setSegmentationNode(segmentation)
            self.ui.segmentEditorWidget.setSourceVolumeNode(p.targetVolume)

    def onLoadModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Model folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not load the model."), waitCursor=True):
            card = self.logic.sceneLogic.registerModelFolder(folder)
            self.ui.modelComboBox.addItem(card["title"], card["id"])
            self.ui.modelComboBox.setCurrentIndex(self.ui.modelComboBox.count - 1)

    def onSaveAdapter(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Save adapter to folder"))
        if folder and self._parameterNode.adapterFolder:
            shutil.copytree(self._parameterNode.adapterFolder, folder, dirs_exist_ok=True)

    def onLoadAdapter(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(None, _("Adapter folder (adapter.json + adapter.safetensors)"))
        if folder:
            with slicer.util.tryWithErrorDisplay(_("Not a usable adapter."), waitCursor=True):
                self.logic.sceneLogic.checkAdapter(self._parameterNode.modelId, folder)
                self._parameterNode.adapterFolder = folder

    def _appendLog(self, line: str) -> None:
        self.ui.logTextEdit.appendPlainText(line)


#
# PEFTAdaptLogic
#


class PEFTAdaptLogic(ScriptedLoadableModuleLogic):
    """The shared scene logic (`PEFTAdaptLib.mrml.logic`) bound to Slicer's scene, parameter node and PythonSlicer."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        moduleDir = os.path.dirname(slicer.modules.peftadapt.path)
        runner = SubprocessRunner(python=shutil.which("PythonSlicer") or sys.executable, python_path=[moduleDir])
        self.sceneLogic = sceneLogic.SceneLogic(slicer.mrmlScene, JobClient(slicer.util.tempDirectory("PEFTAdapt"),
                                                                             runner))

    def getParameterNode(self):
        return PEFTAdaptParameterNode(super().getParameterNode())

    def segmentEditorNode(self):
        node = self.scene.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
        return node or self.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode", "PEFTAdapt segment editor")

    def ensureDependencies(self) -> bool:
        """Install torch (PyTorch extension picks the CUDA build) and the engine's requirements on first Start."""
        try:
            import PyTorchUtils  # noqa: F401 - provided by the PyTorch extension
        except ImportError:
            slicer.util.errorDisplay(_("PEFTAdapt needs the PyTorch extension: install it from the Extensions Manager."))
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.1") is None:
                return False
        requirements = slicer.packaging.load_requirements(self.resourcePath("requirements.txt"))
        slicer.packaging.pip_ensure(requirements, requester="PEFTAdapt", skip_packages=["torch", "SimpleITK", "requests"])
        return True

    def resourcePath(self, relativePath: str) -> str:
        return os.path.join(os.path.dirname(slicer.modules.peftadapt.path), "Resources", relativePath)

    def startAdaptation(self, parameterNode, warmStart: bool, log=None):
        p = parameterNode
        request = sceneLogic.AdaptationRequest(
            modelId=p.modelId,
            trainingPairs=list(zip(p.trainingVolumes, p.trainingSegmentations)),
            auditPair=(p.auditVolume, p.auditSegmentation),
            method=p.method.value,
            budgetPercent=p.budgetPercent,
            steps=p.steps,
            patchSize=p.patchSize,
            device="cpu" if p.forceCpu else p.device,
            seed=p.seed,
            warmStartAdapter=p.adapterFolder if warmStart and p.adapterFolder else None,
            targetVolumes=[p.targetVolume] if p.targetVolume else [],
        )
        environment = {"CUDA_VISIBLE_DEVICES": "-1"} if p.forceCpu else None
        if environment:
            self.sceneLogic.client.runner.environment.update(environment)
        return self.sceneLogic.startAdaptation(request, log=log)


#
# PEFTAdaptTest
#


class PEFTAdaptTest(ScriptedLoadableModuleTest):
    """Module self-test: a short real adaptation of the default model on CPU with the MRHead sample."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ShortAdaptationOnCPU()

    def test_ShortAdaptationOnCPU(self):
        import SampleData

        self.delayDisplay("Loading sample data")
        volume = SampleData.downloadSample("MRHead")
        logic = PEFTAdaptLogic()
        if not logic.ensureDependencies():
            self.skipTest("dependencies not installed")
        self.delayDisplay("Zero-shot brain mask as the starting annotation")
        segmentRun = logic.sceneLogic.segment("deepbet-brain", volume, None)
        segmentRun.wait()
        [reference] = segmentRun.importResults()
        self.assertGreater(reference.GetSegmentation().GetNumberOfSegments(), 0)
        parameterNode = logic.getParameterNode()
        parameterNode.trainingVolumes = [volume]
        parameterNode.trainingSegmentations = [reference]
        parameterNode.auditVolume = volume
        parameterNode.auditSegmentation = reference
        parameterNode.method = AdaptationMethod.LORA
        parameterNode.steps = 3
        parameterNode.patchSize = 64
        parameterNode.forceCpu = True
        self.delayDisplay("Adapting for 3 steps on CPU")
        run = logic.startAdaptation(parameterNode, warmStart=False)
        state = run.wait(timeoutSeconds=900)
        self.assertEqual(state.outcome, "finished", state.message)
        self.assertGreaterEqual(len(run.monitor.dice_values()), 2)
        self.delayDisplay("Test passed")
