"""deimv2-export, ONNX part: the deploy-mode model + postprocessor, official I/O, metadata, parity report.

Steps: load the reference (checkpoint from the store, a given path, or deterministic random weights) ->
deploy() -> trace with the TorchScript exporter (torch's dynamo exporter fails on this graph today) ->
onnxsim (keeping the dynamic batch axis; constant folding skipped where it breaks, e.g. RoPE in l/x) ->
parity against PyTorch with ONNX Runtime (FP32, enforced) -> optional FP16 or INT8 Q/DQ rewrite of that graph
(`deimv2_deploy.exporters.onnx_precision`) with its parity against PyTorch and drift against the FP32 ONNX
(reported) -> metadata -> the final name.

All the work happens in a private scratch folder (`deimv2_deploy.files.work_folder`); the model store only ever
sees the finished file, written under a temporary name, read back and renamed (`deimv2_deploy.files`). Nothing,
not even the store's folder, is created when loading the checkpoint or tracing fails. onnxsim's console notes
about nodes it cannot fold are captured and kept in the artifact's build notes.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.exporters.common import (
    ExportResult,
    Steps,
    artifact_name,
    deploy_graph,
    library_versions,
    resolve_store,
)
from deimv2_deploy.exporters.parity import (
    ParityError,
    compare_graph_outputs,
    drift_summary,
    match_detections,
    parity_batch,
    reference_outputs,
    tolerances,
)
from deimv2_deploy.files import atomic_write, work_folder
from deimv2_deploy.native import native_output_captured
from deimv2_deploy.runtimes.base import INPUT_NAMES, OUTPUT_NAMES
from deimv2_deploy.spec import EXPORTER, ArtifactSpec
from deimv2_deploy.variants import get_variant_info

__all__ = ["export_onnx", "precision_report", "PRECISION_DRIFT_IMAGES", "export_official_style_onnx",
           "official_style_name", "trace_to_onnx", "write_onnx_with_spec",
           "run_onnx", "publish_onnx", "summarize_onnxsim_output"]

# onnxsim's C++ note for a node constant folding cannot evaluate (the node is kept as it is: harmless)
_ONNXSIM_SKIP = re.compile(r'failed to run "(?P<op>[^"]+)" op .*skip')


def trace_to_onnx(graph: Any, spec: ArtifactSpec, path: Path, opset: int = 17, batch: int | None = None) -> None:
    """Write the traced DeployGraph to `path` (dynamic batch unless `batch` is given)."""
    import torch

    n = batch or 2  # trace with 2 images so nothing specialises on a batch of one
    h, w = spec.input_size
    images = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[w, h]] * n, dtype=torch.int64)
    dynamic = None if batch else {name: {0: "N"} for name in (*INPUT_NAMES, *OUTPUT_NAMES)}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # tracer warnings about python-int shapes are expected and checked by parity
        torch.onnx.export(graph, (images, sizes), str(path), input_names=list(INPUT_NAMES),
                          output_names=list(OUTPUT_NAMES), dynamic_axes=dynamic, opset_version=opset,
                          do_constant_folding=True, dynamo=False)


def summarize_onnxsim_output(lines: list[str]) -> tuple[str | None, str | None]:
    """(build note on the nodes onnxsim could not fold, one console line for anything else it printed or None).

    "failed to run "Concat" op ... skip" means constant folding left that node as it was: harmless (parity is
    checked afterwards), so it goes to the build notes only. Any other output is unexpected and is said."""
    skipped = Counter(m.group("op") for m in map(_ONNXSIM_SKIP.search, lines) if m)
    other = [line.strip() for line in lines if not _ONNXSIM_SKIP.search(line)]
    note = None
    if skipped:
        ops = ", ".join(f"{op} x{n}" for op, n in skipped.most_common())
        note = f"{sum(skipped.values())} nodes left unfolded ({ops})"
    said = None
    if other:
        said = f"onnxsim said: {other[0]}" + (f" (+{len(other) - 1} more lines)" if len(other) > 1 else "")
    return note, said


def _simplify(path: Path, quiet: bool = False) -> str:
    """Simplify in place with onnxsim; returns what was done. Its console output is captured and summarised."""
    import onnx
    import onnxsim

    model = onnx.load(str(path))
    for skip_folding in (False, True):  # constant folding fails on some graphs (l, x RoPE); retry without
        try:
            with native_output_captured() as printed:
                simplified, _ = onnxsim.simplify(model, check_n=0, skip_constant_folding=skip_folding)
            onnx.save(simplified, str(path))
        except Exception as e:  # noqa: BLE001 - onnxsim raises many types; fall back, then give up loudly
            error = e
            continue
        note, said = summarize_onnxsim_output(printed)
        if said and not quiet:
            print(said, file=sys.stderr, flush=True)
        return "onnxsim" + (" (constant folding skipped)" if skip_folding else "") + (f": {note}" if note else "")
    warnings.warn(f"onnxsim could not simplify the graph ({error}); keeping the traced graph", stacklevel=2)
    return f"not simplified: {error}"


def run_onnx(path: Path, threads: int | None = None):
    """A function running the ONNX file in ONNX Runtime (CPU): inputs dict -> outputs dict."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])

    def run(inputs):
        return dict(zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), inputs), strict=True))

    return run


