"""Low-rank gradients for adapted Linear / ConvNd / ConvTransposeNd layers, without the dense weight gradient.

A low-rank unit's update is ΔW = P Q in the layer's (shape[0], rest) matricisation: (C_out, C_in/g·kᵈ) for a
convolution, (C_in, C_out/g·kᵈ) for a transposed one. The forward pass runs the layer once with the composed weight
W + Σ P Q, as the dense path does; the backward pass gives the input and bias gradients with the composed weight,
and the factors' gradients ∂L/∂P = G Qᵀ, ∂L/∂Q = Pᵀ G without forming G = ∂L/∂W:

- convolution y = W ⋆ x: G Qᵀ is the 1×1 weight gradient of z = Q ⋆ x (x convolved with Q's p rows as filters,
  same stride, padding, dilation and groups), ∂L/∂P[o, j] = Σ dy_o z_j; Pᵀ G is the weight gradient of that
  p-filter convolution for the output gradient dz = Pᵀ dy (1×1, per group);
- transposed convolution y = W ⋆ᵀ x (W's first axis is on the input side), whose adjoint is the plain
  convolution of dy with W: the same with the roles of x and dy swapped, ∂L/∂P[c, j] = Σ x_c w_j with
  w = Q ⋆ dy, and ∂L/∂Q the weight gradient of Q ⋆ dy for u = Pᵀ x;
- Linear: the same as plain matrix products over the flattened leading dimensions.

Per output position this costs about 2p·(C_in·kᵈ + C_out) multiply-adds against C_out·C_in·kᵈ/g for G, but on a
CPU the passes with few channels run far below the dense gradient's rate, so a layer takes this path only where
the measured cost rule (`factored_is_cheaper`) says it is cheaper. Several units on one layer share it: their
factors are concatenated into one P and one Q.

A singular-value unit (SALT, SVD) changes a k×k matrix Σ' in the weight's basis, W' = U ReLU(Σ') Vᵀ; SALT's ReLU
over the whole residual block makes its update full rank, so the factors above would have k channels. The product
form (`product_forward`) instead runs the whole layer in that basis: z = Vᵀ ⋆ x (k filters, where the layer has
C_out: the cost of the layer's own convolution), y = U ReLU(Σ') z (a 1×1 mix), input gradient with the composed
weight, ∂L/∂(U ReLU(Σ')) = Σ dy zᵀ (a 1×1 reduction): no weight-gradient convolution at all. LoRA units on the same
layer (a SEA-PEFT pool) append their factors to the basis: their Q rows alone get a weight-gradient pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

#: convolution kernels produce output channels in blocks (oneDNN on AVX-512: 16), so a p-channel convolution or
#: weight gradient costs about what a 16-channel one does, however small p is
CHANNEL_BLOCK = 16
#: the factored backward runs two p-channel passes (z, ∂L/∂Q) where the dense one runs one rows-channel weight
#: gradient: it is taken where the rows span at least this many times the factors' channel blocks ...
FACTORED_MIN_BLOCKS = 4
#: ... and each weight row sums at least this many terms (C_in·kᵈ): below, the dense gradient is cheap and the
#: extra passes over the activations dominate (1×1 convolutions, thin transposed outputs). Both constants come
#: from `python bench/adapters.py --layers` on CPU (docs/benchmarks.md). Off the CPU the rules take the dense path:
#: on a GPU at these layer sizes the factored passes' extra kernels cost more than the dense weight gradient
#: (`bench/gpu_check.py`)
FACTORED_MIN_REDUCTION = 256
#: the product form (a singular-value unit's basis, `product_forward`) is taken where its multiply-adds are fewer
#: (`product_is_cheaper`) and each weight row sums at least this many terms: below, its two extra passes over the
#: activations (the mix back to the rows, ∂L/∂P) cost more than their arithmetic; measured like the constants above
PRODUCT_MIN_REDUCTION = 64
#: "factored" or "dense" forces a path wherever the layer allows it (benchmarks and tests compare the two);
#: None lets the cost rule decide
FORCE: str | None = None

Factors = tuple[torch.Tensor, torch.Tensor]


def fold(weight: torch.Tensor, factors: Sequence[Factors]) -> torch.Tensor:
    """W + Σ P Q, reshaped to the weight's shape: the composed weight both paths run the forward with."""
    for p, q in factors:
        weight = weight + (p @ q).reshape(weight.shape)
    return weight


