"""Save and load adapters as safetensors + JSON, tied to the base model by a weight fingerprint."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModelError
from ..jsonfile import read_json
from ..models.safe_load import first_line, shown_names, state_mismatches
from .base import (
    LAYER_TENSORS, UNIT_TYPES, AdaptedLayer, AdapterUnit, attach_unit, base_layer_names, build_unit, iter_units,
)

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base network's tensors under the names they have without adapters: adapter units left out, an adapted
    layer's base tensors as they are unmerged (tensors a merge added, e.g. an affine on a plain norm, left out)."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    adapted: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in adapted):
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, AdaptedLayer):
            adapted.append(prefix)
            own = dict(module.base.named_parameters(recurse=False)) | dict(module.base.named_buffers(recurse=False))
            if module.merged:
                own = {k: module._original.get(k) if k in LAYER_TENSORS else v for k, v in own.items()}
        else:
            own = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        for key, tensor in own.items():
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                tensors[prefix + key] = tensor
    return tensors


def fingerprint(model: nn.Module) -> str:
    """sha256 over the base network's tensors: the same for the plain model, adapted, merged or unmerged."""
    digest = hashlib.sha256()
    tensors = _base_tensors(model)
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy())
    return digest.hexdigest()


def save_adapters(model: nn.Module, folder: str | Path, base_fingerprint: str | None = None,
                  metadata: dict | None = None) -> Path:
    """Write `adapter.safetensors` (unit tensors) and `adapter.json` (unit kinds, configs, gates, fingerprint).

    `base_fingerprint` is the base network's as it was loaded (a trainer may have moved tensors no unit holds, such
    as batch-norm statistics); by default it is computed from `model`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, units = {}, []
    for record in iter_units(model):
        prefix = f"{record.layer}::{record.name}"
        for key, value in record.unit.state_dict().items():
            tensors[f"{prefix}::{key}"] = value.detach().cpu().contiguous()
        units.append(
            {"layer": record.layer, "name": record.name, "kind": record.unit.kind,
             "config": record.unit.config.to_dict(), "active": record.active}
        )
    config = {"format_version": FORMAT_VERSION, "base_fingerprint": base_fingerprint or fingerprint(model),
              "units": units, "metadata": metadata or {}}
    tmp_weights, tmp_config = folder / (WEIGHTS_FILE + ".tmp"), folder / (CONFIG_FILE + ".tmp")
    save_file(tensors, str(tmp_weights))
    tmp_config.write_text(json.dumps(config, indent=2))
    tmp_weights.replace(folder / WEIGHTS_FILE)
    tmp_config.replace(folder / CONFIG_FILE)
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    return read_json(Path(folder) / CONFIG_FILE, f"adapter config (an adapter folder holds {CONFIG_FILE} and "
                     f"{WEIGHTS_FILE})", ModelError)


@dataclass
class _Loading:
    """One unit of an adapter on its way in, checked: the unit its tensors load into (already on the model, or
    built for it and not yet attached) and those tensors."""

    layer: str
    name: str
    active: bool
    unit: AdapterUnit
    new: bool
    state: dict[str, torch.Tensor]


def _described(entry) -> str:
    if isinstance(entry, dict) and isinstance(entry.get("layer"), str) and isinstance(entry.get("name"), str):
        return f"unit {entry['layer']}/{entry['name']}"
    return f"unit {str(entry)[:80]}"


def _unit_for(model: nn.Module, entry, path: Path, existing: dict[tuple[str, str], AdapterUnit],
              tensors: dict[str, torch.Tensor]) -> _Loading:
    """One entry of adapter.json, checked: the model's unit of that layer and name, or one built for it here.
    Building runs the unit's own checks of its config (a rank of -1, an unknown init) without attaching the unit,
    so every refusal comes before the network changes."""
    described = _described(entry)
    try:
        if entry["kind"] not in UNIT_TYPES:
            raise ModelError(f"{path}: unknown adapter type '{entry['kind']}'")
        unit_class = UNIT_TYPES[entry["kind"]]
        config = unit_class.config_class.from_dict(entry["config"])
        layer, name, active = entry["layer"], entry["name"], entry["active"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{path}: invalid {described} ({type(exc).__name__}: {exc})") from None
    if not isinstance(name, str) or not name or "." in name or not isinstance(active, bool):
        raise ModelError(f"{path}: invalid {described} (needs a name without dots and a true/false 'active')")
    if layer not in base_layer_names(model, unit_class.layer_types):
        raise ModelError(f"{path}: this model has no layer '{layer}' that a {entry['kind']} unit can adapt; load "
                         "the adapter onto the model it was made for")
    prefix = f"{layer}::{name}::"
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if (layer, name) in existing:
        return _Loading(layer, name, active, existing[(layer, name)], False, state)
    try:
        return _Loading(layer, name, active, build_unit(model, layer, config, unit_class), True, state)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: invalid {described} ({type(exc).__name__}: {first_line(exc)})") from None


def _expected_shapes(unit: AdapterUnit, state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The unit's tensor shapes; a buffer takes the file's shape, since some depend on the data they were made from
    (PiSSA's principal part is empty until PiSSA initialises it)."""
    buffers = dict(unit.named_buffers())
    return {key: tuple(state[key].shape) if key in buffers and key in state else tuple(value.shape)
            for key, value in unit.state_dict().items()}


