"""deimv2-export, TensorRT part: an ONNX artifact -> a serialized, strongly typed engine + its JSON sidecar.

Steps: the ONNX (exported here at the requested precision, or the file given) -> TensorRT's ONNX parser into a
strongly typed network -> one optimization profile over the batch axis of both inputs -> build -> parity of the
engine against ONNX Runtime on the same ONNX -> `<name>.engine` and `<name>.engine.json`, published together (the
sidecar first, the engine last: a reader never finds an engine without its sidecar, nor a new sidecar beside an
old engine).

The precision of an engine is that of its ONNX (`deimv2_deploy.exporters.onnx_precision`): FP32 tensors, FP16
tensors with the sensitive blocks in FP32, or INT8 with explicit symmetric Q/DQ nodes calibrated on the user's
images. No builder precision switch is used: one code path for TensorRT 10.6+ and 11.x, which removed
`BuilderFlag.FP16/BF16/INT8/FP8`, the INT8 calibrators, `OBEY/PREFER_PRECISION_CONSTRAINTS`,
`platform_has_fast_fp16/int8` and `ICudaEngine.device_memory_size`; none of them appears in this package.
- The network is created STRONGLY_TYPED where the flag exists (10.x; in 11.x every network is strongly typed).
- FP16 needs TensorRT >= 10.6: earlier 10.x builds FP16 DEIMv2 engines that return wrong detections (DEIMv2
  issues #53 and #112). We refuse unless `force=True`.
- TF32 is cleared, so FP32 tensors are FP32 in fact and comparable with ONNX Runtime.
- TensorRT 11.4 does not support Jetson (JetPack); Jetson stays on TensorRT 10.x, which this same path serves.

The pure logic (batch profiles, "MIN:OPT:MAX" parsing, version checks, the precision of an ONNX, build settings)
is separate from the library calls so it is tested without TensorRT.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.data.calibration import select_calibration_images
from deimv2_deploy.exporters.common import (
    EXPORTER,
    ExportResult,
    Steps,
    artifact_name,
    library_versions,
    resolve_store,
    spec_with_classes,
)
from deimv2_deploy.files import AtomicWrite, file_sha256, write_bytes
from deimv2_deploy.runtimes.base import INPUT_NAMES
from deimv2_deploy.spec import ArtifactSpec, resolve_spec
from deimv2_deploy.tensorrt_support import (
    FP16_SAFE_TENSORRT,
    INSTALL_HINT,
    MIN_TENSORRT,
    parse_cuda_device,
    parse_version,
    sidecar_path,
    sidecar_text,
)
from deimv2_deploy.variants import get_variant_info

__all__ = ["export_tensorrt", "PRECISIONS", "BatchProfile", "DEFAULT_DYNAMIC_BATCH", "TensorRtVersionError",
           "parse_batch_range", "parse_dynamic_batch", "resolve_batch_profile", "profile_shapes",
           "check_tensorrt_version", "onnx_precision_of", "network_flags", "build_settings", "parity_tolerances",
           "engine_spec"]

PRECISIONS = ("fp32", "fp16", "int8")
FP16_BUG = "wrong FP16 outputs, fixed in TensorRT 10.6; DEIMv2 issues #53 and #112"


class TensorRtVersionError(RuntimeError):
    """The installed TensorRT cannot build the requested engine correctly; the message says what to install."""


# --- batch profile ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchProfile:
    """The optimization profile's range of the batch axis (shared by `images` and `orig_target_sizes`)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        for field_name in ("min", "opt", "max"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"batch profile {field_name} must be a positive integer, got {value!r}")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"batch profile must satisfy MIN <= OPT <= MAX, got {self.min}:{self.opt}:{self.max}")

    @property
    def fixed(self) -> bool:
        return self.min == self.max

    def to_dict(self) -> dict[str, int]:
        return {"min": int(self.min), "opt": int(self.opt), "max": int(self.max)}

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


DEFAULT_DYNAMIC_BATCH = BatchProfile(1, 1, 8)


