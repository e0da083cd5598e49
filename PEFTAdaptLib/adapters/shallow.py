"""Shallow fine-tuning: dense deltas on the weight layers nearest the input and the output, norm-affine everywhere.

A contrast or scanner shift changes the intensities the first layers see and the calibration of the last ones;
fine-tuning just those layers in full (and every normalisation's γ, β) is the classic recipe for it (Shirokikh et
al., MICCAI 2020). It needs no layer names: a layer's depth is counted on the network's own computation graph, on a
real forward pass, as the most weight layers on any path from the input to it (`from_input`, itself included) or
from it to the output (`from_output`) — the longest path, as a layer's depth in a DAG is defined: along the shortest
one, a UNet's skip connections and residual projections would make half the network "shallow". The shallow layers
are those within `depth` of either end — on MONAI's UNet (depth 2) the whole first residual block and the last
up-block, on deepbet's LinkNet3d the 7³ stem, the first block's first conv, the last conv and the output
transposed conv, on a MeshNet the first two and the last two convolutions.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .base import WEIGHT_TYPES, AdaptedLayer, UnitRecord, add_units, base_layer_names
from .dense import DenseConfig, DenseUnit
from .norm import NormAffineConfig, NormAffineUnit

UNREACHED = 1 << 30


@dataclass(frozen=True)
class LayerDepth:
    order: int  # position of the layer's first call in the forward pass
    from_input: int  # most weight layers on a path from the input to this layer (itself included)
    from_output: int  # most weight layers on a path from this layer to the network's output (itself included)

    @property
    def depth(self) -> int:
        return min(self.from_input, self.from_output)


def _graph(roots: Sequence) -> tuple[dict, list]:
    """Every autograd node reachable from `roots` → its children (the nodes of its inputs), and the nodes in
    topological order (every node before its children)."""
    children, stack = {}, list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in children:
            continue
        children[node] = [child for child, _ in node.next_functions if child is not None]
        stack.extend(children[node])
    waiting = dict.fromkeys(children, 0)
    for kids in children.values():
        for kid in kids:
            waiting[kid] += 1
    ready = [node for node, count in waiting.items() if count == 0]
    order = []
    while ready:
        node = ready.pop()
        order.append(node)
        for kid in children[node]:
            waiting[kid] -= 1
            if waiting[kid] == 0:
                ready.append(kid)
    return children, order


def layer_depths(network: nn.Module, example_input: torch.Tensor) -> dict[str, LayerDepth]:
    """Depth of every weight layer (Conv/ConvTranspose/Linear, adapted or not) on one forward pass of
    `example_input`, in forward order; layers the pass does not run are left out."""
    names = base_layer_names(network, WEIGHT_TYPES)
    layers = {n: (m.base if isinstance(m, AdaptedLayer) else m) for n in names for m in [network.get_submodule(n)]}
    order: list[str] = []
    nodes: dict = {}

    def record(name):
        def hook(module, args, output):
            if name not in order:
                order.append(name)
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                nodes[output.grad_fn] = name
        return hook

    handles = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
    was_training = network.training
    network.eval()
    try:
        with torch.enable_grad():
            x = example_input.detach().clone().requires_grad_(True)
            output = network(x)
    finally:
        network.train(was_training)
        for handle in handles:
            handle.remove()
    outputs = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else [output]
    roots = [o.grad_fn for o in outputs if isinstance(o, torch.Tensor) and o.grad_fn is not None]
    children, order_nodes = _graph(roots)
    weight = {node: int(node in nodes) for node in children}
    to_output = {}  # longest weighted path from an output down to the node (the node included)
    for node in order_nodes:
        to_output.setdefault(node, weight[node])
        for kid in children[node]:
            to_output[kid] = max(to_output.get(kid, 0), to_output[node] + weight[kid])
    to_input = {}  # longest weighted path from the input up to the node; absent where the input is not reached
    for node in reversed(order_nodes):
        if getattr(node, "variable", None) is x:
            to_input[node] = 0
        reached = [to_input[kid] for kid in children[node] if kid in to_input]
        if reached:
            to_input[node] = weight[node] + max(reached)
    depths: dict[str, LayerDepth] = {}
    for node, name in nodes.items():
        if node not in children:  # an output that does not reach the network's output
            continue
        found = LayerDepth(order.index(name), to_input.get(node, UNREACHED), to_output[node])
        if name not in depths or found.depth < depths[name].depth:
            depths[name] = found
    return dict(sorted(depths.items(), key=lambda item: item[1].order))


def shallow_layers(network: nn.Module, example_input: torch.Tensor, depth: int = 2) -> list[str]:
    """The weight layers within `depth` weight layers of the input or the output, in forward order."""
    return [name for name, d in layer_depths(network, example_input).items() if d.depth <= depth]


@dataclass
class ShallowConfig:
    #: weight layers counted from each end (2: a residual block's two convolutions, or a conv and its head)
    depth: int = 2
    #: also train every normalisation layer's γ, β
    norm_affine: bool = True


def apply_shallow(network: nn.Module, example_input: torch.Tensor, config: ShallowConfig = ShallowConfig(),
                  name: str = "shallow") -> list[UnitRecord]:
    """Put dense deltas on the shallow layers (and norm-affine units on every norm); returns the units added.
    Dense deltas train at `DenseUnit.lr_scale` of the run's learning rate, like every dense unit."""
    layers = shallow_layers(network, example_input, config.depth)
    records = add_units(network, DenseConfig(), DenseUnit, f"{name}_dense", layers=layers)
    if config.norm_affine:
        records += add_units(network, NormAffineConfig(), NormAffineUnit, f"{name}_norm_affine")
    return records
