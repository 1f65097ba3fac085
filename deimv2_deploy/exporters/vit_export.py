"""deimv2-export dinov3 | eomt: a transformers folder -> ONNX [-> OpenVINO IR], FP32, FP16 or INT8, with a parity
report.

The graph is transformers' own forward, traced as it is, with transformers' I/O names: `pixel_values` float32
(N, 3, H, W, normalised) -> DINOv3: `last_hidden_state` (N, 1 + R + P, D), `pooler_output` (N, D); EoMT:
`class_queries_logits` (N, Q, C + 1), `masks_queries_logits` (N, Q, H/4, W/4). H and W are fixed (EoMT's grid
is fixed by its config; DINOv3 at the size asked for), the batch is dynamic unless fixed. Post-processing stays out
of the graph (runtimes/vit_runtime.py does the official one), so the outputs can be compared with transformers'.

EoMT's masked attention is traced as the checkpoint sets it: probability 1 -> masked blocks, 0 -> plain blocks;
a probability strictly between 0 and 1 (random per query) is refused (`check_masked_attention`).

Precision (`precision=`, as the detector's exporters name them): the FP32 trace is always checked against
transformers first (1e-4, enforced). Then
- ONNX fp16 / int8: the detector's rewriters (`onnx_precision.convert_fp16`, `quantize_int8`: symmetric Q/DQ with
  zero points 0, checked by `qdq_summary`) on the prepared graph, with the ViT's own FP32 blocks
  (`exporters/vit_precision.py` says what and why);
- OpenVINO fp16: the FP32 IR saved with FP16-compressed weights (OpenVINO widens them at load on CPUs without native
  FP16, so on AVX2 it runs f32); int8: NNCF post-training quantization (`openvino_export.nncf_int8`, TRANSFORMER
  model type) with the patch embedding, attention and EoMT's heads float.
INT8 calibrates on the user's images (`calibration`: a folder of images or a COCO-format dataset; no default, as
for the detector), preprocessed as the ViT runtime does (`exporters.calibration.vit_calibration_inputs`). bf16 is
not a file precision: OpenVINO chooses it when loading an FP32 IR (`load_runtime(..., precision="bf16"|"auto")`).
A reduced-precision artifact is checked against transformers FP32 on the parity noise plus two structured scenes
preprocessed as predict() does: raw max |difference| per output reported, task-level agreement enforced
(`vit_precision.THRESHOLDS`: EoMT mask signs and query classes, DINOv3 cosine similarities); below the limits it is
a ParityError and nothing is written. The report is `spec.parity` (and printed).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.exporters.common import ExportResult, Steps, library_versions, resolve_store
from deimv2_deploy.exporters.parity import ParityError
from deimv2_deploy.exporters.vit_precision import VIT_PRECISIONS, describe_reduced, reduced_parity
from deimv2_deploy.files import atomic_write, file_sha256, work_folder
from deimv2_deploy.runtimes.openvino_backend import openvino_core
from deimv2_deploy.spec import EXPORTER
from deimv2_deploy.vit_spec import VitSpec, parse_stuff_classes

__all__ = ["export_vit", "vit_spec_for", "vit_artifact_name", "VIT_FORMATS", "VIT_PRECISIONS", "ATOL", "RTOL",
           "parity_pixels", "reduced_parity_pixels", "compare_outputs", "check_vit_precision"]

VIT_FORMATS = ("onnx", "openvino")
# FP32 parity: |onnx - torch| <= ATOL + RTOL * max|torch| for every output
ATOL, RTOL = 1e-4, 1e-4


def vit_artifact_name(folder: Path, model_type: str, input_size: tuple[int, int], precision: str,
                      batch: int | None, ext: str) -> str:
    """<model_type>_<folder name>_<H>x<W>_<precision>[_b<N>]<ext>."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in folder.resolve().name) or "model"
    return f"{model_type}_{stem}_{input_size[0]}x{input_size[1]}_{precision}{f'_b{batch}' if batch else ''}{ext}"


