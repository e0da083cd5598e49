"""`job.json`: what to adapt, on which files, how. Schema-versioned; paths are checked against the job folder."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError

SCHEMA_VERSION = 1
JOB_FILE = "job.json"


@dataclass
class CaseSpec:
    images: list[str]  # one path per input channel; absolute, or relative to the job folder
    label: str | None = None


@dataclass
class MethodSpec:
    name: str = "lora"
    rank: int = 4
    #: trainable-parameter budget: a fraction of the model's parameters if ≤ 1, else an absolute count; None = rank
    budget: float | None = None


@dataclass
class TrainSpec:
    steps: int = 200
    lr: float = 2e-3
    patch_size: list[int] | None = None  # None: the model card's
    patches_per_step: int = 2
    audit_every: int = 20
    checkpoint_every: int = 20
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, mps


@dataclass
class JobSpec:
    model: str
    support: list[CaseSpec]
    audit: list[CaseSpec]
    method: MethodSpec = field(default_factory=MethodSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    predict: list[CaseSpec] = field(default_factory=list)
    warm_start: str | None = None  # an earlier job's adapter folder
    #: label-free only: labelled source-like cases that train its early segmentation head (optional)
    source: list[CaseSpec] = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "JobSpec":
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(f"{source}: schema_version {version!r} is not supported (this worker reads {SCHEMA_VERSION})")
        try:
            cases = lambda key: [CaseSpec(**c) for c in data.get(key, [])]  # noqa: E731
            return cls(
                model=data["model"], support=cases("support"), audit=cases("audit"),
                method=MethodSpec(**data.get("method", {})), train=TrainSpec(**data.get("train", {})),
                predict=cases("predict"), warm_start=data.get("warm_start"), source=cases("source"),
                schema_version=version,
            )
        except (KeyError, TypeError) as exc:
            raise InputError(f"{source}: invalid job description ({exc})") from None


def write_job(job_dir: str | Path, spec: JobSpec) -> Path:
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / JOB_FILE
    path.write_text(json.dumps(spec.to_dict(), indent=2))
    return path


def load_job(job_dir: str | Path) -> JobSpec:
    path = Path(job_dir) / JOB_FILE
    if not path.is_file():
        raise InputError(f"{path}: job description not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    return JobSpec.from_dict(data, str(path))


def resolve_input(job_dir: Path, path: str) -> Path:
    """Inputs may be absolute; a relative path must stay inside the job folder (no `..` escapes)."""
    candidate = Path(path)
    if candidate.is_absolute():
        return candidate
    resolved = (job_dir / candidate).resolve()
    if not resolved.is_relative_to(job_dir.resolve()):
        raise InputError(f"{path}: relative path escapes the job folder {job_dir}")
    return resolved


def inside_job(job_dir: Path, relative: str) -> Path:
    """An output path, refused unless it resolves (symlinks followed) inside the job folder."""
    resolved = (job_dir / relative).resolve()
    if not resolved.is_relative_to(job_dir.resolve()):
        raise InputError(f"{relative}: output path escapes the job folder {job_dir}")
    return resolved
