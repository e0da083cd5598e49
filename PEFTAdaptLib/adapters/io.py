"""Save and load adapters as safetensors + JSON, tied to the base model by a weight fingerprint."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ModelError
from ..jsonfile import read_json
from .base import LAYER_TENSORS, UNIT_TYPES, AdaptedLayer, add_units, base_layer_names, iter_units

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


def _checked_units(model: nn.Module, config: dict, folder: Path) -> list[dict]:
    """The config's unit entries, each checked against `model` before anything is changed: an adapter is untrusted
    data, and a wrong kind, layer, name or setting is one line naming the file, not a crash half-way through."""
    path = folder / CONFIG_FILE
    units = config.get("units")
    if not isinstance(units, list):
        raise ModelError(f"{path}: no list of adapter units ('units')")
    for entry in units:
        described = f"unit {str(entry)[:80]}"
        try:
            if entry["kind"] not in UNIT_TYPES:
                raise ModelError(f"{path}: unknown adapter type '{entry['kind']}'")
            unit_class = UNIT_TYPES[entry["kind"]]
            unit_class.config_class(**entry["config"])
            layer, name, active = entry["layer"], entry["name"], entry["active"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{path}: invalid {described} ({type(exc).__name__}: {exc})") from None
        if not isinstance(name, str) or not name or "." in name or not isinstance(active, bool):
            raise ModelError(f"{path}: invalid {described} (needs a name without dots and a true/false 'active')")
        if layer not in base_layer_names(model, unit_class.layer_types):
            raise ModelError(f"{path}: this model has no layer '{layer}' that a {entry['kind']} unit can adapt; load "
                             "the adapter onto the model it was made for")
    return units


def _made_for(config: dict) -> str:
    """What to do about a fingerprint mismatch: name the model the adapter records (`metadata.model`, written by
    the worker) so the user knows which one to give; the name is untrusted text, so quoted, cut short, one line."""
    metadata = config.get("metadata")
    name = metadata.get("model") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or not name.strip():
        return "load it onto the model it was made for"
    return f"it was made for model {name[:80]!r}; give that model (--model)"


def load_adapters(model: nn.Module, folder: str | Path, base_fingerprint: str | None = None) -> dict:
    """Recreate the saved units on `model` and load their tensors, once `model` is shown to be the base network the
    adapter was made for: its fingerprint is computed here, from its own tensors (a caller's string could be stale).
    `base_fingerprint`, the caller's record of the model's fingerprint, must match it too when given."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    actual = fingerprint(model)
    if config.get("base_fingerprint") != actual:
        raise ModelError(
            f"{folder}: this adapter was trained on a different base model (fingerprint "
            f"{str(config.get('base_fingerprint'))[:12]}… ≠ {actual[:12]}…); {_made_for(config)}"
        )
    if base_fingerprint is not None and base_fingerprint != actual:
        raise ModelError(f"{folder}: the model's weights changed since it was fingerprinted "
                         f"({base_fingerprint[:12]}… recorded, {actual[:12]}… now); reload the model first")
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelError(f"{weights_path}: adapter weights not found")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"{weights_path}: corrupt adapter weights ({exc})") from None
    existing = {(r.layer, r.name) for r in iter_units(model)}
    for entry in _checked_units(model, config, folder):
        unit_class = UNIT_TYPES[entry["kind"]]
        if (entry["layer"], entry["name"]) not in existing:
            add_units(model, unit_class.config_class(**entry["config"]), unit_class, entry["name"],
                      active=entry["active"], layers=[entry["layer"]])
        layer = model.get_submodule(entry["layer"])
        unit = layer.units[entry["name"]]
        prefix = f"{entry['layer']}::{entry['name']}::"
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        for key, value in state.items():  # buffers whose size depends on data (e.g. PiSSA's principal part)
            current = unit.get_buffer(key) if key in dict(unit.named_buffers()) else None
            if current is not None and current.shape != value.shape:
                setattr(unit, key, torch.empty_like(value))
        try:
            unit.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{weights_path}: tensors of unit {entry['layer']}/{entry['name']} do not fit ({exc})") from None
        layer.set_active(entry["name"], entry["active"])
    return config
