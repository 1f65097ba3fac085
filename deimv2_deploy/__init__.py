"""deimv2-deploy: edge deployment toolkit for the DEIMv2 real-time object detectors.

The inference path (this package's top level, `runtimes`, preprocessing, video, C ABI) imports no torch;
`deimv2_deploy.models` and `deimv2_deploy.exporters` need the `export` extra (torch, onnx).
"""
__version__ = "0.1.0"

from deimv2_deploy.detections import Detections
from deimv2_deploy.drawing import annotate
from deimv2_deploy.spec import ArtifactSpec
from deimv2_deploy.variants import VARIANT_NAMES, VariantInfo, get_variant_info

__all__ = ["__version__", "Detections", "annotate", "ArtifactSpec", "VARIANT_NAMES", "VariantInfo", "get_variant_info"]
