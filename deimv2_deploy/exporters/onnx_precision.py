"""FP16 and INT8 (Q/DQ) versions of our FP32 ONNX graph: the precision lives in the ONNX file itself.

TensorRT 11 builds only strongly typed networks: the precision of every tensor is what the ONNX says (FP16
tensors, explicit QuantizeLinear/DequantizeLinear pairs), never a builder switch. These files are artifacts in their
own right: ONNX Runtime runs them on the CPU, and the TensorRT exporter builds an engine of the same precision.

- FP16: onnxconverter-common's `convert_float_to_float16` (I/O stays float32 images / int64 sizes in, float32
  boxes / scores out), with the blocks of `FP16_KEEP` kept in FP32 (Casts at their borders). The postprocessor
  must stay FP32 (converted, its Casts no longer type-check). The decoder's query selection, box refinement and
  LQE are kept FP32 too, as the official issues report FP16 trouble there: ONNX Runtime's x86 CPU kernels cannot
  tell (they run most FP16 nodes by casting back to FP32, so on atto the whole list and the postprocessor alone
  drift the same, top-20 mean IoU 0.989 / 0.990 on the example photo); measuring it needs a GPU (TensorRT).
- INT8: ONNX Runtime's static quantizer (`onnxruntime.quantization.quantize_static`) in QDQ format, signed INT8
  with zero point 0 for weights (per output channel) and activations (per tensor), as TensorRT requires, on
  Conv / MatMul / Gemm inputs, calibrated on the user's images; the blocks of `INT8_FLOAT` stay float. Biases stay
  float. `qdq_summary` checks the result (every zero point 0, every quantized type INT8) and refuses anything else.

Blocks are named by the PyTorch module path the ONNX exporter writes into node names ("/model/decoder/decoder/
layers.0/cross_attn/..."); nodes onnxsim created without one (fused Gemm, reshapes) inherit the module of the
node they feed (`node_scopes`). `BLOCKS` are the detector's; another graph passes its own table (`blocks=`, e.g.
`exporters.vit_precision.VIT_BLOCKS` for DINOv3 / EoMT) to `select_blocks`, `convert_fp16` and `quantize_int8`.
"""
from __future__ import annotations

import collections
import logging
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PRECISIONS", "Block", "BLOCKS", "FP16_KEEP", "INT8_FLOAT", "INT8_OP_TYPES", "CALIBRATION_METHODS",
           "node_scopes", "select_blocks", "convert_fp16", "quantize_int8", "qdq_summary", "QdqError", "fp16_summary"]


PRECISIONS = ("fp32", "fp16", "int8")  # of an ONNX artifact (bf16: see the README, TensorRT-only)


@dataclass(frozen=True)
class Block:
    """A part of the DEIMv2 deploy graph, by the module path of its nodes (`re.search` on the node's scope)."""

    name: str
    pattern: str
    what: str


# The blocks a keep-list can name. Scopes look like
# "/model/backbone/dinov3/blocks.3/attn", "/model/decoder/decoder/layers.0/cross_attn", "/postprocessor".
BLOCKS: dict[str, Block] = {b.name: b for b in (
    Block("postprocessor", r"^/postprocessor(/|$)",
          "sigmoid, top-k over classes x queries, boxes scaled to pixels of the original image"),
    Block("query_selection", r"^/model/decoder(/enc_[^/]+(/.*)?)?$",
          "the encoder-output scoring and top-k that picks the decoder's queries"),
    Block("box_refinement", r"^/model/decoder/decoder(/(pre_bbox_head|dec_bbox_head[.\d]*|dec_score_head[.\d]*|"
                            r"query_pos_head)(/.*)?)?$",
          "decoder heads, distribution integral (softmax over bins), inverse sigmoid and box refinement"),
    Block("decoder_cross_attention", r"^/model/decoder/decoder/layers\.\d+/cross_attn(/|$)",
          "deformable cross-attention: sampling offsets, attention weights, grid_sample"),
    Block("decoder_self_attention", r"^/model/decoder/decoder/layers\.\d+/self_attn(/|$)",
          "the decoder's query self-attention"),
    Block("decoder_ffn_norms", r"^/model/decoder/decoder/layers\.\d+(/(swish_ffn|gateway|norm\d*)(/.*)?)?$",
          "the decoder layers' FFN, gateway, RMS norms and residual adds"),
    Block("lqe", r"^/model/decoder/decoder/lqe_layers", "location quality estimator (score from the box distribution)"),
    Block("vit_attention", r"^/model/backbone/.*blocks\.\d+/attn$",
          "ViT attention core (s..x): RoPE, Q.K^T, softmax, attention.V (not the qkv/proj linear layers)"),
    Block("vit_norms", r"^/model/backbone/.*blocks\.\d+/norm\d", "ViT LayerNorms (s..x)"),
    Block("encoder_attention", r"^/model/encoder/encoder\.\d+/layers\.\d+/self_attn(/|$)",
          "the hybrid encoder's transformer attention (n..x)"),
    Block("backbone", r"^/model/backbone(/|$)", "the whole backbone"),
    Block("encoder", r"^/model/encoder(/|$)", "the whole encoder"),
)}