def factored_is_cheaper(layer: nn.Module, rank: int, device: torch.device) -> bool:
    """The cost rule: channel blocks of the dense weight gradient against the factors', and its reduction length."""
    if FORCE is not None:
        return FORCE == "factored"
    if device.type != "cpu":
        return False
    rows, cols = layer.weight.shape[0], layer.weight[0].numel()
    blocks = lambda channels: -(-channels // CHANNEL_BLOCK)  # noqa: E731
    return blocks(rows) >= FACTORED_MIN_BLOCKS * blocks(rank) and cols >= FACTORED_MIN_REDUCTION


def product_is_cheaper(layer: nn.Module, channels: int, device: torch.device) -> bool:
    """The cost rule of the product form, in multiply-adds per output position and group: the projection onto
    `channels` filters, the mix back to the rows and ∂L/∂P, against the dense path's forward and weight gradient
    (both take the input gradient with the composed weight). It excludes 1×1 convolutions and Linear layers that
    do not narrow (the basis is as wide as the layer) and keeps 3×3×3 convolutions, whose rows sum 27× more terms."""
    if FORCE is not None:
        return FORCE == "factored"
    if device.type != "cpu":
        return False
    cols = layer.weight[0].numel()
    rows = layer.weight.shape[0] // getattr(layer, "groups", 1)
    return channels * (cols + 2 * rows) <= 2 * rows * cols and cols >= PRODUCT_MIN_REDUCTION


def _geometry(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, "_Conv | None"]:
    """(the input as the convolution reads it, the layer's geometry), None for a Linear."""
    if isinstance(layer, nn.Linear):
        return x, None
    padding = layer.padding
    if layer.padding_mode != "zeros":  # as the layer's own forward: pad first, then convolve unpadded
        x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
        padding = (0,) * len(layer.kernel_size)
    return x, _Conv(tuple(layer.stride), tuple(padding), tuple(layer.dilation), bool(layer.transposed),
                    tuple(layer.output_padding), int(layer.groups), tuple(layer.kernel_size))


def factored_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     factors: Sequence[Factors]) -> torch.Tensor:
    """`layer` run with weight W + Σ P Q and `bias`, its backward through the factors (W gets no gradient)."""
    p = torch.cat([f[0] for f in factors], dim=1)
    q = torch.cat([f[1] for f in factors], dim=0)
    x, geometry = _geometry(layer, x)
    device = x.device.type
    compute = _autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return _FactoredLayer.apply(x, weight, bias, p, q, geometry, compute)


def product_forward(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, basis: Factors,
                    factors: Sequence[Factors]) -> torch.Tensor:
    """`layer` run with the weight P Q, P = [P_basis, P_1, …], Q = [Q_basis; Q_1; …], as a projection onto Q's
    filters and a mix by P: `basis` is the whole (adapted) weight in a fixed basis (a singular-value unit's U Σ',
    Vᵀ, Q fixed), `factors` are low-rank updates on top. Only the factors' Q rows get a weight-gradient pass."""
    p = torch.cat([basis[0], *(f[0] for f in factors)], dim=1)
    q = torch.cat([basis[1], *(f[1] for f in factors)], dim=0)
    x, geometry = _geometry(layer, x)
    device = x.device.type
    compute = _autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return _ProductLayer.apply(x, bias, p, q, basis[1].shape[0], geometry, compute)


def _autocast_dtype(device: str) -> torch.dtype | None:
    """The dtype autocast would run a convolution in on `device`, None outside autocast."""
    if hasattr(torch, "get_autocast_dtype"):  # torch ≥ 2.4
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if device == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


