"""FP16 and INT8 for the DINOv3 / EoMT-DINOv3 graphs: which blocks stay FP32, how the graph is prepared, and the
task-level agreement that decides whether a reduced-precision export is usable.

The detector's machinery does the rewriting (`onnx_precision.convert_fp16` / `quantize_int8` with this module's
`VIT_BLOCKS`; `openvino_export.nncf_int8` with `OPENVINO_INT8_FLOAT`); this module only says what is special to
transformers' ViT graphs.

Preparing the ONNX (`prepare_onnx`): the RoPE sin/cos tables depend on nothing but the fixed image size, yet the
traced graph computes them at run time through `If` subgraphs that onnxconverter-common 1.16 breaks (and onnxsim
cannot simplify). They are evaluated once with ONNX Runtime (checked equal for two batch sizes and inputs) and
stored as constants before either rewrite; positions computed in FP16 would be wrong anyway.

What stays FP32, measured on tiny transformers-written models (EoMT depth 2-3 with masked attention on and off,
plain and with confident heads; DINOv3 1-4 layers, 0-4 registers, gated MLP) against transformers FP32, on noise
and on structured scenes preprocessed as predict() does, ONNX Runtime 1.32 / OpenVINO 2026.4 on an AVX2 EPYC:
- INT8 (`VIT_INT8_FLOAT`): the patch embedding (quantizing the first conv cost DINOv3 patch tokens their worst
  cosine: 0.995 -> 1.000 when kept float, and a 3-10x larger max error on scenes), the attention core (RoPE, Q.K^T,
  softmax, attention.V: as for the detector's ViT, and OpenVINO then keeps its fused attention kernel) and EoMT's
  heads (class and mask MLPs, upscaling, the mask einsum and the attention masks built from intermediate masks:
  float heads raised mask-sign agreement from 0.965 to 0.990 (ONNX Q/DQ) and 0.93-0.97 to 0.96-0.98 (NNCF)).
  LayerNorms have no Q/DQ inputs either way.
- FP16 (`VIT_FP16_KEEP`, `VIT_FP16_KEEP_OPS`): LayerNorms, softmax and EoMT's heads. Every keep list tried (none,
  norms, attention, heads and their unions) gave the same agreement here (mask signs >= 0.9993, query classes
  >= 0.994, DINOv3 cosines 1.0000): ONNX Runtime 1.32 on this CPU keeps the linear layers' MatMuls in FP16 (its
  optimised graph of a ViT-T-sized DINOv3 has no Cast before 72 of its 84 MatMuls, and runs 1.7x faster than
  FP32) but casts many other ops back to FP32, and tiny random models have no large activations. The choice
  therefore follows where FP16 arithmetic is known to fail on a GPU: LayerNorm's sum of squares overflows FP16 on
  DINOv3's large-norm tokens, softmax's exponent, and the mask logits whose sign is the mask. It still needs a GPU
  measurement (TensorRT) on a real checkpoint, as the detector's FP16 list does.

Task-level agreement against transformers FP32 (`agreement`), enforced per precision (`THRESHOLDS`):
- EoMT: `mask_sign`, the fraction of mask logits with the same sign (a pixel in or out of the mask), and
  `query_class`, the fraction of queries whose argmax class (no-object included) is the same.
- DINOv3: `pooler_cosine`, the lowest cosine similarity of pooler_output over the images, and `patch_cosine`, the
  mean cosine similarity of the patch tokens (`patch_cosine_min` is reported, not limited).
Measured on the tiny models above plus 8 random configurations (hidden 8-64, 1-4 layers, 1-4 heads, patch 8/16,
0-4 registers, 2-8 classes, 4-19 queries, masked attention on/off, half with confident heads): FP16 mask signs
>= 0.9993, query classes >= 0.98, cosines >= 0.99999; INT8 (ONNX Q/DQ and NNCF, 8 calibration scenes) mask signs
0.958-0.996, query classes 0.83-1.0 (random class heads are near-uniform, so a few queries flip their argmax),
pooler cosines >= 0.990, patch cosines >= 0.9996. A broken graph sits near chance or below: mask signs ~0.5 (0 for
negated logits), query classes ~1/(classes + 1), cosines ~0 (or -1). The limits sit between, with room for real
checkpoints, whose masks and classes are far more decided than random weights': FP16 needs mask signs >= 0.99,
query classes >= 0.9, cosines >= 0.999; INT8 mask signs >= 0.9, query classes >= 0.6, cosines >= 0.95. They catch
a broken graph, not a merely poor calibration: the same tiny models calibrated on 4 black images still reached
mask signs 0.978-0.997 and cosines >= 0.999 (their activations' ranges come from the random weights more than from
the images), so judge INT8 on your own data. Raw max |difference| per output is reported beside them, never
enforced (FP16 moves logits by 1e-4..1e-2, INT8 by 1e-2..1).
"""
from __future__ import annotations

