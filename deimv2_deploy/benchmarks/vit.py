"""deimv2-bench --vit: rows for one EoMT-DINOv3 or DINOv3 model, in the same result and reports as DEIMv2 rows.

The model is a transformers folder or an exported artifact:
- a folder (`model_type` eomt_dinov3 / dinov3_vit) is exported to the store as `deimv2-export eomt|dinov3` does
  (FP32 ONNX for onnxruntime rows, OpenVINO IR for openvino rows, in `<store>/bench-<folder name>/`), and reused
  while the folder's weights digest is the one the artifact records; its `torch` row is transformers' own model in
  eager PyTorch, the speed baseline and the parity reference;
- an exported .onnx runs on onnxruntime and on openvino (which reads ONNX); an .xml on openvino only. Without the
  folder there is no torch row and parity is against the ONNX Runtime row.

One row per backend x precision x batch (`--precision fp32,fp16,int8,auto,bf16`, the detector's row kinds of
`benchmarks.artifacts.ROW_KINDS`): onnxruntime and openvino run the FP32, FP16 or INT8 export of the folder
(`deimv2-export eomt|dinov3 --precision`, INT8 calibrated on `--calibration`, without which INT8 rows are skipped
saying so); openvino's auto and bf16 rows run the FP32 IR with the precision policy; torch (transformers' eager model)
has FP32 rows only. An artifact given to --vit runs its own precision (and auto/bf16 on OpenVINO when it is FP32);
other precisions are skipped, naming the folder to pass instead. Every row records `executed_precision`, read
from the runtime (an FP16 IR runs f32 arithmetic on a CPU without native FP16/bf16: "fp16 (ran fp32)").
The row's `size` column holds the model's name: the folder's name, or the artifact's file name without its
extension. Modes:
- "model": the graph (`VitRuntime.infer`) on one fixed pixel_values batch (`exporters.vit_export.parity_pixels`).
- "predict": `Runtime.predict` on the in-memory 640x480 scene (`exporters.parity.parity_images`), a list of `batch`
  copies at batch > 1; EoMT runs the tasks of `BenchConfig.tasks` (default: deimv2-infer's). The torch row is
  timed graph only on prepared pixel_values, as transformers users time it (the detectors' baselines do the same).
Parity: each row's outputs on the fixed pixel_values against the reference (transformers FP32 for a folder, else
the ONNX Runtime row of the artifact), per output max |difference|; an FP32 row that ran FP32 is held to the
exporter's tolerance (`compare_outputs`: 1e-4 + 1e-4 x max |reference|), any other to the task-level agreement
limits of its precision (`exporters.vit_precision`: EoMT mask signs and query classes, DINOv3 cosines).
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.benchmarks.config import BenchConfig, BenchRow, RowKey, Skip, fail_row, rows_from_timings
from deimv2_deploy.benchmarks.timing import (
    Progress,
    Timing,
    record_resources,
    record_timing,
    time_calls,
    time_round_robin,
)
from deimv2_deploy.exporters.vit_export import compare_outputs, parity_pixels
from deimv2_deploy.exporters.vit_precision import reduced_parity
from deimv2_deploy.runtimes.vit_runtime import EOMT_TASKS, load_vit_runtime, parse_eomt_tasks, read_vit_spec
from deimv2_deploy.vit_spec import VitSpec

__all__ = ["VitModel", "VitBench", "resolve_vit_model", "TransformersEager"]


@dataclass(frozen=True)
class VitModel:
    """What --vit names: the model's name (the rows' `size`), its family, and the folder or artifact."""

    name: str
    family: str  # "eomt" | "dinov3"
    folder: Path | None = None  # a transformers folder: exported to the store; torch rows; parity reference
    artifact: Path | None = None  # an exported .onnx / .xml, used as is
    spec: VitSpec | None = None  # the artifact's (None for a folder until exported)


def _detector_variant(path: Path) -> str | None:
    """The DEIMv2 size an .onnx / .xml artifact's metadata names (a detector artifact), else None."""
    try:
        if path.suffix.lower() == ".onnx":
            import onnx

            props = {m.key: m.value for m in onnx.load(str(path), load_external_data=False).metadata_props}
            return props.get("deimv2.variant")
        from deimv2_deploy.runtimes.openvino_backend import openvino_core

        model = openvino_core().read_model(str(path))
        return str(model.get_rt_info(["deimv2.variant"]).astype(str)) if model.has_rt_info(["deimv2.variant"]) \
            else None
    except Exception:  # noqa: BLE001 - unreadable: the caller's message covers it
        return None


