"""ConvLoRA in the ConvLoRA paper's factorisation (Aleem et al., ISBI 2024) on every convolution."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import register_method
from .fixed import RankedMethod


@register_method
@dataclass
class ConvLoRA(RankedMethod):
    name = "convlora"
    label = "ConvLoRA on every convolution (rank from the budget unless given)"
    unit_name = "convlora"

    def adapter_config(self, rank):
        from ..adapters import ConvLoRAConfig

        return ConvLoRAConfig(r=rank, alpha=rank)

    def unit_cost(self, weight_shape, rank):
        c_out, c_in, k, *others = weight_shape
        return rank * k * c_in * math.prod(others) + c_out * k * rank * k
