"""What each benchmark row runs, from one table, and how its artifact is found or made.

A row kind is a backend column at one precision: `ROW_KINDS[(backend, precision)]` says which runtime loads it,
from which artifact format and precision, with which `load_runtime` options and on which device tier, or (a
string) why there is no such row. Adding a kind of row (a new backend x precision x format) is one entry there,
plus an `ArtifactFormat` when the file format is new.

Rows find their artifact in the model store (a dynamic-batch file serves every batch, else a fixed one of the
row's batch) or export it there once (`prepare_artifact`); `load_row_runtime` loads it. PyTorch rows run the
reference model in memory (`load_torch_reference`), which is also the speed and parity reference.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deimv2_deploy.benchmarks.config import OFFICIAL_BACKENDS, BenchConfig, BenchRow, RowKey, Skip
from deimv2_deploy.benchmarks.sysinfo import tier_of
from deimv2_deploy.exporters.common import artifact_name
from deimv2_deploy.exporters.onnx_export import official_style_name
from deimv2_deploy.runtimes.base import Runtime

__all__ = ["ArtifactFormat", "RowKind", "ROW_KINDS", "PRECISIONS", "known_precisions", "row_kind", "artifact_precision",
           "prepare_artifact", "load_row_runtime", "load_torch_reference", "checkpoint_for", "calibration_folder",
           "artifact_notes", "CALIBRATION_SCENES"]

CALIBRATION_SCENES = 32
# export(size, precision, checkpoint, random_weights, store, calibration) -> the artifact's path
Export = Callable[[str, str, "Path | None", bool, Path, "str | None"], Any]


@dataclass(frozen=True)
class ArtifactFormat:
    """A kind of file in the model store and how to make it."""

    label: str  # for the log: "ONNX", "OpenVINO IR", ...
    ext: str
    export: Export
    # store file name of (size, precision, random_weights, batch; None: dynamic)
    name: Callable[[str, str, bool, int | None], str] | None = None

    def file_name(self, size: str, precision: str, random_weights: bool, batch: int | None) -> str:
        if self.name is not None:
            return self.name(size, precision, random_weights, batch)
        return artifact_name(size, precision, random_weights, batch, self.ext)


@dataclass(frozen=True)
class RowKind:
    """How one kind of row is made and loaded."""

    runtime: str  # the backend that loads it ("torch": the in-memory reference model)
    artifact: ArtifactFormat | None = None  # None: nothing to export (torch)
    artifact_precision: str | None = None  # the artifact's precision when it is not the row's
    options: Mapping[str, Any] = field(default_factory=dict)  # load_runtime options
    pass_variant: bool = False  # the artifact carries no metadata: name the size (official-style exports)
    calibrated: bool = False  # exporting it needs INT8 calibration images
    tier: str | None = None  # "CPU" or "GPU" when it runs on one tier only
    tier_reason: str = ""  # why it cannot run on the other
    notes: tuple[str, ...] = ()  # said on every row of this kind
    baseline: bool = False  # what users run today: timed graph only in predict mode, as they time it


# --- exports, one per format (imported when used: the exporters need torch) ---------------------------------
def _export_onnx(size: str, precision: str, checkpoint: Path | None, random_weights: bool, store: Path,
                 calibration: str | None) -> Path:
    from deimv2_deploy.exporters.onnx_export import export_onnx

    return export_onnx(size, checkpoint=checkpoint, random_weights=random_weights, output_dir=store,
                       precision=precision, calibration=calibration, quiet=True).path


def _export_openvino(size: str, precision: str, checkpoint: Path | None, random_weights: bool, store: Path,
                     calibration: str | None) -> Path:
    from deimv2_deploy.exporters.openvino_export import export_openvino

    return export_openvino(size, checkpoint=checkpoint, random_weights=random_weights, output_dir=store,
                           precision=precision, calibration=calibration, quiet=True).path


def _export_tensorrt(size: str, precision: str, checkpoint: Path | None, random_weights: bool, store: Path,
                     calibration: str | None) -> Path:
    from deimv2_deploy.exporters.tensorrt_export import export_tensorrt

    return export_tensorrt(size, checkpoint=checkpoint, random_weights=random_weights, output_dir=store,
                           precision=precision, calibration=calibration, quiet=True).path


def _export_official(size: str, precision: str, checkpoint: Path | None, random_weights: bool, store: Path,
                     calibration: str | None) -> Path:
    from deimv2_deploy.exporters.onnx_export import export_official_style_onnx

    return export_official_style_onnx(size, checkpoint=checkpoint, random_weights=random_weights, output_dir=store)


def _official_name(size: str, precision: str, random_weights: bool, batch: int | None) -> str:
    return official_style_name(size, random_weights)  # FP32, dynamic batch: one file serves every row


ONNX = ArtifactFormat("ONNX", ".onnx", _export_onnx)
OPENVINO_IR = ArtifactFormat("OpenVINO IR", ".xml", _export_openvino)
TENSORRT_ENGINE = ArtifactFormat("TensorRT engine", ".engine", _export_tensorrt)
OFFICIAL_ONNX = ArtifactFormat("official-style ONNX", ".onnx", _export_official, _official_name)

_OPENVINO_CPU = "OpenVINO targets CPUs and Intel GPUs, not CUDA devices: use --device cpu"
_TENSORRT_GPU = "TensorRT runs only on NVIDIA GPUs: use --device cuda"
_OFFICIAL = "official-style export (plain trace, dynamic batch), stock runtime settings"
_STOCK_OPENVINO = ("stock OpenVINO: compile_model(model, 'CPU') with only INFERENCE_NUM_THREADS set, so the CPU's "
                   "default precision applies (bf16 on AMX CPUs)")
_AUTO = ("precision policy 'auto' on the FP32 IR: bf16 where the CPU runs it natively, else fp32 "
         "(deimv2_deploy.precision)")
_RUNS_ITS_ARTIFACT = "{} runs the artifact's own precision (no bf16 arithmetic on CPU): its auto row is the fp32 row"

# (backend column, precision) -> how to run it, or why there is no such row
ROW_KINDS: dict[tuple[str, str], RowKind | str] = {
    ("torch", "fp32"): RowKind("torch", baseline=True),
    ("torch", "fp16"): RowKind("torch", baseline=True, tier="GPU",
                               tier_reason="PyTorch eager FP16 needs a CUDA device (CPU half kernels are slower than "
                                           "FP32)"),
    ("torch", "int8"): "no INT8 PyTorch eager path (INT8 is timed through ONNX Runtime Q/DQ, OpenVINO + NNCF or "
                       "TensorRT)",
    ("onnxruntime", "fp32"): RowKind("onnxruntime", ONNX),
    ("onnxruntime", "fp16"): RowKind("onnxruntime", ONNX),
    ("onnxruntime", "int8"): RowKind("onnxruntime", ONNX, calibrated=True),  # explicit Q/DQ ONNX (onnx_precision)
    ("openvino", "fp32"): RowKind("openvino", OPENVINO_IR, tier="CPU", tier_reason=_OPENVINO_CPU),
    ("openvino", "fp16"): RowKind("openvino", OPENVINO_IR, tier="CPU", tier_reason=_OPENVINO_CPU),
    ("openvino", "int8"): RowKind("openvino", OPENVINO_IR, calibrated=True, tier="CPU", tier_reason=_OPENVINO_CPU),
    # the precision policy on the FP32 IR: auto (bf16 where native, else fp32) and bf16 forced
    ("openvino", "auto"): RowKind("openvino", OPENVINO_IR, artifact_precision="fp32", options={"precision": "auto"},
                                  tier="CPU", tier_reason=_OPENVINO_CPU, notes=(_AUTO,)),
    ("openvino", "bf16"): RowKind("openvino", OPENVINO_IR, artifact_precision="fp32", options={"precision": "bf16"},
                                  tier="CPU", tier_reason=_OPENVINO_CPU),
    ("torch", "auto"): "PyTorch eager runs FP32 on CPU: its auto row is the fp32 row",
    ("torch", "bf16"): "no bf16 PyTorch eager rows (bf16 is timed through OpenVINO)",
    ("onnxruntime", "auto"): _RUNS_ITS_ARTIFACT.format("ONNX Runtime"),
    ("onnxruntime", "bf16"): "ONNX Runtime's CPU provider has no bf16 arithmetic (bf16 is timed through OpenVINO)",
    ("tensorrt", "auto"): _RUNS_ITS_ARTIFACT.format("TensorRT"),
    ("tensorrt", "bf16"): "no bf16 TensorRT rows (fp16/int8 engines)",
    ("tensorrt", "fp32"): RowKind("tensorrt", TENSORRT_ENGINE, tier="GPU", tier_reason=_TENSORRT_GPU),
    ("tensorrt", "fp16"): RowKind("tensorrt", TENSORRT_ENGINE, tier="GPU", tier_reason=_TENSORRT_GPU),
    ("tensorrt", "int8"): RowKind("tensorrt", TENSORRT_ENGINE, calibrated=True, tier="GPU",
                                  tier_reason=_TENSORRT_GPU),
    # the baselines: the official exporter's ONNX of the same model, each library as a stock user runs it
    ("onnxruntime-official", "fp32"): RowKind("onnxruntime", OFFICIAL_ONNX, pass_variant=True, notes=(_OFFICIAL,),
                                              baseline=True),
    ("openvino-official", "fp32"): RowKind("openvino", OFFICIAL_ONNX, options={"stock": True},
                                           pass_variant=True, tier="CPU", tier_reason=_OPENVINO_CPU,
                                           notes=(_OFFICIAL, _STOCK_OPENVINO), baseline=True),
    **{(backend, p): "the official exporter makes FP32 ONNX only; its stock row is fp32" for backend in
       OFFICIAL_BACKENDS for p in ("fp16", "int8", "auto", "bf16")},
}
PRECISIONS = tuple(dict.fromkeys(precision for _, precision in ROW_KINDS))


def known_precisions() -> tuple[str, ...]:
    """The precisions some row kind has (what deimv2-bench --precision accepts)."""
    return tuple(dict.fromkeys(precision for _, precision in ROW_KINDS))


def row_kind(key: RowKey) -> RowKind:
    """The row kind of `key`; Skip (with the reason) where there is none."""
    kind = ROW_KINDS.get((key.backend, key.precision))
    if kind is None:
        raise Skip(f"no {key.precision.upper()} rows for backend {key.backend!r}")
    if isinstance(kind, str):
        raise Skip(kind)
    return kind


def artifact_precision(key: RowKey) -> str:
    """The precision of the weights a row runs (its kind's artifact precision, else the row's own)."""
    kind = ROW_KINDS.get((key.backend, key.precision))
    return (kind.artifact_precision if isinstance(kind, RowKind) else None) or key.precision


# --- the weights ---------------------------------------------------------------------------------------------
def checkpoint_for(size: str, config: BenchConfig) -> Path | None:
    """--checkpoint, else the official checkpoint of `size` in the store, None with --random-weights; Skip when
    there is none."""
    if config.random_weights:
        return None
    if config.checkpoint is not None:
        return Path(config.checkpoint)
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
    checkpoint = checkpoint_for(size, config)
    return TorchRuntime.for_variant(size, checkpoint=checkpoint, random_weights=config.random_weights,
                                    store=config.store, device=config.device, precision=precision,
                                    threads=config.threads_used)


def calibration_folder(config: BenchConfig, workdir: Path) -> str:
    """INT8 calibration images: --calibration (images or a COCO dataset), else the --accuracy dataset's images, else
    (random weights only) synthetic scenes written to `workdir`."""
    if config.calibration:
        return config.calibration
    if config.accuracy_images is not None:
        return config.accuracy_images
    if not config.random_weights:
        raise Skip("INT8 needs calibration images: pass --calibration DIR (a few hundred images like those the "
                   "model will see, or a COCO-format dataset)")
    from deimv2_deploy.exporters.parity import parity_images
    from deimv2_deploy.media import write_image

    folder = workdir / "synthetic_calibration_scenes"  # the name is kept in the artifact's build notes
    if not folder.exists():
        for i, image in enumerate(parity_images(CALIBRATION_SCENES, seed=1)):
            write_image(folder / f"scene_{i:03d}.png", image)
    return str(folder)


def artifact_notes(spec: Any) -> list[str]:
    """What the artifact's metadata says about how it was built, where it matters for reading the row."""
    build = getattr(spec, "build", None) or {}
    notes = []
    rewrite = build.get("precision")  # the ONNX exporter keeps its FP16/INT8 notes there
    calibration = build.get("calibration") or (rewrite.get("calibration") if isinstance(rewrite, dict) else None)
    if isinstance(calibration, dict):
        folder = Path(str(calibration.get("folder") or calibration.get("source") or "?"))
        source = ("synthetic scenes (deimv2-bench, random weights)" if folder.parent.name.startswith("deimv2-bench-")
                  else folder.name)
        how = "NNCF" if "float_types" in calibration or "float_patterns" in calibration else "Q/DQ"
        notes.append(f"INT8 ({how}) calibrated on {calibration.get('images', '?')} images: {source}")
    if build.get("source"):
        notes.append(f"converted from {build['source']}")
    return notes


