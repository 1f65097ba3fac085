"""OpenVINO backend: IR (.xml + .bin) or ONNX on CPU, and GPU / NPU / AUTO where OpenVINO finds them.

Two ways to run, chosen with `mode=`:
- "latency" (default): one inference request, the whole batch at once; the right choice for single images.
- "throughput": OpenVINO picks several streams and an `AsyncInferQueue` of requests keeps them busy; a batch given
  to `infer` is split into single images run in parallel, and `submit`/`results`/`infer_many` pipeline work
  (video frames, benchmark loops).

A graph with a dynamic batch axis is compiled for single images with the batch fixed at 1: fixed shapes let the CPU
plugin plan memory and choose kernels once, which makes the small sizes about a quarter faster (atto on 2 threads:
12 ms instead of 15.7 ms; benchmarks/cpu_speed.md). The graph as exported (any batch) is compiled the first time a
larger batch comes.
"""
from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.precision import choose_precision, openvino_capabilities
from deimv2_deploy.runtimes.base import Backend, BackendUnavailableError, Runtime
from deimv2_deploy.spec import METADATA_KEY, ArtifactSpec, resolve_spec

__all__ = ["OpenVinoRuntime", "openvino_device_name", "read_openvino_spec", "executed_precision", "PERFORMANCE_MODES"]

PERFORMANCE_MODES = ("latency", "throughput")
# OpenVINO device kinds; AUTO (and MULTI/HETERO) are virtual and pick among the real ones
_DEVICE_KINDS = ("CPU", "GPU", "NPU")
_VIRTUAL_DEVICES = ("AUTO",)
_PRECISION_HINTS = {"f32": "f32", "fp32": "f32", "f16": "f16", "fp16": "f16", "bf16": "bf16"}


def _import_openvino():
    try:
        import openvino
    except ImportError as e:
        raise BackendUnavailableError("openvino is not installed: pip install openvino") from e
    return openvino


_CORE: Any = None
_CORE_LOCK = threading.Lock()


