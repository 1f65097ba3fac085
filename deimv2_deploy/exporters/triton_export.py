"""deimv2-export --format triton: a Triton Inference Server model repository for one artifact.

    <repository>/<name>/config.pbtxt
    <repository>/<name>/1/model.onnx               (backend onnxruntime)
                         /1/model.xml + model.bin     (backend openvino)
                         /1/model.plan                (backend tensorrt)

The model file is the artifact our ONNX / OpenVINO / TensorRT exporters make (or one the user already has), copied
as is. `config.pbtxt` declares the official I/O (`images`, `orig_target_sizes` -> `labels`, `boxes`, `scores`)
without the batch axis and with `max_batch_size`, Triton's dynamic batcher, the instance group, the backend
parameters that decide speed (threads, streams), and the artifact's ArtifactSpec as model parameters
(`deimv2.spec` holds the whole spec as JSON: a client reads the preprocessing and class names from the server).

The text is written here, not through Triton's protobuf classes, so exporting needs no Triton package; the tests
parse it with Triton's own `ModelConfig` (tritonclient) and check every field. Nothing here runs a Triton server.

Backend notes that shape the config:
- OpenVINO's Triton backend refuses a batch smaller than `max_batch_size` unless ENABLE_BATCH_PADDING is YES, so
  it is set: every call then runs at `max_batch_size` (choose it near the load you expect). Its parameters cannot
  pin f32 inference precision; on CPUs with bf16 (AMX, AVX-512 BF16) OpenVINO runs FP32 IRs in bf16 there.
- A TensorRT engine's batch range is fixed when it is built: `max_batch_size` must lie within its profile.
"""
from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deimv2_deploy.exporters.common import ExportResult, Steps, artifact_name, resolve_store
from deimv2_deploy.media import atomic_path
from deimv2_deploy.runtimes.base import INPUT_NAMES, OUTPUT_NAMES
from deimv2_deploy.spec import ArtifactSpec
from deimv2_deploy.variants import get_variant_info

__all__ = ["export_triton", "triton_model_config", "write_repository", "TritonModelConfig",
           "TensorConfig", "BACKENDS", "MODEL_FILES", "DEFAULT_MAX_BATCH", "DEFAULT_QUEUE_DELAY_US", "VERSION"]

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
# backend -> (file names in the version folder), as each Triton backend looks for them by default
MODEL_FILES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("model.onnx",),
    "openvino": ("model.xml", "model.bin"),
    "tensorrt": ("model.plan",),
}
KINDS = {"cpu": "KIND_CPU", "gpu": "KIND_GPU"}
DEFAULT_KIND = {"onnxruntime": "cpu", "openvino": "cpu", "tensorrt": "gpu"}
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 2000
VERSION = "1"  # the model version folder written
_TYPES = {"images": "TYPE_FP32", "orig_target_sizes": "TYPE_INT64", "labels": "TYPE_INT64", "boxes": "TYPE_FP32",
          "scores": "TYPE_FP32"}
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


# --- the config -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorConfig:
    name: str
    data_type: str  # Triton's DataType name, e.g. TYPE_FP32
    dims: tuple[int, ...]  # without the batch axis when max_batch_size > 0; -1 for a variable size


