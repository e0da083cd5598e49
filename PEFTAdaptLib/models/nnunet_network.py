"""A fixed axis permutation around a network trained on differently ordered arrays (nnU-Net's (z, y, x))."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class AxisPermuted(nn.Module):
    """Feeds `network` its own axis order; `axis_order[j]` is the (x, y, z) axis the network's spatial axis j reads."""

    def __init__(self, network: nn.Module, axis_order: Sequence[int]):
        super().__init__()
        self.network = network
        self.forward_dims = (0, 1, *(2 + int(axis) for axis in axis_order))
        self.backward_dims = tuple(self.forward_dims.index(d) for d in range(len(self.forward_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x.permute(self.forward_dims).contiguous()).permute(self.backward_dims).contiguous()

    def to_our_axes(self, features: torch.Tensor) -> torch.Tensor:
        """An inner module's output (in the network's axis order) in ours, as a head on it reads the input."""
        return features.permute(self.backward_dims)

    @property
    def encoder_stages(self) -> list[str]:
        """The encoder stages of dynamic_network_architectures' U-Nets (`encoder.stages`), shallow to deep: where
        label-free adaptation's early segmentation head reads."""
        stages = getattr(getattr(self.network, "encoder", None), "stages", None)
        return [f"network.encoder.stages.{index}" for index in range(len(stages))] \
            if isinstance(stages, nn.Sequential) else []
