"""`job.json`: what to do, with which model, method and settings, on which files. Schema-versioned and checked
when it is made and when it is read, so a bad request fails with one line naming the field."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError
from ..jsonfile import read_json
from ..methods import DEFAULT_METHOD, Cases, MethodConfig, make_method, method_from_dict
from .files import write_file

SCHEMA_VERSION = 2
JOB_FILE = "job.json"
TASKS = ("adapt", "predict")
DEVICES = ("auto", "cpu", "cuda", "mps")
#: AdamW steps each parameter by about the learning rate: above 1 an adapter is destroyed in one step, and from ~3e37
#: the optimizer's own arithmetic overflows float32
MAX_LR = 1.0


@dataclass
class CaseSpec:
    images: list[str]  # one path per input channel; absolute, or relative to the job folder
    label: str | None = None
    name: str = ""  # shown to the user; predictions are named after it
    annotated: str | None = None  # mask of the label's annotated voxels (sparse supervision); None: all of them

    def __post_init__(self):
        if not self.images or not all(isinstance(p, str) and p for p in self.images):
            raise InputError(f"case {self.name or self.images!r}: needs at least one image path")
        if self.annotated is not None and not self.label:
            raise InputError(f"case {self.name or self.images[0]!r}: an annotated-voxel mask needs its label (field "
                             "'annotated')")


def _whole(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"train.{name}: {value!r} must be a whole number ≥ {minimum}")


@dataclass
class TrainSpec:
    steps: int = 200
    lr: float | None = None  # None: the method's default
    patch_size: list[int] | None = None  # None: the model card's; [N]: N along every axis of the model's
    patches_per_step: int = 2
    audit_every: int = 20
    checkpoint_every: int = 20
    seed: int = 0
    device: str = "auto"

    def __post_init__(self):
        _whole(self.steps, "steps", 1)
        _whole(self.patches_per_step, "patches_per_step", 1)
        _whole(self.audit_every, "audit_every", 1)
        _whole(self.checkpoint_every, "checkpoint_every", 0)
        _whole(self.seed, "seed", 0)
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not math.isfinite(self.lr) or not 0 < self.lr <= MAX_LR):
            raise InputError(f"train.lr: {self.lr!r} must be a finite number in (0, {MAX_LR:g}] (typically 1e-4 "
                             "to 1e-2)")
        if self.patch_size is not None:
            if not isinstance(self.patch_size, list) or len(self.patch_size) not in (1, 2, 3):
                raise InputError(f"train.patch_size: {self.patch_size!r} must be three whole numbers (x, y, z), two "
                                 "(x, y) for a 2D model, or one for every axis")
            for size in self.patch_size:
                _whole(size, "patch_size", 8)
        if self.device not in DEVICES:
            raise InputError(f"train.device: '{self.device}' is not one of {', '.join(DEVICES)}")


@dataclass
class JobSpec:
    model: str  # a model id (`peftadapt models`) or a model folder/file path
    support: list[CaseSpec] = field(default_factory=list)
    audit: list[CaseSpec] = field(default_factory=list)
    predict: list[CaseSpec] = field(default_factory=list)
    #: label-free only: labelled source-like cases that train its early segmentation head (optional)
    source: list[CaseSpec] = field(default_factory=list)
    method: MethodConfig | None = None  # adapt: None takes DEFAULT_METHOD
    train: TrainSpec = field(default_factory=TrainSpec)
    task: str = "adapt"
    warm_start: str | None = None  # adapt: an earlier job's adapter folder to continue from
    adapter: str | None = None  # predict: the adapter folder to apply
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.task not in TASKS:
            raise InputError(f"task: '{self.task}' is not one of {', '.join(TASKS)}")
        if not isinstance(self.model, str) or not self.model:
            raise InputError("model: a model id or a model folder is required")
        if self.task == "adapt" and self.method is None:
            self.method = make_method(DEFAULT_METHOD)

    def check(self, where: str = "job") -> None:
        """What the job needs before any file is read: the method's data, a re-adapt it can take, a predict job's
        images. Raises InputError naming the field."""
        if self.task == "predict":
            if not self.predict:
                raise InputError(f"{where}: a predict job needs at least one image (field 'predict')")
            return
        self.method.check_cases(Cases(self.support, self.audit, self.source), where)
        if self.warm_start and not self.method.warm_startable:
            raise InputError(f"{where}: method '{self.method.name}' starts from the source model; it cannot continue "
                             "from an earlier adapter (field 'warm_start')")

    @property
    def lr(self) -> float:
        return self.train.lr if self.train.lr is not None else self.method.default_lr

    def to_dict(self) -> dict:
        data = asdict(self)
        data["method"] = self.method.to_dict() if self.method is not None else None
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "JobSpec":
        if not isinstance(data, dict):
            raise InputError(f"{source}: not a job description (a JSON object is expected)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"{source}: schema_version {version!r} is not supported (this worker reads {SCHEMA_VERSION})")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"{source}: unknown field '{unknown[0]}'")
        try:
            cases = lambda key: [CaseSpec(**c) for c in data.get(key) or []]  # noqa: E731
            method = data.get("method")
            return cls(
                model=data["model"], support=cases("support"), audit=cases("audit"), predict=cases("predict"),
                source=cases("source"), method=method_from_dict(method, f"{source}: method") if method else None,
                train=TrainSpec(**(data.get("train") or {})), task=data.get("task", "adapt"),
                warm_start=data.get("warm_start"), adapter=data.get("adapter"), schema_version=version,
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"{source}: invalid job description ({exc})") from None
        except InputError as exc:
            message = str(exc)
            raise InputError(message if message.startswith(source) else f"{source}: {message}") from None


def write_spec(job_dir: Path, spec: JobSpec) -> Path:
    """Write job.json atomically (a reader never sees half of it, a link in the folder is not followed)."""
    return write_file(job_dir / JOB_FILE, spec.to_json())


def changed_fields(before: dict, after: dict, prefix: str = "") -> list[str]:
    """The dotted names of the fields that differ between two job descriptions (`train.lr`, `support`…)."""
    changed = []
    for key in sorted(set(before) | set(after), key=str):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_fields(old, new, f"{prefix}{key}.")
        elif old != new:
            changed.append(f"{prefix}{key}")
    return changed


def load_job(job_dir: str | Path) -> JobSpec:
    path = Path(job_dir) / JOB_FILE
    spec = JobSpec.from_dict(read_json(path, "job description"), str(path))
    spec.check(str(path))
    return spec


def resolve_input(job_dir: Path, path: str) -> Path:
    """Inputs may be absolute; a relative path must stay inside the job folder (no `..` escapes)."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    resolved = (job_dir / candidate).resolve()
    if not resolved.is_relative_to(job_dir.resolve()):
        raise InputError(f"{path}: relative path escapes the job folder {job_dir}")
    return resolved

