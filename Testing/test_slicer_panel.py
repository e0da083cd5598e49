"""The PEFTAdapt panel run on a fake of Slicer's Qt layer (`slicer_qt_fake.py`, that layer only) over a real MRML
scene (slicer-core), the real engine, real job folders and real processes: the issue-15 defects that need the
module to run. Each test says which defect it guards."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared
from slicer_qt_fake import SlicerQtFake
from slicer_scene import load_segmentation, load_volume, new_scene

TESTING = Path(__file__).resolve().parent
ROOT = TESTING.parent


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTADAPT_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("PEFTADAPT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    instance = SlicerQtFake(new_scene(), tmp_path / "slicer-temp")
    try:
        instance.loadModule()
        yield instance
    finally:
        instance.close()


@pytest.fixture
def panel(fake):
    widget = fake.createWidget()
    yield widget
    widget.cleanup()
    assert not fake.slotErrors, fake.slotErrors  # what PythonQt would have printed as tracebacks


class WaitingRunner:
    """Starts a real process that only waits (or ends at once): a worker that has not reported anything yet."""

    def __init__(self, seconds: float = 120):
        self.seconds, self.environment, self.processes = seconds, {}, []

    def start(self, args, cwd, stdout, stderr):
        with open(stdout, "ab") as out, open(stderr, "ab") as err:
            process = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({self.seconds})"],
                                       cwd=str(cwd), stdout=out, stderr=err)
        self.processes.append(process)
        return process


def brats(case: int, name: str) -> Path:
    return shared(f"brats/brats_2013_pat000{case}_1/{name}")


def add_training_data(fake, p) -> None:
    volume = load_volume(fake.scene, brats(3, "T1c_subtrMeanDivStd.nii.gz"), "T1c 3")
    segmentation = load_segmentation(fake.scene, brats(3, "brainmask.nii.gz"), volume, "brain 3", "brain")
    p.trainingVolumes, p.trainingSegmentations = [volume], [segmentation]
    audit = load_volume(fake.scene, brats(4, "T1c_subtrMeanDivStd.nii.gz"), "T1c 4")
    p.auditVolumes = [audit]
    p.auditSegmentations = [load_segmentation(fake.scene, brats(4, "brainmask.nii.gz"), audit, "brain 4", "brain")]


def start_waiting_run(fake, panel, seconds: float = 120):
    panel.logic.sceneLogic.client.runner = runner = WaitingRunner(seconds)
    add_training_data(fake, panel._parameterNode)
    assert panel.ui.applyButton.enabled, panel.ui.applyButton.toolTip
    panel.ui.applyButton.click()
    assert not fake.dialogs, fake.dialogs
    [process] = runner.processes
    return panel._run, process


def ended(process, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return process.poll() is not None


def poll_until_finished(panel, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while panel._pollTimer.isActive() and time.monotonic() < deadline:
        panel._pollTimer._fire()
        time.sleep(0.3)
    assert not panel._pollTimer.isActive(), "the run did not finish in time"


# -- defect 1: the Logic under Slicer's base class ------------------------------------------------------------------


def test_logic_constructs_under_slicers_base_class(fake):
    """ScriptedLoadableModuleLogic.__init__ calls super().__init__() bare: no base after it may need arguments."""
    logic = fake.module.PEFTAdaptLogic()
    assert logic.getParameterNode().modelId == "deepbet-brain"
    assert logic.sceneLogic.scene is fake.scene


# -- defect 2: combo boxes, connectors and the method registry ---------------------------------------------------------


def test_combo_boxes_keep_the_models_methods_and_devices_and_follow_the_parameter_node(fake, panel):
    from PEFTAdaptLib.jobs.spec import DEVICES
    from PEFTAdaptLib.methods import method_class, method_names

    ui, p = panel.ui, panel._parameterNode
    models = [ui.modelComboBox.itemData(i) for i in range(ui.modelComboBox.count)]
    assert models == [card["id"] for card in panel.logic.sceneLogic.modelCards()] and "deepbet-brain" in models
    methods = [(ui.methodComboBox.itemData(i), ui.methodComboBox.itemText(i)) for i in range(ui.methodComboBox.count)]
    assert methods == [(name, method_class(name).label) for name in method_names()]
    assert [ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.count)] == list(DEVICES)
    assert ui.methodComboBox.itemData(ui.methodComboBox.currentIndex) == p.method == "sea-peft"

    ui.methodComboBox.setCurrentIndex(ui.methodComboBox.findData("lora"))
    assert p.method == "lora"
    ui.rankComboBox.setCurrentIndex(ui.rankComboBox.findData(8))
    assert p.rank == 8
    p.method = "norm-affine"  # the parameter node drives the widgets, too
    assert ui.methodComboBox.itemData(ui.methodComboBox.currentIndex) == "norm-affine"
    ui.deviceComboBox.setCurrentIndex(1)
    assert p.device == DEVICES[1]
    for name in method_names():  # the budget and rank fields show for the methods that take them
        p.method = name
        cls = method_class(name)
        assert (ui.budgetSlider.visible, ui.budgetCountLabel.visible) == (cls.takes_budget,) * 2, name
        assert ui.rankComboBox.visible == bool(cls.ranks), name
        assert [ui.rankComboBox.itemData(i) for i in range(ui.rankComboBox.count)] == [0, *cls.ranks]
    ui.methodComboBox.setCurrentIndex(ui.methodComboBox.findData("label-free"))
    assert p.rank == 8  # offered by label-free too: kept
    ui.methodComboBox.setCurrentIndex(ui.methodComboBox.findData("sea-peft"))
    assert p.rank == 0  # not offered by sea-peft: dropped
    assert "Model default: 1 %" in ui.budgetCountLabel.text and "21,262 of 2,126,258" in ui.budgetCountLabel.text


def test_models_of_the_model_folder_that_cannot_be_offered_are_said_under_the_model_choice(fake, tmp_path):
    """A model placed in the model folder and missing from the list said nothing in the panel (`peftadapt models`
    gave the reason): the panel now says which and why, under the model choice, and shows nothing when all are
    offered."""
    widget = fake.createWidget()
    try:
        assert widget.ui.unlistedModelsLabel.visible is False
    finally:
        widget.cleanup()
    models = tmp_path / "models"
    shutil.copytree(shared(MESHNET), models / "gwm")
    (models / "gwm" / "model.json").write_text("{")  # cut short
    (models / "registry.json").write_text(json.dumps([{"id": "old", "version": "1", "title": "t", "format": "meshnet",
                                                       "license": "MIT", "source": "s", "path": "../elsewhere"}]))
    widget = fake.createWidget()
    try:
        label, models_offered = widget.ui.unlistedModelsLabel, widget.ui.modelComboBox
        assert label.visible is True and models_offered.findData("gwm") < 0
        lines = label.text.splitlines()
        assert lines[0] == "Not offered from the model folder:" and len(lines) == 3
        assert lines[1].startswith("gwm: ") and "model.json" in lines[1]
        assert "registry.json: invalid registry entry (entry 0.path: '../elsewhere'" in lines[2]
    finally:
        widget.cleanup()
    assert not fake.slotErrors, fake.slotErrors


def test_a_request_takes_only_what_the_method_offers(fake, panel):
    p = panel._parameterNode
    add_training_data(fake, p)
    p.method, p.budgetPercent, p.rank = "lora", 0.5, 4
    export = Path(fake.app.temporaryPath)
    spec = panel.logic.sceneLogic.jobRequest(panel.logic.request(p), export)
    assert (spec.method.rank, spec.method.budget.fraction) == (4, 0.005)
    p.method = "norm-affine"  # takes neither: the values left in the hidden fields are not a request
    spec = panel.logic.sceneLogic.jobRequest(panel.logic.request(p), export)
    assert (spec.method.name, spec.method.rank, spec.method.budget) == ("norm-affine", None, None)



def test_audit_pairs_are_a_list_like_the_training_pairs_and_come_back_with_the_job(fake, panel):
    """Issue 18: one audit volume vouches for itself only, so the panel takes audit pairs of several subjects (it
    took one) and says before a run what one audit volume means; an opened job brings every audit pair back."""
    ui, p = panel.ui, panel._parameterNode
    panel.logic.sceneLogic.client.runner = runner = WaitingRunner()
    cases = {}
    for case in (3, 4, 5):
        volume = load_volume(fake.scene, brats(case, "T1c_subtrMeanDivStd.nii.gz"), f"T1c {case}")
        cases[case] = volume, load_segmentation(fake.scene, brats(case, "brainmask.nii.gz"), volume, f"brain {case}",
                                                "brain")

    def add(case, button):
        ui.pairVolumeSelector.setCurrentNode(cases[case][0])
        ui.pairSegmentationSelector.setCurrentNode(cases[case][1])
        button.click()

    add(3, ui.addPairButton)
    assert ui.trainingTable.rowCount() == 1 and ui.auditTable.rowCount() == 0
    # no audit pair: the job holds out a slab of the training volume, as the browser app and the command line do (an
    # audit pair was required, and a user with one annotated volume gave it as the audit too, which is refused now)
    assert ui.applyButton.enabled and ui.auditAdviceLabel.text.startswith("No audit pair: the run holds out a slab")
    assert "two or more subjects" in ui.auditAdviceLabel.text
    add(4, ui.addAuditPairButton)
    assert ui.applyButton.enabled and ui.auditTable.item(0, 0).text() == "T1c 4"
    assert "One audit volume vouches for itself only" in ui.auditAdviceLabel.text
    add(5, ui.addAuditPairButton)
    add(5, ui.addAuditPairButton)  # a pair already listed is not added twice
    assert [ui.auditTable.item(row, 1).text() for row in range(ui.auditTable.rowCount())] == ["brain 4", "brain 5"]
    assert ui.auditAdviceLabel.text == ""

    ui.applyButton.click()
    assert not fake.dialogs, fake.dialogs
    folder = panel._run.jobDir
    assert [case.name for case in panel._run.job.spec.audit] == ["T1c 4", "T1c 5"]
    assert [case.name for case in panel._run.job.spec.support] == ["T1c 3"]
    panel._run.cancel()
    assert ended(runner.processes[0])
    panel._stopFollowing()

    ui.auditTable.setCurrentCell(0, 0)
    ui.removeAuditPairButton.click()
    assert [v.GetName() for v in p.auditVolumes] == ["T1c 5"] and ui.auditTable.rowCount() == 1

    panel.parent.isEntered = True
    fake.scene.Clear(0)
    p = panel._parameterNode
    panel.logic.openJob(p, folder)
    assert [v.GetName() for v in p.auditVolumes] == ["T1c 4", "T1c 5"] and len(p.auditSegmentations) == 2
    assert ui.auditTable.rowCount() == 2 and [v.GetName() for v in p.trainingVolumes] == ["T1c 3"]

# -- defect 3 and 10: installing what the worker needs ---------------------------------------------------------------


@pytest.fixture
def pytorch_extension(monkeypatch):
    """A stand-in for the PyTorch extension's PyTorchUtils (real only inside Slicer): records installTorch."""
    calls = []

    class PyTorchUtilsLogic:
        @staticmethod
        def torchInstalled():
            return True

        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            calls.append(torchVersionRequirement)
            return types.ModuleType("torch")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    return calls


