"""Loading weight files without running code from them, and checking they are the files we expect.

A `.pt`/`.pth`/`.ckpt` file is a pickle: plain `torch.load` would run whatever code the file names. Only safetensors
files and pickles that torch's `weights_only` unpickler accepts (tensors, containers, numbers, strings) are loaded;
anything else is refused with the file named, never unpickled in full.
"""
from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelError

if TYPE_CHECKING:  # torch is imported only when weights are actually read
    import torch
    from torch import nn

#: how many mismatching names a shape/key error lists before "…"
SHOWN_MISMATCHES = 5


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: str | Path, expected: str, what: str = "the model file") -> Path:
    """Return `path` if its sha256 is `expected`; a mismatch means a corrupt, truncated or substituted file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: {what} is missing")
    actual = sha256_file(path)
    if actual.lower() != expected.lower():
        raise ModelError(f"{path}: checksum mismatch (sha256 {actual[:12]}…, expected {expected[:12]}…); "
                         f"{what} is corrupt or not the published one — download it again")
    return path


def is_safetensors(path: Path) -> bool:
    """Sniff the content, not the suffix: brainchop ships safetensors files named `model.pth`."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    header_length = int.from_bytes(head[:8], "little")
    return 0 < header_length < 100_000_000 and head[8:9] == b"{"


def _refused(path: Path, exc: Exception) -> ModelError:
    return ModelError(
        f"{path}: refused to load — this pickle would run code or build objects beyond plain tensors ({exc}). "
        "Only load it if you trust its source; then convert it once, e.g. `safetensors.torch.save_file("
        "torch.load(path, weights_only=False), 'model.safetensors')`, and point PEFTAdapt at the .safetensors file"
    )


def load_checkpoint(path: str | Path, allowed_globals: Iterable[Any] = ()) -> Any:
    """Unpickle `path` with torch's weights-only unpickler (plus `allowed_globals`, harmless types only)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file is missing")
    allowed = list(allowed_globals)
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if allowed and safe_globals is not None:
            with safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _refused(path, exc) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise ModelError(f"{path}: not a readable PyTorch weights file ({exc})") from None


def load_state_dict_file(path: str | Path) -> dict[str, "torch.Tensor"]:
    """A flat {name: tensor} dict from a safetensors file or a weights-only PyTorch pickle (on the CPU)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file is missing")
    if path.suffix == ".safetensors" or is_safetensors(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"{path}: not a readable safetensors file ({exc})") from None
    state = load_checkpoint(path)
    for key in ("state_dict", "model", "network_weights"):  # common checkpoint wrappers
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise ModelError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    return dict(state)


def _shown(names: list[str]) -> str:
    more = len(names) - SHOWN_MISMATCHES
    return ", ".join(names[:SHOWN_MISMATCHES]) + (f" and {more} more" if more > 0 else "")


def load_into(network: "nn.Module", state: Mapping[str, "torch.Tensor"], path: str | Path) -> "nn.Module":
    """Copy `state` into `network`, or say which tensors of `path` do not fit the network built for it."""
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} ≠ {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    if wrong:
        problems.append(f"shape mismatch (file ≠ network) for {_shown(wrong)}")
    if missing:
        problems.append(f"missing {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected {_shown(unexpected)}")
    if problems:
        raise ModelError(f"{path}: weights do not match the network described beside them: {'; '.join(problems)}")
    network.load_state_dict(dict(state))
    return network
