"""Deterministic untrained weights for plumbing, tests and benchmarks (never for real detection).

Each tensor's values depend only on its name, shape and the seed, so every process and every backend sees the
same "random" model. Constructor constants (anchors, masks, RoPE periods, per-level point scales, `up`,
`reg_scale`, `bias_mask`) keep their constructed values. Scales follow fan-in so activations stay in range and
detections differ from query to query, which exercises top-k and box decoding like a trained model would.
"""
from __future__ import annotations

import math
import zlib

import torch
from torch import nn

__all__ = ["apply_deterministic_weights", "CONSTANT_LEAVES"]

CONSTANT_LEAVES = frozenset({"anchors", "valid_mask", "periods", "num_points_scale", "up", "reg_scale", "bias_mask"})


def _values(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed((zlib.crc32(name.encode()) + 7919 * seed) & 0xFFFFFFFF)
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return 0.5 + torch.rand(shape, generator=g)
    if leaf == "running_mean":
        return 0.1 * torch.randn(shape, generator=g)
    if len(shape) >= 2:  # weights: unit-variance outputs for unit-variance inputs
        return torch.randn(shape, generator=g) / math.sqrt(max(1, math.prod(shape[1:])))
    if leaf in ("weight", "scale", "gamma"):  # norm gains and layer scales
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    return 0.1 * torch.randn(shape, generator=g)  # biases, tokens and other vectors


@torch.no_grad()
def apply_deterministic_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """Overwrite every floating parameter and statistic of `model` in place; shared tensors are set once."""
    seen: set[int] = set()
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in sorted(named, key=lambda item: item[0]):
        if not tensor.is_floating_point() or name.rsplit(".", 1)[-1] in CONSTANT_LEAVES:
            continue
        if tensor.data_ptr() in seen:  # an alias of a tensor already set (shared heads)
            continue
        seen.add(tensor.data_ptr())
        tensor.copy_(_values(name, tuple(tensor.shape), seed).to(tensor.dtype))
    return model
