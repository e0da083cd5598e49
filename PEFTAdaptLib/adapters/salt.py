"""Singular-value adapters on a frozen weight W = U diag(σ) Vᵀ (matricised (shape[0], rest) for convs).

- SALT (Elsayed et al. 2025): scale and shift of the top-r singular values plus a low-rank X·Y in the residual
  singular subspace, ReLU over the modified k×k singular-value matrix Σ': W' = U ReLU(Σ') Vᵀ.
- SVD / S-SAM: scale and shift of all singular values, W' = U diag(ReLU(a⊙σ + b)) Vᵀ.

The SVD is computed once, when the unit is created on the loaded weights, and cached as (non-saved) buffers; the
reference code recomputed it lazily at the first forward. We apply the update as W + U (ReLU(Σ') − diag σ) Vᵀ, which
is the same function but exactly W at initialisation (the reconstruction error of U Σ Vᵀ never enters).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import AdapterConfig, AdapterUnit


class _SingularBasis(AdapterUnit):
    additive = False  # replaces the singular values of the base weight: composes first

    def __init__(self, layer: nn.Module, config: AdapterConfig):
        super().__init__(layer, config)
        matrix = layer.weight.detach().reshape(layer.weight.shape[0], -1).double()
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        dtype = layer.weight.dtype
        self.register_buffer("U", u.to(dtype), persistent=False)
        self.register_buffer("S", s.to(dtype), persistent=False)
        self.register_buffer("Vh", vh.to(dtype), persistent=False)

    def sigma_delta(self) -> torch.Tensor:
        """ReLU(Σ') − diag(σ): a k×k matrix (or a length-k vector for diagonal updates)."""
        raise NotImplementedError

    def apply(self, params):
        weight = params["weight"]
        delta = self.sigma_delta()
        update = (self.U * delta) @ self.Vh if delta.dim() == 1 else self.U @ delta @ self.Vh
        return {**params, "weight": weight + update.reshape(weight.shape)}


@dataclass
class SALTConfig(AdapterConfig):
    #: number of top singular values that get scale + shift: `rank` if set, else max(1, ⌊k·ratio⌋)
    rank: int | None = None
    ratio: float = 0.1
    #: rank of the low-rank update in the residual singular subspace
    lora_rank: int = 4


class SALTUnit(_SingularBasis):
    kind = "salt"
    config_class = SALTConfig

    def __init__(self, layer: nn.Module, config: SALTConfig):
        super().__init__(layer, config)
        k = self.S.numel()
        r = config.rank if config.rank is not None else max(1, math.floor(k * config.ratio))
        if not 1 <= r <= k:
            raise ValueError(f"SALT rank {r} must be between 1 and {k}")
        self.r = r
        rest, r_l = k - r, min(config.lora_rank, max(k - r, 0))
        dtype = self.S.dtype
        self.scale = nn.Parameter(torch.ones(r, dtype=dtype))
        self.shift = nn.Parameter(torch.zeros(r, dtype=dtype))
        self.X = nn.Parameter(torch.empty(rest, r_l, dtype=dtype))
        self.Y = nn.Parameter(torch.zeros(r_l, rest, dtype=dtype))
        if self.X.numel():
            nn.init.kaiming_uniform_(self.X, a=math.sqrt(20), mode="fan_in", nonlinearity="relu")

    def sigma_matrix(self) -> torch.Tensor:
        """Σ' before the ReLU: diag(a⊙σ_top + b) ⊕ (diag σ_rest + X Y)."""
        k, r = self.S.numel(), self.r
        sigma = torch.zeros(k, k, dtype=self.S.dtype, device=self.S.device)
        sigma[:r, :r] = torch.diag(self.scale * self.S[:r] + self.shift)
        sigma[r:, r:] = torch.diag(self.S[r:]) + self.X @ self.Y
        return sigma

    def sigma_delta(self) -> torch.Tensor:
        return torch.relu(self.sigma_matrix()) - torch.diag(self.S)


@dataclass
class SVDConfig(AdapterConfig):
    pass


class SVDUnit(_SingularBasis):
    kind = "svd"
    config_class = SVDConfig

    def __init__(self, layer: nn.Module, config: SVDConfig):
        super().__init__(layer, config)
        self.scale = nn.Parameter(torch.ones_like(self.S))
        self.shift = nn.Parameter(torch.zeros_like(self.S))

    def sigma_delta(self) -> torch.Tensor:
        return torch.relu(self.scale * self.S + self.shift) - self.S
