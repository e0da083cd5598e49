"""segment-anything's image encoder (`ImageEncoderViT`, SAM ViT-B/L/H), with a segmentation head: the network of a
SAM model folder (`sam.py`).

The encoder is a port of `segment_anything/modeling/image_encoder.py` and `common.py` (Copyright (c) Meta
Platforms, Inc. and affiliates; Apache License 2.0), itself adapted from detectron2's ViTDet backbone: same modules,
same parameter names (a SAM checkpoint's `image_encoder.*` tensors load as they are) and the same arithmetic (tested
against the package to float round-off). It is ported rather than imported because the `segment_anything` package
imports torchvision at its top level, which cannot be installed beside a CPU-only torch. Changes: the settings are
read from the checkpoint's tensor shapes (`encoder_settings`), and the position embedding can be resized to another
input size (as SAMed does to run SAM at 512 pixels).

Attention keeps the fused `qkv` projection, which is where MED-PEFT/SAMed put LoRA on the query and value rows
(`adapters/qkv_lora.py`); the MLP's `lin1`/`lin2` are SEA-PEFT's MLP sites.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: SAM's pixel statistics (RGB, 0–255), which its encoder was trained on
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
PREFIX = "image_encoder."


class MLPBlock(nn.Module):
    def __init__(self, embedding_dim: int, mlp_dim: int):
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


class LayerNorm2d(nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # B C H W -> B H W C


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Non-overlapping windows (padded up to a multiple of the window): [B * windows, window, window, C]."""
    b, h, w, c = x.shape
    pad_h, pad_w = (window_size - h % window_size) % window_size, (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c), (hp, wp)


def window_unpartition(windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int],
                       hw: tuple[int, int]) -> torch.Tensor:
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous() if hp > h or wp > w else x


def resize_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """A relative-position table (L, C) linearly resized to `length` rows."""
    resized = F.interpolate(table.reshape(1, table.shape[0], -1).permute(0, 2, 1), size=length, mode="linear")
    return resized.reshape(-1, length).permute(1, 0)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings for these query and key sizes (linearly resized if trained at another size)."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = resize_table(rel_pos, max_rel_dist)
    q_coords = torch.arange(q_size)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


def add_decomposed_rel_pos(attn: torch.Tensor, q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                           q_size: tuple[int, int], k_size: tuple[int, int]) -> torch.Tensor:
    """MViTv2's decomposed relative position term added to the attention logits."""
    q_h, q_w = q_size
    k_h, k_w = k_size
    rh, rw = get_rel_pos(q_h, k_h, rel_pos_h), get_rel_pos(q_w, k_w, rel_pos_w)
    b, _, dim = q.shape
    r_q = q.reshape(b, q_h, q_w, dim)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    attn = attn.view(b, q_h, q_w, k_h, k_w) + rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]
    return attn.view(b, q_h * q_w, k_h * k_w)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, use_rel_pos: bool, input_size: tuple[int, int]):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.use_rel_pos:
            attn = add_decomposed_rel_pos(attn, q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        attn = attn.softmax(dim=-1)
        x = (attn @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


class Block(nn.Module):
    """A transformer block with window attention (window_size > 0) or global attention."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, use_rel_pos: bool,
                 window_size: int, input_size: tuple[int, int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos,
                              input_size if window_size == 0 else (window_size, window_size))
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """SAM's image encoder: (B, 3, S, S) normalised RGB → (B, out_chans, S/patch, S/patch)."""

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, out_chans: int = 256,
                 qkv_bias: bool = True, use_abs_pos: bool = True, use_rel_pos: bool = True, window_size: int = 14,
                 global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = (img_size // patch_size, img_size // patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, *grid, embed_dim)) if use_abs_pos else None
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, use_rel_pos,
                  0 if i in global_attn_indexes else window_size, grid) for i in range(depth))
        self.neck = nn.Sequential(nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False), LayerNorm2d(out_chans),
                                  nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
                                  LayerNorm2d(out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))


def encoder_settings(state: dict[str, torch.Tensor]) -> dict:
    """ImageEncoderViT's constructor arguments, read from an encoder state dict's tensor shapes (ViT-B, -L, -H and
    any other size): heads from the relative-position width, global blocks from its length, windows likewise."""
    patch = state["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = patch.shape[0], patch.shape[1], patch.shape[-1]
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    pos = state.get("pos_embed")
    rel = [state.get(f"blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    if pos is None:
        raise ValueError("no position embedding")
    if any(r is None for r in rel):  # the heads and windows are read from these tables: without them, a guess
        raise ValueError("no relative-position tables, so its heads and attention windows cannot be read")
    grid, head_dim = pos.shape[1], rel[0].shape[1]
    sizes = [(r.shape[0] + 1) // 2 for r in rel]
    global_blocks = tuple(i for i, size in enumerate(sizes) if size == grid)
    windows = {size for i, size in enumerate(sizes) if i not in global_blocks}
    if len(windows) > 1:
        raise ValueError("mixed window sizes")
    return {"img_size": grid * patch_size, "patch_size": patch_size, "in_chans": in_chans, "embed_dim": embed_dim,
            "depth": depth, "num_heads": embed_dim // head_dim,
            "mlp_ratio": state["blocks.0.mlp.lin1.weight"].shape[0] / embed_dim,
            "out_chans": state["neck.0.weight"].shape[0], "qkv_bias": "blocks.0.attn.qkv.bias" in state,
            "use_rel_pos": True, "window_size": windows.pop() if windows else 0,
            "global_attn_indexes": global_blocks}


def resize_position_embedding(state: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """The state with its absolute position embedding resized (bicubic) to a `grid` × `grid` token grid, and the
    relative position tables of its global blocks resized (linearly, as `get_rel_pos` does) to that grid's
    2 × grid − 1 positions; window blocks keep theirs."""
    pos = state["pos_embed"]
    if pos.shape[1] == grid:
        return state
    resized = F.interpolate(pos.permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic", align_corners=False)
    out = dict(state)
    out["pos_embed"] = resized.permute(0, 2, 3, 1).contiguous()
    for key, value in state.items():
        if key.endswith(("rel_pos_h", "rel_pos_w")) and value.shape[0] == 2 * pos.shape[1] - 1:
            out[key] = resize_table(value, 2 * grid - 1).contiguous()
    return out


class SegmentationHead(nn.Module):
    """Upsamples the encoder's features (1/16) ×4 with two transposed convolutions to class logits at 1/4; the
    segmenter interpolates them to the input size, as SAM's mask decoder outputs at 1/4. Weight layers only: a new
    head is trained in full as dense units, which only weight layers take."""

    def __init__(self, in_channels: int, classes: int, width: int = 64):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(in_channels, width, kernel_size=2, stride=2)
        self.up2 = nn.ConvTranspose2d(width, width // 2, kernel_size=2, stride=2)
        self.classifier = nn.Conv2d(width // 2, classes, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.gelu(self.up2(F.gelu(self.up1(x)))))


class SAMSegmenter(nn.Module):
    """A one-channel image scaled to [0, 1] → class logits at its size: grey replicated to SAM's RGB statistics,
    SAM's image encoder, then the segmentation head."""

    def __init__(self, encoder: ImageEncoderViT, classes: int):
        super().__init__()
        self.image_encoder = encoder
        self.head = SegmentationHead(encoder.neck[0].out_channels, classes)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x.expand(-1, 3, -1, -1) * 255.0 - self.pixel_mean) / self.pixel_std
        logits = self.head(self.image_encoder(rgb))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
