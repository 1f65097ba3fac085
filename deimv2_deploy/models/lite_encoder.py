"""LiteEncoder: the two-scale encoder of DEIMv2 atto, femto and pico.

One backbone map (stride s) is projected to `hidden_dim`; an average-pooled copy gives the stride-2s
map, which is fused with its global average. A top-down and a bottom-up CSP-ELAN step then return
both scales. No attention; deploy mode fuses the ELAN blocks' conv+BN pairs and RepVGG branches.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import ConvNorm, FusableConvNorm, RepCSPELAN, get_activation

__all__ = ["LiteEncoder"]


class GlobalPoolFusion(nn.Module):
    """x + mean over H, W, then a 1x1 ConvNorm: mixes image-wide context into every position."""

    def __init__(self, channels: int, act: str | None) -> None:
        super().__init__()
        self.cv = FusableConvNorm(channels, channels, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv(x + F.adaptive_avg_pool2d(x, 1))  # (B, C, H, W) + (B, C, 1, 1)


def _pool_downsample(channels: int, act: str | None) -> nn.Sequential:
    # stride-2 average pool (count_include_pad) + 1x1 conv + BN; deploy mode keeps this unfused
    return nn.Sequential(
        nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
        nn.Conv2d(channels, channels, 1, 1, bias=False),
        nn.BatchNorm2d(channels),
        get_activation(act),
    )


class LiteEncoder(nn.Module):
    """Two-scale encoder: one input map at stride s -> [(B, hidden, H/s, W/s), (B, hidden, H/2s, W/2s)].

    `in_channels`/`feat_strides` are lists of one element, as in the official configs.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        feat_strides: Sequence[int],
        hidden_dim: int,
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        act: str | None = "silu",
    ) -> None:
        super().__init__()
        if len(in_channels) != 1 or len(feat_strides) != 1:
            raise ValueError(
                f"LiteEncoder takes exactly one input level, got in_channels={list(in_channels)} "
                f"feat_strides={list(feat_strides)}; use HybridEncoder for multi-level inputs"
            )
        self.in_channels = list(in_channels)
        self.hidden_dim = hidden_dim
        self.out_channels = [hidden_dim, hidden_dim]
        self.out_strides = [feat_strides[0], 2 * feat_strides[0]]

        self.input_proj = nn.ModuleList([ConvNorm(c, hidden_dim, 1) for c in in_channels])
        self.down_sample1 = _pool_downsample(hidden_dim, act)  # makes the coarse level
        self.down_sample2 = _pool_downsample(hidden_dim, act)  # bottom-up path
        self.bi_fusion = GlobalPoolFusion(hidden_dim, act)

        branch = round(expansion * hidden_dim // 2)
        num_blocks = round(3 * depth_mult)
        self.fpn_block = RepCSPELAN(hidden_dim, hidden_dim, 2 * hidden_dim, branch, num_blocks, act=act)
        self.pan_block = RepCSPELAN(hidden_dim, hidden_dim, 2 * hidden_dim, branch, num_blocks, act=act)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != 1:
            raise ValueError(f"LiteEncoder expects 1 feature map, got {len(feats)}")
        fine = self.input_proj[0](feats[0])  # (B, D, H, W)
        coarse = self.bi_fusion(self.down_sample1(fine))  # (B, D, H/2, W/2)
        fine_out = self.fpn_block(fine + F.interpolate(coarse, scale_factor=2.0, mode="nearest"))
        coarse_out = self.pan_block(coarse + self.down_sample2(fine_out))
        return [fine_out, coarse_out]
