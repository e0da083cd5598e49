"""Weight-space adapters on a TorchScript model, whose graph cannot be edited.

Each forward writes W' = f(W, θ) into the scripted module's own parameters and runs the scripted graph; on the way
back, the gradient the graph leaves on each parameter is dL/dW', and the chain rule carries it to θ through f.
A custom autograd function does both, so the wrapper trains like any module.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .base import AdapterConfig, AdapterUnit

SCRIPTED_WEIGHT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d")


class _LayerView(nn.Module):
    """What a unit constructor reads of a layer (weight, bias, groups), detached from the scripted module."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, groups: int):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.groups = groups


class _ScriptedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner: "ScriptedAdapterModel", x: torch.Tensor, *tensors: torch.Tensor):
        targets = owner._target_tensors()
        with torch.no_grad():
            for target, value in zip(targets, tensors):
                target.copy_(value)
        with torch.enable_grad():
            inner_x = x.detach().requires_grad_(x.requires_grad)
            for target in targets:
                target.requires_grad_(True)
            output = owner.scripted(inner_x)
        ctx.save_for_backward(inner_x)
        ctx.graph = (output, inner_x, targets)
        return output.detach()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        output, inner_x, targets = ctx.graph
        wanted = ([inner_x] if inner_x.requires_grad else []) + list(targets)
        grads = torch.autograd.grad(output, wanted, grad_output, allow_unused=True)
        grad_x = grads[0] if inner_x.requires_grad else None
        return (None, grad_x, *grads[len(wanted) - len(targets):])


class ScriptedAdapterModel(nn.Module):
    """A TorchScript model plus weight-space adapter units on its Linear/Conv layers (matched by name patterns)."""

    def __init__(self, scripted: torch.jit.ScriptModule, config: AdapterConfig, unit_class: type[AdapterUnit],
                 layers: Sequence[str] | None = None):
        super().__init__()
        if not unit_class.mergeable:
            raise ValueError(f"{unit_class.kind} acts on layer outputs: it needs an eager model")
        self.scripted = scripted
        for parameter in scripted.parameters():
            parameter.requires_grad_(False)
        modules = dict(scripted.named_modules())
        names = [n for n, m in modules.items() if getattr(m, "original_name", "") in SCRIPTED_WEIGHT_TYPES
                 and (n in layers if layers is not None else config.matches(n))]
        if not names:
            raise ValueError("no Linear/Conv layer of the scripted model matches the adapter's target patterns")
        self.layer_names = names
        self.units = nn.ModuleDict()
        originals = {}
        for name in names:
            module = modules[name]
            bias = getattr(module, "bias", None)
            view = _LayerView(module.weight, bias if isinstance(bias, torch.Tensor) else None,
                              int(getattr(module, "groups", 1)))
            self.units[name.replace(".", "__")] = unit_class(view, config)
            originals[name] = (view.weight, view.bias)
        self._originals = originals

    def _target_tensors(self) -> list[torch.Tensor]:
        modules = dict(self.scripted.named_modules())
        tensors = []
        for name in self.layer_names:
            tensors.append(modules[name].weight)
            bias = getattr(modules[name], "bias", None)
            if isinstance(bias, torch.Tensor):
                tensors.append(bias)
        return tensors

    def effective_tensors(self) -> list[torch.Tensor]:
        tensors = []
        for name in self.layer_names:
            weight, bias = self._originals[name]
            params = self.units[name.replace(".", "__")].apply({"weight": weight, "bias": bias})
            tensors.append(params["weight"])
            if bias is not None:
                tensors.append(params["bias"])
        return tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ScriptedForward.apply(self, x, *self.effective_tensors())
