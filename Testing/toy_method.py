"""A method defined outside the engine, as a third party (or this test suite) would: one file, registered by name,
found by the worker through the `peftadapt.methods` entry point (see test_methods.py)."""
from __future__ import annotations

from dataclasses import dataclass

from PEFTAdaptLib.methods import BuildContext, MethodConfig, Plan, register_method


@register_method
@dataclass
class LastLayerBias(MethodConfig):
    name = "toy-last-bias"
    label = "Toy: the bias of the network's last weight layer only"

    def build(self, context: BuildContext) -> Plan:
        from PEFTAdaptLib.adapters import BitFitConfig, BitFitUnit, add_units
        from PEFTAdaptLib.adapters.base import WEIGHT_TYPES, base_layer_names

        last = base_layer_names(context.network, WEIGHT_TYPES)[-1]
        add_units(context.network, BitFitConfig(), BitFitUnit, "toy", layers=[last])
        return Plan(info={"toy_layer": last})