# Kept FP32 in FP16 artifacts (see the module docstring for what was measured and what could not be).
FP16_KEEP: tuple[str, ...] = ("postprocessor", "query_selection", "box_refinement", "lqe")
# Kept float in INT8 artifacts: the postprocessor and the decoder (query selection, deformable attention with its
# sampling offsets, box distributions: where 8-bit rounding moves boxes), and the ViT attention core.
INT8_FLOAT: tuple[str, ...] = ("postprocessor", "query_selection", "box_refinement", "decoder_cross_attention",
                               "decoder_self_attention", "decoder_ffn_norms", "lqe", "vit_attention")
INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")  # whose inputs get Q/DQ pairs (where TensorRT runs INT8 kernels)
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
_FLOAT_TYPES = (1, 10)  # onnx.TensorProto.FLOAT, FLOAT16


class QdqError(ValueError):
    """A quantized graph that is not what TensorRT takes: a zero point that is not 0, or a type other than INT8."""


# --- where each node belongs --------------------------------------------------------------------------------
def _own_scope(node: Any) -> str | None:
    if node.name.startswith("/"):
        return node.name.rsplit("/", 1)[0] or "/"
    for out in node.output:
        if out.startswith("/"):
            return out.rsplit("/", 1)[0] or "/"
    return None


def node_scopes(graph: Any) -> dict[str, str]:
    """Node name -> the module path it was exported from. Nodes without one (named by onnxsim) take the scope of a
    node they feed, else of one that feeds them; the rest (graph-level constants) are left out."""
    consumers: dict[str, list[Any]] = collections.defaultdict(list)
    producer: dict[str, Any] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
        for name in node.output:
            producer[name] = node
    scopes = {node.name: s for node in graph.node if (s := _own_scope(node)) is not None}
    changed = True
    while changed:
        changed = False
        for node in graph.node:
            if node.name in scopes:
                continue
            around = [c for out in node.output for c in consumers[out]] + [producer[i] for i in node.input
                                                                              if i in producer]
            found = next((scopes[n.name] for n in around if n.name in scopes), None)
            if found is not None:
                scopes[node.name] = found
                changed = True
    return scopes


def select_blocks(graph: Any, names: Iterable[str], blocks: Mapping[str, Block] = BLOCKS) -> dict[str, list[str]]:
    """Block name -> the names of its nodes, blocks looked up in `blocks` (the detector's by default). ValueError
    for an unknown block name."""
    names = list(names)
    unknown = [b for b in names if b not in blocks]
    if unknown:
        raise ValueError(f"unknown graph block {unknown[0]!r}: choose from {', '.join(blocks)}")
    scopes = node_scopes(graph)
    out: dict[str, list[str]] = {}
    for name in names:
        regex = re.compile(blocks[name].pattern)
        out[name] = [node.name for node in graph.node if node.name in scopes and regex.search(scopes[node.name])]
    return out


