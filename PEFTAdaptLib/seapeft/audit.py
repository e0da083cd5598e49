"""The fixed audit buffer, on which every audit, first-order estimate and final-sweep candidate is measured.

Why the whole audit volume where it fits: the adaptation is judged by its whole-volume Dice, and a contrast shift's
typical failure is false positives far from the structure, which a few patches around the structure never see
(docs/seapeft.md gives the measured case): the allocator then keeps units that add false positives elsewhere, and its
final sweep chooses states the trainer's whole-volume audit rejects. When the volume(s) exceed the buffer's size
(deepbet's 256³ box against 128³ patches is 8 patches), a fixed set of patches is drawn once, half centred on
foreground. Why fixed: every measurement compares the network with itself on identical inputs, so a ΔDice is the
unit's effect and not sampling noise. The measure is the soft Dice of the foreground classes pooled over all buffer
voxels: smooth in the logits (small effects are visible) and well defined on a background-only patch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ..data.cases import Case
from ..data.sparse import UNANNOTATED, foreground


def soft_dice(logits: torch.Tensor, label: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (intersection, sum of sizes) of softmax probabilities against class indices, for pooling; voxels
    a sparse label leaves unannotated count in neither."""
    weight = (label != UNANNOTATED).float()
    probs = torch.softmax(logits.float(), dim=1) * weight
    onehot = torch.zeros_like(probs).scatter_(1, torch.where(label == UNANNOTATED, 0, label).long(), 1.0) * weight
    dims = [0] + list(range(2, probs.dim()))
    return (probs * onehot).sum(dims)[1:], (probs + onehot).sum(dims)[1:]


class AuditBuffer:
    """The audit volume(s) whole when their voxels (padded to the network's multiple) fit in `patches` patches and
    the network takes any input size (`whole`; not a ViT with fixed position embeddings), else `patches` patches
    drawn once, half centred on foreground. `cost` is the buffer's size in patches."""

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], patches: int, seed: int,
                 device: torch.device | str = "cpu", divisible_by: int = 1, whole: bool = True):
        from ..inference import pad_to_multiple
        from ..training import PatchSampler

        self.device = torch.device(device)
        self.batches: list[tuple[torch.Tensor, torch.Tensor, tuple[slice, ...]]] = []
        padded = [pad_to_multiple(torch.from_numpy(case.array)[None], divisible_by, float(case.array.min()))
                  for case in cases]
        patch_voxels = math.prod(patch_size)
        whole_voxels = sum(image[0, 0].numel() for image, _ in padded)
        if whole_voxels <= patches * patch_voxels and whole:
            for case, (image, crop) in zip(cases, padded):  # padding is left out of the Dice
                label = torch.from_numpy(case.label.astype(np.int64))[None]
                self.batches.append((image.to(self.device), label.to(self.device), (slice(None),) * 2 + crop))
            self.cost = whole_voxels / patch_voxels
            return
        fg, bg = (patches + 1) // 2, patches // 2
        for index, case in enumerate(cases):
            for count, pos, offset in ((fg, 1.0, 0), (bg, 0.0, 1)):
                if count and (pos == 0.0 or foreground(case.label).any()):
                    sampler = PatchSampler([case], patch_size, count, pos, seed + 7919 * index + offset)
                    image, label = sampler()
                    self.batches.append((image.to(self.device), label.to(self.device), (slice(None),) * image.ndim))
        self.cost = float(sum(image.shape[0] for image, _, _ in self.batches))

    def _pooled(self, network: nn.Module) -> torch.Tensor:
        inter = total = 0.0
        for image, label, crop in self.batches:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                logits = network(image)
            i, t = soft_dice(logits[crop], label)
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
