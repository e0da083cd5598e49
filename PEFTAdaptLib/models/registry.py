"""Model registry: the models PEFTAdapt can load, and why one is unavailable."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ModelError, PEFTAdaptError
from .card import ModelCard
from .deepbet import CARD as DEEPBET_CARD
from .deepbet import load_deepbet
from .foundation import FoundationModel


@dataclass
class RegistryEntry:
    card: ModelCard
    loader: Callable[[], FoundationModel]

    def availability(self) -> str:
        """'available', or the reason the model cannot be loaded on this machine."""
        try:
            self.loader()
        except PEFTAdaptError as exc:
            return str(exc)
        return "available"


BUILTIN: dict[str, RegistryEntry] = {DEEPBET_CARD.id: RegistryEntry(DEEPBET_CARD, load_deepbet)}
DEFAULT_MODEL = DEEPBET_CARD.id


def load_model(model_id: str) -> FoundationModel:
    if model_id not in BUILTIN:
        raise ModelError(f"unknown model '{model_id}'; `peftadapt models` lists the available ones")
    return BUILTIN[model_id].loader()