def only_missing(monkeypatch, missing: dict):
    """Package metadata as on a machine where these distributions are absent (None) or at another version."""
    import importlib.metadata

    real = importlib.metadata.version

    def version(name):
        if name not in missing:
            return real(name)
        if missing[name] is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return missing[name]

    monkeypatch.setattr(importlib.metadata, "version", version)


def test_slicer_510_installs_through_pip_install_with_slicers_packages_pinned(fake, monkeypatch, pytorch_extension):
    """No slicer.packaging before 5.12: the missing requirements are confirmed once and pip-installed with torch,
    numpy, scipy, SimpleITK and requests held at their installed versions."""
    only_missing(monkeypatch, {"nilearn": None})
    assert fake.module.PEFTAdaptLogic().ensureDependencies()
    [(kind, text)] = fake.dialogs
    assert kind == "confirm" and "nilearn>=0.10" not in text
    [arguments] = fake.pipInstalls
    assert arguments[:2] == ["nilearn>=0.10", "--constraint"]
    [constraints] = fake.pipConstraints
    pins = constraints.split()
    from importlib.metadata import version

    assert f"torch=={version('torch')}" in pins and f"numpy=={version('numpy')}" in pins
    assert not Path(arguments[2]).exists()  # a temporary file, removed once pip is done
    fake.dialogs.clear()
    fake.confirmAnswers.append(False)  # declined: Start stops, nothing is installed
    assert not fake.module.PEFTAdaptLogic().ensureDependencies()
    assert len(fake.pipInstalls) == 1


def test_slicer_512_installs_through_slicer_packaging(fake, monkeypatch, pytorch_extension):
    ensured = []
    packaging = types.ModuleType("slicer.packaging")  # Slicer 5.12's module, standing in for its pip machinery
    packaging.pip_ensure = lambda requirements, constraints=None, requester=None, **kw: ensured.append(
        ([str(r) for r in requirements], Path(constraints).read_text(), requester))
    packaging.load_requirements = lambda path: []
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    assert fake.module.PEFTAdaptLogic().ensureDependencies()
    assert not ensured  # everything is installed: nothing to ensure
    only_missing(monkeypatch, {"nilearn": None})
    assert fake.module.PEFTAdaptLogic().ensureDependencies()
    [(requirements, constraints, requester)] = ensured
    assert "monai>=1.3" in requirements and not any(r.startswith("torch") for r in requirements)
    assert requester == "PEFTAdapt" and "numpy==" in constraints and not fake.pipInstalls


def test_the_constraints_file_is_made_only_for_an_install_and_removed_after_it(fake, monkeypatch, pytorch_extension):
    """Found by a user-level check: every Start wrote `constraints.txt` into the work folder, where the job folders
    are, even when nothing was installed (and docs/slicer.md did not say what the file was)."""
    made = []
    real = fake.module.tempfile.NamedTemporaryFile
    monkeypatch.setattr(fake.module.tempfile, "NamedTemporaryFile", lambda *a, **k: made.append(1) or real(*a, **k))
    logic = fake.module.PEFTAdaptLogic()
    assert logic.ensureDependencies()  # everything installed
    assert not made and not fake.pipInstalls and not fake.dialogs
    only_missing(monkeypatch, {"nilearn": None})
    assert logic.ensureDependencies()
    assert len(made) == 1 and len(fake.pipConstraints) == 1 and not Path(fake.pipInstalls[0][2]).exists()
    assert [path.name for path in Path(logic.workFolder()).iterdir()] == []


def test_an_old_torch_is_refused_with_the_versions_named(fake, monkeypatch, pytorch_extension):
    """Defect 10: an installed torch below the requirement stops Start with the two versions and the fix."""
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda *args, **kwargs: None
    packaging.load_requirements = lambda path: []
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    only_missing(monkeypatch, {"torch": "1.13.1+cu117"})
    assert not fake.module.PEFTAdaptLogic().ensureDependencies()
    [(kind, text)] = fake.dialogs
    assert kind == "error" and "1.13.1+cu117" in text and ">=2.1" in text and "PyTorch Utils" in text
    assert not pytorch_extension  # nothing was installed behind the user's back


def test_a_missing_torch_is_installed_through_the_pytorch_extension_with_the_requirement(fake, monkeypatch,
                                                                                           pytorch_extension):
    only_missing(monkeypatch, {"torch": None})
    assert fake.module.PEFTAdaptLogic().ensureDependencies()
    assert pytorch_extension == [">=2.1"]


