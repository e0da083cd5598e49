"""SVD (S-SAM): scale and shift of every singular value of every convolution and linear weight."""
from __future__ import annotations

from dataclasses import dataclass

from .base import register_method
from .fixed import FixedMethod


@register_method
@dataclass
class SVD(FixedMethod):
    name = "svd"
    label = "SVD: every singular value of every weight scaled and shifted"
    unit_name = "svd"

    def adapter_config(self, rank):
        from ..adapters import SVDConfig

        return SVDConfig()