def _named(model: Any) -> Any:
    """Give every unnamed node a unique name (block lists and Q/DQ exclusions work by node name)."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    return model


def _drop_no_ops(model: Any) -> tuple[int, set[str]]:
    """Remove what the FP16 converter mishandles and FP32 does not need (both come from the TorchScript exporter on
    transformers' DINOv3 / EoMT graphs): Casts to FLOAT of tensors that already are FLOAT (`.to(dtype)`), on which
    onnxconverter-common 1.16 fails when the output feeds several nodes ("'list' object has no attribute 'input'"),
    and Identity nodes passing a shared weight on, whose output it re-types to FP16 while keeping the node FP32
    when a kept block owns it. Consumers, also inside subgraphs, read the original tensor instead; graph outputs
    stay. Returns how many nodes were removed and the weights now read directly instead of through an Identity.
    (The detector's graph, simplified by onnxsim, has neither: it is left as it is.)"""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input,
                                                            *inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    outputs = {v.name for v in model.graph.output}
    initializers = {t.name for t in model.graph.initializer}
    rename: dict[str, str] = {}
    kept = []
    for node in model.graph.node:
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        source = node.input[0] if node.input else ""
        source = rename.get(source, source)
        if node.output and node.output[0] not in outputs and (
                node.op_type == "Cast" and to == onnx.TensorProto.FLOAT and types.get(source) == onnx.TensorProto.FLOAT
                or node.op_type == "Identity" and source in initializers):
            rename[node.output[0]] = source
            continue
        kept.append(node)
    if not rename:
        return 0, set()

    def rewire(nodes: Iterable[Any]) -> None:
        for node in nodes:
            node.input[:] = [rename.get(i, i) for i in node.input]
            for attr in node.attribute:
                for graph in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                    rewire(graph.node)

    rewire(kept)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return len(rename), {source for source in rename.values() if source in initializers}


def _split_shared_weights(model: Any, kept: set[str], names: set[str]) -> int:
    """Give the kept (FP32) nodes their own copy of each initializer of `names` they share with converted nodes:
    the converter mistypes such a weight once its Identity is gone (the TorchScript exporter shares identical
    tensors through Identity nodes, e.g. all the zero biases of a randomly initialised model). Returns the copies
    made."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer if t.name in names}
    readers: dict[str, set[bool]] = collections.defaultdict(set)
    for node in model.graph.node:
        for name in node.input:
            if name in initializers:
                readers[name].add(node.name in kept)
    shared = [name for name, sides in readers.items() if sides == {True, False}]
    for name in shared:
        copy = f"{name}_fp32_copy"
        model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(initializers[name]), copy))
        for node in model.graph.node:
            if node.name in kept:
                node.input[:] = [copy if i == name else i for i in node.input]
    return len(shared)


def _detach_outputs(model: Any) -> None:
    """A graph output also read inside the graph (DINOv3's pooler_output is a Gather of last_hidden_state) gets an
    internal name for the readers and an Identity to the output: the converter's Cast before a kept-FP32 output
    otherwise leaves the readers typed FP16 on FP32 data."""
    import onnx

    outputs = {v.name for v in model.graph.output}
    read = {name for node in model.graph.node for name in node.input} & outputs
    for name in sorted(read):
        inner = f"{name}_inner"
        for node in model.graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        model.graph.node.append(onnx.helper.make_node("Identity", [inner], [name], name=f"{name}_output"))


# --- FP16 ---------------------------------------------------------------------------------------------------
def convert_fp16(src: str | Path, dst: str | Path, keep: Sequence[str] = FP16_KEEP,
                 blocks: Mapping[str, Block] = BLOCKS, keep_ops: Sequence[str] = ()) -> dict[str, Any]:
    """Write an FP16 version of the FP32 ONNX `src` to `dst`, with the blocks `keep` (names in `blocks`) and every
    node of the op types `keep_ops` in FP32; returns its build notes (tool, kept blocks and node counts). I/O types
    stay as they are."""
    import onnx

    try:
        from onnxconverter_common import __version__ as converter_version
        from onnxconverter_common import float16
    except ImportError as e:
        raise ImportError("FP16 ONNX export needs onnxconverter-common: pip install 'deimv2-deploy[export]' "
                          "(or pip install onnxconverter-common)") from e
    model = _named(onnx.load(str(src)))
    dropped, unwrapped = _drop_no_ops(model)
    _detach_outputs(model)
    chosen = select_blocks(model.graph, keep, blocks)
    # the remaining Casts to FLOAT (from int/bool: masks, positions) stay FP32: the converter re-types their
    # outputs to FP16 but leaves `to=FLOAT`, which ONNX Runtime rejects; kept, they get a Cast to FP16 after them
    to_float = [n.name for n in model.graph.node if n.op_type == "Cast"
                and any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]
    kept = sorted({n for names in chosen.values() for n in names} | set(to_float))
    copies = _split_shared_weights(model, set(kept), unwrapped)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the float32 number ... will be truncated": weights below FP16's range
        converted = float16.convert_float_to_float16(
            model, keep_io_types=True, node_block_list=kept,
            op_block_list=[*float16.DEFAULT_OP_BLOCK_LIST, *keep_ops])  # ops without FP16 support (Resize...)
    _float32_outputs(converted, {v.name for v in model.graph.output if v.type.tensor_type.elem_type == 1})
    onnx.save(converted, str(dst))
    return {"tool": f"onnxconverter-common {converter_version} convert_float_to_float16",
            "fp32_blocks": list(keep), "fp32_nodes": {k: len(v) for k, v in chosen.items()},
            **({"fp32_ops": list(keep_ops)} if keep_ops else {}),
            **({"no_op_nodes_removed": dropped} if dropped else {}),
            **({"fp32_weight_copies": copies} if copies else {}), **fp16_summary(converted)}


def _float32_outputs(model: Any, names: set[str]) -> None:
    """The converter declares float outputs FP16 even with keep_io_types when they come from a kept block: give each
    such output a final Cast to FP32 (a no-op on FP32 data) so the contract (float32 boxes/scores) holds."""
    import onnx

    for value in model.graph.output:
        if value.name not in names or value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            continue
        inner = f"{value.name}_before_fp32_cast"
        for node in model.graph.node:
            node.output[:] = [inner if o == value.name else o for o in node.output]
            node.input[:] = [inner if i == value.name else i for i in node.input]
        model.graph.node.append(onnx.helper.make_node("Cast", [inner], [value.name], to=onnx.TensorProto.FLOAT,
                                                      name=f"{value.name}_fp32_cast"))
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT


def fp16_summary(model: Any) -> dict[str, Any]:
    """How much of a graph computes in FP16: nodes whose first float input or output is FP16, and FP32 ones."""
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input,
                                                            *model.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    fp16 = fp32 = 0
    for node in model.graph.node:
        if node.op_type == "Cast":
            continue
        kinds = [types.get(name) for name in (*node.output, *node.input) if types.get(name) in _FLOAT_TYPES]
        if not kinds:
            continue
        if kinds[0] == 10:
            fp16 += 1
        else:
            fp32 += 1
    return {"fp16_nodes": fp16, "fp32_nodes_total": fp32,
            "casts": sum(1 for n in model.graph.node if n.op_type == "Cast")}


# --- INT8 ---------------------------------------------------------------------------------------------------
def quantize_int8(src: str | Path, dst: str | Path, calibration: Iterable[Mapping[str, np.ndarray]],
                  float_blocks: Sequence[str] = INT8_FLOAT, method: str = "minmax",
                  blocks: Mapping[str, Block] = BLOCKS) -> dict[str, Any]:
    """Write an INT8 Q/DQ version of the FP32 ONNX `src` to `dst`, calibrated on `calibration` (graph inputs, one
    image each, re-iterable); `float_blocks` (names in `blocks`) stay float. Returns the build notes, with
    `qdq_summary` of the result (QdqError when anything in it is not symmetric INT8)."""
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    model = _named(onnx.load(str(src)))
    chosen = select_blocks(model.graph, float_blocks, blocks)
    excluded = sorted({n for names in chosen.values() for n in names})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs "Please consider pre-processing" on the root logger: noise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                model, str(dst), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(INT8_OP_TYPES),
                per_channel=True, reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=excluded, calibrate_method=methods[method],
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False})
    finally:
        root.setLevel(level)
    summary = qdq_summary(onnx.load(str(dst)))
    if not summary["quantized_inputs"]:
        raise QdqError(f"the quantizer left {src} without a single quantized Conv/MatMul/Gemm input; nothing would "
                       "run in INT8")
    return {"tool": f"onnxruntime {onnxruntime.__version__} quantize_static (QDQ)", "method": method,
            "weights": "int8 symmetric, per output channel", "activations": "int8 symmetric, per tensor",
            "op_types": list(INT8_OP_TYPES), "float_blocks": list(float_blocks),
            "float_nodes": {k: len(v) for k, v in chosen.items()}, "qdq": summary}


def qdq_summary(model: Any) -> dict[str, Any]:
    """Counts of the Q/DQ structure, checked: every QuantizeLinear/DequantizeLinear has an INT8 zero point equal to
    0 (or none, which means 0 of type INT8). QdqError otherwise."""
    from onnx import numpy_helper

    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute:
            constants[node.output[0]] = node.attribute[0].t
    quantized_weights = activations = 0
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) > 2 and node.input[2]:
            if node.input[2] not in constants:
                raise QdqError(f"{node.op_type} {node.name!r} has a zero point computed at run time; TensorRT needs "
                               "constant zero points of 0")
            zero = numpy_helper.to_array(constants[node.input[2]])
            if zero.dtype != np.int8:
                raise QdqError(f"{node.op_type} {node.name!r} quantizes to {zero.dtype}, not int8: TensorRT takes "
                               "signed INT8 with zero point 0 only")
            if np.any(zero != 0):
                raise QdqError(f"{node.op_type} {node.name!r} has a non-zero zero point ({zero.ravel()[:4]}): not "
                               "symmetric")
        if node.op_type == "DequantizeLinear":
            if node.input[0] in constants:
                quantized_weights += 1
            else:
                activations += 1
    quantized_inputs = collections.Counter()
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in model.graph.node:
        if node.op_type in INT8_OP_TYPES and node.input and node.input[0] in dq_outputs:
            quantized_inputs[node.op_type] += 1
    return {"quantized_weights": quantized_weights, "quantized_activations": activations,
            "quantized_inputs": dict(quantized_inputs), "zero_points": "all 0", "type": "int8"}
