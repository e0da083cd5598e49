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
from .base import UNIT_TYPES, AdaptedLayer, add_units, base_layer_names, iter_units

FORMAT_VERSION = 1
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"


def fingerprint(model: nn.Module) -> str:
    """sha256 over the base network's tensors (names normalised, adapter units excluded, merges undone)."""
    digest = hashlib.sha256()
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer) and module.merged:
            for key, value in module._original.items():
                tensors[f"{name}.{key}"] = value
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if ".units." in f".{name}.":
            continue
        tensors.setdefault(name.replace(".base.", "."), tensor)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.float().numpy().tobytes())
    return digest.hexdigest()


def save_adapters(model: nn.Module, folder: str | Path, base_fingerprint: str, metadata: dict | None = None) -> Path:
    """Write `adapter.safetensors` (unit tensors) and `adapter.json` (unit kinds, configs, gates, fingerprint)."""
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
    config = {"format_version": FORMAT_VERSION, "base_fingerprint": base_fingerprint, "units": units,
              "metadata": metadata or {}}
    tmp_weights, tmp_config = folder / (WEIGHTS_FILE + ".tmp"), folder / (CONFIG_FILE + ".tmp")
    save_file(tensors, str(tmp_weights))
    tmp_config.write_text(json.dumps(config, indent=2))
    tmp_weights.replace(folder / WEIGHTS_FILE)
    tmp_config.replace(folder / CONFIG_FILE)
    return folder


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ModelError(f"{path}: adapter config not found (an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: adapter config is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: adapter config is not a JSON object")
    return config


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


def load_adapters(model: nn.Module, folder: str | Path, base_fingerprint: str) -> dict:
    """Recreate the saved units on `model` (which must be the same base network) and load their tensors."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    if config.get("base_fingerprint") != base_fingerprint:
        raise ModelError(
            f"{folder}: this adapter was trained on a different base model (fingerprint "
            f"{str(config.get('base_fingerprint'))[:12]}… ≠ {base_fingerprint[:12]}…); load it onto the model it was made for"
        )
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