@dataclass(frozen=True)
class _Conv:
    """A convolution's geometry. `conv` and `weight_grad` are the plain (not transposed) convolution with it, which
    for a transposed layer is its adjoint: the map from the output gradient back to the input side."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int
    kernel: tuple[int, ...]

    def layer(self, x, weight, bias):
        return torch.convolution(x, weight, bias, self.stride, self.padding, self.dilation, self.transposed,
                                 self.output_padding, self.groups)

    def conv(self, x, weight, groups):
        return torch.convolution(x, weight, None, self.stride, self.padding, self.dilation, False,
                                 (0,) * len(self.stride), groups)

    def weight_grad(self, x, grad_out, weight):
        """∂/∂weight of Σ grad_out · conv(x, weight)."""
        return torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, self.stride, self.padding, self.dilation, False, (0,) * len(self.stride),
            self.groups, [False, True, False])[1]


def _filters(q: torch.Tensor, kernel: torch.Size, groups: int) -> torch.Tensor:
    """Q's rows as p filters of the layer's kernel, one copy per group."""
    return q.reshape(q.shape[0], -1, *kernel).repeat(groups, *[1] * (len(kernel) + 1))


class _FactoredLayer(torch.autograd.Function):
    """y = layer(x; W + P Q, b), backward through P and Q. Under autocast the layer runs in the autocast dtype (as
    the dense path's would), its composed weight formed in full precision first.

    For an ungrouped convolution the forward also computes z = Q ⋆ x, as extra output channels of the same call
    (one pass over x instead of two), and keeps it for ∂L/∂P; a transposed one gets w = Q ⋆ dy the same way,
    beside the input gradient, in the backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, p, q, geometry, compute):
        full = fold(weight, [(p, q)])
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype, p.dtype, q.dtype)
        if compute is not None:
            x, full, p, q = x.to(compute), full.to(compute), p.to(compute), q.to(compute)
            bias = None if bias is None else bias.to(compute)
        ctx.geometry = geometry
        z = None
        if geometry is None:
            y = F.linear(x, full, bias)
        elif not geometry.transposed and geometry.groups == 1 and ctx.needs_input_grad[3]:
            rows = full.shape[0]
            extended_bias = None if bias is None else torch.cat([bias, bias.new_zeros(q.shape[0])])
            both = geometry.layer(x, torch.cat([full, _filters(q, full.shape[2:], 1)]), extended_bias)
            y, z = both[:, :rows].contiguous(), both[:, rows:]
        else:
            y = geometry.layer(x, full, bias)
        ctx.save_for_backward(x, full, p, q, z)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, full, p, q, z = ctx.saved_tensors
        dy = dy.to(x.dtype)
        needs = ctx.needs_input_grad[:5]
        with torch.autocast(dy.device.type, enabled=False):
            if ctx.geometry is None:
                grads = _linear_backward(needs, dy, x, full, p, q)
            else:
                grads = _conv_backward(needs, ctx.geometry, dy, x, full, p, q, z)
        grad_x, grad_bias, grad_p, grad_q = (g if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return grad_x, None, grad_bias, grad_p, grad_q, None, None


def _linear_backward(needs, dy, x, full, p, q):
    need_x, _, need_bias, need_p, need_q = needs
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return (dy @ full if need_x else None,
            dy2.sum(0) if need_bias else None,
            dy2.T @ (x2 @ q.T) if need_p else None,
            (dy2 @ p).T @ x2 if need_q else None)


def _conv_backward(needs, geometry: _Conv, dy, x, full, p, q, z):
    """Both convolutions in one frame: the activation on the weight's first axis ("rows": dy for y = W ⋆ x, x for
    y = W ⋆ᵀ x) and the one Q's filters read ("filtered": x, or dy, the transposed layer's adjoint being the
    plain convolution of dy). ∂L/∂P = Σ rows · (Q ⋆ filtered)ᵀ; ∂L/∂Q = weight gradient of Q ⋆ filtered for
    Pᵀ rows."""
    need_x, _, need_bias, need_p, need_q = needs
    groups, rank, rows = geometry.groups, p.shape[1], full.shape[0]
    filters = _filters(q, full.shape[2:], groups)
    grad_x = None
    if not geometry.transposed:
        rows_side, filtered = dy, x
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                dy, x, full, None, geometry.stride, geometry.padding, geometry.dilation, False,
                geometry.output_padding, groups, [True, False, False])[0]
    else:
        rows_side, filtered = x, dy
        if need_x and need_p and groups == 1:  # ∂L/∂x = W ⋆ dy and Q ⋆ dy in one call
            both = geometry.conv(dy, torch.cat([full, filters]), 1)
            grad_x, z = both[:, :rows], both[:, rows:]
        elif need_x:
            grad_x = geometry.conv(dy, full, groups)
    batch = rows_side.shape[0]
    rows_grouped = rows_side.reshape(batch, groups, -1, rows_side[0, 0].numel())
    grad_p = grad_q = None
    if need_p:
        z = geometry.conv(filtered, filters, groups) if z is None else z
        grad_p = torch.einsum("ngcs,ngjs->gcj", rows_grouped, z.reshape(batch, groups, rank, -1)).reshape(p.shape)
    if need_q:
        projected = torch.einsum("gcj,ngcs->ngjs", p.reshape(groups, -1, rank), rows_grouped)
        projected = projected.reshape(batch, groups * rank, *rows_side.shape[2:])
        q_grad = geometry.weight_grad(filtered, projected, filters)
        grad_q = q_grad.reshape(groups, rank, -1).sum(0)
    return grad_x, _bias_grad(dy) if need_bias else None, grad_p, grad_q


