"""Hugging Face transformers' DEIMv2 format (`Deimv2ForObjectDetection`) <-> the official state dict.

transformers (>= 5.24) names every DEIMv2 tensor its own way and its converter changes a few of them on the
way: the fused attention projections (`in_proj_weight`, ViT `qkv`) are split into q/k/v, the decoder's fused
SwiGLU `w12` into gate/up, the heads are renamed (`dec_score_head` -> `class_embed`, ...) and listed twice
(under `model.decoder.` and at the top level), BatchNorm counters of the frozen HGNetv2 backbone and the
constructor constants (anchors, RoPE periods, the DINOv3 k-bias mask) are left out, and some tensors are
added that the official model does not have (`enc_output`, and for the ViT-Tiny sizes s/m a final LayerNorm
and LayerScales), holding values that make them as neutral as they can be ("converter values").

Everything here is pure (tensors in, tensors out, no I/O, no transformers import):
- `official_to_transformers(state, variant)`: the folder transformers' converter would make of an official
  state dict (all keys `Deimv2ForObjectDetection` has, none it lacks);
- `transformers_to_official(state, variant, template)`: the official state dict back, re-fusing q/k/v and
  gate/up, restoring the constants from `template` (the state dict of `build_model(variant)`), and saying
  which transformers-only tensors hold values the official graph cannot represent (fine-tuned inside
  transformers) and what the format could not carry (the ViT-Tiny key bias, item 6 of docs/transformers.md);
- `transformers_config(variant, ...)`, `preprocessor_config(variant)`: `config.json` and
  `preprocessor_config.json` of a size; `variant_from_transformers_config(config)`: the size a config.json
  describes (or a clear error for another model type).
"""
from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deimv2_deploy.classes import COCO_CLASSES
from deimv2_deploy.models.hgnetv2 import HGNETV2_ARCHS
from deimv2_deploy.models.sta import ViTSTAConfig
from deimv2_deploy.models.zoo import HGNetv2Settings, HybridEncoderSettings, ModelConfig, get_variant

__all__ = [
    "TRANSFORMERS_MODEL_TYPE",
    "TransformersFormatError",
    "HFConversion",
    "is_transformers_state_dict",
    "official_to_transformers",
    "to_saved_layout",
    "to_memory_layout",
    "transformers_to_official",
    "transformers_only_defaults",
    "transformers_config",
    "preprocessor_config",
    "variant_from_transformers_config",
    "class_names_from_config",
]

TRANSFORMERS_MODEL_TYPE = "deimv2"
# model types a user may confuse with DEIMv2 (same family of detectors, other architectures)
_RELATED_MODEL_TYPES = {"d_fine": "D-FINE", "rt_detr": "RT-DETR", "rt_detr_v2": "RT-DETRv2",
                        "deformable_detr": "Deformable DETR", "detr": "DETR", "conditional_detr": "Conditional DETR",
                        "dab_detr": "DAB-DETR", "deta": "DETA", "lw_detr": "LW-DETR"}
_CONVERTER_ATOL = 1e-6  # transformers-only tensors within this of the converter's values count as untouched


class TransformersFormatError(ValueError):
    """A transformers-format folder or state dict that is not a DEIMv2 of ours; the message says what to do."""


# ------------------------------------------------------------------------------------------- rename rules
# A rule pairs an official key template with a transformers one. `{name}` matches one dotted segment,
# `{name+}` one or more; the same placeholders appear on both sides, so each rule works in both directions.
# Rules are tried in order and the first match wins: specific rules come before general ones.


