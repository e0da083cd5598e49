"""Which TorchScript files the user has declared trusted, remembered per sha256 in the user's own config folder.

TorchScript is a program, not weights: `torch.jit.load` runs a module's `__setstate__` and `forward` runs whatever
the file says, including reading and writing files (`torch.from_file`). A TorchScript model therefore loads only
when the user has marked its exact bytes trusted (`peftadapt trust PATH`). The store lives in `$PEFTADAPT_HOME`,
else `$XDG_CONFIG_HOME/peftadapt`, else `~/.config/peftadapt` — never beside the model or in a job folder, where
whoever supplied the files could write it. The built-in deepbet files do not go through here: their sha256 is pinned
in the code (`deepbet.py`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ModelError

HOME_ENV = "PEFTADAPT_HOME"
STORE_NAME = "trusted_models.json"


def config_dir() -> Path:
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "peftadapt"


def store_path() -> Path:
    return config_dir() / STORE_NAME


def _records() -> dict[str, dict]:
    path = store_path()
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable trust store ({exc}); delete it and trust your models again") from None
    return records if isinstance(records, dict) else {}


def _refusal(path: Path, digest: str) -> ModelError:
    return ModelError(
        f"{path}: refused to load TorchScript (sha256 {digest}): a TorchScript file is a program that can read and "
        f"write your files when loaded or run; if you trust its source, run `peftadapt trust {path}` and retry")


def is_trusted(digest: str) -> bool:
    return digest in _records()


def require_trusted(path: Path) -> None:
    """Raise the refusal naming the file, its sha256 and the command that trusts it, unless it is trusted."""
    from .safe_load import sha256_file

    digest = sha256_file(path)
    if not is_trusted(digest):
        raise _refusal(path, digest)


def trust_file(path: Path) -> str:
    """Record `path`'s current bytes as trusted; returns their sha256."""
    from .safe_load import sha256_file

    path = Path(path).resolve()
    if not path.is_file():
        raise ModelError(f"{path}: file not found; nothing to trust")
    digest = sha256_file(path)
    records = _records()
    records[digest] = {"path": str(path), "trusted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    store = store_path()
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        temporary = store.with_name(f".{STORE_NAME}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps(records, indent=2))
        temporary.replace(store)
    except OSError as exc:
        raise ModelError(f"{store}: cannot record the trusted file ({exc.strerror}); set {HOME_ENV} to a writable "
                         "folder") from None
    return digest


def load_trusted_torchscript(path: Path):
    """`torch.jit.load` of exactly the bytes whose sha256 was checked (no window to swap the file in between)."""
    import torch

    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if not is_trusted(digest):
        raise _refusal(path, digest)
    try:
        return torch.jit.load(io.BytesIO(data), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable TorchScript file ({exc}); save it with torch.jit.save") from None
