"""BitFit: train only the biases of every convolution and linear layer."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_method
from .fixed import FixedMethod


@register_method
@dataclass
class BitFit(FixedMethod):
    name = "bitfit"
    label = "BitFit: the biases of every convolution and linear layer"
    unit_name = "bitfit"

    def adapter_config(self, rank):
        from ..adapters import BitFitConfig

        return BitFitConfig()
