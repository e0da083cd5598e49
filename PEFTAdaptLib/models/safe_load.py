"""Loading weight files without running code from them, and checking they are the files we expect.

A `.pt`/`.pth`/`.ckpt` file is a pickle: plain `torch.load` would run whatever code the file names. Only safetensors
files and pickles that torch's `weights_only` unpickler accepts (tensors, containers, numbers, strings) are loaded;
anything else is refused with the file named, never unpickled in full.
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
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


def first_line(exc: Exception) -> str:
    """The first non-empty line of a library's message, whitespace collapsed: our refusals are one line."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _refused(path: Path, exc: Exception) -> ModelError:
    """One line naming what the pickle asked for (torch's `GLOBAL module.name`), never torch's own text around it,
    which advises re-running with `weights_only=False`: that would run the code of the file just refused."""
    named = re.search(r"GLOBAL [\w.]+", str(exc))
    reason = named.group(0) if named else "not a weights-only pickle"
    return ModelError(
        f"{path}: refused to load — this pickle would run code or build objects beyond plain tensors ({reason}); "
        "convert a file only from a source you trust to .safetensors and point PEFTAdapt at that (docs/models.md)"
    )


def archive_members(path: Path) -> list[str]:
    """The member names of a zip (torch's archive format), read without unpickling anything; [] for a file that is
    no zip. One that starts as a zip but whose directory cannot be read (cut short or altered in transit) is refused
    here in one line: torch says "Invalid argument", or a paragraph about miniz."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError):
        try:
            with open(path, "rb") as file:
                starts_as_zip = file.read(4) == b"PK\x03\x04"
        except OSError:  # unreadable: the loader says so
            return []
        if starts_as_zip:
            raise ModelError(f"{path}: damaged or incomplete — a PyTorch archive whose zip directory cannot be read; "
                             "copy or download the file again") from None
        return []


def load_checkpoint(path: str | Path, allowed_globals: Iterable[Any] = ()) -> Any:
    """Unpickle `path` with torch's weights-only unpickler (plus `allowed_globals`, harmless types only)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file is missing")
    # TorchScript's constants mark its archives (as torch itself tells them from weights); torch would refuse one in
    # a paragraph, after a warning
    if any(name.endswith("/constants.pkl") for name in archive_members(path)):
        raise ModelError(f"{path}: a TorchScript program, not a weights file: it runs code, so PEFTAdapt loads it "
                         "only as a TorchScript model the user trusts (`peftadapt trust`; docs/models.md)")
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
        raise ModelError(f"{path}: not a readable PyTorch weights file ({first_line(exc)})") from None


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


def shown_names(names: list[str]) -> str:
    more = len(names) - SHOWN_MISMATCHES
    return ", ".join(names[:SHOWN_MISMATCHES]) + (f" and {more} more" if more > 0 else "")


def state_mismatches(expected: Mapping[str, tuple[int, ...]], state: Mapping[str, "torch.Tensor"]) -> list[str]:
    """What keeps `state` from loading into a module whose tensors have the `expected` names and shapes: shape
    mismatches, missing and unexpected names, each list cut short (one line however large the network)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} ≠ {tuple(expected[k])}" for k in expected
             if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = []
    if wrong:
        problems.append(f"shape mismatch (file ≠ network) for {shown_names(wrong)}")
    if missing:
        problems.append(f"missing {shown_names(missing)}")
    if unexpected:
        problems.append(f"unexpected {shown_names(unexpected)}")
    return problems


def load_into(network: "nn.Module", state: Mapping[str, "torch.Tensor"], path: str | Path) -> "nn.Module":
    """Copy `state` into `network`, or say which tensors of `path` do not fit the network built for it."""
    problems = state_mismatches({k: tuple(v.shape) for k, v in network.state_dict().items()}, state)
    if problems:
        raise ModelError(f"{path}: weights do not match the network described beside them: {'; '.join(problems)}")
    network.load_state_dict(dict(state))
    return network
