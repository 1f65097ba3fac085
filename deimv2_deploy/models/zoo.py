"""The eight DEIMv2 sizes as one table of frozen configs, and `build_model`.

Architecture settings are those of the official configs (`configs/base/deimv2.yml` overridden by
`configs/deimv2/deimv2_{hgnetv2_atto,femto,pico,n; dinov3_s,m,l,x}_coco.yml`), which the official
checkpoints were trained with. Input size, normalisation, checkpoint names and published figures come
from `deimv2_deploy.variants` (the torch-free facts the runtimes use), so they are stated once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from deimv2_deploy.variants import VARIANT_NAMES, get_variant_info

from .decoder import DEIMDecoder
from .detector import DEIMv2
from .hgnetv2 import HGNetv2
from .hybrid_encoder import HybridEncoder
from .lite_encoder import LiteEncoder
from .sta import ViTSTABackbone, ViTSTAConfig

__all__ = [
    "HGNetv2Settings",
    "LiteEncoderSettings",
    "HybridEncoderSettings",
    "DecoderSettings",
    "ModelConfig",
    "VARIANTS",
    "VARIANT_NAMES",
    "get_variant",
    "build_model",
]


# ---------------------------------------------------------------------------------------------------------
# Settings of each component
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HGNetv2Settings:
    """HGNetv2 backbone of atto, femto, pico and n."""

    arch: Literal["Atto", "Femto", "Pico", "B0"]
    return_idx: tuple[int, ...]  # stages whose maps go to the encoder (stage i has stride 4 * 2**i)
    use_lab: bool = True  # learnable affine after each activation
    act: str = "relu"


@dataclass(frozen=True)
class LiteEncoderSettings:
    """The attention-free two-scale encoder of atto, femto and pico."""

    in_channels: tuple[int, ...]
    feat_strides: tuple[int, ...]
    hidden_dim: int
    expansion: float
    depth_mult: float
    act: str = "silu"


@dataclass(frozen=True)
class HybridEncoderSettings:
    """Transformer layer on the coarsest map + FPN/PAN: the encoder of n ('dfine' form) and s..x ('deim')."""

    in_channels: tuple[int, ...]
    feat_strides: tuple[int, ...]
    hidden_dim: int
    dim_feedforward: int
    expansion: float
    depth_mult: float
    version: Literal["dfine", "deim"]
    use_encoder_idx: tuple[int, ...]
    nhead: int = 8
    num_encoder_layers: int = 1
    enc_act: str = "gelu"
    act: str = "silu"
    fuse_op: Literal["sum", "cat"] = "sum"


@dataclass(frozen=True)
class DecoderSettings:
    """DEIM decoder; `num_points` are the sampling points per level of the deformable cross-attention."""

    hidden_dim: int
    feat_channels: tuple[int, ...]
    feat_strides: tuple[int, ...]
    num_points: tuple[int, ...]
    num_layers: int
    dim_feedforward: int
    use_gateway: bool = True
    share_bbox_head: bool = False
    eval_idx: int = -1
    num_heads: int = 8
    reg_max: int = 32
    reg_scale: int = 4
    num_denoising: int = 100
    mlp_act: str = "silu"
    lqe_act: str = "silu"


@dataclass(frozen=True)
class ModelConfig:
    """One DEIMv2 size: everything needed to build it, feed it and compare it with the published figures."""

    name: str
    input_size: tuple[int, int]  # (height, width) of training and evaluation; anchors are built for it
    mean: tuple[float, float, float] | None  # RGB on [0, 1]; None: the model takes plain [0, 1] RGB
    std: tuple[float, float, float] | None
    num_queries: int
    backbone: HGNetv2Settings | ViTSTAConfig
    encoder: LiteEncoderSettings | HybridEncoderSettings
    decoder: DecoderSettings
    checkpoint_name: str  # official file name, e.g. deimv2_hgnetv2_atto_coco.pth
    published_ap: float  # COCO val2017 AP (official README)
    published_params_m: float  # deploy-mode parameters, millions
    published_gflops: float
    published_t4_latency_ms: float  # TensorRT FP16 on a T4

    @property
    def normalize(self) -> bool:
        return self.mean is not None


def _config(
    name: str,
    backbone: HGNetv2Settings | ViTSTAConfig,
    encoder: LiteEncoderSettings | HybridEncoderSettings,
    decoder: DecoderSettings,
) -> ModelConfig:
    info = get_variant_info(name)
    shared = {field: getattr(info, field) for field in _FROM_VARIANT_INFO}  # one source for these facts
    return ModelConfig(name=name, backbone=backbone, encoder=encoder, decoder=decoder, **shared)


# ModelConfig fields taken as they are from variants.VariantInfo
_FROM_VARIANT_INFO = ("input_size", "mean", "std", "num_queries", "checkpoint_name", "published_ap",
                      "published_params_m", "published_gflops", "published_t4_latency_ms")


def _lite_decoder(hidden: int, dim_feedforward: int) -> DecoderSettings:
    """atto/femto/pico: two levels, 4 + 2 points, one bbox head shared by all layers, no gateway."""
    return DecoderSettings(
        hidden_dim=hidden, feat_channels=(hidden, hidden), feat_strides=(16, 32), num_points=(4, 2),
        num_layers=3, dim_feedforward=dim_feedforward, use_gateway=False, share_bbox_head=True,
    )


def _vit_encoder(width: int, dim_feedforward: int, expansion: float, depth_mult: float) -> HybridEncoderSettings:
    return HybridEncoderSettings(
        in_channels=(width,) * 3, feat_strides=(8, 16, 32), hidden_dim=width, dim_feedforward=dim_feedforward,
        expansion=expansion, depth_mult=depth_mult, version="deim", use_encoder_idx=(2,),
    )


def _vit_decoder(width: int, num_layers: int, dim_feedforward: int) -> DecoderSettings:
    return DecoderSettings(
        hidden_dim=width, feat_channels=(width,) * 3, feat_strides=(8, 16, 32), num_points=(3, 6, 3),
        num_layers=num_layers, dim_feedforward=dim_feedforward,
    )


# ---------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------

VARIANTS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        _config(
            "atto",
            backbone=HGNetv2Settings(arch="Atto", return_idx=(2,)),
            encoder=LiteEncoderSettings(in_channels=(256,), feat_strides=(16,), hidden_dim=64,
                                        expansion=0.34, depth_mult=0.5),
            decoder=_lite_decoder(hidden=64, dim_feedforward=160),
        ),
        _config(
            "femto",
            backbone=HGNetv2Settings(arch="Femto", return_idx=(2,)),
            encoder=LiteEncoderSettings(in_channels=(512,), feat_strides=(16,), hidden_dim=96,
                                        expansion=0.34, depth_mult=0.5),
            decoder=_lite_decoder(hidden=96, dim_feedforward=256),
        ),
        _config(
            "pico",
            backbone=HGNetv2Settings(arch="Pico", return_idx=(2,)),
            encoder=LiteEncoderSettings(in_channels=(512,), feat_strides=(16,), hidden_dim=112,
                                        expansion=0.34, depth_mult=0.5),
            decoder=_lite_decoder(hidden=112, dim_feedforward=320),
        ),
        _config(
            "n",
            backbone=HGNetv2Settings(arch="B0", return_idx=(2, 3)),
            encoder=HybridEncoderSettings(in_channels=(512, 1024), feat_strides=(16, 32), hidden_dim=128,
                                          dim_feedforward=512, expansion=0.34, depth_mult=0.5, version="dfine",
                                          use_encoder_idx=(1,)),
            decoder=DecoderSettings(hidden_dim=128, feat_channels=(128, 128), feat_strides=(16, 32),
                                    num_points=(6, 6), num_layers=3, dim_feedforward=512),
        ),
        _config(
            "s",
            backbone=ViTSTAConfig(vit="vit_tiny", embed_dim=192, num_heads=3, ffn="mlp", ffn_ratio=4.0,
                                  return_layers=(3, 7, 11), sta_channels=16, hidden_dim=192),
            encoder=_vit_encoder(192, dim_feedforward=512, expansion=0.34, depth_mult=0.67),
            decoder=_vit_decoder(192, num_layers=4, dim_feedforward=512),
        ),
        _config(
            "m",
            backbone=ViTSTAConfig(vit="vit_tiny", embed_dim=256, num_heads=4, ffn="mlp", ffn_ratio=4.0,
                                  return_layers=(3, 7, 11), sta_channels=16, hidden_dim=256),
            encoder=_vit_encoder(256, dim_feedforward=512, expansion=0.67, depth_mult=1.0),
            decoder=_vit_decoder(256, num_layers=4, dim_feedforward=512),
        ),
        _config(
            "l",  # DINOv3 ViT-S/16
            backbone=ViTSTAConfig(vit="dinov3", embed_dim=384, num_heads=6, ffn="mlp", ffn_ratio=4.0,
                                  return_layers=(5, 8, 11), sta_channels=32, hidden_dim=224),
            encoder=_vit_encoder(224, dim_feedforward=896, expansion=1.0, depth_mult=1.0),
            decoder=_vit_decoder(224, num_layers=4, dim_feedforward=1792),
        ),
        _config(
            "x",  # DINOv3 ViT-S+/16
            backbone=ViTSTAConfig(vit="dinov3", embed_dim=384, num_heads=6, ffn="swiglu", ffn_ratio=6.0,
                                  return_layers=(5, 8, 11), sta_channels=64, hidden_dim=256),
            encoder=_vit_encoder(256, dim_feedforward=1024, expansion=1.25, depth_mult=1.37),
            decoder=_vit_decoder(256, num_layers=6, dim_feedforward=2048),
        ),
    )
}


def get_variant(name: str) -> ModelConfig:
    """The config of one size; `name` is one of atto femto pico n s m l x (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in VARIANTS:
        raise ValueError(f"unknown DEIMv2 size {name!r}: choose one of {', '.join(VARIANT_NAMES)}")
    return VARIANTS[key]


# ---------------------------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------------------------


def _build_backbone(cfg: ModelConfig) -> nn.Module:
    b = cfg.backbone
    if isinstance(b, HGNetv2Settings):
        return HGNetv2(b.arch, list(b.return_idx), use_lab=b.use_lab, act=b.act)
    return ViTSTABackbone(b)


def _build_encoder(cfg: ModelConfig) -> nn.Module:
    e = cfg.encoder
    if isinstance(e, LiteEncoderSettings):
        return LiteEncoder(list(e.in_channels), list(e.feat_strides), e.hidden_dim,
                           expansion=e.expansion, depth_mult=e.depth_mult, act=e.act)
    return HybridEncoder(
        list(e.in_channels), list(e.feat_strides), hidden_dim=e.hidden_dim, nhead=e.nhead,
        dim_feedforward=e.dim_feedforward, enc_act=e.enc_act, use_encoder_idx=list(e.use_encoder_idx),
        num_encoder_layers=e.num_encoder_layers, expansion=e.expansion, depth_mult=e.depth_mult,
        act=e.act, version=e.version, fuse_op=e.fuse_op,
    )


def _build_decoder(cfg: ModelConfig, num_classes: int) -> DEIMDecoder:
    d = cfg.decoder
    return DEIMDecoder(
        num_classes=num_classes, hidden_dim=d.hidden_dim, num_queries=cfg.num_queries,
        feat_channels=list(d.feat_channels), feat_strides=list(d.feat_strides), eval_size=cfg.input_size,
        num_points=list(d.num_points), num_layers=d.num_layers, dim_feedforward=d.dim_feedforward,
        num_heads=d.num_heads, eval_idx=d.eval_idx, reg_max=d.reg_max, reg_scale=d.reg_scale,
        use_gateway=d.use_gateway, share_bbox_head=d.share_bbox_head, num_denoising=d.num_denoising,
        mlp_act=d.mlp_act, lqe_act=d.lqe_act,
    )


def build_model(name: str, num_classes: int = 80) -> DEIMv2:
    """DEIMv2 of size `name` in train format (load a checkpoint, then `.deploy()`), randomly initialised."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    cfg = get_variant(name)
    return DEIMv2(_build_backbone(cfg), _build_encoder(cfg), _build_decoder(cfg, num_classes))