@dataclass(frozen=True)
class TritonModelConfig:
    """The fields of one model's config.pbtxt (a subset of Triton's ModelConfig)."""

    name: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    max_queue_delay_us: int | None = DEFAULT_QUEUE_DELAY_US  # None: no dynamic batching
    parameters: dict[str, str] = field(default_factory=dict)

    def to_pbtxt(self) -> str:
        """Protobuf text format, as Triton reads it."""
        lines = [f"name: {_quote(self.name)}", f"backend: {_quote(self.backend)}",
                 f"max_batch_size: {self.max_batch_size}"]
        for key, tensors in (("input", self.inputs), ("output", self.outputs)):
            items = [f"  {{\n    name: {_quote(t.name)}\n    data_type: {t.data_type}\n"
                     f"    dims: [ {', '.join(str(d) for d in t.dims)} ]\n  }}" for t in tensors]
            lines.append(f"{key} [\n" + ",\n".join(items) + "\n]")
        if self.max_queue_delay_us is not None:
            lines.append(f"dynamic_batching {{\n  max_queue_delay_microseconds: {self.max_queue_delay_us}\n}}")
        lines.append(f"instance_group [\n  {{\n    count: {self.instance_count}\n"
                     f"    kind: {self.instance_kind}\n  }}\n]")
        if self.parameters:
            items = [f"  {{\n    key: {_quote(k)}\n    value {{ string_value: {_quote(v)} }}\n  }}"
                     for k, v in self.parameters.items()]
            lines.append("parameters [\n" + ",\n".join(items) + "\n]")
        return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    """A protobuf text-format string literal: printable ASCII as is, everything else as octal UTF-8 bytes."""
    out = []
    for byte in str(text).encode("utf-8"):
        char = chr(byte)
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append(f"\\{byte:03o}")
    return '"' + "".join(out) + '"'


def _tensors(spec: ArtifactSpec, max_batch: int) -> tuple[tuple[TensorConfig, ...], tuple[TensorConfig, ...]]:
    h, w = spec.input_size
    k = spec.top_k
    shapes = {"images": (3, h, w), "orig_target_sizes": (2,), "labels": (k,), "boxes": (k, 4), "scores": (k,)}
    if max_batch == 0:  # no batching by Triton: the batch axis is part of the shape
        batch = spec.batch if spec.batch is not None else -1
        shapes = {name: (batch, *dims) for name, dims in shapes.items()}
    make = lambda names: tuple(TensorConfig(n, _TYPES[n], shapes[n]) for n in names)  # noqa: E731
    return make(INPUT_NAMES), make(OUTPUT_NAMES)


def _batch_range(spec: ArtifactSpec) -> tuple[int, int] | None:
    """(min, max) batch an artifact accepts, where it records one (a TensorRT engine's profile)."""
    profile = (spec.build or {}).get("batch_profile")
    if isinstance(profile, Mapping) and "min" in profile and "max" in profile:
        return int(profile["min"]), int(profile["max"])
    if spec.batch is not None:
        return spec.batch, spec.batch
    return None


def _check_batch(spec: ArtifactSpec, backend: str, max_batch: int) -> None:
    if max_batch < 0:
        raise ValueError(f"max_batch must be >= 0 (0: Triton does not batch), got {max_batch}")
    if max_batch == 0:
        return
    if spec.batch is not None:
        raise ValueError(f"this {backend} artifact has a fixed batch of {spec.batch}, but Triton batching sends "
                         f"1..{max_batch} images per call: export it with a dynamic batch, or pass --max-batch 0")
    limits = _batch_range(spec)
    if limits is not None and not (limits[0] <= 1 and max_batch <= limits[1]):
        raise ValueError(f"the engine's batch profile covers {limits[0]}..{limits[1]} images, but Triton sends "
                         f"1..{max_batch}: rebuild it with --dynamic-batch 1:1:{max_batch} or lower --max-batch")