def _check_tensors(loading: _Loading, weights_path: Path) -> None:
    """The unit's tensors must fit it and be finite: a NaN or infinity (a damaged or altered file) would turn the
    segmentation into background while it looks like a result."""
    where = f"{weights_path}: unit {loading.layer}/{loading.name}"
    problems = state_mismatches(_expected_shapes(loading.unit, loading.state), loading.state)
    if problems:
        raise ModelError(f"{where}: its tensors do not fit it: {'; '.join(problems)}")
    broken = sorted(key for key, value in loading.state.items() if not torch.isfinite(value).all())
    if broken:
        raise ModelError(f"{where}: holds NaN or infinite values (in {shown_names(broken)}); the adapter is "
                         "damaged or was altered")


def _checked_units(model: nn.Module, config: dict, folder: Path, tensors: dict[str, torch.Tensor]) -> list[_Loading]:
    """The config's units, each checked against `model` with its tensors before anything is changed: an adapter is
    untrusted data, and a wrong kind, layer, name, setting or tensor is one line naming the file, not a crash (or
    a half-adapted network) half-way through."""
    path = folder / CONFIG_FILE
    entries = config.get("units")
    if not isinstance(entries, list):
        raise ModelError(f"{path}: no list of adapter units ('units')")
    existing = {(r.layer, r.name): r.unit for r in iter_units(model)}
    units: list[_Loading] = []
    for entry in entries:
        loading = _unit_for(model, entry, path, existing, tensors)
        if any((u.layer, u.name) == (loading.layer, loading.name) for u in units):
            raise ModelError(f"{path}: unit {loading.layer}/{loading.name} is listed twice")
        _check_tensors(loading, folder / WEIGHTS_FILE)
        units.append(loading)
    return units


def _put_in(model: nn.Module, loading: _Loading) -> None:
    """Load a checked unit's tensors (resizing buffers whose size depends on data), attach it if it is new, and set
    its gate."""
    buffers = dict(loading.unit.named_buffers())
    for key, value in loading.state.items():
        if key in buffers and buffers[key].shape != value.shape:
            setattr(loading.unit, key, torch.empty_like(value))
    loading.unit.load_state_dict(loading.state, strict=True)
    if loading.new:
        attach_unit(model, loading.layer, loading.name, loading.unit, loading.active)
    model.get_submodule(loading.layer).set_active(loading.name, loading.active)


def _made_for(config: dict) -> str:
    """What to do about a fingerprint mismatch: name the model the adapter records (`metadata.model`, written by
    the worker) so the user knows which one to give; the name is untrusted text, so quoted, cut short, one line."""
    metadata = config.get("metadata")
    name = metadata.get("model") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name.strip():
        return "load it onto the model it was made for"
    return f"it was made for model {name[:80]!r}; give that model (--model)"


def _check_fingerprint(config: dict, folder: Path, actual: str) -> None:
    """The adapter must have been made for this model: its recorded fingerprint equals the model's."""
    recorded = config.get("base_fingerprint")
    if not isinstance(recorded, str) or not recorded:
        what = "is missing" if recorded is None else f"is not a fingerprint ({str(recorded)[:40]!r})"
        raise ModelError(f"{folder / CONFIG_FILE}: the base model's fingerprint ('base_fingerprint') {what}, so the "
                         "adapter cannot be matched to a model; it is damaged, or was not written by PEFTAdapt")
    if recorded != actual:
        raise ModelError(
            f"{folder}: this adapter was trained on a different base model (fingerprint "
            f"{recorded[:12]}… ≠ {actual[:12]}…); {_made_for(config)}"
        )


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelError(f"{weights_path}: adapter weights not found")
    try:
        return load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{weights_path}: corrupt adapter weights ({exc})") from None


def load_adapters(model: nn.Module, folder: str | Path, base_fingerprint: str | None = None) -> dict:
    """Recreate the saved units on `model` and load their tensors, once `model` is shown to be the base network the
    adapter was made for: its fingerprint is computed here, from its own tensors (a caller's string could be stale).
    `base_fingerprint`, the caller's record of the model's fingerprint, must match it too when given.

    All or nothing: every unit is built and its tensors checked before the first is loaded or attached, so a
    refused adapter leaves the network as it was."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    actual = fingerprint(model)
    _check_fingerprint(config, folder, actual)
    if base_fingerprint is not None and base_fingerprint != actual:
        raise ModelError(f"{folder}: the model's weights changed since it was fingerprinted "
                         f"({base_fingerprint[:12]}… recorded, {actual[:12]}… now); reload the model first")
    for loading in _checked_units(model, config, folder, _read_weights(folder)):
        _put_in(model, loading)
    return config
