"""Checkpoints: the adapter (safetensors + JSON), the best audited adapter, the trainer state (optimizer, RNG,
history, hook/allocator state) and the job they belong to — written to a fresh folder and swapped in by rename, so a
kill at any instant leaves either the previous or the new checkpoint complete."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .adapters import load_adapters, save_adapters
from .errors import InputError, ModelError
from .jobs.files import replace_folder, write_file
from .jobs.spec import JOB_FILE, JobSpec, changed_fields

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"
#: the trainer state's record of the job it belongs to (a file copied in from another job is refused)
JOB_KEY = "job_sha256"


def save_checkpoint(job_dir: Path, trainer, base_fingerprint: str, metadata: dict, spec: JobSpec) -> Path:
    """Only called between steps: the state is then consistent (a crash mid-step writes no checkpoint)."""
    def write(folder: Path) -> None:
        save_adapters(trainer.network, folder / "adapter", base_fingerprint, {**metadata, "step": trainer.step})
        torch.save({**trainer.state_dict(), JOB_KEY: job_digest(spec)}, folder / STATE_FILE)
        write_file(folder / JOB_FILE, spec.to_json())

    return replace_folder(job_dir, CHECKPOINT_DIR, write)


def latest_checkpoint(job_dir: Path) -> Path | None:
    """The last complete checkpoint (also after a kill between the two renames of `save_checkpoint`)."""
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.previous"):
        folder = job_dir / name
        if all((folder / f).is_file() for f in (STATE_FILE, JOB_FILE, "adapter/adapter.json")):
            return folder
    return None


def check_same_job(folder: Path, spec: JobSpec, job_file: Path) -> None:
    """A checkpoint continues only the job it was written for: resuming after `job.json` was edited would train a
    mixture of two jobs (and, with other units, fail half-way). Refused naming the changed fields."""
    try:
        saved = json.loads((folder / JOB_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder / JOB_FILE}: unreadable checkpoint record ({exc})") from None
    changed = changed_fields(saved, json.loads(spec.to_json()))
    if changed:
        raise InputError(f"{job_file}: changed since the checkpoint was written ({', '.join(changed)}); a resume "
                         "continues the job as it was — restore those fields, or start a new job")


def job_digest(spec: JobSpec) -> str:
    return hashlib.sha256(spec.to_json().encode()).hexdigest()


def load_checkpoint(folder: Path, trainer, base_fingerprint: str, spec: JobSpec) -> None:
    """The checkpoint's adapter and trainer state, which must be of this job and of the adapter's step: a state
    file from another job or step would resume a run that never happened, and report it as this one."""
    config = load_adapters(trainer.network, folder / "adapter", base_fingerprint)
    path = folder / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        step, saved_job = state["step"], state.get(JOB_KEY)  # checkpoints written before the record have none
    except Exception as exc:  # noqa: BLE001 - any unpickling problem means an unusable checkpoint
        raise ModelError(f"{path}: unusable checkpoint ({type(exc).__name__}: {exc})") from None
    if step != config.get("metadata", {}).get("step") or saved_job not in (None, job_digest(spec)):
        raise ModelError(f"{path}: not this checkpoint's trainer state (another job's, or another step's than its "
                         "adapter); start the job again (--overwrite)")
    try:
        trainer.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - any fitting problem means an unusable checkpoint
        raise ModelError(f"{path}: unusable checkpoint ({type(exc).__name__}: {exc})") from None
