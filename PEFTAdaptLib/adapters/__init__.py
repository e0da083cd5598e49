"""Adapter library: one class per adapter type, a config dataclass each, weight-space and mergeable where exact.

`apply_adapter(model, config)` puts the unit type matching `config` on every layer it targets (peft's
`get_peft_model` in spirit); `add_units` does the same for an explicit unit class and layer list (allocator pools).
"""
from torch import nn

from .adaptformer import AdaptFormerConfig, AdaptFormerUnit
from .base import (
    AdaptedLayer, AdapterConfig, AdapterUnit, UNIT_TYPES, UnitRecord, add_units, count_base_parameters,
    count_trainable, freeze_base, iter_units, merge_all, merge_and_unload, parameter_groups, train_units,
    trainable_parameters,
    unmerge_all,
)
from .bitfit import BitFitConfig, BitFitUnit
from .convlora import ConvLoRAConfig, ConvLoRAUnit
from .dense import DenseConfig, DenseUnit, train_in_full
from .io import fingerprint, load_adapters, save_adapters
from .lora import LoRAConfig, LoRAUnit
from .norm import AdaBNConfig, AdaBNUnit, NormAffineConfig, NormAffineUnit, estimate_adabn
from .qkv_lora import QKVLoRAConfig, QKVLoRAUnit
from .salt import SALTConfig, SALTUnit, SVDConfig, SVDUnit


def unit_class_for(config: AdapterConfig) -> type[AdapterUnit]:
    """The unit class a config describes (ConvLoRA's "peft" factorisation is LoRA on a conv)."""
    if isinstance(config, ConvLoRAConfig) and config.factorisation == "peft":
        return LoRAUnit
    for unit_class in UNIT_TYPES.values():
        if type(config) is unit_class.config_class:
            return unit_class
    raise TypeError(f"no adapter type takes a {type(config).__name__}")


def apply_adapter(model: nn.Module, config: AdapterConfig, name: str = "default") -> list[UnitRecord]:
    unit_class = unit_class_for(config)
    if unit_class is LoRAUnit and isinstance(config, ConvLoRAConfig):
        config = LoRAConfig(r=config.r, alpha=config.alpha, target_modules=config.target_modules,
                            exclude_modules=config.exclude_modules)
    return add_units(model, config, unit_class, name)


__all__ = [
    "AdaBNConfig", "AdaBNUnit", "AdaptFormerConfig", "AdaptFormerUnit", "AdaptedLayer", "AdapterConfig",
    "AdapterUnit", "BitFitConfig", "BitFitUnit", "ConvLoRAConfig", "ConvLoRAUnit", "DenseConfig", "DenseUnit",
    "LoRAConfig", "LoRAUnit", "NormAffineConfig", "QKVLoRAConfig", "QKVLoRAUnit", "NormAffineUnit", "SALTConfig", "SALTUnit", "SVDConfig", "SVDUnit",
    "UNIT_TYPES", "UnitRecord", "add_units", "apply_adapter", "count_base_parameters", "count_trainable",
    "estimate_adabn", "fingerprint", "freeze_base", "iter_units", "load_adapters", "merge_all", "merge_and_unload",
    "parameter_groups", "save_adapters", "train_in_full", "train_units", "trainable_parameters", "unit_class_for",
    "unmerge_all",
]
