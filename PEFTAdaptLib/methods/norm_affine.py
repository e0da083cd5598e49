"""Norm-affine: train the scale and shift of every normalisation layer (the reference SEA-PEFT's Affine units)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_method
from .fixed import FixedMethod


@register_method
@dataclass
class NormAffine(FixedMethod):
    name = "norm-affine"
    label = "Norm-affine: the scale and shift of every normalisation layer"
    unit_name = "norm_affine"
    default_lr = 1e-2  # γ, β start at the source's values, not at zero: larger steps (reference Affine setting)

    def adapter_config(self, rank):
        from ..adapters import NormAffineConfig

        return NormAffineConfig()