def openvino_core() -> Any:
    """The process's one OpenVINO `Core`, created on first use and never released. Every Core this package
    uses is this one.

    Why: each Core loads its own CPU plugin, and that plugin (OpenVINO 2025-2026, `SigAltStackSetup`) installs a
    fresh alternate signal stack on the thread that creates it and, when destroyed, puts back the one it found,
    on whichever thread destroys it, and unmaps its own. Cores released out of creation order, or on another
    thread (a serving replica, a video pipeline's thread, the garbage collector), leave the creating thread's
    signal stack pointing at unmapped memory; the next signal Python handles there (Ctrl-C, SIGTERM, a
    DataLoader's SIGCHLD) then kills the process with SIGSEGV. One Core that lives as long as the process
    keeps one plugin and its stack (tests/test_openvino.py reproduces the crash with two Cores)."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            core = _import_openvino().Core()
            core.get_property("CPU", "FULL_DEVICE_NAME")  # load the CPU plugin now, on this (usually the main) thread
            _CORE = core
        return _CORE


def openvino_device_name(device: str, available: Sequence[str]) -> str:
    """OpenVINO's name for `device` ("cpu" -> "CPU", "gpu.1" -> "GPU.1", "auto" -> "AUTO"), checked against
    the devices OpenVINO found here (`available`, from `Core().available_devices`)."""
    name = str(device).strip().upper()
    shown = ", ".join([*available, *_VIRTUAL_DEVICES])
    if name in _VIRTUAL_DEVICES:
        return name
    kind = name.split(".", 1)[0]
    if kind not in _DEVICE_KINDS:
        raise ValueError(f"OpenVINO has no device {device!r}; devices here: {shown} (CPU, GPU[.N], NPU or AUTO). "
                         "For NVIDIA GPUs use the tensorrt or onnxruntime backend.")
    if name in available or (name == kind and any(a.split(".", 1)[0] == kind for a in available)):
        return name
    raise BackendUnavailableError(f"OpenVINO finds no {name} device on this machine (devices here: {shown}); "
                                  "install the device's driver or choose one of those")


# --- metadata --------------------------------------------------------------------------------------------
def _rt_value(model: Any, path: list[str]) -> str | None:
    try:
        if model.has_rt_info(path):
            return str(model.get_rt_info(path).astype(str))
    except Exception:  # rt_info of another shape (a section, not a string): not ours
        return None
    return None


def _onnx_metadata(path: Path) -> dict[str, str]:
    """metadata_props of an ONNX file, for OpenVINO versions that do not carry them into rt_info."""
    try:
        import onnx
    except ImportError:
        onnx = None
    if onnx is not None:
        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: p.value for p in proto.metadata_props}
    import onnxruntime  # a dependency of the package; heavier (builds a session) but always there

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(session.get_modelmeta().custom_metadata_map)


def read_openvino_spec(model: Any, path: Path, variant: str | None) -> ArtifactSpec:
    """The spec an artifact carries (IR: rt_info; ONNX: metadata_props, which OpenVINO files under
    rt_info['framework']), or the official preprocessing of `variant` for an official-exporter ONNX."""
    text = _rt_value(model, [METADATA_KEY]) or _rt_value(model, ["framework", METADATA_KEY])
    if text is None and path.suffix.lower() == ".onnx":
        text = _onnx_metadata(path).get(METADATA_KEY)
    stored = None if text is None else ArtifactSpec.from_metadata({METADATA_KEY: text})
    port = _port(model, "images") if _has_input(model, "images") else model.inputs[0]
    shape = port.get_partial_shape()
    static = ([d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static else [])
    return resolve_spec(stored, path, variant, input_hw=static[2:4] if len(static) == 4 else None,
                        batch=static[0] if len(static) == 4 else None,
                        example="load_runtime(path, backend='openvino', variant='atto') or --variant atto")


def executed_precision(hint: Any, execution_mode: Any = None) -> str | None:
    """"f32" / "bf16" / "f16" from a compiled model's INFERENCE_PRECISION_HINT (an ov.Type or its name) and
    EXECUTION_MODE_HINT; None when neither says."""
    name = hint.get_type_name() if hasattr(hint, "get_type_name") else (None if hint is None else str(hint))
    name = {"float32": "f32", "fp32": "f32", "bfloat16": "bf16", "float16": "f16", "fp16": "f16"}.get(
        (name or "").lower(), (name or "").lower())
    if name in ("f32", "bf16", "f16"):
        return name
    if execution_mode is not None and str(execution_mode).upper().endswith("ACCURACY"):
        return "f32"  # no reduced-precision transformation: the graph's own f32 arithmetic
    return None


def _has_input(model: Any, name: str) -> bool:
    return any(name in port.get_names() for port in model.inputs)


def _port(model: Any, name: str) -> Any:
    return next(port for port in model.inputs if name in port.get_names())


def _with_fixed_batch(model: Any, batch: int, input_size: tuple[int, int]) -> Any:
    """`model` reshaped in place to a fixed batch, or None where OpenVINO cannot (it is then re-read)."""
    h, w = input_size
    try:
        model.reshape({_port(model, "images"): [batch, 3, h, w], _port(model, "orig_target_sizes"): [batch, 2]})
    except RuntimeError:
        return None
    return model


def _dynamic_batch(model: Any) -> bool:
    """True when the images input has a dynamic (or bounded) batch axis."""
    shape = _port(model, "images").get_partial_shape()
    return shape.rank.is_static and len(shape) == 4 and not shape[0].is_static


# --- loading ---------------------------------------------------------------------------------------------
def _ir_weights_needed(xml: Path) -> int:
    """Bytes of .bin the IR's constants reference (largest offset + size), from the .xml text."""
    needed = 0
    text = xml.read_text(encoding="utf-8", errors="replace")
    for tag in re.finditer(r"<data\b[^>]*>", text):
        offset = re.search(r'\boffset="(\d+)"', tag.group(0))
        size = re.search(r'\bsize="(\d+)"', tag.group(0))
        if offset and size:
            needed = max(needed, int(offset.group(1)) + int(size.group(1)))
    return needed


