"""deimv2-export, ONNX part: the deploy-mode model + postprocessor, official I/O, metadata, parity report.

Steps: load the reference (checkpoint from the store, a given path, or deterministic random weights) ->
deploy() -> trace with the TorchScript exporter (torch's dynamo exporter fails on this graph today) ->
onnxsim (keeping the dynamic batch axis; constant folding skipped where it breaks, e.g. RoPE in l/x) ->
optional FP16 -> parity against PyTorch with ONNX Runtime -> metadata -> the final name.

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
    parity_batch,
    reference_outputs,
    tolerances,
)
from deimv2_deploy.files import atomic_write, work_folder
from deimv2_deploy.native import native_output_captured
from deimv2_deploy.runtimes.base import INPUT_NAMES, OUTPUT_NAMES
from deimv2_deploy.spec import EXPORTER, ArtifactSpec
from deimv2_deploy.variants import get_variant_info

__all__ = ["export_onnx", "export_official_style_onnx", "official_style_name", "trace_to_onnx", "write_onnx_with_spec",
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


def _to_fp16(path: Path) -> None:
    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as e:
        raise RuntimeError("--fp16 needs onnxconverter-common: pip install onnxconverter-common") from e
    model = onnx.load(str(path))
    # keep I/O types (float32 images, int64 sizes) and the postprocessing TopK in float32
    model = float16.convert_float_to_float16(model, keep_io_types=True, op_block_list=["TopK", "Sigmoid"])
    onnx.save(model, str(path))


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


def publish_onnx(work: Path, final: Path, spec: ArtifactSpec | None = None) -> Path:
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


def write_onnx_with_spec(src: Path, dst: Path, spec: ArtifactSpec) -> None:
    """Copy `src` to `dst` with the spec in metadata_props (replacing any earlier deimv2 entries)."""
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
                simplify: bool = True, fp16: bool = False, quiet: bool = False, graph: Any = None,
                weights: str | None = None, spec_overrides: Mapping[str, Any] | None = None,
                class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None) -> ExportResult:
    """Export DEIMv2-`variant` to ONNX in the model store; fails loudly when FP32 parity is broken.

    `graph`/`weights` let callers that already hold a DeployGraph (the OpenVINO and TensorRT exporters, the
    transformers-checkpoint exporter) reuse it instead of loading the checkpoint again; `spec_overrides` are
    ArtifactSpec fields of such a graph (class names, input size, `build` entries such as the graph used).
    `class_names`/`category_ids`: the classes to store (one per class), which win over everything else; by
    default those the checkpoint carries, COCO-80 for an 80-class model without names, else class_0..
    """
    info = get_variant_info(variant)
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be at least 1 (or None for dynamic), got {batch}")
    store = resolve_store(output_dir)
    precision = "fp16" if fp16 else "fp32"
    final = store / artifact_name(info.name, precision, random_weights, batch, ".onnx")
    steps = Steps(f"onnx {info.name}", 5, quiet)

    graph, weights, classes = deploy_graph(info.name, checkpoint, random_weights, store, graph, weights, steps,
                                           class_names, category_ids)
    spec = ArtifactSpec.for_variant(info.name, weights=weights, random_weights=random_weights,
                                    precision=precision, batch=batch, exporter=EXPORTER,
                                    **_spec_fields(classes, spec_overrides, explicit=class_names is not None))
    with work_folder("deimv2-export-") as work:
        traced = work / final.name
        steps(f"tracing to ONNX (opset {opset}, batch {'dynamic' if batch is None else batch})")
        trace_to_onnx(graph, spec, traced, opset=opset, batch=batch)
        simplified = "no (--no-simplify)"
        if simplify:
            steps("simplifying with onnxsim")
            simplified = _simplify(traced, quiet)
        else:
            steps("simplification skipped")
        if fp16:
            _to_fp16(traced)
        steps("checking parity against PyTorch (ONNX Runtime, CPU)")
        check = parity_batch(spec, count=batch or 2)
        reference = reference_outputs(graph, check)
        parity = compare_graph_outputs(run_onnx(traced), reference, check, **tolerances(precision))
        parity["against"] = spec.build.get("reference", "PyTorch deploy model (CPU, FP32)")
        if not fp16 and not parity["ok"]:
            raise ParityError(f"ONNX export of DEIMv2-{info.name} disagrees with PyTorch: {_describe(parity)}. "
                              "Nothing was written; please report this with the command you ran")
        spec = spec.with_(parity=parity, versions=library_versions("torch", "onnx", "onnxsim", "onnxruntime"),
                          build={**spec.build, "opset": opset, "simplified": simplified})
        steps(f"writing {final}")
        publish_onnx(traced, final, spec)
    if not quiet:
        print(f"parity vs PyTorch: {_describe(parity)}", flush=True)
    return ExportResult(final, spec, parity, steps.elapsed)


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
            + (f"; {p['cutoff_ties']} unmatched tie(s) at the top-k score cutoff" if p.get("cutoff_ties") else ""))
