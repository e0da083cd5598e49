"""Model registry: the models PEFTAdapt can load, and why one is unavailable.

Built-in models (deepbet) first, then the user's model folder (see catalog.py); `load_model` also takes a path.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError, PEFTAdaptError
from .card import ModelCard
from .deepbet import CARD as DEEPBET_CARD
from .deepbet import load_deepbet, verified_deepbet_files
from .foundation import FoundationModel


@dataclass
class RegistryEntry:
    card: ModelCard
    loader: Callable[[], FoundationModel]
    #: raises a PEFTAdaptError naming what is missing or corrupt; reads files only (no network is built)
    check: Callable[[], object]

    def availability(self) -> str:
        """'available', or the reason the model cannot be loaded on this machine."""
        try:
            self.check()
        except PEFTAdaptError as exc:
            return str(exc)
        return "available"


BUILTIN: dict[str, RegistryEntry] = {
    DEEPBET_CARD.id: RegistryEntry(DEEPBET_CARD, load_deepbet, verified_deepbet_files)}
DEFAULT_MODEL = DEEPBET_CARD.id


@dataclass
class ModelListing:
    id: str
    format: str
    card: ModelCard | None  # None when the card itself cannot be read (the status says why)
    status: str  # "available" or the reason it is not
    path: str = ""


def list_models(folder: Path | None = None) -> tuple[list[ModelListing], list[str]]:
    """Every model `peftadapt models` shows, with its status; plus problems met while scanning the model folder."""
    from .catalog import scan

    rows = [ModelListing(model_id, "builtin", entry.card, entry.availability()) for model_id, entry in BUILTIN.items()]
    catalog = scan(folder)
    problems = catalog.problems
    for model_id, entry in catalog.entries.items():
        if model_id in BUILTIN:
            problems.append(f"{entry.path}: model id '{model_id}' is a built-in model's; rename the folder or entry")
            continue
        status = entry.availability()
        try:
            card = entry.card()
        except PEFTAdaptError:
            card = None
        rows.append(ModelListing(model_id, entry.format, card, status, str(entry.path)))
    return rows, problems


def _entry(key: str, folder: Path | None):
    """The catalog entry of a model folder path or model-folder id, or None."""
    from .catalog import entry_for_path, scan

    path = Path(key).expanduser()
    if path.exists():
        return entry_for_path(path)
    catalog = scan(folder)
    if key in catalog.entries:
        return catalog.entries[key]
    if key in catalog.refused:
        raise ModelError(f"model '{key}' cannot be used: {catalog.refused[key]}")
    raise ModelError(f"unknown model '{key}' (not a built-in id, not in the model folder, not an existing path); "
                     "`peftadapt models` lists the available ones")


def model_reference(id_or_path: str) -> str:
    """The model as the worker finds it from its own working directory (the job folder): a path the user gave
    relative to theirs, made absolute; an id as it is."""
    path = Path(id_or_path).expanduser()
    return str(path.absolute()) if id_or_path not in BUILTIN and path.exists() else id_or_path


def model_card(id_or_path: str | Path, folder: Path | None = None) -> ModelCard:
    """The card of a model, read from its files alone (no network built, no torch): what a request is checked
    against before a job is made."""
    key = str(id_or_path)
    if key in BUILTIN:
        return BUILTIN[key].card
    return _entry(key, folder).card()


def load_model(id_or_path: str | Path, folder: Path | None = None) -> FoundationModel:
    """A built-in model id, an id from the user's model folder, or a model folder/file path (format detected)."""
    key = str(id_or_path)
    if key in BUILTIN:
        return BUILTIN[key].loader()
    return _entry(key, folder).load()
