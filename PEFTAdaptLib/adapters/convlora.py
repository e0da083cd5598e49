"""ConvLoRA in the ConvLoRA paper's factorisation (Aleem et al., ISBI 2024): ΔW = view(B A) · α/r with
A ∈ R^{(r·k) × (C_in·k^{d-1})}, B ∈ R^{(C_out·k) × (r·k)} — a rank ≤ r·k update in a (C_out·k) × (C_in·k^{d-1})
matricisation (the paper's 2D code, generalised to d spatial dims). k is the kernel's first size and k^{d-1} the
product of the others, so an anisotropic kernel (nnU-Net's 1×3×3) reshapes the same way. HF peft's factorisation
(k^d conv to r channels, then 1×1) is `LoRAUnit` on a conv; `ConvLoRAConfig(factorisation="peft")` selects it
through `unit_class_for`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import CONV_TYPES, AdapterConfig, LowRankUnit


@dataclass
class ConvLoRAConfig(AdapterConfig):
    r: int = 2
    alpha: float = 2.0
    #: "paper" (this class) or "peft" (LoRA-conv, `LoRAUnit`)
    factorisation: str = "paper"


class ConvLoRAUnit(LowRankUnit):
    kind = "convlora"
    config_class = ConvLoRAConfig
    layer_types = CONV_TYPES

    def __init__(self, layer: nn.Module, config: ConvLoRAConfig):
        super().__init__(layer, config)
        c_out, c_in_per_group, k, *others = layer.weight.shape
        self.scaling = config.alpha / config.r
        dtype = layer.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(config.r * k, c_in_per_group * math.prod(others), dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(c_out * k, config.r * k, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def split(self, params):
        """view(B A) in the (C_out, C_in·kᵈ) matricisation: row o of the weight is the k rows o·k + a of B A side by
        side, so P[o, (a, j)] = B[o·k + a, j] (a reshape of B) and Q = diag(A, …, A) (k blocks)."""
        k = self.lora_B.shape[0] // params["weight"].shape[0]
        p = self.scaling * self.lora_B.reshape(params["weight"].shape[0], -1)
        return params, (p, torch.block_diag(*[self.lora_A] * k))