def _bias_grad(dy):
    return dy.sum(dim=[0, *range(2, dy.dim())])


class _ProductLayer(torch.autograd.Function):
    """y = layer(x; P Q, b) computed through the factors: a convolution onto Q's p filters and a 1×1 mix by P (for
    a transposed layer: the mix first, then the transposed convolution with Q's filters). Q's first `fixed` rows
    are a frozen basis: they get no weight-gradient pass."""

    @staticmethod
    def forward(ctx, x, bias, p, q, fixed, geometry, compute):
        ctx.dtypes = (x.dtype, None if bias is None else bias.dtype, p.dtype, q.dtype)
        if compute is not None:
            x, p, q = x.to(compute), p.to(compute), q.to(compute)
            bias = None if bias is None else bias.to(compute)
        ctx.geometry, ctx.fixed = geometry, fixed
        if geometry is None:
            inner = x @ q.T  # z = Q x
            y = F.linear(inner, p, bias)
        else:
            groups, filters = geometry.groups, _filters(q, geometry.kernel, geometry.groups)
            per_group = p.reshape(groups, -1, p.shape[1])
            if not geometry.transposed:
                inner = geometry.conv(x, filters, groups)  # z = Q ⋆ x
                y = _mix(per_group, inner, groups, bias)
            else:
                inner = _mix(per_group.transpose(1, 2), x, groups)  # u = Pᵀ x
                y = geometry.layer(inner, filters, bias)
        ctx.save_for_backward(x, p, q, inner)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, p, q, inner = ctx.saved_tensors
        dy = dy.to(x.dtype)
        needs = ctx.needs_input_grad[:4]
        with torch.autocast(dy.device.type, enabled=False):
            backward = _product_linear_backward if ctx.geometry is None else _product_conv_backward
            grads = backward(needs, ctx.geometry, ctx.fixed, dy, x, p, q, inner)
        grad_x, grad_bias, grad_p, grad_q = (g if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes))
        return grad_x, grad_bias, grad_p, grad_q, None, None, None


