"""The timing harness: one row per (size, backend, precision, batch), on one device tier.

For each row: find or export the artifact in the model store (reusing what is there), load it (load time),
run it once (first-inference latency), warm up, then time every call with `time.perf_counter_ns` (GPU work
synchronised before each clock read) for a fixed count or a fixed duration. Nothing is discarded: the
statistics see every timed call. Each backend's outputs are matched against PyTorch eager on the same
input (order-free, `exporters.parity.match_detections`). Rows that cannot run here are kept with the reason.

Modes:
- "model": `Runtime.infer` on a prepared batch (the graph: model + top-k postprocess).
- "end-to-end": per call, image read/decode, `Runtime.prepare`, `Runtime.infer` and
  `Runtime.detections_from_outputs` (box mapping + Detections), each stage timed separately.
- "video": frames of a video file through `Runtime.stream` (decode + everything above), per-frame latency.
- "predict": `Runtime.predict` on an in-memory 640x480 BGR image (preprocess + graph + detections), against the
  baselines a user has today timed as they run: PyTorch eager and the official-style exports graph-only (the
  official torch_inf.py times `model(images, orig_target_sizes)` on prepared inputs).

Baselines: the pseudo-backends `onnxruntime-official` and `openvino-official` run the ONNX file the official
exporter makes of the same model (`export_official_style_onnx`: plain trace, dynamic batch, no graph work) with
each library's stock settings. With `interleave`, the rows of one size and batch take turns call by call, so load
from other processes hits them alike and their ratios stay meaningful on a shared machine.
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.benchmarks.stats import LatencyStats, fps_from_mean, summarize, throughput_from_mean
from deimv2_deploy.benchmarks.sysinfo import (
    command_line,
    cpu_info,
    device_name,
    gpu_info,
    load_average,
    system_fingerprint,
    tier_of,
)
from deimv2_deploy.runtimes.base import Backend, BackendUnavailableError, Runtime
from deimv2_deploy.variants import VARIANT_NAMES, get_variant_info

__all__ = ["BenchConfig", "BenchRow", "BenchResult", "Skip", "Timing", "RowKey", "run_benchmark", "time_calls",
           "time_round_robin", "quick_atto_table", "load_torch_reference", "MODES", "PRECISIONS", "BACKEND_ORDER",
           "OFFICIAL_BACKENDS", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
MODES = ("model", "end-to-end", "video", "predict")
# baselines: the official-style ONNX on a stock runtime (pseudo-backend -> the runtime library that runs it)
OFFICIAL_BACKENDS = {"onnxruntime-official": "onnxruntime", "openvino-official": "openvino"}
PRECISIONS = ("fp32", "fp16", "int8")
BACKEND_ORDER = (Backend.TORCH.value, *OFFICIAL_BACKENDS,  # torch first: the reference of speed-up and parity
                 *(b.value for b in Backend if b is not Backend.TORCH))
DEFAULT_ITERS = 100
MIN_ITERS = 3  # a --seconds run still times at least this many calls

# parity tolerances per precision (boxes in pixels, scores absolute): FP32 as the exporters' check,
# reduced precisions only report how far they drift
PARITY_TOLERANCES = {"fp32": (1e-2, 1e-5), "fp16": (2.0, 1e-2), "int8": (8.0, 5e-2)}

Loader = Callable[["RowKey", "BenchConfig"], Runtime]


class Skip(Exception):
    """This row cannot run on this machine; the message is the reason shown in the table."""


# --- configuration ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    sizes: tuple[str, ...] = ("atto",)
    backends: tuple[str, ...] = ("torch", "onnxruntime", "openvino")
    precisions: tuple[str, ...] = ("fp32",)
    device: str = "cpu"
    batches: tuple[int, ...] = (1,)
    threads: int | None = None  # None: every core this process may use
    warmup: int = 10  # untimed calls before timing; the first one is the first-inference latency
    iters: int | None = None  # timed calls (DEFAULT_ITERS when neither iters nor seconds is given)
    seconds: float | None = None  # or: time calls for this long (at least MIN_ITERS)
    mode: str = "model"
    video: str | None = None
    random_weights: bool = False
    checkpoint_dir: str | None = None  # official checkpoints; also where artifacts are exported to and reused from
    calibration: str | None = None  # images for INT8 calibration (random weights: synthetic scenes when None)
    parity: bool = True
    progress: bool = True
    keep_samples: bool = True  # raw per-call latencies in the JSON
    command: str | None = None
    interleave: bool = False  # rows of one size and batch take turns call by call (see the module docstring)

    def __post_init__(self) -> None:
        sizes = tuple(get_variant_info(s).name for s in self.sizes)  # raises on unknown sizes
        if not sizes:
            raise ValueError("no sizes given: choose from " + ", ".join(VARIANT_NAMES))
        object.__setattr__(self, "sizes", sizes)
        if not self.backends:
            raise ValueError("no backends given: choose from " + ", ".join(BACKEND_ORDER))
        object.__setattr__(self, "backends", tuple(str(b).lower() for b in self.backends))
        for p in self.precisions:
            if p not in PRECISIONS:
                raise ValueError(f"unknown precision {p!r}: choose from {', '.join(PRECISIONS)}")
        if not self.precisions:
            raise ValueError("no precisions given: choose from " + ", ".join(PRECISIONS))
        if not self.batches or any(int(b) < 1 for b in self.batches):
            raise ValueError(f"batch sizes must be positive integers, got {list(self.batches)}")
        object.__setattr__(self, "batches", tuple(int(b) for b in self.batches))
        device = self.device.lower()
        if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {self.device!r}")
        object.__setattr__(self, "device", device)
        if self.iters is not None and self.seconds is not None:
            raise ValueError("give either --iters or --seconds, not both")
        if self.iters is not None and self.iters < 1:
            raise ValueError(f"--iters must be at least 1, got {self.iters}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"--seconds must be positive, got {self.seconds}")
        if self.iters is None and self.seconds is None:
            object.__setattr__(self, "iters", DEFAULT_ITERS)
        if self.warmup < 1:
            raise ValueError(f"--warmup must be at least 1 (the first call is always a warm-up: it is reported "
                             f"as the first-inference latency), got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose from {', '.join(MODES)}")
        if self.mode == "video":
            if not self.video:
                raise ValueError("--mode video needs --video PATH (a video file)")
            if not Path(self.video).is_file():
                raise FileNotFoundError(f"video not found: {self.video}")
            if self.batches != (1,):
                raise ValueError("--mode video runs frame by frame: use --batch 1")
            if self.interleave:
                raise ValueError("--interleave times calls of several rows in turn; --mode video streams one "
                                 "file per row: leave --interleave out")

    @property
    def threads_used(self) -> int:
        if self.threads:
            return self.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    @property
    def store(self) -> Path:
        from deimv2_deploy.exporters.common import resolve_store

        return resolve_store(self.checkpoint_dir)

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "backends": list(self.backends), "precisions": list(self.precisions),
                "device": self.device, "batches": list(self.batches), "threads": self.threads_used,
                "warmup": self.warmup, "iters": self.iters, "seconds": self.seconds, "mode": self.mode,
                "video": self.video, "random_weights": self.random_weights, "checkpoint_dir": self.checkpoint_dir,
                "calibration": self.calibration, "parity": self.parity, "interleave": self.interleave}


@dataclass(frozen=True)
class RowKey:
    size: str
    backend: str
    precision: str
    batch: int


# --- results -------------------------------------------------------------------------------------------
@dataclass
class BenchRow:
    """One timed (or skipped) configuration. `to_dict` is the JSON schema's row (see benchmarks/README.md)."""

    size: str
    backend: str
    precision: str
    batch: int
    mode: str
    tier: str  # "CPU" or "GPU"
    device: str  # "cpu", "cuda", "cuda:1"
    device_name: str  # CPU model or GPU name
    threads: int | None
    status: str = "ok"  # "ok", "skipped" (cannot run here; see reason) or "failed" (an error; see reason)
    reason: str | None = None
    artifact: str | None = None
    artifact_reused: bool | None = None
    prepare_s: float | None = None  # export time when the artifact had to be made (not part of load_s)
    backend_version: str | None = None
    load_s: float | None = None  # artifact load (+ compile) until the runtime is ready
    first_ms: float | None = None  # the first call after loading
    warmup: int = 0  # untimed calls, including the first
    latency: LatencyStats | None = None
    fps: float | None = None  # calls per second at batch 1 (None at batch > 1: see throughput)
    throughput: float | None = None  # images per second
    rss_mb: float | None = None  # process resident memory after the row (process-wide)
    peak_rss_mb: float | None = None  # process high-water mark so far (process-wide, never decreases)
    load_1m: float | None = None  # system 1-minute load average when timing ended: > cores means contention
    speedup_vs_torch: float | None = None  # PyTorch eager mean / this mean, same size, batch, device, mode
    parity: dict[str, Any] | None = None
    stages: dict[str, LatencyStats] | None = None  # end-to-end mode: read, preprocess, infer, postprocess
    samples_ms: list[float] | None = None
    weights: str | None = None
    random_weights: bool | None = None
    notes: list[str] = field(default_factory=list)  # how the artifact was made (export time, calibration...)

    @property
    def key(self) -> RowKey:
        return RowKey(self.size, self.backend, self.precision, self.batch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size, "backend": self.backend, "precision": self.precision, "batch": self.batch,
            "mode": self.mode, "tier": self.tier, "device": self.device, "device_name": self.device_name,
            "threads": self.threads, "status": self.status, "reason": self.reason, "artifact": self.artifact,
            "artifact_reused": self.artifact_reused, "prepare_s": self.prepare_s,
            "backend_version": self.backend_version, "weights": self.weights, "random_weights": self.random_weights,
            "load_s": self.load_s, "first_ms": self.first_ms, "warmup": self.warmup,
            "iters": self.latency.count if self.latency else 0,
            "latency_ms": None if self.latency is None else self.latency.to_dict(),
            "fps": self.fps, "throughput_ips": self.throughput, "rss_mb": self.rss_mb,
            "peak_rss_mb": self.peak_rss_mb, "load_1m": self.load_1m, "speedup_vs_torch": self.speedup_vs_torch,
            "parity": self.parity,
            "stages_ms": None if self.stages is None else {k: v.to_dict() for k, v in self.stages.items()},
            "notes": list(self.notes), "samples_ms": self.samples_ms,
        }


