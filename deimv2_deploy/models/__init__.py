"""The PyTorch reference model of DEIMv2 (needs the `export` extra: torch).

    from deimv2_deploy.models import build_model, postprocess
    model = build_model("pico")              # train format; load an official state dict here
    model.deploy()                           # official deploy form, eval mode
    labels, boxes, scores = postprocess(model(images), orig_target_sizes)
"""
from deimv2_deploy.models.decoder import DEIMDecoder
from deimv2_deploy.models.detector import DEIMv2
from deimv2_deploy.models.postprocess import PostProcessor, postprocess
from deimv2_deploy.models.zoo import VARIANT_NAMES, VARIANTS, ModelConfig, build_model, get_variant

# checkpoint loading exports go here

__all__ = [
    "build_model",
    "postprocess",
    "PostProcessor",
    "DEIMv2",
    "DEIMDecoder",
    "ModelConfig",
    "VARIANTS",
    "VARIANT_NAMES",
    "get_variant",
]
