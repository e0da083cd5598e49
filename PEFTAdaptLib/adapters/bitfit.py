"""BitFit: train only biases. The unit holds a bias offset (zero at start), adding a bias where the layer has none."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import AdapterConfig, AdapterUnit


@dataclass
class BitFitConfig(AdapterConfig):
    pass


class BitFitUnit(AdapterUnit):
    kind = "bitfit"
    config_class = BitFitConfig

    def __init__(self, layer: nn.Module, config: BitFitConfig):
        super().__init__(layer, config)
        transposed = isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        channels = layer.weight.shape[1] * layer.groups if transposed else layer.weight.shape[0]
        self.delta = nn.Parameter(torch.zeros(channels, dtype=layer.weight.dtype))

    def apply(self, params):
        bias = params["bias"]
        return {**params, "bias": self.delta if bias is None else bias + self.delta}
