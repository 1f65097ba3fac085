"""Serving: the Ray Serve application around a Runtime (`deimv2-serve`, extra `[serve]`).

    deimv2-serve models/deimv2_atto_fp32.onnx --replicas 2 --port 8000
    curl --data-binary @street.jpg http://127.0.0.1:8000/detect
    # an EoMT-DINOv3 artifact answers POST /segment, a DINOv3 one POST /embed (see serving.app)

`settings` (what an application is built from, and its Serve config file) and `protocol` (request parsing,
JSON answers) import no Ray; `app` (the deployment, `build_app` for config files) and `server` (a local Ray
instance with graceful shutdown) need `pip install deimv2-deploy[serve]`.
"""
from deimv2_deploy.serving.protocol import RequestError, decode_image, detections_payload, extract_upload
from deimv2_deploy.serving.settings import ServeSettings, serve_config

__all__ = ["ServeSettings", "serve_config", "RequestError", "decode_image", "extract_upload", "detections_payload"]