import collections
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.exporters.onnx_precision import Block, node_scopes
from deimv2_deploy.vit_spec import VitSpec

__all__ = ["VIT_BLOCKS", "VIT_FP16_KEEP", "VIT_FP16_KEEP_OPS", "VIT_INT8_FLOAT", "OPENVINO_INT8_FLOAT",
           "VIT_PRECISIONS", "THRESHOLDS", "prepare_onnx", "fold_block", "rewrite_onnx", "agreement",
           "reduced_parity", "describe_reduced"]

VIT_PRECISIONS = ("fp32", "fp16", "int8")  # of a DINOv3 / EoMT artifact (bf16: an OpenVINO load-time arithmetic)

# Scopes of transformers' graphs as traced by vit_export: "/model/layers.3/attention" (EoMT),
# "/model/model/layer.3/norm1" (DINOv3), "/model/mask_head/fc1_2", "/model/rope_embeddings".
VIT_BLOCKS: dict[str, Block] = {b.name: b for b in (
    Block("norms", r"^/model/(.*/)?(norm\d*|layernorm\w*)$",
          "LayerNorms: each layer's norm1/norm2, the final norm, EoMT's per-block query norms and LayerNorm2d"),
    Block("attention", r"^/model/(.*/)?layers?\.\d+/attention$",
          "each layer's attention core: RoPE applied to q/k, Q.K^T, softmax, attention.V (not the q/k/v/o "
          "projections)"),
    Block("rope", r"^/model/rope_embeddings(/|$)", "the RoPE sin/cos tables (from the patch grid only)"),
    Block("mlp", r"^/model/(.*/)?layers?\.\d+/mlp(/|$)", "each layer's MLP (up/gate/down projections, activation)"),
    Block("patch_embeddings", r"^/model/embeddings(/|$)", "the patch embedding conv, CLS / register tokens"),
    Block("heads", r"^/model(/(class_predictor|mask_head|upscale_block)(/.*)?)?$",
          "EoMT: class and mask heads, upscaling, and the top-level nodes (mask einsum, attention masks from "
          "intermediate masks, query concat); DINOv3: the pooler (a Gather of the CLS token)"),
)}
VIT_FP16_KEEP: tuple[str, ...] = ("norms", "heads")
VIT_FP16_KEEP_OPS: tuple[str, ...] = ("Softmax",)
VIT_INT8_FLOAT: tuple[str, ...] = ("patch_embeddings", "attention", "heads")
# the same choice for NNCF, by OpenVINO node names (ONNX node names survive conversion); attention is kept float by
# type (openvino_export.INT8_FLOAT_TYPES: the fused ScaledDotProductAttention)
OPENVINO_INT8_FLOAT: tuple[str, ...] = (r".*/model/embeddings/.*",
                                        r".*/model/(class_predictor|mask_head|upscale_block)/.*",
                                        r"/model/[^/]+$", r"(class|masks)_queries_logits")

