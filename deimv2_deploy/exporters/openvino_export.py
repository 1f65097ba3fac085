"""deimv2-export, OpenVINO part: the deploy graph -> OpenVINO IR (.xml + .bin) in FP32, FP16 or INT8.

Steps: load the reference -> an OpenVINO model, from our ONNX artifact (exported here when the store has none for
these weights) or straight from the PyTorch module with `ov.convert_model` -> precision (FP32 keeps FP32
weights; FP16 compresses the weights; INT8 is NNCF post-training quantization on the user's images,
preprocessed exactly as at inference, with the decoder and postprocessing kept in floating point) -> the saved IR
is loaded back with `OpenVinoRuntime` and checked against PyTorch, order-free -> spec (with the parity report)
in rt_info -> `<name>.xml/.bin` under temporary names, read back by OpenVINO, then renamed (`deimv2_deploy.files`).
The check IR is written to a private scratch folder, never to the model store.

Which graph: both routes give the same OpenVINO graph (attention fused into ScaledDotProductAttention either
way; 1,204 vs 1,200 nodes for atto) and the same latency (measured side by side, 2 threads: atto 52.0 vs 51.4
ms, s 2131 vs 2129 ms on a loaded 2-core machine). They differ in export time: converting an ONNX file takes
5-8 s, tracing the PyTorch module 18-38 s, exporting the ONNX first 15 s-2 min. So `source="auto"` converts the
store's ONNX of the same weights when there is one (the IR is then the very graph ONNX Runtime was checked on)
and the PyTorch module otherwise. `source="onnx"` always goes through ONNX (exporting it when needed),
`source="torch"` never does.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.classes import ModelClasses
from deimv2_deploy.data.calibration import select_calibration_images
from deimv2_deploy.exporters import ExportResult, artifact_name, resolve_store
from deimv2_deploy.exporters.common import Steps, deploy_graph, library_versions
from deimv2_deploy.exporters.parity import (
    ParityError,
    drift_summary,
    match_detections,
    parity_batch,
    reference_outputs,
    tolerances,
)
from deimv2_deploy.files import atomic_write, work_folder
from deimv2_deploy.media import read_image
from deimv2_deploy.preprocess import Preprocessor
from deimv2_deploy.runtimes.base import INPUT_NAMES, OUTPUT_NAMES
from deimv2_deploy.runtimes.openvino_backend import openvino_core
from deimv2_deploy.spec import EXPORTER, METADATA_KEY, ArtifactSpec
from deimv2_deploy.variants import get_variant_info

__all__ = ["export_openvino", "PRECISIONS", "SOURCES", "INT8_FLOAT_PATTERNS",
           "INT8_FLOAT_TYPES", "select_calibration_images", "calibration_inputs", "convert_from_onnx",
           "convert_from_torch", "quantize_int8", "nncf_int8", "save_ir", "drift_summary",
           "int8_speed_note"]

PRECISIONS = ("fp32", "fp16", "int8")
SOURCES = ("auto", "onnx", "torch")
# Kept in floating point under INT8. Node names differ by route: ONNX "/model/decoder/...", "/postprocessor/...";
# PyTorch "__module.model.decoder...", "__module.postprocessor...". The decoder's top-k query selection,
# grid_sample offsets, box distributions and the final top-k are where 8-bit rounding moves detections.
INT8_FLOAT_PATTERNS = (r".*model[./]decoder[./].*", r".*postprocessor.*")
INT8_FLOAT_TYPES = ("ScaledDotProductAttention",)


# --- calibration ---------------------------------------------------------------------------------------
def calibration_inputs(paths: Sequence[Path], spec: ArtifactSpec) -> Iterator[dict[str, np.ndarray]]:
    """Graph inputs of one image each, preprocessed exactly as at inference; images are read lazily."""
    prepare = Preprocessor(spec)
    for path in paths:
        yield prepare(read_image(path)).as_inputs()


class _CalibrationSet:
    """Re-iterable: NNCF walks the data more than once (statistics, then bias correction)."""

    def __init__(self, paths: Sequence[Path], spec: ArtifactSpec) -> None:
        self.paths, self.spec = list(paths), spec

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return calibration_inputs(self.paths, self.spec)

    def __len__(self) -> int:
        return len(self.paths)


# --- conversion -----------------------------------------------------------------------------------------
def _name_ports(model: Any) -> Any:
    """Give the IR the official I/O names (the runtime looks tensors up by name)."""
    if len(model.inputs) != len(INPUT_NAMES) or len(model.outputs) != len(OUTPUT_NAMES):
        raise ValueError(f"expected a DEIMv2 deploy graph with inputs {INPUT_NAMES} and outputs {OUTPUT_NAMES}, "
                         f"got {len(model.inputs)} inputs and {len(model.outputs)} outputs")
    for port, name in zip(model.inputs, INPUT_NAMES, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, OUTPUT_NAMES, strict=True):
        port.get_tensor().set_names({name})
    return model


def convert_from_onnx(path: str | os.PathLike) -> Any:
    import openvino as ov

    model = ov.convert_model(str(path))
    if model.has_rt_info(["framework", METADATA_KEY]):
        del model.get_rt_info()["framework"]  # the ONNX's own spec (its precision, its parity): ours replaces it
    return _name_ports(model)


def convert_from_torch(graph: Any, spec: ArtifactSpec) -> Any:
    """`ov.convert_model` on the DeployGraph: dynamic batch, fixed (H, W)."""
    import openvino as ov
    import torch

    h, w = spec.input_size
    n = spec.batch or 2  # trace with 2 images so nothing specialises on a batch of one
    images = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[w, h]] * n, dtype=torch.int64)
    batch = spec.batch if spec.batch is not None else -1
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer warnings about python-int shapes; parity checks the result
        model = ov.convert_model(graph, example_input=(images, sizes),
                                 input=[(ov.PartialShape([batch, 3, h, w]), ov.Type.f32),
                                        (ov.PartialShape([batch, 2]), ov.Type.i64)])
    return _name_ports(model)


def quantize_int8(model: Any, paths: Sequence[Path], spec: ArtifactSpec, subset_size: int,
                  float_patterns: Sequence[str] = INT8_FLOAT_PATTERNS) -> Any:
    """NNCF post-training INT8 of `model` on the calibration images; nodes matching `float_patterns` stay float."""
    return nncf_int8(model, _CalibrationSet(paths, spec), min(subset_size, len(paths)), float_patterns,
                     transformer=get_variant_info(spec.variant).family == "dinov3")


def nncf_int8(model: Any, data: Any, subset_size: int, float_patterns: Sequence[str],
              float_types: Sequence[str] = INT8_FLOAT_TYPES, transformer: bool = False) -> Any:
    """NNCF post-training INT8 of the OpenVINO `model` on `data` (re-iterable graph inputs; `subset_size` of them
    are used), MIXED preset; nodes matching `float_patterns` or of `float_types` stay float. `transformer`: NNCF's
    TRANSFORMER model type (what ViT graphs need). Shared by the detector and the DINOv3 / EoMT exporter."""
    import nncf

    # attention stays float too: with quantized inputs OpenVINO's CPU plugin can no longer run the fused
    # ScaledDotProductAttention kernel and falls back to MatMul + Softmax, which made s's INT8 slower than FP32
    scope = nncf.IgnoredScope(patterns=list(float_patterns), types=list(float_types), validate=False)
    model_type = nncf.ModelType.TRANSFORMER if transformer else None
    # MIXED: asymmetric activations. HGNetv2's affine after ReLU and the SiLU/GELU outputs are not centred on 0;
    # on atto it halved the score drift against FP32 compared with the symmetric default (benchmarks/openvino_int8.md)
    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # its INFO lists every node it leaves in float: hundreds of lines
    try:
        return nncf.quantize(model, nncf.Dataset(data), subset_size=subset_size,
                             preset=nncf.QuantizationPreset.MIXED, ignored_scope=scope, model_type=model_type)
    finally:
        nncf_logger.setLevel(level)


def save_ir(model: Any, final_xml: Path, compress_to_fp16: bool) -> None:
    """Write `final_xml` and its .bin under temporary names in the same folder, read them back with OpenVINO,
    then rename both: the old .xml goes first and the new one comes last, so a reader never sees a new .bin
    beside an old .xml; a failure leaves nothing under the final names (temporaries are removed)."""
    import openvino as ov

    def readable(tmps: list[Path]) -> None:
        try:
            openvino_core().read_model(str(tmps[0]), str(tmps[1]))
        except RuntimeError as e:
            raise OSError(f"{final_xml} did not read back ({str(e).strip().splitlines()[-1]}): was the disk "
                          "full?") from e

    with atomic_write(final_xml, final_xml.with_suffix(".bin"), verify=readable) as (tmp_xml, _):
        ov.save_model(model, str(tmp_xml), compress_to_fp16=compress_to_fp16)  # writes the .bin beside it


def _set_spec(model: Any, spec: ArtifactSpec) -> None:
    for key, value in spec.to_metadata().items():
        model.set_rt_info(value, [key])


def _describe(p: Mapping[str, Any]) -> str:
    return (f"{p['matched']}/{p['total']} detections matched ({100 * p['fraction']:.1f}%) within "
            f"{p['box_tol']:g} px / {p['score_tol']:g}, max box diff {p['max_box_diff']:.2e} px, "
            f"max score diff {p['max_score_diff']:.2e}"
            + (f"; {p['score_ties']} unmatched score tie(s) excused (top-k selection rounding)"
               if p.get("score_ties") else ""))


# --- the export ------------------------------------------------------------------------------------------
def _matching_store_onnx(variant: str, weights: str, random_weights: bool, store: Path) -> Path | None:
    """The store's FP32 dynamic-batch ONNX when it was exported from these same weights, else None."""
    path = store / artifact_name(variant, "fp32", random_weights, None, ".onnx")
    if not path.exists():
        return None
    try:
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        spec = ArtifactSpec.from_metadata(meta)
    except Exception:  # noqa: BLE001 - unreadable or foreign: not ours to reuse
        return None
    return path if spec is not None and spec.weights == weights and spec.batch is None else None


