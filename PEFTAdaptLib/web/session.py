"""The browser panel's working state on one MRML scene: the volumes and segmentations the user brought in, and the
rounds of the current adaptation. Everything about jobs goes through `SceneLogic` (the Slicer module's logic) and
the job client; this class only keeps track of nodes and rounds and turns files into nodes after checking them as
the command line does. No trame here: the app (`app.py`) maps widgets and state onto it.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..data.formats import stem
from ..data.io import read_image, write_image
from ..data.planar import check_dimensions
from ..data.transforms import onto_grid
from ..errors import InputError
from ..jobs import JobClient, SubprocessRunner
from ..jobs.client import ADAPTER_DIR
from ..jobs.create import ADAPTER_FILES
from ..mrml.logic import AdaptationRequest, SceneLogic, SceneRun, SliceToCheck, reference_of
from ..mrml.scene_io import (
    SceneError, labels_from_card, nodes_of_class, read_volume, write_segmentation, write_segmentation_as_labelmap,
    write_volume,
)
from .access import new_subfolder, save_upload

UPLOADS, DOWNLOADS, JOBS, DEMO = "uploads", "downloads", "jobs", "demo"


@dataclass
class Round:
    """One adaptation run of the current lineage (round 1, then each re-adapt) and the segmentations it produced."""

    run: SceneRun
    results: list = field(default_factory=list)
    imported: bool = False
    shown: SliceToCheck | None = None  # what "Next slice to check" showed last


class PanelSession:
    def __init__(self, scene, work_dir: Path, data_dir: Path | None = None):
        self.scene = scene
        self.work_dir = Path(work_dir).absolute()
        self.data_dir = Path(data_dir).absolute() if data_dir else None
        # workers in a session of their own: a Ctrl-C or a closed terminal stops the server, the job trains on
        self.logic = SceneLogic(scene, JobClient(self.work_dir / JOBS, SubprocessRunner(own_session=True)))
        self.sources: dict[str, Path] = {}  # volume node ID → its file (a label is checked against it)
        self.rounds: list[Round] = []

    # -- nodes -----------------------------------------------------------------------------------------------------
    def node(self, node_id: str | None):
        return self.scene.GetNodeByID(node_id) if node_id else None

    def nodes(self, class_name: str) -> list:
        return [n for n in nodes_of_class(self.scene, class_name)
                if not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetHideFromEditors()]

    def volumes(self) -> list:
        return self.nodes("vtkMRMLScalarVolumeNode")

    def segmentations(self) -> list:
        return self.nodes("vtkMRMLSegmentationNode")

    def load_volume(self, path: Path, modelId: str, shown_as: str | None = None):
        """A volume node from an image file, after the checks the command line makes (readable, finite, the
        dimensions the model takes)."""
        with _named(path, shown_as):
            check_dimensions(read_image(path, what="volume"), self.logic.card(modelId).get("spatial_dims", 3), modelId,
                             path.name)
        node = read_volume(self.scene, path, _node_name(shown_as or path.name))
        self.sources[node.GetID()] = path
        return node

    def load_label(self, path: Path, volume, modelId: str, shown_as: str | None = None,
                   label_map: tuple[Path, str] | None = None):
        """A segmentation node from a label map drawn on `volume`, named and coloured by the model's classes; refused
        (one line) when it is not on the volume's grid, holds values the model does not know, or is empty. A label
        in another numbering (FreeSurfer's aseg…) comes with `label_map` (its file and the name the user knows it
        by), which maps it onto the model's classes first, as the command line's --label-map does."""
        if volume is None:
            raise InputError(f"{shown_as or path.name}: choose the volume this label map belongs to")
        source = self.sources.get(volume.GetID())
        if source is None:  # a node the scene made (a reopened job's input): its file is written once
            source = write_volume(volume, new_subfolder(self.work_dir / UPLOADS) / "volume.nrrd")
            self.sources[volume.GetID()] = source
        with _named(path, shown_as), _named(*label_map or ("", None)):
            return self.logic.importLabels(path, volume, source, modelId, _node_name(shown_as or path.name),
                                           label_map and label_map[0])

    def upload(self, name: str, content: bytes) -> Path:
        return save_upload(self.work_dir / UPLOADS, name, content)

    # -- adaptation rounds -----------------------------------------------------------------------------------------
    @property
    def current(self) -> Round | None:
        return self.rounds[-1] if self.rounds else None

    @property
    def running(self) -> bool:
        return self.current is not None and not self.current.imported

    def start(self, request: AdaptationRequest) -> SceneRun:
        """Round 1 of a new lineage."""
        self._refuse_while_running()
        run = self.logic.startAdaptation(request)
        self.rounds = [Round(run)]
        return run

    def readapt(self) -> SceneRun:
        """The next round: the last round's results, as the user corrected them, join the training cases."""
        self._refuse_while_running()
        last = self.current
        if last is None or last.run.state.outcome != "finished":
            raise SceneError("re-adapt continues a finished adaptation; start one first")
        if not last.results:
            raise SceneError("the last round segmented no volume: add a volume under 'Segment after adapting'")
        run = self.logic.startReadaptation(last.run, list(zip(last.run.volumes, last.results)))
        self.rounds.append(Round(run))
        return run

    def next_slice(self, plane: str = "axial") -> SliceToCheck | None:
        """The last round's next slice to check (views moved there), or None when all were shown."""
        last = self.current
        if last is None or not last.results:
            raise SceneError("no segmentation to check yet: adapt with a volume under 'Segment after adapting'")
        last.shown = last.run.nextSliceToCheck(plane)
        return last.shown

    def mark_slice_checked(self) -> SliceToCheck:
        """The slice `next_slice` showed last needs no correction: a re-adapt trains on it too."""
        last = self.current
        if last is None or last.shown is None:
            raise SceneError("show a slice with 'Next slice to check' first")
        shown = last.shown  # on a case's first channel: the volumes of a multi-channel case are a tuple
        case = [reference_of(volume) for volume in last.run.volumes].index(shown.volume)
        self.logic.markSlicesChecked(last.results[case], shown.axis, [shown.index])
        return last.shown

    def cancel(self) -> None:
        if self.running:
            self.current.run.cancel()

    def _refuse_while_running(self) -> None:
        if self.running:
            raise SceneError("an adaptation is running; cancel it or wait for it to finish")

    def poll(self) -> bool:
        """Follow the running round; when it has finished, bring its predictions in. True when anything changed."""
        current = self.current
        if current is None or current.imported:
            return False
        before = len(current.run.job.events)
        state = current.run.poll()
        changed = len(current.run.job.events) != before
        if state.finished:
            current.imported = True
            if state.outcome == "finished":
                current.results = current.run.importResults()
                for overlay in current.run.uncertaintyNodes:  # shown over the slices, never a volume to pick
                    overlay.SetHideFromEditors(True)
            changed = True
        return changed

    def open_job(self, folder: Path, resume: bool = False) -> AdaptationRequest:
        """A job folder of the work folder back in the panel, with the earlier rounds it continued from (`resume`:
        its worker restarted from the last checkpoint). Refused while a round runs: the panel follows one job."""
        self._refuse_while_running()
        run, request = self.logic.openJob(folder, resume=resume)
        self.rounds = [Round(run)]
        parent = self._continued_from(request.warmStartAdapter)
        while parent is not None:
            earlier = SceneRun(self.logic, self.logic.client.attach(parent), run.modelId, [], run.label)
            earlier.poll()  # its events only: the chart's earlier curve
            self.rounds.insert(0, Round(earlier, imported=True))
            warm = earlier.job.spec.warm_start
            parent = self._continued_from(str(parent / warm)) if warm else None
        run.round = len(self.rounds)  # its results are named after it ("… round 2"), as a re-adapt's are
        self.poll()
        return request

    def _continued_from(self, warm_start: str | None) -> Path | None:
        """The job of the work folder whose adapter a job's warm start is a copy of (each job keeps a copy of the
        adapter it continued from, so the rounds are linked by the adapter's files)."""
        if not warm_start or not (Path(warm_start) / ADAPTER_FILES[0]).is_file():
            return None
        copy = [(Path(warm_start) / name).read_bytes() for name in ADAPTER_FILES]
        for info in self.logic.client.jobs():
            adapter = info.folder / ADAPTER_DIR
            if info.task == "adapt" and all((adapter / name).is_file() for name in ADAPTER_FILES) and \
                    [(adapter / name).read_bytes() for name in ADAPTER_FILES] == copy:
                return info.folder
        return None

    # -- downloads (written in the work folder, then sent) ---------------------------------------------------------
    def adapter_zip(self) -> tuple[str, bytes]:
        current = self.current
        if current is None or not (current.run.adapterFolder / "adapter.json").is_file():
            raise SceneError("no adapter yet: it is written when an adaptation finishes (or is cancelled)")
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(current.run.adapterFolder.iterdir()):
                archive.write(path, f"{ADAPTER_DIR}/{path.name}")
        name = f"{current.run.jobDir.name}-adapter.zip"
        (self._downloads() / name).write_bytes(buffer.getvalue())
        return name, buffer.getvalue()

    def segmentation_file(self, segmentation, kind: str, modelId: str) -> tuple[str, bytes]:
        """`seg.nrrd` (Slicer's, all segments) or `nii.gz` (a label map with the model's values on the volume's grid)."""
        if segmentation is None:
            raise SceneError("choose a segmentation to download")
        name = "".join(c if c.isalnum() or c in "-_." else "_" for c in segmentation.GetName()).strip("_") or "seg"
        path = self._downloads() / f"{name}.{kind}"
        if kind == "seg.nrrd":
            write_segmentation(segmentation, path)
        else:
            reference = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
            if reference is None:
                raise SceneError(f"segmentation '{segmentation.GetName()}' has no reference volume for its grid")
            write_segmentation_as_labelmap(segmentation, reference, labels_from_card(self.logic.card(modelId)["labels"]),
                                           path)
            source = self.sources.get(reference.GetID())
            if source is not None:  # Slicer holds a left-handed file's grid with one axis reversed: back onto the
                # file's own grid (same voxel centres), so the label pairs with the user's image anywhere
                write_image(onto_grid(read_image(path, "label"), read_image(source), is_label=True), path)
        return path.name, path.read_bytes()

    def _downloads(self) -> Path:
        folder = self.work_dir / DOWNLOADS
        folder.mkdir(parents=True, exist_ok=True)
        return folder


def write_demo_files(work_dir: Path) -> dict[str, tuple[Path, Path]]:
    """The demo's support, audit and test volumes with their brain masks (made once per work folder)."""
    from ..demo import SEEDS, write_demo_data

    folder = Path(work_dir) / DEMO
    paths = {role: (folder / f"{role}_t2like.nii.gz", folder / f"{role}_brainmask.nii.gz") for role in SEEDS}
    if all(image.is_file() and label.is_file() for image, label in paths.values()):
        return paths
    return write_demo_data(folder)


def _node_name(shown_as: str) -> str:
    """`case1/t1.nii.gz` → `case1/t1`: the file's folder tells apart the same file name in several cases."""
    parts = Path(shown_as).parts
    return "/".join([*parts[-2:-1], stem(parts[-1])])


class _named:
    """Errors about a file saved under a server path name the file as the user knows it."""

    def __init__(self, path: Path, shown_as: str | None):
        self.path, self.shown_as = str(path), shown_as

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback):
        if isinstance(exc, InputError) and self.shown_as:
            raise InputError(str(exc).replace(self.path, self.shown_as)) from None
        return False
