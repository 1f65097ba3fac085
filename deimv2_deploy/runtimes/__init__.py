"""Runtimes: `load_runtime(path)` picks the backend from the file; each backend imports its library lazily.

    from deimv2_deploy.runtimes import load_runtime
    runtime = load_runtime("models/deimv2_atto_fp32.onnx")
    detections = runtime.predict(cv2.imread("street.jpg"))

Importing this package imports no torch; only the torch backend (checkpoints) needs it.
"""
from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path
from typing import Any

from deimv2_deploy.precision import PRECISION_REQUESTS, PrecisionChoice, executed_label
from deimv2_deploy.runtimes.base import INPUT_NAMES, OUTPUT_NAMES, Backend, BackendUnavailableError, Runtime

__all__ = ["Backend", "Runtime", "BackendUnavailableError", "load_runtime", "backend_class", "available_backends",
           "backend_for_path", "check_options", "INPUT_NAMES", "OUTPUT_NAMES"]

# backend -> (module, class); imported only when used
_BACKENDS = {
    Backend.TORCH: ("deimv2_deploy.runtimes.torch_backend", "TorchRuntime"),
    Backend.ONNXRUNTIME: ("deimv2_deploy.runtimes.onnxruntime_backend", "OnnxRuntime"),
    Backend.OPENVINO: ("deimv2_deploy.runtimes.openvino_backend", "OpenVinoRuntime"),
    Backend.TENSORRT: ("deimv2_deploy.runtimes.tensorrt_backend", "TensorRtRuntime"),
}
# which backends can read which file type; the first is the default
_BY_SUFFIX = {
    ".onnx": (Backend.ONNXRUNTIME, Backend.OPENVINO),
    ".xml": (Backend.OPENVINO,),
    ".engine": (Backend.TENSORRT,),
    ".plan": (Backend.TENSORRT,),
    ".pth": (Backend.TORCH,),
    ".pt": (Backend.TORCH,),
    ".safetensors": (Backend.TORCH,),
}


def backend_class(backend: str | Backend) -> type[Runtime]:
    module, name = _BACKENDS[Backend.parse(backend)]
    return getattr(importlib.import_module(module), name)


def available_backends() -> dict[str, str | None]:
    """Backend name -> None when usable here, else the reason it is not."""
    out = {}
    for b in Backend:
        try:
            out[b.value] = backend_class(b).unavailable_reason()
        except ImportError as e:  # the backend module itself needs something missing
            out[b.value] = str(e)
    return out


def backend_for_path(path: Path) -> tuple[Backend, ...]:
    if path.is_dir():
        if (path / "model.safetensors").exists() or (path / "config.json").exists():
            return (Backend.TORCH,)
        raise ValueError(f"{path} is a folder but not a Hugging Face DEIMv2 folder (config.json + model.safetensors)")
    suffix = path.suffix.lower()
    if suffix not in _BY_SUFFIX:
        raise ValueError(f"unknown file type {suffix or '(none)'!r} for {path}: expected one of "
                         f"{', '.join(_BY_SUFFIX)} or a Hugging Face folder")
    return _BY_SUFFIX[suffix]


def check_options(cls: type[Runtime], options: dict[str, Any]) -> None:
    """ValueError for an option `cls` does not take (a misspelt one, or another backend's), naming those it does."""
    known = cls.option_names()
    unknown = [name for name in options if name not in known]
    if not unknown:
        return
    name = unknown[0]
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"the {cls.backend.value} backend has no option {name!r}{hint}; its options are: "
                     f"{', '.join(known) or 'none'}")


def _vit_runtime(path: Path, backend: str | Backend | None, device: str, variant: str | None,
                 options: dict[str, Any], precision: str | None = None) -> Any:
    """A DINOv3 / EoMT runtime (runtimes.vit_runtime) when the artifact's metadata says it is one, else None.
    `precision`: the same policy as the detectors' (OpenVINO chooses the arithmetic; ONNX Runtime runs the
    artifact's own precision)."""
    from deimv2_deploy.runtimes.vit_runtime import load_vit_runtime, read_vit_spec

    spec = read_vit_spec(path)
    if spec is None:
        return None
    if variant is not None:
        raise ValueError(f"{path} is a {spec.family} artifact, not DEIMv2-{variant}: leave out the variant")
    if device.lower() != "cpu":
        raise ValueError(f"{spec.family} artifacts run on the CPU for now, not device {device!r}")
    unknown = [k for k in options if k not in ("threads", "spinning")]
    if unknown:
        raise ValueError(f"{spec.family} runtimes take only the options 'threads' and 'spinning', not {unknown[0]!r}")
    chosen = None if backend is None else Backend.parse(backend).value
    return load_vit_runtime(path, chosen, threads=options.get("threads"), spec=spec,
                            spinning=bool(options.get("spinning", True)), precision=precision)


