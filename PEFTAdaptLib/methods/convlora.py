"""ConvLoRA in the ConvLoRA paper's factorisation (Aleem et al., ISBI 2024) on every cubic-kernel convolution."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_method
from .fixed import RankedMethod, weight_shape


@register_method
@dataclass
class ConvLoRA(RankedMethod):
    name = "convlora"
    label = "ConvLoRA on every convolution (rank from the budget unless given)"
    unit_name = "convlora"

    def adapter_config(self, rank):
        from ..adapters import ConvLoRAConfig

        return ConvLoRAConfig(r=rank, alpha=rank)

    def target_layers(self, network):
        """Cubic kernels only: the factorisation reshapes along one kernel size."""
        return [n for n in super().target_layers(network) if len(set(weight_shape(network, n)[2:])) == 1]

    def unit_cost(self, weight_shape, rank):
        c_out, c_in, *kernel = weight_shape
        k, d = kernel[0], len(kernel)
        return rank * k * c_in * k ** (d - 1) + c_out * k * rank * k
