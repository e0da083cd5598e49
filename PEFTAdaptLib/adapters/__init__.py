"""Adapter library: one class per adapter type, a config dataclass each, weight-space and mergeable."""
from .base import (
    AdaptedLayer, AdapterConfig, AdapterUnit, UNIT_TYPES, UnitRecord, add_units, count_base_parameters,
    count_trainable, freeze_base, iter_units, merge_all, trainable_parameters, unmerge_all,
)
from .io import fingerprint, load_adapters, save_adapters
from .lora import LoRAConfig, LoRAUnit

__all__ = [
    "AdaptedLayer", "AdapterConfig", "AdapterUnit", "LoRAConfig", "LoRAUnit", "UNIT_TYPES", "UnitRecord",
    "add_units", "count_base_parameters", "count_trainable", "fingerprint", "freeze_base", "iter_units",
    "load_adapters", "merge_all", "save_adapters", "trainable_parameters", "unmerge_all",
]
