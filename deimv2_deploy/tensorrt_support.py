"""TensorRT facts and plumbing shared by the TensorRT runtime and exporter, below both: versions, the engine's
JSON sidecar, CUDA device strings, and importing TensorRT / pycuda with install hints. Importing this module
imports neither TensorRT nor pycuda (`import_tensorrt`, `import_pycuda` do, when called)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deimv2_deploy.errors import BackendUnavailableError
from deimv2_deploy.files import write_text
from deimv2_deploy.spec import ArtifactSpec

__all__ = ["MIN_TENSORRT", "FP16_SAFE_TENSORRT", "INSTALL_HINT", "SIDECAR_SUFFIX", "sidecar_path", "sidecar_text",
           "read_sidecar", "write_sidecar", "parse_version", "parse_cuda_device", "import_tensorrt", "import_pycuda",
           "retain_primary_context", "cuda_context"]

MIN_TENSORRT = (10, 0)  # name-based tensor API with INT64 I/O (labels, orig_target_sizes)
FP16_SAFE_TENSORRT = (10, 6)  # earlier 10.x builds wrong FP16 DEIMv2 engines (DEIMv2 issues #53, #112)
INSTALL_HINT = ("pip install 'tensorrt>=10.6,<12' pycuda (or: pip install 'deimv2-deploy[tensorrt]'). Both need "
                "an NVIDIA GPU with its driver and CUDA; pycuda builds against the CUDA toolkit (nvcc, cuda.h)")
SIDECAR_SUFFIX = ".json"


def sidecar_path(engine_path: str | os.PathLike) -> Path:
    """`model.engine` -> `model.engine.json`."""
    p = Path(engine_path)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def write_sidecar(engine_path: str | os.PathLike, spec: ArtifactSpec) -> Path:
    """Write the spec beside the engine, atomically (the exporter publishes engine and sidecar together)."""
    return write_text(sidecar_path(engine_path), sidecar_text(spec))


def sidecar_text(spec: ArtifactSpec) -> str:
    return spec.to_json() + "\n"


def read_sidecar(engine_path: str | os.PathLike) -> ArtifactSpec | None:
    """The spec stored beside the engine, or None when there is no sidecar."""
    path = sidecar_path(engine_path)
    if not path.exists():
        return None
    try:
        return ArtifactSpec.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the engine's sidecar {path}: {e}; re-export the engine with deimv2-export "
                         "or delete the sidecar and pass the size (variant=...)") from e


def parse_version(text: str) -> tuple[int, ...]:
    """'10.6.0.post1' -> (10, 6, 0); the leading numeric fields only."""
    fields = []
    for part in str(text).strip().split("."):
        digits = ""
        for ch in part:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        fields.append(int(digits))
        if len(digits) != len(part):
            break
    if not fields:
        raise ValueError(f"cannot read a version number from {text!r}")
    return tuple(fields)


def parse_cuda_device(device: str | int | None) -> int:
    """The CUDA device index of 'cuda', 'cuda:1', 'gpu', 1, ...

    'cpu' (load_runtime's default) also means the first GPU: a TensorRT engine only runs on an NVIDIA GPU.
    """
    if device is None:
        return 0
    if isinstance(device, int):
        index = device
    else:
        text = str(device).strip().lower()
        if text in ("cpu", "cuda", "gpu", "auto", ""):
            return 0
        for prefix in ("cuda:", "gpu:"):
            if text.startswith(prefix):
                text = text[len(prefix):]
        if not text.isdigit():
            raise ValueError(f"TensorRT device must be 'cuda' or 'cuda:N' (an NVIDIA GPU index), got {device!r}")
        index = int(text)
    if index < 0:
        raise ValueError(f"CUDA device index must be >= 0, got {index}")
    return index


# --- library access ---------------------------------------------------------------------------------------
def import_tensorrt() -> Any:
    """The tensorrt module, or BackendUnavailableError saying how to install it."""
    try:
        import tensorrt
    except Exception as e:  # ImportError, or OSError when the wheel is there but its libraries are not
        raise BackendUnavailableError(f"TensorRT is not usable here ({type(e).__name__}: {e}). Install: "
                                      f"{INSTALL_HINT}") from e
    return tensorrt


def import_pycuda() -> Any:
    """pycuda.driver, or BackendUnavailableError saying how to install it."""
    try:
        import pycuda.driver as cuda
    except Exception as e:
        raise BackendUnavailableError(f"pycuda is not usable here ({type(e).__name__}: {e}). Install: "
                                      f"{INSTALL_HINT}") from e
    return cuda


def retain_primary_context(cuda: Any, index: int = 0) -> Any:
    """The device's primary context (the one TensorRT's CUDA runtime calls use), retained but not made current."""
    cuda.init()
    count = cuda.Device.count()
    if index >= count:
        raise ValueError(f"CUDA device {index} does not exist: this machine has {count} NVIDIA GPU(s)")
    return cuda.Device(index).retain_primary_context()


@contextlib.contextmanager
def cuda_context(cuda: Any, index: int = 0) -> Iterator[Any]:
    """Make the device's primary context current for a block (building, calibrating)."""
    context = retain_primary_context(cuda, index)
    context.push()
    try:
        yield context
    finally:
        cuda.Context.pop()
        context.detach()
