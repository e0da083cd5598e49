"""Training-patch augmentation: what lets a few annotated volumes teach more than their own voxels.

Spatial (a small random rotation and scaling: within what a segmentation network tolerates between scanners) and
intensity (gamma, a smooth bias field, noise, contrast scale and shift: what differs between sites), through MONAI,
each with its probability. On by default; a model card may change or switch off any part under
`extra.augmentation` (e.g. `{"rotate_degrees": 0}` for a network that depends on exact orientation). Seeded, and its
random state is part of the trainer's checkpoint, so a resumed run draws the same augmentations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

CARD_KEY = "augmentation"


@dataclass
class AugmentationConfig:
    enabled: bool = True
    probability: float = 0.3  # of each transform, per patch
    rotate_degrees: float = 10.0
    scale: float = 0.1
    gamma: tuple[float, float] = (0.7, 1.5)
    bias_field: float = 0.2  # polynomial coefficient range of the multiplicative field
    noise_std: float = 0.05  # on normalised intensities
    contrast: float = 0.1  # intensity scale factor range ±
    shift: float = 0.1  # intensity offset range ±

    @classmethod
    def from_card(cls, card_extra: dict | None) -> "AugmentationConfig":
        overrides = (card_extra or {}).get(CARD_KEY, {})
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items() if k in known})


class Augmentation:
    """Applies the configured MONAI transforms to each (image, label) patch of a batch. Every patch reseeds the
    transforms (and their inner randomisers) from one generator, whose state is all a checkpoint needs. The affine
    grid is made on `device`, where the patches are cut; noise and bias fields are drawn by MONAI's NumPy generators
    (on the host when a transform fires), so a GPU run draws the augmentations a CPU run draws."""

    def __init__(self, config: AugmentationConfig, seed: int, device: torch.device | str = "cpu"):
        from monai.transforms import (
            RandAdjustContrastd, RandAffined, RandBiasFieldd, RandGaussianNoised, RandScaleIntensityd,
            RandShiftIntensityd,
        )

        p = config.probability
        self.transforms = []
        if config.enabled:
            if config.rotate_degrees or config.scale:
                angle = math.radians(config.rotate_degrees)
                self.transforms.append(RandAffined(("image", "label"), prob=p, rotate_range=(angle,) * 3,
                                                   scale_range=(config.scale,) * 3, mode=("bilinear", "nearest"),
                                                   padding_mode="border", device=torch.device(device)))
            if config.gamma != (1.0, 1.0):
                self.transforms.append(RandAdjustContrastd("image", prob=p, gamma=config.gamma))
            if config.bias_field:
                self.transforms.append(RandBiasFieldd("image", prob=p, coeff_range=(0.0, config.bias_field)))
            if config.noise_std:
                self.transforms.append(RandGaussianNoised("image", prob=p, std=config.noise_std))
            if config.contrast:
                self.transforms.append(RandScaleIntensityd("image", prob=p, factors=config.contrast))
            if config.shift:
                self.transforms.append(RandShiftIntensityd("image", prob=p, offsets=config.shift))
        self.rng = np.random.default_rng(seed)

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.transforms:
            return image, label
        images, labels = [], []
        for x, y in zip(image, label):
            sample = {"image": x, "label": y}
            for transform in self.transforms:
                transform.set_random_state(seed=int(self.rng.integers(2**31)))
                sample = transform(sample)
            images.append(torch.as_tensor(sample["image"]).float())
            labels.append(torch.as_tensor(sample["label"]).round().long())
        return torch.stack(images), torch.stack(labels)

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state