def test_requirements_agree_with_the_engines_dependencies():
    """What the panel installs in Slicer is what the engine declares, less Slicer's own SimpleITK."""
    import tomllib

    from packaging.requirements import Requirement

    declared = {Requirement(r).name: str(Requirement(r).specifier)
                for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    lines = [line.split("#")[0].strip() for line in (ROOT / "PEFTAdapt/Resources/requirements.txt").open()]
    installed = {Requirement(r).name: str(Requirement(r).specifier) for r in lines if r}
    assert installed == {name: spec for name, spec in declared.items() if name != "SimpleITK"}


# -- defect 5: Segment runs as a polled background job --------------------------------------------------------------


def test_segment_returns_at_once_and_the_timer_follows_the_background_job(fake, panel):
    p = panel._parameterNode
    target = load_volume(fake.scene, brats(6, "T1c_subtrMeanDivStd.nii.gz"), "T1c 6")
    p.targetVolume, p.device = target, "cpu"
    panel.ui.segmentButton.click()
    assert not fake.dialogs, fake.dialogs
    # the click returned while the worker still runs: the GUI is free, the button offers Cancel
    assert panel._pollTimer.isActive() and panel._run is not None and panel._run.job.alive()
    assert panel.ui.applyButton.text == "Cancel" and not panel.ui.segmentButton.enabled
    poll_until_finished(panel)
    assert not fake.dialogs, fake.dialogs
    segmentation = p.outputSegmentation
    assert segmentation is not None and segmentation.GetSegmentation().GetNthSegment(0).GetName() == "brain"
    editor = panel.ui.segmentEditorWidget
    assert (editor._segmentation, editor._source) == (segmentation, target)
    assert (panel.ui.progressBar.value, panel.ui.progressBar.maximum) == (1, 1)
    assert panel.ui.applyButton.text == "Start" and panel.ui.segmentButton.enabled

    # the ranked slice it shows is right as predicted: marking it makes a re-adapt train on it (issue 19)
    ui = panel.ui
    assert ui.nextSliceButton.enabled and not ui.markCheckedButton.enabled
    ui.nextSliceButton.click()
    volume, axis, index, _ = panel._shownSlice
    assert volume is target and f"axial slice {index}" in ui.statusLabel.text and ui.markCheckedButton.enabled
    ui.markCheckedButton.click()
    assert json.loads(segmentation.GetAttribute("PEFTAdapt.checkedSlices")) == [[axis, index]]
    assert "marked as right" in ui.statusLabel.text and not fake.dialogs
    ui.nextSliceButton.click()  # the ranking's second pick covers the volume: the status says why it is shown
    assert panel._shownSlice.reason == "coverage" and "far from every slice checked so far" in ui.statusLabel.text


# -- defect 6: no console window for the worker on Windows ------------------------------------------------------------


def test_the_worker_starts_without_a_console_window_on_windows(fake, panel, monkeypatch):
    """The panel starts its worker through the job client's SubprocessRunner, which hides the console on Windows
    (closing that console would kill the worker). Windows is simulated for the runner module only."""
    from PEFTAdaptLib.jobs import runner as runner_module

    class STARTUPINFO:
        dwFlags, wShowWindow = 0, 1

    started = []

    def popen(command, **options):
        started.append(options)
        return subprocess.Popen([sys.executable, "-c", "pass"], stdout=options["stdout"], stderr=options["stderr"])

    windows = types.SimpleNamespace(STARTUPINFO=STARTUPINFO, STARTF_USESHOWWINDOW=1, SW_HIDE=0,
                                    CREATE_NO_WINDOW=0x08000000, Popen=popen, DEVNULL=subprocess.DEVNULL)
    monkeypatch.setattr(runner_module, "subprocess", windows)
    monkeypatch.setattr(runner_module, "sys", types.SimpleNamespace(platform="win32", executable=sys.executable))
    add_training_data(fake, panel._parameterNode)
    panel.ui.applyButton.click()
    assert not fake.dialogs, fake.dialogs
    [options] = started
    assert options["startupinfo"].wShowWindow == 0 and options["startupinfo"].dwFlags & 1
    assert options["creationflags"] & 0x08000000


# -- defect 7 and 8: cleanup and scene close -------------------------------------------------------------------------


def test_cleanup_cancels_a_running_worker(fake, panel):
    run, process = start_waiting_run(fake, panel)
    assert process.poll() is None and panel._pollTimer.isActive()
    panel.cleanup()  # Slicer closes, or the module is reloaded
    assert ended(process), "the worker outlived the module"
    assert not panel._pollTimer.isActive()
    assert (run.jobDir / "cancel").exists()


def test_closing_the_scene_cancels_a_running_worker_stops_polling_and_lets_go_of_its_nodes(fake, panel):
    run, process = start_waiting_run(fake, panel)
    assert panel.plotWidget.mrmlPlotViewNode() is not None
    panel.parent.isEntered = True
    fake.scene.Clear(0)
    assert ended(process), "the worker kept running after the scene closed"
    assert not panel._pollTimer.isActive() and panel._run is None
    assert panel.plotWidget.mrmlPlotViewNode() is None and panel.ui.unitsTableView.mrmlTableNode() is None
    # a new scene: a new parameter node, and the next run's charts are shown through a view node of that scene
    assert panel._parameterNode is not None and panel._parameterNode.trainingVolumes == []
    start_waiting_run(fake, panel)
    assert fake.scene.IsNodePresent(panel.plotWidget.mrmlPlotViewNode())


def test_closing_the_scene_leaves_a_finished_run_alone(fake, panel):
    """A finished worker is not signalled (its PID may belong to another process by now)."""
    run, process = start_waiting_run(fake, panel, seconds=0)
    assert ended(process)
    poll_until_finished(panel, seconds=30)
    fake.dialogs.clear()
    fake.scene.Clear(0)
    assert not (run.jobDir / "cancel").exists()


# -- defect 9: the embedded Segment Editor's lifecycle -----------------------------------------------------------------


def test_the_embedded_segment_editor_is_set_up_and_released_like_segment_editors_own(fake, panel):
    editors = fake.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    editors.SetSingletonTag("SegmentEditor")  # the Segment Editor module's node: not the panel's to use
    editor = panel.ui.segmentEditorWidget
    panel.parent.isEntered = True
    panel.enter()
    assert editor._editorNode is not editors and editor._editorNode.GetSingletonTag() == "PEFTAdaptSegmentEditor"
    assert editor._shortcuts and editor._viewObservations
    editor.setActiveEffect("Paint")
    panel.exit()
    assert editor._activeEffect is None and not editor._shortcuts and not editor._viewObservations
    panel.enter()
    editor.setSegmentationNode(fake.scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))
    fake.scene.Clear(0)
    assert editor._segmentation is None
    assert fake.scene.IsNodePresent(editor._editorNode)  # a fresh node of the new scene after it closed


# -- defect 11: the self-test split, and defect 4 / 12 in a Slicer without the packages --------------------------------


def bare_slicer_python(tmp_path: Path) -> list[str]:
    """A Python that sees only what Slicer ships before PEFTAdapt's first Start: the standard library, numpy,
    SimpleITK, packaging, requests, VTK and slicer (slicer-core): no torch, MONAI, nibabel, scipy or psutil."""
    import importlib.util

    site = tmp_path / "slicer-site"
    site.mkdir()
    for name in ("slicer", "slicer_core", "slicer_layer_dm", "vtkmodules", "numpy", "SimpleITK", "packaging",
                 "requests", "vtk"):
        spec = importlib.util.find_spec(name)
        if spec is None:  # slicer_layer_dm: installed with the web extra, where `import slicer` loads it
            continue
        origin = Path(spec.origin)
        source = origin.parent if origin.name == "__init__.py" else origin
        (site / source.name).symlink_to(source)
        for extra in source.parent.glob(f"{name}*.libs"):
            (site / extra.name).symlink_to(extra)
    for dist in ("numpy", "packaging"):
        info = next(Path(importlib.util.find_spec(dist).origin).parent.parent.glob(f"{dist}-*.dist-info"))
        (site / info.name).symlink_to(info)
    return [sys.executable, "-S", "-c", f"import sys; sys.path[1:1] = [{str(site)!r}, {str(TESTING)!r}]; exec("
            "open(sys.argv[1]).read())"]


