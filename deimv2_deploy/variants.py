"""Facts about the eight DEIMv2 sizes that the inference path needs, without torch.

The PyTorch architecture settings live in `deimv2_deploy.models.zoo`; this table holds what a runtime
must know to feed an artifact (input size, normalisation), where the official checkpoint is named, and
the published figures (official README, COCO val2017; latency is TensorRT FP16 on a T4).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["VariantInfo", "VARIANTS_INFO", "VARIANT_NAMES", "IMAGENET_MEAN", "IMAGENET_STD", "get_variant_info"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class VariantInfo:
    name: str
    family: str  # "hgnetv2" or "dinov3"
    input_size: tuple[int, int]  # (height, width) the model was trained and evaluated at
    mean: tuple[float, float, float] | None  # RGB, on [0, 1] pixels; None: no normalisation
    std: tuple[float, float, float] | None
    num_queries: int
    checkpoint_name: str  # official file name in the model store
    hf_repo: str  # official Hugging Face copy (a folder with config.json + model.safetensors)
    published_ap: float  # COCO val2017 AP
    published_params_m: float  # deploy-mode parameters, millions
    published_gflops: float
    published_t4_latency_ms: float  # TensorRT FP16, T4

    @property
    def normalize(self) -> bool:
        return self.mean is not None


def _hgnet(name, size, queries, ap, params, gflops, latency):
    return VariantInfo(name, "hgnetv2", (size, size), None, None, queries, f"deimv2_hgnetv2_{name}_coco.pth",
                       f"Intellindust/DEIMv2_HGNetv2_{name.upper()}_COCO", ap, params, gflops, latency)


def _dinov3(name, ap, params, gflops, latency):
    return VariantInfo(name, "dinov3", (640, 640), IMAGENET_MEAN, IMAGENET_STD, 300, f"deimv2_dinov3_{name}_coco.pth",
                       f"Intellindust/DEIMv2_DINOv3_{name.upper()}_COCO", ap, params, gflops, latency)


VARIANTS_INFO: dict[str, VariantInfo] = {
    v.name: v
    for v in (
        _hgnet("atto", 320, 100, 23.8, 0.5, 0.8, 1.10),
        _hgnet("femto", 416, 150, 31.0, 1.0, 1.7, 1.45),
        _hgnet("pico", 640, 200, 38.5, 1.5, 5.2, 2.13),
        _hgnet("n", 640, 300, 43.0, 3.6, 6.8, 2.32),
        _dinov3("s", 50.9, 9.7, 25.6, 5.78),
        _dinov3("m", 53.0, 18.1, 52.2, 8.80),
        _dinov3("l", 56.0, 32.2, 96.7, 10.47),
        _dinov3("x", 57.8, 50.3, 151.6, 13.75),
    )
}
VARIANT_NAMES: tuple[str, ...] = tuple(VARIANTS_INFO)


def get_variant_info(name: str) -> VariantInfo:
    """The facts of one size; `name` is one of atto femto pico n s m l x (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in VARIANTS_INFO:
        raise ValueError(f"unknown DEIMv2 size {name!r}: choose one of {', '.join(VARIANT_NAMES)}")
    return VARIANTS_INFO[key]
