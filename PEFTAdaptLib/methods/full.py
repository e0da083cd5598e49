"""Full fine-tuning of every convolution and linear weight, as dense deltas: a reference, not parameter-efficient."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_method
from .fixed import FixedMethod


@register_method
@dataclass
class FullFineTuning(FixedMethod):
    name = "full"
    label = "Full fine-tuning of every convolution and linear weight (a reference: not parameter-efficient)"
    unit_name = "full"
    default_lr = 1.5e-3  # dense deltas train at a third of it (`DenseUnit.lr_scale`): 5e-4 per weight

    def adapter_config(self, rank):
        from ..adapters import DenseConfig

        return DenseConfig()
