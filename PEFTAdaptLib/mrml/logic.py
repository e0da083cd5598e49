"""The panel's logic on an MRML scene, shared by the Slicer module and the browser app: nodes → job request → job
client → events into tables and plots → predictions back as segmentation nodes.

No Qt, no `slicer.mrmlScene`, no processes of its own: the scene and the job client are passed in (Slicer passes
its scene and a PythonSlicer runner; tests a slicer-core scene and this interpreter). Polling is explicit
(`SceneRun.poll`), so a panel drives it from a timer and a test from a loop.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..data.formats import stem
from ..data.io import read_image, read_label
from ..data.labelmap import read_label_map, relabel
from ..errors import PEFTAdaptError
from ..jobs import (
    ADAPTER_DIR, RESUMABLE, CaseSpec, Job, JobClient, JobSpec, RunState, TrainSpec, job_info, load_job,
)
from ..jobs.create import ROLES
from ..jobs.spec import resolve_input
from ..methods import DEFAULT_METHOD, Budget, make_method, method_class
from .monitor import AdaptationMonitor
from ..uncertainty import companion_paths
from .scene_io import (
    SceneError, import_overlay, import_prediction, labels_from_card, nodes_of_class, read_volume, show_voxel,
    write_segmentation_as_labelmap, write_volume,
)

EXPORT_SUFFIX = ".nrrd"  # Slicer's own lossless format: geometry written exactly as the nodes hold it
#: segmentation-node attributes: the prediction file the node was imported from, and the slices the user marked as
#: checked (JSON [[axis, index], …], IJK of its volume). A training pair whose segmentation started from a
#: prediction trains on the slices that differ from it, and on the marked ones (sparse supervision, data/sparse.py)
STARTED_FROM, CHECKED_SLICES = "PEFTAdapt.startedFrom", "PEFTAdapt.checkedSlices"
#: segmentation-node attribute of a label map volume converted to the model's classes: [label map volume ID,
#: volume ID, label map file, its sha256]
CONVERTED_FROM = "PEFTAdapt.convertedFrom"
#: node reference of a result segmentation to its uncertainty overlay: the next result read into the segmentation
#: reads its overlay into the same volume node
UNCERTAINTY_ROLE = "PEFTAdapt.uncertainty"
_TRAIN_DEFAULTS = TrainSpec()


def channels_of(volume) -> tuple:
    """A case's volume nodes, one per image channel in the model's order. A panel gives a single-channel case as its
    volume node and a multi-channel one (FLAIR, T1c…) as a sequence of nodes; the first channel's grid is the case's:
    its annotation is exported, and its results are placed, on that grid."""
    return tuple(volume) if isinstance(volume, Sequence) else (volume,)


def reference_of(volume):
    """The volume node whose grid and name stand for the case (its first channel)."""
    return channels_of(volume)[0]


class SliceToCheck(NamedTuple):
    """A slice "Next slice to check" showed, and why it is ranked (`uncertainty.ranked`): "uncertain" (the model
    is least sure there) or "coverage" (far from every slice checked so far, where a confident miss would hide)."""

    volume: object  # the case's first channel
    axis: int  # IJK
    index: int
    reason: str


@dataclass
class AdaptationRequest:
    """What the panel holds: nodes and settings. Fields a method does not take are left out of its config."""

    modelId: str
    #: (vtkMRMLScalarVolumeNode, or one per channel (`channels_of`), vtkMRMLSegmentationNode)
    trainingPairs: list
    #: held-out (volume, segmentation) pairs; volumes of two or more subjects other than the training ones let the
    #: audit vouch for other volumes (vouch.py), one volume vouches for itself only
    auditPairs: list = field(default_factory=list)
    method: str = DEFAULT_METHOD
    budgetPercent: float | None = None
    rank: int | None = None
    steps: int = _TRAIN_DEFAULTS.steps
    patchSize: int | None = None
    device: str = _TRAIN_DEFAULTS.device
    seed: int = _TRAIN_DEFAULTS.seed
    warmStartAdapter: str | None = None
    targetVolumes: list = field(default_factory=list)
    learningRate: float | None = None
    auditEvery: int = _TRAIN_DEFAULTS.audit_every


def method_config(name: str, budgetPercent: float | None = None, rank: int | None = None):
    """The method's config from the panel's fields, taking only the fields the method offers (the panel hides the
    others, so a value left in a hidden field is not a request)."""
    cls = method_class(name)
    fields = {}
    if cls.takes_budget and budgetPercent:
        fields["budget"] = Budget(fraction=budgetPercent / 100)
    if cls.ranks and rank:
        fields["rank"] = rank
    return make_method(name, **fields)


def audit_advice(count: int) -> str:
    """What a panel says under its `count` audit pairs before a run; the run's caveats (vouch.py) say it after."""
    subjects = "Give annotated volumes of two or more subjects other than the training ones."
    if count == 0:
        return ("No audit pair: the run holds out a slab of each training volume, and the adapted model replaces the "
                "source only if its Dice gain there is larger than its noise; that gain is shown on the training "
                f"volumes only. {subjects}")
    if count == 1:
        return f"One audit volume vouches for itself only: the run will name every other volume it segments. {subjects}"
    return ""


