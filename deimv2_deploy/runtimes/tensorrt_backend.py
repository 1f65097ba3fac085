"""TensorRT backend: a serialized engine (.engine / .plan) and its JSON sidecar, on an NVIDIA GPU.

Runs through TensorRT's name-based tensor API (`set_input_shape`, `set_tensor_address`, `execute_async_v3`)
with pycuda device buffers, page-locked host staging buffers and one CUDA stream. Buffers grow on demand;
results are copied out, never handed back as views of the staging buffers. Inputs are checked against the
engine's optimization profile before anything reaches the GPU.

The engine carries no preprocessing, so its identity lives in `<engine>.json` next to it (written by
`deimv2_deploy.exporters.tensorrt_export`). An engine without one (e.g. `trtexec` on the official ONNX) loads
when the caller names the size: `load_runtime("model.engine", variant="s")`.

Everything that needs neither TensorRT nor a GPU (sidecar I/O, profile checks, dtype mapping, version parsing,
device strings) is plain functions here so it can be tested anywhere.
"""
from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.runtimes.base import INPUT_NAMES, OUTPUT_NAMES, Backend, BackendUnavailableError, Runtime
from deimv2_deploy.spec import ArtifactSpec, resolve_spec
from deimv2_deploy.tensorrt_support import (
    INSTALL_HINT,
    MIN_TENSORRT,
    import_pycuda,
    import_tensorrt,
    parse_cuda_device,
    parse_version,
    read_sidecar,
    retain_primary_context,
    sidecar_path,
)

__all__ = ["TensorRtRuntime", "TensorInfo", "numpy_dtype", "check_profile_shape", "to_engine_dtype",
           "to_contract_dtype"]

# numpy dtypes of the TensorRT DataType names this runtime can feed or read
_NUMPY_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64,
                 "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_}
# what the Runtime contract hands back, whatever the engine computes in
_CONTRACT_DTYPES = {"labels": np.int64, "boxes": np.float32, "scores": np.float32}


# --- pure helpers (no TensorRT, no GPU) -------------------------------------------------------------------
def numpy_dtype(trt_dtype_name: str) -> np.dtype:
    """numpy dtype of a TensorRT DataType name ('FLOAT', 'INT64', ...)."""
    key = str(trt_dtype_name).split(".")[-1].upper()
    if key not in _NUMPY_DTYPES:
        raise ValueError(f"TensorRT data type {trt_dtype_name!r} is not supported at this engine's inputs/outputs "
                         f"(supported: {', '.join(_NUMPY_DTYPES)})")
    return np.dtype(_NUMPY_DTYPES[key])


def check_profile_shape(name: str, shape: Sequence[int], min_shape: Sequence[int], max_shape: Sequence[int]) -> None:
    """ValueError naming the profile range and the offending shape when `shape` is outside [min, max]."""
    shape, lo, hi = tuple(int(d) for d in shape), tuple(int(d) for d in min_shape), tuple(int(d) for d in max_shape)
    if len(shape) != len(lo):
        raise ValueError(f"{name!r} must have {len(lo)} dimensions for this engine (profile {lo} .. {hi}), "
                         f"got shape {shape}")
    bad = [i for i, (s, a, b) in enumerate(zip(shape, lo, hi, strict=True)) if not a <= s <= b]
    if not bad:
        return
    message = (f"{name!r} has shape {shape}, outside this engine's optimization profile: expected {lo} .. {hi} "
               f"(dimension {', '.join(map(str, bad))} out of range)")
    if bad == [0]:
        if lo[0] == hi[0]:
            message += f"; this engine takes exactly {lo[0]} image(s) per call"
        else:
            message += f"; pass {lo[0]} to {hi[0]} images per call"
        message += (", or rebuild the engine for this batch with deimv2-export --format tensorrt "
                    f"--dynamic-batch {min(lo[0], shape[0])}:{max(1, min(shape[0], hi[0]))}:{max(hi[0], shape[0])}")
    raise ValueError(message)