# family -> precision -> metric -> lowest acceptable value (see the module docstring for the measurements). bf16
# (OpenVINO arithmetic on an FP32 IR, deimv2-bench's bf16/auto rows on CPUs that have it) could not be measured on
# this AVX2 CPU: it gets the INT8 limits (bf16 keeps 8 mantissa bits against FP16's 11)
THRESHOLDS: dict[str, dict[str, dict[str, float]]] = {
    "eomt": {"fp16": {"mask_sign": 0.99, "query_class": 0.9}, "int8": {"mask_sign": 0.9, "query_class": 0.6},
             "bf16": {"mask_sign": 0.9, "query_class": 0.6}},
    "dinov3": {"fp16": {"pooler_cosine": 0.999, "patch_cosine": 0.999},
               "int8": {"pooler_cosine": 0.95, "patch_cosine": 0.95},
               "bf16": {"pooler_cosine": 0.95, "patch_cosine": 0.95}},
}


# --- preparing the graph -------------------------------------------------------------------------------------
def _inputs_of(node: Any) -> list[str]:
    """The tensors a node reads, its subgraphs' included (an If branch may read outer tensors)."""
    names = list(node.input)
    for attr in node.attribute:
        for graph in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
            for inner in graph.node:
                names += _inputs_of(inner)
    return names


def fold_block(model: Any, block: str, input_shape: Sequence[int], batches: Sequence[int] = (1, 2)) -> list[str]:
    """Store as constants the tensors that block `block` hands to the rest of `model`, which must depend on nothing
    but the fixed image size (ValueError otherwise: they are computed for `batches` on different random inputs and
    must agree); nodes left unused are removed. Returns the folded tensors' names."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    scopes = node_scopes(model.graph)
    regex = re.compile(VIT_BLOCKS[block].pattern)
    inside = {n.name for n in model.graph.node if n.name in scopes and regex.search(scopes[n.name])}
    produced = {o for n in model.graph.node if n.name in inside for o in n.output if o}
    readers: dict[str, list[str]] = collections.defaultdict(list)
    for node in model.graph.node:
        for name in _inputs_of(node):
            readers[name].append(node.name)
    outputs = {v.name for v in model.graph.output}
    boundary = sorted(t for t in produced if t in outputs or any(r not in inside for r in readers[t]))
    if not boundary:
        return []
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in boundary:
        probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(boundary, {"pixel_values": np.random.default_rng(seed).normal(
        size=(batch, *input_shape)).astype(np.float32)}) for seed, batch in enumerate(batches)]
    for i, name in enumerate(boundary):
        if any(run[i].shape != runs[0][i].shape or not np.array_equal(run[i], runs[0][i]) for run in runs[1:]):
            raise ValueError(f"{name} of block {block!r} depends on the input, not only on its size: cannot fold it")
    for name, value in zip(boundary, runs[0], strict=True):
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    _prune(model)
    return boundary


def _prune(model: Any) -> None:
    """Remove nodes whose outputs nothing reads (or that now are constants), repeatedly, then unused initializers."""
    while True:
        constants = {t.name for t in model.graph.initializer}
        used = {v.name for v in model.graph.output}
        for node in model.graph.node:
            used.update(_inputs_of(node))
        dead = [n for n in model.graph.node if all(o in constants or o not in used for o in n.output if o)]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)
    for tensor in [t for t in model.graph.initializer if t.name not in used]:
        model.graph.initializer.remove(tensor)


def prepare_onnx(src: Path, dst: Path, spec: VitSpec) -> dict[str, Any]:
    """The traced FP32 graph with its RoPE tables folded to constants (module docstring), written to `dst`."""
    import onnx

    model = onnx.load(str(src))
    batches = (spec.batch, spec.batch) if spec.batch else (1, 2)
    folded = fold_block(model, "rope", (3, *spec.input_size), batches)
    onnx.save(model, str(dst))
    return {"folded_to_constants": folded}


def rewrite_onnx(src: Path, dst: Path, precision: str, spec: VitSpec, calibration: Any = None,
                 method: str = "minmax") -> dict[str, Any]:
    """FP16 or INT8 Q/DQ version of the traced FP32 graph `src` at `dst` (prepared first), with this module's
    blocks; returns the build notes (INT8: `qdq_summary` checked, QdqError if any zero point is not 0)."""
    from deimv2_deploy.exporters import onnx_precision

    prepared = dst.with_name(dst.stem + "_prepared.onnx")
    notes = {"prepared": prepare_onnx(src, prepared, spec)}
    try:
        if precision == "fp16":
            notes.update(onnx_precision.convert_fp16(prepared, dst, VIT_FP16_KEEP, VIT_BLOCKS, VIT_FP16_KEEP_OPS))
        elif precision == "int8":
            notes.update(onnx_precision.quantize_int8(prepared, dst, calibration, VIT_INT8_FLOAT, method, VIT_BLOCKS))
            notes["calibration"] = calibration.describe()
        else:
            raise ValueError(f"rewrite_onnx makes fp16 or int8, not {precision!r}")
    finally:
        prepared.unlink(missing_ok=True)
    return notes


# --- agreement -----------------------------------------------------------------------------------------------
def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(norms > 0, (a * b).sum(-1) / np.maximum(norms, 1e-300), 1.0)


def agreement(spec: VitSpec, got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The task-level agreement metrics of outputs `got` against the reference `want` (module docstring)."""
    if spec.family == "eomt":
        masks, ref_masks = got["masks_queries_logits"], want["masks_queries_logits"]
        classes, ref_classes = got["class_queries_logits"], want["class_queries_logits"]
        return {"mask_sign": float(np.mean((masks > 0) == (ref_masks > 0))),
                "query_class": float(np.mean(classes.argmax(-1) == ref_classes.argmax(-1)))}
    first = 1 + spec.num_register_tokens  # CLS and registers come before the patch tokens
    patches = _cosine(got["last_hidden_state"][:, first:], want["last_hidden_state"][:, first:])
    return {"pooler_cosine": float(_cosine(got["pooler_output"], want["pooler_output"]).min()),
            "patch_cosine": float(patches.mean()), "patch_cosine_min": float(patches.min())}