def describe_event(event: dict) -> str:
    kind = event.get("event", "")
    details = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("event", "time"))
    return f"[{kind}] {details}"


class SceneRun:
    """One job seen from the scene: its monitor nodes (tables, charts) and, when it finishes, its segmentations."""

    def __init__(self, logic: "SceneLogic", job: Job, modelId: str, volumes: list, label: str, log=None,
                 trainedOn: tuple = (), round: int = 1):
        self.logic, self.job, self.modelId, self.volumes, self.label = logic, job, modelId, volumes, label
        #: the segmentation nodes the run trains on: its results never overwrite them (a correction stays as made)
        self.trainedOn, self.round = tuple(trainedOn), round
        self.monitor = AdaptationMonitor(logic.scene, f"PEFTAdapt {job.folder.name}")
        self.log = log or (lambda line: None)
        self.uncertaintyNodes: list = []  # the imported uncertainty maps (colour overlays of the slice views)
        self.shownSlices: set[tuple[str, int]] = set()  # by nextSliceToCheck

    @property
    def jobDir(self) -> Path:
        return self.job.folder

    @property
    def adapterFolder(self) -> Path:
        return self.job.folder / ADAPTER_DIR

    @property
    def state(self) -> RunState:
        return self.job.state

    def poll(self) -> RunState:
        for event in self.job.poll():
            self.monitor.handle(event)
            self.log(describe_event(event))
        return self.job.state

    def cancel(self) -> None:
        self.job.cancel()

    def wait(self, timeoutSeconds: float | None = None, interval: float = 0.5) -> RunState:
        self.job.wait(timeoutSeconds, interval, on_events=lambda events: [self.monitor.handle(e) for e in events])
        return self.job.state

    def nextSliceToCheck(self, plane: str = "axial") -> SliceToCheck | None:
        """Move the slice views to the slice of the first prediction where a correction is expected to help most
        and that this run has not shown yet, or None when every ranked slice was shown. The views centre on the
        ranking's `at` (the slice's most uncertain voxel, or the middle of its image)."""
        paths = self.job.prediction_paths()
        if not paths or not self.volumes:
            return None
        ranking = json.loads(companion_paths(paths[0])["slices"].read_text())["planes"][plane]
        volume = reference_of(self.volumes[0])
        for entry in ranking["slices"]:
            if (plane, entry["index"]) not in self.shownSlices:
                self.shownSlices.add((plane, entry["index"]))
                show_voxel(self.logic.scene, volume, entry["at"])
                return SliceToCheck(volume, ranking["axis"], entry["index"], entry["reason"])
        return None

    def importResults(self, segmentationNode=None) -> list:
        """Segmentation nodes for the predicted volumes (the model's names, colours, terminology; the volume's
        geometry); `segmentationNode` is reused for the first one unless the run trains on it or the user corrected
        it since it came in (the result then comes into a new node). A later round's result goes into a new node
        named after its round. Each segmentation keeps its uncertainty overlay (a node reference), which the next
        result read into it reuses."""
        labels = labels_from_card(self.logic.card(self.modelId)["labels"])
        keep = segmentationNode is not None and bool(self.volumes) and (
            segmentationNode in self.trainedOn or
            corrected_by_the_user(segmentationNode, reference_of(self.volumes[0]), labels))
        if keep:  # a correction (or the segmentation the run trained on) stays as the user left it
            segmentationNode = None
        rounds = f" round {self.round}" if self.round > 1 else ""
        nodes = []
        for case, path in zip(self.volumes, self.job.prediction_paths()):
            volume = reference_of(case)
            name = f"{volume.GetName()} {self.label}{rounds}"
            node = import_prediction(self.logic.scene, path, volume, labels,
                                     self.logic.scene.GenerateUniqueName(name) if keep else name, segmentationNode)
            node.SetAttribute(STARTED_FROM, str(path))  # a correction of it trains on the slices it changes
            node.RemoveAttribute(CHECKED_SLICES)
            nodes.append(node)
            segmentationNode = None
            uncertainty = companion_paths(path)["uncertainty"]
            if uncertainty.is_file():
                overlay = import_overlay(self.logic.scene, uncertainty, f"{node.GetName()} uncertainty", volume,
                                         node.GetNodeReference(UNCERTAINTY_ROLE))
                node.SetNodeReferenceID(UNCERTAINTY_ROLE, overlay.GetID())
                self.uncertaintyNodes.append(overlay)
        return nodes