def _mix(matrices: torch.Tensor, t: torch.Tensor, groups: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`matrices[g]` (out × in) applied at every position to the `in` channels of group g of `t`, plus `bias`
    (one pass over the output: on a CPU these passes are bound by memory, not arithmetic)."""
    batch, rows = t.shape[0], matrices.shape[1]
    stacked = t.reshape(batch * groups, matrices.shape[2], -1)
    matrices = matrices.repeat(batch, 1, 1)
    if bias is None:
        mixed = torch.bmm(matrices, stacked)
    else:
        mixed = torch.baddbmm(bias.reshape(groups, rows, 1).repeat(batch, 1, 1), matrices, stacked)
    return mixed.reshape(batch, -1, *t.shape[2:])


def _product_linear_backward(needs, geometry, fixed, dy, x, p, q, inner):
    need_x, need_bias, need_p, need_q = needs
    x2, dy2, inner2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]), inner.reshape(-1, q.shape[0])
    d_inner = dy2 @ p  # ∂L/∂z
    grad_q = None
    if need_q:
        grad_q = torch.zeros_like(q)
        grad_q[fixed:] = d_inner[:, fixed:].T @ x2
    return ((d_inner @ q).reshape(x.shape) if need_x else None, dy2.sum(0) if need_bias else None,
            dy2.T @ inner2 if need_p else None, grad_q)


def _product_conv_backward(needs, geometry: _Conv, fixed, dy, x, p, q, inner):
    """In the frame of `_conv_backward` ("rows": dy, or x for a transposed layer; "filtered": x, or dy): with
    d = ∂L/∂(Q ⋆ filtered) — Pᵀ dy for a convolution, Q ⋆ dy for a transposed one — ∂L/∂P = Σ rows · (Q ⋆
    filtered)ᵀ, the input gradient is the adjoint of Q ⋆ x at d (or P d), and Q's trained rows get the weight
    gradient of Q ⋆ filtered at d (at u = Pᵀ x for a transposed layer)."""
    need_x, need_bias, need_p, need_q = needs
    groups, rank, batch = geometry.groups, p.shape[1], dy.shape[0]
    per_group = p.reshape(groups, -1, rank)
    filters = _filters(q, geometry.kernel, groups)
    if not geometry.transposed:
        rows_side, filtered, projected = dy, x, inner
        grad_x = torch.ops.aten.convolution_backward(  # the composed weight: no pass over Pᵀ dy
            dy, x, (p @ q).reshape(-1, *filters.shape[1:]), None, geometry.stride, geometry.padding,
            geometry.dilation, False, geometry.output_padding, groups, [True, False, False])[0] if need_x else None
        grad_out = None
    else:
        rows_side, filtered = x, dy
        projected = geometry.conv(dy, filters, groups)  # Q ⋆ dy
        grad_x = _mix(per_group, projected, groups) if need_x else None
        grad_out = inner
    grad_p = grad_q = None
    if need_p:
        grad_p = torch.einsum("ngcs,ngjs->gcj", rows_side.reshape(batch, groups, -1, rows_side[0, 0].numel()),
                              projected.reshape(batch, groups, rank, -1)).reshape(p.shape)
    if need_q:
        trained = rank - fixed
        if grad_out is None:  # ∂L/∂(Q ⋆ x) of the trained rows: Pᵀ dy
            grad_out = _mix(per_group[:, :, fixed:].transpose(1, 2), dy, groups)
        else:
            grad_out = grad_out.reshape(batch, groups, rank, *grad_out.shape[2:])[:, :, fixed:]
            grad_out = grad_out.reshape(batch, groups * trained, *grad_out.shape[3:])
        trained_filters = filters.reshape(groups, rank, *filters.shape[1:])[:, fixed:]
        q_grad = geometry.weight_grad(filtered, grad_out,
                                      trained_filters.reshape(groups * trained, *filters.shape[1:]))
        grad_q = torch.zeros_like(q)
        grad_q[fixed:] = q_grad.reshape(groups, trained, -1).sum(0)
    return grad_x, _bias_grad(dy) if need_bias else None, grad_p, grad_q
