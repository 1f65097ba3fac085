"""ONNX Runtime backend: CPU (and CUDA/TensorRT execution providers where installed)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.runtimes.base import Backend, BackendUnavailableError, Runtime
from deimv2_deploy.spec import ArtifactSpec, resolve_spec

__all__ = ["OnnxRuntime", "read_onnx_spec"]

_DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise BackendUnavailableError("onnxruntime is not installed: pip install onnxruntime "
                                      "(or onnxruntime-gpu for CUDA)") from e
    return onnxruntime


def read_onnx_spec(session: Any, path: Path, variant: str | None) -> ArtifactSpec:
    """The spec stored in the file's metadata, or the official preprocessing of `variant` for an official export."""
    stored = ArtifactSpec.from_metadata(dict(session.get_modelmeta().custom_metadata_map))
    shape = session.get_inputs()[0].shape  # ['N', 3, H, W]: names on dynamic axes
    static = [d if isinstance(d, int) else None for d in shape]
    return resolve_spec(stored, path, variant, input_hw=static[2:4] if len(static) == 4 else None,
                        batch=static[0] if static else None)


def _open_session(ort: Any, path: Path, options: Any, providers: list[str]) -> Any:
    """An InferenceSession, or a one-line error for a file that is not a loadable ONNX model."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not an .onnx file")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): copy it again or re-export it with deimv2-export")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors are pybind classes outside the OSError/ValueError tree
        if not type(e).__module__.startswith("onnxruntime"):
            raise
        said = " ".join(str(e).split()).split(" : ")[-1]
        raise ValueError(f"ONNX Runtime cannot load {path}: it is truncated, damaged or not an ONNX model "
                         f"({said}); copy it again or re-export it with deimv2-export") from None


class OnnxRuntime(Runtime):
    backend = Backend.ONNXRUNTIME

    def __init__(self, path: str | os.PathLike, device: str = "cpu", variant: str | None = None,
                 threads: int | None = None, providers: list[str] | None = None, optimization: str = "all",
                 spinning: bool = True) -> None:
        """`spinning=False` stops idle worker threads from busy-waiting between runs: slightly slower single
        inferences, but the CPU is left to other work (the video pipeline's decode/draw/encode threads)."""
        ort = _import_ort()
        self.path = Path(path)
        device = device.lower()
        if providers is None:
            if device not in _DEVICE_PROVIDERS:
                raise ValueError(f"onnxruntime device must be one of {', '.join(_DEVICE_PROVIDERS)}, got {device!r}")
            providers = _DEVICE_PROVIDERS[device]
        available = ort.get_available_providers()
        if providers[0] not in available:
            raise BackendUnavailableError(f"onnxruntime here has no {providers[0]} (available: {available}); "
                                          "for CUDA install onnxruntime-gpu, or use device='cpu'")
        options = ort.SessionOptions()
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        if optimization not in levels:
            raise ValueError(f"optimization must be one of {', '.join(levels)}, got {optimization!r}")
        options.graph_optimization_level = levels[optimization]
        if threads:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        if not spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        self.threads, self.spinning = threads, spinning
        self.session = _open_session(ort, self.path, options, [p for p in providers if p in available])
        spec = read_onnx_spec(self.session, self.path, variant)
        super().__init__(spec, device)
        names = [i.name for i in self.session.get_inputs()]
        if sorted(names) != sorted(self.input_names):
            raise ValueError(f"{self.path} has inputs {names}, expected {list(self.input_names)} "
                             "(a DEIMv2 deploy graph)")
        self.output_names = tuple(o.name for o in self.session.get_outputs())

    @classmethod
    def import_library(cls):
        return _import_ort()

    def inference_precision(self) -> str | None:
        """ONNX Runtime's CPU provider computes an FP32 graph in f32 on every x86 CPU (it has no automatic bf16);
        other providers and FP16 graphs (partly cast back to f32 on CPU) are not reported."""
        fp32_on_cpu = self.session.get_providers()[0] == "CPUExecutionProvider" and self.spec.precision == "fp32"
        return "f32" if fp32_on_cpu else None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.session.get_providers(), "threads": self.threads,
                "spinning": self.spinning}

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = self.session.run(list(self.output_names), inputs)
        return dict(zip(self.output_names, values, strict=True))
