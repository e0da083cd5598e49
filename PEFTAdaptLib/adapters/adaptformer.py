"""AdaptFormer bottleneck (Chen et al. 2022) on a Linear layer of an eager model: y + s · up(act(down(x))).

An output-space adapter: it cannot be merged into the layer's weights (a non-linearity sits in between), so
`merge()` refuses while it is active. Both `up` weight and bias start at zero, so the unit is exactly the identity
at initialisation (the reference SEA-PEFT code left `up.bias` at PyTorch's default, a non-zero start).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import AdapterConfig, AdapterUnit


@dataclass
class AdaptFormerConfig(AdapterConfig):
    bottleneck: int = 16
    scale: float = 0.1


class AdaptFormerUnit(AdapterUnit):
    kind = "adaptformer"
    config_class = AdaptFormerConfig
    layer_types = (nn.Linear,)
    mergeable = False

    def __init__(self, layer: nn.Module, config: AdaptFormerConfig):
        super().__init__(layer, config)
        dtype = layer.weight.dtype
        self.down = nn.Linear(layer.in_features, config.bottleneck, dtype=dtype)
        self.up = nn.Linear(config.bottleneck, layer.out_features, dtype=dtype)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def adapt_output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y + self.config.scale * self.up(torch.relu(self.down(x)))
