"""Singular-value adapters on a frozen weight W = U diag(σ) Vᵀ (matricised (shape[0], rest) for convs).

- SALT (Elsayed et al. 2025): scale and shift of the top-r singular values plus a low-rank X·Y in the residual
  singular subspace, ReLU over the modified k×k singular-value matrix Σ': W' = U ReLU(Σ') Vᵀ.
- SVD / S-SAM: scale and shift of all singular values, W' = U diag(ReLU(a⊙σ + b)) Vᵀ.

The SVD is computed once, when the unit is created on the loaded weights, and cached as (non-saved) buffers; the
reference code recomputed it lazily at the first forward. A saved unit holds only its trained tensors, so the basis
must come out the same wherever it is recomputed (another LAPACK, another device at resume): `canonical_svd` fixes
the signs of the singular pairs and the basis inside groups of equal singular values, which an SVD leaves free.
We apply the update as W + U (ReLU(Σ') − diag σ) Vᵀ, which is the same function but exactly W at initialisation
(the reconstruction error of U Σ Vᵀ never enters) wherever the weight is composed: inference, merge, the dense
path. A training step where the cost rule takes it runs the layer in the basis instead (`lowrank.product_forward`:
x projected onto Vᵀ's k filters, mixed by U ReLU(Σ')), whose weight differs from W by the SVD's round-off (float32
eps relative) and whose gradients are more accurate than the dense path's (docs/adapters.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .base import AdapterConfig, LowRankUnit

#: singular values closer than this (relative to the largest) form one group whose basis the SVD leaves free; far
#: above float64 round-off (1e-16), so the grouping is the same on every machine, and small enough that vectors of
#: separated values are accurate to ~1e-8
DEGENERACY_TOLERANCE = 1e-8


def _orthonormalise(projected: torch.Tensor) -> torch.Tensor:
    """QR with the triangular factor's diagonal made positive: unique, so a function of `projected` alone."""
    q, r = torch.linalg.qr(projected)
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)


def canonical_svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (float64, on the CPU) in a canonical form: U, σ, Vᵀ depend only on `matrix`, not on the LAPACK.

    Each group of (numerically) equal singular values gets a basis derived from its right singular subspace alone
    (the subspace's projection of fixed probe vectors, orthonormalised), and the left vectors follow (U_g ← U_g Vᵀ_g
    V'_g keeps W v_i = σ_i u_i); for a lone value this only fixes the sign of the pair. Zero singular values pair
    arbitrary left and right vectors, so both sides of that group are made canonical separately.
    """
    m = matrix.detach().to("cpu", torch.float64)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    u, v, k = u.clone(), vh.T.clone(), s.numel()
    if k == 0:
        return u, s, vh
    generator = torch.Generator().manual_seed(0)
    probe_v = torch.randn(v.shape[0], k, generator=generator, dtype=torch.float64)
    probe_u = torch.randn(u.shape[0], k, generator=generator, dtype=torch.float64)
    tolerance = DEGENERACY_TOLERANCE * float(s[0])
    null = s <= tolerance
    kept = int((~null).sum())
    starts = [0] + [i + 1 for i in range(kept - 1) if float(s[i] - s[i + 1]) > tolerance]
    for start, stop in zip(starts, starts[1:] + [kept]):
        group = slice(start, stop)
        basis = _orthonormalise(v[:, group] @ (v[:, group].T @ probe_v[:, : stop - start]))
        u[:, group] = u[:, group] @ (v[:, group].T @ basis)
        v[:, group] = basis
    if kept < k:
        width = k - kept
        # the complement of the non-zero pairs' span, probed the same way (it may be larger than the group)
        v[:, kept:] = _orthonormalise(probe_v[:, :width] - v[:, :kept] @ (v[:, :kept].T @ probe_v[:, :width]))
        u[:, kept:] = _orthonormalise(probe_u[:, :width] - u[:, :kept] @ (u[:, :kept].T @ probe_u[:, :width]))
    return u, s, v.T.contiguous()


class SingularBasisUnit(LowRankUnit):
    """A unit that changes the singular values of the base weight (matrix Σ' in its fixed basis U, Vᵀ)."""

    additive = False  # replaces the singular values of the base weight: composes first
    has_basis = True

    def __init__(self, layer: nn.Module, config: AdapterConfig):
        super().__init__(layer, config)
        weight = layer.weight.detach()
        u, s, vh = canonical_svd(weight.reshape(weight.shape[0], -1))
        to = {"dtype": weight.dtype, "device": weight.device}
        self.register_buffer("U", u.to(**to), persistent=False)
        self.register_buffer("S", s.to(**to), persistent=False)
        self.register_buffer("Vh", vh.to(**to), persistent=False)

    def sigma(self) -> torch.Tensor:
        """ReLU(Σ'): the adapted singular-value matrix (or vector, for diagonal updates)."""
        raise NotImplementedError

    def sigma_delta(self) -> torch.Tensor:
        """ReLU(Σ') − diag(σ)."""
        sigma = self.sigma()
        return sigma - self.S if sigma.dim() == 1 else sigma - torch.diag(self.S)

    def _left(self, core: torch.Tensor) -> torch.Tensor:
        return self.U * core if core.dim() == 1 else self.U @ core

    def split(self, params):
        """ΔW = (U (ReLU(Σ') − diag σ)) Vᵀ: the update, exactly zero at initialisation."""
        return params, (self._left(self.sigma_delta()), self.Vh)

    def whole(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapted weight itself as factors, (U ReLU(Σ')) Vᵀ: equal to W + ΔW up to the round-off of the SVD."""
        return self._left(self.sigma()), self.Vh


@dataclass
class SALTConfig(AdapterConfig):
    #: number of top singular values that get scale + shift: `rank` if set, else max(1, ⌊k·ratio⌋)
    rank: int | None = None
    ratio: float = 0.1
    #: rank of the low-rank update in the residual singular subspace
    lora_rank: int = 4


class SALTUnit(SingularBasisUnit):
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

    def sigma(self) -> torch.Tensor:
        return torch.relu(self.sigma_matrix())


@dataclass
class SVDConfig(AdapterConfig):
    pass


class SVDUnit(SingularBasisUnit):
    kind = "svd"
    config_class = SVDConfig

    def __init__(self, layer: nn.Module, config: SVDConfig):
        super().__init__(layer, config)
        self.scale = nn.Parameter(torch.ones_like(self.S))
        self.shift = nn.Parameter(torch.zeros_like(self.S))

    def sigma(self) -> torch.Tensor:
        return torch.relu(self.scale * self.S + self.shift)