@dataclass
class BenchResult:
    config: BenchConfig
    system: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "tool": "deimv2-bench", "created_utc": self.created,
                "elapsed_s": round(self.elapsed_s, 3), "command": self.system.get("command"),
                "config": self.config.to_dict(), "system": self.system, "rows": [r.to_dict() for r in self.rows]}


# --- timing ---------------------------------------------------------------------------------------------
@dataclass
class Timing:
    first_ns: int
    warmup: int  # untimed calls including the first
    samples_ns: list[int]
    output: Any  # what the first call returned (for parity)
    stages_ns: dict[str, list[int]] | None = None


def _make_sync(device: str) -> Callable[[], None] | None:
    """torch.cuda.synchronize for CUDA rows, so queued GPU work is inside the timed span."""
    if tier_of(device) != "GPU" or "torch" not in sys.modules:
        return None
    torch = sys.modules["torch"]
    if not torch.cuda.is_available():
        return None
    return torch.cuda.synchronize


def time_calls(call: Callable[[], Any], *, warmup: int, iters: int | None = None, seconds: float | None = None,
               sync: Callable[[], None] | None = None, progress: Callable[[int, float], None] | None = None,
               staged: bool = False) -> Timing:
    """Time `call()` after `warmup` untimed calls (the first of which is timed alone as first-inference).

    Exactly one of `iters` / `seconds`. With `staged=True`, `call()` returns (output, {stage: ns}) and
    the per-stage times are kept next to the whole-call time. Every timed call is kept.
    """
    if (iters is None) == (seconds is None):
        raise ValueError("give exactly one of iters or seconds")
    clock = time.perf_counter_ns

    def once() -> tuple[int, Any]:
        if sync:
            sync()
        t0 = clock()
        out = call()
        if sync:
            sync()
        return clock() - t0, out

    first_ns, first = once()
    output = first[0] if staged else first
    for _ in range(warmup - 1):
        once()
    samples: list[int] = []
    stages: dict[str, list[int]] = {}
    deadline = None if seconds is None else clock() + int(seconds * 1e9)
    start = clock()
    while True:
        if iters is not None and len(samples) >= iters:
            break
        if deadline is not None and len(samples) >= MIN_ITERS and clock() >= deadline:
            break
        ns, out = once()
        samples.append(ns)
        if staged:
            for name, value in out[1].items():
                stages.setdefault(name, []).append(value)
        if progress:
            progress(len(samples), (clock() - start) / 1e9)
    return Timing(first_ns, warmup, samples, output, stages if staged else None)


