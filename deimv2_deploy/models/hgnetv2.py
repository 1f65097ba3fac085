"""HGNetv2 backbone (PP-HGNetV2) in the sizes DEIMv2 uses: Atto, Femto, Pico (atto/femto/pico) and B0 (n).

Layout: a stem (stride 4) and 3 or 4 stages of HG blocks; each block stacks `num_layers` convs, concatenates
the input with every intermediate map and aggregates them with a squeeze/excitation pair of 1x1 convs.
Deploy mode leaves the backbone as it is (its BNs stay), so nothing here has `fuse_for_deploy`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import get_activation

__all__ = ["StageSpec", "HGNetv2Arch", "HGNETV2_ARCHS", "HGNetv2"]


# --------------------------------------------------------------------------------------------- blocks


class LearnableAffine(nn.Module):
    """y = scale * x + bias with two learnable scalars (the `lab` of `use_lab`)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """Conv (no bias) -> BN -> activation -> optional learnable affine; a plain conv + BN when `use_act` is off."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        use_act: bool = True,
        use_lab: bool = False,
        act: str = "relu",
    ) -> None:
        super().__init__()
        # (k - 1) // 2 pads nothing for the stem's 2x2 kernels: the stem pads those itself
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = get_activation(act) if use_act else nn.Identity()
        self.lab = LearnableAffine() if use_act and use_lab else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lab(self.act(self.bn(self.conv(x))))


class LightConvBNAct(nn.Module):
    """1x1 pointwise conv + BN (no activation), then a depthwise kxk ConvBNAct."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, use_lab: bool, act: str) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_channels, out_channels, 1, use_act=False, use_lab=use_lab, act=act)
        self.conv2 = ConvBNAct(out_channels, out_channels, kernel_size, groups=out_channels, use_lab=use_lab, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class StemBlock(nn.Module):
    """Stride-4 stem: 3x3/2 conv, then a max-pool branch and a 2x2-conv branch side by side, 3x3/2, 1x1."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, use_lab: bool, act: str) -> None:
        super().__init__()
        half = mid_channels // 2
        self.stem1 = ConvBNAct(in_channels, mid_channels, 3, stride=2, use_lab=use_lab, act=act)
        self.stem2a = ConvBNAct(mid_channels, half, 2, use_lab=use_lab, act=act)
        self.stem2b = ConvBNAct(half, mid_channels, 2, use_lab=use_lab, act=act)
        self.stem3 = ConvBNAct(2 * mid_channels, mid_channels, 3, stride=2, use_lab=use_lab, act=act)
        self.stem4 = ConvBNAct(mid_channels, out_channels, 1, use_lab=use_lab, act=act)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=1, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.stem1(x), (0, 1, 0, 1))  # (B, mid, H/2 + 1, W/2 + 1): 2x2 kernels keep H/2
        conv_branch = self.stem2b(F.pad(self.stem2a(x), (0, 1, 0, 1)))  # (B, mid, H/2, W/2)
        pool_branch = self.pool(x)  # (B, mid, H/2, W/2)
        x = torch.cat([pool_branch, conv_branch], dim=1)
        return self.stem4(self.stem3(x))  # (B, out, H/4, W/4)


class HGBlock(nn.Module):
    """`num_layers` chained convs; input and all outputs concatenated, squeezed to out/2, expanded to out."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        num_layers: int,
        kernel_size: int,
        residual: bool,
        light_block: bool,
        use_lab: bool,
        act: str,
    ) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            cin = in_channels if i == 0 else mid_channels
            if light_block:
                layer: nn.Module = LightConvBNAct(cin, mid_channels, kernel_size, use_lab=use_lab, act=act)
            else:
                layer = ConvBNAct(cin, mid_channels, kernel_size, use_lab=use_lab, act=act)
            self.layers.append(layer)
        total = in_channels + num_layers * mid_channels
        self.aggregation = nn.Sequential(
            ConvBNAct(total, out_channels // 2, 1, use_lab=use_lab, act=act),
            ConvBNAct(out_channels // 2, out_channels, 1, use_lab=use_lab, act=act),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(features[-1]))
        y = self.aggregation(torch.cat(features, dim=1))  # (B, in + L * mid, H, W) -> (B, out, H, W)
        return y + x if self.residual else y


class HGStage(nn.Module):
    """Optional depthwise 3x3/2 downsample (conv + BN, no activation), then `num_blocks` HG blocks."""

    def __init__(self, spec: StageSpec, use_lab: bool, act: str) -> None:
        super().__init__()
        c_in = spec.in_channels
        if spec.downsample:
            self.downsample: nn.Module = ConvBNAct(
                c_in, c_in, 3, stride=2, groups=c_in, use_act=False, use_lab=use_lab, act=act
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(
            *[
                HGBlock(
                    c_in if i == 0 else spec.out_channels,
                    spec.mid_channels,
                    spec.out_channels,
                    spec.num_layers,
                    spec.kernel_size,
                    residual=i > 0,  # the first block changes the width, so it has no shortcut
                    light_block=spec.light_block,
                    use_lab=use_lab,
                    act=act,
                )
                for i in range(spec.num_blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


# -------------------------------------------------------------------------------------- arch table


@dataclass(frozen=True)
class StageSpec:
    in_channels: int
    mid_channels: int
    out_channels: int
    num_blocks: int
    downsample: bool
    light_block: bool
    kernel_size: int
    num_layers: int


@dataclass(frozen=True)
class HGNetv2Arch:
    stem_in: int
    stem_mid: int
    stem_out: int
    stages: tuple[StageSpec, ...]


_STAGE1 = StageSpec(16, 16, 64, num_blocks=1, downsample=False, light_block=False, kernel_size=3, num_layers=3)
_STAGE2 = StageSpec(64, 32, 256, num_blocks=1, downsample=True, light_block=False, kernel_size=3, num_layers=3)

HGNETV2_ARCHS: dict[str, HGNetv2Arch] = {
    "Atto": HGNetv2Arch(3, 16, 16, (
        _STAGE1, _STAGE2,
        StageSpec(256, 64, 256, num_blocks=1, downsample=True, light_block=True, kernel_size=3, num_layers=3),
    )),
    "Femto": HGNetv2Arch(3, 16, 16, (
        _STAGE1, _STAGE2,
        StageSpec(256, 64, 512, num_blocks=1, downsample=True, light_block=True, kernel_size=5, num_layers=3),
    )),
    "Pico": HGNetv2Arch(3, 16, 16, (
        _STAGE1, _STAGE2,
        StageSpec(256, 64, 512, num_blocks=2, downsample=True, light_block=True, kernel_size=5, num_layers=3),
    )),
    "B0": HGNetv2Arch(3, 16, 16, (
        _STAGE1, _STAGE2,
        StageSpec(256, 64, 512, num_blocks=2, downsample=True, light_block=True, kernel_size=5, num_layers=3),
        StageSpec(512, 128, 1024, num_blocks=1, downsample=True, light_block=True, kernel_size=5, num_layers=3),
    )),
}

_STAGE_STRIDES = (4, 8, 16, 32)


# -------------------------------------------------------------------------------------------- model


class HGNetv2(nn.Module):
    """HGNetv2 returning the feature maps of the stages in `return_idx` (stage i has stride 4 * 2**i)."""

    def __init__(self, arch: str, return_idx: Sequence[int], use_lab: bool = True, act: str = "relu") -> None:
        super().__init__()
        if arch not in HGNETV2_ARCHS:
            raise ValueError(f"unknown HGNetv2 arch {arch!r}; choose one of {sorted(HGNETV2_ARCHS)}")
        spec = HGNETV2_ARCHS[arch]
        num_stages = len(spec.stages)
        bad = [i for i in return_idx if not 0 <= i < num_stages]
        if bad or not return_idx:
            raise ValueError(
                f"return_idx {list(return_idx)} invalid for {arch}: use stage indices in 0..{num_stages - 1}"
            )
        self.arch = arch
        self.return_idx = list(return_idx)
        self.out_channels = [spec.stages[i].out_channels for i in self.return_idx]
        self.out_strides = [_STAGE_STRIDES[i] for i in self.return_idx]

        self.stem = StemBlock(spec.stem_in, spec.stem_mid, spec.stem_out, use_lab=use_lab, act=act)
        self.stages = nn.ModuleList([HGStage(s, use_lab=use_lab, act=act) for s in spec.stages])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)  # (B, 16, H/4, W/4)
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)  # (B, C_i, H / 2**(i + 2), W / 2**(i + 2))
            if i in self.return_idx:
                outs.append(x)
        return outs
