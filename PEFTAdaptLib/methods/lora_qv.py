"""LoRA on the attention's query and value projections only (MED-PEFT's setting for ViT foundation models): a fused
`qkv` projection gets a LoRA pair on its q rows and one on its v rows (`adapters/qkv_lora.py`); separate q and v
projections get plain LoRA. Keys, MLPs, convolutions and norms stay frozen."""
from __future__ import annotations

from dataclasses import dataclass

from .base import BuildContext, MethodError, Plan, register_method
from .fixed import RankedMethod, matrix_shape, weight_shape

#: leaf names of separate query and value projections (MONAI's SABlock without a combined linear: to_q, to_v)
QUERY_VALUE_NAMES = {"q", "v", "query", "value", "to_q", "to_v", "q_proj", "v_proj"}


@register_method
@dataclass
class LoRAQueryValue(RankedMethod):
    name = "lora-qv"
    label = "LoRA on the attention's query and value projections (MED-PEFT; transformers only)"
    unit_name = "lora_qv"

    def adapter_config(self, rank):
        from ..adapters import QKVLoRAConfig

        return QKVLoRAConfig(r=rank, alpha=rank, parts="qv")

    def layers(self, network) -> tuple[list[str], list[str]]:
        """(fused qkv layers, separate q/v layers) of `network`."""
        import torch.nn as nn

        from ..adapters.base import base_layer_names
        from ..adapters.qkv_lora import is_fused_qkv
        from ..seapeft.pool import FUSED_QKV_NAMES

        fused, separate = [], []
        for name in base_layer_names(network, (nn.Linear,)):
            leaf = name.rsplit(".", 1)[-1]
            if leaf in FUSED_QKV_NAMES and is_fused_qkv(_layer(network, name)):
                fused.append(name)
            elif leaf in QUERY_VALUE_NAMES:
                separate.append(name)
        return fused, separate

    def target_layers(self, network) -> list[str]:
        fused, separate = self.layers(network)
        return fused + separate

    def cost(self, network, rank: int) -> int:
        fused, separate = self.layers(network)
        total = 0
        for name in fused:  # two blocks of out/3 rows each
            rows, columns = matrix_shape(weight_shape(network, name))
            total += 2 * min(rank, rows // 3, columns) * (rows // 3 + columns)
        for name in separate:
            rows, columns = matrix_shape(weight_shape(network, name))
            total += min(rank, rows, columns) * (rows + columns)
        return total

    def build(self, context: BuildContext) -> Plan:
        from ..adapters import LoRAConfig, LoRAUnit, QKVLoRAUnit, add_units

        fused, separate = self.layers(context.network)
        if not fused and not separate:
            raise MethodError(f"method '{self.name}': this model has no attention query/value projection (a "
                              "transformer's qkv, or q and v layers); choose lora or sea-peft")
        rank, budget, reason = self.choose_rank(context)
        add_units(context.network, self.adapter_config(rank), QKVLoRAUnit, self.unit_name, layers=fused)
        add_units(context.network, LoRAConfig(r=rank, alpha=rank), LoRAUnit, self.unit_name, layers=separate)
        return Plan(rank=rank, budget=budget, info={"rank_reason": reason})


def _layer(network, name: str):
    from ..adapters.base import AdaptedLayer

    layer = network.get_submodule(name)
    return layer.base if isinstance(layer, AdaptedLayer) else layer