class _Progress:
    """A tqdm bar over timed calls (count) or over seconds; silent when disabled or tqdm is missing."""

    def __init__(self, label: str, iters: int | None, seconds: float | None, enabled: bool) -> None:
        self.bar = None
        self.by_time = iters is None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        if self.by_time:
            # disable=None: no bar when stderr is not a terminal (logs get the one line per row instead)
            self.bar = tqdm(total=round(float(seconds), 1), desc=label, unit="s", leave=False, file=sys.stderr,
                            disable=None, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s "
                                                     "{postfix}")
        else:
            self.bar = tqdm(total=iters, desc=label, unit="call", leave=False, file=sys.stderr, disable=None)

    def __call__(self, done: int, elapsed: float) -> None:
        if self.bar is None:
            return
        if self.by_time:
            self.bar.set_postfix_str(f"{done} calls", refresh=False)
            self.bar.update(max(0.0, min(elapsed, self.bar.total) - self.bar.n))
        else:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _memory_mb() -> tuple[float | None, float]:
    """(current RSS, process peak RSS) in MiB; both are process-wide, not per row."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20, peak
    except ImportError:
        return None, peak


# --- artifacts and runtimes -----------------------------------------------------------------------------
def _checkpoint(size: str, config: BenchConfig) -> Path | None:
    """The official checkpoint of `size`, None with --random-weights; Skip when there is none."""
    if config.random_weights:
        return None
    from deimv2_deploy.models.checkpoint import find_checkpoint

    try:
        return find_checkpoint(size, config.store)
    except FileNotFoundError as e:
        raise Skip(str(e)) from None


def load_torch_reference(size: str, config: BenchConfig, precision: str = "fp32") -> Runtime:
    """PyTorch eager of the deploy-mode model (+ postprocess) for `size`: the speed and parity reference.

    Same weights as the exporters use (the checkpoint in the store, or the deterministic random weights).
    """
    from deimv2_deploy.runtimes.torch_backend import TorchRuntime

    reason = TorchRuntime.unavailable_reason()
    if reason:
        raise Skip(reason)
    checkpoint = _checkpoint(size, config)
    return TorchRuntime.for_variant(size, checkpoint=checkpoint, random_weights=config.random_weights,
                                    store=config.store, device=config.device, precision=precision,
                                    threads=config.threads_used)


@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Tracer warnings of an export would bury the table's log; the exporters check parity instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _stored_artifact(key: RowKey, config: BenchConfig, ext: str) -> Path | None:
    """This row's artifact if the store has it: a dynamic-batch file serves every batch, else a fixed one of this
    batch."""
    from deimv2_deploy.exporters.common import artifact_name

    for batch in (None, key.batch):
        path = config.store / artifact_name(key.size, key.precision, config.random_weights, batch, ext)
        if path.exists():
            return path
    return None


def _onnx_artifact(key: RowKey, config: BenchConfig, workdir: Path, row: BenchRow) -> tuple[Path, bool, float | None]:
    """(path, reused, export seconds) of the ONNX file for this row; exported when not in the store."""
    if key.precision not in ("fp32", "fp16"):
        raise Skip(f"no {key.precision.upper()} ONNX export (INT8 is timed through OpenVINO + NNCF)")
    store = config.store
    stored = _stored_artifact(key, config, ".onnx")
    if stored is not None:
        return stored, True, None
    checkpoint = _checkpoint(key.size, config)
    from deimv2_deploy.exporters.onnx_export import export_onnx

    _log(config, f"exporting {key.size} {key.precision} ONNX to {store} (reused next time)")
    t0 = time.perf_counter()
    with _quiet_warnings():
        result = export_onnx(key.size, checkpoint=checkpoint, random_weights=config.random_weights,
                             output_dir=store, fp16=key.precision == "fp16", quiet=True)
    return Path(result.path), False, time.perf_counter() - t0


CALIBRATION_SCENES = 32


def _calibration(key: RowKey, config: BenchConfig, workdir: Path) -> str | None:
    """The INT8 calibration folder: --calibration, else (random weights only) synthetic scenes written here."""
    if key.precision != "int8":
        return None
    if config.calibration:
        return config.calibration
    if not config.random_weights:
        raise Skip("INT8 needs calibration images: pass --calibration DIR (a few hundred images like those the "
                   "model will see)")
    from deimv2_deploy.exporters.parity import parity_images
    from deimv2_deploy.media import write_image

    folder = workdir / "synthetic_calibration_scenes"  # the name is kept in the artifact's build notes
    if not folder.exists():
        for i, image in enumerate(parity_images(CALIBRATION_SCENES, seed=1)):
            write_image(folder / f"scene_{i:03d}.png", image)
    return str(folder)


def _artifact_notes(spec: Any) -> list[str]:
    """What the artifact's metadata says about how it was built, where it matters for reading the row."""
    build = getattr(spec, "build", None) or {}
    notes = []
    calibration = build.get("calibration")
    if isinstance(calibration, dict):
        folder = Path(str(calibration.get("folder", "?")))
        source = ("synthetic scenes (deimv2-bench, random weights)" if folder.parent.name.startswith("deimv2-bench-")
                  else folder.name)
        notes.append(f"INT8 (NNCF) calibrated on {calibration.get('images', '?')} images: {source}")
    if build.get("source"):
        notes.append(f"converted from {build['source']}")
    return notes