def triton_model_config(spec: ArtifactSpec, backend: str, name: str, *, max_batch: int = DEFAULT_MAX_BATCH,
                        instances: int = 1, kind: str | None = None, threads: int | None = None,
                        queue_delay_us: int = DEFAULT_QUEUE_DELAY_US) -> TritonModelConfig:
    """The config.pbtxt of `spec`'s artifact on a Triton backend (see the module docstring for the choices)."""
    if backend not in BACKENDS:
        raise ValueError(f"Triton backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not _NAME.match(name):
        raise ValueError(f"Triton model name {name!r} must be letters, digits, '_', '.', '-' (it is a folder name)")
    kind = (kind or DEFAULT_KIND[backend]).lower()
    if kind not in KINDS:
        raise ValueError(f"instance kind must be cpu or gpu, got {kind!r}")
    if backend == "tensorrt" and kind != "gpu":
        raise ValueError("a TensorRT engine runs on a GPU: the instance kind must be gpu")
    if backend == "openvino" and kind != "cpu":
        raise ValueError("Triton's OpenVINO backend runs CPU instances: the instance kind must be cpu")
    if instances < 1:
        raise ValueError(f"instances must be at least 1, got {instances}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1 (or unset for the backend's choice), got {threads}")
    if queue_delay_us < 0:
        raise ValueError(f"queue_delay_us must be >= 0, got {queue_delay_us}")
    _check_batch(spec, backend, max_batch)
    parameters: dict[str, str] = {}
    if backend == "onnxruntime":
        # one session per instance; 0 lets ONNX Runtime take every core (oversubscribed with several instances)
        parameters.update(intra_op_thread_count=str(threads or 0), inter_op_thread_count="1", execution_mode="0")
    elif backend == "openvino":
        parameters.update(NUM_STREAMS=str(instances), PERFORMANCE_HINT="LATENCY" if instances == 1 else "THROUGHPUT")
        if threads is not None:
            parameters["INFERENCE_NUM_THREADS"] = str(threads)
        if max_batch > 0:
            parameters["ENABLE_BATCH_PADDING"] = "YES"
    parameters.update(spec.to_metadata())  # deimv2.spec (JSON) + readable keys; backends ignore unknown keys
    inputs, outputs = _tensors(spec, max_batch)
    return TritonModelConfig(name=name, backend=backend, max_batch_size=max_batch, inputs=inputs, outputs=outputs,
                             instance_count=instances, instance_kind=KINDS[kind],
                             max_queue_delay_us=queue_delay_us if max_batch > 0 else None, parameters=parameters)


# --- the repository -----------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_repository(config: TritonModelConfig, model_files: Sequence[str | os.PathLike],
                     repository: str | os.PathLike) -> Path:
    """`<repository>/<name>/1/<model files>` and `<repository>/<name>/config.pbtxt` (written last, so a polling
    server never sees a config without its model); model files another backend left in the folder are removed."""
    names = MODEL_FILES[config.backend]
    files = [Path(f) for f in model_files]
    if len(files) != len(names):
        raise ValueError(f"the {config.backend} backend needs {len(names)} file(s) ({', '.join(names)}), got "
                         f"{[str(f) for f in files]}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"model file not found: {f}")
    model_dir = Path(repository) / config.name
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    for src, name in zip(files, names, strict=True):
        _copy(src, version_dir / name)
    for stale in {n for names_ in MODEL_FILES.values() for n in names_} - set(names):
        (version_dir / stale).unlink(missing_ok=True)
    with atomic_path(model_dir / "config.pbtxt") as tmp:
        tmp.write_text(config.to_pbtxt(), encoding="utf-8")
    return model_dir


# --- the export ---------------------------------------------------------------------------------------------
def _given_artifact(path: Path, backend: str, variant: str) -> tuple[list[Path], ArtifactSpec]:
    """The model file(s) and spec of an artifact the user already has."""
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    if backend == "tensorrt":
        if suffix not in (".engine", ".plan"):
            raise ValueError(f"the tensorrt backend takes a serialized engine (.engine/.plan), got {path.name}")
        from deimv2_deploy.tensorrt_support import read_sidecar

        # the config depends on the engine's spec (its sidecar), never on the engine's bytes
        spec = read_sidecar(path) or ArtifactSpec.for_official_export(variant)
        if spec.variant != variant:
            raise ValueError(f"{path} is DEIMv2-{spec.variant} (from its sidecar), not {variant!r}")
        return [path], spec
    expected = {"onnxruntime": ".onnx", "openvino": ".xml"}[backend]
    if suffix != expected:
        raise ValueError(f"the {backend} backend takes a {expected} file, got {path.name}")
    from deimv2_deploy.runtimes import load_runtime

    # loading checks the file is a DEIMv2 deploy graph and reads its spec (metadata, or the variant's official one)
    runtime = load_runtime(path, backend=backend, variant=variant, threads=1)
    spec = runtime.spec
    runtime.close()
    if spec.variant != variant:
        raise ValueError(f"{path} is DEIMv2-{spec.variant} (from its metadata), not {variant!r}")
    files = [path] if backend == "onnxruntime" else [path, path.with_suffix(".bin")]
    return files, spec


def export_triton(variant: str, backend: str = "onnxruntime", *, model_path: str | os.PathLike | None = None,
                  repository: str | os.PathLike | None = None, name: str | None = None,
                  max_batch: int = DEFAULT_MAX_BATCH, instances: int = 1, kind: str | None = None,
                  threads: int | None = None, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                  checkpoint: str | os.PathLike | None = None, random_weights: bool = False,
                  output_dir: str | os.PathLike | None = None, precision: str = "fp32", quiet: bool = False,
                  exporter_options: Mapping[str, Any] | None = None) -> ExportResult:
    """Write a Triton model repository entry for DEIMv2-`variant` on `backend`; returns its folder.

    The model file is `model_path` (an artifact exported earlier: .onnx, .xml, or a TensorRT .engine with its
    sidecar) or is exported now into the model store by the ONNX / OpenVINO / TensorRT exporter (`checkpoint` or
    `random_weights`, `precision`, and `exporter_options` passed on to it). `repository` defaults to
    `<store>/triton`; `name` to the artifact's name and the backend (deimv2_<size>[_random]_<precision>_<backend>).
    `max_batch` 0 turns Triton's batching off. See `triton_model_config` for the rest.
    """
    info = get_variant_info(variant)
    if backend not in BACKENDS:
        raise ValueError(f"Triton backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if max_batch < 0:
        raise ValueError(f"max_batch must be >= 0 (0: Triton does not batch), got {max_batch}")
    store = resolve_store(output_dir)
    steps = Steps(f"triton {info.name}", 3, quiet)
    options = dict(exporter_options or {})
    if model_path is not None:
        if checkpoint is not None or random_weights:
            raise ValueError("pass either a model file to use as is, or checkpoint/random_weights to export one")
        steps(f"using {model_path}")
        files, spec = _given_artifact(Path(model_path), backend, info.name)
        parity = dict(spec.parity or {})
    else:
        common = dict(checkpoint=checkpoint, random_weights=random_weights, output_dir=store, quiet=quiet)
        steps(f"exporting the {backend} model")
        if backend == "onnxruntime":
            from deimv2_deploy.exporters.onnx_export import export_onnx

            if precision not in ("fp32", "fp16"):
                raise ValueError(f"the onnxruntime backend takes an fp32 or fp16 ONNX, not {precision}")
            result = export_onnx(info.name, fp16=precision == "fp16", **options, **common)
            files = [result.path]
        elif backend == "openvino":
            from deimv2_deploy.exporters.openvino_export import export_openvino

            result = export_openvino(info.name, precision=precision, **options, **common)
            files = [result.path, result.path.with_suffix(".bin")]
        else:
            from deimv2_deploy.exporters.tensorrt_export import export_tensorrt

            options.setdefault("dynamic_batch", f"1:1:{max_batch}" if max_batch > 0 else None)
            result = export_tensorrt(info.name, precision=precision, **options, **common)
            files = [result.path]
        spec, parity = result.spec, dict(result.parity)
    if name is None:
        base = artifact_name(info.name, spec.precision, spec.random_weights, spec.batch, "")
        name = f"{base}_{backend}"
    config = triton_model_config(spec, backend, name, max_batch=max_batch, instances=instances, kind=kind,
                                 threads=threads, queue_delay_us=queue_delay_us)
    target = Path(repository) if repository is not None else store / "triton"
    steps(f"writing {target / name}")
    model_dir = write_repository(config, files, target)
    steps("done")
    return ExportResult(model_dir, spec, parity, steps.elapsed)