@functools.cache
def _compile(template: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in re.finditer(r"\{(\w+)(\+?)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>.+)" if m.group(2) else f"(?P<{m.group(1)}>[^.]+)")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


def _fill(template: str, groups: Mapping[str, str]) -> str:
    return re.sub(r"\{(\w+)\+?\}", lambda m: groups[m.group(1)], template)


@dataclass(frozen=True)
class _Rule:
    official: str
    hf: tuple[str, ...]  # one name, or the parts a fused official tensor is split into (along dim 0)
    optional: tuple[bool, ...] = ()  # parts transformers may leave out (the ViT-Tiny key bias)

    def match(self, key: str, side: str) -> tuple[int, dict[str, str]] | None:
        """(index of the matched template, placeholders) when `key` fits this rule on `side`."""
        templates = (self.official,) if side == "official" else self.hf
        for i, t in enumerate(templates):
            m = _compile(t).match(key)
            if m:
                return i, m.groupdict()
        return None


def _r(official: str, hf: str) -> _Rule:
    return _Rule(official, (hf,))


def _elan(official: str, hf: str) -> list[_Rule]:
    """RepNCSPELAN block: cv1/cv4 are conv1/conv2; branch cv2/cv3 = CSP layer `.0` + optional trailing conv `.1`."""
    return [
        _r(f"{official}.cv1.{{t+}}", f"{hf}.conv1.{{t+}}"),
        _r(f"{official}.cv4.{{t+}}", f"{hf}.conv2.{{t+}}"),
        _r(f"{official}.cv2.1.{{t+}}", f"{hf}.csp_rep1.conv2.{{t+}}"),
        _r(f"{official}.cv3.1.{{t+}}", f"{hf}.csp_rep2.conv2.{{t+}}"),
        _r(f"{official}.cv2.0.{{t+}}", f"{hf}.csp_rep1.{{t+}}"),
        _r(f"{official}.cv3.0.{{t+}}", f"{hf}.csp_rep2.{{t+}}"),
    ]


def _qkv(official: str, hf_prefix: str, leaf: str, optional_k: bool = False) -> _Rule:
    parts = tuple(f"{hf_prefix}.{p}_proj.{leaf}" for p in ("q", "k", "v"))
    return _Rule(official, parts, (False, optional_k, False))


_HGNET = [
    _r("backbone.stem.{p+}.conv.weight", "model.conv_encoder.model.embedder.{p+}.convolution.weight"),
    _r("backbone.stem.{p+}.bn.{leaf}", "model.conv_encoder.model.embedder.{p+}.normalization.{leaf}"),
    _r("backbone.stem.{p+}.lab.{leaf}", "model.conv_encoder.model.embedder.{p+}.lab.{leaf}"),
    _r("backbone.stages.{p+}.conv.weight", "model.conv_encoder.model.encoder.stages.{p+}.convolution.weight"),
    _r("backbone.stages.{p+}.bn.{leaf}", "model.conv_encoder.model.encoder.stages.{p+}.normalization.{leaf}"),
    _r("backbone.stages.{p+}.lab.{leaf}", "model.conv_encoder.model.encoder.stages.{p+}.lab.{leaf}"),
]

_LITE_ENCODER = [
    _r("encoder.input_proj.{i}.{t+}", "model.encoder.input_proj.{i}.{t+}"),
    _r("encoder.down_sample{n}.1.weight", "model.encoder.down_conv{n}.conv.weight"),
    _r("encoder.down_sample{n}.2.{leaf}", "model.encoder.down_conv{n}.norm.{leaf}"),
    _r("encoder.bi_fusion.cv.{t+}", "model.encoder.bi_fusion_conv.{t+}"),
    *_elan("encoder.fpn_block", "model.encoder.fpn_block"),
    *_elan("encoder.pan_block", "model.encoder.pan_block"),
]

_HYBRID_ENCODER = [
    _r("encoder.input_proj.{i}.{t+}", "model.conv_encoder.encoder_input_proj.{i}.{t+}"),
    _qkv("encoder.encoder.{i}.layers.{j}.self_attn.in_proj_weight", "model.encoder.aifi.{i}.layers.{j}.self_attn",
         "weight"),
    _qkv("encoder.encoder.{i}.layers.{j}.self_attn.in_proj_bias", "model.encoder.aifi.{i}.layers.{j}.self_attn",
         "bias"),
    _r("encoder.encoder.{i}.layers.{j}.self_attn.out_proj.{leaf}",
       "model.encoder.aifi.{i}.layers.{j}.self_attn.o_proj.{leaf}"),
    _r("encoder.encoder.{i}.layers.{j}.linear1.{leaf}", "model.encoder.aifi.{i}.layers.{j}.mlp.layers.0.{leaf}"),
    _r("encoder.encoder.{i}.layers.{j}.linear2.{leaf}", "model.encoder.aifi.{i}.layers.{j}.mlp.layers.1.{leaf}"),
    _r("encoder.encoder.{i}.layers.{j}.norm1.{leaf}", "model.encoder.aifi.{i}.layers.{j}.self_attn_layer_norm.{leaf}"),
    _r("encoder.encoder.{i}.layers.{j}.norm2.{leaf}", "model.encoder.aifi.{i}.layers.{j}.final_layer_norm.{leaf}"),
    _r("encoder.lateral_convs.{i}.{t+}", "model.encoder.lateral_convs.{i}.{t+}"),
    _r("encoder.downsample_convs.{i}.0.cv{n}.{t+}", "model.encoder.downsample_convs.{i}.conv{n}.{t+}"),
    *_elan("encoder.fpn_blocks.{i}", "model.encoder.fpn_blocks.{i}"),
    *_elan("encoder.pan_blocks.{i}", "model.encoder.pan_blocks.{i}"),
]

_DL, _HL = "decoder.decoder.layers.{i}", "model.decoder.layers.{i}"
_DECODER = [
    _qkv(f"{_DL}.self_attn.in_proj_weight", f"{_HL}.self_attn", "weight"),
    _qkv(f"{_DL}.self_attn.in_proj_bias", f"{_HL}.self_attn", "bias"),
    _r(f"{_DL}.self_attn.out_proj.{{leaf}}", f"{_HL}.self_attn.o_proj.{{leaf}}"),
    _r(f"{_DL}.cross_attn.{{t+}}", f"{_HL}.encoder_attn.{{t+}}"),
    _r(f"{_DL}.norm1.scale", f"{_HL}.self_attn_layer_norm.weight"),
    _r(f"{_DL}.norm2.scale", f"{_HL}.encoder_attn_layer_norm.weight"),
    _r(f"{_DL}.norm3.scale", f"{_HL}.final_layer_norm.weight"),
    _Rule(f"{_DL}.swish_ffn.w12.{{leaf}}", (f"{_HL}.mlp.gate_proj.{{leaf}}", f"{_HL}.mlp.up_proj.{{leaf}}")),
    _r(f"{_DL}.swish_ffn.w3.{{leaf}}", f"{_HL}.mlp.down_proj.{{leaf}}"),
    _r(f"{_DL}.gateway.gate.{{leaf}}", f"{_HL}.gateway.gate.{{leaf}}"),
    _r(f"{_DL}.gateway.norm.scale", f"{_HL}.gateway.norm.weight"),
    _r("decoder.decoder.lqe_layers.{t+}", "model.decoder.lqe_layers.{t+}"),
    _r("decoder.decoder.up", "model.decoder.up"),
    _r("decoder.decoder.reg_scale", "model.decoder.reg_scale"),
    _r("decoder.dec_score_head.{t+}", "model.decoder.class_embed.{t+}"),
    _r("decoder.dec_bbox_head.{t+}", "model.decoder.bbox_embed.{t+}"),
    _r("decoder.pre_bbox_head.{t+}", "model.decoder.pre_bbox_head.{t+}"),
    _r("decoder.query_pos_head.{t+}", "model.decoder.query_pos_head.{t+}"),
    _r("decoder.enc_score_head.{t+}", "model.enc_score_head.{t+}"),
    _r("decoder.enc_bbox_head.{t+}", "model.enc_bbox_head.{t+}"),
    _r("decoder.denoising_class_embed.weight", "model.denoising_class_embed.weight"),
    _r("decoder.input_proj.{i}.{t+}", "model.decoder_input_proj.{i}.{t+}"),
]

_HB = "model.conv_encoder.backbone"
_STA = [
    _r("backbone.sta.stem.0.weight", "model.conv_encoder.spatial_tuning_adapter.stem_conv.conv.weight"),
    _r("backbone.sta.stem.1.{leaf}", "model.conv_encoder.spatial_tuning_adapter.stem_conv.norm.{leaf}"),
    _r("backbone.sta.conv2.0.weight", "model.conv_encoder.spatial_tuning_adapter.conv2.conv.weight"),
    _r("backbone.sta.conv2.1.{leaf}", "model.conv_encoder.spatial_tuning_adapter.conv2.norm.{leaf}"),
    _r("backbone.sta.conv{n}.1.weight", "model.conv_encoder.spatial_tuning_adapter.conv{n}.conv.weight"),
    _r("backbone.sta.conv{n}.2.{leaf}", "model.conv_encoder.spatial_tuning_adapter.conv{n}.norm.{leaf}"),
    _r("backbone.convs.{i}.weight", "model.conv_encoder.fusion_proj.{i}.conv.weight"),
    _r("backbone.norms.{i}.{leaf}", "model.conv_encoder.fusion_proj.{i}.norm.{leaf}"),
]


def _vit_rules(prefix: str, key_bias_in_format: bool, swiglu: bool) -> list[_Rule]:
    """`prefix`: `backbone.dinov3._model` (ViT-Tiny, s/m) or `backbone.dinov3` (DINOv3, l/x)."""
    b, hb = f"{prefix}.blocks.{{i}}", f"{_HB}.model.layer.{{i}}"
    if swiglu:  # w3(silu(w1 x) * w2 x) = down(act(gate x) * up x)
        ffn = [_r(f"{b}.mlp.w1.{{leaf}}", f"{hb}.mlp.gate_proj.{{leaf}}"),
               _r(f"{b}.mlp.w2.{{leaf}}", f"{hb}.mlp.up_proj.{{leaf}}"),
               _r(f"{b}.mlp.w3.{{leaf}}", f"{hb}.mlp.down_proj.{{leaf}}")]
    else:
        ffn = [_r(f"{b}.mlp.fc1.{{leaf}}", f"{hb}.mlp.up_proj.{{leaf}}"),
               _r(f"{b}.mlp.fc2.{{leaf}}", f"{hb}.mlp.down_proj.{{leaf}}")]
    return [
        _r(f"{prefix}.patch_embed.proj.{{leaf}}", f"{_HB}.embeddings.patch_embeddings.{{leaf}}"),
        _r(f"{prefix}.cls_token", f"{_HB}.embeddings.cls_token"),
        _r(f"{prefix}.storage_tokens", f"{_HB}.embeddings.register_tokens"),
        _r(f"{prefix}.mask_token", f"{_HB}.embeddings.mask_token"),
        _r(f"{b}.norm1.{{leaf}}", f"{hb}.norm1.{{leaf}}"),
        _r(f"{b}.norm2.{{leaf}}", f"{hb}.norm2.{{leaf}}"),
        _qkv(f"{b}.attn.qkv.weight", f"{hb}.attention", "weight"),
        _qkv(f"{b}.attn.qkv.bias", f"{hb}.attention", "bias", optional_k=not key_bias_in_format),
        _r(f"{b}.attn.proj.{{leaf}}", f"{hb}.attention.o_proj.{{leaf}}"),
        *ffn,
        _r(f"{b}.ls1.gamma", f"{hb}.layer_scale1.lambda1"),
        _r(f"{b}.ls2.gamma", f"{hb}.layer_scale2.lambda1"),
        _r(f"{prefix}.norm.{{leaf}}", f"{_HB}.norm.{{leaf}}"),
        *_STA,
    ]


# Official tensors transformers does not store: constructor constants (restored from the template) and the
# BatchNorm counters of the HGNetv2 backbone, whose BatchNorms transformers freezes.
_CONSTANT_PATTERNS = [re.compile(p) for p in (
    r"^decoder\.(anchors|valid_mask|up|reg_scale)$",
    r"\.rope_embed\.periods$",
    r"\.attn\.qkv\.bias_mask$",
)]
_HGNET_DROPPED = re.compile(r"^backbone\.(stem|stages)\..*\.num_batches_tracked$")
# The heads are listed twice in transformers: `model.decoder.X.N` (used) and `X.N` (tied to it).
_MIRRORS = (("model.decoder.class_embed.", "class_embed."), ("model.decoder.bbox_embed.", "bbox_embed."))
# On disk transformers names the DINOv3 layers without the inner `model.` (its dinov3_vit checkpoint mapping).
_SAVED_RENAMES = (("model.conv_encoder.backbone.model.layer.", "model.conv_encoder.backbone.layer."),)


def _is_vit(cfg: ModelConfig) -> bool:
    return isinstance(cfg.backbone, ViTSTAConfig)


def _is_vit_tiny(cfg: ModelConfig) -> bool:
    return _is_vit(cfg) and cfg.backbone.vit == "vit_tiny"


def _rules(cfg: ModelConfig) -> list[_Rule]:
    if _is_vit(cfg):
        prefix = "backbone.dinov3._model" if _is_vit_tiny(cfg) else "backbone.dinov3"
        backbone = _vit_rules(prefix, key_bias_in_format=not _is_vit_tiny(cfg), swiglu=cfg.backbone.ffn == "swiglu")
    else:
        backbone = _HGNET
    encoder = _HYBRID_ENCODER if isinstance(cfg.encoder, HybridEncoderSettings) else _LITE_ENCODER
    return [*backbone, *encoder, *_DECODER]


def _dropped(cfg: ModelConfig, key: str) -> bool:
    if any(p.search(key) for p in _CONSTANT_PATTERNS):
        return True
    return not _is_vit(cfg) and bool(_HGNET_DROPPED.match(key))


# --------------------------------------------------------------------------- transformers-only tensors


def transformers_only_defaults(variant: str) -> dict[str, torch.Tensor]:
    """The tensors `Deimv2ForObjectDetection` has and the official model does not, at the converter's values.

    `enc_output` (Linear = identity, LayerNorm weight 1 bias 0) for every size; for s/m (ViT-Tiny) also the
    backbone's final LayerNorm (1, 0), the LayerScales (1) and the unused mask/register tokens.
    """
    cfg = get_variant(variant)
    d = cfg.decoder.hidden_dim
    out = {"model.enc_output.0.weight": torch.eye(d), "model.enc_output.0.bias": torch.zeros(d),
           "model.enc_output.1.weight": torch.ones(d), "model.enc_output.1.bias": torch.zeros(d)}
    if _is_vit_tiny(cfg):
        e = cfg.backbone.embed_dim
        out[f"{_HB}.norm.weight"] = torch.ones(e)
        out[f"{_HB}.norm.bias"] = torch.zeros(e)
        for i in range(cfg.backbone.depth):
            for j in (1, 2):
                out[f"{_HB}.model.layer.{i}.layer_scale{j}.lambda1"] = torch.ones(e)
        out[f"{_HB}.embeddings.mask_token"] = torch.zeros(1, 1, e)
        out[f"{_HB}.embeddings.register_tokens"] = torch.zeros(1, 0, e)
    return out


# tokens that take no part in inference (masked-image training only, or empty): never a reason to refuse
_INERT = re.compile(r"\.embeddings\.(mask_token|register_tokens)$")


# ----------------------------------------------------------------------------------------- conversion


def is_transformers_state_dict(state: Mapping[str, Any]) -> bool:
    """True for transformers' DEIMv2 names (`model.conv_encoder...`, `model.decoder...`)."""
    return any(k.startswith(("model.decoder.", "model.conv_encoder.", "model.encoder.")) for k in state)


def official_to_transformers(state: Mapping[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """The state dict transformers' `Deimv2ForObjectDetection` of `variant` holds for official weights.

    What transformers' converter does, written out: q/k/v and gate/up split, heads renamed and mirrored, the
    converter's values in the transformers-only tensors; constants and backbone BatchNorm counters left out.
    For s/m the key third of every ViT `qkv.bias` is dropped (transformers has no key bias there).
    """
    cfg = get_variant(variant)
    rules = _rules(cfg)
    out: dict[str, torch.Tensor] = {}
    unmatched = []
    for key, tensor in state.items():
        if _dropped(cfg, key):
            continue
        for rule in rules:
            hit = rule.match(key, "official")
            if hit is None:
                continue
            _, groups = hit
            names = [_fill(t, groups) for t in rule.hf]
            parts = tensor.chunk(len(names), dim=0) if len(names) > 1 else (tensor,)
            for i, (name, part) in enumerate(zip(names, parts, strict=True)):
                if rule.optional and rule.optional[i]:
                    continue  # the format has no place for it (ViT-Tiny key bias)
                out[name] = part.clone()
            break
        else:
            unmatched.append(key)
    if unmatched:
        raise TransformersFormatError(f"{len(unmatched)} official keys have no transformers name for DEIMv2-{cfg.name} "
                                      f"(e.g. {', '.join(unmatched[:5])}): is this a DEIMv2-{cfg.name} state dict?")
    _official_layout_fixes(out, cfg, to_hf=True)
    for used, mirror in _MIRRORS:
        for key in [k for k in out if k.startswith(used)]:
            out[mirror + key[len(used):]] = out[key]
    for key, value in transformers_only_defaults(cfg.name).items():
        out.setdefault(key, value)
    return out


def to_saved_layout(state: Mapping[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """The tensors of a transformers state dict as `save_pretrained` names them in `model.safetensors`.

    Tied copies are stored once (the `model.decoder.` heads; for atto/femto/pico the shared box head under
    layer 0: transformers 5.24 writes it under the last layer, and then `from_pretrained` restores only
    layer 0's name correctly and re-initialises the shared head), DINOv3 layers without the inner `model.`.
    """
    cfg = get_variant(variant)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.startswith(tuple(mirror for _, mirror in _MIRRORS)):
            continue
        if (cfg.decoder.share_bbox_head and key.startswith("model.decoder.bbox_embed.")
                and not key.startswith("model.decoder.bbox_embed.0.")):
            continue
        for memory, disk in _SAVED_RENAMES:
            if key.startswith(memory):
                key = disk + key[len(memory):]
        out[key] = tensor.contiguous()
    return out


def _from_saved_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        for memory, disk in _SAVED_RENAMES:
            if key.startswith(disk):
                key = memory + key[len(disk):]
        out[key] = tensor
    return out


def to_memory_layout(state: Mapping[str, torch.Tensor], variant: str) -> dict[str, torch.Tensor]:
    """A saved transformers state dict with every key `Deimv2ForObjectDetection.state_dict()` has: tied copies
    filled in (for atto/femto/pico the shared box head from whichever layer's copy was stored)."""
    cfg = get_variant(variant)
    out = _from_saved_layout(state)
    if cfg.decoder.share_bbox_head:
        prefix = "model.decoder.bbox_embed."
        stored = sorted({k[len(prefix):].split(".", 1)[0] for k in out if k.startswith(prefix)})
        if stored:
            source = stored[0]
            for key in [k for k in out if k.startswith(f"{prefix}{source}.")]:
                leaf = key[len(f"{prefix}{source}."):]
                for i in range(cfg.decoder.num_layers):
                    out.setdefault(f"{prefix}{i}.{leaf}", out[key])
    for used, mirror in _MIRRORS:
        for key in [k for k in out if k.startswith(used)]:
            out.setdefault(mirror + key[len(used):], out[key])
    return out


def _official_layout_fixes(state: dict[str, torch.Tensor], cfg: ModelConfig, to_hf: bool) -> None:
    """Shape and dtype details that differ between the formats, in place."""
    mask = f"{_HB}.embeddings.mask_token" if to_hf else "backbone.dinov3.mask_token"
    if mask in state and not _is_vit_tiny(cfg):  # DINOv3 keeps (1, D); transformers (1, 1, D)
        state[mask] = state[mask].reshape(1, 1, -1) if to_hf else state[mask].reshape(1, -1)
    scale = "model.decoder.reg_scale" if to_hf else "decoder.decoder.reg_scale"
    if scale in state:  # official int64 (the YAML's integer 4), transformers float
        state[scale] = state[scale].float() if to_hf else state[scale].round().long()


@dataclass
class HFConversion:
    """The official state dict made of a transformers one, and what the conversion could not keep."""

    state: dict[str, torch.Tensor]
    # transformers-only tensors whose values the official graph cannot represent: name -> what differs
    trained: dict[str, str] = field(default_factory=dict)
    # what the format could not carry, said once to the user (e.g. the ViT-Tiny key bias)
    notes: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)  # transformers keys no rule knows
    missing: list[str] = field(default_factory=list)  # official keys neither stored nor restorable

    @property
    def representable(self) -> bool:
        """True when the official graph computes what these weights mean (no trained transformers-only tensor)."""
        return not self.trained


def _describe_difference(value: torch.Tensor, default: torch.Tensor) -> str:
    if tuple(value.shape) != tuple(default.shape):
        return f"shape {tuple(value.shape)} instead of {tuple(default.shape)}"
    diff = (value.double() - default.double()).abs().max().item()
    return f"differs from the converter's value by up to {diff:.3g}"


def transformers_to_official(state: Mapping[str, torch.Tensor], variant: str,
                             template: Mapping[str, torch.Tensor]) -> HFConversion:
    """Official names and layout for a transformers DEIMv2 state dict of `variant`.

    `template`: the state dict of `build_model(variant, num_classes)`; the constants transformers does not
    store (anchors, masks, RoPE periods, frozen-BN counters, aliases) are taken from it, and keys the format
    never stored for shared heads (atto/femto/pico keep one box head for all layers) from their partner.
    """
    cfg = get_variant(variant)
    rules = _rules(cfg)
    result = HFConversion(state={})
    defaults = transformers_only_defaults(cfg.name)
    src = _from_saved_layout(state)
    for used, mirror in _MIRRORS:  # prefer the heads the forward uses; the top-level copies are a fallback
        for key in [k for k in src if k.startswith(mirror)]:
            twin = used + key[len(mirror):]
            if twin not in src:
                src[twin] = src[key]
            del src[key]
    pending: dict[str, tuple[_Rule, dict[str, str], dict[int, torch.Tensor]]] = {}  # fused official tensors
    for key, tensor in src.items():
        if key in defaults:
            continue
        for rule in rules:
            hit = rule.match(key, "hf")
            if hit is None:
                continue
            index, groups = hit
            official = _fill(rule.official, groups)
            if len(rule.hf) == 1:
                result.state[official] = tensor
            else:
                pending.setdefault(official, (rule, groups, {}))[2][index] = tensor
            break
        else:
            result.unexpected.append(key)
    for official, (rule, groups, parts) in pending.items():
        filled = []
        for i, name in enumerate(rule.hf):
            if i in parts:
                filled.append(parts[i])
            elif rule.optional and rule.optional[i]:
                filled.append(torch.zeros_like(next(iter(parts.values()))))  # no key bias in the format: zero
            else:
                result.missing.append(_fill(name, groups))
        if len(filled) == len(rule.hf):
            result.state[official] = torch.cat(filled, dim=0)
    if _is_vit_tiny(cfg) and any(k.endswith(".attn.qkv.bias") for k in pending):
        result.notes.append(
            f"DEIMv2-{cfg.name}: the transformers format has no key bias in the ViT-Tiny attention (the converter "
            "drops it), so it is taken as zero; outputs equal the official model's only if the original key "
            "bias was zero")
    _official_layout_fixes(result.state, cfg, to_hf=False)

    # transformers-only tensors: converter values, or trained (then the official graph cannot represent them)
    for key, default in defaults.items():
        if _INERT.search(key):
            continue
        value = src.get(key)
        if value is None:
            continue  # absent: transformers re-initialises it to the converter's value as well
        if tuple(value.shape) != tuple(default.shape) or not torch.allclose(
                value.double(), default.double(), rtol=0.0, atol=_CONVERTER_ATOL):
            result.trained[key] = _describe_difference(value, default)
    _check_shared_heads(result, cfg)

    # constants and stored-once aliases from the template
    for key, value in template.items():
        if key in result.state:
            continue
        if _dropped(cfg, key):
            result.state[key] = value.clone()
        elif key.startswith("decoder.dec_bbox_head.") and cfg.decoder.share_bbox_head:
            continue  # filled from its partner by the loader's alias handling
        else:
            result.missing.append(key)
    return result


def _check_shared_heads(result: HFConversion, cfg: ModelConfig) -> None:
    """atto/femto/pico share one box head. transformers saves it once, under any layer's index (5.24: the
    last); copies that differ from each other cannot be one official head. Keeps one copy, the loader fills
    the other layers' names from it."""
    if not cfg.decoder.share_bbox_head:
        return
    prefix = "decoder.dec_bbox_head."
    by_leaf: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key in sorted(k for k in result.state if k.startswith(prefix)):
        by_leaf.setdefault(key[len(prefix):].split(".", 1)[1], []).append((key, result.state[key]))
    for copies in by_leaf.values():
        (_, first), *others = copies
        for key, value in others:
            if value.shape != first.shape or not torch.allclose(value, first, rtol=0.0, atol=_CONVERTER_ATOL):
                result.trained["model." + key.replace(prefix, "decoder.bbox_embed.")] = (
                    f"differs from {copies[0][0]}: the official model shares one box head across all layers")
            del result.state[key]


# ------------------------------------------------------------------------------------------ config.json


def _hgnet_backbone_config(settings: HGNetv2Settings) -> dict[str, Any]:
    arch = HGNETV2_ARCHS[settings.arch]
    stages = arch.stages
    return {
        "model_type": "hgnet_v2",
        "stem_channels": [arch.stem_in, arch.stem_mid, arch.stem_out],
        "hidden_sizes": [s.out_channels for s in stages],
        "stage_in_channels": [s.in_channels for s in stages],
        "stage_mid_channels": [s.mid_channels for s in stages],
        "stage_out_channels": [s.out_channels for s in stages],
        "stage_num_blocks": [s.num_blocks for s in stages],
        "stage_downsample": [s.downsample for s in stages],
        "stage_light_block": [s.light_block for s in stages],
        "stage_kernel_size": [s.kernel_size for s in stages],
        "stage_numb_of_layers": [s.num_layers for s in stages],
        "depths": [s.num_layers for s in stages],
        "use_learnable_affine_block": settings.use_lab,
        "hidden_act": settings.act,
        "out_indices": [i + 1 for i in settings.return_idx],
    }


def _vit_backbone_config(vit: ViTSTAConfig, official_behaviour: bool) -> dict[str, Any]:
    tiny = vit.vit == "vit_tiny"
    hidden = int(vit.embed_dim * vit.ffn_ratio)
    if vit.ffn == "swiglu":  # DINOv3's rule: 2/3 of the hidden width, rounded up to a multiple of 8
        hidden = int(hidden * 2 / 3)
        hidden += -hidden % 8
    config = {
        "model_type": "dinov3_vit",
        "hidden_size": vit.embed_dim,
        "num_attention_heads": vit.num_heads,
        "num_hidden_layers": vit.depth,
        "intermediate_size": hidden,
        "layerscale_value": 1.0 if tiny else 1e-5,
        "use_gated_mlp": vit.ffn == "swiglu",
        "num_register_tokens": 0 if tiny else 4,
        "pos_embed_rescale": None if tiny else 2.0,
        "key_bias": not tiny,
        "rope_theta": 100.0,
        "out_indices": [i + 1 for i in vit.return_layers],
        "apply_layernorm": not tiny,
        "reshape_hidden_states": True,
    }
    if official_behaviour:  # what the config can say of the official model (items 8, 9 of docs/transformers.md)
        if vit.ffn == "swiglu":
            config["hidden_act"] = "silu"
        if tiny:
            config["layer_norm_eps"] = 1e-6
    return config


def transformers_config(variant: str, class_names: Sequence[str] | None = None, *,
                        official_behaviour: bool = True) -> dict[str, Any]:
    """`config.json` of a transformers DEIMv2 of `variant` (`Deimv2Config` fields; the rest keep defaults).

    `official_behaviour=True` (what `deimv2-export --format hf` writes) sets the three things the config can
    say to make transformers compute closer to the official model: no `eval_size` (keeps the AIFI position
    embedding, item 4), SiLU in the x SwiGLU (item 8), LayerNorm eps 1e-6 for s/m (item 9). False gives what
    transformers' own converter writes.
    """
    cfg = get_variant(variant)
    names = list(class_names) if class_names is not None else list(COCO_CLASSES)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"class names must be non-empty and unique, got {len(names)} names")
    dec, enc = cfg.decoder, cfg.encoder
    hybrid = isinstance(enc, HybridEncoderSettings)
    config: dict[str, Any] = {
        "model_type": TRANSFORMERS_MODEL_TYPE,
        "architectures": ["Deimv2ForObjectDetection"],
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "d_model": dec.hidden_dim,
        "decoder_ffn_dim": dec.dim_feedforward,
        "decoder_layers": dec.num_layers,
        "decoder_attention_heads": dec.num_heads,
        "num_feature_levels": len(dec.feat_strides),
        "decoder_n_points": list(dec.num_points),
        "decoder_in_channels": list(dec.feat_channels),
        "decoder_activation_function": dec.mlp_act,
        "num_queries": cfg.num_queries,
        "num_denoising": dec.num_denoising,
        "max_num_bins": dec.reg_max,
        "reg_scale": float(dec.reg_scale),
        "eval_idx": dec.eval_idx,
        "use_gateway": dec.use_gateway,
        "share_bbox_head": dec.share_bbox_head,
        "encoder_type": "hybrid" if hybrid else "lite",
        "encoder_hidden_dim": enc.hidden_dim,
        "encoder_in_channels": list(enc.in_channels),
        "feat_strides": list(enc.feat_strides),
        "activation_function": enc.act,
        "depth_mult": float(enc.depth_mult),
        "hidden_expansion": float(enc.expansion),
        "encoder_fuse_op": enc.fuse_op if hybrid else "sum",
        "encoder_layers": enc.num_encoder_layers if hybrid else 0,
        "encoder_has_trailing_conv": not _is_vit(cfg),
        "eval_size": None if official_behaviour else list(cfg.input_size),
    }
    if hybrid:
        config.update(encoder_ffn_dim=enc.dim_feedforward, encoder_attention_heads=enc.nhead,
                      encode_proj_layers=list(enc.use_encoder_idx), encoder_activation_function=enc.enc_act)
    if _is_vit(cfg):
        config["backbone_config"] = _vit_backbone_config(cfg.backbone, official_behaviour)
        config["spatial_tuning_adapter_inplanes"] = cfg.backbone.sta_channels
    else:
        config["backbone_config"] = _hgnet_backbone_config(cfg.backbone)
    return config


def preprocessor_config(variant: str) -> dict[str, Any]:
    """`preprocessor_config.json`: transformers' RT-DETR image processor at the size's official input size and
    normalisation (transformers' converter writes 640x640 for every size; atto is 320, femto 416)."""
    cfg = get_variant(variant)
    h, w = cfg.input_size
    out: dict[str, Any] = {
        "image_processor_type": "RTDetrImageProcessor",
        "do_resize": True,
        "size": {"height": h, "width": w},
        "resample": 2,  # bilinear, as the official evaluation resizes
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": cfg.mean is not None,
        "do_pad": False,
        "do_convert_annotations": True,
        "format": "coco_detection",
    }
    if cfg.mean is not None:
        out["image_mean"], out["image_std"] = list(cfg.mean), list(cfg.std)
    return out


def _signature(config: Mapping[str, Any]) -> tuple:
    """What tells the sizes apart in a config.json: backbone shape, widths and depths."""
    bb = config.get("backbone_config") or {}
    kind = bb.get("model_type")
    if kind == "hgnet_v2":
        backbone = (kind, tuple(bb.get("stage_out_channels") or ()), tuple(bb.get("stage_num_blocks") or ()),
                    tuple(bb.get("stage_kernel_size") or ()))
    else:
        backbone = (kind, bb.get("hidden_size"), bb.get("intermediate_size"), bool(bb.get("use_gated_mlp")))
    return (*backbone, config.get("d_model"), config.get("encoder_hidden_dim"), config.get("decoder_layers"))


def variant_from_transformers_config(config: Mapping[str, Any]) -> str:
    """The DEIMv2 size a transformers `config.json` describes; a clear error for other model types."""
    model_type = config.get("model_type")
    if model_type != TRANSFORMERS_MODEL_TYPE:
        other = _RELATED_MODEL_TYPES.get(str(model_type))
        what = f"a {other} model (model_type {model_type!r})" if other else f"model_type {model_type!r}"
        raise TransformersFormatError(f"config.json describes {what}, not DEIMv2 (model_type 'deimv2'): "
                                      "deimv2-deploy reads DEIMv2 checkpoints only")
    wanted = _signature(config)
    from deimv2_deploy.models.zoo import VARIANT_NAMES

    for name in VARIANT_NAMES:
        if _signature(transformers_config(name)) == wanted:
            return name
    raise TransformersFormatError(
        f"config.json describes a DEIMv2 that is none of the eight official sizes (backbone "
        f"{wanted[0]} {wanted[1:-3]}, d_model {wanted[-3]}, encoder width {wanted[-2]}, {wanted[-1]} decoder "
        "layers): pass the size explicitly if the weights are of one")


def class_names_from_config(config: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Class names from `id2label` (keys 0..N-1), or None when the config has none."""
    id2label = config.get("id2label")
    if not id2label:
        return None
    try:
        by_id = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        raise TransformersFormatError(f"config.json id2label has non-integer ids: {list(id2label)[:5]}") from None
    if sorted(by_id) != list(range(len(by_id))):
        raise TransformersFormatError(f"config.json id2label ids must be 0..{len(by_id) - 1}, got "
                                      f"{sorted(by_id)[:5]}...")
    return tuple(by_id[i] for i in range(len(by_id)))