# --- artifacts ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Tracer warnings of an export would bury the table's log; the exporters check parity instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def prepare_artifact(key: RowKey, kind: RowKind, config: BenchConfig, workdir: Path,
                     log: Callable[[str], None] = lambda message: None) -> tuple[Path, bool, float | None]:
    """(path, reused, export seconds) of the artifact of a row: the store's when it has one (a dynamic-batch file
    serves every batch, else a fixed one of this batch), else exported there now and reused next time."""
    fmt = kind.artifact
    if fmt is None:
        raise ValueError(f"rows of {key.backend!r} have no artifact")
    precision = kind.artifact_precision or key.precision
    for batch in (None, key.batch):
        path = config.store / fmt.file_name(key.size, precision, config.random_weights, batch)
        if path.exists():
            return path, True, None
    checkpoint = checkpoint_for(key.size, config)
    calibration = calibration_folder(config, workdir) if kind.calibrated else None
    log(f"exporting {key.size} {precision} {fmt.label} to {config.store} (reused next time)")
    t0 = time.perf_counter()
    try:
        with _quiet_warnings():
            path = fmt.export(key.size, precision, checkpoint, config.random_weights, config.store, calibration)
    except ImportError as e:  # the exporter's library is missing here (nncf, tensorrt...)
        raise Skip(f"the {fmt.label} exporter cannot run here ({e})") from None
    return Path(path), False, time.perf_counter() - t0