def run_in_slicer(tmp_path: Path, script: str, python: list[str] | None = None) -> dict:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(script))
    environment = {**os.environ, "PEFTADAPT_MODELS": str(tmp_path / "models"), "PEFTADAPT_HOME": str(tmp_path / "h")}
    environment.pop("PYTHONPATH", None)
    command = (python or [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(TESTING)!r}); exec("
                                                "open(sys.argv[1]).read())"]) + [str(path)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=environment, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PANEL_SETUP = """
    import json, sys, unittest
    from slicer_scene import new_scene
    from slicer_qt_fake import SlicerQtFake
    fake = SlicerQtFake(new_scene(), "slicer-temp", version=VERSION)
    module = fake.loadModule()
    widget = fake.createWidget()
"""


def test_the_fast_self_test_needs_no_torch_and_no_download_and_the_long_one_skips_saying_why(tmp_path):
    """In a Slicer without PEFTAdapt's packages: the panel loads (nothing imports torch), the fast self-test passes
    and the adaptation test is skipped with the missing packages named — in place of downloading MRHead and
    sleeping on the GUI thread."""
    result = run_in_slicer(tmp_path, PANEL_SETUP.replace("VERSION", "(5, 10)") + """
    outcome = unittest.TextTestRunner(stream=open("self-test.log", "w"), verbosity=2).run(
        unittest.TestLoader().loadTestsFromTestCase(module.PEFTAdaptTest))
    print(json.dumps({"run": outcome.testsRun, "problems": [str(t) + r for t, r in outcome.errors + outcome.failures],
                      "skipped": [r for _t, r in outcome.skipped], "torch": "torch" in sys.modules,
                      "device": widget.ui.deviceInfoLabel.text, "slot errors": [str(e) for e in fake.slotErrors]}))
    """, python=bare_slicer_python(tmp_path))
    assert result["run"] == 2 and not result["problems"], result["problems"]
    [reason] = result["skipped"]
    assert reason.startswith("needs torch>=2.1") and "monai" in reason
    assert not result["torch"] and not result["slot errors"]
    assert result["device"].startswith("PyTorch is not installed yet")


def test_setting_up_the_panel_imports_no_torch_into_slicers_process(tmp_path):
    """Defect 12: with torch installed, the device line comes from package metadata; torch stays out of Slicer's
    process (importing it loads CUDA and blocks a later upgrade)."""
    from importlib.metadata import version

    result = run_in_slicer(tmp_path, PANEL_SETUP.replace("VERSION", "(5, 10)") + """
    print(json.dumps({"torch": "torch" in sys.modules, "device": widget.ui.deviceInfoLabel.text}))
    """)
    assert not result["torch"]
    assert result["device"].startswith(f"PyTorch {version('torch')} (")


def test_an_older_slicer_loads_the_module_and_shows_what_to_install(tmp_path):
    """Defect 4: Slicer 5.8 (Python 3.9) gets a module that loads and says it needs 5.10, not a traceback; the
    engine is not imported there."""
    result = run_in_slicer(tmp_path, PANEL_SETUP.replace("VERSION", "(5, 8)") + """
    [label] = widget.layout._widgets
    print(json.dumps({"engine": any(m.startswith("PEFTAdaptLib") for m in sys.modules), "label": label.text,
                      "help": fake.moduleObject.helpText, "widget": type(widget).__name__}))
    """, python=bare_slicer_python(tmp_path))
    assert not result["engine"] and result["widget"] == "PEFTAdaptUnsupportedWidget"
    assert "needs 3D Slicer 5.10 or later" in result["label"] and "this is Slicer 5.8" in result["label"]
    assert result["help"].startswith(result["label"])


# -- the panel's own features: trust confirmation, run information --------------------------------------------------


def scripted_model(folder: Path) -> Path:
    import torch
    from torch import nn

    from PEFTAdaptLib.models.card import LabelInfo, ModelCard

    folder.mkdir(parents=True)
    torch.jit.save(torch.jit.script(nn.Conv3d(1, 2, 1)), str(folder / "model.ts"))
    ModelCard(id=folder.name, title="scripted model", description="a TorchScript test model", modality="MR",
              input_channels=1, spacing=None, orientation="", normalization={"name": "zscore"},
              patch_size=(16, 16, 16), inference_roi=(16, 16, 16),
              labels=[LabelInfo(0, "background"), LabelInfo(1, "cord")], license="test", source="test",
              ).save(folder / "model.card.json")
    return folder / "model.ts"


def test_a_torchscript_model_folder_loads_only_after_the_user_trusts_the_named_file(fake, panel, tmp_path):
    from PEFTAdaptLib.models.safe_load import sha256_file
    from PEFTAdaptLib.models.trust import is_trusted

    network = scripted_model(tmp_path / "scripted")
    digest = sha256_file(network)
    fake.folderAnswers.append(str(network.parent))
    fake.confirmAnswers.append(False)
    panel.ui.loadModelFolderButton.click()
    [(kind, text)] = fake.dialogs
    assert kind == "confirm" and str(network) in text and digest in text
    assert not is_trusted(digest) and panel.ui.modelComboBox.findData("scripted") < 0
    fake.folderAnswers.append(str(network.parent))
    panel.ui.loadModelFolderButton.click()  # confirmed this time
    assert is_trusted(digest)
    assert panel._parameterNode.modelId == "scripted"
    assert panel.ui.modelComboBox.itemData(panel.ui.modelComboBox.currentIndex) == "scripted"
    assert "a TorchScript test model" in panel.ui.modelDescriptionLabel.text


def test_the_run_shows_trainable_parameters_rank_and_budget_choice_and_takes_the_adapter(fake, panel, deepbet,
                                                                                        tmp_path):
    """The worker's protocol written into the job folder as the worker writes it; the panel shows RunState."""
    from PEFTAdaptLib.adapters import LoRAConfig, add_units, save_adapters, unit_class_for
    from PEFTAdaptLib.adapters.base import base_layer_names
    from PEFTAdaptLib.jobs.events import EventLog

    run, process = start_waiting_run(fake, panel)
    log = EventLog(run.jobDir, echo=False)
    log({"event": "started", "task": "adapt", "steps": 40, "method": "lora", "rank": 4, "trainable": 21000,
         "total": 2126258, "rank_reason": "rank 4: the largest that fits the budget",
         "budget_reason": "1 % of the model's parameters = 21,262 of 2,126,258"})
    log({"event": "audit", "step": 0, "dice": 0.91})
    log({"event": "step", "step": 20, "steps": 40, "loss": 0.25, "eta_s": 30})
    log({"event": "audit", "step": 20, "dice": 0.95})
    panel._pollTimer._fire()
    ui = panel.ui
    assert ui.runInfoLabel.text.split("\n") == [
        "21,000 of 2,126,258 parameters (0.99 %)", "rank 4: the largest that fits the budget",
        "1 % of the model's parameters = 21,262 of 2,126,258"]
    assert (ui.progressBar.value, ui.progressBar.maximum) == (20, 40)
    assert ui.statusLabel.text == "Training, step 20/40, about 0 min 30 s left, loss 0.250"
    assert "best 0.950 (zero-shot 0.910)" in ui.bestDiceLabel.text
    assert "[audit] step=20, dice=0.95" in ui.logTextEdit.toPlainText()
    # after the last step: the final audits and sweep, then the predictions (it said "Training, … 0 s left")
    log({"event": "step", "step": 40, "steps": 40, "loss": 0.2, "eta_s": 0})
    log({"event": "phase", "phase": "choosing", "step": 40})
    panel._pollTimer._fire()
    assert ui.statusLabel.text == "Choosing the state to keep, step 40/40, loss 0.200"
    assert ui.progressBar.format == "choosing %v/%m"
    config = LoRAConfig(r=1, alpha=1)  # a real adapter of the run's model, as the worker leaves it
    add_units(deepbet.network, config, unit_class_for(config), "lora",
              layers=base_layer_names(deepbet.network, unit_class_for(config).layer_types)[:2])
    save_adapters(deepbet.network, run.jobDir / "adapter", deepbet.base_fingerprint, {"model": "deepbet-brain"})
    log({"event": "finished", "adapter": "adapter", "best_dice": 0.95, "exit_code": 0})
    log.close()
    panel._pollTimer._fire()
    assert not panel._pollTimer.isActive() and ui.applyButton.text == "Start"
    assert panel._parameterNode.adapterFolder == str(run.jobDir / "adapter")
    assert ui.readaptButton.enabled and not fake.dialogs
    process.kill()

    # Load adapter takes the job's folder for its adapter; Save adapter then copies the adapter, not the job's inputs
    panel._parameterNode.adapterFolder = ""
    fake.folderAnswers.append(str(run.jobDir))
    ui.loadAdapterButton.click()
    assert panel._parameterNode.adapterFolder == str(run.jobDir / "adapter") and not fake.dialogs
    fake.folderAnswers.append(str(tmp_path / "saved"))
    ui.saveAdapterButton.click()
    assert sorted(f.name for f in (tmp_path / "saved").iterdir()) == ["adapter.json", "adapter.safetensors"]


def test_a_failed_run_is_reported_once_and_the_panel_can_start_again(fake, panel):
    from PEFTAdaptLib.jobs.events import EventLog

    run, process = start_waiting_run(fake, panel)
    log = EventLog(run.jobDir, echo=False)
    log({"event": "failed", "message": "out of memory: use a smaller patch or the CPU", "exit_code": 3})
    log.close()
    panel._pollTimer._fire()
    assert fake.dialogs == [("error", "Failed: out of memory: use a smaller patch or the CPU")]
    assert not panel._pollTimer.isActive() and panel.ui.applyButton.text == "Start" and panel.ui.applyButton.enabled
    assert panel._parameterNode.adapterFolder == ""
    process.kill()


# -- issue 17, point 8: a job whose worker died is shown as interrupted, and resumes from the panel ------------------


def test_a_killed_job_is_listed_interrupted_resumes_from_its_checkpoint_and_opens_in_a_new_scene(fake, panel):
    import signal

    from PEFTAdaptLib.jobs import read_events

    p = panel._parameterNode
    add_training_data(fake, p)
    p.steps, p.patchSize = 30, 64  # a checkpoint at step 20 (TrainSpec's checkpoint_every)
    panel.ui.applyButton.click()
    assert not fake.dialogs, fake.dialogs
    run = panel._run
    assert panel.ui.jobsTable.rowCount() == 1  # listed as soon as it starts
    deadline = time.monotonic() + 600
    while not any(e["event"] == "step" and e["step"] >= 22 for e in read_events(run.jobDir, 0)[0]):
        assert time.monotonic() < deadline and run.job.process.poll() is None, "the worker did not reach step 22"
        time.sleep(0.5)
    os.kill(run.job.process.pid, signal.SIGKILL)  # Slicer crashed, or the computer was switched off
    run.job.process.wait(timeout=60)
    panel._stopFollowing()  # what a restarted Slicer starts from: no run followed

    ui = panel.ui
    ui.refreshJobsButton.click()
    assert ui.jobsTable.rowCount() == 1 and ui.jobsTable.item(0, 0).text() == run.jobDir.name
    assert ui.jobsTable.item(0, 2).text() == "interrupted"
    assert "stopped at step" in ui.jobsTable.item(0, 2).toolTip() and ui.resumeJobButton.enabled

    ui.jobsTable.setCurrentCell(0, 0)
    ui.resumeJobButton.click()
    assert not fake.dialogs, fake.dialogs
    assert ui.applyButton.text == "Cancel"  # the resumed worker is followed like a new run
    poll_until_finished(panel)
    assert not fake.dialogs, fake.dialogs
    started = [e for e in read_events(run.jobDir, 0)[0] if e["event"] == "started"]
    assert len(started) == 2 and started[-1]["resumed_from_step"] == 20
    assert ui.jobsTable.item(0, 2).text() == "finished" and ui.jobsTable.item(0, 3).text() == "30/30"
    assert p.adapterFolder == str(run.jobDir / "adapter")

    # a finished job cannot be resumed; it opens in a new scene with its cases and settings
    ui.jobsTable.setCurrentCell(0, 0)
    ui.resumeJobButton.click()
    [(kind, text)] = fake.dialogs
    assert kind == "error" and text.startswith("Failed to resume the job.") and "the job is finished" in text
    assert len(fake.slotErrors) == 1  # tryWithErrorDisplay re-raises: Slicer prints it in the Python console
    fake.dialogs.clear(), fake.slotErrors.clear()
    panel.parent.isEntered = True
    fake.scene.Clear(0)
    p = panel._parameterNode
    assert p.trainingVolumes == [] and p.adapterFolder == ""
    ui.jobsTable.setCurrentCell(0, 0)
    ui.openJobButton.click()
    assert not fake.dialogs, fake.dialogs
    assert [v.GetName() for v in p.trainingVolumes] == ["T1c 3"] and len(p.trainingSegmentations) == 1
    assert (p.steps, p.patchSize, p.method) == (30, 64, run.job.spec.method.name)
    poll_until_finished(panel, seconds=30)
    assert p.adapterFolder == str(run.jobDir / "adapter") and not fake.dialogs


# -- the user-level check of the panel (docs/slicer.md): results, rounds, restored scenes, reopened jobs ---------------

MESHNET = "meshnet/model5_gw_ae"


def load_meshnet(fake, panel, folder=None):
    fake.folderAnswers.append(str(folder or shared(MESHNET)))
    panel.ui.loadModelFolderButton.click()
    assert not fake.dialogs, fake.dialogs


def world_bounds(node) -> list[float]:
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return bounds


def exported(panel, segmentation, volume, path):
    """The label a job would train on: the segmentation written onto its volume's grid, as a re-adapt writes it."""
    import numpy as np
    import SimpleITK as sitk

    from PEFTAdaptLib.mrml.scene_io import labels_from_card, write_segmentation_as_labelmap

    labels = labels_from_card(panel.logic.sceneLogic.card(panel._parameterNode.modelId)["labels"])
    return sitk.GetArrayFromImage(sitk.ReadImage(str(write_segmentation_as_labelmap(segmentation, volume, labels,
                                                                                    path)))).astype(np.uint8)


def test_a_result_its_overlay_and_next_slice_follow_the_volumes_transform_and_export_back_as_predicted(
        fake, panel, thin, tmp_path):
    """Found by a user-level check: with the volume under a registration transform, the segmentation and the
    uncertainty overlay came in without it (drawn 40 mm off), "Next slice to check" moved the views outside the
    volume, and the unedited result exported back onto its volume (what a Re-adapt trains on) lost every voxel."""
    import numpy as np
    import SimpleITK as sitk
    import vtk

    from PEFTAdaptLib.uncertainty import companion_paths

    ui, p, scene = panel.ui, panel._parameterNode, fake.scene
    load_meshnet(fake, panel)
    volume = load_volume(scene, thin / "thin.nii.gz", "T1 moved")
    registration = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 40.0)
    shift.SetElement(1, 3, -25.0)
    registration.SetMatrixTransformToParent(shift)
    volume.SetAndObserveTransformNodeID(registration.GetID())
    p.targetVolume, p.device = volume, "cpu"
    ui.segmentButton.click()
    poll_until_finished(panel)
    assert not fake.dialogs, fake.dialogs
    segmentation = p.outputSegmentation
    [overlay] = panel._checkedRun.uncertaintyNodes
    assert segmentation.GetParentTransformNode() is registration and overlay.GetParentTransformNode() is registration
    assert np.allclose(world_bounds(overlay), world_bounds(volume), atol=1e-3)
    inside = world_bounds(volume)
    seg_bounds = world_bounds(segmentation)
    assert all(inside[2 * i] - 1e-3 <= seg_bounds[2 * i] <= seg_bounds[2 * i + 1] <= inside[2 * i + 1] + 1e-3
               for i in range(3)), (seg_bounds, inside)

    slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    slice_node.SetLayoutName("Red")
    ui.nextSliceButton.click()
    prediction = segmentation.GetAttribute("PEFTAdapt.startedFrom")
    ranking = json.loads(companion_paths(Path(prediction))["slices"].read_text())["planes"]["axial"]["slices"]
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    local = ijk_to_ras.MultiplyPoint([*map(float, ranking[0]["at"]), 1.0])[:3]
    centre = [slice_node.GetSliceToRAS().GetElement(i, 3) for i in range(3)]
    assert np.allclose(centre, [local[0] + 40.0, local[1] - 25.0, local[2]], atol=1e-3)

    predicted = sitk.GetArrayFromImage(sitk.ReadImage(prediction))
    again = exported(panel, segmentation, volume, tmp_path / "again.nrrd")
    assert (predicted > 0).sum() > 1000 and np.array_equal(again, predicted)


