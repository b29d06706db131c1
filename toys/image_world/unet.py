"""A small convolutional UNet ``net(x, c_noise, labels) -> tensor like x`` for 4x4 to 16x16 images.

Layout (``channels = [c_1, ..., c_L]``, one entry per resolution level):

    conv_in (3x3, C -> c_1)
    level l = 1..L:   blocks_per_level ResBlocks at c_l   [skip saved]   then a stride-2 conv (not after L)
    middle:           one ResBlock at c_L
    level l = L..1:   upsample (nearest + 3x3 conv, not before L), concat the skip, ResBlocks -> c_l
    GroupNorm, SiLU, conv_out (3x3, c_1 -> C)

``ResBlock(x, emb) = skip(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))) + Linear(emb))))``. The embedding is
``emb = MLP(sin/cos(freqs * c_noise)) (+ Embedding(label))``, with ``num_classes + 1`` class rows, the
last one being the null (unconditional) class used by classifier-free guidance. Plain modules only
(Conv2d, Linear, GroupNorm, Embedding), so ``toys.image_world.lora`` can wrap its convolutions and
linear layers and ``torch.func.functional_call`` can batch several members over one module.
"""
from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator
from torch import nn

from odecm.config import StrictModel

Tensor = torch.Tensor

__all__ = ["UNetConfig", "ConvUNet", "ResBlock", "timestep_features"]


class UNetConfig(StrictModel):
    """Architecture of the conv UNet (teacher, scratch student)."""

    channels: list[int] = Field(default_factory=lambda: [32, 64], description="channels per resolution level")
    blocks_per_level: int = Field(1, ge=1)
    emb_dim: int = Field(64, ge=8, description="time (and class) embedding width")
    groups: int = Field(8, ge=1, description="GroupNorm groups (capped by the channel count)")

    @field_validator("channels")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(c < 1 for c in v):
            raise ValueError(f"channels={v}; allowed: a non-empty list of positive integers")
        return v


def timestep_features(c_noise: Tensor, dim: int) -> Tensor:
    """``[sin(f_k c), cos(f_k c)]`` with ``f_k = exp(-ln(1000) k / (dim/2))`` scaled by 100 (c ~ log sigma / 4 in [-2.5, 1])."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=c_noise.device, dtype=torch.float32) / half)
    arg = 100.0 * c_noise.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(ch, groups), ch)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in, groups), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2, self.conv2 = _norm(c_out, groups), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


class ConvUNet(nn.Module):
    """``forward(x (B, C, H, W), c_noise (B,), labels (B,) long | None) -> (B, C, H, W)``; H and W must be
    divisible by ``2^(L-1)``. ``labels`` index ``0..num_classes`` (``num_classes`` = null class);
    ``None`` means the null class for a conditional net."""

    def __init__(self, in_channels: int, config: UNetConfig, num_classes: int = 0):
        super().__init__()
        self.config, self.in_channels, self.num_classes = config, in_channels, num_classes
        ch, E, G = config.channels, config.emb_dim, config.groups
        self.time_mlp = nn.Sequential(nn.Linear(E, E), nn.SiLU(), nn.Linear(E, E))
        self.label_emb = nn.Embedding(num_classes + 1, E) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c = ch[0]
        for i, c_l in enumerate(ch):
            blocks = nn.ModuleList()
            for _ in range(config.blocks_per_level):
                blocks.append(ResBlock(c, c_l, E, G))
                c = c_l
            self.down.append(blocks)
            if i < len(ch) - 1:
                self.downsample.append(nn.Conv2d(c, ch[i + 1], 3, stride=2, padding=1))
                c = ch[i + 1]
        self.mid = ResBlock(c, c, E, G)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(ch))):
            if i < len(ch) - 1:
                self.upsample.append(nn.Conv2d(c, ch[i], 3, padding=1))
                c = ch[i]
            blocks = nn.ModuleList()
            for j in range(config.blocks_per_level):
                blocks.append(ResBlock(c + (ch[i] if j == 0 else 0), ch[i], E, G))
                c = ch[i]
            self.up.append(blocks)
        self.norm_out = _norm(c, G)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)

    @property
    def levels(self) -> int:
        return len(self.config.channels)

    def embedding(self, c_noise: Tensor, labels: Tensor | None) -> Tensor:
        emb = self.time_mlp(timestep_features(c_noise, self.config.emb_dim).to(self.norm_out.weight.dtype))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((c_noise.shape[0],), self.num_classes, dtype=torch.long, device=c_noise.device)
            emb = emb + self.label_emb(labels.long())
        return emb

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        emb = self.embedding(c_noise.reshape(-1), labels)
        h = self.conv_in(x)
        skips = []
        for i, blocks in enumerate(self.down):
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for j, blocks in enumerate(self.up):
            if j > 0:
                h = self.upsample[j - 1](nn.functional.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = torch.cat([h, skips.pop()], dim=1)
            for block in blocks:
                h = block(h, emb)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))
