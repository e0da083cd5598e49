"""LoRA in weight space: W' = W + s · reshape(B A), s = α/r (α/√r with rsLoRA).

The weight is matricised as (shape[0], rest): (out, in) for Linear, (C_out, C_in·k^d) for ConvNd — exactly HF
peft's LoRA-conv factorisation (A = k^d conv to r channels, B = 1×1 conv), so the two agree numerically — and
(C_in, C_out·k^d) for ConvTransposeNd.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import AdapterConfig, LowRankUnit


@dataclass
class LoRAConfig(AdapterConfig):
    r: int = 4
    alpha: float = 4.0
    #: rank dropout: in weight space the input path is shared, so dropout zeroes whole rank components (scaled)
    dropout: float = 0.0
    use_rslora: bool = False
    #: "kaiming" (A kaiming-uniform a=√5, B=0, HF default), "gaussian" (A ~ N(0, 1/r), B=0) or "pissa"
    init: str = "kaiming"


class LoRAUnit(LowRankUnit):
    kind = "lora"
    config_class = LoRAConfig

    def __init__(self, layer: nn.Module, config: LoRAConfig):
        super().__init__(layer, config)
        weight = layer.weight
        rows, cols = weight.shape[0], weight[0].numel()
        if config.r < 1:
            raise ValueError(f"LoRA rank must be ≥ 1, got {config.r}")
        # a rank above the layer's full rank only over-parameterises it: cap it (thin 1×1 convs, output heads)
        r = self.rank = min(config.r, rows, cols)
        self.scaling = config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
        self.lora_A = nn.Parameter(torch.empty(r, cols, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(rows, r, dtype=weight.dtype))
        # principal part removed from the base when PiSSA initialises (zero otherwise): W' = W - P + s·BA
        self.register_buffer("principal", torch.zeros(0, dtype=weight.dtype), persistent=True)
        if config.init == "kaiming":
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif config.init == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / r)
        elif config.init == "pissa":
            self._pissa_init(weight.detach().reshape(rows, cols))
        else:
            raise ValueError(f"unknown LoRA init '{config.init}'")

    @torch.no_grad()
    def _pissa_init(self, matrix: torch.Tensor) -> None:
        u, s, vh = torch.linalg.svd(matrix.float(), full_matrices=False)
        r = self.rank
        s_r = s[:r] / self.scaling
        self.lora_A.copy_((torch.diag(s_r.sqrt()) @ vh[:r]).to(self.lora_A.dtype))
        self.lora_B.copy_((u[:, :r] @ torch.diag(s_r.sqrt())).to(self.lora_B.dtype))
        self.principal = (self.scaling * self.lora_B @ self.lora_A).detach().clone()

    def split(self, params):
        a = self.lora_A
        if self.training and self.config.dropout > 0:
            keep = torch.rand(a.shape[0], 1, device=a.device) >= self.config.dropout
            a = a * keep / (1 - self.config.dropout)
        weight = params["weight"]
        if self.principal.numel():
            params = {**params, "weight": weight - self.principal.reshape(weight.shape)}
        return params, (self.scaling * self.lora_B, a)
