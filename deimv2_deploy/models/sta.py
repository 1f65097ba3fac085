"""The DEIMv2 backbone of s, m, l, x: a ViT semantic branch plus the spatial tuning adapter (STA).

The ViT sees the image at stride 16 only. Three of its intermediate layers are resized bilinearly to
strides 8, 16 and 32 (x2, x1, x0.5 of the ViT grid), each is concatenated with the map of the same
stride from a small CNN (the STA, which keeps the fine spatial detail the ViT loses), and a 1x1 conv
(no bias) + BatchNorm projects the result to `hidden_dim` channels.

Attribute names (`dinov3`, `sta.{stem,conv2,conv3,conv4}`, `convs`, `norms`) follow the official
`DINOv3STAs`, so its checkpoints load strictly; the official SyncBatchNorm is a plain BatchNorm2d here
(same state dict). `deploy()` does not change this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from deimv2_deploy.models.dinov3 import DINOv3ViT
from deimv2_deploy.models.vit_tiny import ViTTiny

__all__ = ["ViTSTAConfig", "SpatialTuningAdapter", "ViTSTABackbone"]


@dataclass(frozen=True)
class ViTSTAConfig:
    """One ViT + STA backbone, as the official configs `deimv2_dinov3_{s,m,l,x}_coco.yml` set it."""

    vit: Literal["vit_tiny", "dinov3"]  # family; decides the checkpoint key layout (`dinov3._model.*` or `dinov3.*`)
    embed_dim: int
    num_heads: int
    ffn: Literal["mlp", "swiglu"]
    ffn_ratio: float
    return_layers: tuple[int, int, int]  # the ViT blocks read for strides 8, 16, 32
    sta_channels: int  # official `conv_inplane`: STA widths are 1x, 2x, 4x, 4x this
    hidden_dim: int  # channels of the three output maps
    depth: int = 12


def _conv_bn(in_channels: int, out_channels: int) -> list[nn.Module]:
    """3x3 stride-2 conv (no bias) + BN: halves the resolution."""
    return [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_channels)]


class SpatialTuningAdapter(nn.Module):
    """The STA's CNN: (B, 3, H, W) -> maps of c*2, c*4, c*4 channels at strides 8, 16, 32.

    The returned maps are taken after BN, before the GELU that starts the next stage; the Sequential
    indexes (`stem.0/1`, `conv2.0/1`, `conv3.1/2`, `conv4.1/2`) are the checkpoint's.
    """

    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Sequential(*_conv_bn(3, c), nn.GELU(), nn.MaxPool2d(3, stride=2, padding=1))  # stride 4
        self.conv2 = nn.Sequential(*_conv_bn(c, 2 * c))  # stride 8
        self.conv3 = nn.Sequential(nn.GELU(), *_conv_bn(2 * c, 4 * c))  # stride 16
        self.conv4 = nn.Sequential(nn.GELU(), *_conv_bn(4 * c, 4 * c))  # stride 32
        self.out_channels = (2 * c, 4 * c, 4 * c)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s8 = self.conv2(self.stem(x))  # (B, 2c, H/8, W/8)
        s16 = self.conv3(s8)  # (B, 4c, H/16, W/16)
        s32 = self.conv4(s16)  # (B, 4c, H/32, W/32)
        return s8, s16, s32


class ViTSTABackbone(nn.Module):
    """ViT (ViT-Tiny/Tiny+ or DINOv3 ViT-S/S+) + STA -> three `hidden_dim` maps at strides 8, 16, 32.

    Input: (B, 3, H, W) ImageNet-normalised, H and W multiples of 32 (the ViT grid is H/16 x W/16 and
    must halve evenly to stride 32).
    """

    out_strides: tuple[int, int, int] = (8, 16, 32)

    def __init__(self, config: ViTSTAConfig) -> None:
        super().__init__()
        if config.vit == "vit_tiny":
            if config.ffn != "mlp":
                raise ValueError(f"ViT-Tiny has an MLP feed-forward, got ffn={config.ffn!r}")
            self.dinov3: nn.Module = ViTTiny(
                config.embed_dim, config.num_heads, config.depth, config.ffn_ratio, config.return_layers
            )
        elif config.vit == "dinov3":
            self.dinov3 = DINOv3ViT(
                config.embed_dim, config.num_heads, config.depth, config.ffn, config.ffn_ratio, config.return_layers
            )
        else:
            raise ValueError(f"unknown ViT family {config.vit!r}; use 'vit_tiny' or 'dinov3'")
        if len(config.return_layers) != 3:
            raise ValueError(f"need 3 return_layers (strides 8, 16, 32), got {config.return_layers}")
        self.config = config
        self.sta = SpatialTuningAdapter(config.sta_channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(config.embed_dim + c, config.hidden_dim, 1, bias=False) for c in self.sta.out_channels
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(config.hidden_dim) for _ in range(3))
        self.out_channels: tuple[int, int, int] = (config.hidden_dim,) * 3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        if not torch.jit.is_tracing() and (h % 32 or w % 32):
            raise ValueError(f"input sides must be multiples of 32, got {h}x{w}: resize or pad the image first")
        semantic = self.dinov3(x)  # 3 x (B, D, H/16, W/16)
        detail = self.sta(x)  # strides 8, 16, 32
        outs = []
        for level, (sem, det, conv, norm) in enumerate(zip(semantic, detail, self.convs, self.norms, strict=True)):
            if level != 1:  # x2 to stride 8, x0.5 to stride 32; stride 16 is the ViT grid itself
                sem = F.interpolate(sem, size=det.shape[-2:], mode="bilinear", align_corners=False)
            fused = torch.cat((sem, det), dim=1)  # (B, D + c_level, H/s, W/s)
            outs.append(norm(conv(fused)))  # (B, hidden_dim, H/s, W/s)
        return outs
