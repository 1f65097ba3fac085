"""deimv2-bench --vit: rows for one EoMT-DINOv3 or DINOv3 model, in the same result and reports as DEIMv2 rows.

The model is a transformers folder or an exported artifact:
- a folder (`model_type` eomt_dinov3 / dinov3_vit) is exported to the store as `deimv2-export eomt|dinov3` does
  (FP32 ONNX for onnxruntime rows, OpenVINO IR for openvino rows, in `<store>/bench-<folder name>/`), and reused
  while the folder's weights digest is the one the artifact records; its `torch` row is transformers' own model in
  eager PyTorch, the speed baseline and the parity reference;
- an exported .onnx runs on onnxruntime and on openvino (which reads ONNX); an .xml on openvino only. Without the
  folder there is no torch row and parity is against the ONNX Runtime row.

One row per backend x batch, FP32. The row's `size` column holds the model's name: the folder's name, or the
artifact's file name without its extension. Modes:
- "model": the graph (`VitRuntime.infer`) on one fixed pixel_values batch (`exporters.vit_export.parity_pixels`).
- "predict": `Runtime.predict` on the in-memory 640x480 scene (`exporters.parity.parity_images`), a list of `batch`
  copies at batch > 1; EoMT runs the tasks of `BenchConfig.tasks` (default: deimv2-infer's). The torch row is
  timed graph only on prepared pixel_values, as transformers users time it (the detectors' baselines do the same).
Parity: each row's outputs on the fixed pixel_values against the reference, per output max |difference| with the
exporter's tolerance (`compare_outputs`: 1e-4 + 1e-4 x max |reference|).
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


def _folder_artifact(folder: Path, backend: str, config: BenchConfig,
                     log: Callable[[str], None]) -> tuple[Path, bool, float | None]:
    """(path, reused, export seconds): the store's export of `folder` for `backend` when it records the folder's
    current weights digest, else a new export there (`export_vit`, parity-checked against transformers)."""
    from deimv2_deploy.exporters.vit_export import export_vit
    from deimv2_deploy.files import file_sha256
    from deimv2_deploy.models.hf_vit import inspect_vit_folder

    info = inspect_vit_folder(folder)
    fmt, ext = ("onnx", ".onnx") if backend == "onnxruntime" else ("openvino", ".xml")
    digest = f"sha256 {file_sha256(info.weights[0])[:16]}"
    store = config.store
    for candidate in sorted(store.glob(f"{info.model_type}_*_fp32{ext}")) if store.is_dir() else ():
        spec = read_vit_spec(candidate)
        if spec is not None and spec.batch is None and digest in spec.weights:  # the same weights, dynamic batch
            return candidate, True, None
    log(f"exporting {folder} to {fmt} in {store} (reused next time)")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_vit(info.family, folder, output_dir=store, fmt=fmt, quiet=True)
    return result.path, False, time.perf_counter() - t0


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

    def keys(self, backends: Sequence[str]) -> list[RowKey]:
        return [RowKey(self.model.name, b, "fp32", n) for b in backends for n in self.config.batches]

    # --- one row ---------------------------------------------------------------------------------------
    def load(self, key: RowKey, row: BenchRow | None = None) -> Any:
        """The runtime of a row (TransformersEager for torch, else a VitRuntime); fills the row's artifact fields."""
        config, model = self.config, self.model
        if key.backend == "torch":
            if model.folder is None:
                raise Skip("PyTorch eager runs transformers' model: pass the transformers folder to --vit, not an "
                           "exported artifact")
            t0 = time.perf_counter()
            runtime = TransformersEager(model.folder, config.threads_used)
            if row is not None:
                row.load_s = time.perf_counter() - t0
                row.artifact = f"(in memory: transformers {type(runtime.model).__name__} of {model.folder})"
            return runtime
        if model.folder is not None:
            path, reused, prepare_s = _folder_artifact(model.folder, key.backend, config, self.log)
        else:
            path, reused, prepare_s = model.artifact, True, None
            if key.backend == "onnxruntime" and path.suffix.lower() != ".onnx":
                raise Skip(f"ONNX Runtime cannot load OpenVINO IR ({path.name}): pass the .onnx to --vit")
        spinning = not config.interleave
        t0 = time.perf_counter()
        runtime = load_vit_runtime(path, key.backend, threads=config.threads_used, spinning=spinning)
        if row is not None:
            row.load_s = time.perf_counter() - t0
            row.artifact, row.artifact_reused, row.prepare_s = str(path), reused, prepare_s
            if key.backend == "openvino" and path.suffix.lower() == ".onnx":
                row.notes.append("OpenVINO reading the ONNX file")
            if key.backend == "onnxruntime" and not spinning:
                row.notes.append("ONNX Runtime spinning off (interleaved rows)")
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
            row.weights, row.executed_precision = runtime.spec.weights, "fp32"  # OpenVINO runs with the f32 hint
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
            if self.config.parity or key.backend == self.reference_backend:
                outputs = (timing.output if graph_only
                           else runtime.infer(parity_pixels(runtime.spec, key.batch)))
        except Exception as e:  # noqa: BLE001
            fail_row(row, e)
            return row
        finally:
            runtime.close()
        record_timing(row, timing, self.config.keep_samples)
        if outputs is not None:
            if key.backend == self.reference_backend:
                self.references[key.batch] = outputs
                if key.backend != "torch":
                    row.parity = {"against": None, "ok": None,
                                  "detail": "reference (no transformers folder: the other rows compare to this one)"}
            elif self.config.parity:
                row.parity = self._parity(outputs, key)
        return row

    def _parity(self, outputs: dict[str, np.ndarray], key: RowKey) -> dict[str, Any]:
        against = "transformers" if self.reference_backend == "torch" else "onnxruntime"
        reference = self.references.get(key.batch)
        if reference is None:
            reference = self._reference(key)
        if isinstance(reference, str):
            return {"against": against, "ok": None, "detail": reference}
        report = compare_outputs(outputs, reference)
        return {"against": against, "ok": report["ok"], "max_abs_diff": report["max_abs_diff"],
                "atol": report["atol"], "rtol": report["rtol"], "outputs": report["outputs"]}

    def _reference(self, key: RowKey) -> dict[str, np.ndarray] | str:
        """The reference outputs for a batch whose reference row is not in this run: computed once, untimed."""
        ref_key = RowKey(key.size, self.reference_backend, "fp32", key.batch)
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
