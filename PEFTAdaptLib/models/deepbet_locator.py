"""deepbet's first stage: a small shipped network that finds the brain's bounding box on a 128³ thumbnail.

The main network was trained on that box (plus 10 % margin) resized to 256³; framing by a head box instead (skull,
neck) inflates the mask on a real T1 (docs/models.md), so the default model uses this locator exactly as deepbet does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

THUMBNAIL = (128, 128, 128)


def _deepbet_normalize(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    x = ((x - low) / (high - low)).clamp(0, 1)
    return 0.226 * (x - x.mean()) / x.std() + 0.449


class DeepbetLocator:
    """Callable: oriented (x, y, z) array → (low, high) voxel bounds of the brain (before margin)."""

    def __init__(self, path: str):
        self.network = torch.jit.load(path, map_location="cpu").eval()

    @torch.no_grad()
    def __call__(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = torch.nan_to_num(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)))
        small = F.interpolate(x[None, None], THUMBNAIL, mode="nearest-exact")[0, 0]
        low, high = small.quantile(0.005), small.quantile(0.995)
        probability = self.network(_deepbet_normalize(small, low, high)[None, None])[0, 1].numpy()
        components, count = ndimage.label(probability > 0.5)
        shape = np.array(array.shape)
        if count == 0:
            return np.zeros(3, int), shape
        largest = components == (1 + int(np.argmax(np.bincount(components.ravel())[1:])))
        scale = shape / np.array(THUMBNAIL)
        bounds_low, bounds_high = [], []
        for axis in range(3):
            profile = largest.mean(axis=tuple(a for a in range(3) if a != axis))
            indices = np.nonzero(profile > 0.02)[0]
            if indices.size == 0:
                indices = np.nonzero(profile > 0)[0]
            bounds_low.append(indices.min() * scale[axis])
            bounds_high.append((indices.max() + 1) * scale[axis])
        return np.floor(bounds_low).astype(int), np.ceil(bounds_high).astype(int)