def _store_onnx(variant: str, graph: Any, weights: str, classes: ModelClasses, random_weights: bool, store: Path,
                quiet: bool) -> Path:
    """Our FP32 ONNX of these weights: the store's if it was made from the same weights, else a fresh export."""
    from deimv2_deploy.exporters.onnx_export import export_onnx

    found = _matching_store_onnx(variant, weights, random_weights, store)
    if found is not None:
        return found
    return export_onnx(variant, random_weights=random_weights, output_dir=store, quiet=quiet, graph=graph,
                       weights=weights, class_names=classes.names, category_ids=classes.category_ids).path


def export_openvino(variant: str, *, precision: str = "fp32", checkpoint: str | os.PathLike | None = None,
                    random_weights: bool = False, output_dir: str | os.PathLike | None = None,
                    calibration: str | os.PathLike | None = None, calibration_size: int = 300,
                    onnx_path: str | os.PathLike | None = None, source: str = "auto", quiet: bool = False,
                    float_patterns: Sequence[str] = INT8_FLOAT_PATTERNS, graph: Any = None,
                    weights: str | None = None, class_names: Sequence[str] | None = None,
                    category_ids: Sequence[int] | None = None) -> ExportResult:
    """Export DEIMv2-`variant` to OpenVINO IR `<store>/deimv2_<size>[_random]_<precision>.xml` (+ .bin).

    precision: "fp32" (fails loudly unless boxes are within 1e-2 px and scores within 1e-5 of PyTorch for at
    least 98% of detections), "fp16" (FP16 weights) or "int8" (needs `calibration`: a folder of images or a
    COCO-format dataset, see `select_calibration_images`; uses up to `calibration_size` of its images). FP16/INT8
    parity, and INT8's drift against the FP32 graph, are reported in the result and the spec, not enforced.
    source: "onnx", "torch" or "auto". `onnx_path`: convert this ONNX file instead of the store's (implies source
    "onnx"). source "auto": the store's ONNX of these weights when it exists, else the PyTorch module (same graph
    and speed; see the module docstring).
    `float_patterns`: node-name regexes kept in floating point under INT8. `graph`/`weights`: an already loaded
    DeployGraph and its weights description (benchmarks, tests). `class_names`/`category_ids`: the classes to store
    (one per class); by default the checkpoint's, COCO-80 for an 80-class model without names, else class_0..
    """
    import openvino as ov

    from deimv2_deploy.runtimes.openvino_backend import OpenVinoRuntime

    info = get_variant_info(variant)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if onnx_path is not None:
        if source == "torch":
            raise ValueError("onnx_path converts an ONNX file: do not combine it with source='torch'")
        source = "onnx"
    calibration_paths: list[Path] = []
    if precision == "int8":
        if calibration is None:
            raise ValueError("INT8 needs calibration images: pass --calibration DIR, a folder of a few hundred "
                             "images like those the model will see or a COCO-format dataset (they are only read, "
                             "never stored)")
        calibration_paths = select_calibration_images(calibration, calibration_size)
    elif calibration is not None:
        raise ValueError(f"--calibration is for --precision int8, not {precision}")
    store = resolve_store(output_dir)
    final = store / artifact_name(info.name, precision, random_weights, None, ".xml")
    steps = Steps(f"openvino {info.name} {precision}", 5 if precision == "int8" else 4, quiet)

    graph, weights, classes = deploy_graph(info.name, checkpoint, random_weights, store, graph, weights, steps,
                                           class_names, category_ids)
    spec = ArtifactSpec.for_variant(info.name, weights=weights, random_weights=random_weights, precision=precision,
                                    exporter=EXPORTER, **classes.spec_fields())
    route = source
    if source == "auto":
        route = "onnx" if _matching_store_onnx(info.name, weights, random_weights, store) is not None else "torch"

    if route == "onnx":
        onnx_file = Path(onnx_path) if onnx_path is not None else _store_onnx(info.name, graph, weights, classes,
                                                                              random_weights, store, quiet)
        steps(f"converting {onnx_file.name} with OpenVINO")
        ov_model = convert_from_onnx(onnx_file)
    else:
        steps("converting the PyTorch deploy graph with ov.convert_model")
        ov_model = convert_from_torch(graph, spec)

    check = parity_batch(spec)
    reference = reference_outputs(graph, check)
    build: dict[str, Any] = {"source": route, "compress_to_fp16": precision == "fp16"}
    drift = None
    if precision == "int8":
        steps(f"quantizing to INT8 with NNCF on {len(calibration_paths)} images from {calibration}")
        core = openvino_core()
        fp32 = core.compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        fp32_outputs = _run(fp32, check.as_inputs())
        ov_model = quantize_int8(ov_model, calibration_paths, spec, calibration_size, float_patterns)
        build["calibration"] = {"folder": str(calibration), "images": len(calibration_paths),
                                "float_patterns": list(float_patterns), "float_types": list(INT8_FLOAT_TYPES)}

    steps("checking the saved IR against PyTorch (OpenVINO, CPU)")
    _set_spec(ov_model, spec)
    with work_folder("deimv2-export-") as work:
        check_xml = work / final.name
        ov.save_model(ov_model, str(check_xml), compress_to_fp16=precision == "fp16")
        runtime = OpenVinoRuntime(check_xml, device="cpu", inference_precision="f32")
        ours = runtime.infer(check.as_inputs())
        runtime.close()
    limits = tolerances(precision)  # enforced for FP32 only; FP16/INT8 drift is reported against them
    parity = match_detections(ours, reference, **limits)
    parity["against"] = "PyTorch deploy model (CPU, FP32)"
    if precision != "fp32":
        parity["enforced"] = False
        parity["drift"] = drift_summary(ours, reference)
    if precision == "int8":
        drift = match_detections(ours, fp32_outputs, **limits)
        drift["summary"] = drift_summary(ours, fp32_outputs)
        parity["vs_fp32"] = drift
    if precision == "fp32" and not parity["ok"]:
        raise ParityError(f"OpenVINO FP32 export of DEIMv2-{info.name} ({route} route) disagrees with PyTorch: "
                          f"{_describe(parity)}. Nothing was written; please report this with the command you ran")

    steps(f"writing {final} (+ .bin)")
    spec = spec.with_(parity=parity, build=build,
                      versions=library_versions("torch", "openvino", "nncf", *(["onnx"] if route == "onnx" else [])))
    _set_spec(ov_model, spec)
    save_ir(ov_model, final, compress_to_fp16=precision == "fp16")
    if not quiet:
        print(f"parity vs PyTorch ({precision}): {'ok' if parity['ok'] else 'outside'} "
              f"{'(enforced)' if precision == 'fp32' else '(reported, not enforced)'}: {_describe(parity)}", flush=True)
        if precision != "fp32":
            print(f"  drift vs PyTorch, top-100 per image: {parity['drift']}", flush=True)
        if drift is not None:
            print(f"INT8 drift vs the FP32 graph: {_describe(drift)}; top-100 per image: {drift['summary']}",
                  flush=True)
        note = int8_speed_note() if precision == "int8" else None
        if note:
            print(note, flush=True)
    return ExportResult(final, spec, parity, steps.elapsed)


def int8_speed_note(isa: Mapping[str, bool] | None = None) -> str | None:
    """A warning for an x86 CPU without int8 dot-product instructions (VNNI, AMX), where OpenVINO's int8 linear
    layers fall back to generic kernels slower than its FP32 ones; None where the CPU has them or is unknown.
    `isa`: `cpu_info()["isa"]`, this machine's by default."""
    from deimv2_deploy.cpu import cpu_info, has_int8_dot_product

    if has_int8_dot_product(cpu_info()["isa"] if isa is None else dict(isa)) is not False:
        return None
    return ("note: this CPU has no int8 dot-product instructions (no VNNI, no AMX). Here OpenVINO INT8 is often no "
            "faster than FP32, and slower on the ViT sizes s..x (benchmarks/cpu_int8.md: 0.84-0.94x on an AVX2 "
            "EPYC; convolution-heavy atto..n gain 1.15-1.45x). The IR keeps its speed-up on CPUs that have them: "
            "compare with `deimv2-bench --backends openvino --precision fp32,int8` on the target machine.")


def _run(compiled: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    request = compiled.create_infer_request()
    request.infer(dict(inputs))
    return {name: np.array(request.get_tensor(name).data, copy=True) for name in OUTPUT_NAMES}