class SceneLogic:
    def __init__(self, scene, client: JobClient):
        self.scene = scene
        self.client = client
        self._folderCards: dict[str, dict] = {}
        self._listedCards: list[dict] | None = None
        self._unlisted: list[str] = []
        #: this job request's exported files → (node, what the user calls it), while `_submit` builds it
        self._exports: dict[str, tuple] = {}
        #: a job input file (resolved path) → the scene node it was exported from or loaded into: reopening a job
        #: shows those nodes instead of loading copies
        self._inputNodes: dict[str, object] = {}

    # -- models ----------------------------------------------------------------------------------------------------
    def modelCards(self) -> list[dict]:
        """Built-in models, the available ones of the user's model folder (PEFTADAPT_MODELS), and folders loaded with
        "Load from folder…" in this session. Reads JSON only: works before torch is installed."""
        if self._listedCards is None:  # scanned once: the panel asks on every parameter change
            self._scanModels()
        known = {card["id"] for card in self._listedCards}
        return self._listedCards + [card for card in self._folderCards.values() if card["id"] not in known]

    def unlistedModels(self) -> list[str]:
        """Why models of the user's model folder are not offered, one line each: a model placed there and missing from
        the list would otherwise say nothing (`peftadapt models` prints the same)."""
        if self._listedCards is None:
            self._scanModels()
        return self._unlisted

    def _scanModels(self) -> None:
        from ..models.registry import list_models

        rows, problems = list_models()
        listed = [row for row in rows
                  if row.card is not None and (row.status == "available" or row.format == "builtin")]
        self._listedCards = [{**row.card.to_dict(), "path": row.path} for row in listed]
        self._unlisted = [f"{row.id}: {row.status}" for row in rows if row not in listed] + problems

    def card(self, modelId: str) -> dict:
        for card in self.modelCards():
            if card["id"] == modelId:
                return card
        raise SceneError(f"unknown model '{modelId}'")

    def modelReference(self, modelId: str) -> str:
        """What the worker loads: the id of a built-in model, else the model's folder (ids of folders are local)."""
        return self.card(modelId).get("path") or modelId

    def modelFolder(self, modelId: str) -> str:
        """The folder of a model loaded with "Load from folder…" ("" for the others): the scene saves it, so that a
        restored scene can load the model again."""
        card = self._folderCards.get(modelId)
        return card["path"] if card else ""

    def restoreModelFolder(self, modelId: str, folder: str) -> dict:
        """A model loaded from `folder` before the scene was saved, loaded again; refused with the reason when the
        folder is gone, holds another model, or runs TorchScript the user has not trusted (they load it themselves)."""
        unknown = f"unknown model '{modelId}'"
        if not Path(folder).is_dir():
            raise SceneError(f"{unknown}: its folder {folder} is missing; load the model with Load model from "
                             "folder…")
        if self.untrustedTorchScript(folder):
            raise SceneError(f"{unknown}: {folder} is a TorchScript model not trusted on this computer; load it with "
                             "Load model from folder…")
        card = self.registerModelFolder(folder)
        if card["id"] != modelId:
            raise SceneError(f"{unknown}: {folder} now holds model '{card['id']}'")
        return card

    def registerModelFolder(self, folder: str) -> dict:
        """A MONAI bundle, nnU-Net v2 folder, TorchScript + card or MeshNet folder; refused with the reason if its
        files are missing, corrupt or need a package that is not installed."""
        from ..models.catalog import entry_for_path

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

    def untrustedTorchScript(self, folder: str) -> tuple[str, str] | None:
        """(file, sha256) of the TorchScript file a model folder would run when the user has not trusted it yet, so
        that a panel can ask before `trustTorchScript`; None for the formats that are loaded as data."""
        from ..errors import ModelError
        from ..models.catalog import torchscript_file
        from ..models.safe_load import sha256_file
        from ..models.trust import is_trusted

        try:
            path = torchscript_file(Path(folder))
        except ModelError:
            return None
        digest = sha256_file(path)
        return None if is_trusted(digest) else (str(path), digest)

    def trustTorchScript(self, path: str) -> str:
        """Record the file's current bytes as trusted (the user agreed); returns their sha256."""
        from ..models.trust import trust_file

        return trust_file(Path(path))

    def channelNames(self, modelId: str) -> list[str]:
        """What each image channel of a case is, in the model's order, as the panels label their volume selectors:
        the model's own names (["FLAIR", "T1c"]), else "channel 1", "channel 2"…; one name for a single-channel
        model."""
        card = self.card(modelId)
        return card.get("channel_names") or [f"channel {index + 1}" for index in range(card.get("input_channels", 1))]

    def budgetParameters(self, modelId: str, percent: float) -> int | None:
        total = self.card(modelId).get("extra", {}).get("parameters")
        return int(total * percent / 100) if total else None

    def checkAdapter(self, modelId: str, folder: str) -> str:
        """The adapter folder `folder` holds (itself, or an adapt job's `adapter/`), checked to be one for `modelId`:
        the panel keeps this folder, so that *Save adapter* copies the adapter and never a job's inputs."""
        from ..adapters.io import read_adapter_config
        from ..jobs.create import adapter_folder

        try:
            adapter = adapter_folder(folder)
            config = read_adapter_config(adapter)
        except PEFTAdaptError as exc:
            raise SceneError(str(exc)) from None
        trained_on = config.get("metadata", {}).get("model")
        if trained_on != modelId:
            raise SceneError(f"{folder}: this adapter was trained for model '{trained_on}', not '{modelId}'")
        return str(adapter)

    # -- annotations -----------------------------------------------------------------------------------------------
    def importLabels(self, path: Path, volume, imageFile: Path, modelId: str, name: str,
                     labelMap: Path | None = None):
        """A segmentation node in the model's classes (its names, colours, terminology) from a label file drawn on
        `volume`; refused in one line when it is off the grid of `imageFile` (the volume's file; in Slicer, where the
        segmentation places any grid in the world, the label's own), holds values the model does not know, or is
        empty. Labels in another numbering (FreeSurfer's aseg…) come with `labelMap`, the command line's
        --label-map file, which maps them onto the model's classes first."""
        card = self.card(modelId)
        with tempfile.TemporaryDirectory(prefix="peftadapt-") as scratch:
            if labelMap is not None:
                path = relabel(path, imageFile, read_label_map(labelMap, card), labelMap,
                               Path(scratch) / f"{stem(Path(path).name)}_mapped.nii.gz")
            read_label(path, read_image(imageFile), imageFile.name, {int(label["value"]) for label in card["labels"]})
            return import_prediction(self.scene, path, volume, labels_from_card(card["labels"]), name)

    def segmentationFromLabelmap(self, labelmapNode, volume, modelId: str, labelMap: Path | None = None):
        """A label map volume node (aseg loaded in Slicer, a mask) of `volume` as a segmentation in the model's
        classes, through `importLabels`; made once per label map volume and map file, so that adding it again
        finds the segmentation, and what the user corrected in it, instead of a copy."""
        volume = reference_of(volume)
        if volume is None:
            raise SceneError(f"label map volume '{labelmapNode.GetName()}': choose the volume it belongs to")
        if labelmapNode.GetTransformNodeID() != volume.GetTransformNodeID():
            raise SceneError(f"label map volume '{labelmapNode.GetName()}' and volume '{volume.GetName()}' are under "
                             "different transforms: put them under the same one (Data module)")
        from ..models.safe_load import sha256_file

        # the map by content too: an edited map file converts anew instead of finding the old mapping's result
        source = json.dumps([labelmapNode.GetID(), volume.GetID(), str(labelMap or ""),
                             sha256_file(Path(labelMap)) if labelMap else ""])
        made = next((node for node in nodes_of_class(self.scene, "vtkMRMLSegmentationNode")
                     if node.GetAttribute(CONVERTED_FROM) == source), None)
        if made is not None:
            return made
        with tempfile.TemporaryDirectory(prefix="peftadapt-") as folder:
            label = write_volume(labelmapNode, Path(folder) / f"labels{EXPORT_SUFFIX}")
            try:  # on its own grid, as Slicer imports a label map: a job exports the segmentation onto the volume's
                segmentation = self.importLabels(label, volume, label, modelId, f"{labelmapNode.GetName()} classes",
                                                 labelMap)
            except PEFTAdaptError as exc:  # the file is temporary: name the user's node
                raise SceneError(str(exc).replace(str(label), f"label map volume '{labelmapNode.GetName()}'")) \
                    from None
        segmentation.SetAttribute(CONVERTED_FROM, source)
        return segmentation

    # -- jobs ------------------------------------------------------------------------------------------------------
    def _exportCase(self, folder: Path, name: str, what: str, channels: list[str], volume, segmentation=None,
                    labels=None) -> CaseSpec:
        """Write a case's nodes as the job's input files: its volume, or one volume per name of `channels` (the
        model's, `channelNames`), and its segmentation on the first channel's grid. `what` is the case as the panel
        lists it ("training pair 1"), which an error about the files names instead of the temporary file."""
        volumes = channels_of(volume)
        if len(volumes) != len(channels):
            takes = f"{len(channels)} image channels per case ({', '.join(channels)})" if len(channels) > 1 \
                else "one volume per case"
            given = f"{len(volumes)} volume{'s' if len(volumes) > 1 else ''}"
            raise SceneError(f"{what}: {given} given; the model takes {takes}")
        images = []
        for index, (channel, node) in enumerate(zip(channels, volumes)):
            which = f"{what}, {channel}" if len(channels) > 1 else what
            if node is None:
                raise SceneError(f"{which}: a volume is needed")
            if node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise SceneError(f"volume '{node.GetName()}' ({which}) is a label map, not an image: choose the image, "
                                 "and the label map volume as its annotation")
            if node.GetTransformNodeID() != volumes[0].GetTransformNodeID():
                raise SceneError(f"volumes '{volumes[0].GetName()}' and '{node.GetName()}' ({what}) are under "
                                 "different transforms: harden them, or put them under the same one (Data module)")
            image = write_volume(node, folder / f"{name}_image{index or ''}{EXPORT_SUFFIX}")
            if images:
                _onto_grid_of(image, Path(images[0]))
            self._exports[str(image)] = node, f"volume '{node.GetName()}' ({which})"
            images.append(str(image))
        label = annotated = None
        if segmentation is not None:
            label = write_segmentation_as_labelmap(segmentation, volumes[0], labels,
                                                   folder / f"{name}_label{EXPORT_SUFFIX}")
            self._exports[str(label)] = segmentation, f"segmentation '{segmentation.GetName()}' ({what})"
            annotated = self._correctedSlices(segmentation, label, folder / f"{name}_annotated{EXPORT_SUFFIX}")
            if annotated:
                self._exports[str(annotated)] = None, f"the corrected slices of segmentation " \
                                                      f"'{segmentation.GetName()}' ({what})"
        return CaseSpec(images, str(label) if label else None, _caseName(volumes),
                        str(annotated) if annotated else None)

    @staticmethod
    def _correctedSlices(segmentation, label: Path, target: Path) -> Path | None:
        """The annotated-voxel mask of a corrected prediction: the whole slices where the exported label differs
        from the prediction the node was imported from, plus the slices marked as checked; None for a segmentation
        that did not start from a prediction (all of it counts)."""
        from ..data.io import write_image
        from ..data.transforms import from_array

        touched = _touchedSlices(segmentation, label)
        if touched is None:
            return None
        mask, corrected = touched
        if not mask.any():
            raise SceneError(f"segmentation '{segmentation.GetName()}' is the prediction as it was: correct some "
                             "slices (or mark the slices you checked) before training on it")
        return write_image(from_array(mask.astype(np.uint8), corrected), target)

    @staticmethod
    def markSlicesChecked(segmentation, axis: int, indices) -> None:
        """Record slices (IJK `axis` of the segmentation's volume) the user checked and found right: a re-adapt
        trains on them as well as on the slices the user changed."""
        marked = json.loads(segmentation.GetAttribute(CHECKED_SLICES) or "[]")
        marked += [[int(axis), int(index)] for index in indices if [int(axis), int(index)] not in marked]
        segmentation.SetAttribute(CHECKED_SLICES, json.dumps(marked))

    def jobRequest(self, request: AdaptationRequest, exportFolder: Path) -> JobSpec:
        """The job request for the panel's nodes (exported into `exportFolder`) and settings."""
        method = method_config(request.method, request.budgetPercent, request.rank)
        card = self.card(request.modelId)
        labels = labels_from_card(card["labels"])
        channels = self.channelNames(request.modelId)
        for role, given in (("training", request.trainingPairs), ("audit", request.auditPairs)):
            if any(volume is None or segmentation is None for volume, segmentation in given):
                raise SceneError(f"every {role} pair needs a volume and its segmentation")
        pairs = [self._exportCase(exportFolder, f"train{i}", f"training pair {i + 1}", channels, v, s, labels)
                 for i, (v, s) in enumerate(request.trainingPairs)]
        audit = [self._exportCase(exportFolder, f"audit{i}", f"audit pair {i + 1}", channels, v, s, labels)
                 for i, (v, s) in enumerate(request.auditPairs)]
        targets = [self._exportCase(exportFolder, f"target{i}", "volume to segment", channels, v)
                   for i, v in enumerate(request.targetVolumes)]
        # without labels the method adapts to the targets (labelled pairs, if any, are its source-like cases)
        support, source = (pairs, []) if method.needs_labels else (
            [CaseSpec(c.images, None, c.name) for c in targets], pairs)
        return JobSpec(
            model=self.modelReference(request.modelId), support=support, audit=audit, source=source,
            predict=targets, method=method,
            train=TrainSpec(steps=request.steps, lr=request.learningRate,
                            patch_size=[request.patchSize] * card.get("spatial_dims", 3) if request.patchSize else None,
                            audit_every=request.auditEvery, seed=request.seed, device=request.device),
            warm_start=request.warmStartAdapter,
        )

    def _submit(self, build, modelId: str, volumes: list, label: str, log=None, **run) -> SceneRun:
        folder = self.client.new_folder()
        export = folder.parent / f".{folder.name}.export"
        export.mkdir()
        self._exports = {}
        try:
            spec = build(export)
            self.client.create(spec, folder)
            self._rememberInputs(spec, folder)
            job = self.client.launch(folder)
        except Exception as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, PEFTAdaptError):  # the engine names the temporary export file: name the user's node
                exc.args = (self._namedNodes(str(exc)),)
            raise
        finally:
            shutil.rmtree(export, ignore_errors=True)
            self._exports = {}
        return SceneRun(self, job, modelId, volumes, label, log, **run)

    def _namedNodes(self, message: str) -> str:
        for path, (_node, what) in sorted(self._exports.items(), key=lambda item: -len(item[0])):
            message = message.replace(path, what)
        return message

    def _rememberInputs(self, spec: JobSpec, folder: Path) -> None:
        """Record which node each input file of the new job came from (exported now, or an input of an earlier job
        that a re-adapt carries over), so that opening the job again shows those nodes."""
        staged = load_job(folder)
        for role in ROLES:
            for given, copied in zip(getattr(spec, role), getattr(staged, role)):
                for source, target in zip([*given.images, given.label], [*copied.images, copied.label]):
                    if not (source and target):
                        continue
                    node = self._exports.get(source, (None,))[0] or self._inputNodes.get(_resolved(folder, source))
                    if node is not None:
                        self._inputNodes[_resolved(folder, target)] = node

    def startAdaptation(self, request: AdaptationRequest, log=None) -> SceneRun:
        """Export the nodes, make the job and start its worker in the background; poll the returned run. A run
        warm-started from an adapter is a later round."""
        return self._submit(lambda export: self.jobRequest(request, export), request.modelId,
                            list(request.targetVolumes), f"{request.method} segmentation", log,
                            trainedOn=[segmentation for _volume, segmentation in request.trainingPairs],
                            round=2 if request.warmStartAdapter else 1)

    def startReadaptation(self, previous: SceneRun, correctedPairs: list, log=None) -> SceneRun:
        """The next round after a finished run: warm start from its adapter, its training cases plus the corrected
        (volume, segmentation) pairs, the same audit cases and targets (so the rounds' Dice curves compare)."""
        labels = labels_from_card(self.card(previous.modelId)["labels"])
        channels = self.channelNames(previous.modelId)

        def build(export: Path) -> JobSpec:
            corrected = [self._exportCase(export, f"corrected{i}", f"corrected pair {i + 1}", channels, volume,
                                          segmentation, labels)
                         for i, (volume, segmentation) in enumerate(correctedPairs)]
            return self.client.readapt_request(previous.jobDir, corrected)

        return self._submit(build, previous.modelId, previous.volumes, previous.label, log,
                            trainedOn=[*previous.trainedOn, *(segmentation for _, segmentation in correctedPairs)],
                            round=previous.round + 1)

    def adaptationJobs(self) -> list:
        """The work folder's adaptation jobs as `JobInfo`, newest first (a job whose worker died is `interrupted`)."""
        return [info for info in self.client.jobs() if info.task == "adapt"]

    def openJob(self, folder: str | Path, log=None, resume: bool = False) -> tuple[SceneRun, AdaptationRequest]:
        """Load an adaptation job folder back into the scene (a reopened panel, a restarted server): its input cases
        as volume and segmentation nodes, its events replayed into the monitor, and the panel's request for it.
        `resume`: also restart the worker of an interrupted, cancelled or failed job from its last checkpoint."""
        folder = Path(folder).absolute()
        spec = load_job(folder)
        if spec.task != "adapt":
            raise SceneError(f"{folder}: a {spec.task} job, not an adaptation")
        info = job_info(folder) if resume else None
        if info is not None and not info.resumable:  # refused before any node is loaded
            raise SceneError(f"{folder.name}: the job is {info.state}; only an interrupted, cancelled or failed job "
                             "can be resumed" + (", and the worker refused this one's inputs or settings: start a new "
                                                 "job" if info.state in RESUMABLE else ""))
        modelId = next((card["id"] for card in self.modelCards() if spec.model in (card["id"], card.get("path"))),
                       None) or self.registerModelFolder(spec.model)["id"]
        labels = labels_from_card(self.card(modelId)["labels"])
        channels = self.channelNames(modelId)
        loaded: dict[str, object] = {}  # file content → node: a file the job holds twice (training and target) once

        def node_for(path: str, make):
            """The scene's node for a job input: the one it came from or was loaded into before, if still there."""
            from ..models.safe_load import sha256_file

            key = _resolved(folder, path)
            node = self._inputNodes.get(key)
            if node is None or not self.scene.IsNodePresent(node):
                digest = sha256_file(key)
                node = loaded.get(digest)
                if node is None or not self.scene.IsNodePresent(node):
                    node = loaded[digest] = make(Path(key))
                self._inputNodes[key] = node
            return node

        def load(case: CaseSpec, labelled: bool = True):
            """The case's volume node (a tuple of them, one per channel), with its segmentation if `labelled`."""
            name = case.name or "volume"
            volumes = tuple(node_for(image, lambda path, channel=channel: read_volume(
                                self.scene, path, f"{name} {channel}" if len(case.images) > 1 else name))
                            for image, channel in zip(case.images, channels))
            volume = volumes if len(volumes) > 1 else volumes[0]
            if not (labelled and case.label):
                return volume
            return volume, node_for(case.label, lambda path: import_prediction(
                self.scene, path, volumes[0], labels, f"{volumes[0].GetName()} segmentation"))

        method = spec.method
        pairs = [load(c) for c in (spec.support if method.needs_labels else spec.source)]
        targets = [load(c, labelled=False) for c in spec.predict]
        budget = method.budget
        train = spec.train
        request = AdaptationRequest(
            modelId=modelId, trainingPairs=pairs, auditPairs=[load(c) for c in spec.audit],
            method=method.name, budgetPercent=100 * budget.fraction if budget and budget.fraction else None,
            rank=method.rank, steps=train.steps, patchSize=train.patch_size[0] if train.patch_size else None,
            device=train.device, seed=train.seed, targetVolumes=targets,
            warmStartAdapter=str(resolve_input(folder, spec.warm_start)) if spec.warm_start else None,
            learningRate=train.lr, auditEvery=train.audit_every)
        job = self.client.resume(folder) if resume else self.client.attach(folder)
        run = SceneRun(self, job, modelId, targets, f"{method.name} segmentation", log)
        run.poll()
        return run, request

    def segment(self, modelId: str, volume, adapterFolder: str | None = None, device: str = _TRAIN_DEFAULTS.device,
                log=None) -> SceneRun:
        """Segment one volume (one per channel, `channels_of`) with the model (+ adapter) in a background predict
        job; `importResults` when done."""
        if volume is None:
            raise SceneError("choose a volume to segment")
        channels = self.channelNames(modelId)

        def build(export: Path) -> JobSpec:
            return JobSpec(model=self.modelReference(modelId), task="predict", adapter=adapterFolder,
                           predict=[self._exportCase(export, "volume", "volume to segment", channels, volume)],
                           train=TrainSpec(device=device))

        return self._submit(build, modelId, [volume], "segmentation", log)