def reduced_parity(spec: VitSpec, precision: str, got: Mapping[str, np.ndarray],
                   want: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """The parity report of a `precision` graph's outputs `got` against the FP32 reference `want`: raw differences
    per output (reported) and the task-level agreement with its limits (`ok` when every metric passes)."""
    outputs: dict[str, Any] = {}
    for name, ref in want.items():
        out = got[name]
        if out.shape != ref.shape:
            outputs[name] = {"shape": list(out.shape), "expected_shape": list(ref.shape)}
            continue
        diff = np.abs(out.astype(np.float64) - ref)
        outputs[name] = {"max_abs_diff": float(diff.max()) if diff.size else 0.0,
                         "mean_abs_diff": float(diff.mean()) if diff.size else 0.0,
                         "max_abs_ref": float(np.max(np.abs(ref))) if ref.size else 0.0}
    limits = THRESHOLDS[spec.family][precision]
    if any("shape" in o for o in outputs.values()):
        return {"precision": precision, "ok": False, "outputs": outputs, "agreement": {}, "limits": limits,
                "max_abs_diff": float("inf")}
    values = agreement(spec, got, want)
    checked = {k: {"value": v, "min": limits.get(k), "ok": k not in limits or v >= limits[k]}
               for k, v in values.items()}
    return {"precision": precision, "ok": all(c["ok"] for c in checked.values()), "agreement": checked,
            "limits": limits, "outputs": outputs,
            "max_abs_diff": max(o["max_abs_diff"] for o in outputs.values()),
            "enforced": "task-level agreement (limits); the raw differences are reported"}


def describe_reduced(report: Mapping[str, Any]) -> str:
    """One line: ok/FAILED, each agreement metric against its limit, the max |diff| per output."""
    parts = [f"{k} {c['value']:.4f}" + (f" (min {c['min']})" if c["min"] is not None else "")
             for k, c in report.get("agreement", {}).items()]
    parts += [f"{n} max |diff| {o['max_abs_diff']:.2e}" if "max_abs_diff" in o
              else f"{n} shape {o['shape']} != {o['expected_shape']}" for n, o in report["outputs"].items()]
    return f"{'ok' if report['ok'] else 'FAILED'}: " + ", ".join(parts)
