"""Exporters: checkpoint -> ONNX -> OpenVINO IR | TensorRT engine, each artifact carrying its ArtifactSpec.

Each exporter module imports its heavy libraries (torch, onnx, openvino, tensorrt) inside its functions, so
importing `deimv2_deploy.exporters` is cheap.
"""
from deimv2_deploy.exporters.common import ExportResult, artifact_name, resolve_store

__all__ = ["ExportResult", "artifact_name", "resolve_store"]
