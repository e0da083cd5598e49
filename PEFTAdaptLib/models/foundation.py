"""A foundation model: an eager network that returns logits, with the card that says how to feed it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch stays unimported until a network is loaded
    from torch import nn

from .card import ModelCard


@dataclass
class FoundationModel:
    network: "nn.Module"
    card: ModelCard
    #: sha256 of the pristine base weights; adapters record it so they only load onto this model
    base_fingerprint: str = ""
    #: files the network came from (shown by `peftadapt models`, recorded in job outputs)
    files: dict[str, str] = field(default_factory=dict)
    #: finds the (low, high) voxel box a `fit_to_roi` card frames, on the reoriented array; None: Otsu head box
    locate: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None

    def num_parameters(self) -> int:
        from ..adapters import count_base_parameters

        return count_base_parameters(self.network)