def publish_onnx(work: Path, final: Path, spec: Any = None) -> Path:
    """Put the finished ONNX file `work` (from a scratch folder) under `final`: written beside it under a temporary
    name (with `spec` in its metadata when given), read back, then renamed."""
    def readable(tmps: list[Path]) -> None:
        import onnx

        try:
            onnx.load(str(tmps[0]), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf decode errors have many types
            raise OSError(f"{final} did not read back as ONNX ({type(e).__name__}): was the disk full?") from e

    with atomic_write(final, verify=readable) as tmp:
        if spec is None:
            shutil.copyfile(work, tmp)
        else:
            write_onnx_with_spec(work, tmp, spec)
    return final


def write_onnx_with_spec(src: Path, dst: Path, spec: Any) -> None:
    """Copy `src` to `dst` with the spec (an ArtifactSpec, or any with `to_metadata()`) in metadata_props
    (replacing any earlier deimv2 entries)."""
    import onnx

    model = onnx.load(str(src))
    keep = [p for p in model.metadata_props if not p.key.startswith("deimv2.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in spec.to_metadata().items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "deimv2-deploy"
    onnx.save(model, str(dst))


def _spec_fields(classes: Any, overrides: Mapping[str, Any] | None, explicit: bool) -> dict[str, Any]:
    """ArtifactSpec fields: a transformers graph's overrides over the checkpoint's classes, unless the caller
    named the classes itself."""
    fields = {**classes.spec_fields(), **dict(overrides or {})}
    return {**fields, **classes.spec_fields()} if explicit else fields


def export_onnx(variant: str, *, checkpoint: str | os.PathLike | None = None, random_weights: bool = False,
                output_dir: str | os.PathLike | None = None, opset: int = 17, batch: int | None = None,
                simplify: bool = True, precision: str | None = None, fp16: bool = False,
                calibration: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                calibration_size: int = 300, calibration_method: str = "minmax",
                float_blocks: Sequence[str] | None = None, quiet: bool = False, graph: Any = None,
                weights: str | None = None, spec_overrides: Mapping[str, Any] | None = None,
                class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None) -> ExportResult:
    """Export DEIMv2-`variant` to ONNX in the model store; fails loudly when FP32 parity is broken.

    precision: "fp32" (default), "fp16" (FP16 compute with `onnx_precision.FP16_KEEP` in FP32; `fp16=True` is the
    older spelling) or "int8" (explicit symmetric Q/DQ, calibrated on up to `calibration_size` images of
    `calibration`: a folder of images or a COCO-format dataset; `calibration_method` one of
    `onnx_precision.CALIBRATION_METHODS`). I/O stays float32 images / int64 sizes in, float32 out. The FP32 graph
    is always checked against PyTorch (enforced); an FP16/INT8 file's parity against PyTorch and its drift against
    the FP32 ONNX are recorded in its metadata (`parity`, `parity["vs_fp32_onnx"]`), not enforced.
    `float_blocks`: the `onnx_precision.BLOCKS` kept in FP32 (default: FP16_KEEP / INT8_FLOAT).
    `graph`/`weights` let callers that already hold a DeployGraph (the OpenVINO and TensorRT exporters, the
    transformers-checkpoint exporter) reuse it instead of loading the checkpoint again; `spec_overrides` are
    ArtifactSpec fields of such a graph (class names, input size, `build` entries such as the graph used).
    `class_names`/`category_ids`: the classes to store (one per class), which win over everything else; by
    default those the checkpoint carries, COCO-80 for an 80-class model without names, else class_0..
    """
    from deimv2_deploy.exporters.onnx_precision import PRECISIONS

    info = get_variant_info(variant)
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1 (or None for dynamic), got {batch}")
    if fp16 and precision not in (None, "fp16"):
        raise ValueError(f"fp16=True contradicts precision={precision!r}: pass precision only")
    precision = precision or ("fp16" if fp16 else "fp32")
    if precision not in PRECISIONS:
        raise ValueError(f"ONNX precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if calibration is not None and precision != "int8":
        raise ValueError(f"--calibration is for --precision int8, not {precision}")
    if float_blocks is not None and precision == "fp32":
        raise ValueError("float_blocks is for --precision fp16 / int8 (an FP32 graph is all float)")
    store = resolve_store(output_dir)
    final = store / artifact_name(info.name, precision, random_weights, batch, ".onnx")
    spec = ArtifactSpec.for_variant(info.name, random_weights=random_weights, precision=precision, batch=batch,
                                    exporter=EXPORTER)
    calib = None
    if precision == "int8":  # bad calibration input fails here, before the model is loaded
        from deimv2_deploy.exporters.calibration import calibration_set

        calib = calibration_set(calibration, calibration_size, spec)
    steps = Steps(f"onnx {info.name} {precision}", 5 if precision == "fp32" else 7, quiet)

    graph, weights, classes = deploy_graph(info.name, checkpoint, random_weights, store, graph, weights, steps,
                                           class_names, category_ids)
    spec = spec.with_(weights=weights, **_spec_fields(classes, spec_overrides, explicit=class_names is not None))
    with work_folder("deimv2-export-") as work:
        traced = work / artifact_name(info.name, "fp32", random_weights, batch, ".onnx")
        steps(f"tracing to ONNX (opset {opset}, batch {'dynamic' if batch is None else batch})")
        trace_to_onnx(graph, spec, traced, opset=opset, batch=batch)
        simplified = "no (--no-simplify)"
        if simplify:
            steps("simplifying with onnxsim")
            simplified = _simplify(traced, quiet)
        else:
            steps("simplification skipped")
        steps("checking parity against PyTorch (ONNX Runtime, CPU)")
        check = parity_batch(spec, count=batch or 2)
        reference = reference_outputs(graph, check)
        parity = compare_graph_outputs(run_onnx(traced), reference, check, **tolerances("fp32"))
        parity["against"] = spec.build.get("reference", "PyTorch deploy model (CPU, FP32)")
        if not parity["ok"]:
            raise ParityError(f"ONNX export of DEIMv2-{info.name} disagrees with PyTorch: {_describe(parity)}. "
                              "Nothing was written; please report this with the command you ran")
        build: dict[str, Any] = {**spec.build, "opset": opset, "simplified": simplified}
        out = traced
        if precision != "fp32":
            out = work / final.name
            steps(f"rewriting the graph to {precision.upper()}"
                  + (f" (calibrating on {len(calib)} images of {calib.source})" if calib is not None else ""))
            build["precision"] = _rewrite(traced, out, precision, calib, calibration_method, float_blocks)
            steps(f"checking the {precision.upper()} graph against PyTorch and the FP32 ONNX")
            parity = precision_report(out, traced, reference, check, precision, spec,
                                      None if calib is None else calib.paths[:PRECISION_DRIFT_IMAGES])
        spec = spec.with_(parity=parity, versions=library_versions(*_LIBRARIES[precision]), build=build)
        steps(f"writing {final}")
        publish_onnx(out, final, spec)
    if not quiet:
        print(f"parity vs PyTorch: {_describe(parity)}", flush=True)
        if "vs_fp32_onnx" in parity:
            print(f"{precision.upper()} drift vs the FP32 ONNX: {_describe(parity['vs_fp32_onnx'])}; top-100 per "
                  f"image: {parity['vs_fp32_onnx']['summary']}", flush=True)
    return ExportResult(final, spec, parity, steps.elapsed)


# images of the calibration set an INT8 export also measures its drift on (beside the fixed parity scenes)
PRECISION_DRIFT_IMAGES = 4
_LIBRARIES = {"fp32": ("torch", "onnx", "onnxsim", "onnxruntime"),
              "fp16": ("torch", "onnx", "onnxsim", "onnxruntime", "onnxconverter_common"),
              "int8": ("torch", "onnx", "onnxsim", "onnxruntime")}


def _rewrite(src: Path, dst: Path, precision: str, calib: Any, method: str,
             float_blocks: Sequence[str] | None) -> dict[str, Any]:
    from deimv2_deploy.exporters import onnx_precision

    if precision == "fp16":
        keep = onnx_precision.FP16_KEEP if float_blocks is None else tuple(float_blocks)
        return onnx_precision.convert_fp16(src, dst, keep)
    keep = onnx_precision.INT8_FLOAT if float_blocks is None else tuple(float_blocks)
    notes = onnx_precision.quantize_int8(src, dst, calib, keep, method=method)
    notes["calibration"] = calib.describe()
    return notes


def precision_report(path: Path, fp32_path: Path, reference: dict[str, Any], batch: Any, precision: str,
                     spec: ArtifactSpec, images: Sequence[Path] | None = None) -> dict[str, Any]:
    """Parity of the reduced-precision ONNX `path` against PyTorch (`reference` on `batch`), and its drift against
    the FP32 ONNX `fp32_path` on `batch` and, when given, on `images` (one at a time): `match_detections` at the
    precision's tolerances plus the tolerance-free `drift_summary`. Reported, never enforced."""
    from deimv2_deploy.media import read_image
    from deimv2_deploy.preprocess import Preprocessor

    ours, fp32 = run_onnx(path), run_onnx(fp32_path)
    limits = tolerances(precision)
    out_batch = ours(batch.as_inputs())
    parity = match_detections(out_batch, reference, **limits)
    parity["against"] = "PyTorch deploy model (CPU, FP32)"
    parity["drift"] = drift_summary(out_batch, reference)
    fp32_batch = fp32(batch.as_inputs())
    vs = match_detections(out_batch, fp32_batch, **limits)
    vs["summary"] = drift_summary(out_batch, fp32_batch)
    vs["images"] = "the fixed parity scenes"
    parity["vs_fp32_onnx"] = vs
    if images:
        prepare = Preprocessor(spec)
        rows: dict[str, list[dict[str, Any]]] = {"ours": [], "fp32": []}
        for image in images:
            inputs = prepare(read_image(image)).as_inputs()
            rows["ours"].append(ours(inputs))
            rows["fp32"].append(fp32(inputs))
        stack = {k: {name: np.concatenate([r[name] for r in v]) for name in OUTPUT_NAMES} for k, v in rows.items()}
        on_data = match_detections(stack["ours"], stack["fp32"], **limits)
        on_data["summary"] = drift_summary(stack["ours"], stack["fp32"])
        on_data["images"] = f"{len(images)} calibration images"
        parity["vs_fp32_onnx_calibration_images"] = on_data
    return parity


def official_style_name(variant: str, random_weights: bool = False) -> str:
    """deimv2_<size>[_random]_fp32_official.onnx: the baseline export's file name in the model store."""
    return artifact_name(variant, "fp32", random_weights, None, "_official.onnx")


def export_official_style_onnx(variant: str, *, checkpoint: str | os.PathLike | None = None,
                               random_weights: bool = False, output_dir: str | os.PathLike | None = None,
                               opset: int = 17, graph: Any = None) -> Path:
    """The ONNX file the official exporter makes of the same model: the baseline speed comparisons start from.

    `torch.onnx.export` of the plain deploy graph with a dynamic batch axis, and nothing else: no onnxsim, no
    metadata (load it with `variant=`), no parity step. Written to `<store>/deimv2_<size>[_random]_fp32_official.onnx`.
    """
    info = get_variant_info(variant)
    store = resolve_store(output_dir)
    graph, _, _ = deploy_graph(info.name, checkpoint, random_weights, store, graph, None, Steps("official", 1, True))
    final = store / official_style_name(info.name, random_weights)
    with work_folder("deimv2-export-") as work:
        traced = work / final.name
        trace_to_onnx(graph, ArtifactSpec.for_variant(info.name), traced, opset=opset, batch=None)
        return publish_onnx(traced, final)


def _describe(p: dict[str, Any]) -> str:
    return (f"{'ok' if p['ok'] else 'FAILED'}: {p['matched']}/{p['total']} detections matched "
            f"({100 * p['fraction']:.1f}%), max box diff {p['max_box_diff']:.2e} px "
            f"(tol {p['box_tol']:g}), max score diff {p['max_score_diff']:.2e} (tol {p['score_tol']:g})"
            + (f"; {p['score_ties']} unmatched score tie(s) excused (top-k selection rounding)"
               if p.get("score_ties") else ""))