def _openvino_artifact(key: RowKey, config: BenchConfig, workdir: Path, row: BenchRow
                       ) -> tuple[Path, bool, float | None]:
    """(path, reused, export seconds) of the OpenVINO IR (.xml) for this row."""
    store = config.store
    stored = _stored_artifact(key, config, ".xml")
    if stored is not None:
        return stored, True, None
    try:
        from deimv2_deploy.exporters import openvino_export
    except ImportError as e:
        raise Skip(f"the OpenVINO exporter is not available here ({e})") from None
    checkpoint = _checkpoint(key.size, config)
    calibration = _calibration(key, config, workdir)
    _log(config, f"exporting {key.size} {key.precision} OpenVINO IR to {store} (reused next time)")
    t0 = time.perf_counter()
    try:
        with _quiet_warnings():
            result = openvino_export.export_openvino(key.size, checkpoint=checkpoint,
                                                     random_weights=config.random_weights, output_dir=store,
                                                     precision=key.precision, calibration=calibration, quiet=True)
    except (NotImplementedError, ImportError) as e:
        raise Skip(f"OpenVINO {key.precision.upper()} export unavailable: {e}") from None
    return Path(result.path), False, time.perf_counter() - t0


def _tensorrt_artifact(key: RowKey, config: BenchConfig, workdir: Path, row: BenchRow
                       ) -> tuple[Path, bool, float | None]:
    """(path, reused, build seconds) of the TensorRT engine for this row."""
    store = config.store
    stored = _stored_artifact(key, config, ".engine")
    if stored is not None:
        return stored, True, None
    try:
        from deimv2_deploy.exporters import tensorrt_export
    except ImportError as e:
        raise Skip(f"the TensorRT exporter is not available here ({e})") from None
    checkpoint = _checkpoint(key.size, config)
    calibration = _calibration(key, config, workdir)
    _log(config, f"building {key.size} {key.precision} TensorRT engine in {store} (reused next time)")
    t0 = time.perf_counter()
    with _quiet_warnings():
        result = tensorrt_export.export_tensorrt(key.size, checkpoint=checkpoint,
                                                 random_weights=config.random_weights, output_dir=store,
                                                 precision=key.precision, calibration=calibration, quiet=True)
    return Path(result.path), False, time.perf_counter() - t0


def _official_artifact(key: RowKey, config: BenchConfig, workdir: Path, row: BenchRow
                       ) -> tuple[Path, bool, float | None]:
    """(path, reused, export seconds) of the official-style ONNX (the baseline) of this row's size."""
    from deimv2_deploy.exporters.onnx_export import export_official_style_onnx, official_style_name

    if key.precision != "fp32":
        raise Skip("the official exporter makes FP32 ONNX only")
    path = config.store / official_style_name(key.size, config.random_weights)
    if path.exists():
        return path, True, None
    checkpoint = _checkpoint(key.size, config)
    _log(config, f"exporting the official-style {key.size} ONNX to {config.store} (reused next time)")
    t0 = time.perf_counter()
    with _quiet_warnings():
        export_official_style_onnx(key.size, checkpoint=checkpoint, random_weights=config.random_weights,
                                   output_dir=config.store)
    return path, False, time.perf_counter() - t0


def _backend_reason(backend: str, device: str) -> str | None:
    """Why `backend` cannot run on `device` here, before any artifact is made (None: it may run)."""
    from deimv2_deploy.runtimes import available_backends

    gpu = tier_of(device) == "GPU"
    if backend == "tensorrt" and not gpu:
        return "TensorRT runs only on NVIDIA GPUs: use --device cuda"
    if backend == "openvino" and gpu:
        return "OpenVINO targets CPUs and Intel GPUs, not CUDA devices: use --device cpu"
    return available_backends().get(backend)


