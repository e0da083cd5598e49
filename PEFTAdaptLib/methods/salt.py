"""SALT (Elsayed et al. 2025): scale and shift of the top 10 % singular values plus a low-rank update of the rest;
the rank is that update's."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import register_method
from .fixed import RankedMethod, matrix_shape

TOP_SHARE = 0.1  # share of singular values that get a scale and a shift


@register_method
@dataclass
class SALT(RankedMethod):
    name = "salt"
    label = "SALT: singular values scaled and shifted, low-rank update of the rest (rank from the budget)"
    unit_name = "salt"

    def adapter_config(self, rank):
        from ..adapters import SALTConfig

        return SALTConfig(ratio=TOP_SHARE, lora_rank=rank)

    def unit_cost(self, weight_shape, rank):
        k = min(matrix_shape(weight_shape))
        top = max(1, math.floor(k * TOP_SHARE))
        rest = k - top
        return 2 * top + 2 * rest * min(rank, rest)
