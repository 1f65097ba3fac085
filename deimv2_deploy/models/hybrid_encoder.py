"""HybridEncoder: intra-scale transformer on the coarsest map, then a top-down/bottom-up CSP-ELAN FPN.

Used by DEIMv2 n (the D-FINE form: HGNetv2 maps projected to `hidden_dim`, ELAN stages with an extra
3x3 conv) and s, m, l, x (the DEIM form: ViT maps already `hidden_dim` wide, so no projection, and
ELAN stages without the extra conv). `version` picks the form; everything else is shared.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .common import ConvNorm, FusableConvNorm, RepCSPELAN, get_activation

__all__ = ["sincos_position_embedding_2d", "HybridEncoder"]


def sincos_position_embedding_2d(
    height: int, width: int, dim: int, temperature: float = 10000.0, device: torch.device | None = None
) -> torch.Tensor:
    """Fixed 2D sin-cos embedding, (1, height * width, dim), tokens in row-major order.

    Channels: [sin(row * w), cos(row * w), sin(col * w), cos(col * w)], w_k = temperature ** (-k / (dim / 4)).
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a dim divisible by 4, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / (temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter))  # (D/4,)
    row_angles = torch.arange(height, dtype=torch.float32, device=device)[:, None] * freqs  # (H, D/4)
    col_angles = torch.arange(width, dtype=torch.float32, device=device)[:, None] * freqs  # (W, D/4)
    row_half = torch.cat([row_angles.sin(), row_angles.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    col_half = torch.cat([col_angles.sin(), col_angles.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    return torch.cat([row_half, col_half], dim=2).reshape(1, height * width, dim)


class TransformerEncoderLayer(nn.Module):
    """Post-norm transformer layer; the position embedding is added to queries and keys only."""

    def __init__(self, dim: int, nhead: int, dim_feedforward: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.activation = get_activation(activation)
        self.dropout = nn.Dropout(dropout)  # inside the feed-forward
        self.dropout1 = nn.Dropout(dropout)  # on the attention output
        self.dropout2 = nn.Dropout(dropout)  # on the feed-forward output

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        qk = x + pos  # (B, N, D)
        attn, _ = self.self_attn(qk, qk, x, need_weights=False)
        x = self.norm1(x + self.dropout1(attn))
        ff = self.linear2(self.dropout(self.activation(self.linear1(x))))
        return self.norm2(x + self.dropout2(ff))


class TransformerStack(nn.Module):
    """`num_layers` encoder layers sharing one position embedding (the official `TransformerEncoder`)."""

    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList([TransformerEncoderLayer(**layer_kwargs) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, pos)
        return x


class SCDown(nn.Module):
    """Spatial-channel decoupled downsample: 1x1 ConvNorm, then depthwise 3x3/2 ConvNorm, no activations."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.cv1 = FusableConvNorm(in_channels, out_channels, 1)
        self.cv2 = FusableConvNorm(out_channels, out_channels, 3, stride=2, groups=out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv2(self.cv1(x))


class HybridEncoder(nn.Module):
    """Multi-level encoder: maps at `feat_strides` -> as many `hidden_dim` maps at the same strides.

    version: 'dfine' (n) uses ELAN stages with a trailing 3x3 ConvNorm; 'deim' (s, m, l, x) without it.
    Inputs whose width differs from `hidden_dim` get a 1x1 conv + BN projection (`input_proj.i`), others
    pass through. fuse_op: how an FPN/PAN step merges its two inputs, 'sum' (DEIMv2) or 'cat'.
    The position embedding is computed for the actual map size, so any input size that is a multiple of
    the coarsest stride works.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        feat_strides: Sequence[int],
        hidden_dim: int = 256,
        nhead: int = 8,
        dim_feedforward: int = 1024,
        dropout: float = 0.0,
        enc_act: str = "gelu",
        use_encoder_idx: Sequence[int] = (2,),
        num_encoder_layers: int = 1,
        pe_temperature: float = 10000.0,
        expansion: float = 1.0,
        depth_mult: float = 1.0,
        act: str | None = "silu",
        version: Literal["dfine", "deim"] = "deim",
        fuse_op: Literal["sum", "cat"] = "sum",
    ) -> None:
        super().__init__()
        num_levels = len(in_channels)
        if len(feat_strides) != num_levels or num_levels < 2:
            raise ValueError(
                f"in_channels {list(in_channels)} and feat_strides {list(feat_strides)} must list the same "
                "number (>= 2) of levels"
            )
        if version not in ("dfine", "deim"):
            raise ValueError(f"version must be 'dfine' or 'deim', got {version!r}")
        if fuse_op not in ("sum", "cat"):
            raise ValueError(f"fuse_op must be 'sum' or 'cat', got {fuse_op!r}")
        bad = [i for i in use_encoder_idx if not 0 <= i < num_levels]
        if bad:
            raise ValueError(f"use_encoder_idx {list(use_encoder_idx)} out of range for {num_levels} levels")
        self.in_channels = list(in_channels)
        self.hidden_dim = hidden_dim
        self.use_encoder_idx = list(use_encoder_idx)
        self.num_encoder_layers = num_encoder_layers
        self.pe_temperature = pe_temperature
        self.fuse_op = fuse_op
        self.out_channels = [hidden_dim] * num_levels
        self.out_strides = list(feat_strides)

        self.input_proj = nn.ModuleList(
            [ConvNorm(c, hidden_dim, 1) if c != hidden_dim else nn.Identity() for c in in_channels]
        )
        self.encoder = nn.ModuleList(
            [
                TransformerStack(
                    num_encoder_layers, dim=hidden_dim, nhead=nhead, dim_feedforward=dim_feedforward,
                    dropout=dropout, activation=enc_act,
                )
                for _ in self.use_encoder_idx
            ]
        )

        merged = hidden_dim if fuse_op == "sum" else 2 * hidden_dim
        branch = round(expansion * hidden_dim // 2)
        num_blocks = round(3 * depth_mult)

        def elan() -> RepCSPELAN:
            return RepCSPELAN(
                merged, hidden_dim, 2 * hidden_dim, branch, num_blocks, act=act, stage_conv=version == "dfine"
            )

        # index k of each list serves the k-th step: top-down from the coarsest level, bottom-up from the finest
        self.lateral_convs = nn.ModuleList([FusableConvNorm(hidden_dim, hidden_dim, 1) for _ in range(num_levels - 1)])
        self.fpn_blocks = nn.ModuleList([elan() for _ in range(num_levels - 1)])
        self.downsample_convs = nn.ModuleList(
            [nn.Sequential(SCDown(hidden_dim, hidden_dim)) for _ in range(num_levels - 1)]
        )
        self.pan_blocks = nn.ModuleList([elan() for _ in range(num_levels - 1)])

    def _merge(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b if self.fuse_op == "sum" else torch.cat([a, b], dim=1)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        if len(feats) != len(self.in_channels):
            raise ValueError(f"HybridEncoder expects {len(self.in_channels)} feature maps, got {len(feats)}")
        maps = [proj(f) for proj, f in zip(self.input_proj, feats, strict=True)]  # each (B, D, H_l, W_l)

        if self.num_encoder_layers > 0:
            for stack, level in zip(self.encoder, self.use_encoder_idx, strict=True):
                b, d, h, w = maps[level].shape
                tokens = maps[level].flatten(2).transpose(1, 2)  # (B, HW, D)
                pos = sincos_position_embedding_2d(h, w, d, self.pe_temperature, tokens.device).to(tokens.dtype)
                tokens = stack(tokens, pos)
                maps[level] = tokens.transpose(1, 2).reshape(b, d, h, w).contiguous()

        # top-down: each lateral conv output is kept for the bottom-up path
        num_levels = len(maps)
        laterals: list[torch.Tensor | None] = [None] * num_levels
        top = maps[-1]
        for k, level in enumerate(range(num_levels - 1, 0, -1)):
            top = self.lateral_convs[k](top)  # (B, D, H_l, W_l)
            laterals[level] = top
            upsampled = F.interpolate(top, scale_factor=2.0, mode="nearest")  # (B, D, H_{l-1}, W_{l-1})
            top = self.fpn_blocks[k](self._merge(upsampled, maps[level - 1]))

        # bottom-up
        outs = [top]  # finest level
        for k in range(num_levels - 1):
            down = self.downsample_convs[k](outs[-1])  # (B, D, H_{k+1}, W_{k+1})
            outs.append(self.pan_blocks[k](self._merge(down, laterals[k + 1])))
        return outs
