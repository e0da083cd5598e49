"""Dense delta: a layer fine-tuned in full, held as ΔW (and Δb) beside the frozen weight.

peft's `modules_to_save` copies a module and trains the copy; a delta does the same training (W + ΔW with ΔW = 0
at start is exactly fine-tuning W) but stays gateable, merges exactly, and saves only what changed. It costs the
layer's whole weight, so it is only worth it on small layers: the first and last convolutions of a CNN, which
carry most of the contrast-specific information (Shirokikh et al., MICCAI 2020) and are a few thousand weights each.
SEA-PEFT offers it as a family wherever it fits the budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import AdapterConfig, AdapterUnit, add_units, base_layer_names


@dataclass
class DenseConfig(AdapterConfig):
    pass


class DenseUnit(AdapterUnit):
    kind = "dense"
    config_class = DenseConfig
    lr_scale = 1 / 3

    def __init__(self, layer: nn.Module, config: DenseConfig):
        super().__init__(layer, config)
        self.delta_weight = nn.Parameter(torch.zeros_like(layer.weight))
        bias = getattr(layer, "bias", None)
        self.delta_bias = nn.Parameter(torch.zeros_like(bias)) if bias is not None else None

    def apply(self, params):
        out = {**params, "weight": params["weight"] + self.delta_weight}
        if self.delta_bias is not None:
            out["bias"] = params["bias"] + self.delta_bias
        return out


#: the units' name on the layers of a model's new modules (`train_in_full`)
NEW_MODULE_UNIT = "new"


def train_in_full(model: nn.Module, modules) -> int:
    """Dense deltas on every weight layer inside the named modules (a new task head, which starts untrained and so
    is trained in full beside any method's adapters); returns the parameters they train."""
    layers = [name for name in base_layer_names(model, DenseUnit.layer_types)
              if any(name == m or name.startswith(f"{m}.") for m in modules)]
    records = add_units(model, DenseConfig(), DenseUnit, NEW_MODULE_UNIT, layers=layers)
    return sum(p.numel() for r in records for p in r.unit.parameters())
