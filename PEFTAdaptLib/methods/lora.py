"""LoRA (HF peft's factorisation, in weight space) on every convolution, transposed convolution and linear layer."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_method
from .fixed import RankedMethod, matrix_shape


@register_method
@dataclass
class LoRA(RankedMethod):
    name = "lora"
    label = "LoRA on every convolution and linear layer (rank from the budget unless given)"
    unit_name = "lora"

    def adapter_config(self, rank):
        from ..adapters import LoRAConfig

        return LoRAConfig(r=rank, alpha=rank)

    def unit_cost(self, weight_shape, rank):
        rows, columns = matrix_shape(weight_shape)
        return min(rank, rows, columns) * (rows + columns)
