"""deimv2-bench's configuration and results: what to run (`BenchConfig`), one row's key and result (`RowKey`,
`BenchRow`), the whole run (`BenchResult`, whose `to_dict` is the JSON schema), and `Skip`."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from deimv2_deploy.benchmarks.stats import LatencyStats
from deimv2_deploy.errors import BackendUnavailableError
from deimv2_deploy.runtimes.base import Backend, Runtime
from deimv2_deploy.variants import VARIANT_NAMES, get_variant_info

__all__ = ["BenchConfig", "BenchRow", "BenchResult", "RowKey", "Skip", "Loader", "MODES", "VIT_MODES", "VIT_BACKENDS",
           "OFFICIAL_BACKENDS", "fail_row",
           "BACKEND_ORDER", "DEFAULT_ITERS", "MIN_ITERS", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
MODES = ("model", "end-to-end", "video", "predict")
VIT_MODES = ("model", "predict")  # --vit rows: the graph on pixel_values, or Runtime.predict on an image
VIT_BACKENDS = ("torch", "onnxruntime", "openvino")  # torch: transformers' eager model (a folder given)
# baselines: the official-style ONNX on a stock runtime (pseudo-backend -> the runtime library that runs it)
OFFICIAL_BACKENDS = {"onnxruntime-official": "onnxruntime", "openvino-official": "openvino"}
BACKEND_ORDER = (Backend.TORCH.value, *OFFICIAL_BACKENDS,  # torch first: the reference of speed-up and parity
                 *(b.value for b in Backend if b is not Backend.TORCH))
DEFAULT_ITERS = 100
MIN_ITERS = 3  # a --seconds run still times at least this many calls

Loader = Callable[["RowKey", "BenchConfig"], Runtime]


class Skip(Exception):
    """This row cannot run on this machine; the message is the reason shown in the table."""


def fail_row(row: BenchRow, error: Exception) -> None:
    """Mark `row` skipped (Skip, a missing backend library) or failed (any other error), with the reason."""
    if isinstance(error, (Skip, BackendUnavailableError)):
        row.status, row.reason = "skipped", str(error)
    else:
        row.status, row.reason = "failed", f"{type(error).__name__}: {error}"


def rows_from_timings(opened: list[tuple[Any, BenchRow, Any]], calls: dict[int, Any], timings: dict[int, Any],
                      finish: Callable[[int, Any, BenchRow, Any, Any], BenchRow]) -> list[BenchRow]:
    """The rows of a group timed together: `opened` (key, row, runtime) in order; a row that got no call keeps what
    it has, a timing that raised fails its row (and closes its runtime), the others go through `finish(i, key, row,
    runtime, timing)`."""
    rows = []
    for i, (key, row, runtime) in enumerate(opened):
        if i in calls:
            timing = timings[i]
            if isinstance(timing, Exception):
                fail_row(row, timing)
                runtime.close()
            else:
                row = finish(i, key, row, runtime, timing)
        rows.append(row)
    return rows


# --- configuration ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    sizes: tuple[str, ...] | None = None  # DEIMv2 sizes (default atto); must stay None with `vit`
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
    checkpoint: str | None = None  # one size's weights file (e.g. a deimv2-train release): its artifacts get a store
    # folder of their own (keyed by the file's digest) so another checkpoint's are never reused
    calibration: str | None = None  # INT8 calibration: images or a COCO dataset (default: the accuracy dataset, or
    # synthetic scenes with random weights)
    parity: bool = True
    progress: bool = True
    keep_samples: bool = True  # raw per-call latencies in the JSON
    command: str | None = None
    interleave: bool = False  # rows of one size and batch take turns call by call (see the module docstring)
    accuracy_images: str | None = None  # with accuracy_annotations: every row also measures COCO AP on this dataset
    accuracy_annotations: str | None = None
    max_images: int | None = None  # accuracy on the first N images only
    max_ap_drop: float | None = None  # AP points: choose the fastest row within this drop from FP32 (choice.py)
    # an EoMT-DINOv3 / DINOv3 model instead of DEIMv2 sizes (benchmarks/vit.py): a transformers folder (exported to
    # the store) or an exported .onnx / .xml; its rows carry the model's name in the `size` column
    vit: str | None = None
    tasks: tuple[str, ...] = ()  # EoMT in predict mode: the tasks Runtime.predict runs (default: the runtime's)

    def __post_init__(self) -> None:
        if self.vit is not None:
            self._check_vit()
            return
        if self.tasks:
            raise ValueError(f"--task {','.join(self.tasks)} chooses EoMT's tasks: it needs --vit EOMT_MODEL")
        sizes = tuple(get_variant_info(s).name for s in (("atto",) if self.sizes is None else self.sizes))
        if not sizes:
            raise ValueError("no sizes given: choose from " + ", ".join(VARIANT_NAMES))
        object.__setattr__(self, "sizes", sizes)
        if not self.backends:
            raise ValueError("no backends given: choose from " + ", ".join(BACKEND_ORDER))
        object.__setattr__(self, "backends", tuple(str(b).lower() for b in self.backends))
        from deimv2_deploy.benchmarks.artifacts import known_precisions  # those some row kind has

        known = known_precisions()
        for p in self.precisions:
            if p not in known:
                raise ValueError(f"unknown precision {p!r}: choose from {', '.join(known)}")
        if not self.precisions:
            raise ValueError("no precisions given: choose from " + ", ".join(known))
        self._check_common()
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: choose from {', '.join(MODES)}")
        if (self.accuracy_images is None) != (self.accuracy_annotations is None):
            raise ValueError("accuracy needs both the image folder and the annotation file (--images and "
                             "--annotations, or --data DIR)")
        if self.max_images is not None:
            if not self.accuracy:
                raise ValueError("--max-images bounds the accuracy dataset: add --accuracy")
            if self.max_images < 1:
                raise ValueError(f"--max-images must be at least 1, got {self.max_images}")
        if self.max_ap_drop is not None:
            if not self.accuracy:
                raise ValueError("--max-ap-drop chooses among rows by their measured AP: add --accuracy and a dataset")
            if not self.max_ap_drop >= 0:
                raise ValueError(f"--max-ap-drop is in AP points (0.5 allows AP 53.0 -> 52.5) and cannot be negative, "
                                 f"got {self.max_ap_drop}")
        if self.checkpoint is not None:
            if self.random_weights:
                raise ValueError("--checkpoint and --random-weights contradict each other: pass one")
            if len(self.sizes) != 1:
                raise ValueError(f"--checkpoint holds the weights of one size; got --sizes {','.join(self.sizes)}")
            if not Path(self.checkpoint).exists():
                raise FileNotFoundError(f"--checkpoint {self.checkpoint}: no such file or folder")
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

    def _check_common(self) -> None:
        """Batches, device, timing and threads: the same for DEIMv2 and --vit runs."""
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

    def _check_vit(self) -> None:
        """--vit: one EoMT / DINOv3 model; the DEIMv2-only options are one-line errors naming the option."""
        if self.sizes is not None:
            raise ValueError(f"--sizes {','.join(self.sizes)} picks DEIMv2 sizes; --vit {self.vit} benchmarks that one "
                             "model: leave --sizes out (or run the detectors without --vit)")
        object.__setattr__(self, "sizes", ())
        if not Path(self.vit).exists():
            raise FileNotFoundError(f"--vit {self.vit}: no such file or folder (give a transformers EoMT-DINOv3 / "
                                    "DINOv3 folder or its exported .onnx / .xml)")
        backends = tuple(dict.fromkeys(str(b).lower() for b in self.backends))
        if not backends:
            raise ValueError("no backends given: choose from " + ", ".join(VIT_BACKENDS))
        for b in backends:
            if b not in VIT_BACKENDS:
                raise ValueError(f"--vit rows run on {', '.join(VIT_BACKENDS)} (torch: transformers' eager model), "
                                 f"not {b!r}: drop it from --backends")
        object.__setattr__(self, "backends", backends)
        from deimv2_deploy.benchmarks.artifacts import known_precisions  # the detector's row kinds, reused

        known = known_precisions()
        if not self.precisions:
            raise ValueError("no precisions given: choose from " + ", ".join(known))
        for p in self.precisions:
            if p not in known:
                raise ValueError(f"unknown precision {p!r}: choose from {', '.join(known)}")
        self._check_common()
        if self.device != "cpu":
            raise ValueError(f"DINOv3/EoMT runtimes run on the CPU for now, not --device {self.device}: use cpu")
        if self.mode not in VIT_MODES:
            raise ValueError(f"--vit times --mode {' or '.join(VIT_MODES)}, not {self.mode!r}")
        if self.tasks and self.mode != "predict":
            raise ValueError(f"--task {','.join(self.tasks)} chooses what EoMT's predict runs: add --mode predict")
        given = [flag for flag, on in (("--checkpoint", self.checkpoint), ("--random-weights", self.random_weights),
                                       ("--video", self.video),
                                       ("--accuracy", self.accuracy_annotations or self.accuracy_images),
                                       ("--max-ap-drop", self.max_ap_drop is not None)) if on]
        if given:
            raise ValueError(f"{given[0]} is for DEIMv2 rows; --vit takes the model's own weights (folder or "
                             "artifact): leave it out")

    @property
    def accuracy(self) -> bool:
        """Whether every row also measures COCO AP (on accuracy_images + accuracy_annotations)."""
        return self.accuracy_annotations is not None

    @property
    def threads_used(self) -> int:
        if self.threads:
            return self.threads
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

    @property
    def store(self) -> Path:
        """The model store: --checkpoint-dir, else $DEIMV2_MODELS, else ./models; with --checkpoint FILE, its
        folder `bench-<file stem>-<digest>` in there."""
        from deimv2_deploy.exporters.common import resolve_store

        root = resolve_store(self.checkpoint_dir)
        if self.vit is not None and Path(self.vit).is_dir():  # a transformers folder's exports: a folder of its own
            return root / f"bench-{Path(self.vit).resolve().name}"
        if self.checkpoint is None:
            return root
        path = Path(self.checkpoint)
        if path.is_dir():
            return root / f"bench-{path.name}"
        from deimv2_deploy.files import file_sha256

        return root / f"bench-{path.stem}-{file_sha256(path)[:12]}"

    def to_dict(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes), "backends": list(self.backends), "precisions": list(self.precisions),
                "device": self.device, "batches": list(self.batches), "threads": self.threads_used,
                "warmup": self.warmup, "iters": self.iters, "seconds": self.seconds, "mode": self.mode,
                "video": self.video, "random_weights": self.random_weights, "checkpoint_dir": self.checkpoint_dir,
                "checkpoint": self.checkpoint,
                "calibration": self.calibration, "parity": self.parity, "interleave": self.interleave,
                "accuracy": None if not self.accuracy else {"images": self.accuracy_images,
                                                            "annotations": self.accuracy_annotations,
                                                            "max_images": self.max_images},
                "max_ap_drop": self.max_ap_drop, "vit": self.vit, "tasks": list(self.tasks)}


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
    accuracy: dict[str, Any] | None = None  # --accuracy: AP, AP50, AP75 on the dataset (or the error), see accuracy.py
    executed_precision: str | None = None  # what really ran (runtime.describe()): "fp32", "bf16", "int8+f32"...

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
            "notes": list(self.notes), "samples_ms": self.samples_ms, "accuracy": self.accuracy,
            "executed_precision": self.executed_precision,
        }


@dataclass
class BenchResult:
    config: BenchConfig
    system: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    elapsed_s: float = 0.0
    accuracy: dict[str, Any] | None = None  # --accuracy: the dataset and evaluator every row's AP was measured with
    choice: list[dict[str, Any]] | None = None  # --max-ap-drop: per size and batch, the fastest row within budget

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "tool": "deimv2-bench", "created_utc": self.created,
                "elapsed_s": round(self.elapsed_s, 3), "command": self.system.get("command"),
                "config": self.config.to_dict(), "system": self.system, "accuracy": self.accuracy,
                "rows": [r.to_dict() for r in self.rows], "choice": self.choice}
