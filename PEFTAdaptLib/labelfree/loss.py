"""Dice + cross-entropy with a voxel mask: the ESH learns from confident voxels only when no label exists."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_dice_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                   eps: float = 1e-5) -> torch.Tensor:
    """Mean CE over masked voxels plus a soft Dice loss pooled over the batch per class (pooled so a patch without
    foreground does not turn the foreground term into 0/0). `target` holds class indices (N, *spatial)."""
    logits = logits.float()
    mask = torch.ones_like(target, dtype=logits.dtype) if mask is None else mask.to(logits.dtype)
    ce = (F.cross_entropy(logits, target, reduction="none") * mask).sum() / mask.sum().clamp_min(1.0)
    probabilities = torch.softmax(logits, dim=1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(logits.dtype)
    weight = mask.unsqueeze(1)
    dims = [0] + list(range(2, logits.dim()))
    intersection = (probabilities * onehot * weight).sum(dims)
    denominator = ((probabilities + onehot) * weight).sum(dims)
    dice = (2.0 * intersection + eps) / (denominator + eps)
    return ce + (1.0 - dice.mean())