def vit_spec_for(model: Any, folder: Any, input_size: tuple[int, int] | None = None, **fields: Any) -> VitSpec:
    """The spec of an export of `model` (loaded from `folder`, a VitFolder)."""
    config = model.config
    patch = int(config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0])
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    if folder.family == "eomt":
        from deimv2_deploy.models.hf_vit import check_masked_attention

        if input_size is not None and tuple(input_size) != tuple(size):
            raise ValueError(f"EoMT's patch grid is fixed by its config ({size[0]}x{size[1]}); --input-size "
                             f"{input_size[0]}x{input_size[1]} cannot be used: leave it out")
        fields.update(class_names=folder.class_names, num_queries=int(config.num_queries),
                      masked_attention=check_masked_attention(model))
        act = str(getattr(config, "hidden_act", "gelu"))
        if act != "gelu":  # transformers' mask head takes the backbone's activation; the official one is GELU
            warnings.warn(f"this EoMT's backbone activation is {act!r}: transformers' mask head and upscale layers use "
                          "it too, while the official EoMT hard-codes GELU there, so the export equals the official "
                          "model only if these weights were trained in transformers (see "
                          "benchmarks/results/eomt_official_vs_transformers.md)", stacklevel=2)
    elif input_size is not None:
        size = tuple(input_size)
    if any(int(s) <= 0 or int(s) % patch for s in size):
        raise ValueError(f"input size {size[0]}x{size[1]} must be positive multiples of the patch size {patch}")
    return VitSpec(family=folder.family, model_type=folder.model_type, input_size=(int(size[0]), int(size[1])),
                   patch_size=patch, hidden_size=int(config.hidden_size),
                   num_register_tokens=int(config.num_register_tokens), **fields)


def _graph_module(model: Any, spec: VitSpec) -> Any:
    """transformers' model behind a module returning the graph's outputs as a tuple (in eval mode)."""
    import torch

    names = spec.output_names

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.model(pixel_values=pixel_values)
            return tuple(getattr(out, n) for n in names)

    # eval() on the wrapper too: torch.onnx.export restores the wrapper's mode afterwards, and a wrapper left in
    # train mode would put transformers' model in train mode (EoMT then runs every masked block, RoPE jitters)
    return Graph().eval()


def parity_pixels(spec: VitSpec, count: int, seed: int = 0) -> np.ndarray:
    """Deterministic normalised images (count, 3, H, W) as the preprocessing makes them: uint8 noise, /255, mean/std."""
    rng = np.random.default_rng(seed)
    h, w = spec.input_size
    raw = rng.integers(0, 256, size=(count, 3, h, w)).astype(np.float32) / 255.0
    mean = np.asarray(spec.mean, np.float32)[None, :, None, None]
    std = np.asarray(spec.std, np.float32)[None, :, None, None]
    return ((raw - mean) / std).astype(np.float32)


def reduced_parity_pixels(spec: VitSpec) -> np.ndarray:
    """What a reduced-precision export is checked on: the parity noise (`parity_pixels`) and two structured scenes
    (`exporters.parity.parity_images`) cropped and normalised as predict() does (`vit_runtime.graph_crops`), a
    multiple of the fixed batch (the last scene crop repeated) when there is one."""
    from deimv2_deploy.exporters.parity import parity_images
    from deimv2_deploy.runtimes.vit_runtime import graph_crops, normalize

    crops = [normalize(c, spec) for bgr in parity_images(2) for c in graph_crops(bgr[:, :, ::-1].copy(), spec)]
    pixels = np.concatenate([parity_pixels(spec, 2), np.stack(crops)])
    step = spec.batch or 1
    extra = (-len(pixels)) % step
    return np.concatenate([pixels, np.repeat(pixels[-1:], extra, 0)]) if extra else pixels


def check_vit_precision(precision: str, fmt: str, calibration: Any) -> None:
    """One-line ValueError for a precision this exporter does not make for `fmt`, or calibration that does not fit."""
    from deimv2_deploy.exporters.calibration import NO_CALIBRATION
    from deimv2_deploy.precision import bf16_export_error

    if precision == "bf16":
        raise ValueError(bf16_export_error(fmt))
    if precision not in VIT_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(VIT_PRECISIONS)}, got {precision!r}")
    if precision == "int8" and calibration is None:
        raise ValueError(NO_CALIBRATION)
    if precision != "int8" and calibration is not None:
        raise ValueError(f"--calibration is for --precision int8, not {precision}")


