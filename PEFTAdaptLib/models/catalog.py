"""The user's model folder: models placed by hand (offline sites) or downloaded, found by format or registry.json.

Folder: `$PEFTADAPT_MODELS`, else `$XDG_CACHE_HOME/peftadapt/models`, else `~/.cache/peftadapt/models`. Every
subfolder holding a recognised format is listed under its folder name; a `registry.json` (one entry beside the
files, or a list in the root) adds metadata and checksums, validated against `registry_schema.json`.
Listing reads description files and hashes TorchScript files (trusted or not); it imports torch only to resolve the
network classes a MONAI bundle names, which needs MONAI (and so torch) installed anyway.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ModelError
from .card import ModelCard
from .containment import inside, refuse_outside_links
from .description import unreadable
from .meshnet import is_meshnet_folder
from .monai_bundle import is_bundle_folder
from .nnunet import is_nnunet_folder
from .sam import is_sam_folder
from .torchscript_card import SUFFIXES as TORCHSCRIPT_SUFFIXES
from .torchscript_card import is_torchscript_folder

REGISTRY_FILE = "registry.json"
SCHEMA_PATH = Path(__file__).with_name("registry_schema.json")
#: packages each format needs beyond the core install
PACKAGES = {"monai_bundle": ["monai"], "nnunet_v2": ["dynamic_network_architectures"], "meshnet": ["safetensors"],
            "segment_anything": [], "torchscript": [], "builtin": []}


def models_dir() -> Path:
    if os.environ.get("PEFTADAPT_MODELS"):
        return Path(os.environ["PEFTADAPT_MODELS"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "peftadapt" / "models"


def detect_format(path: Path) -> str | None:
    """The format a folder (or TorchScript file) holds, by its files; None if not recognised."""
    if path.is_file():
        return "torchscript" if path.suffix in TORCHSCRIPT_SUFFIXES else None
    for name, test in (("nnunet_v2", is_nnunet_folder), ("monai_bundle", is_bundle_folder),
                       ("meshnet", is_meshnet_folder), ("segment_anything", is_sam_folder),
                       ("torchscript", is_torchscript_folder)):
        if path.is_dir() and test(path):
            return name
    return None


# --- a small validator for the subset of JSON Schema that registry_schema.json uses ---------------------------------

_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict}


def validate(instance, schema: dict, where: str = "entry") -> list[str]:
    """Problems of `instance` against `schema` (type, enum, required, properties, additionalProperties,
    propertyNames, items, minItems/maxItems, minimum/maximum, pattern); empty if valid."""
    problems: list[str] = []
    expected = schema.get("type")
    if expected is not None:
        python_type = _TYPES[expected]
        if not isinstance(instance, python_type) or (isinstance(instance, bool) and expected in ("integer", "number")):
            return [f"{where}: should be {expected}"]
    if "enum" in schema and instance not in schema["enum"]:
        problems.append(f"{where}: should be one of {', '.join(map(str, schema['enum']))}")
    if isinstance(instance, str) and "pattern" in schema and not re.search(schema["pattern"], instance):
        problems.append(f"{where}: '{instance}' should be {schema['title']}" if "title" in schema
                        else f"{where}: '{instance}' does not match {schema['pattern']}")
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            problems.append(f"{where}: below {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            problems.append(f"{where}: above {schema['maximum']}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0) or len(instance) > schema.get("maxItems", len(instance)):
            problems.append(f"{where}: wrong number of items ({len(instance)})")
        for index, item in enumerate(instance):
            problems += validate(item, schema.get("items", {}), f"{where}[{index}]")
    if isinstance(instance, dict):
        problems += [f"{where}: '{key}' is required" for key in schema.get("required", []) if key not in instance]
        properties, extra = schema.get("properties", {}), schema.get("additionalProperties", True)
        if "propertyNames" in schema:
            problems += [p for key in instance for p in validate(key, schema["propertyNames"], f"{where} key")]
        for key, value in instance.items():
            if key in properties:
                problems += validate(value, properties[key], f"{where}.{key}")
            elif extra is False:
                problems.append(f"{where}: unknown key '{key}'")
            elif isinstance(extra, dict):
                problems += validate(value, extra, f"{where}.{key}")
    return problems


def registry_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


# --- catalog entries ------------------------------------------------------------------------------------------------


@dataclass
class CatalogEntry:
    id: str
    format: str
    path: Path
    #: the registry.json entry, if one describes this model
    record: dict = field(default_factory=dict)
    #: the registry.json that described it (named in errors)
    registry: Path | None = None

    def card(self) -> ModelCard:
        """The model card, read from the model's own files (no torch). A description no reader foresaw is this
        folder's ModelError (its status in `peftadapt models`), never an internal error hiding the other folders."""
        try:
            self._contained()
            return self._with_record(self._read_card())
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - an untrusted description can upset a reader in many ways
            raise unreadable(self.path, exc) from None

    def _read_card(self) -> ModelCard:
        from .meshnet import meshnet_card_from_folder
        from .monai_bundle import bundle_card
        from .nnunet import nnunet_card
        from .sam import sam_card
        from .torchscript_card import torchscript_card

        readers: dict[str, Callable[[Path, str], ModelCard]] = {
            "monai_bundle": bundle_card, "nnunet_v2": nnunet_card, "torchscript": torchscript_card,
            "meshnet": meshnet_card_from_folder, "segment_anything": sam_card,
        }
        return readers[self.format](self.path, self.id)

    def _contained(self) -> None:
        """Refuse links leading out of the model folder before any of its files is read."""
        if self.path.is_dir():
            refuse_outside_links(self.path)
        elif self.format == "torchscript" and self.path.exists():
            from .torchscript_card import resolve

            for file in resolve(self.path):
                inside(self.path.parent, file)

    def _with_record(self, card: ModelCard) -> ModelCard:
        """The registry entry's descriptive fields win over what the model's own files say."""
        for key in ("title", "description", "modality", "license", "source", "version"):
            if key in self.record:
                setattr(card, key, str(self.record[key]))
        if "inputs" in self.record:
            names = self.record["inputs"]
            if len(names) != card.input_channels:
                raise ModelError(f"{self.registry}: 'inputs' of model '{self.id}' names {len(names)} channel(s); the "
                                 f"model takes {card.input_channels}")
            card.channel_names = [str(name) for name in names]
        return card

    def check(self) -> None:
        """Raise the ModelError that would stop loading: missing files or packages, checksum mismatch."""
        from .safe_load import verify_sha256

        if not self.path.exists():
            raise ModelError(f"{self.path}: model folder is missing"
                             + (f" (named by {self.registry})" if self.registry else ""))
        self._contained()
        missing = [name for name in PACKAGES[self.format] if importlib.util.find_spec(name) is None]
        if missing:
            raise ModelError(f"{self.path}: needs the missing package(s) {', '.join(missing)} "
                             f"(`pip install {' '.join(missing)}`)")
        if detect_format(self.path) != self.format:
            raise ModelError(f"{self.path}: does not hold a {self.format} model (files missing?)")
        _check_weights_present(self.format, self.path)
        folder = self.path if self.path.is_dir() else self.path.parent
        for relative, expected in self.record.get("sha256", {}).items():
            verify_sha256(inside(folder, folder / relative), expected, f"a file of model '{self.id}'")
        _check_code(self.format, self.path)

    def availability(self) -> str:
        """'available', or why not: one folder's problem is its own line, whatever it is."""
        try:
            self.check()
            self.card()
        except ModelError as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 - the backstop: one bad folder never hides the others
            return str(unreadable(self.path, exc))
        return "available"

    def load(self):
        from .meshnet import load_meshnet
        from .monai_bundle import load_bundle
        from .nnunet import load_nnunet
        from .sam import load_sam
        from .torchscript_card import load_torchscript

        self.check()
        loaders = {"monai_bundle": load_bundle, "nnunet_v2": load_nnunet, "torchscript": load_torchscript,
                   "meshnet": load_meshnet, "segment_anything": load_sam}
        model = loaders[self.format](self.path, model_id=self.id)
        self._with_record(model.card)
        return model