def _read_model(core: Any, path: Path) -> Any:
    """core.read_model with errors that name the file to fix."""
    if path.suffix.lower() == ".xml":
        weights = path.with_suffix(".bin")
        if not weights.exists():
            raise FileNotFoundError(f"OpenVINO IR weights {weights} are missing: an IR is two files, "
                                    f"{path.name} and {weights.name}, side by side; copy both or re-export")
        needed, found = _ir_weights_needed(path), weights.stat().st_size
        if found < needed:
            raise ValueError(f"OpenVINO IR weights {weights} are truncated: {found} bytes, {path.name} needs "
                             f"{needed}; copy the file again or re-export")
        try:
            return core.read_model(str(path), str(weights))
        except RuntimeError as e:
            raise ValueError(f"OpenVINO cannot read {path} with weights {weights} ({found} bytes): they may not "
                             f"belong together or be damaged; re-export. OpenVINO said: {_first_line(e)}") from e
    try:
        return core.read_model(str(path))
    except RuntimeError as e:
        raise ValueError(f"OpenVINO cannot read {path}: {_first_line(e)}") from e


def _first_line(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.startswith("Exception from")]
    return lines[-1] if lines else str(error)


class OpenVinoRuntime(Runtime):
    """A DEIMv2 IR or ONNX file compiled by OpenVINO.

    Options: `device` ("cpu", "gpu", "gpu.1", "npu", "auto"; an unknown name or a device missing here raises with
    the list of devices OpenVINO found), `mode` ("latency" | "throughput", OpenVINO's performance hint),
    `threads` (inference threads, None = OpenVINO's choice), `streams` (parallel streams, None = as the mode
    implies), `precision` (the policy of `deimv2_deploy.precision`: "auto" chooses bf16 where the CPU runs it
    natively, else f32; "fp32" exact FP32 on every CPU; "bf16"/"fp16"; "int8" checks the artifact is INT8),
    `inference_precision` (the raw OpenVINO hint instead of the policy; None keeps FP32 artifacts in f32 even where
    the CPU would default to bf16; "f16"/"bf16" to trade accuracy for speed), `variant` (only for an ONNX file
    without metadata), `fixed_batch_one` (default True: a dynamic-batch graph runs single images on a batch-1
    compilation, see the module docstring; False compiles it only as exported), `stock` (compile as a stock user
    does, `compile_model(path, "CPU")`: nothing set but the thread count when `threads` is given, so the CPU's
    default precision applies (bf16 on AMX CPUs); for baselines).

    Pipelined use (video, benchmarks) through an `AsyncInferQueue` of the compiled model's optimal number of
    requests, one graph call per submission:

        runtime.submit(inputs, userdata)   # starts one graph call; blocks only while every request is busy
        runtime.results(wait=False)        # -> [(userdata, outputs), ...]: finished calls, in submission order
        runtime.results(wait=True)         # waits for everything submitted, then returns the rest in order
        runtime.infer_many([inputs, ...])  # -> [outputs, ...] in input order (needs no pending submissions)

    `inputs` is the same dict `infer` takes; outputs are fresh numpy arrays (copied out of the request, so they
    stay valid after the request is reused). Inputs are copied in at submission, so the caller may reuse its
    buffer at once. `pending` counts submissions not yet returned by `results`. Use one thread per runtime.
    """

    backend = Backend.OPENVINO

    def __init__(self, path: str | os.PathLike, device: str = "cpu", variant: str | None = None,
                 threads: int | None = None, streams: int | str | None = None, mode: str = "latency",
                 inference_precision: str | None = None, fixed_batch_one: bool = True, precision: str | None = None,
                 stock: bool = False) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"artifact not found: {self.path}")
        if mode not in PERFORMANCE_MODES:
            raise ValueError(f"mode must be one of {PERFORMANCE_MODES}, got {mode!r}")
        if threads is not None and int(threads) < 1:
            raise ValueError(f"threads must be >= 1 (or None for OpenVINO's choice), got {threads}")
        if streams is not None and not (str(streams).upper() == "AUTO" or str(streams).isdigit() and int(streams) >= 1):
            raise ValueError(f"streams must be a number >= 1, 'auto' or None, got {streams!r}")
        self.core = openvino_core()
        self.ov_device = openvino_device_name(device, self.core.available_devices)
        model = _read_model(self.core, self.path)
        spec = read_openvino_spec(model, self.path, variant)
        super().__init__(spec, device.lower())
        names = [sorted(port.get_names()) for port in model.inputs]
        if sorted(n for port in names for n in port if n in self.input_names) != sorted(self.input_names):
            raise ValueError(f"{self.path} has inputs {names}, expected {list(self.input_names)} (a DEIMv2 deploy "
                             "graph)")
        self.mode = mode
        if stock and (streams is not None or inference_precision is not None or precision is not None
                      or mode != "latency"):
            raise ValueError("stock=True compiles with OpenVINO's defaults: do not combine it with streams, mode, "
                             "precision or inference_precision")
        self.stock = stock
        fixed_batch_one = fixed_batch_one and not stock
        self.config = (self._stock_config(threads) if stock
                       else self._compile_config(threads, streams, inference_precision, precision))
        self._graphs: dict[int | None, Any] = {}  # compiled graphs by fixed batch; None: the graph as exported
        dynamic = _dynamic_batch(model)
        single = _with_fixed_batch(model, 1, self.spec.input_size) if dynamic and fixed_batch_one else None
        self._single = single is not None
        # a reshape that failed may have left `model` half changed: the any-batch graph is then read again
        self.compiled = self._graph(1, single) if self._single else self._graph(None, None if dynamic else model)
        self.output_names = tuple(n for n in self.output_names if any(n in o.get_names() for o in
                                                                      self.compiled.outputs))
        if len(self.output_names) != 3:
            raise ValueError(f"{self.path} has outputs {[sorted(o.get_names()) for o in self.compiled.outputs]}, "
                             "expected labels, boxes, scores (a DEIMv2 deploy graph)")
        self._request = self.compiled.create_infer_request()
        self._requests: dict[int | None, Any] = {1 if self._single else None: self._request}
        # pipelined state (created on first use)
        self._queues: dict[int | None, Any] = {}
        self._lock = threading.Lock()
        self._done: dict[int, Any] = {}  # sequence number -> outputs dict or the exception it raised
        self._userdata: dict[int, Any] = {}
        self._next_seq = 0
        self._next_out = 0

    def _graph(self, batch: int | None, model: Any = None) -> Any:
        """The compiled graph for a fixed batch (None: the graph as exported), compiled on first use; the file
        is read again then rather than kept in memory beside the compiled graph."""
        if batch not in self._graphs:
            if model is None:
                model = _read_model(self.core, self.path)
                if batch is not None:
                    model = _with_fixed_batch(model, batch, self.spec.input_size)
            try:
                self._graphs[batch] = self.core.compile_model(model, self.ov_device, self.config)
            except RuntimeError as e:
                raise RuntimeError(f"OpenVINO could not compile {self.path} for {self.ov_device} with "
                                   f"{self.config}: {_first_line(e)}") from e
        return self._graphs[batch]

    def _key(self, n: int) -> int | None:
        return 1 if self._single and n == 1 else None

    def _stock_config(self, threads: int | None) -> dict[str, Any]:
        """What a stock user compiles with: nothing, but the thread count a benchmark gives every row alike."""
        return {} if threads is None else {"INFERENCE_NUM_THREADS": int(threads)}

    def _choose(self, precision: str, inference_precision: str | None) -> str:
        """The OpenVINO hint the precision policy chooses for this artifact on this device (kept in
        `precision_choice`)."""
        if inference_precision is not None:
            raise ValueError(f"give precision= (the policy: auto, fp32...) or inference_precision= (the raw hint), "
                             f"not both (got {precision!r} and {inference_precision!r})")
        isa = None
        if self.ov_device == "CPU" or self.ov_device.startswith("CPU."):
            from deimv2_deploy.cpu import cpu_info

            isa = cpu_info()["isa"]
        capabilities = None if self.ov_device in _VIRTUAL_DEVICES else openvino_capabilities(self.core,
                                                                                              self.ov_device)
        self.precision_choice = choose_precision(precision, self.spec.precision, capabilities, isa)
        return self.precision_choice.inference_precision

    def _compile_config(self, threads: int | None, streams: int | str | None,
                        inference_precision: str | None, precision: str | None = None) -> dict[str, Any]:
        config: dict[str, Any] = {"PERFORMANCE_HINT": self.mode.upper()}
        if precision is not None:
            inference_precision = self._choose(precision, inference_precision)
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if streams is not None:
            config["NUM_STREAMS"] = "AUTO" if str(streams).upper() == "AUTO" else int(streams)
        if inference_precision is None and self.spec.precision == "fp32":
            inference_precision = "f32"  # an FP32 artifact runs in FP32 (CPUs with bf16 would default to it)
        if inference_precision is not None:
            key = str(inference_precision).lower()
            if key not in _PRECISION_HINTS:
                raise ValueError(f"inference_precision must be one of f32, f16, bf16, got {inference_precision!r}")
            config["INFERENCE_PRECISION_HINT"] = _PRECISION_HINTS[key]
        if self.ov_device not in _VIRTUAL_DEVICES:
            supported = set(self.core.get_property(self.ov_device, "SUPPORTED_PROPERTIES"))
            unsupported = [k for k in config if k not in supported]
            if unsupported:
                raise ValueError(f"OpenVINO device {self.ov_device} does not support {unsupported} "
                                 "(threads/streams/inference_precision); leave them unset for this device")
        return config

    # --- availability -----------------------------------------------------------------------------------
    @classmethod
    def import_library(cls):
        return _import_openvino()

    @classmethod
    def version(cls) -> str | None:
        try:  # get_version() also carries the build hash: keep the release number
            return _import_openvino().get_version().split("-", 1)[0]
        except BackendUnavailableError:
            return None

    def _property(self, name: str) -> Any:
        try:
            return self.compiled.get_property(name)
        except RuntimeError:
            return None

    def inference_precision(self) -> str | None:
        """The arithmetic the compiled graph really runs in ("f32", "bf16", "f16"), from the compiled model's own
        properties: INFERENCE_PRECISION_HINT after compilation is what the plugin chose (a bf16 hint on a CPU
        without bf16 compiles to f32); under EXECUTION_MODE_HINT=ACCURACY it reads "dynamic" and the graph keeps
        its own precision (f32 activations, FP16 weights widened). None where the device does not say."""
        return executed_precision(self._property("INFERENCE_PRECISION_HINT"), self._property("EXECUTION_MODE_HINT"))

    def describe(self) -> dict[str, Any]:
        mode = self._property("PERFORMANCE_HINT")
        execution = self._property("EXECUTION_MODE_HINT")
        streams, threads = self._property("NUM_STREAMS"), self._property("INFERENCE_NUM_THREADS")
        return {
            **super().describe(),
            "openvino_device": self.ov_device,
            "execution_devices": list(self._property("EXECUTION_DEVICES") or []),
            "inference_precision": self.inference_precision(),  # what runs, not what was asked for
            "execution_mode": str(execution).rsplit(".", 1)[-1].lower() if execution is not None else None,
            "performance_mode": str(mode).lower() if mode is not None else self.mode,
            "streams": int(streams) if streams is not None else None,
            "threads": int(threads) if threads is not None else None,  # 0: OpenVINO uses all cores
            "requests": self._property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"),
            "compiled_batches": ["any" if b is None else b for b in self._graphs],  # 1: fixed for single images
            "stock": self.stock,  # compiled with OpenVINO's defaults (baselines)
            "compile_config": {k: str(v) for k, v in self.config.items()},  # what was set; the rest is OpenVINO's
            "path": str(self.path),
        }

    # --- the graph --------------------------------------------------------------------------------------
    def _copy_outputs(self, request: Any) -> dict[str, np.ndarray]:
        return {name: np.array(request.get_tensor(name).data, copy=True) for name in self.output_names}

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = inputs["images"].shape[0]
        if self.mode == "throughput" and n > 1 and self.spec.batch is None and not self.pending:
            # one image per request, the streams run them in parallel
            parts = self.infer_many([{k: v[i:i + 1] for k, v in inputs.items()} for i in range(n)])
            return {name: np.concatenate([p[name] for p in parts]) for name in self.output_names}
        key = self._key(n)
        if key not in self._requests:
            self._requests[key] = self._graph(key).create_infer_request()
        request = self._requests[key]
        request.infer(inputs, share_inputs=True)  # synchronous: the arrays outlive the call
        return self._copy_outputs(request)

    # --- pipelined ----------------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Submissions not yet returned by `results`."""
        return self._next_seq - self._next_out

    def _ensure_queue(self, n: int) -> Any:
        key = self._key(n)  # single images run on the batch-1 graph, larger batches on the any-batch one
        if key not in self._queues:
            ov = _import_openvino()
            queue = ov.AsyncInferQueue(self._graph(key), 0)  # 0: the compiled model's optimal number
            queue.set_callback(self._on_done)
            self._queues[key] = queue
        return self._queues[key]

    def _on_done(self, request: Any, seq: int) -> None:
        # runs on an OpenVINO thread; copy now, the request is reused by the next submission
        try:
            outputs: Any = self._copy_outputs(request)
        except Exception as e:  # surfaced by results()
            outputs = e
        with self._lock:
            self._done[seq] = outputs

    def submit(self, inputs: Mapping[str, np.ndarray], userdata: Any = None) -> None:
        """Start one graph call on the next free request (blocks while all are busy); see `results`."""
        checked = self.check_inputs(inputs)
        queue = self._ensure_queue(checked["images"].shape[0])
        seq = self._next_seq
        self._userdata[seq] = userdata
        try:
            queue.start_async(checked, userdata=seq, share_inputs=False)  # copied in: caller may reuse buffers
        except Exception:
            del self._userdata[seq]
            raise
        self._next_seq += 1

    def results(self, wait: bool = False) -> list[tuple[Any, dict[str, np.ndarray]]]:
        """Finished submissions as (userdata, outputs), in submission order; wait=True first waits for all."""
        if wait:
            for queue in self._queues.values():
                queue.wait_all()
        ready = []
        with self._lock:
            while self._next_out in self._done:
                ready.append((self._next_out, self._done.pop(self._next_out)))
                self._next_out += 1
        out, failed = [], None
        for seq, outputs in ready:
            userdata = self._userdata.pop(seq)
            if isinstance(outputs, Exception):
                failed = failed or (seq, outputs)
            else:
                out.append((userdata, outputs))
        if failed is not None:  # after collecting the rest, so one failure does not strand later results
            raise RuntimeError(f"OpenVINO inference of submission {failed[0]} failed: {failed[1]}") from failed[1]
        return out

    def infer_many(self, inputs_list: Iterable[Mapping[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Outputs of many graph calls, run through the request queue, in input order."""
        if self.pending:
            raise RuntimeError(f"{self.pending} submissions are still pending: collect them with "
                               "results(wait=True) before infer_many")
        for inputs in inputs_list:
            self.submit(inputs)
        return [outputs for _, outputs in self.results(wait=True)]

    def close(self) -> None:
        for queue in getattr(self, "_queues", {}).values():
            queue.wait_all()
        self._queues = {}
        self._request = None
        self._requests = {}
        self._graphs = {}
        self.compiled = None