def resolve_vit_model(path: str | Path, tasks: Sequence[str] = ()) -> VitModel:
    """Check --vit (and --task) before any row: one-line ValueError / FileNotFoundError naming what is wrong."""
    from deimv2_deploy.models.hf_vit import inspect_vit_folder

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--vit {p}: no such file or folder")
    if p.is_dir():
        try:
            folder = inspect_vit_folder(p)
        except ValueError as e:
            hint = (" (a DEIMv2 detector: benchmark it with --sizes SIZE --checkpoint FOLDER, without --vit)"
                    if '"deimv2"' in _read(p / "config.json") else "")
            raise ValueError(f"--vit: {e}{hint}") from None
        model = VitModel(p.resolve().name, folder.family, folder=p)
    elif p.suffix.lower() in (".onnx", ".xml"):
        spec = read_vit_spec(p)
        if spec is None:
            variant = _detector_variant(p)
            if variant:
                raise ValueError(f"--vit {p} is a DEIMv2-{variant} detector artifact: benchmark detectors with "
                                 f"--sizes {variant} (--checkpoint for your weights), without --vit")
            raise ValueError(f"--vit {p} carries no DINOv3/EoMT metadata: export it with `deimv2-export eomt|dinov3 "
                             "--checkpoint FOLDER`, or pass that folder")
        model = VitModel(p.stem, spec.family, artifact=p, spec=spec)
    else:
        raise ValueError(f"--vit {p}: expected a transformers EoMT-DINOv3 / DINOv3 folder or an exported .onnx / "
                         f".xml, not a {p.suffix or 'suffix-less'} file")
    if tasks:
        if model.family != "eomt":
            raise ValueError(f"--task chooses EoMT's segmentation tasks; {model.name} is DINOv3 (its predict gives "
                             "embeddings): leave --task out")
        bad = [t for t in tasks if t not in EOMT_TASKS]
        if bad:
            raise ValueError(f"--task {bad[0]!r} is not an EoMT task: choose from {', '.join(EOMT_TASKS)}")
        stuff_known = model.spec is not None and model.spec.stuff_classes is not None
        if "panoptic" in tasks and not stuff_known:
            raise ValueError(f"--task panoptic needs the thing/stuff split, which {p.name} does not record: export "
                             "with `deimv2-export eomt --stuff-classes ...` and pass that artifact to --vit")
    return model


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


