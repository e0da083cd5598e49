"""The PEFTAdapt Logic on a given MRML scene: nodes → job folder → background worker → tables, plots, segmentations.

No Qt and no `slicer.mrmlScene`: the module's Logic binds it to Slicer's scene and PythonSlicer; tests bind it to a
slicer-core scene and the test interpreter. Polling is explicit (`AdaptationRun.poll`), so the panel drives it
from a QTimer and tests from a loop.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .monitor import AdaptationMonitor
from .runstate import RunState
from .scene_io import SceneError, import_prediction, labels_from_card, write_segmentation_as_labelmap, write_volume

WORKER_MODULE = "PEFTAdaptLib.worker"


@dataclass
class AdaptationRequest:
    modelId: str
    trainingPairs: list  # (vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode)
    auditPair: tuple
    method: str = "lora"
    budgetPercent: float | None = None
    rank: int = 4
    steps: int = 200
    patchSize: int | None = None
    device: str = "auto"
    seed: int = 0
    warmStartAdapter: str | None = None
    targetVolumes: list = field(default_factory=list)
    learningRate: float = 2e-3
    auditEvery: int = 20


def _engine():
    """The engine's job protocol; imported late so the panel loads before the Python requirements exist."""
    from PEFTAdaptLib import jobs
    from PEFTAdaptLib.jobs import events

    return jobs, events