def test_readapt_rounds_keep_the_corrected_segmentation_and_train_on_every_rounds_corrections(
        fake, panel, thin, tmp_path):
    """Found by a user-level check: Re-adapt loaded the next prediction into the segmentation the clinician had just
    corrected (the correction was gone from the scene), the next round trained on the newest correction only, and
    the corrected pair left in the training list refused a plain Start afterwards ("the prediction as it was")."""
    import numpy as np
    import SimpleITK as sitk

    from PEFTAdaptLib.data.transforms import from_array, to_array
    from PEFTAdaptLib.mrml.scene_io import import_prediction, labels_from_card

    ui, p, scene = panel.ui, panel._parameterNode, fake.scene
    load_meshnet(fake, panel)
    labels = labels_from_card(panel.logic.sceneLogic.card(p.modelId)["labels"])
    volume = load_volume(scene, thin / "thin.nii.gz", "T1")
    drawn = load_segmentation(scene, thin / "thin_label.nii.gz", volume, "drawn", "White Matter")
    p.trainingVolumes, p.trainingSegmentations = [volume], [drawn]
    p.method, p.steps, p.patchSize, p.device, p.targetVolume = "bitfit", 1, 32, "cpu", volume

    def correct(segmentation, k):
        """The user paints white matter into a block of axial slice k, as with the Segment Editor."""
        path = tmp_path / f"edit{k}.nrrd"
        exported(panel, segmentation, volume, path)
        image = sitk.ReadImage(str(path))
        array = to_array(image, np.uint8)
        array[60:120, 10:30, k] = 1
        sitk.WriteImage(from_array(array, image), str(path))
        import_prediction(scene, path, volume, labels, "edited", segmentation)
        return exported(panel, segmentation, volume, tmp_path / f"as_corrected{k}.nrrd")

    def trained_slices(run):
        spec = json.loads((run.jobDir / "job.json").read_text())
        return [np.flatnonzero(to_array(sitk.ReadImage(str(run.jobDir / case["annotated"])), np.uint8)
                               .any(axis=(0, 1))).tolist() if case.get("annotated") else "whole"
                for case in spec["support"]]

    ui.applyButton.click()
    poll_until_finished(panel)
    first = p.outputSegmentation
    first_prediction = first.GetAttribute("PEFTAdapt.startedFrom")
    as_corrected = correct(first, 5)
    ui.readaptButton.click()
    poll_until_finished(panel)
    assert not fake.dialogs, fake.dialogs
    second = p.outputSegmentation
    assert second is not first and second.GetName() == "T1 bitfit segmentation round 2"
    assert first.GetName() == "T1 bitfit segmentation" and first.GetAttribute("PEFTAdapt.startedFrom") == \
        first_prediction
    assert np.array_equal(exported(panel, first, volume, tmp_path / "first.nrrd"), as_corrected)  # as the user left it
    assert panel.ui.segmentEditorWidget._segmentation is second
    assert list(p.trainingSegmentations) == [drawn]  # the training list is the user's, as they made it
    assert trained_slices(panel._checkedRun) == ["whole", [5]]

    correct(second, 15)
    ui.readaptButton.click()
    poll_until_finished(panel)
    assert not fake.dialogs, fake.dialogs
    assert trained_slices(panel._checkedRun) == ["whole", [5], [15]]  # round 1's correction still trains
    assert p.outputSegmentation.GetName() == "T1 bitfit segmentation round 3"

    third = p.outputSegmentation
    as_corrected = correct(third, 20)  # corrected, then a plain Start (the pairs of the training list only)
    ui.applyButton.click()
    assert not fake.dialogs, fake.dialogs
    assert trained_slices(panel._run) == ["whole"]
    poll_until_finished(panel)
    fresh = p.outputSegmentation  # its result comes into a node of its own: the correction is not overwritten
    assert fresh is not third and fresh.GetName() == "T1 bitfit segmentation_1"
    assert np.array_equal(exported(panel, third, volume, tmp_path / "third.nrrd"), as_corrected)
    ui.applyButton.click()  # nothing corrected since: the next result is read into the same node
    poll_until_finished(panel)
    assert p.outputSegmentation is fresh


