"""The adapter pool: every adaptable site of a model × families (LoRA at several ranks, SALT, norm-affine, BitFit),
all units created inactive with their exact parameter cost."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..adapters import (
    BitFitConfig, BitFitUnit, LoRAConfig, LoRAUnit, NormAffineConfig, NormAffineUnit, SALTConfig, SALTUnit, add_units,
)
from ..adapters.base import NORM_TYPES, WEIGHT_TYPES, base_layer_names


@dataclass(frozen=True)
class PoolUnit:
    name: str  # "layer::unit"
    layer: str  # the site
    unit: str
    family: str
    rank: int
    cost: int

    @property
    def key(self) -> tuple[str, str]:
        return self.layer, self.family


def build_pool(network: nn.Module, lora_ranks: Sequence[int] = (1, 2, 4), salt: bool = True,
               norm_affine: bool = True, bitfit: bool = True) -> list[PoolUnit]:
    """Add every candidate unit to `network`, inactive; return the pool description."""
    pool: list[PoolUnit] = []

    def add(config, unit_class, unit_name: str, family: str, rank: int, layers: list[str]) -> None:
        for record in add_units(network, config, unit_class, unit_name, active=False, layers=layers):
            pool.append(PoolUnit(f"{record.layer}::{unit_name}", record.layer, unit_name, family, rank,
                                 record.unit.num_trainable()))

    weight_layers = base_layer_names(network, WEIGHT_TYPES)
    for rank in lora_ranks:
        add(LoRAConfig(r=rank, alpha=rank), LoRAUnit, f"lora_r{rank}", "lora", rank, weight_layers)
    if salt:
        add(SALTConfig(ratio=0.1, lora_rank=2), SALTUnit, "salt", "salt", 2, weight_layers)
    if bitfit:
        add(BitFitConfig(), BitFitUnit, "bitfit", "bitfit", 0, weight_layers)
    if norm_affine:
        add(NormAffineConfig(), NormAffineUnit, "norm_affine", "norm_affine", 0, base_layer_names(network, NORM_TYPES))
    return pool