def to_engine_dtype(name: str, array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` as the engine's input dtype; integers are range-checked (int64 -> int32 engines)."""
    dtype = np.dtype(dtype)
    if array.dtype == dtype:
        return np.ascontiguousarray(array)
    if np.issubdtype(dtype, np.integer) and array.size:
        info = np.iinfo(dtype)
        lo, hi = int(array.min()), int(array.max())
        if lo < info.min or hi > info.max:
            raise ValueError(f"{name!r} values {lo}..{hi} do not fit this engine's {dtype} input")
    return np.ascontiguousarray(array.astype(dtype))


def to_contract_dtype(name: str, array: np.ndarray) -> np.ndarray:
    """Outputs as the Runtime contract has them: labels int64, boxes and scores float32 (a fresh array)."""
    want = _CONTRACT_DTYPES.get(name)
    if want is None or array.dtype == want:
        return np.array(array, copy=True)
    return array.astype(want)


@dataclass(frozen=True)
class TensorInfo:
    """One engine I/O tensor as the engine declares it."""

    name: str
    is_input: bool
    dtype: np.dtype
    shape: tuple[int, ...]  # -1 on dynamic axes
    profile: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None = None  # inputs: (min, opt, max)


class _Buffer:
    """One I/O tensor's page-locked host staging array and device allocation, grown on demand."""

    def __init__(self, cuda: Any, dtype: np.dtype) -> None:
        self._cuda = cuda
        self.dtype = np.dtype(dtype)
        self.capacity = 0  # elements
        self.host: np.ndarray | None = None
        self.device: Any = None

    def reserve(self, count: int) -> None:
        if count <= self.capacity:
            return
        self.free()
        self.host = self._cuda.pagelocked_empty(count, self.dtype)
        self.device = self._cuda.mem_alloc(max(1, count * self.dtype.itemsize))
        self.capacity = count

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.host[:int(np.prod(shape, dtype=np.int64))].reshape(shape)

    def free(self) -> None:
        if self.device is not None:
            self.device.free()
        self.device, self.host, self.capacity = None, None, 0


class TensorRtRuntime(Runtime):
    backend = Backend.TENSORRT

    def __init__(self, path: str | os.PathLike, device: str = "cuda", variant: str | None = None,
                 verbose: bool = False) -> None:
        trt = import_tensorrt()
        cuda = import_pycuda()
        self._trt, self._cuda = trt, cuda
        self.path = Path(path)
        self.device_index = parse_cuda_device(device)
        self._closed = True  # until everything below exists
        stored = read_sidecar(self.path)
        # checked now, before the GPU is touched; an engine without a sidecar is checked once its input is known
        spec = self._spec(stored, variant) if stored is not None or variant is None else None

        self._lock = threading.Lock()  # one stream and one set of buffers: calls run one at a time
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._primary = retain_primary_context(cuda, self.device_index)
        self._closed = False
        try:
            with self._active():
                self._buffers: dict[str, _Buffer] = {}
                self._load_engine(verbose, spec)
                self._stream = cuda.Stream()
                self._buffers = {t.name: _Buffer(cuda, t.dtype) for t in self.tensors.values()}
                self.gpu_name = cuda.Device(self.device_index).name()
            if spec is None:
                spec = self._spec(None, variant, self.tensors["images"].shape)
        except BaseException:
            self.close()
            raise
        images = self.tensors["images"].profile
        if spec.batch is None and images[0][0] == images[2][0]:
            spec = spec.with_(batch=images[0][0])  # a one-size profile is a fixed batch: predict() pads to it
        super().__init__(spec, f"cuda:{self.device_index}")
        self.max_batch = spec.batch or images[2][0]

    # --- loading ------------------------------------------------------------------------------------
    def _load_engine(self, verbose: bool, spec: ArtifactSpec | None) -> None:
        trt = self._trt
        self._logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(self._logger, "")
        self._trt_runtime = trt.Runtime(self._logger)
        self.engine = self._trt_runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            built = (spec.build.get("tensorrt"), spec.build.get("device")) if spec is not None else (None, None)
            origin = (f"it was built with TensorRT {built[0]} on {built[1]}" if built[0]
                      else "it may come from another TensorRT version or GPU")
            raise RuntimeError(f"TensorRT {trt.__version__} could not load {self.path}: {origin}. Engines run only "
                               "on the TensorRT version (and GPU model) that built them: rebuild it on this machine "
                               "with deimv2-export --format tensorrt")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {self.path} (out of GPU memory?)")
        self.tensors: dict[str, TensorInfo] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            is_input = self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            dtype = numpy_dtype(self.engine.get_tensor_dtype(name).name)
            shape = tuple(int(d) for d in self.engine.get_tensor_shape(name))
            profile = self._input_profile(name, shape) if is_input else None
            self.tensors[name] = TensorInfo(name, is_input, dtype, shape, profile)
        inputs = [n for n, t in self.tensors.items() if t.is_input]
        outputs = [n for n, t in self.tensors.items() if not t.is_input]
        if sorted(inputs) != sorted(INPUT_NAMES) or sorted(outputs) != sorted(OUTPUT_NAMES):
            raise ValueError(f"{self.path} has inputs {inputs} and outputs {outputs}; a DEIMv2 deploy engine has "
                             f"{list(INPUT_NAMES)} -> {list(OUTPUT_NAMES)}")
        self.output_names = tuple(outputs)
        for name, allowed in (("images", (np.float32, np.float16)), ("orig_target_sizes", (np.int64, np.int32))):
            if self.tensors[name].dtype not in [np.dtype(a) for a in allowed]:
                raise ValueError(f"{self.path}: input {name!r} is {self.tensors[name].dtype}, expected one of "
                                 f"{[np.dtype(a).name for a in allowed]}")

    def _input_profile(self, name: str, shape: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """(min, opt, max) of profile 0; a static input's own shape when the engine reports no range."""
        try:
            profile = tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(name, 0))
        except Exception:  # noqa: BLE001 - static engines may report no profile at all
            profile = ()
        if len(profile) == 3 and all(len(s) == len(shape) and min(s, default=0) >= 0 for s in profile):
            return profile
        if any(d < 0 for d in shape):
            raise RuntimeError(f"{self.path}: input {name!r} has dynamic shape {shape} but no optimization profile")
        return (shape, shape, shape)

    def _spec(self, stored: ArtifactSpec | None, variant: str | None, shape: tuple[int, ...] = ()) -> ArtifactSpec:
        if shape and len(shape) != 4:
            raise ValueError(f"{self.path} takes images of shape {shape}, not (N, 3, H, W): not a DEIMv2 engine")
        return resolve_spec(stored, self.path, variant, where=f"sidecar {sidecar_path(self.path).name} (engines carry "
                            "no preprocessing)", input_hw=shape[2:4] if shape else None,
                            example="load_runtime(path, variant='s') or deimv2-infer --variant s, or re-export it "
                                    "with deimv2-export --format tensorrt", precision="unknown (no sidecar)")

    # --- CUDA context -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _active(self) -> Iterator[None]:
        self._primary.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    # --- per backend --------------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls) -> str | None:
        problems = []
        try:
            trt = import_tensorrt()
        except BackendUnavailableError:
            problems.append("the TensorRT Python package (tensorrt) is not installed or its libraries are missing")
        else:
            version = parse_version(trt.__version__)
            if version < MIN_TENSORRT:
                problems.append(f"TensorRT {trt.__version__} is too old: this runtime needs TensorRT >= "
                                f"{'.'.join(map(str, MIN_TENSORRT))} (>= 10.6 to build FP16 engines)")
        try:
            cuda = import_pycuda()
        except BackendUnavailableError:
            problems.append("pycuda is not installed")
        else:
            try:
                cuda.init()
                if cuda.Device.count() == 0:
                    problems.append("no NVIDIA GPU was found")
            except Exception as e:  # noqa: BLE001 - pycuda raises its own error types when there is no driver
                problems.append(f"no usable NVIDIA GPU (CUDA driver: {e})")
        if not problems:
            return None
        return "TensorRT backend unavailable: " + "; ".join(problems) + f". Install: {INSTALL_HINT}"

    @classmethod
    def is_available(cls) -> bool:
        return cls.unavailable_reason() is None

    @classmethod
    def version(cls) -> str | None:
        try:
            return str(import_tensorrt().__version__)
        except BackendUnavailableError:
            return None

    def describe(self) -> dict[str, Any]:
        images = self.tensors["images"].profile
        return {**super().describe(), "engine": str(self.path), "gpu": self.gpu_name,
                "batch_profile": {"min": images[0][0], "opt": images[1][0], "max": images[2][0]},
                "io_dtypes": {n: t.dtype.name for n, t in self.tensors.items()},
                "build": {k: self.spec.build.get(k) for k in ("tensorrt", "device", "fp32_attention", "workspace_gb")
                          if k in self.spec.build}}

    # --- the graph ----------------------------------------------------------------------------------
    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {}
        for name in INPUT_NAMES:  # everything checked before anything reaches the GPU
            info = self.tensors[name]
            check_profile_shape(name, inputs[name].shape, info.profile[0], info.profile[2])
            arrays[name] = to_engine_dtype(name, inputs[name], info.dtype)
        with self._lock:
            if self._closed:
                raise RuntimeError(f"this TensorRT runtime for {self.path} is closed")
            return self._run(arrays)

    def _run(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cuda, stream = self._cuda, self._stream
        with self._active():
            for name, array in arrays.items():
                if self._shapes.get(name) != array.shape:
                    if not self.context.set_input_shape(name, array.shape):
                        raise ValueError(f"TensorRT rejected shape {array.shape} for {name!r}")
                    self._shapes[name] = array.shape
                buf = self._buffers[name]
                buf.reserve(array.size)
                staged = buf.view(array.shape)
                np.copyto(staged, array)
                cuda.memcpy_htod_async(buf.device, staged, stream)
                self.context.set_tensor_address(name, int(buf.device))
            shapes = {}
            for name in self.output_names:
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RuntimeError(f"TensorRT could not resolve the shape of output {name!r} ({shape})")
                buf = self._buffers[name]
                buf.reserve(int(np.prod(shape, dtype=np.int64)))
                self.context.set_tensor_address(name, int(buf.device))
                shapes[name] = shape
            if not self.context.execute_async_v3(stream.handle):
                raise RuntimeError(f"TensorRT failed to enqueue {self.path} (see the TensorRT log above)")
            for name, shape in shapes.items():
                cuda.memcpy_dtoh_async(self._buffers[name].view(shape), self._buffers[name].device, stream)
            stream.synchronize()
            # copy out: the staging buffers are reused by the next call
            return {name: to_contract_dtype(name, self._buffers[name].view(shape)) for name, shape in shapes.items()}

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        with self._lock:
            self._closed = True
            with self._active():
                for buf in self._buffers.values():
                    buf.free()
                # TensorRT objects go in reverse order of creation, while the CUDA context is current
                self.context = None
                self.engine = None
                self._trt_runtime = None
                self._stream = None
            self._primary.detach()
