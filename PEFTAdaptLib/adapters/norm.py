"""Normalisation adapters.

- norm-affine: trainable γ, β of BatchNorm / InstanceNorm / GroupNorm / LayerNorm. The unit holds its own
  (γ, β), initialised from the layer's affine (or 1, 0 where the norm has none), so it has a real parameter cost —
  the reference SEA-PEFT code counted affine units as 0 and never allocated them.
- AdaBN: re-estimated BatchNorm running statistics on target data (`estimate_adabn`), held by the unit so the gate
  switches between source and target statistics. InstanceNorm and GroupNorm normalise every sample with its own
  statistics: there is nothing to re-estimate, so AdaBN units go on BatchNorm only (use norm-affine elsewhere).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .base import BATCH_NORM_TYPES, NORM_TYPES, AdaptedLayer, AdapterConfig, AdapterUnit, iter_units


def _affine_shape(layer: nn.Module) -> tuple[int, ...]:
    if isinstance(layer, nn.LayerNorm):
        return tuple(layer.normalized_shape)
    return (layer.num_channels if isinstance(layer, nn.GroupNorm) else layer.num_features,)


@dataclass
class NormAffineConfig(AdapterConfig):
    pass


class NormAffineUnit(AdapterUnit):
    kind = "norm_affine"
    config_class = NormAffineConfig
    layer_types = NORM_TYPES
    additive = False  # replaces γ, β

    def __init__(self, layer: nn.Module, config: NormAffineConfig):
        super().__init__(layer, config)
        shape = _affine_shape(layer)
        weight, bias = getattr(layer, "weight", None), getattr(layer, "bias", None)
        self.weight = nn.Parameter(weight.detach().clone() if weight is not None else torch.ones(shape))
        self.bias = nn.Parameter(bias.detach().clone() if bias is not None else torch.zeros(shape))

    def apply(self, params):
        return {**params, "weight": self.weight, "bias": self.bias}


@dataclass
class AdaBNConfig(AdapterConfig):
    pass


class AdaBNUnit(AdapterUnit):
    kind = "adabn"
    config_class = AdaBNConfig
    layer_types = BATCH_NORM_TYPES
    additive = False

    def __init__(self, layer: nn.Module, config: AdaBNConfig):
        super().__init__(layer, config)
        if layer.running_mean is None:
            raise ValueError("AdaBN needs a BatchNorm that tracks running statistics")
        self.register_buffer("running_mean", layer.running_mean.detach().clone())
        self.register_buffer("running_var", layer.running_var.detach().clone())

    def apply(self, params):
        return {**params, "running_mean": self.running_mean, "running_var": self.running_var}

    def num_trainable(self) -> int:
        return 0  # statistics, not trained parameters


@torch.no_grad()
def estimate_adabn(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate the target statistics of every AdaBN unit from `batches` (a cumulative average over all of
    them, as PyTorch's momentum=None); returns the number of batches seen. The model's weights are not changed."""
    records = [r for r in iter_units(model) if isinstance(r.unit, AdaBNUnit)]
    sums: dict[int, list] = {}

    def hook(layer: AdaptedLayer, inputs):
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        entry = sums.setdefault(id(layer), [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] = entry[1] + x.mean(dim=dims)
        entry[2] = entry[2] + x.var(dim=dims, unbiased=True)

    handles = [r.owner.register_forward_pre_hook(hook) for r in records]
    was_training = model.training
    model.eval()
    count = 0
    try:
        for batch in batches:
            model(batch)
            count += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for record in records:
        n, mean, var = sums.get(id(record.owner), (0, None, None))
        if n:
            record.unit.running_mean.copy_(mean / n)
            record.unit.running_var.copy_(var / n)
    return count
