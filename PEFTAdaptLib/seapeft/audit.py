"""The fixed audit buffer: patches of the audit volume(s) drawn once, on which every audit is measured.

Why patches and not the whole volume: an audit toggles several units, each toggle is one forward pass, and the
final sweep compares several gate configurations; on a whole volume (deepbet: 256³) each pass costs seconds on a
CPU, on two patches a fraction of a training step. Why fixed: every measurement then compares the network with
itself on identical inputs, so a ΔDice is the unit's effect and not patch-sampling noise (the reference caches 6
crops for the same reason). Half the patches are centred on foreground, half on background (false positives count).
The measure is the soft Dice of the foreground classes pooled over all buffer voxels: smooth in the logits (small
effects are visible) and well defined on a background-only patch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data.cases import Case


def soft_dice(logits: torch.Tensor, label: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (intersection, sum of sizes) of softmax probabilities against class indices, for pooling."""
    probs = torch.softmax(logits.float(), dim=1)
    onehot = torch.zeros_like(probs).scatter_(1, label.long(), 1.0)
    dims = [0] + list(range(2, probs.dim()))
    return (probs * onehot).sum(dims)[1:], (probs + onehot).sum(dims)[1:]


class AuditBuffer:
    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], patches: int, seed: int,
                 device: torch.device | str = "cpu"):
        from ..training import PatchSampler

        self.device = torch.device(device)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        fg, bg = (patches + 1) // 2, patches // 2
        for index, case in enumerate(cases):
            for count, pos, offset in ((fg, 1.0, 0), (bg, 0.0, 1)):
                if count and (pos == 0.0 or case.label.any()):
                    sampler = PatchSampler([case], patch_size, count, pos, seed + 7919 * index + offset)
                    image, label = sampler()
                    self.batches.append((image.to(self.device), label.to(self.device)))

    def _pooled(self, network: nn.Module) -> torch.Tensor:
        inter = total = 0.0
        for image, label in self.batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = network(image)
            i, t = soft_dice(logits, label)
            inter, total = inter + i, total + t
        return ((2 * inter + 1e-5) / (total + 1e-5)).mean()

    @torch.no_grad()
    def dice(self, network: nn.Module) -> float:
        """Soft foreground Dice of `network` (eval mode) on the buffer."""
        was = network.training
        network.eval()
        try:
            return float(self._pooled(network))
        finally:
            network.train(was)

    def gradients(self, network: nn.Module, params: dict[str, list[torch.Tensor]]) -> tuple[float, dict[str, float]]:
        """(soft Dice, ‖∂ Dice / ∂θ_u‖₁ for every unit u in `params`) in one forward + backward pass."""
        was = network.training
        network.eval()
        try:
            with torch.enable_grad():
                value = self._pooled(network)
                flat = [p for ps in params.values() for p in ps]
                grads = torch.autograd.grad(value, flat, allow_unused=True) if flat else []
        finally:
            network.train(was)
        norms, index = {}, 0
        for name, ps in params.items():
            norms[name] = sum(float(g.abs().sum()) for g in grads[index:index + len(ps)] if g is not None)
            index += len(ps)
        return float(value.detach()), norms