def parse_batch_range(text: str | Sequence[int] | BatchProfile) -> BatchProfile:
    """'MIN:OPT:MAX' (e.g. '1:4:8'), a single 'N' (fixed), a 3-sequence or a BatchProfile -> BatchProfile."""
    if isinstance(text, BatchProfile):
        return text
    if isinstance(text, str):
        parts = [p.strip() for p in text.split(":")]
        if len(parts) == 1:
            parts = parts * 3
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"dynamic batch must be MIN:OPT:MAX with positive integers (e.g. 1:4:8) or one "
                             f"integer, got {text!r}")
        values = [int(p) for p in parts]
    else:
        values = list(text)
        if len(values) != 3:
            raise ValueError(f"dynamic batch must have 3 values (min, opt, max), got {text!r}")
    return BatchProfile(*values)


parse_dynamic_batch = parse_batch_range  # the name deimv2-export's --dynamic-batch uses


def resolve_batch_profile(batch: int | None = None, dynamic_batch: str | Sequence[int] | BatchProfile | None = None,
                          onnx_batch: int | None = None) -> BatchProfile:
    """The batch range of the engine from the user's options and the ONNX graph's batch axis (None: dynamic)."""
    if batch is not None and dynamic_batch is not None:
        raise ValueError(f"pass either batch (fixed, got {batch}) or dynamic_batch (a range, got {dynamic_batch!r}), "
                         "not both")
    if batch is not None:
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        profile = BatchProfile(batch, batch, batch)
    elif dynamic_batch is not None:
        profile = parse_batch_range(dynamic_batch)
    else:
        profile = BatchProfile(onnx_batch, onnx_batch, onnx_batch) if onnx_batch else DEFAULT_DYNAMIC_BATCH
    if onnx_batch is not None and not (profile.fixed and profile.min == onnx_batch):
        raise ValueError(f"the ONNX graph has a fixed batch of {onnx_batch}, so the engine can only take "
                         f"{onnx_batch} images, not {profile}; export a dynamic-batch ONNX (no --batch) for a range")
    return profile


def profile_shapes(input_size: tuple[int, int], profile: BatchProfile
                   ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) shapes of both inputs: the same batch range for `images` and `orig_target_sizes`."""
    h, w = input_size
    return {
        "images": tuple((n, 3, h, w) for n in (profile.min, profile.opt, profile.max)),
        "orig_target_sizes": tuple((n, 2) for n in (profile.min, profile.opt, profile.max)),
    }


# --- versions ---------------------------------------------------------------------------------------------
def check_tensorrt_version(version: str, precision: str, force: bool = False) -> list[str]:
    """Warnings for building `precision` with TensorRT `version`; TensorRtVersionError where it would be wrong."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    v = parse_version(version)
    if v < MIN_TENSORRT:
        raise TensorRtVersionError(f"TensorRT {version} is too old: deimv2-deploy needs TensorRT >= "
                                   f"{'.'.join(map(str, MIN_TENSORRT))} (>= 10.6 for FP16). Install: {INSTALL_HINT}")
    warnings = []
    if precision == "fp16" and v < FP16_SAFE_TENSORRT:
        message = f"TensorRT {version} has a known FP16 bug for DEIMv2 ({FP16_BUG})"
        if not force:
            raise TensorRtVersionError(f"{message}. Upgrade with pip install 'tensorrt>=10.6,<12', or build fp32, or "
                                       "pass force=True (--force) to build anyway and read the parity report "
                                       "(fp32_attention=True, the ViT attention kept FP32 in the ONNX, is the "
                                       "workaround reported in #112)")
        warnings.append(f"{message}; building anyway because force=True: check the parity report")
    return warnings


# --- precision ------------------------------------------------------------------------------------------
def onnx_precision_of(model: Any) -> str:
    """The precision an ONNX model carries (an `onnx.ModelProto`): "int8" with Q/DQ nodes, "fp16" with FP16
    tensors, else "fp32". A strongly typed engine built from it has the same."""
    if any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.node):
        return "int8"
    fp16 = 10  # onnx.TensorProto.FLOAT16
    if any(t.data_type == fp16 for t in model.graph.initializer) or any(
            v.type.tensor_type.elem_type == fp16 for v in model.graph.value_info) or any(
            node.op_type == "Cast" and any(a.name == "to" and a.i == fp16 for a in node.attribute)
            for node in model.graph.node):
        return "fp16"
    return "fp32"


