"""The eager MeshNet module (kept apart from meshnet.py so listing MeshNet cards does not import torch)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError


class MeshNet(nn.Module):
    """Dilated-convolution segmenter; `model` holds the layers so weight names match brainchop's files.

    Runs channels-last: PyTorch's CPU dilated 3D convolution is ~20× faster in that layout (0.5 s instead of 12 s for
    one 5-channel dilation-16 layer on 256×256×64), which makes a whole 256³ brain practical without a GPU.
    """

    def __init__(self, model: nn.Sequential):
        super().__init__()
        self.model = model.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last_3d)).contiguous()


def _activation(spec: dict) -> nn.Module:
    if spec.get("gelu"):
        return nn.GELU()
    if spec.get("elu"):
        return nn.ELU()
    return nn.ReLU()


def build_meshnet(spec: dict, state: Mapping[str, torch.Tensor], path: Path) -> MeshNet:
    """The network `spec` (model.json) describes, with channel counts and biases as the weights in `path` have them."""
    layers = spec.get("layers")
    if not isinstance(layers, list) or not layers:
        raise ModelError(f"{path.with_name('model.json')}: no 'layers' list")
    blocks = bool(spec.get("bnorm"))
    modules: list[nn.Module] = []
    for index, layer in enumerate(layers):
        last = index == len(layers) - 1
        prefix = f"model.{index}" if blocks else f"model.{2 * index}"
        conv_prefix = prefix if last or not blocks else f"{prefix}.0"
        weight = state.get(f"{conv_prefix}.weight")
        if weight is None:
            raise ModelError(f"{path}: no tensor '{conv_prefix}.weight' for layer {index} of model.json")
        try:
            conv = nn.Conv3d(int(weight.shape[1]), int(weight.shape[0]), layer["kernel_size"], layer.get("stride", 1),
                             layer.get("padding", 0), layer.get("dilation", 1), bias=f"{conv_prefix}.bias" in state)
        except KeyError as exc:
            raise ModelError(f"{path.with_name('model.json')}: layer {index} has no {exc}") from None
        for key, actual in (("in_channels", conv.in_channels), ("out_channels", conv.out_channels)):
            declared = layer.get(key, -1)
            if declared not in (-1, actual):
                raise ModelError(f"{path}: layer {index} has {key} {actual} in the weights, {declared} in model.json")
        if last:
            modules.append(conv)
        elif blocks:
            channels = conv.out_channels
            modules.append(nn.Sequential(conv, nn.GroupNorm(channels, channels, affine=False), _activation(spec)))
        else:
            modules += [conv, _activation(spec)]
    return MeshNet(nn.Sequential(*modules))