def _check_weights_present(model_format: str, path: Path) -> None:
    """Format detection looks at the description files; the weights must be there too before a model is listed."""
    from .monai_bundle import WEIGHT_NAMES, weights_path
    from .nnunet import CHECKPOINTS, checkpoint_path

    if model_format == "monai_bundle" and weights_path(path) is None:
        raise ModelError(f"{path / WEIGHT_NAMES[1]}: file is missing (nor model.safetensors / model.ts)")
    if model_format == "nnunet_v2" and checkpoint_path(path, None) is None:
        raise ModelError(f"{path / 'fold_*'}: no {' or '.join(CHECKPOINTS)}")
    if model_format == "segment_anything":
        from .sam import read_description

        spec = read_description(path)
        for key in ("checkpoint", "head"):
            if key in spec and not (path / spec[key]).is_file():
                raise ModelError(f"{path / spec[key]}: file is missing (field '{key}' of sam.json names it)")


def _check_code(model_format: str, path: Path) -> None:
    """What would run code: a bundle's `network_def` and nnU-Net plans (network classes only), TorchScript (trusted
    files only)."""
    from .monai_bundle import check_bundle
    from .nnunet import check_nnunet
    from .torchscript_card import check_trusted

    if model_format == "monai_bundle":
        check_bundle(path)
    elif model_format == "nnunet_v2":
        check_nnunet(path)
    elif model_format == "torchscript":
        check_trusted(path)