def _caseName(volumes) -> str:
    """What a job calls a case (its messages, the nodes of a reopened job): its volume's name; for several channels
    the start their names share ("BraTS-001" of "BraTS-001_flair" and "BraTS-001_t1c"), else the first's."""
    names = [volume.GetName() for volume in volumes]
    shared = os.path.commonprefix(names).rstrip(" _-.")
    return shared if len(names) > 1 and len(shared) >= 3 else names[0]


def _onto_grid_of(path: Path, first: Path) -> None:
    """A channel exported on another grid than the case's first channel, resampled onto that grid (linear): Slicer
    shows the two in one world space, and the engine takes a case's channels on one grid."""
    import SimpleITK as sitk

    from ..data.io import same_geometry, write_image
    from ..data.transforms import onto_grid

    image, reference = sitk.ReadImage(str(path)), sitk.ReadImage(str(first))
    if not same_geometry(image, reference):
        write_image(onto_grid(image, reference), path)


def _predictionOf(segmentation) -> Path | None:
    """The predicted label map a result segmentation came in from, while that file exists."""
    started = segmentation.GetAttribute(STARTED_FROM)
    return Path(started) if started and Path(started).is_file() else None


def _touchedSlices(segmentation, label: Path):
    """(mask of the slices the user changed or marked as checked, the exported label image) of a segmentation that
    came in as a prediction, against that prediction; None for one that did not (or whose prediction is gone)."""
    import SimpleITK as sitk

    from ..data.io import same_geometry
    from ..data.sparse import touched_slices
    from ..data.transforms import onto_grid, to_array

    started = _predictionOf(segmentation)
    if started is None:
        return None
    corrected = sitk.ReadImage(str(label))
    start = sitk.ReadImage(str(started))
    if not same_geometry(start, corrected):
        start = onto_grid(start, corrected, is_label=True)
    marked = json.loads(segmentation.GetAttribute(CHECKED_SLICES) or "[]")
    return touched_slices(to_array(corrected, np.int64), to_array(start, np.int64), marked), corrected


def corrected_by_the_user(segmentation, volume, labels) -> bool:
    """Whether a result segmentation holds the user's work: slices changed or marked as checked since it came in
    (one it cannot export against the model's classes, e.g. a segment added by hand, counts as changed)."""
    if _predictionOf(segmentation) is None:  # nothing to compare with: no export needed
        return False
    with tempfile.TemporaryDirectory() as scratch:
        try:
            label = write_segmentation_as_labelmap(segmentation, volume, labels, Path(scratch) / f"now{EXPORT_SUFFIX}")
        except SceneError:
            return True
        touched = _touchedSlices(segmentation, label)
        return touched is not None and bool(touched[0].any())


def _resolved(folder: Path, path: str) -> str:
    """A job input's path as one key, however the job names it (relative to its folder, or absolute)."""
    return str(resolve_input(Path(folder), path).resolve())