def kill_process_tree(pid: int, graceful: bool = True) -> None:
    """Stop the worker and everything it started (PythonSlicer is a launcher: the interpreter is its child)."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    processes = parent.children(recursive=True) + [parent]
    for process in processes:
        try:
            process.terminate() if graceful else process.kill()
        except psutil.NoSuchProcess:
            pass


class AdaptationRun:
    """One background job: its process, its monitor nodes and its state."""

    def __init__(self, logic: "PEFTAdaptSceneLogic", request: AdaptationRequest, jobDir: Path,
                 process: subprocess.Popen, log=None):
        self.logic, self.request, self.jobDir, self.process = logic, request, jobDir, process
        self.monitor = AdaptationMonitor(logic.scene, f"PEFTAdapt {jobDir.name}")
        self.state = RunState(steps=request.steps)
        self.log = log or (lambda line: None)
        self._offset = 0
        self._cancelRequested = False

    @property
    def adapterFolder(self) -> Path:
        return self.jobDir / "adapter"

    def poll(self) -> RunState:
        """Fold new events into the tables and the state; notice a worker that died without a final event."""
        _, events = _engine()
        new, self._offset = events.read_events(self.jobDir, self._offset)
        for event in new:
            self.monitor.handle(event)
            self.state.update(event)
            self.log(_describe(event))
        if not self.state.finished and self.process.poll() is not None:
            new, self._offset = events.read_events(self.jobDir, self._offset)  # events written just before exit
            for event in new:
                self.monitor.handle(event)
                self.state.update(event)
            if not self.state.finished:
                if self._cancelRequested:
                    self.state.update({"event": "cancelled", "reason": "stopped by the user"})
                else:
                    self.state.fail(self._stderrTail() or f"the worker stopped with exit code {self.process.returncode}")
        return self.state

    def cancel(self) -> None:
        """Ask the worker to stop (it checkpoints, then exits), and stop the whole process tree."""
        self._cancelRequested = True
        (self.jobDir / "cancel").touch()
        kill_process_tree(self.process.pid, graceful=True)

    def wait(self, timeoutSeconds: float = 3600, interval: float = 0.5) -> RunState:
        deadline = time.monotonic() + timeoutSeconds
        while not self.poll().finished:
            if time.monotonic() > deadline:
                self.cancel()
                self.process.wait(60)
                self.poll()
                break
            time.sleep(interval)
        return self.state

    def importResults(self) -> list:
        """Segmentation nodes for the predicted target volumes (model names, colours, terminology, geometry)."""
        labels = labels_from_card(self.logic.card(self.request.modelId)["labels"])
        nodes = []
        for volume, path in zip(self.request.targetVolumes, self.state.predictions):
            nodes.append(import_prediction(self.logic.scene, self.jobDir / path, volume, labels,
                                           f"{volume.GetName()} {self.request.method} segmentation"))
        return nodes

    def _stderrTail(self) -> str:
        path = self.jobDir / "worker.err.log"
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.exists() else []
        return lines[-1] if lines else ""


def _describe(event: dict) -> str:
    kind = event.get("event", "")
    details = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "time"))
    return f"[{kind}] {details}"


class PEFTAdaptSceneLogic:
    def __init__(self, scene, pythonExecutable: str = sys.executable, enginePath: str | None = None,
                 workRoot: str | None = None):
        self.scene = scene
        self.pythonExecutable = pythonExecutable
        self.enginePath = enginePath
        self.workRoot = Path(workRoot) if workRoot else Path.cwd() / "PEFTAdapt-jobs"
        self._folderCards: dict[str, dict] = {}
        self._listedCards: list[dict] | None = None

    # -- models ----------------------------------------------------------------------------------------------------
    def modelCards(self) -> list[dict]:
        """Built-in models, the available ones of the user's model folder (PEFTADAPT_MODELS), and folders loaded with
        "Load from folder…" in this session. Reads JSON only: works before torch is installed."""
        if self._listedCards is None:  # scanned once: the panel asks on every parameter change
            from PEFTAdaptLib.models.registry import list_models

            rows, _ = list_models()
            self._listedCards = [{**row.card.to_dict(), "path": row.path} for row in rows
                                 if row.card is not None and (row.status == "available" or row.format == "builtin")]
        known = {card["id"] for card in self._listedCards}
        return self._listedCards + [card for card in self._folderCards.values() if card["id"] not in known]

    def card(self, modelId: str) -> dict:
        for card in self.modelCards():
            if card["id"] == modelId:
                return card
        raise SceneError(f"unknown model '{modelId}'")

    def modelReference(self, modelId: str) -> str:
        """What the worker loads: the id of a built-in model, else the model's folder (ids of folders are local)."""
        return self.card(modelId).get("path") or modelId

    def registerModelFolder(self, folder: str) -> dict:
        """A MONAI bundle, nnU-Net v2 folder, TorchScript + card or MeshNet folder; refused with the reason if its
        files are missing, corrupt or need a package that is not installed."""
        from PEFTAdaptLib.errors import PEFTAdaptError
        from PEFTAdaptLib.models.catalog import entry_for_path

        try:
            entry = entry_for_path(Path(folder))
            card = entry.card().to_dict()
        except PEFTAdaptError as exc:
            raise SceneError(str(exc)) from None
        status = entry.availability()
        if status != "available":
            raise SceneError(f"{folder}: {status}")
        card["path"] = str(Path(folder).resolve())
        self._folderCards[card["id"]] = card
        return card

    def budgetParameters(self, modelId: str, percent: float) -> int | None:
        total = self.card(modelId).get("extra", {}).get("parameters")
        return int(total * percent / 100) if total else None

    def deviceDescription(self) -> str:
        try:
            import torch
        except ImportError:
            return "PyTorch is not installed yet: it is installed when you first press Start."
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
            return f"torch {torch.__version__}, CUDA {torch.version.cuda}: {name} (compute capability {capability})"
        return f"torch {torch.__version__}: no CUDA GPU usable, adaptation runs on the CPU"

    def checkAdapter(self, modelId: str, folder: str) -> dict:
        path = Path(folder) / "adapter.json"
        if not path.is_file() or not (Path(folder) / "adapter.safetensors").is_file():
            raise SceneError(f"{folder}: not an adapter folder (adapter.json + adapter.safetensors)")
        config = json.loads(path.read_text())
        trained_on = config.get("metadata", {}).get("model")
        if trained_on != modelId:
            raise SceneError(f"{folder}: this adapter was trained for model '{trained_on}', not '{modelId}'")
        return config

    # -- jobs ------------------------------------------------------------------------------------------------------
    def _newJobDir(self) -> Path:
        self.workRoot.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for index in range(1000):
            folder = self.workRoot / f"job-{stamp}-{index:03d}"
            if not folder.exists():
                folder.mkdir()
                return folder
        raise SceneError(f"{self.workRoot}: cannot create a job folder")

    def _exportPair(self, jobDir: Path, volume, segmentation, labels, name: str):
        jobs, _ = _engine()
        if volume is None or segmentation is None:
            raise SceneError(f"{name}: a volume and its segmentation are both needed")
        image = write_volume(volume, jobDir / "inputs" / f"{name}_image.nrrd")
        label = write_segmentation_as_labelmap(segmentation, volume, labels, jobDir / "inputs" / f"{name}_label.nrrd")
        return jobs.CaseSpec([str(image.relative_to(jobDir))], str(label.relative_to(jobDir)))

    def writeJob(self, request: AdaptationRequest) -> Path:
        """Export the nodes with their geometry and write job.json; returns the job folder."""
        jobs, _ = _engine()
        labelFree = request.method == "label-free"
        if labelFree and not request.targetVolumes:
            raise SceneError("label-free adaptation needs the target volume(s) to adapt to (no annotation needed)")
        if not labelFree and not request.trainingPairs:
            raise SceneError("add at least one training pair (volume + segmentation)")
        labels = labels_from_card(self.card(request.modelId)["labels"])
        jobDir = self._newJobDir()
        (jobDir / "inputs").mkdir()
        pairs = [self._exportPair(jobDir, v, s, labels, f"train{i}") for i, (v, s) in enumerate(request.trainingPairs)]
        hasAudit = all(node is not None for node in request.auditPair)
        audit = [self._exportPair(jobDir, *request.auditPair, labels, "audit")] if hasAudit or not labelFree else []
        targets = [jobs.CaseSpec([str(write_volume(v, jobDir / "inputs" / f"target{i}_image.nrrd").relative_to(jobDir))])
                   for i, v in enumerate(request.targetVolumes)]
        # label-free: the targets are what it adapts to; labelled pairs, if any, train its early segmentation head and
        # the audit pair is evaluation only (docs/labelfree.md)
        support, source = (targets, pairs) if labelFree else (pairs, [])
        spec = jobs.JobSpec(
            model=self.modelReference(request.modelId), support=support, audit=audit, predict=targets, source=source,
            method=jobs.MethodSpec(request.method, rank=request.rank,
                                   budget=request.budgetPercent / 100 if request.budgetPercent else None),
            train=jobs.TrainSpec(steps=request.steps, lr=request.learningRate,
                                 patch_size=[request.patchSize] * 3 if request.patchSize else None,
                                 audit_every=request.auditEvery, seed=request.seed, device=request.device),
            warm_start=request.warmStartAdapter,
        )
        jobs.write_job(jobDir, spec)
        return jobDir

    def launch(self, request: AdaptationRequest, log=None, environment: dict | None = None) -> AdaptationRun:
        """Start the worker in the background (non-blocking); poll the returned run."""
        jobDir = self.writeJob(request)
        env = dict(os.environ)
        if self.enginePath:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.enginePath, env.get("PYTHONPATH")]))
        env.update(environment or {})
        with open(jobDir / "worker.log", "w") as out, open(jobDir / "worker.err.log", "w") as err:
            process = subprocess.Popen([self.pythonExecutable, "-m", WORKER_MODULE, str(jobDir)],
                                       stdout=out, stderr=err, env=env, cwd=str(jobDir))
        return AdaptationRun(self, request, jobDir, process, log)

    def segment(self, modelId: str, volume, adapterFolder: str | None, segmentationNode=None):
        """Segment one volume with the model (+ adapter) in a separate process, and load the result."""
        if volume is None:
            raise SceneError("choose a volume to segment")
        folder = self._newJobDir()
        image = write_volume(volume, folder / "image.nrrd")
        output = folder / "segmentation.nrrd"
        command = [self.pythonExecutable, "-m", "PEFTAdaptLib.cli", "predict", "--model", self.modelReference(modelId),
                   "--image", str(image), "--output", str(output)]
        if adapterFolder:
            command += ["--adapter", str(adapterFolder)]
        env = dict(os.environ)
        if self.enginePath:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.enginePath, env.get("PYTHONPATH")]))
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise SceneError(lines[-1] if lines else f"segmentation failed (exit code {result.returncode})")
        labels = labels_from_card(self.card(modelId)["labels"])
        return import_prediction(self.scene, output, volume, labels, f"{volume.GetName()} segmentation",
                                 segmentationNode)
