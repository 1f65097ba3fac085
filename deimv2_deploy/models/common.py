"""Small conv layers shared by the DEIMv2 encoders, and their deploy-time re-parameterisation.

Module and parameter names (`conv`, `norm`, `conv_bn_fused`, `cv1`..`cv4`, `bottlenecks`) follow the
official checkpoints so that their state dicts load strictly. Blocks that the official deploy mode
re-parameterises expose `fuse_for_deploy()`, which converts the block in place (eval-mode BN only).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "get_activation",
    "fuse_conv_bn",
    "ConvNorm",
    "FusableConvNorm",
    "RepConv3x3",
    "RepCSPBlock",
    "RepCSPELAN",
]


def get_activation(name: str | None) -> nn.Module:
    """The activation module for a config name ('relu', 'silu'/'swish', 'gelu', 'hardsigmoid', None)."""
    if name is None or name.lower() in ("none", "identity"):
        return nn.Identity()
    key = name.lower()
    factories = {
        "relu": nn.ReLU,
        "silu": nn.SiLU,
        "swish": nn.SiLU,
        "gelu": nn.GELU,  # exact (erf) GELU, as nn.GELU() defaults to
        "leaky_relu": nn.LeakyReLU,
        "hardsigmoid": nn.Hardsigmoid,
    }
    if key not in factories:
        raise ValueError(f"unknown activation {name!r}; use one of {sorted(factories)} or None")
    return factories[key]()


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one conv equal to `bn(conv(x))` with the BN's running statistics."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std  # (C_out,)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * bn.weight / std
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return weight, bias


class ConvNorm(nn.Module):
    """Conv (no bias) -> BatchNorm -> activation, padding 'same' for odd kernels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: str | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False
        )
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class FusableConvNorm(ConvNorm):
    """ConvNorm that deploy mode folds into a single biased conv named `conv_bn_fused`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv_bn_fused"):
            return self.act(self.conv_bn_fused(x))
        return self.act(self.norm(self.conv(x)))

    def fuse_for_deploy(self) -> None:
        if hasattr(self, "conv_bn_fused"):
            return
        conv = self.conv
        fused = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
            padding=conv.padding, groups=conv.groups, bias=True,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        weight, bias = fuse_conv_bn(conv, self.norm)
        fused.weight.data.copy_(weight)
        fused.bias.data.copy_(bias)
        del self.conv, self.norm
        self.conv_bn_fused = fused


class RepConv3x3(nn.Module):
    """RepVGG block: act(BN(conv3x3(x)) + BN(conv1x1(x))); deploy mode merges both into one 3x3 `conv`."""

    def __init__(self, in_channels: int, out_channels: int, act: str | None = "relu") -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_channels, out_channels, 3)
        self.conv2 = ConvNorm(in_channels, out_channels, 1)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "conv"):
            return self.act(self.conv(x))
        return self.act(self.conv1(x) + self.conv2(x))

    def fuse_for_deploy(self) -> None:
        if hasattr(self, "conv"):
            return
        w3, b3 = fuse_conv_bn(self.conv1.conv, self.conv1.norm)
        w1, b1 = fuse_conv_bn(self.conv2.conv, self.conv2.norm)
        ref = self.conv1.conv
        merged = nn.Conv2d(ref.in_channels, ref.out_channels, 3, 1, padding=1, bias=True)
        merged = merged.to(device=ref.weight.device, dtype=ref.weight.dtype)
        merged.weight.data.copy_(w3 + F.pad(w1, [1, 1, 1, 1]))  # 1x1 kernel sits at the 3x3 centre
        merged.bias.data.copy_(b3 + b1)
        del self.conv1, self.conv2
        self.conv = merged


class RepCSPBlock(nn.Module):
    """CSP split with RepVGG bottlenecks: one 1x1 conv makes two halves, one half runs the bottlenecks,
    the halves are summed (the official `CSPLayer2`, expansion 1 so there is no output conv)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, act: str | None = "silu") -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = FusableConvNorm(in_channels, 2 * out_channels, 1, act=act)
        self.bottlenecks = nn.Sequential(*[RepConv3x3(out_channels, out_channels, act=act) for _ in range(num_blocks)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut, branch = self.conv1(x).chunk(2, dim=1)  # 2 x (B, C_out, H, W)
        return shortcut + self.bottlenecks(branch)


class RepCSPELAN(nn.Module):
    """ELAN aggregation over two chained RepCSP stages (the official `RepNCSPELAN4`/`RepNCSPELAN5`).

    cv1 (1x1) widens to `split_channels` and splits in two halves; cv2 runs on the second half and cv3 on
    cv2's output; cv4 (1x1) fuses [half, half, cv2, cv3]. With `stage_conv=True` (the D-FINE form, used by
    LiteEncoder and the n encoder) each of cv2/cv3 ends with an extra 3x3 ConvNorm (`cv2.1`, `cv3.1`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        split_channels: int,
        branch_channels: int,
        num_blocks: int,
        act: str | None = "silu",
        stage_conv: bool = True,
    ) -> None:
        super().__init__()
        if split_channels % 2:
            raise ValueError(f"split_channels must be even to split in halves, got {split_channels}")
        self.half = split_channels // 2
        self.cv1 = FusableConvNorm(in_channels, split_channels, 1, act=act)
        self.cv2 = self._stage(self.half, branch_channels, num_blocks, act, stage_conv)
        self.cv3 = self._stage(branch_channels, branch_channels, num_blocks, act, stage_conv)
        self.cv4 = FusableConvNorm(split_channels + 2 * branch_channels, out_channels, 1, act=act)

    @staticmethod
    def _stage(cin: int, cout: int, num_blocks: int, act: str | None, stage_conv: bool) -> nn.Sequential:
        layers: list[nn.Module] = [RepCSPBlock(cin, cout, num_blocks, act=act)]
        if stage_conv:
            layers.append(FusableConvNorm(cout, cout, 3, act=act))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.half, self.half), dim=1)
        c = self.cv2(b)
        d = self.cv3(c)
        return self.cv4(torch.cat([a, b, c, d], dim=1))  # (B, split + 2 * branch, H, W) -> (B, C_out, H, W)