def torchscript_file(path: Path) -> Path:
    """The TorchScript file a model path would run (the file itself, a bundle's model.ts, a folder's model.ts)."""
    from .monai_bundle import weights_path
    from .torchscript_card import resolve

    if path.is_file():
        return path
    if not path.exists():
        raise ModelError(f"{path}: not found")
    model_format = detect_format(path)
    if model_format == "torchscript":
        return resolve(path)[0]
    weights = weights_path(path) if model_format == "monai_bundle" else None
    if weights is None or weights.suffix != ".ts":
        raise ModelError(f"{path}: holds no TorchScript file; only TorchScript needs trusting (other formats are "
                         "loaded as data)")
    return weights


def _read_registry(path: Path) -> list[tuple[dict, str]]:
    """Each record with '' or the one line that refuses it: one invalid entry never hides the others."""
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: not a readable registry ({exc})") from None
    records = content if isinstance(content, list) else [content]
    if not records:
        raise ModelError(f"{path}: holds no registry entry (an empty list); describe the model or delete the file")
    schema = registry_schema()
    checked = []
    for index, record in enumerate(records):
        problems = validate(record, schema, f"entry {index}")
        checked.append((record, f"{path}: invalid registry entry ({'; '.join(problems[:3])})" if problems else ""))
    return checked


def _from_record(record: dict, registry: Path, path: Path | None = None) -> CatalogEntry:
    """The entry a registry record describes: at `path` when the user named the folder, else at the record's own
    `path`, which must lead inside the registry's folder (no absolute path, no `..`, no link out)."""
    if path is None:
        path = registry.parent / record["path"]
        inside(registry.parent, path)
    return CatalogEntry(record["id"], record["format"], path, record, registry)


@dataclass
class Catalog:
    entries: dict[str, CatalogEntry] = field(default_factory=dict)
    #: problems found while scanning (unreadable registries, invalid entries, duplicate ids), one line each
    problems: list[str] = field(default_factory=list)
    #: why an entry was skipped, by the id it gave, so that `--model <id>` says why rather than "unknown"
    refused: dict[str, str] = field(default_factory=dict)

    def refuse(self, record, problem: str) -> None:
        self.problems.append(problem)
        if isinstance(record, dict) and isinstance(record.get("id"), str):
            self.refused.setdefault(record["id"], problem)


def scan(folder: Path | None = None) -> Catalog:
    """The entries of the model folder by id, and what was skipped there and why."""
    folder = models_dir() if folder is None else folder
    catalog = Catalog()
    entries, problems = catalog.entries, catalog.problems

    def add(entry: CatalogEntry) -> None:
        if entry.id in entries and entries[entry.id].path != entry.path:
            problems.append(f"{entry.path}: model id '{entry.id}' already used by {entries[entry.id].path}; skipped")
        else:
            entries[entry.id] = entry

    if not folder.is_dir():
        return catalog
    registries = [folder / REGISTRY_FILE] + sorted(folder.glob(f"*/{REGISTRY_FILE}"))
    described: set[Path] = set()
    for registry in registries:
        if not registry.is_file():
            continue
        try:
            records = _read_registry(registry)
        except ModelError as exc:
            problems.append(str(exc))
            described.add(registry.parent)
            continue
        for record, problem in records:
            if problem:
                catalog.refuse(record, problem)
                if isinstance(record, dict) and isinstance(record.get("path"), str):  # not listed bare instead
                    described.add((registry.parent / record["path"]).resolve())
                continue
            try:
                entry = _from_record(record, registry)
            except ModelError as exc:
                catalog.refuse(record, f"{registry}: entry '{record['id']}' skipped: {exc}")
                continue
            described.add(entry.path.resolve())
            add(entry)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and p.resolve() not in described):
        model_format = detect_format(sub)
        if model_format is not None:
            add(CatalogEntry(sub.name, model_format, sub))
    return catalog


def entry_for_path(path: Path) -> CatalogEntry:
    """An entry for a model folder or file given by path (format detected from its files)."""
    model_format = detect_format(path)
    if model_format is None:
        raise ModelError(f"{path}: no recognised model here (MONAI bundle, nnU-Net v2 folder, TorchScript + card, "
                         "MeshNet model.json + model.pth, SAM sam.json + checkpoint); see docs/models.md")
    registry = path / REGISTRY_FILE if path.is_dir() else None
    if registry is not None and registry.is_file():
        record, problem = _read_registry(registry)[0]
        if problem:
            raise ModelError(problem)
        return _from_record(record, registry, path)
    return CatalogEntry(path.stem if path.is_file() else path.name, model_format, path)
