"""The network's output channels must be the card's labels, one for one.

A card listing three classes for a two-channel network predicts without error, yet its last label can never occur
and the others may be misnamed; the mismatch is refused once the network is loaded, before any job uses it. MeshNet
and nnU-Net are consistent by construction (the labels are counted from the weights, or the network is built for
them); a bundle's eager network declares `out_channels`; a TorchScript network shows its channels on one small
forward pass.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from .card import FIXED_INPUT_SIZE, ModelCard

#: edge of the zero volume a TorchScript network is probed with (raised to two multiples of `divisible_by`)
PROBE_EDGE = 16


def refuse_label_mismatch(channels: int | None, card: ModelCard, path: str | Path) -> None:
    """One line when the network's `channels` (None: unknown) differ from the card's label count."""
    if channels is not None and channels != card.num_classes:
        names = ", ".join(label.name for label in card.labels)
        raise ModelError(f"{path}: the network gives {channels} output channel(s) but the labels list "
                         f"{card.num_classes} ({names}); each label needs its own output channel")


def probed_channels(network, card: ModelCard) -> int | None:
    """Output channels of one forward pass on a small zero volume; None where the network cannot tell that way."""
    import torch

    if card.extra.get(FIXED_INPUT_SIZE):
        edges = card.inference_roi
    else:
        edges = tuple(min(roi, max(PROBE_EDGE, 2 * card.divisible_by)) for roi in card.inference_roi)
    try:
        with torch.no_grad():
            output = network(torch.zeros(1, card.input_channels, *edges))
    except Exception:  # noqa: BLE001 - a network that refuses the probe shows its channels on real inputs only
        return None
    return int(output.shape[1]) if isinstance(output, torch.Tensor) and output.dim() == 2 + len(edges) else None
