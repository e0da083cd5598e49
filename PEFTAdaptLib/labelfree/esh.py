"""Early segmentation head (ESH): a small head on an early encoder stage, read through a forward hook.

Why an early stage: the first layers of a segmentation network carry most of the domain-specific (scanner, site,
contrast) information (Shirokikh et al. 2020), so adapting them against a head that sees only them is where a
label-free signal helps most. The ESH is a separate module, never a submodule of the network: adapter utilities
(`iter_units`, `save_adapters`, the fingerprint) do not see it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PEFTAdaptError
from .loss import masked_dice_ce

#: default stage: the second encoder stage (the paper's ESH sees the first one or two levels)
DEFAULT_STAGE_INDEX = 1


def _monai_unet_stages(network: nn.Module) -> list[str]:
    """monai.networks.nets.UNet nests its levels as model = Seq(down, SkipConnection(Seq(down, Skip(...), up)), up);
    the encoder stages are each level's `down` block, then the bottom block."""
    names, prefix, node = [], "model", network.model
    while isinstance(node, nn.Sequential) and len(node) == 3 and hasattr(node[1], "submodule"):
        names.append(f"{prefix}.0")
        prefix, node = f"{prefix}.1.submodule", node[1].submodule
    names.append(prefix)
    return names


def find_encoder_stages(network: nn.Module) -> list[str]:
    """Encoder stage module names, shallow to deep, for the networks that declare them (`encoder_stages`: deepbet's
    LinkNet3d, nnU-Net's U-Nets), MONAI UNet and MONAI BasicUNet; empty when the architecture is unknown (then a
    stage must be named)."""
    declared = getattr(network, "encoder_stages", None)
    if declared:
        return list(declared)
    if isinstance(getattr(network, "model", None), nn.Sequential) and hasattr(network.model[1], "submodule"):
        return _monai_unet_stages(network)
    basic = ["conv_0", "down_1", "down_2", "down_3", "down_4"]
    if all(hasattr(network, name) for name in basic):
        return basic
    return []


def choose_stage(network: nn.Module, stage: str | None = None, index: int = DEFAULT_STAGE_INDEX) -> str:
    """The stage the ESH reads: `stage` if named (any module name), else encoder stage `index`."""
    if stage is not None:
        try:
            network.get_submodule(stage)
        except AttributeError:
            raise PEFTAdaptError(f"early segmentation head: the network has no module '{stage}'") from None
        return stage
    stages = find_encoder_stages(network)
    if not stages:
        raise PEFTAdaptError("early segmentation head: no encoder stage it knows in this network; it reads those of "
                             "deepbet's LinkNet3d, nnU-Net's U-Nets, MONAI's UNet and BasicUNet")
    return stages[min(index, len(stages) - 1)]


def stages_up_to(network: nn.Module, stage: str) -> list[str]:
    """The stages whose features reach the ESH: every encoder stage up to and including `stage` (deeper ones get
    no gradient from the ESH loss)."""
    stages = find_encoder_stages(network)
    return stages[: stages.index(stage) + 1] if stage in stages else [stage]


class FeatureTap:
    """Keeps the latest output of one module (a forward hook), so one network forward feeds both outputs. A network
    run in its own axis order (nnU-Net's, `AxisPermuted.to_our_axes`) gives the features in the input's order."""

    def __init__(self, network: nn.Module, stage: str):
        self.stage = stage
        self.features: torch.Tensor | None = None
        self._in_our_axes = getattr(network, "to_our_axes", lambda features: features)
        self._handle = network.get_submodule(stage).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self.features = self._in_our_axes(output)

    def remove(self) -> None:
        self._handle.remove()


class EarlySegmentationHead(nn.Module):
    """conv 3×3×3 → instance norm → LeakyReLU → conv 1×1×1 to class logits, upsampled to the input size.
    Instance norm (not batch norm) so AdaBN never touches the head."""

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 16):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv3d(in_channels, hidden, 3, padding=1), nn.InstanceNorm3d(hidden, affine=True), nn.LeakyReLU(0.01),
            nn.Conv3d(hidden, num_classes, 1),
        )

    def forward(self, features: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
        return F.interpolate(self.block(features), size=tuple(size), mode="trilinear", align_corners=False)


@torch.no_grad()
def build_head(network: nn.Module, tap: FeatureTap, sample: torch.Tensor, num_classes: int) -> EarlySegmentationHead:
    """A head sized for the tapped stage, found by one forward of a real patch."""
    network(sample)
    if tap.features is None:
        raise PEFTAdaptError(f"early segmentation head: stage '{tap.stage}' did not run in the forward pass")
    head = EarlySegmentationHead(tap.features.shape[1], num_classes).to(sample.device)
    return head.eval().requires_grad_(False)  # `train_head` unfreezes it while it fits


#: which data trained the ESH (recorded in events and adapter metadata)
ESH_SOURCE_LABELLED = "labelled-source"
ESH_SOURCE_CONFIDENT = "confident-target-predictions"


def train_head(
    network: nn.Module,
    head: EarlySegmentationHead,
    tap: FeatureTap,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor | None]],
    steps: int,
    lr: float = 1e-3,
    confidence: float = 0.9,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Train the head on the frozen network's tapped features. Batches with a label train on it (labelled
    source-like volumes); batches without one train on the decoder's own confident voxels (softmax max >
    `confidence`), other voxels masked out. Returns the mean loss and the share of voxels that were supervised."""
    head.requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr)
    network.eval()
    head.train()
    losses, covered = [], []
    for step in range(1, steps + 1):
        image, label = next(batches)
        with torch.no_grad():
            probabilities = torch.softmax(network(image).float(), dim=1)
            features = tap.features
            if label is None:
                top, label = probabilities.max(dim=1)
                mask = (top > confidence).float()
            else:
                label, mask = label[:, 0], torch.ones_like(probabilities[:, 0])
        loss = masked_dice_ce(head(features, image.shape[2:]), label.long(), mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        covered.append(float(mask.mean()))
        if on_step is not None:
            on_step(step, losses[-1])
    head.eval().requires_grad_(False)  # frozen from here on: self-training adapts the network, not the head
    tail = losses[-10:]
    return {"loss": sum(tail) / max(len(tail), 1), "supervised_fraction": sum(covered) / max(len(covered), 1)}