def test_the_dice_line_says_what_the_command_line_says_once_a_run_ends_and_the_kept_state_is_its_own_series(
        fake, panel):
    """Found by a user-level check: when no audit gain was reliable and the source model was kept, the panel's Dice
    line still read 'best 0.950' (a state not delivered) and never showed the kept Dice, the gain or its lower bound;
    the kept state was drawn as one more point of the audit series."""
    from PEFTAdaptLib.jobs.events import EventLog

    run, process = start_waiting_run(fake, panel)
    log = EventLog(run.jobDir, echo=False)
    log({"event": "started", "task": "adapt", "steps": 40, "method": "lora", "trainable": 21000, "total": 2126258})
    log({"event": "audit", "step": 0, "dice": 0.91})
    log({"event": "audit", "step": 20, "dice": 0.95, "gain": 0.04, "gain_low": -0.01, "gain_high": 0.09,
         "reliable": False})
    panel._pollTimer._fire()
    assert panel.ui.bestDiceLabel.text == "Audit Dice: current 0.950, best 0.950 (zero-shot 0.910)"
    log({"event": "validation", "step": 40, "dice": 0.91, "gain": 0.0, "gain_low": -0.02, "kept": "start",
         "classes": {"White Matter": 0.93, "Grey Matter": 0.89},
         "message": "no reliable gain on the audit: the source model is kept"})
    (run.jobDir / "adapter").mkdir()
    log({"event": "finished", "adapter": "adapter", "kept": "start", "exit_code": 0,
         "message": "no reliable gain on the audit: the source model is kept"})
    log.close()
    panel._pollTimer._fire()
    assert panel.ui.bestDiceLabel.text.split("\n") == [
        "audit Dice: start 0.9100, kept 0.9100 — audit Dice +0.0 points (95 % lower bound -2.0)",
        "audit Dice per class: White Matter 0.9300, Grey Matter 0.8900"]
    assert run.state.dice_text in panel.ui.bestDiceLabel.text and "best" not in panel.ui.bestDiceLabel.text
    chart = run.monitor.chart
    names = [fake.scene.GetNodeByID(chart.GetNthPlotSeriesNodeID(i)).GetName()
             for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert "kept state" in names and run.monitor.dice_values() == [(0, 0.91), (20, 0.95)]
    process.kill()


def test_a_saved_scene_loads_its_folder_model_again_and_start_says_why_when_it_cannot(thin, tmp_path, monkeypatch):
    """Found by a user-level check: a scene saved with a model loaded from a folder reopened (a restarted Slicer)
    with an empty model box and "unknown model", yet Start was enabled and failed; the parameter node kept the
    model's id only."""
    import shutil

    monkeypatch.setenv("PEFTADAPT_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("PEFTADAPT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    folder = tmp_path / "model5_gw_ae"
    shutil.copytree(shared(MESHNET), folder)
    mrml = tmp_path / "saved" / "scene.mrml"
    mrml.parent.mkdir()

    def session(scene):
        fake = SlicerQtFake(scene, tmp_path / "slicer-temp")
        fake.loadModule()
        return fake, fake.createWidget()

    fake, panel = session(new_scene())
    try:
        load_meshnet(fake, panel, folder)
        p = panel._parameterNode
        volume = load_volume(fake.scene, thin / "thin.nii.gz", "T1")
        segmentation = load_segmentation(fake.scene, thin / "thin_label.nii.gz", volume, "drawn", "White Matter")
        p.trainingVolumes, p.trainingSegmentations = [volume], [segmentation]
        storage = segmentation.CreateDefaultStorageNode()
        fake.scene.AddNode(storage)
        segmentation.SetAndObserveStorageNodeID(storage.GetID())
        storage.SetFileName(str(mrml.parent / "drawn.seg.nrrd"))
        assert storage.WriteData(segmentation)
        fake.scene.SetURL(str(mrml))
        fake.scene.SetRootDirectory(str(mrml.parent))
        assert fake.scene.Commit()
    finally:
        panel.cleanup()
        fake.close()

    def restored():
        scene = new_scene()
        fake, panel = session(scene)
        scene.SetURL(str(mrml))
        assert scene.Connect()
        panel.parent.isEntered = True
        panel.initializeParameterNode()
        return fake, panel

    fake, panel = restored()  # a restarted Slicer opens the saved scene
    try:
        ui = panel.ui
        assert panel._parameterNode.modelId == "model5_gw_ae"
        assert ui.modelComboBox.itemData(ui.modelComboBox.currentIndex) == "model5_gw_ae"
        assert "White Matter" in ui.modelDescriptionLabel.text and ui.applyButton.enabled, ui.applyButton.toolTip
    finally:
        panel.cleanup()
        fake.close()

    shutil.rmtree(folder)  # the model folder moved away
    fake, panel = restored()
    try:
        ui = panel.ui
        assert not ui.applyButton.enabled
        assert "model5_gw_ae" in ui.applyButton.toolTip and f"{folder} is missing" in ui.applyButton.toolTip
        assert "Load model from folder" in ui.applyButton.toolTip
    finally:
        panel.cleanup()
        fake.close()


def test_resume_and_open_show_the_scenes_own_nodes_and_load_a_file_the_job_holds_twice_once(fake, panel):
    """Found by a user-level check: every Resume of a job loaded its cases again as new nodes (the same volume twice
    when it was also the volume to segment) and moved the training pairs onto the copies, so edits of the original
    segmentation were no longer used."""
    from PEFTAdaptLib.jobs.events import EventLog

    ui, p, scene = panel.ui, panel._parameterNode, fake.scene
    panel.logic.sceneLogic.client.runner = runner = WaitingRunner()
    add_training_data(fake, p)
    volume, segmentation, audit = p.trainingVolumes[0], p.trainingSegmentations[0], p.auditVolumes[0]
    p.targetVolume = volume

    def counts():
        return {kind: scene.GetNodesByClass(kind).GetNumberOfItems()
                for kind in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode")}

    def cancel():
        """Cancel, and the job says so as its worker would (the waiting process writes nothing)."""
        log = EventLog(panel._run.jobDir, echo=False)
        log({"event": "cancelled", "step": 0})
        log.close()
        ui.applyButton.click()
        assert ended(runner.processes[-1])
        poll_until_finished(panel, seconds=30)
        assert not fake.dialogs, fake.dialogs

    before = counts()
    ui.applyButton.click()
    assert not fake.dialogs, fake.dialogs
    for resume in range(2):
        cancel()
        ui.refreshJobsButton.click()
        ui.jobsTable.setCurrentCell(0, 0)
        ui.resumeJobButton.click()
        assert not fake.dialogs, fake.dialogs
        assert len(runner.processes) == resume + 2 and counts() == before
        assert (list(p.trainingVolumes), list(p.trainingSegmentations), list(p.auditVolumes), p.targetVolume) == \
            ([volume], [segmentation], [audit], volume)
    cancel()

    panel.parent.isEntered = True
    fake.scene.Clear(0)  # a new scene: the job's files are loaded, the volume it trains on and segments once
    p = panel._parameterNode
    ui.refreshJobsButton.click()
    ui.jobsTable.setCurrentCell(0, 0)
    ui.openJobButton.click()
    assert not fake.dialogs, fake.dialogs
    assert sorted(node.GetName() for node in (scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetItemAsObject(i)
                  for i in range(scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems()))) == \
        ["T1c 3", "T1c 4"]
    assert p.targetVolume is p.trainingVolumes[0]
    poll_until_finished(panel, seconds=30)


def test_closing_the_scene_and_a_new_segment_leave_no_label_of_the_last_run(fake, panel):
    """Found by a user-level check: after File → Close scene under a running job the panel still said 'Training,
    step 120/400 …' with the progress bar at 120/400 and a Cancel button; pressing Segment after an adaptation kept
    the adaptation's (failed) Dice line next to the segmentation's status."""
    from PEFTAdaptLib.jobs.events import EventLog

    ui = panel.ui
    run, process = start_waiting_run(fake, panel)
    log = EventLog(run.jobDir, echo=False)
    log({"event": "started", "task": "adapt", "steps": 400, "method": "lora", "trainable": 21000, "total": 2126258})
    log({"event": "audit", "step": 0, "dice": 0.91})
    log({"event": "step", "step": 120, "steps": 400, "loss": 0.3, "eta_s": 600})
    log.close()
    panel._pollTimer._fire()
    assert ui.progressBar.value == 120 and ui.bestDiceLabel.text and ui.applyButton.text == "Cancel"
    fake.scene.Clear(0)  # the module is not entered: nothing re-initialises the panel afterwards
    assert ended(process)
    assert ui.statusLabel.text == "Cancelled (scene closed)" and ui.progressBar.value == 0
    assert ui.bestDiceLabel.text == "" and ui.runInfoLabel.text == "" and ui.applyButton.text == "Start"

    panel.initializeParameterNode()
    run, process = start_waiting_run(fake, panel)
    log = EventLog(run.jobDir, echo=False)
    log({"event": "audit", "step": 0, "dice": 0.91})
    log({"event": "failed", "message": "out of memory", "exit_code": 3})
    log.close()
    panel._pollTimer._fire()
    fake.dialogs.clear()
    process.kill()
    panel._parameterNode.targetVolume = panel._parameterNode.trainingVolumes[0]
    ui.segmentButton.click()
    assert not fake.dialogs, fake.dialogs
    assert ui.bestDiceLabel.text == "" and ui.statusLabel.text.startswith("Starting")
    panel._run.cancel()


def test_the_volume_selectors_offer_no_label_map_and_a_label_map_given_as_the_image_is_refused(fake, panel):
    """Found by a user-level check: a label map volume was offered as a training volume and as the volume to
    segment (Slicer's node combo box lists subclasses), and a run trained on it as the image without a word."""
    from PEFTAdaptLib.mrml.scene_io import SceneError

    ui, p = panel.ui, panel._parameterNode
    add_training_data(fake, p)
    labelmap = fake.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "mask")
    labelmap.SetAndObserveImageData(p.trainingVolumes[0].GetImageData())
    for selector in (ui.pairVolumeSelector, ui.targetVolumeSelector):
        assert selector.hideChildNodeTypes == ["vtkMRMLLabelMapVolumeNode"]
        selector.setCurrentNode(labelmap)
        assert selector.currentNode() is None
        selector.setCurrentNode(p.trainingVolumes[0])
        assert selector.currentNode() is p.trainingVolumes[0]
    p.trainingVolumes = [labelmap]  # set from Python, past the selector
    with pytest.raises(SceneError, match=r"volume 'mask' \(training pair 1\) is a label map, not an image"):
        panel.logic.startAdaptation(p)
    assert panel.logic.sceneLogic.adaptationJobs() == []


def test_a_label_map_volume_in_another_numbering_becomes_a_segmentation_in_the_models_classes_through_a_label_map(
        fake, panel, tmp_path):
    """Found by a user-level check: FreeSurfer's aseg, which Slicer loads as a label map volume, could not be an
    annotation in the panel (its selector offered segmentations only, and an aseg made a segmentation holds dozens of
    segments named by FreeSurfer's table, which match no class), while the command line and the browser app map it
    with a label map."""
    from PEFTAdaptLib.data.io import read_image
    from PEFTAdaptLib.jobs import load_job
    from PEFTAdaptLib.mrml.scene_io import labels_from_card, read_labelmap, read_volume, write_segmentation_as_labelmap

    ui, p = panel.ui, panel._parameterNode
    panel.logic.sceneLogic.client.runner = WaitingRunner()
    card = panel.logic.sceneLogic.registerModelFolder(str(shared("meshnet/model5_gw_ae")))
    panel.logic.selectModel(p, card["id"])
    norm, aseg_file = shared("freesurfer/bert/norm.mgz"), shared("freesurfer/bert/aseg.mgz")
    volume = read_volume(fake.scene, norm, "norm")
    aseg = read_labelmap(fake.scene, aseg_file, "aseg")
    assert not ui.labelMapPathLineEdit.visible  # shown for a label map volume only
    ui.pairVolumeSelector.setCurrentNode(volume)
    ui.pairSegmentationSelector.setCurrentNode(aseg)
    assert ui.pairSegmentationSelector.currentNode() is aseg  # offered beside the segmentations
    assert ui.labelMapPathLineEdit.visible and ui.labelMapLabel.visible

    def add(button=ui.addPairButton):
        fake.dialogs.clear()
        fake.slotErrors.clear()  # tryWithErrorDisplay shows the error and raises it (PythonQt prints it)
        ui.pairSegmentationSelector.setCurrentNode(aseg)
        button.click()
        return [text for kind, text in fake.dialogs if kind == "error"]

    [error] = add()  # aseg's own values: refused in one line naming the node, pointing to the label map
    assert "label map volume 'aseg': label values [3, 4, 5, 7, 8, 10, 11, 12, … (42 values)] are not " in error
    assert "the label map of the browser app or the Slicer panel" in error and "/tmp" not in error
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"Cortex": [3, 42]}')
    ui.labelMapPathLineEdit.currentPath = str(wrong)
    [error] = add()
    assert f"{wrong}: 'Cortex' is not a class of model 'model5_gw_ae'" in error
    assert ui.trainingTable.rowCount() == 0

    ui.labelMapPathLineEdit.currentPath = str(ROOT / "bench" / "freesurfer_gw.json")
    assert add() == [] and not fake.slotErrors
    segmentation = ui.pairSegmentationSelector.currentNode()  # the new segmentation is shown as the pair's
    assert not ui.labelMapPathLineEdit.visible
    assert segmentation.IsA("vtkMRMLSegmentationNode") and segmentation.GetName() == "aseg classes"
    assert [ui.trainingTable.item(0, column).text() for column in (0, 1)] == ["norm", "aseg classes"]
    names = segmentation.GetSegmentation()
    assert sorted(names.GetNthSegment(i).GetName() for i in range(names.GetNumberOfSegments())) == [
        "Grey Matter", "White Matter"]
    segmentations = fake.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    assert add() == [] and ui.trainingTable.rowCount() == 1  # added again: the same segmentation, no copy
    assert fake.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations

    # a label map volume on another grid (a box of the aseg): placed in the world as Slicer places it, and exported
    # onto the volume's grid as a job exports it
    box = read_image(aseg_file, what="label")[40:200, 30:190, 60:180]
    sitk.WriteImage(box, str(tmp_path / "box.nii.gz"))
    boxed = panel.logic.sceneLogic.segmentationFromLabelmap(read_labelmap(fake.scene, tmp_path / "box.nii.gz", "box"),
                                                            volume, card["id"], ROOT / "bench" / "freesurfer_gw.json")
    exported = read_image(write_segmentation_as_labelmap(boxed, volume, labels_from_card(card["labels"]),
                                                         tmp_path / "boxed.nrrd"), what="label")
    exported = sitk.Resample(exported, read_image(aseg_file), sitk.Transform(), sitk.sitkNearestNeighbor)
    expected = np.zeros(read_image(aseg_file).GetSize()[::-1], np.uint8)
    expected[60:180, 30:190, 40:200] = 1  # the box, in the array's (z, y, x) order
    gw = json.loads((ROOT / "bench" / "freesurfer_gw.json").read_text())
    given = sitk.GetArrayFromImage(read_image(aseg_file, what="label"))
    assert np.array_equal(sitk.GetArrayFromImage(exported),
                          expected * (_in_runs(given, gw["White Matter"]) + 2 * _in_runs(given, gw["Grey Matter"])))

    moved = fake.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    aseg.SetAndObserveTransformNodeID(moved.GetID())
    [error] = add(ui.addAuditPairButton)
    assert "label map volume 'aseg' and volume 'norm' are under different transforms" in error
    aseg.SetAndObserveTransformNodeID(None)
    fake.dialogs.clear()
    fake.slotErrors.clear()

    ui.applyButton.click()  # the job trains on the aseg in the model's numbering, as --label-map gives it
    assert not fake.dialogs, fake.dialogs
    [job] = panel.logic.sceneLogic.adaptationJobs()
    held = read_image(job.folder / load_job(job.folder).support[0].label, what="label")
    given = read_image(aseg_file, what="label")  # Slicer's node reverses an axis of this left-handed grid: resample
    held = sitk.GetArrayFromImage(sitk.Resample(held, given, sitk.Transform(), sitk.sitkNearestNeighbor))
    given = sitk.GetArrayFromImage(given)
    assert np.array_equal(held == 1, _in_runs(given, gw["White Matter"]))
    assert np.array_equal(held == 2, _in_runs(given, gw["Grey Matter"]))


def _in_runs(values, entries) -> "np.ndarray":
    runs = [(int(a), int(b)) for a, b in (str(e).split("-") if "-" in str(e) else (e, e) for e in entries)]
    return np.any([(values >= low) & (values <= high) for low, high in runs], axis=0)


# -- cases of several image channels (FLAIR, T1c…) -----------------------------------------------------------------


def load_two_channel_model(fake, panel, bundle: Path) -> str:
    fake.folderAnswers.append(str(bundle))
    panel.ui.loadModelFolderButton.click()
    assert not fake.dialogs, fake.dialogs
    return panel._parameterNode.modelId


def channel_selectors(grid) -> list:
    """(label, selector) of each shown row of a grid of volume selectors (the pair's or the target's), top down."""
    cells = grid.layout()._cells
    rows = {}
    for widget, (row, column) in cells.items():
        if widget.visible:
            rows.setdefault(row, [None, None])[column] = widget
    return [(label.text if label is not None else None, selector) for label, selector in
            (rows[row] for row in sorted(rows))]


def two_channel_case(fake, patient: int) -> tuple:
    from two_channel_model import brats_file

    return tuple(load_volume(fake.scene, brats_file(patient, channel), f"{channel} {patient}")
                 for channel in ("FLAIR", "T1c"))


def test_a_two_channel_model_takes_a_volume_per_channel_trains_on_both_and_its_job_opens_with_them(
        fake, panel, two_channel_bundle, tmp_path):
    """The panel gave one volume per case and refused a model of several channels (FLAIR and T1c) as one for the
    command line: it now shows a volume selector per channel, named as the model names them, for the pair to add and
    for the volume to segment; a pair lists its volumes, the job gets both per case, the result lies on the first
    channel's volume, and an opened job gives its pairs back with their channels."""
    from two_channel_model import whole_tumour

    ui, p = panel.ui, panel._parameterNode
    assert [text for text, _selector in channel_selectors(ui.pairVolumesWidget)] == [None]  # one, unlabelled
    model = load_two_channel_model(fake, panel, two_channel_bundle)
    for grid, first in ((ui.pairVolumesWidget, ui.pairVolumeSelector),
                        (ui.targetVolumesWidget, ui.targetVolumeSelector)):
        shown = channel_selectors(grid)
        assert [text for text, _selector in shown] == ["FLAIR:", "T1c:"] and shown[0][1] is first
        assert shown[1][1].nodeTypes == first.nodeTypes and shown[1][1].hideChildNodeTypes == first.hideChildNodeTypes
    [(_, flair_selector), (_, t1c_selector)] = channel_selectors(ui.pairVolumesWidget)
    [_, (_, target_t1c_selector)] = channel_selectors(ui.targetVolumesWidget)

    training, target = two_channel_case(fake, 3), two_channel_case(fake, 5)
    tumour = load_segmentation(fake.scene, whole_tumour(3, tmp_path / "wt3.nii.gz"), training[0], "tumour 3",
                               "whole tumour")
    flair_selector.setCurrentNode(training[0])
    ui.pairSegmentationSelector.setCurrentNode(tumour)
    ui.addPairButton.click()  # its T1c not chosen: said, and nothing added
    assert fake.dialogs == [("warning", "Select the T1c volume of the pair first.")]
    assert ui.trainingTable.rowCount() == 0
    fake.dialogs.clear()
    t1c_selector.setCurrentNode(training[1])
    ui.addPairButton.click()
    assert not fake.dialogs, fake.dialogs
    assert [ui.trainingTable.item(0, column).text() for column in (0, 1)] == ["FLAIR 3, T1c 3", "tumour 3"]
    assert (list(p.trainingVolumes), [list(c) for c in p.trainingChannels]) == ([training[0]], [[training[1]]])
    ui.targetVolumeSelector.setCurrentNode(target[0])
    target_t1c_selector.setCurrentNode(target[1])
    assert p.targetVolume is target[0] and list(p.targetChannels) == [target[1]]

    p.method, p.rank, p.steps, p.patchSize, p.device, p.seed = "lora", 2, 2, 32, "cpu", 0
    assert ui.applyButton.enabled and ui.segmentButton.enabled, (ui.applyButton.toolTip, ui.segmentButton.toolTip)
    ui.applyButton.click()
    assert not fake.dialogs, fake.dialogs
    run = panel._run
    poll_until_finished(panel)
    assert not fake.dialogs, fake.dialogs
    spec = run.job.spec
    assert [len(case.images) for case in [*spec.support, *spec.predict]] == [2, 2]
    result = p.outputSegmentation
    assert result.GetNodeReference(result.GetReferenceImageGeometryReferenceRole()) is target[0]
    assert result.GetName().startswith("FLAIR 5 ") and ui.segmentEditorWidget._source is target[0]

    panel.parent.isEntered = True
    fake.scene.Clear(0)  # a restarted Slicer: the job's files come back as cases of two volumes
    p = panel._parameterNode
    assert (list(p.trainingVolumes), list(p.trainingChannels)) == ([], [])
    ui.refreshJobsButton.click()
    ui.jobsTable.setCurrentCell(0, 0)
    ui.openJobButton.click()
    assert not fake.dialogs, fake.dialogs
    assert p.modelId == model and [text for text, _ in channel_selectors(ui.pairVolumesWidget)] == ["FLAIR:", "T1c:"]
    [[t1c]] = p.trainingChannels
    assert (p.trainingVolumes[0].GetName(), t1c.GetName()) == ("FLAIR 3 FLAIR", "FLAIR 3 T1c")
    assert ui.trainingTable.item(0, 0).text() == "FLAIR 3 FLAIR, FLAIR 3 T1c"
    [opened_t1c] = p.targetChannels
    assert (p.targetVolume.GetName(), opened_t1c.GetName()) == ("FLAIR 5 FLAIR", "FLAIR 5 T1c")
    assert target_t1c_selector.currentNode() is opened_t1c and ui.segmentButton.enabled
    poll_until_finished(panel, seconds=30)
    assert not fake.dialogs, fake.dialogs


def test_a_missing_channel_holds_segment_and_start_and_a_pair_of_another_channel_count_is_refused_at_start(
        fake, panel, two_channel_bundle):
    """Segment, and Start of a label-free run, wait for every channel of the volume to segment, naming the one
    missing. A pair added for a model of another channel count stays listed as added, and Start refuses it in one
    line before any job (the panel neither drops a channel nor makes one up)."""
    ui, p = panel.ui, panel._parameterNode
    model = load_two_channel_model(fake, panel, two_channel_bundle)
    case = two_channel_case(fake, 3)
    [_, (_, target_t1c_selector)] = channel_selectors(ui.targetVolumesWidget)
    assert not ui.segmentButton.enabled and ui.segmentButton.toolTip == "Choose the FLAIR volume to segment"
    ui.targetVolumeSelector.setCurrentNode(case[0])
    p.method = "label-free"
    assert not ui.segmentButton.enabled and ui.segmentButton.toolTip == "Choose the T1c volume to segment"
    assert not ui.applyButton.enabled
    assert ui.applyButton.toolTip == "Label-free: choose the T1c volume to adapt to (Segment volume)"
    target_t1c_selector.setCurrentNode(case[1])
    assert list(p.targetChannels) == [case[1]]
    assert ui.segmentButton.enabled and ui.segmentButton.toolTip == "" and ui.applyButton.enabled

    p.method = "lora"
    tumour = fake.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "tumour")
    panel.logic.addPair(p, fake.module.TRAINING_PAIRS, list(case), tumour)
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findData("deepbet-brain"))  # one channel: the panel as before
    assert [text for text, _selector in channel_selectors(ui.pairVolumesWidget)] == [None]
    assert [text for text, _selector in channel_selectors(ui.targetVolumesWidget)] == [None]
    assert ui.segmentButton.enabled and ui.trainingTable.item(0, 0).text() == "FLAIR 3, T1c 3"
    assert panel.logic.request(p).targetVolumes == [case[0]]  # the one selector shown, not the hidden channel

    def refused():
        fake.dialogs.clear(), fake.slotErrors.clear()
        assert ui.applyButton.enabled
        ui.applyButton.click()
        [(kind, text)] = fake.dialogs
        assert kind == "error" and panel._run is None and panel.logic.sceneLogic.adaptationJobs() == []
        fake.dialogs.clear(), fake.slotErrors.clear()
        return text.split("\n\n", 1)[1]

    assert refused() == "training pair 1: 2 volumes given; the model takes one volume per case"
    single = load_volume(fake.scene, brats(4, "T1c_subtrMeanDivStd.nii.gz"), "T1c 4")
    panel.logic.setPairs(p, fake.module.TRAINING_PAIRS, [(single, tumour)])
    ui.modelComboBox.setCurrentIndex(ui.modelComboBox.findData(model))
    assert [text for text, _selector in channel_selectors(ui.targetVolumesWidget)] == ["FLAIR:", "T1c:"]
    assert target_t1c_selector.currentNode() is case[1]  # the channel chosen before comes back with the model
    assert refused() == "training pair 1: 1 volume given; the model takes 2 image channels per case (FLAIR, T1c)"


