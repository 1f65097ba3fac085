"""Where transformers' `Deimv2ForObjectDetection` (5.24) computes something else than the official DEIMv2.

Each `Difference` can be switched off on a loaded transformers model, in place, by putting the official
behaviour into its modules; with all of them off the transformers model computes the official outputs
(tests/test_transformers_format.py proves it for all eight sizes, and that leaving any one on breaks it).
docs/transformers.md lists them with their measured effect (benchmarks/transformers_differences.py).

No transformers import: the switches reach into the model through its attribute names (transformers 5.24).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from deimv2_deploy.models.zoo import VARIANT_NAMES, get_variant

__all__ = ["Difference", "DIFFERENCES", "differences_for", "switch_off"]

ALL = tuple(VARIANT_NAMES)
Switch = Callable[[nn.Module, str, Mapping[str, torch.Tensor]], None]


@dataclass(frozen=True)
class Difference:
    number: int
    title: str
    sizes: tuple[str, ...]
    switch: Switch  # (transformers model, size, official state dict) -> None, puts the official behaviour in


def _vit_layers(hf: nn.Module) -> list[nn.Module]:
    return list(hf.model.conv_encoder.backbone.model.layer)


def _drop_enc_output(hf: nn.Module, variant: str, official: Mapping[str, torch.Tensor]) -> None:
    hf.model.enc_output = nn.Identity()  # the official selects and feeds the raw memory


def _silu_heads(hf: nn.Module, variant: str, official: Mapping[str, torch.Tensor]) -> None:
    decoder = hf.model.decoder
    heads = [hf.model.enc_bbox_head, decoder.pre_bbox_head, *decoder.bbox_embed,
             *(lqe.reg_conf for lqe in decoder.lqe_layers)]
    for mlp in heads:
        mlp.act = nn.SiLU()


class _OncePerForward(nn.Module):
    """Computes the wrapped module on its first call after `reset()` and returns that result until the next."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.cached: torch.Tensor | None = None

    def reset(self, *args: object) -> None:
        self.cached = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cached is None:
            self.cached = self.inner(x)
        return self.cached


def _query_pos_once(hf: nn.Module, variant: str, official: Mapping[str, torch.Tensor]) -> None:
    decoder = hf.model.decoder
    if isinstance(decoder.query_pos_head, _OncePerForward):
        return
    once = _OncePerForward(decoder.query_pos_head)
    decoder.query_pos_head = once  # the official embeds the initial boxes once, before the layer loop
    hf.model.register_forward_pre_hook(once.reset)


def _aifi_position(hf: nn.Module, variant: str, official: Mapping[str, torch.Tensor]) -> None:
    for layer in getattr(hf.model.encoder, "aifi", ()):
        layer.eval_size = None  # None: the position embedding is computed in eval mode too


def _no_vit_tiny_final_norm(hf: nn.Module, variant: str, official: Mapping[str, torch.Tensor]) -> None:
    hf.model.conv_encoder.backbone.norm = nn.Identity()


def _vit_prefix(variant: str) -> str:
    return "backbone.dinov3._model" if get_variant(variant).backbone.vit == "vit_tiny" else "backbone.dinov3"


def _set_key_bias(hf: nn.Module, variant: str, values: Callable[[int], torch.Tensor]) -> None:
    for i, layer in enumerate(_vit_layers(hf)):
        old = layer.attention.k_proj
        new = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.copy_(values(i))
        layer.attention.k_proj = new


def _official_key_bias(hf: nn.Module, variant: str, official: Mapping[str, torch.Tensor]) -> None:
    prefix = _vit_prefix(variant)
    _set_key_bias(hf, variant, lambda i: official[f"{prefix}.blocks.{i}.attn.qkv.bias"].chunk(3)[1])


def _masked_key_bias(hf: nn.Module, variant: str, official: Mapping[str, torch.Tensor]) -> None:
    _set_key_bias(hf, variant, lambda i: torch.zeros(get_variant(variant).backbone.embed_dim))


def _silu_swiglu(hf: nn.Module, variant: str, official: Mapping[str, torch.Tensor]) -> None:
    for layer in _vit_layers(hf):
        layer.mlp.act_fn = nn.SiLU()


def _vit_tiny_eps(hf: nn.Module, variant: str, official: Mapping[str, torch.Tensor]) -> None:
    for layer in _vit_layers(hf):
        layer.norm1.eps = layer.norm2.eps = 1e-6


DIFFERENCES: tuple[Difference, ...] = (
    Difference(1, "the converter inserts an enc_output Linear + LayerNorm before query selection", ALL,
               _drop_enc_output),
    Difference(2, "enc_bbox_head, pre_bbox_head, the box heads and the LQE MLP use ReLU (official: SiLU)", ALL,
               _silu_heads),
    Difference(3, "the query position embedding is recomputed in every decoder layer (official: once)", ALL,
               _query_pos_once),
    Difference(4, "with eval_size set, AIFI drops its 2-D position embedding in eval mode", ("n", "s", "m", "l", "x"),
               _aifi_position),
    Difference(5, "the ViT-Tiny backbone applies a final LayerNorm to its last returned layer", ("s", "m"),
               _no_vit_tiny_final_norm),
    Difference(6, "the converter drops the key third of every ViT-Tiny qkv.bias", ("s", "m"), _official_key_bias),
    Difference(7, "the DINOv3 key bias is used (official: masked to zero)", ("l", "x"), _masked_key_bias),
    Difference(8, "the x SwiGLU uses GELU (official: SiLU)", ("x",), _silu_swiglu),
    Difference(9, "ViT-Tiny LayerNorm eps 1e-5 (official: 1e-6)", ("s", "m"), _vit_tiny_eps),
)


def differences_for(variant: str) -> tuple[Difference, ...]:
    """The differences that concern `variant`."""
    name = get_variant(variant).name
    return tuple(d for d in DIFFERENCES if name in d.sizes)


def switch_off(hf_model: nn.Module, variant: str, official_state: Mapping[str, torch.Tensor],
               numbers: tuple[int, ...] | None = None) -> nn.Module:
    """Put the official behaviour into `hf_model` (in place) for the differences `numbers` (default: all of
    `variant`'s); `official_state` gives what the format lost (item 6). Returns the model."""
    if not hasattr(getattr(hf_model, "model", None), "enc_output"):
        raise ValueError(f"switch_off needs transformers' Deimv2ForObjectDetection, got {type(hf_model).__name__}")
    for difference in differences_for(variant):
        if numbers is None or difference.number in numbers:
            difference.switch(hf_model, variant, official_state)
    return hf_model
