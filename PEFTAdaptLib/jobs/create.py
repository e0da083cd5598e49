"""Making a job folder from a request: the one builder every front-end (CLI, Slicer, browser, benchmarks) uses.

Every input is copied into `inputs/` under a name made from its role and index (`inputs/support0_image0.nii.gz`,
`inputs/support0_label.nii.gz`, `inputs/warm_start/`…), and `job.json` refers to those copies only. A job folder is
therefore a complete record: it can be resumed, re-adapted or inspected after the originals moved, and the same
request makes the same `job.json` whichever front-end sent it.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from ..data.formats import distinct_names, image_suffix
from ..errors import InputError, ModelError
from ..jsonfile import read_json
from ..models.card import TRAINED_IN_FULL, refuse_untrained_head
from .files import check_writable, refuse_linked_folder, remove
from .lock import LOCK_FILE, JobLock, JobLocked, is_running
from .spec import JOB_FILE, CaseSpec, JobSpec, write_spec

INPUTS_DIR = "inputs"
ADAPTER_DIR = "adapter"  # where the worker writes an adapt job's adapter
DETACHED = {".nhdr": ".nrrd", ".mhd": ".mha"}  # header + separate data file → one self-contained file
ADAPTER_FILES = ("adapter.json", "adapter.safetensors")


def _stage_file(source: str, job_dir: Path, name: str) -> str:
    path = Path(source).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    suffix = image_suffix(path)
    target = job_dir / INPUTS_DIR / (name + DETACHED.get(suffix, suffix))
    if suffix in DETACHED:
        import SimpleITK as sitk

        try:
            sitk.WriteImage(sitk.ReadImage(str(path)), str(target), useCompression=True)
        except RuntimeError as exc:
            raise InputError(f"{path}: cannot read image ({str(exc).strip().splitlines()[-1]})") from None
    else:
        shutil.copyfile(path, target)
    return target.relative_to(job_dir).as_posix()


def _stage_case(case: CaseSpec, job_dir: Path, prefix: str, name: str) -> CaseSpec:
    images = [_stage_file(p, job_dir, f"{prefix}_image{c}") for c, p in enumerate(case.images)]
    label = _stage_file(case.label, job_dir, f"{prefix}_label") if case.label else None
    annotated = _stage_file(case.annotated, job_dir, f"{prefix}_annotated") if case.annotated else None
    return CaseSpec(images, label, name, annotated)


def adapter_folder(source: str | Path) -> Path:
    """The adapter folder `source` names: itself, or the `adapter/` of the job folder it is (the folder users know)."""
    folder = Path(source).expanduser()
    if not (folder / ADAPTER_FILES[0]).is_file() and (folder / JOB_FILE).is_file():
        folder = folder / ADAPTER_DIR
    missing = [f for f in ADAPTER_FILES if not (folder / f).is_file()]
    if missing:
        raise InputError(f"{folder}: not an adapter folder ({' and '.join(missing)} missing)")
    return folder


def _stage_adapter(source: str, job_dir: Path, name: str) -> str:
    folder = adapter_folder(source)
    target = job_dir / INPUTS_DIR / name
    target.mkdir()
    for file in ADAPTER_FILES:
        shutil.copyfile(folder / file, target / file)
    return target.relative_to(job_dir).as_posix()


def _check_folder(job_dir: Path, overwrite: bool) -> None:
    """Refuse (writing nothing) a folder that cannot take this job: a link (written, or emptied, through), not
    makeable, or holding something that is not an earlier job of ours (the job lock file aside) unless `overwrite`
    replaces that job."""
    refuse_linked_folder(job_dir)
    if job_dir.exists() and not job_dir.is_dir():
        raise InputError(f"{job_dir}: exists and is not a folder; choose a job folder path")
    check_writable(job_dir, "the job folder")
    if not job_dir.is_dir() or not [c for c in job_dir.iterdir() if c.name != LOCK_FILE]:
        return
    if not overwrite:
        holds = " (it holds a job with its adapter)" if (job_dir / ADAPTER_DIR).exists() else ""
        raise InputError(f"{job_dir}: folder is not empty{holds}; choose a new job folder, resume the job in it, or "
                         "replace it (--overwrite)")
    if not (job_dir / JOB_FILE).is_file():
        raise InputError(f"{job_dir}: not a job folder (no {JOB_FILE}); refusing to overwrite it")


def _lock(job_dir: Path) -> JobLock:
    """The job lock, held while the job is written: a worker started meanwhile (by an earlier request for this
    folder) stops with exit code 5 instead of reading a half-written job, and a running job is never replaced."""
    try:
        job_dir.mkdir(parents=True, exist_ok=True)
        return JobLock(job_dir).__enter__()
    except JobLocked:
        raise InputError(f"{job_dir}: a worker is running this job, or another job is being written into the "
                         "folder; cancel it (or wait) before replacing it") from None
    except OSError as exc:
        raise InputError(f"{job_dir}: cannot create the job folder ({exc.strerror})") from None


def create_job(job_dir: str | Path, request: JobSpec, overwrite: bool = False) -> Path:
    """Check `request`, copy its inputs into `job_dir/inputs/` and write `job.json`; returns the job folder.

    The folder must be new or empty (`overwrite=True` replaces an earlier job that is not running). It is checked
    before any input is read, and again under the job lock before anything is written."""
    from ..models.registry import model_reference

    job_dir = Path(job_dir).expanduser().absolute()
    request.check("request")
    request = replace(request, model=model_reference(request.model))
    _check_folder(job_dir, overwrite)
    if is_running(job_dir):
        raise InputError(f"{job_dir}: a worker is running this job; cancel it before replacing it")
    request = check_inputs(request)
    lock = _lock(job_dir)
    try:
        _check_folder(job_dir, overwrite)  # again: another request may have written a job here meanwhile
        for child in job_dir.iterdir():
            if child.name != LOCK_FILE:
                remove(child)  # links removed, never followed
        (job_dir / INPUTS_DIR).mkdir()
        try:
            # a case the front-end did not name is named after its file, told apart from others of that file name
            cases = [c for role in ROLES for c in getattr(request, role)]
            names = distinct_names([c.images[0] for c in cases if not c.name], {c.name for c in cases if c.name})
            roles = {role: [_stage_case(c, job_dir, f"{role}{i}", c.name or names[c.images[0]])
                            for i, c in enumerate(getattr(request, role))] for role in ROLES}
            staged = replace(
                request, **roles,
                warm_start=_stage_adapter(request.warm_start, job_dir, "warm_start") if request.warm_start else None,
                adapter=_stage_adapter(request.adapter, job_dir, "adapter") if request.adapter else None,
            )
            write_spec(job_dir, staged)
        except BaseException:
            shutil.rmtree(job_dir / INPUTS_DIR, ignore_errors=True)  # a refused request leaves no half-made job
            raise
    finally:
        lock.__exit__(None, None, None)
    return job_dir


ROLES = ("support", "audit", "source", "predict")


def check_inputs(request: JobSpec) -> JobSpec:
    """Read every input as the worker will (model card known, files named as the user gave them), so that a bad
    file is refused in one line before a job folder exists. Returns the request with its patch size written out per
    axis (`--patch-size 64` and a panel's 64 make the same job)."""
    from ..data.cases import check_annotated_reaches_grid, read_case_files
    from ..data.io import volume_digest
    from ..data.sparse import read_annotated
    from ..models.registry import model_card

    card = model_card(request.model)
    if request.task == "adapt" and card.is_torchscript:
        raise ModelError(f"{request.model}: a TorchScript model predicts (`peftadapt predict`) but cannot be adapted: "
                         "the adaptation methods add their units to an eager network's layers; give the model's MONAI "
                         "bundle or nnU-Net folder instead")
    if request.train.patch_size:
        request = replace(request, train=replace(request.train,
                                                 patch_size=list(card.training_patch(request.train.patch_size))))
    if request.task == "predict" and not request.adapter and card.extra.get(TRAINED_IN_FULL):
        raise InputError(f"model '{card.id}' has an untrained part ({', '.join(card.extra[TRAINED_IN_FULL])}) that "
                         "an adaptation trains: adapt it first, then predict with its adapter")
    for source in filter(None, (request.adapter, request.warm_start)):
        folder = adapter_folder(source)
        refuse_untrained_head(read_json(folder / ADAPTER_FILES[0], "adapter config", ModelError), folder)
    labelled = {"support": request.task == "adapt" and request.method.needs_labels, "audit": True, "source": True,
                "predict": False}
    trained: dict[str, str] = {}  # volume digest → the training image file
    for role in ROLES:
        for case in getattr(request, role):
            if labelled[role] and case.label and any(_same_file(case.label, image) for image in case.images):
                raise InputError(f"{case.label}: the label is the image file itself; give the label map")
            channels, _ = read_case_files(case.images, card, case.label if labelled[role] else None)
            if case.annotated and labelled[role]:
                check_annotated_reaches_grid(read_annotated(case.annotated, channels[0], case.images[0]), card,
                                             case.annotated, case.images[0])
            if role in ("support", "audit") and labelled[role]:
                digest = volume_digest(channels[0])
                if role == "audit" and digest in trained:
                    remedy = ("a re-adapt keeps the audit of the job it continues: correct another volume, or start "
                              "a new job with another audit" if request.warm_start else
                              "give another, or none (the job then holds out a slab of each training volume)")
                    raise InputError(f"{case.images[0]}: this audit volume is the training volume {trained[digest]} "
                                     "(the same voxels): an audit must be a volume the job does not train on; "
                                     + remedy)
                if role == "support":
                    trained.setdefault(digest, case.images[0])
    return request


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).samefile(b)
    except OSError:  # a missing file: named by the reader
        return False
