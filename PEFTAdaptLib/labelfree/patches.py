"""Random patches from unlabelled target volumes: there is no label to centre crops on, so crops are uniform."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.cases import Case


class TargetPatches:
    """`count` uniform random crops of `patch_size` per call from one randomly chosen case (seeded). Volumes
    smaller than the patch are padded with their minimum (the normalised background)."""

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], count: int, seed: int):
        self.arrays = [self._padded(case.array, patch_size) for case in cases]
        self.patch_size, self.count = tuple(patch_size), count
        self.rng = np.random.default_rng(seed)

    @staticmethod
    def _padded(array: np.ndarray, patch_size: Sequence[int]) -> np.ndarray:
        pads = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(patch_size, array.shape[1:])]
        return np.pad(array, pads, constant_values=float(array.min())) if any(p[1] for p in pads) else array

    def __call__(self) -> torch.Tensor:
        array = self.arrays[int(self.rng.integers(len(self.arrays)))]
        crops = []
        for _ in range(self.count):
            starts = [int(self.rng.integers(s - p + 1)) for s, p in zip(array.shape[1:], self.patch_size)]
            index = (slice(None), *(slice(a, a + p) for a, p in zip(starts, self.patch_size)))
            crops.append(torch.from_numpy(np.ascontiguousarray(array[index])))
        return torch.stack(crops).float()