def _load(key: RowKey, config: BenchConfig, row: BenchRow, workdir: Path) -> Runtime:
    """Make or reuse the artifact of `key` and load it; fills the row's artifact fields and load time."""
    if key.backend == "torch":
        if key.precision == "int8":
            raise Skip("no INT8 PyTorch eager path (INT8 is timed through OpenVINO + NNCF or TensorRT)")
        if key.precision == "fp16" and tier_of(config.device) == "CPU":
            raise Skip("PyTorch eager FP16 needs a CUDA device (CPU half kernels are slower than FP32)")
        t0 = time.perf_counter()
        runtime = load_torch_reference(key.size, config, key.precision)
        row.load_s = time.perf_counter() - t0
        row.artifact = "(in memory: deimv2_deploy.models deploy graph)"
        return runtime
    official = key.backend in OFFICIAL_BACKENDS
    backend = OFFICIAL_BACKENDS.get(key.backend, key.backend)
    reason = _backend_reason(backend, config.device)
    if reason:
        raise Skip(reason)
    make = {"onnxruntime": _onnx_artifact, "openvino": _openvino_artifact, "tensorrt": _tensorrt_artifact}
    if backend not in make:
        raise Skip(f"no artifact recipe for backend {key.backend!r}")
    path, reused, prepare_s = (_official_artifact if official else make[backend])(key, config, workdir, row)
    row.artifact, row.artifact_reused, row.prepare_s = str(path), reused, prepare_s
    from deimv2_deploy.runtimes import load_runtime

    # the baseline runs as a user's stock setup would: no metadata in the file, OpenVINO compiles it as exported
    options: dict[str, Any] = {"variant": key.size, "fixed_batch_one": False} if official else {}
    if official:
        row.notes.append("official-style export (plain trace, dynamic batch), stock runtime settings")
    if backend == "onnxruntime" and config.interleave:
        # idle ONNX Runtime workers busy-wait for tens of ms after each run, taking the CPU from whichever row
        # runs next in the rotation; without spinning every row gets the machine to itself
        options["spinning"] = False
        row.notes.append("ONNX Runtime spinning off (interleaved rows)")
    t0 = time.perf_counter()
    runtime = load_runtime(path, backend=backend, device=config.device, threads=config.threads_used, **options)
    row.load_s = time.perf_counter() - t0
    return runtime


# --- one row ---------------------------------------------------------------------------------------------
def _bench_inputs(runtime: Runtime, batch: int):
    """The fixed test scenes of the exporters' parity check, preprocessed: the same input on every backend."""
    from deimv2_deploy.exporters.parity import parity_batch

    return parity_batch(runtime.spec, count=batch)


def _end_to_end_call(runtime: Runtime, batch: int, workdir: Path) -> Callable[[], tuple[Any, dict[str, int]]]:
    """Read + prepare + infer + detections of `batch` JPEG scenes, each stage timed (a staged call)."""
    from deimv2_deploy.exporters.parity import parity_images
    from deimv2_deploy.media import read_image, write_image

    paths = [write_image(workdir / f"scene_{i}.jpg", image) for i, image in enumerate(parity_images(batch))]
    sync = _make_sync(runtime.device)
    clock = time.perf_counter_ns

    def call() -> tuple[Any, dict[str, int]]:
        t0 = clock()
        images = [read_image(p) for p in paths]
        t1 = clock()
        prepared = runtime.prepare(images)
        t2 = clock()
        outputs = runtime.infer(prepared.as_inputs())
        if sync:
            sync()
        t3 = clock()
        detections = runtime.detections_from_outputs(outputs, prepared)
        t4 = clock()
        return outputs, {"read": t1 - t0, "preprocess": t2 - t1, "infer": t3 - t2, "postprocess": t4 - t3,
                         "detections": len(detections)}

    return call


PREDICT_IMAGE_HW = (480, 640)


def _predict_call(runtime: Runtime, key: RowKey) -> tuple[Callable[[], Any], bool]:
    """(call, graph_only) for predict mode: our runtimes end to end on in-memory 640x480 BGR images; the
    baselines (PyTorch eager, official-style exports) on prepared inputs, as users run them today."""
    from deimv2_deploy.exporters.parity import parity_images

    if key.backend == "torch" or key.backend in OFFICIAL_BACKENDS:
        inputs = _bench_inputs(runtime, key.batch).as_inputs()
        return (lambda: runtime.infer(inputs)), True
    image = parity_images(1)[0]  # the 640x480 scene
    assert image.shape[:2] == PREDICT_IMAGE_HW
    if key.batch == 1:
        return (lambda: runtime.predict(image)), False
    images = [image] * key.batch
    return (lambda: runtime.predict(images)), False