def compare_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per output: max abs difference, the reference's max magnitude, the tolerance, ok."""
    report: dict[str, Any] = {"atol": ATOL, "rtol": RTOL, "outputs": {}}
    ok = True
    for name, ref in want.items():
        out = got[name]
        if out.shape != ref.shape:
            report["outputs"][name] = {"ok": False, "shape": list(out.shape), "expected_shape": list(ref.shape)}
            ok = False
            continue
        diff = float(np.max(np.abs(out.astype(np.float64) - ref))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        tol = ATOL + RTOL * scale
        report["outputs"][name] = {"max_abs_diff": diff, "max_abs_ref": scale, "tol": tol, "ok": diff <= tol}
        ok = ok and diff <= tol
    report["ok"] = ok
    report["max_abs_diff"] = max((o.get("max_abs_diff", float("inf")) for o in report["outputs"].values()),
                                 default=0.0)
    return report


def _describe(parity: dict[str, Any]) -> str:
    parts = [f"{n} max |diff| {o['max_abs_diff']:.2e} (tol {o['tol']:.1e})" if "max_abs_diff" in o
             else f"{n} shape {o['shape']} != {o['expected_shape']}" for n, o in parity["outputs"].items()]
    return f"{'ok' if parity['ok'] else 'FAILED'}: " + ", ".join(parts)


def _trace(graph: Any, spec: VitSpec, path: Path, opset: int, batch: int | None) -> None:
    """Trace with a dynamic batch axis, then pin it to `batch` when one is given: tracing at a static batch
    breaks DINOv3 configs without register tokens (an empty concat the tracer folds into a wrong shape)."""
    import torch

    example = torch.from_numpy(parity_pixels(spec, 2, seed=1))  # 2: nothing specialises on a batch of one
    names = [*spec.input_names, *spec.output_names]
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer warnings on python-int shapes: the parity check below is the proof
        torch.onnx.export(graph, (example,), str(path), input_names=list(spec.input_names),
                          output_names=list(spec.output_names), dynamic_axes={n: {0: "N"} for n in names},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    if batch:
        import onnx

        model = onnx.load(str(path))
        for value in (*model.graph.input, *model.graph.output):
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_param")
            dim.dim_value = batch
        onnx.save(model, str(path))


def _reference(graph: Any, spec: VitSpec, pixels: np.ndarray) -> dict[str, np.ndarray]:
    import torch

    with torch.inference_mode():
        outs = graph.eval()(torch.from_numpy(pixels))
    return {n: o.float().numpy() for n, o in zip(spec.output_names, outs, strict=True)}


def _batched(run: Any, spec: VitSpec, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """`run(pixels)` in chunks of the fixed batch (all at once when dynamic), outputs concatenated."""
    step = spec.batch or len(pixels)
    parts = [run(pixels[i:i + step]) for i in range(0, len(pixels), step)]
    return {n: np.concatenate([p[n] for p in parts]) for n in spec.output_names}


def _run_onnx(path: Path, spec: VitSpec, pixels: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return _batched(lambda x: dict(zip(spec.output_names, session.run(list(spec.output_names), {"pixel_values": x}),
                                       strict=True)), spec, pixels)


def _publish_onnx(work: Path, final: Path, spec: VitSpec) -> None:
    from deimv2_deploy.exporters.onnx_export import publish_onnx

    publish_onnx(work, final, spec)  # the one atomic, read-back writer (any spec with to_metadata())


def _openvino_model(onnx_path: Path) -> Any:
    import openvino as ov

    try:
        return ov.convert_model(str(onnx_path))
    except Exception as e:  # noqa: BLE001 - OpenVINO's conversion errors are pybind classes
        said = next((line.strip() for line in str(e).splitlines() if "Conversion failed for" in line),
                    " ".join(str(e).split())[:200])
        raise RuntimeError(f"OpenVINO cannot convert this graph ({said}); use the ONNX export "
                           "(--format onnx), which OpenVINO's runtime can also load") from None


def _run_openvino(model: Any, spec: VitSpec, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """`model` (an ov.Model or a saved IR's path) compiled with the f32 hint: the same arithmetic on every CPU."""
    compiled = openvino_core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def run(x: np.ndarray) -> dict[str, np.ndarray]:
        result = compiled({"pixel_values": x})
        return {n: np.array(result[compiled.output(n)]) for n in spec.output_names}

    return _batched(run, spec, pixels)


def _publish_openvino(model: Any, final: Path, spec: VitSpec, compress_to_fp16: bool = False) -> None:
    """The IR (FP32 weights, or FP16-compressed) with the spec in rt_info, .bin and .xml published together."""
    import openvino as ov

    for key, value in spec.to_metadata().items():
        model.set_rt_info(value, [key])
    with atomic_write(final, final.with_suffix(".bin")) as (xml, _):
        ov.save_model(model, str(xml), compress_to_fp16=compress_to_fp16)


def export_vit(family: str, checkpoint: str | os.PathLike, *, output_dir: str | os.PathLike | None = None,
               fmt: str = "onnx", opset: int = 17, batch: int | None = None,
               input_size: tuple[int, int] | None = None, stuff_classes: str | list | tuple | None = None,
               precision: str = "fp32", calibration: str | os.PathLike | None = None, calibration_size: int = 300,
               calibration_method: str = "minmax", quiet: bool = False) -> ExportResult:
    """Export a transformers DINOv3 ViT (`family="dinov3"`) or EoMT-DINOv3 (`"eomt"`) folder to ONNX or OpenVINO IR
    in the model store; raises ParityError (writing nothing) when the export disagrees with transformers.

    `stuff_classes` (EoMT): the labels panoptic segmentation merges into one segment per class ("80-132", names,
    a list, or "none"), recorded in the metadata; transformers' config does not keep them, so without this option
    the artifact's panoptic split is unknown and its runtime asks for it.
    `precision`: "fp32", "fp16" or "int8" (module docstring); INT8 needs `calibration` (a folder of images or a
    COCO-format dataset, up to `calibration_size` of its images; ONNX: `calibration_method` minmax, percentile or
    entropy)."""
    from deimv2_deploy.models.hf_vit import VIT_FAMILIES, load_vit_model

    if family not in VIT_FAMILIES:
        raise ValueError(f"unknown model family {family!r}: choose one of {', '.join(VIT_FAMILIES)}")
    if fmt not in VIT_FORMATS:
        raise ValueError(f"{family} exports to {' or '.join(VIT_FORMATS)}, not {fmt!r}")
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1 (or None for dynamic), got {batch}")
    if stuff_classes is not None and family != "eomt":
        raise ValueError(f"--stuff-classes is for eomt (panoptic segmentation), not {family}: leave it out")
    check_vit_precision(precision, fmt, calibration)
    from deimv2_deploy.exporters.onnx_precision import CALIBRATION_METHODS

    if calibration_method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got "
                         f"{calibration_method!r}")
    calibration_paths: list[Path] = []
    if precision == "int8":  # a missing or empty calibration source fails here, before the model is loaded
        from deimv2_deploy.data.calibration import select_calibration_images

        calibration_paths = select_calibration_images(calibration, calibration_size)
    steps = Steps(f"{fmt} {family} {precision}", 7 if precision != "fp32" else 5 if fmt == "onnx" else 6, quiet)
    steps(f"loading {checkpoint}")
    model, folder = load_vit_model(checkpoint, family)
    weights = f"{folder.path} (sha256 {file_sha256(folder.weights[0])[:16]})"
    stuff = None if stuff_classes is None else parse_stuff_classes(stuff_classes, folder.class_names)
    spec = vit_spec_for(model, folder, input_size, weights=weights, batch=batch, exporter=EXPORTER,
                        stuff_classes=stuff, precision=precision)
    store = resolve_store(output_dir)
    ext = ".onnx" if fmt == "onnx" else ".xml"
    final = store / vit_artifact_name(folder.path, folder.model_type, spec.input_size, precision, batch, ext)
    graph = _graph_module(model, spec)
    with work_folder("deimv2-export-") as work:
        traced = work / "model.onnx"
        steps(f"tracing to ONNX (opset {opset}, {spec.input_size[0]}x{spec.input_size[1]}, "
              f"batch {'dynamic' if batch is None else batch})")
        _trace(graph, spec, traced, opset, batch)
        steps("checking parity against transformers (ONNX Runtime, CPU)")
        pixels = parity_pixels(spec, batch or 2)
        reference = _reference(graph, spec, pixels)
        parity = compare_outputs(_run_onnx(traced, spec, pixels), reference)
        parity["against"] = f"transformers {_version('transformers')} {type(model).__name__} (CPU, FP32)"
        parity["images"] = int(pixels.shape[0])
        if not parity["ok"]:
            raise ParityError(f"ONNX export of {folder.path} disagrees with transformers: {_describe(parity)}. "
                              "Nothing was written; please report this with the command you ran")
        versions = library_versions("torch", "transformers", "onnx", "onnxruntime")
        if precision != "fp32":
            from deimv2_deploy.exporters.calibration import CalibrationSet

            calib = CalibrationSet(calibration_paths, spec, str(calibration)) if precision == "int8" else None
            result = _export_reduced(graph, spec, traced, work, final, fmt, precision, calib, calibration_method,
                                     parity, versions, steps, folder.path, opset)
            steps("done")
            if not quiet:
                print(f"parity vs transformers FP32 ({precision}, {result.parity['backend']}): "
                      f"{describe_reduced(result.parity)}", flush=True)
            return ExportResult(result.path, result.spec, result.parity, steps.elapsed)
        if fmt == "openvino":
            steps("converting to OpenVINO IR and checking it against transformers (CPU, FP32)")
            ir = _openvino_model(traced)
            ov_parity = compare_outputs(_run_openvino(ir, spec, pixels), reference)
            if not ov_parity["ok"]:
                raise ParityError(f"OpenVINO IR of {folder.path} disagrees with transformers: {_describe(ov_parity)}. "
                                  "Nothing was written; please report this with the command you ran")
            parity = {**parity, "openvino": ov_parity}
            versions = {**versions, **library_versions("openvino")}
        spec = spec.with_(parity=parity, versions=versions, build={"opset": opset, "format": fmt})
        steps(f"writing {final}")
        if fmt == "onnx":
            _publish_onnx(traced, final, spec)
        else:
            _publish_openvino(ir, final, spec)
    steps("done")
    if not quiet:
        print(f"parity vs transformers: {_describe(parity)}", flush=True)
    return ExportResult(final, spec, parity, steps.elapsed)


def _export_reduced(graph: Any, spec: VitSpec, traced: Path, work: Path, final: Path, fmt: str, precision: str,
                    calib: Any, method: str, fp32_parity: dict[str, Any], versions: dict[str, str], steps: Steps,
                    source: Path, opset: int) -> ExportResult:
    """The FP16 / INT8 artifact from the checked FP32 trace: rewritten, run on the reduced parity inputs against
    transformers FP32, refused (ParityError) below the agreement limits, else published."""
    from deimv2_deploy.exporters.vit_precision import OPENVINO_INT8_FLOAT, rewrite_onnx

    what = "ONNX" if fmt == "onnx" else "OpenVINO IR"
    how = f" (calibrating on {len(calib.paths)} images of {calib.source})" if calib is not None else ""
    steps(f"rewriting to {precision.upper()}{how}")
    pixels = reduced_parity_pixels(spec)
    reference = _reference(graph, spec, pixels)
    if fmt == "onnx":
        out = work / f"model_{precision}.onnx"
        build: dict[str, Any] = {"precision": rewrite_onnx(traced, out, precision, spec, calib, method)}
        steps(f"checking the {precision.upper()} ONNX against transformers FP32 (ONNX Runtime, CPU)")
        ours = _run_onnx(out, spec, pixels)
        backend = "onnxruntime"
        versions = {**versions, **library_versions(*(["onnxconverter_common"] if precision == "fp16" else []))}
    else:
        ir = _openvino_model(traced)
        build = {"compress_to_fp16": precision == "fp16"}
        if precision == "int8":
            from deimv2_deploy.exporters.openvino_export import INT8_FLOAT_TYPES, nncf_int8

            ir = nncf_int8(ir, calib, len(calib), OPENVINO_INT8_FLOAT, transformer=True)
            build["calibration"] = {**calib.describe(), "float_patterns": list(OPENVINO_INT8_FLOAT),
                                    "float_types": list(INT8_FLOAT_TYPES)}
        steps(f"checking the {precision.upper()} IR against transformers FP32 (OpenVINO, CPU, f32 arithmetic)")
        import openvino as ov

        check = work / "check.xml"
        ov.save_model(ir, str(check), compress_to_fp16=precision == "fp16")  # the weights as they will be saved
        ours = _run_openvino(str(check), spec, pixels)
        backend = "openvino"
        versions = {**versions, **library_versions("openvino", *(["nncf"] if precision == "int8" else []))}
    parity = reduced_parity(spec, precision, ours, reference)
    parity.update(backend=backend, images=int(len(pixels)),
                  against=f"transformers {_version('transformers')} (CPU, FP32)",
                  inputs="parity noise + 2 structured scenes as predict() crops them", fp32_onnx=fp32_parity)
    if not parity["ok"]:
        raise ParityError(f"the {precision.upper()} {what} of {source} disagrees with transformers FP32 beyond the "
                          f"task-level limits: {describe_reduced(parity)}. Nothing was written; "
                          + ("check the calibration images (like those the model will see?) or export fp16/fp32"
                             if precision == "int8" else "export fp32, or report this with the command you ran"))
    spec = spec.with_(parity=parity, versions=versions, build={**build, "format": fmt, "opset": opset})
    steps(f"writing {final}")
    if fmt == "onnx":
        _publish_onnx(out, final, spec)
    else:
        _publish_openvino(ir, final, spec, compress_to_fp16=precision == "fp16")
    return ExportResult(final, spec, parity)



def _version(name: str) -> str:
    return library_versions(name).get(name, "?")