class TransformersEager:
    """transformers' model of a folder in eager PyTorch (CPU, FP32, eval): the `torch` row of a --vit run.

    `infer(pixel_values)` returns the outputs the exported graph has, by name (numpy), like `VitRuntime.infer`."""

    backend = "torch"

    def __init__(self, folder: Path, threads: int) -> None:
        import torch

        from deimv2_deploy.exporters.vit_export import vit_spec_for
        from deimv2_deploy.models.hf_vit import load_vit_model

        torch.set_num_threads(int(threads))
        self.model, info = load_vit_model(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the export path says it (non-GELU EoMT); here it is the same model
            self.spec = vit_spec_for(self.model, info, weights=str(info.path))
        self._torch = torch

    def infer(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        with self._torch.inference_mode():
            out = self.model(pixel_values=self._torch.from_numpy(pixel_values))
        return {n: getattr(out, n).float().numpy() for n in self.spec.output_names}

    def version(self) -> str:
        return f"torch {_version('torch')}, transformers {_version('transformers')}"

    def close(self) -> None:
        self.model = None


def _folder_artifact(folder: Path, backend: str, precision: str, config: BenchConfig,
                     log: Callable[[str], None]) -> tuple[Path, bool, float | None]:
    """(path, reused, export seconds): the store's `precision` export of `folder` for `backend` when it records the
    folder's current weights digest, else a new export there (`export_vit`, parity-checked against transformers;
    INT8 calibrated on --calibration, a Skip without it)."""
    from deimv2_deploy.exporters.vit_export import export_vit
    from deimv2_deploy.files import file_sha256
    from deimv2_deploy.models.hf_vit import inspect_vit_folder

    info = inspect_vit_folder(folder)
    fmt, ext = ("onnx", ".onnx") if backend == "onnxruntime" else ("openvino", ".xml")
    digest = f"sha256 {file_sha256(info.weights[0])[:16]}"
    store = config.store
    for candidate in sorted(store.glob(f"{info.model_type}_*_{precision}{ext}")) if store.is_dir() else ():
        spec = read_vit_spec(candidate)
        if spec is not None and spec.batch is None and digest in spec.weights:  # the same weights, dynamic batch
            return candidate, True, None
    if precision == "int8" and not config.calibration:
        raise Skip("INT8 needs calibration images: pass --calibration DIR (a few hundred images like those the "
                   "model will see, or a COCO-format dataset)")
    log(f"exporting {folder} to {fmt} {precision} in {store} (reused next time)")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_vit(info.family, folder, output_dir=store, fmt=fmt, precision=precision,
                            calibration=config.calibration if precision == "int8" else None, quiet=True)
    return result.path, False, time.perf_counter() - t0


def parity_precision(artifact_precision: str, executed: str | None) -> str:
    """The precision whose agreement limits a row's outputs are held to: "fp32" (the 1e-4 tolerance) only for an FP32
    artifact that ran f32; else INT8, bf16 or FP16 by the artifact and the arithmetic that ran."""
    ran = executed or artifact_precision
    if artifact_precision == "int8" or ran.startswith("int8"):
        return "int8"
    if "bf16" in ran:
        return "bf16"
    if artifact_precision == "fp16" or "fp16" in ran:
        return "fp16"
    return "fp32"


class VitBench:
    """The rows of one --vit model: `keys` lists them, `run` opens, times (alone or in turns) and finishes them."""

    def __init__(self, config: BenchConfig, device_name: str, log: Callable[[str], None] = lambda m: None) -> None:
        if config.vit is None:
            raise ValueError("VitBench needs BenchConfig(vit=...)")
        self.config, self.device_name, self.log = config, device_name, log
        self.model = resolve_vit_model(config.vit, config.tasks)  # a bad --vit stops the run before any row
        self.references: dict[int, dict[str, np.ndarray] | str] = {}  # batch -> reference outputs, or why none

    @property
    def reference_backend(self) -> str:
        return "torch" if self.model.folder is not None else "onnxruntime"

    @property
    def reference_precision(self) -> str:
        """transformers FP32 for a folder; an artifact's own precision on ONNX Runtime otherwise."""
        return "fp32" if self.model.spec is None else self.model.spec.precision

    def keys(self, backends: Sequence[str]) -> list[RowKey]:
        """Backend > precision > batch. An FP16/INT8 artifact given alone runs its own precision by default."""
        precisions = tuple(self.config.precisions)
        if self.model.spec is not None and precisions == ("fp32",) and self.model.spec.precision != "fp32":
            precisions = (self.model.spec.precision,)
        return [RowKey(self.model.name, b, p, n) for b in backends for p in precisions for n in self.config.batches]

    def _is_reference(self, key: RowKey) -> bool:
        return key.backend == self.reference_backend and key.precision == self.reference_precision

    # --- one row ---------------------------------------------------------------------------------------
    def load(self, key: RowKey, row: BenchRow | None = None) -> Any:
        """The runtime of a row (TransformersEager for torch, else a VitRuntime); fills the row's artifact fields."""
        from deimv2_deploy.benchmarks.artifacts import row_kind

        config, model = self.config, self.model
        if key.backend == "torch":
            if model.folder is None:
                raise Skip("PyTorch eager runs transformers' model: pass the transformers folder to --vit, not an "
                           "exported artifact")
            if key.precision != "fp32":
                raise Skip("transformers' eager model runs FP32 on the CPU: reduced precision is timed through "
                           "onnxruntime and openvino")
            t0 = time.perf_counter()
            runtime = TransformersEager(model.folder, config.threads_used)
            if row is not None:
                row.load_s = time.perf_counter() - t0
                row.artifact = f"(in memory: transformers {type(runtime.model).__name__} of {model.folder})"
            return runtime
        kind = row_kind(key)  # Skip with the detector's reason where this backend has no such precision
        precision = kind.artifact_precision or key.precision  # of the artifact (auto/bf16: the FP32 IR)
        if model.folder is not None:
            path, reused, prepare_s = _folder_artifact(model.folder, key.backend, precision, config, self.log)
        else:
            path, reused, prepare_s = model.artifact, True, None
            if key.backend == "onnxruntime" and path.suffix.lower() != ".onnx":
                raise Skip(f"ONNX Runtime cannot load OpenVINO IR ({path.name}): pass the .onnx to --vit")
            if model.spec.precision != precision:
                raise Skip(f"{path.name} is a {model.spec.precision} artifact, this row needs {precision}: pass the "
                           "transformers folder to --vit (each precision is exported from it) or that artifact")
        spinning = not config.interleave
        t0 = time.perf_counter()
        runtime = load_vit_runtime(path, key.backend, threads=config.threads_used, spinning=spinning,
                                   precision=kind.options.get("precision"))
        if row is not None:
            row.load_s = time.perf_counter() - t0
            row.artifact, row.artifact_reused, row.prepare_s = str(path), reused, prepare_s
            if key.backend == "openvino" and path.suffix.lower() == ".onnx":
                row.notes.append("OpenVINO reading the ONNX file")
            if key.backend == "onnxruntime" and not spinning:
                row.notes.append("ONNX Runtime spinning off (interleaved rows)")
            from deimv2_deploy.benchmarks.artifacts import artifact_notes

            row.notes.extend([*kind.notes, *artifact_notes(runtime.spec)])
        return runtime

    def _open(self, key: RowKey) -> tuple[BenchRow, Any]:
        config = self.config
        row = BenchRow(key.size, key.backend, key.precision, key.batch, config.mode, "CPU", config.device,
                       self.device_name, config.threads_used)
        runtime = None
        try:
            runtime = self.load(key, row)
            row.backend_version = (runtime.version() if isinstance(runtime, TransformersEager)
                                   else f"{key.backend} {_version(key.backend)}")
            row.weights = runtime.spec.weights
            row.executed_precision = ("fp32" if isinstance(runtime, TransformersEager)
                                      else runtime.describe()["executed_precision"])  # what really runs
            if runtime.spec.batch is not None and runtime.spec.batch != key.batch:
                raise Skip(f"{row.artifact} has a fixed batch of {runtime.spec.batch}; export a dynamic-batch one")
            return row, runtime
        except Exception as e:  # noqa: BLE001 - one broken row must not lose the others; the reason is reported
            fail_row(row, e)
            if runtime is not None:
                runtime.close()
            return row, None

    def _call(self, runtime: Any, key: RowKey, row: BenchRow) -> tuple[Callable[[], Any], bool]:
        """(call, graph_only): the graph on the fixed pixel_values, or predict on the in-memory scene."""
        pixels = parity_pixels(runtime.spec, key.batch)
        if self.config.mode == "model" or key.backend == "torch":
            if self.config.mode == "predict":
                row.notes.append("baseline: graph only on prepared pixel_values, as transformers users time it")
            return (lambda: runtime.infer(pixels)), True
        from deimv2_deploy.exporters.parity import parity_images

        image = parity_images(1)[0]  # the 640x480 BGR scene of the detectors' predict rows
        images = image if key.batch == 1 else [image] * key.batch
        if runtime.spec.family == "eomt":
            tasks = parse_eomt_tasks(list(self.config.tasks) or None, runtime.spec)
            row.notes.append(f"predict tasks: {', '.join(tasks)}")
            return (lambda: runtime.predict(images, tasks=tasks)), False
        return (lambda: runtime.predict(images)), False

    def _finish(self, key: RowKey, row: BenchRow, runtime: Any, timing: Timing, graph_only: bool) -> BenchRow:
        try:
            record_resources(row)
            outputs = None
            if self.config.parity or self._is_reference(key):
                outputs = (timing.output if graph_only
                           else runtime.infer(parity_pixels(runtime.spec, key.batch)))
        except Exception as e:  # noqa: BLE001
            fail_row(row, e)
            return row
        finally:
            runtime.close()
        record_timing(row, timing, self.config.keep_samples)
        if outputs is not None:
            if self._is_reference(key):
                self.references[key.batch] = outputs
                if key.backend != "torch":
                    row.parity = {"against": None, "ok": None,
                                  "detail": "reference (no transformers folder: the other rows compare to this one)"}
            elif self.config.parity:
                row.parity = self._parity(outputs, key, runtime.spec,
                                          parity_precision(runtime.spec.precision, row.executed_precision))
        return row

    def _parity(self, outputs: dict[str, np.ndarray], key: RowKey, spec: VitSpec,
                precision: str = "fp32") -> dict[str, Any]:
        """`outputs` against the reference: the FP32 tolerance for `precision` "fp32", else the task-level agreement
        limits of `precision` (raw max |difference| reported either way)."""
        against = ("transformers" if self.reference_backend == "torch"
                   else f"onnxruntime {self.reference_precision}".replace(" fp32", ""))
        reference = self.references.get(key.batch)
        if reference is None:
            reference = self._reference(key)
        if isinstance(reference, str):
            return {"against": against, "ok": None, "detail": reference}
        if precision == "fp32":
            report = compare_outputs(outputs, reference)
            return {"against": against, "ok": report["ok"], "max_abs_diff": report["max_abs_diff"],
                    "atol": report["atol"], "rtol": report["rtol"], "outputs": report["outputs"]}
        report = reduced_parity(spec, precision, outputs, reference)
        return {"against": against, "ok": report["ok"], "max_abs_diff": report["max_abs_diff"],
                "limits_of": precision, "agreement": {k: v["value"] for k, v in report["agreement"].items()},
                "limits": report["limits"], "outputs": report["outputs"]}

    def _reference(self, key: RowKey) -> dict[str, np.ndarray] | str:
        """The reference outputs for a batch whose reference row is not in this run: computed once, untimed."""
        ref_key = RowKey(key.size, self.reference_backend, self.reference_precision, key.batch)
        try:
            runtime = self.load(ref_key)
        except Skip as e:
            self.references[key.batch] = f"no reference: {e}"
            return self.references[key.batch]
        except Exception as e:  # noqa: BLE001 - a broken reference must not stop the timing
            self.references[key.batch] = f"no reference: {type(e).__name__}: {e}"
            return self.references[key.batch]
        try:
            self.references[key.batch] = runtime.infer(parity_pixels(runtime.spec, key.batch))
        finally:
            runtime.close()
        return self.references[key.batch]

    # --- a step: one row, or the rows of one batch in turns ----------------------------------------------
    def run(self, keys: Sequence[RowKey], label: str) -> list[BenchRow]:
        config = self.config
        opened = [(key, *self._open(key)) for key in keys]
        calls: dict[int, tuple[Callable[[], Any], bool]] = {}
        graph_only: dict[int, bool] = {}
        for i, (key, row, runtime) in enumerate(opened):
            if runtime is None:
                continue
            try:
                call, graph_only[i] = self._call(runtime, key, row)
                calls[i] = (call, False)
            except Exception as e:  # noqa: BLE001
                fail_row(row, e)
                runtime.close()
        seconds = None if config.seconds is None else config.seconds * max(1, len(calls))
        bar = Progress(label, config.iters, seconds, config.progress)
        try:
            if len(keys) == 1 and calls:
                try:
                    timings: dict[int, Timing | Exception] = {
                        0: time_calls(calls[0][0], warmup=config.warmup, iters=config.iters, seconds=config.seconds,
                                      progress=bar)}
                except Exception as e:  # noqa: BLE001
                    timings = {0: e}
            else:
                timings = time_round_robin(calls, warmup=config.warmup, iters=config.iters, seconds=config.seconds,
                                           progress=bar)
        finally:
            bar.close()
        return rows_from_timings(opened, calls, timings,
                                 lambda i, key, row, runtime, timing: self._finish(key, row, runtime, timing,
                                                                                   graph_only[i]))