def network_flags(trt: Any) -> int:
    """`create_network` flags: STRONGLY_TYPED where TensorRT has the flag (10.x), 0 where every network is
    strongly typed anyway (11.x). Explicit batch is implicit since 10.0."""
    flag = getattr(getattr(trt, "NetworkDefinitionCreationFlag", None), "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


# --- metadata ---------------------------------------------------------------------------------------------
def build_settings(*, precision: str, profile: BatchProfile, workspace_gb: float, tensorrt: str, device: str,
                   compute_capability: tuple[int, int] | None = None, fp32_attention: bool = False,
                   tf32: bool = False, timing_cache: str | None = None, onnx: dict[str, Any] | None = None,
                   forced: bool = False, warnings: Sequence[str] = ()) -> dict[str, Any]:
    """The sidecar's `build` section: how the engine was made (JSON-serialisable). The precision is the ONNX's
    (strongly typed network); how that ONNX was made (FP32 blocks, calibration) is in `onnx["build"]`."""
    return {
        "precision": precision,
        "network": "strongly typed (precision from the ONNX)",
        "batch_profile": profile.to_dict(),
        "workspace_gb": float(workspace_gb),
        "tensorrt": str(tensorrt),
        "device": str(device),
        "compute_capability": None if compute_capability is None else ".".join(map(str, compute_capability)),
        "fp32_attention": bool(fp32_attention),
        "tf32": bool(tf32),
        "timing_cache": timing_cache,
        "onnx": onnx,
        "forced": bool(forced),
        "warnings": list(warnings),
    }


def engine_spec(onnx_spec: ArtifactSpec, precision: str, profile: BatchProfile, build: dict[str, Any],
                parity: dict[str, Any] | None, versions: dict[str, str]) -> ArtifactSpec:
    """The engine's spec: the ONNX artifact's identity and preprocessing, this build's precision/batch/settings."""
    return onnx_spec.with_(precision=precision, batch=profile.min if profile.fixed else None, exporter=EXPORTER,
                           parity=parity, build=build, versions={**onnx_spec.versions, **versions})


def parity_tolerances(precision: str) -> dict[str, float]:
    """match_detections tolerances of an engine against ONNX Runtime (CPU) on the same ONNX.

    FP32 (TF32 off) differs from the CPU only by kernel summation order; FP16 moves boxes by pixels; INT8 is
    reported, not judged, so its tolerances only say how close the matched detections are."""
    if precision == "fp32":
        return {"box_tol": 0.5, "score_tol": 2e-3, "min_matched": 0.95}
    if precision == "fp16":
        return {"box_tol": 4.0, "score_tol": 5e-2, "min_matched": 0.8}
    return {"box_tol": 16.0, "score_tol": 0.1, "min_matched": 0.5}


def _onnx_spec(path: Path, variant: str) -> tuple[ArtifactSpec, bool]:
    """(spec from the ONNX metadata or the official preprocessing of `variant`, whether metadata was there)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    stored = ArtifactSpec.from_metadata({p.key: p.value for p in model.metadata_props})
    return resolve_spec(stored, path, variant), stored is not None


def _engine_and_sidecar_complete(engine_bytes: int) -> Any:
    """An AtomicWrite verify: the engine file has every byte, the sidecar reads back as a spec."""
    def verify(tmps: list[Path]) -> None:
        engine, sidecar = tmps
        if engine.stat().st_size != engine_bytes:
            raise OSError(f"the engine was not written completely ({engine.stat().st_size} of {engine_bytes} bytes)")
        ArtifactSpec.from_json(sidecar.read_text(encoding="utf-8"))
    return verify


# --- the library calls ------------------------------------------------------------------------------------
def _engine_parity(engine_path: Path, onnx_path: Path, spec: ArtifactSpec, precision: str, profile: BatchProfile,
                   device_index: int) -> dict[str, Any]:
    """Run the fresh engine and ONNX Runtime (CPU) on the fixed parity images; match detections order-free."""
    from deimv2_deploy.exporters.onnx_export import run_onnx
    from deimv2_deploy.exporters.parity import match_detections, parity_batch
    from deimv2_deploy.runtimes.tensorrt_backend import TensorRtRuntime

    count = min(max(2, profile.min), profile.max)
    batch = parity_batch(spec, count=count)
    reference = run_onnx(onnx_path)(batch.as_inputs())
    runtime = TensorRtRuntime(engine_path, device=f"cuda:{device_index}", variant=spec.variant)
    try:
        ours = runtime.infer(batch.as_inputs())
    finally:
        runtime.close()
    report = match_detections(ours, reference, **parity_tolerances(precision))
    report["against"] = "ONNX Runtime (CPU, FP32) on the source ONNX"
    report["judged"] = precision != "int8"
    return report


def export_tensorrt(variant: str, *, precision: str | None = None, checkpoint: str | os.PathLike | None = None,
                    random_weights: bool = False, output_dir: str | os.PathLike | None = None,
                    calibration: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                    calibration_size: int = 300, batch: int | None = None,
                    dynamic_batch: str | Sequence[int] | BatchProfile | None = None, workspace_gb: float = 4.0,
                    timing_cache: str | os.PathLike | None = None, fp32_attention: bool = False, force: bool = False,
                    onnx_path: str | os.PathLike | None = None, device: str = "cuda", check_parity: bool = True,
                    verbose: bool = False, quiet: bool = False, class_names: Sequence[str] | None = None,
                    category_ids: Sequence[int] | None = None) -> ExportResult:
    """Build a strongly typed TensorRT engine of DEIMv2-`variant` in the model store, with its sidecar
    `<name>.engine.json`. Its precision is that of the ONNX it is built from.

    The ONNX comes from `onnx_path` (its precision is the engine's; `precision`, when given, must agree), or is
    exported first at `precision` (default fp32) from `checkpoint` / `random_weights`: INT8 then needs
    `calibration` (a folder of representative images or a COCO-format dataset; `calibration_size` of them are
    used) for the ONNX's Q/DQ scales. `batch` fixes the batch; `dynamic_batch` ("MIN:OPT:MAX" or a 3-tuple) sets
    the profile range (default 1:1:8). `fp32_attention` keeps the ViT attention core (s/m/l/x) in FP32 in the FP16
    ONNX it exports. An FP32 engine that disagrees with ONNX Runtime raises ParityError and nothing is written;
    FP16/INT8 parity is recorded in the sidecar. `class_names`/`category_ids`: the classes to store (one per
    class); by default those of the ONNX (or of the checkpoint it is exported from).
    """
    import onnx

    from deimv2_deploy.exporters.onnx_export import export_onnx
    from deimv2_deploy.exporters.onnx_precision import FP16_KEEP, INT8_FLOAT
    from deimv2_deploy.exporters.parity import ParityError
    from deimv2_deploy.runtimes.base import BackendUnavailableError
    from deimv2_deploy.runtimes.tensorrt_backend import TensorRtRuntime
    from deimv2_deploy.tensorrt_support import cuda_context, import_pycuda, import_tensorrt

    info = get_variant_info(variant)
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if workspace_gb <= 0:
        raise ValueError(f"workspace_gb must be positive, got {workspace_gb}")
    if onnx_path is not None and (checkpoint is not None or random_weights):
        raise ValueError("pass either onnx_path (an ONNX to build from) or checkpoint/random_weights, not both")
    if onnx_path is not None and (fp32_attention or calibration is not None):
        raise ValueError("the precision of an engine is that of its ONNX: fp32_attention and calibration shape the "
                         "ONNX, so pass them to deimv2-export --format onnx, or leave onnx_path out")
    if fp32_attention and (precision or "fp32") == "fp32" and onnx_path is None:
        raise ValueError("fp32_attention only matters for fp16/int8 engines (an fp32 engine is all FP32)")
    if fp32_attention and info.family != "dinov3":
        raise ValueError(f"fp32_attention keeps the ViT attention in FP32; DEIMv2-{info.name} has an HGNetv2 "
                         "backbone without one (sizes s, m, l, x have it)")
    if onnx_path is None and precision == "int8" and calibration is None:
        raise ValueError("an INT8 engine is built from an INT8 Q/DQ ONNX, which needs calibration images: pass "
                         "calibration=<folder of representative images or a COCO dataset> (--calibration); "
                         "300 images are used by default")
    device_index = parse_cuda_device(device)
    profile = resolve_batch_profile(batch, dynamic_batch)  # validated now; the ONNX's batch axis is checked later
    if onnx_path is None and precision == "int8":
        select_calibration_images(calibration, calibration_size)  # a folder without images fails now, not later
    onnx_file = None if onnx_path is None else Path(onnx_path)
    if onnx_file is not None:
        if not onnx_file.is_file():
            raise FileNotFoundError(f"ONNX file not found: {onnx_file}")
        carried = onnx_precision_of(onnx.load(str(onnx_file), load_external_data=False))
        if precision is not None and precision != carried:
            raise ValueError(f"{onnx_file} is a {carried} ONNX, so its engine is {carried}, not {precision}: export "
                             f"a {precision} ONNX first (deimv2-export {info.name} --format onnx --precision "
                             f"{precision}) or leave precision out")
        precision = carried
    precision = precision or "fp32"
    reason = TensorRtRuntime.unavailable_reason()  # what is missing (TensorRT, pycuda, a GPU) and how to install
    if reason:
        raise BackendUnavailableError(reason)
    trt = import_tensorrt()
    cuda = import_pycuda()
    cautions = check_tensorrt_version(trt.__version__, precision, force)
    for caution in cautions:
        warnings.warn(caution, stacklevel=2)

    store = resolve_store(output_dir)
    steps = Steps(f"tensorrt {info.name} {precision}", 5, quiet)

    # 1. the ONNX, which carries the precision
    if onnx_file is None:
        steps(f"exporting the {precision.upper()} ONNX to build from")
        float_blocks = None
        if fp32_attention:
            float_blocks = tuple(dict.fromkeys((*(FP16_KEEP if precision == "fp16" else INT8_FLOAT),
                                                "vit_attention")))
        result = export_onnx(info.name, checkpoint=checkpoint, random_weights=random_weights, output_dir=store,
                             batch=profile.min if profile.fixed else None, precision=precision,
                             calibration=calibration, calibration_size=calibration_size, float_blocks=float_blocks,
                             quiet=quiet, class_names=class_names, category_ids=category_ids)
        onnx_file, onnx_spec, has_metadata = result.path, result.spec, True
    else:
        steps(f"using {onnx_file} ({precision})")
        onnx_spec, has_metadata = _onnx_spec(onnx_file, info.name)
        onnx_spec = spec_with_classes(onnx_spec, has_metadata, class_names, category_ids, onnx_file.name)
    onnx_digest = file_sha256(onnx_file)

    final = store / artifact_name(info.name, precision, onnx_spec.random_weights, None, ".engine")
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    with cuda_context(cuda, device_index):
        gpu = cuda.Device(device_index)
        gpu_name, capability = gpu.name(), tuple(gpu.compute_capability())

        # 2. parse into a strongly typed network: every tensor has the type the ONNX gives it
        steps(f"parsing {onnx_file.name} with TensorRT {trt.__version__} (strongly typed)")
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_file)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT's ONNX parser rejected {onnx_file}: {errors}")
        inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
        if sorted(inputs) != sorted(INPUT_NAMES):
            raise ValueError(f"{onnx_file} has inputs {list(inputs)}, expected {list(INPUT_NAMES)} (a DEIMv2 deploy "
                             "graph from deimv2-export or the official exporter)")
        if tuple(inputs["images"][2:]) != onnx_spec.input_size:
            raise ValueError(f"{onnx_file} takes {inputs['images'][2:]} images but DEIMv2-{info.name} is "
                             f"{onnx_spec.input_size}")
        onnx_batch = inputs["images"][0] if inputs["images"][0] > 0 else None
        profile = resolve_batch_profile(batch, dynamic_batch, onnx_batch)
        if profile.fixed:
            final = final.with_name(artifact_name(info.name, precision, onnx_spec.random_weights, profile.min,
                                                  ".engine"))

        # 3. configure: no precision switches (the network is strongly typed), TF32 off so FP32 is FP32
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
        shapes = profile_shapes(onnx_spec.input_size, profile)
        optimization = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            optimization.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(optimization)
        tf32 = False
        if hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)
        if timing_cache is not None:
            timing_cache = Path(timing_cache)
            cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
            if not config.set_timing_cache(cache, False):  # from another GPU/TensorRT: start afresh
                cache = config.create_timing_cache(b"")
                config.set_timing_cache(cache, False)
                cautions.append(f"{timing_cache} did not match this GPU/TensorRT and was replaced")

        # 4. build
        what = f"batch {profile}, workspace {workspace_gb:g} GB" + (", ViT attention FP32" if fp32_attention else "")
        steps(f"building the {precision.upper()} engine on {gpu_name} ({what}); this takes minutes")
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError(f"TensorRT could not build the {precision} engine for {onnx_file} (see the TensorRT "
                               "log above; rerun with verbose=True / --verbose for details)")
        if timing_cache is not None:
            write_bytes(timing_cache, memoryview(config.get_timing_cache().serialize()))

        # 5. parity of the engine, from its temporary file beside the final one; engine and sidecar are then
        # published together, the sidecar first (AtomicWrite publishes its first file last)
        engine_bytes = memoryview(serialized).nbytes
        with AtomicWrite(final, sidecar_path(final), verify=_engine_and_sidecar_complete(engine_bytes)) as out:
            tmp, sidecar_tmp = out
            with open(tmp, "wb") as fh:
                fh.write(memoryview(serialized))
            del serialized
            parity = None
            if check_parity:
                steps("checking the engine against ONNX Runtime on the same ONNX")
                parity = _engine_parity(tmp, onnx_file, onnx_spec, precision, profile, device_index)
                if precision == "fp32" and not parity["ok"]:
                    raise ParityError(f"the FP32 TensorRT engine of DEIMv2-{info.name} disagrees with ONNX Runtime: "
                                      f"{parity['matched']}/{parity['total']} detections matched, max box diff "
                                      f"{parity['max_box_diff']:.3g} px; nothing was written. Pass check_parity=False "
                                      "to keep such an engine anyway, and please report this")
            else:
                steps("parity check skipped")
            build = build_settings(
                precision=precision, profile=profile, workspace_gb=workspace_gb, tensorrt=trt.__version__,
                device=gpu_name, compute_capability=capability, fp32_attention=fp32_attention,
                tf32=tf32, timing_cache=None if timing_cache is None else str(timing_cache),
                onnx={"file": onnx_file.name, "sha256": onnx_digest, "metadata": has_metadata,
                      "precision": precision, "build": onnx_spec.build.get("precision")}, forced=force,
                warnings=cautions)
            spec = engine_spec(onnx_spec, precision, profile, build, parity, library_versions("tensorrt"))
            steps(f"writing {final} and {sidecar_path(final).name}")
            sidecar_tmp.write_text(sidecar_text(spec), encoding="utf-8")
    if parity is not None and not quiet:
        verdict = "ok" if parity["ok"] else ("MISMATCH" if parity["judged"] else "reported")
        print(f"parity vs ONNX Runtime: {verdict}: {parity['matched']}/{parity['total']} detections matched, "
              f"max box diff {parity['max_box_diff']:.3g} px, max score diff {parity['max_score_diff']:.3g}",
              flush=True)
    return ExportResult(final, spec, parity or {}, steps.elapsed)