def test_the_parameter_node_keeps_lists_of_lists_as_slicer_stores_them_through_a_saved_scene(fake):
    """The channels of each pair are a list of lists of volumes, which Slicer's serializers store as "<name>.len" and
    "<name>.<i>.<j>" node references; the fake stored lists as one reference role, which cannot nest, and dropped a
    removed node from a list where Slicer reads None at its place."""
    from slicer_scene import new_scene

    logic = fake.module.PEFTAdaptLogic()
    p = logic.getParameterNode()
    volumes = [fake.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name) for name in ("a", "b", "c", "d")]
    p.trainingVolumes, p.trainingChannels, p.trainingSegmentations = volumes[:2], [volumes[2:], []], [None, None]
    node = p.parameterNode
    assert [node.GetParameter(name) for name in ("trainingChannels.len", "trainingChannels.0.len",
                                                 "trainingChannels.1.len")] == ["2", "2", "0"]
    assert node.GetNodeReference("trainingChannels.0.1") is volumes[3]
    with pytest.raises(NotImplementedError):  # Slicer's ObservedList: `+` makes a list that is not written back
        p.trainingVolumes + []
    p.trainingChannels[1].append(volumes[0])  # and its changes are written back
    assert [list(channels) for channels in p.trainingChannels] == [volumes[2:], [volumes[0]]]

    fake.scene.RemoveNode(volumes[2])  # read as None at its place, as in Slicer
    assert [list(channels) for channels in p.trainingChannels] == [[None, volumes[3]], [volumes[0]]]
    fake.scene.SetSaveToXMLString(1)
    assert fake.scene.Commit()
    restored = new_scene()
    restored.SetLoadFromXMLString(1)
    restored.SetSceneXMLString(fake.scene.GetSceneXMLString())
    restored.Import()
    node = restored.GetSingletonNode("PEFTAdapt", "vtkMRMLScriptedModuleNode")
    p = fake.module.PEFTAdaptParameterNode(node)
    assert [[v.GetName() if v else None for v in channels] for channels in p.trainingChannels] == [[None, "d"], ["a"]]
    assert [v.GetName() for v in p.trainingVolumes] == ["a", "b"]

    for name in [name for name in node.GetParameterNames() if name.startswith("trainingChannels")]:
        node.RemoveNodeReferenceIDs(name)  # a scene saved before the channels were kept
        node.UnsetParameter(name)
    p = fake.module.PEFTAdaptParameterNode(node)
    assert list(p.trainingChannels) == [] and logic.pairs(p, fake.module.TRAINING_PAIRS) == [
        (volume, None) for volume in p.trainingVolumes]  # cases of one volume