def _video_timing(runtime: Runtime, config: BenchConfig, progress: Any) -> Timing:
    """Per-frame time of `Runtime.stream`: the interval between frames it delivers.

    The stream decodes and preprocesses in a background thread while the caller's thread infers, so the
    interval is the pipeline's time per frame (1 / its FPS), not the sum of the stages.
    """
    try:
        import deimv2_deploy.video  # noqa: F401
    except ImportError as e:
        raise Skip(f"video mode needs deimv2_deploy.video, which is not available here ({e})") from None
    frames: Iterator[Any] = iter(runtime.stream(config.video))

    def call() -> Any:
        try:
            return next(frames)
        except StopIteration:
            raise _VideoEnded from None

    clock = time.perf_counter_ns
    t0 = clock()
    try:
        call()
    except _VideoEnded:
        raise Skip(f"the video {config.video} has no frames") from None
    first_ns = clock() - t0
    samples: list[int] = []
    warm = 1
    target = config.iters
    deadline = None if config.seconds is None else clock() + int(config.seconds * 1e9)
    start = clock()
    try:
        while warm < config.warmup:
            call()
            warm += 1
        while (target is None or len(samples) < target) and (deadline is None or clock() < deadline
                                                                or len(samples) < MIN_ITERS):
            t = clock()
            call()
            samples.append(clock() - t)
            if progress:
                progress(len(samples), (clock() - start) / 1e9)
    except _VideoEnded:
        pass  # a short video: report what it had (the row says how many frames were timed)
    finally:
        close = getattr(frames, "close", None)
        if close:
            close()  # stops the stream's reader thread
    if not samples:
        raise Skip(f"the video {config.video} has no frames left after {warm} warm-up frames: use a longer video "
                   "or a smaller --warmup")
    return Timing(first_ns, warm, samples, None)


class _VideoEnded(Exception):
    pass


def _parity(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], precision: str) -> dict[str, Any]:
    from deimv2_deploy.exporters.parity import match_detections

    box_tol, score_tol = PARITY_TOLERANCES[precision]
    report = match_detections({k: np.asarray(outputs[k]) for k in ("labels", "boxes", "scores")}, reference,
                              box_tol=box_tol, score_tol=score_tol)
    return {"against": "torch", "ok": report["ok"], "matched_fraction": report["fraction"],
            "matched": report["matched"], "total": report["total"], "max_box_diff": report["max_box_diff"],
            "max_score_diff": report["max_score_diff"], "box_tol": box_tol, "score_tol": score_tol}


