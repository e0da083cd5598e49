"""Shallow fine-tuning: the weight layers nearest the input and the output fine-tuned in full, and every norm's
scale and shift — the classic recipe for a contrast or scanner shift (Shirokikh et al., MICCAI 2020), found on the
network's own computation graph (adapters/shallow.py), not by layer names."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BuildContext, MethodConfig, MethodError, Plan, register_method


@register_method
@dataclass
class Shallow(MethodConfig):
    name = "shallow"
    label = "Shallow fine-tuning: the first and last layers in full, every norm's scale and shift"

    def build(self, context: BuildContext) -> Plan:
        import torch

        from ..adapters import count_trainable
        from ..adapters.shallow import apply_shallow
        from ..data.transforms import pad_to_size

        case = context.cases.support[0]
        patch = context.card.patch_size
        array = pad_to_size(case.array, patch, float(case.array.min()))[(slice(None), *(slice(0, p) for p in patch))]
        example = torch.from_numpy(array.copy())[None].to(context.device)
        context.network.to(context.device)
        if not apply_shallow(context.network, example):
            raise MethodError(f"method '{self.name}': no layer of this model can take it")
        return Plan(info={"shallow_parameters": count_trainable(context.network)})
