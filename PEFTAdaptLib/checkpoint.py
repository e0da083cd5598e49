"""Checkpoints: the adapter (safetensors + JSON), the best audited adapter, and the trainer state (optimizer, RNG,
history, hook/allocator state) — written to a fresh folder and swapped in by rename, so a kill at any instant leaves
either the previous or the new checkpoint complete."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .adapters import load_adapters, save_adapters
from .errors import ModelError

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"


def save_checkpoint(job_dir: Path, trainer, base_fingerprint: str, metadata: dict) -> Path:
    final = job_dir / CHECKPOINT_DIR
    staging = job_dir / f".{CHECKPOINT_DIR}.writing"
    shutil.rmtree(staging, ignore_errors=True)
    save_adapters(trainer.network, staging / "adapter", base_fingerprint, {**metadata, "step": trainer.step})
    torch.save(trainer.state_dict(), staging / STATE_FILE)
    previous = job_dir / f".{CHECKPOINT_DIR}.previous"
    shutil.rmtree(previous, ignore_errors=True)
    if final.exists():
        os.replace(final, previous)
    os.replace(staging, final)
    shutil.rmtree(previous, ignore_errors=True)
    return final


def latest_checkpoint(job_dir: Path) -> Path | None:
    """The last complete checkpoint (also after a kill between the two renames of `save_checkpoint`)."""
    for name in (CHECKPOINT_DIR, f".{CHECKPOINT_DIR}.previous"):
        folder = job_dir / name
        if (folder / STATE_FILE).is_file() and (folder / "adapter" / "adapter.json").is_file():
            return folder
    return None


def load_checkpoint(folder: Path, trainer, base_fingerprint: str) -> None:
    load_adapters(trainer.network, folder / "adapter", base_fingerprint)
    try:
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling problem means an unusable checkpoint
        raise ModelError(f"{folder / STATE_FILE}: unreadable checkpoint ({exc})") from None
    trainer.load_state_dict(state)