class _References:
    """PyTorch outputs on the benchmark input per (size, batch): from the torch row, or built just for parity."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.outputs: dict[tuple[str, int], dict[str, np.ndarray] | str] = {}

    def put(self, size: str, batch: int, outputs: Mapping[str, np.ndarray]) -> None:
        self.outputs[(size, batch)] = {k: np.asarray(outputs[k]) for k in ("labels", "boxes", "scores")}

    def get(self, size: str, batch: int) -> dict[str, np.ndarray] | str:
        """The reference outputs, or a string saying why there are none."""
        if (size, batch) not in self.outputs:
            try:
                runtime = load_torch_reference(size, self.config)
                self.put(size, batch, runtime.infer(_bench_inputs(runtime, batch).as_inputs()))
                runtime.close()
            except Skip as e:
                self.outputs[(size, batch)] = f"no PyTorch reference: {e}"
            except Exception as e:  # noqa: BLE001 - a broken reference must not stop the timing
                self.outputs[(size, batch)] = f"no PyTorch reference: {type(e).__name__}: {e}"
        return self.outputs[(size, batch)]


def _open_row(key: RowKey, config: BenchConfig, loaders: Mapping[str, Loader], names: tuple[str, str],
              workdir: Path) -> tuple[BenchRow, Runtime | None]:
    """The row with its runtime loaded, or (skipped/failed row, None)."""
    row = BenchRow(key.size, key.backend, key.precision, key.batch, config.mode, tier_of(config.device),
                   config.device, names[0], config.threads_used)
    runtime = None
    try:
        if key.backend in loaders:
            t0 = time.perf_counter()
            runtime = loaders[key.backend](key, config)
            row.load_s = time.perf_counter() - t0
        else:
            runtime = _load(key, config, row, workdir)
        row.backend_version = runtime.version()
        row.weights, row.random_weights = runtime.spec.weights, runtime.spec.random_weights
        row.notes += _artifact_notes(runtime.spec)
        if runtime.spec.batch is not None and runtime.spec.batch != key.batch:
            raise Skip(f"{row.artifact} has a fixed batch of {runtime.spec.batch}; export a dynamic-batch artifact")
        return row, runtime
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others; the reason is reported
        _fail(row, e)
        if runtime is not None:
            runtime.close()
        return row, None


def _fail(row: BenchRow, error: Exception) -> None:
    if isinstance(error, (Skip, BackendUnavailableError)):
        row.status, row.reason = "skipped", str(error)
    else:
        row.status, row.reason = "failed", f"{type(error).__name__}: {error}"


def _row_call(runtime: Runtime, key: RowKey, config: BenchConfig, workdir: Path, row: BenchRow
              ) -> tuple[Callable[[], Any], bool, bool]:
    """(call, staged, graph_only) timed for this row in model, end-to-end and predict modes."""
    if config.mode == "model":
        inputs = _bench_inputs(runtime, key.batch).as_inputs()
        return (lambda: runtime.infer(inputs)), False, True
    if config.mode == "end-to-end":
        return _end_to_end_call(runtime, key.batch, workdir), True, False
    call, graph_only = _predict_call(runtime, key)
    if graph_only:
        row.notes.append("baseline: graph only on prepared inputs, as users run it today")
    return call, False, graph_only


def _finish_row(row: BenchRow, key: RowKey, runtime: Runtime, timing: Timing, graph_only: bool,
                config: BenchConfig, references: _References) -> BenchRow:
    """Statistics, memory and parity of a timed row; closes its runtime."""
    try:
        row.rss_mb, row.peak_rss_mb = _memory_mb()  # while the runtime is still loaded
        row.load_1m = (load_average() or [None])[0]
        # outputs on the fixed parity input (graph-only timing: the timed input itself; other modes read JPEGs,
        # images or video frames, so one more untimed call on the exact input the PyTorch reference saw)
        outputs = None
        if config.parity or key.backend == "torch":
            outputs = (timing.output if graph_only and config.mode in ("model", "predict")
                       else runtime.infer(_bench_inputs(runtime, key.batch).as_inputs()))
    except Exception as e:  # noqa: BLE001
        _fail(row, e)
        return row
    finally:
        runtime.close()

    row.first_ms = timing.first_ns / 1e6
    row.warmup = timing.warmup
    row.latency = summarize(timing.samples_ns)
    row.fps = fps_from_mean(row.latency.mean) if key.batch == 1 else None
    row.throughput = throughput_from_mean(row.latency.mean, key.batch)
    if timing.stages_ns:
        row.stages = {name: summarize(values) for name, values in timing.stages_ns.items()}
    if config.keep_samples:
        row.samples_ms = [round(s / 1e6, 4) for s in timing.samples_ns]
    if outputs is not None:
        if key.backend == "torch" and key.precision == "fp32":
            references.put(key.size, key.batch, outputs)
        elif config.parity:
            reference = references.get(key.size, key.batch)
            row.parity = ({"against": "torch", "ok": None, "detail": reference} if isinstance(reference, str)
                          else _parity(outputs, reference, key.precision))
    return row


def _bench_row(key: RowKey, config: BenchConfig, loaders: Mapping[str, Loader], references: _References,
               names: tuple[str, str], label: str, workdir: Path) -> BenchRow:
    row, runtime = _open_row(key, config, loaders, names, workdir)
    if runtime is None:
        return row
    graph_only = False
    bar = _Progress(label, config.iters, config.seconds, config.progress)
    try:
        if config.mode == "video":
            timing = _video_timing(runtime, config, bar)
        else:
            call, staged, graph_only = _row_call(runtime, key, config, workdir, row)
            timing = time_calls(call, warmup=config.warmup, iters=config.iters, seconds=config.seconds,
                                sync=_make_sync(config.device), progress=bar, staged=staged)
            if timing.stages_ns:
                timing.stages_ns.pop("detections", None)
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others; the reason is reported
        _fail(row, e)
        runtime.close()
        return row
    finally:
        bar.close()
    return _finish_row(row, key, runtime, timing, graph_only, config, references)


def time_round_robin(calls: Mapping[Any, tuple[Callable[[], Any], bool]], *, warmup: int, iters: int | None = None,
                     seconds: float | None = None, sync: Callable[[], None] | None = None,
                     progress: Callable[[int, float], None] | None = None) -> dict[Any, Timing | Exception]:
    """`time_calls` for several calls that take turns: every round times each call once, in order.

    `calls` maps a key to (call, staged). With `seconds`, rounds continue until `seconds` per call have passed in
    all (at least MIN_ITERS rounds). A call that raises drops out; its key maps to the exception.
    """
    if (iters is None) == (seconds is None):
        raise ValueError("give exactly one of iters or seconds")
    clock = time.perf_counter_ns
    live = dict(calls)
    out: dict[Any, Timing | Exception] = {}
    first: dict[Any, tuple[int, Any]] = {}
    samples: dict[Any, list[int]] = {k: [] for k in calls}
    stages: dict[Any, dict[str, list[int]]] = {k: {} for k in calls}

    def once(key: Any) -> tuple[int, Any] | None:
        call, _ = live[key]
        try:
            if sync:
                sync()
            t0 = clock()
            result = call()
            if sync:
                sync()
            return clock() - t0, result
        except Exception as e:  # noqa: BLE001 - reported in the row
            out[key] = e
            del live[key]
            return None

    for key in list(live):
        done = once(key)
        if done is not None:
            first[key] = done
            for _ in range(warmup - 1):
                if key in live:
                    once(key)
    deadline = None if seconds is None else clock() + int(seconds * 1e9) * max(1, len(live))
    start, rounds = clock(), 0
    while live:
        if iters is not None and rounds >= iters:
            break
        if deadline is not None and rounds >= MIN_ITERS and clock() >= deadline:
            break
        for key in list(live):
            done = once(key)
            if done is None:
                continue
            samples[key].append(done[0])
            if live[key][1]:
                for name, value in done[1][1].items():
                    stages[key].setdefault(name, []).append(value)
        rounds += 1
        if progress:
            progress(rounds, (clock() - start) / 1e9)
    for key in live:
        staged = live[key][1]
        output = first[key][1][0] if staged else first[key][1]
        out[key] = Timing(first[key][0], warmup, samples[key], output, stages[key] if staged else None)
    return out


def _bench_group(keys: Sequence[RowKey], config: BenchConfig, loaders: Mapping[str, Loader],
                 references: _References, names: tuple[str, str], label: str, workdir: Path) -> list[BenchRow]:
    """Rows of one size and batch, loaded together and timed in turns (`interleave`)."""
    opened = [(key, *_open_row(key, config, loaders, names, workdir)) for key in keys]
    calls, graph_only = {}, {}
    for i, (key, row, runtime) in enumerate(opened):
        if runtime is None:
            continue
        try:
            call, staged, graph_only[i] = _row_call(runtime, key, config, workdir, row)
            calls[i] = (call, staged)
        except Exception as e:  # noqa: BLE001
            _fail(row, e)
            runtime.close()
    bar = _Progress(label, config.iters, None if config.seconds is None else config.seconds * max(1, len(calls)),
                    config.progress)
    try:
        timings = time_round_robin(calls, warmup=config.warmup, iters=config.iters, seconds=config.seconds,
                                   sync=_make_sync(config.device), progress=bar)
    finally:
        bar.close()
    rows = []
    for i, (key, row, runtime) in enumerate(opened):
        if i in calls:
            timing = timings[i]
            if isinstance(timing, Exception):
                _fail(row, timing)
                runtime.close()
            else:
                if timing.stages_ns:
                    timing.stages_ns.pop("detections", None)
                row = _finish_row(row, key, runtime, timing, graph_only[i], config, references)
        rows.append(row)
    return rows


def _speedups(rows: Sequence[BenchRow]) -> None:
    torch_mean = {(r.size, r.batch, r.device, r.mode): r.latency.mean
                  for r in rows if r.backend == "torch" and r.precision == "fp32" and r.status == "ok" and r.latency}
    for r in rows:
        base = torch_mean.get((r.size, r.batch, r.device, r.mode))
        if r.status == "ok" and r.latency and base:
            r.speedup_vs_torch = base / r.latency.mean


def _log(config: BenchConfig, message: str) -> None:
    if config.progress:
        print(message, file=sys.stderr, flush=True)


def _describe_row(row: BenchRow) -> str:
    head = f"{row.size} {row.backend} {row.precision} b{row.batch}"
    if row.status != "ok":
        return f"{head}: {row.status.upper()} ({row.reason})"
    lat = row.latency
    return (f"{head}: mean {lat.mean:.2f} ms, p50 {lat.p50:.2f}, p99 {lat.p99:.2f}, max {lat.max:.2f} "
            f"over {lat.count} calls; first {row.first_ms:.1f} ms, load {row.load_s:.2f} s")


# --- the run ---------------------------------------------------------------------------------------------
def run_benchmark(config: BenchConfig, loaders: Mapping[str, Loader] | None = None,
                  on_row: Callable[[BenchResult], None] | None = None) -> BenchResult:
    """Every (size, backend, precision, batch) row of `config`, in order size > backend > precision > batch.

    `loaders` maps a backend name to a function building its Runtime (tests use it for synthetic backends);
    other names must be real backends. `on_row(result)` is called after each row with the partial result
    (e.g. to save it during a long run).
    """
    loaders = dict(loaders or {})
    for b in config.backends:
        if b not in loaders and b not in OFFICIAL_BACKENDS:
            Backend.parse(b)  # raises with the list of backends
    backends = sorted({b if b in loaders or b in OFFICIAL_BACKENDS else Backend.parse(b).value
                       for b in config.backends},
                      key=lambda b: (BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER), b))
    cpu, gpus = cpu_info(), (gpu_info() if tier_of(config.device) == "GPU" else [])
    names = (device_name(config.device, cpu, gpus), config.device)
    system = system_fingerprint(config.threads_used, config.command or command_line())
    result = BenchResult(config, system)
    references = _References(config)
    keys = [RowKey(s, b, p, n) for s in config.sizes for b in backends for p in config.precisions
            for n in config.batches]
    if config.interleave:  # one group per (size, batch): its rows take turns
        groups: dict[tuple[str, int], list[RowKey]] = {}
        for key in keys:
            groups.setdefault((key.size, key.batch), []).append(key)
        steps = list(groups.values())
    else:
        steps = [[key] for key in keys]
    t0 = time.perf_counter()
    done = 0
    with tempfile.TemporaryDirectory(prefix="deimv2-bench-") as tmp:
        for step in steps:
            first = step[0]
            label = (f"[{done + 1}/{len(keys)}] {first.size} {first.backend} {first.precision} b{first.batch}"
                     if len(step) == 1 else f"[{done + 1}-{done + len(step)}/{len(keys)}] {first.size} b{first.batch}"
                     f" ({len(step)} rows in turns)")
            rows = ([_bench_row(first, config, loaders, references, names, label, Path(tmp))] if not config.interleave
                    else _bench_group(step, config, loaders, references, names, label, Path(tmp)))
            for row in rows:
                done += 1
                result.rows.append(row)
                _log(config, f"[{done}/{len(keys)}] {_describe_row(row)}")
            _speedups(result.rows)
            result.elapsed_s = time.perf_counter() - t0
            system["load_average_end"] = load_average()
            if on_row:
                on_row(result)
    return result


def quick_atto_table(store_dir: str | os.PathLike | None = None, iters: int = 30, threads: int | None = None) -> str:
    """The CPU-tier table of DEIMv2-atto on every backend (random weights, batch 1), as markdown.

    Exports the ONNX/OpenVINO artifacts into `store_dir` when they are not there yet. For `make demo`.
    """
    from deimv2_deploy.benchmarks.report import to_markdown

    config = BenchConfig(sizes=("atto",), backends=tuple(b.value for b in Backend), precisions=("fp32",), device="cpu",
                         threads=threads, warmup=5, iters=iters, random_weights=True,
                         checkpoint_dir=None if store_dir is None else str(store_dir), progress=False,
                         keep_samples=False)
    command = (f"deimv2-bench --sizes atto --backends all --iters {iters} --warmup 5 --random-weights"
               + (f" --checkpoint-dir {store_dir}" if store_dir is not None else "")
               + (f" --threads {threads}" if threads else ""))
    config = replace(config, command=command)
    return to_markdown(run_benchmark(config))