def load_row_runtime(key: RowKey, config: BenchConfig, row: BenchRow, workdir: Path,
                     log: Callable[[str], None] = lambda message: None) -> Runtime:
    """Make or reuse the artifact of `key` and load it as its row kind says; fills the row's artifact fields,
    notes and load time."""
    from deimv2_deploy.runtimes import available_backends, backend_class, load_runtime

    kind = row_kind(key)
    if kind.tier is not None and tier_of(config.device) != kind.tier:
        raise Skip(kind.tier_reason)
    if kind.runtime == "torch":
        t0 = time.perf_counter()
        runtime = load_torch_reference(key.size, config, key.precision)
        row.load_s = time.perf_counter() - t0
        row.artifact = "(in memory: deimv2_deploy.models deploy graph)"
        return runtime
    reason = available_backends().get(kind.runtime)
    if reason:
        raise Skip(reason)
    path, reused, prepare_s = prepare_artifact(key, kind, config, workdir, log)
    row.artifact, row.artifact_reused, row.prepare_s = str(path), reused, prepare_s
    row.notes += list(kind.notes)
    options: dict[str, Any] = dict(kind.options)
    if kind.pass_variant:
        options["variant"] = key.size
    accepted = backend_class(kind.runtime).option_names()
    if "threads" in accepted:
        options["threads"] = config.threads_used
    if "spinning" in accepted and config.interleave:
        # idle ONNX Runtime workers busy-wait for tens of ms after each run, taking the CPU from whichever row
        # runs next in the rotation; without spinning every row gets the machine to itself
        options["spinning"] = False
        row.notes.append("ONNX Runtime spinning off (interleaved rows)")
    t0 = time.perf_counter()
    runtime = load_runtime(path, backend=kind.runtime, device=config.device, **options)
    row.load_s = time.perf_counter() - t0
    return runtime
