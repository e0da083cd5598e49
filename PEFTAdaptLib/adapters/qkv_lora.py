"""LoRA on chosen projections of a fused attention input projection: one Linear `qkv` whose output rows are the
query, key and value blocks in that order (MONAI's SABlock, timm's and segment-anything's ViTs).

MED-PEFT (after SAMed) adapts only the query and value: each chosen block gets its own rank-r pair (A, B) on its
rows of the weight, and the other rows get no delta and no parameter. A fused layer adapted on "qv" is therefore
exactly LoRA on separate q and v projections (tested against HF peft on a split ViT), where LoRA on the whole
fused weight would also move the keys and share one rank budget across the three.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from .base import LowRankUnit
from .lora import LoRAConfig, LoRAUnit

BLOCKS = "qkv"  # the order of the output rows of a fused projection


@dataclass
class QKVLoRAConfig(LoRAConfig):
    #: which of the fused projection's blocks get a LoRA pair (a subset of "qkv", in any order)
    parts: str = "qv"


def is_fused_qkv(layer: nn.Module) -> bool:
    """A Linear whose outputs split into three equal blocks (what a fused q/k/v projection is)."""
    return isinstance(layer, nn.Linear) and layer.out_features % 3 == 0


class QKVLoRAUnit(LowRankUnit):
    kind = "lora_qkv"
    config_class = QKVLoRAConfig
    layer_types = (nn.Linear,)

    def __init__(self, layer: nn.Module, config: QKVLoRAConfig):
        super().__init__(layer, config)
        parts = "".join(sorted(set(config.parts), key=BLOCKS.index)) if set(config.parts) <= set(BLOCKS) else ""
        if not parts:
            raise ValueError(f"fused-qkv LoRA parts '{config.parts}' must be a non-empty subset of 'qkv'")
        if not is_fused_qkv(layer):
            raise ValueError(f"fused-qkv LoRA needs a Linear with 3 × d outputs, got {tuple(layer.weight.shape)}")
        self.block = layer.out_features // 3
        weight = layer.weight.detach()
        block = lambda index: SimpleNamespace(weight=weight[index * self.block:(index + 1) * self.block])  # noqa: E731
        lora = LoRAConfig(r=config.r, alpha=config.alpha, dropout=config.dropout, use_rslora=config.use_rslora,
                          init=config.init)
        self.parts = nn.ModuleDict({p: LoRAUnit(block(BLOCKS.index(p)), lora) for p in parts})

    def split(self, params):
        """Each chosen block's pair placed on its rows: ΔW = P Q with P (3d × Σr) block-structured and Q the A's
        stacked, so the layer trains through the same low-rank path as any LoRA (keys: zero rows of P)."""
        rows = list(params["weight"].split(self.block))
        placed, inputs = [], []
        for name, unit in self.parts.items():
            index = BLOCKS.index(name)
            fixed, (b, a) = unit.split({"weight": rows[index]})  # fixed: PiSSA's principal part removed
            rows[index] = fixed["weight"]
            placed.append((index, b))
            inputs.append(a)
        p = torch.cat([torch.cat([b if index == block else b.new_zeros(b.shape) for index, b in placed], dim=1)
                       for block in range(len(BLOCKS))])
        return {**params, "weight": torch.cat(rows)}, (p, torch.cat(inputs))