def _precision_options(cls: type[Runtime], precision: str, options: dict[str, Any]) -> dict[str, Any]:
    """`options` with the precision request in the form the backend takes it (OpenVINO: its `precision` policy;
    PyTorch: "auto" is fp32, its only CPU precision); backends without a precision option get it checked against
    the artifact after loading (`_check_artifact_precision`)."""
    key = str(precision).lower()
    if key not in PRECISION_REQUESTS:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_REQUESTS)}, got {precision!r}")
    if "precision" in options or "inference_precision" in options:
        raise ValueError("give precision= once: not together with a backend's precision or inference_precision "
                         "option")
    if cls.backend == Backend.OPENVINO:
        return {**options, "precision": key}
    if cls.backend == Backend.TORCH:
        return {**options, "precision": "fp32" if key == "auto" else key}
    return options


def _check_artifact_precision(runtime: Runtime, precision: str) -> None:
    """For backends that run the artifact's own precision: the request must be "auto" or that precision."""
    key, weights = str(precision).lower(), runtime.spec.precision
    if runtime.backend == Backend.TORCH:
        reason = ("auto: PyTorch eager runs the FP32 model (no bf16/INT8 path)" if key == "auto"
                  else f"{key} requested")
    elif key in ("auto", weights):
        reason = (f"{runtime.backend.value} runs the artifact's own precision ({weights}); bf16 arithmetic is an "
                  "OpenVINO option (backend='openvino')")
    else:
        runtime.close()
        instead = ("use backend='openvino' for bf16 arithmetic" if key == "bf16"
                   else f"load a {key} artifact, or use backend='openvino'")
        raise ValueError(f"the {runtime.backend.value} backend runs the artifact's own precision ({weights}), not "
                         f"{key}: {instead}")
    arithmetic = runtime.inference_precision()
    runtime.precision_choice = PrecisionChoice(key, executed_label(weights, arithmetic) or weights, arithmetic,
                                               reason)


def load_runtime(path: str | os.PathLike, backend: str | Backend | None = None, device: str = "cpu",
                 variant: str | None = None, precision: str | None = None, **options: Any) -> Runtime:
    """Load an artifact (or checkpoint) on the backend its file type implies, or the one named.

    A DINOv3 or EoMT-DINOv3 artifact (`deimv2-export dinov3|eomt`) gives a Dinov3Runtime / EomtRuntime
    (runtimes.vit_runtime): `predict(image)` returns Embeddings / a Segmentation.
    `variant` is needed only for files without deimv2-deploy metadata (official-exporter ONNX, checkpoints
    whose size cannot be recognised). `precision` ("auto", "fp32", "bf16", "fp16", "int8"; see
    `deimv2_deploy.precision`): the arithmetic to run; None keeps each backend's default (OpenVINO: FP32
    artifacts in f32). `describe()["executed_precision"]` says what really runs. Backend options (threads,
    streams, inference_precision...) pass through; an option the chosen backend does not take is a ValueError
    naming the ones it does.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"artifact not found: {p}")
    if p.is_file() and p.suffix.lower() in (".onnx", ".xml"):
        vit = _vit_runtime(p, backend, device, variant, options, precision)
        if vit is not None:
            return vit
    possible = backend_for_path(p)
    chosen = Backend.parse(backend) if backend is not None else possible[0]
    if chosen not in possible:
        raise ValueError(f"backend {chosen.value!r} cannot load {p.suffix or 'folder'} files; "
                         f"use one of {', '.join(b.value for b in possible)}")
    cls = backend_class(chosen)
    check_options(cls, options)
    if precision is not None:
        options = _precision_options(cls, precision, options)
    reason = cls.unavailable_reason()
    if reason:
        raise BackendUnavailableError(reason)
    runtime = cls(p, device=device, variant=variant, **options)
    if precision is not None and runtime.precision_choice is None:
        _check_artifact_precision(runtime, precision)
    return runtime
