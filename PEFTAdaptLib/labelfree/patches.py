"""Random patches from unlabelled target volumes: there is no label to centre crops on, so crops are uniform."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..data.cases import Case
from ..data.transforms import pad_to_size


class TargetPatches:
    """`count` uniform random crops of `patch_size` per call from one randomly chosen case (seeded). Volumes
    smaller than the patch are padded with their minimum (the normalised background)."""

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], count: int, seed: int):
        self.arrays = [pad_to_size(case.array, patch_size, float(case.array.min())) for case in cases]
        self.patch_size, self.count = tuple(patch_size), count
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> torch.Tensor:
        array = self.arrays[int(self.rng.integers(len(self.arrays)))]
        crops = []
        for _ in range(self.count):
            starts = [int(self.rng.integers(s - p + 1)) for s, p in zip(array.shape[1:], self.patch_size)]
            index = (slice(None), *(slice(a, a + p) for a, p in zip(starts, self.patch_size)))
            crops.append(torch.from_numpy(np.ascontiguousarray(array[index])))
        return torch.stack(crops).float()
