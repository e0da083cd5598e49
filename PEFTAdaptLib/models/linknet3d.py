"""Eager re-implementation of deepbet's TorchScript LinkNet3d.

Why eager and not weight-space on the scripted module: an eager network exposes pre-softmax logits (needed for a
stable CE loss), intermediate encoder features (early segmentation heads, AdaptFormer bottlenecks) and ordinary
`nn.Module` surgery, and it runs faster than the TorchScript interpreter. `load_from_torchscript` copies every
tensor by name and `Testing/test_deepbet_equivalence.py` proves the outputs equal the shipped model (≤1e-5).
"""
from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, affine=False, track_running_stats=False)


class Block(nn.Module):
    """Residual double 3×3×3 conv; the first block of a stage downsamples by 2 with a 1×1×1 projection."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv3d(c_in, c_out, 3, stride, 1, bias=False), _norm(c_out), nn.ReLU(),
            nn.Conv3d(c_out, c_out, 3, 1, 1, bias=False), _norm(c_out),
        )
        self.downsample = (
            nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride, 0, bias=False), _norm(c_out)) if stride != 1 else None
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        return self.act(self.double_conv(x) + skip)


class Down(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.block1 = Block(c_in, c_out, stride)
        self.block2 = Block(c_out, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))


class Up(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 2):
        super().__init__()
        mid = c_in // 4
        self.conv1 = nn.Sequential(nn.Conv3d(c_in, mid, 1, bias=False), _norm(mid), nn.ReLU())
        self.tp_conv = nn.Sequential(
            nn.ConvTranspose3d(mid, mid, 3, stride, 1, output_padding=stride - 1, bias=False), _norm(mid), nn.ReLU()
        )
        self.conv2 = nn.Sequential(nn.Conv3d(mid, c_out, 1, bias=False), _norm(c_out), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.tp_conv(self.conv1(x)))


class LinkNet3d(nn.Module):
    """deepbet's brain-extraction network (Fisch et al. 2024, MIT). Input (N,1,D,H,W), D,H,W divisible by 32."""

    #: encoder stages, shallow to deep: the sites an early segmentation head can attach to.
    encoder_stages = ("init", "down0", "down1", "down2", "down3")

    def __init__(self, in_channels: int = 1, out_channels: int = 2):
        super().__init__()
        self.init = nn.Sequential(
            nn.Conv3d(in_channels, 16, 7, 2, 3, bias=False), _norm(16), nn.ReLU(), nn.MaxPool3d(3, 2, 1)
        )
        self.down0 = Down(16, 16, 1)
        self.down1 = Down(16, 32, 2)
        self.down2 = Down(32, 64, 2)
        self.down3 = Down(64, 128, 2)
        self.up0 = Up(128, 64)
        self.up1 = Up(64, 32)
        self.up2 = Up(32, 16)
        self.up3 = Up(16, 16, stride=1)
        self.tp_conv1 = nn.Sequential(nn.ConvTranspose3d(16, 8, 3, 2, 1, output_padding=1), _norm(8), nn.ReLU())
        self.conv = nn.Sequential(nn.Conv3d(8, 8, 3, 1, 1), _norm(8), nn.ReLU())
        self.tp_conv2 = nn.ConvTranspose3d(8, out_channels, 2, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits (the shipped TorchScript returns their softmax)."""
        e0 = self.init(x)
        e1 = self.down0(e0)
        e2 = self.down1(e1)
        e3 = self.down2(e2)
        d = self.up0(self.down3(e3)) + e3
        d = self.up1(d) + e2
        d = self.up2(d) + e1
        d = self.up3(d) + e0
        return self.tp_conv2(self.conv(self.tp_conv1(d)))


def load_from_torchscript(path: str) -> LinkNet3d:
    """Build the eager network and copy every tensor of the scripted checkpoint into it, by name."""
    scripted = torch.jit.load(path, map_location="cpu")
    state = {k: v.detach().clone() for k, v in scripted.state_dict().items()}
    net = LinkNet3d()
    net.load_state_dict(state, strict=True)
    return net.eval()
