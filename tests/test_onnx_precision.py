"""FP16 and INT8 (explicit Q/DQ) ONNX artifacts: what TensorRT's strongly typed builds take, checked on ONNX Runtime.

Covered: the FP16 keep-list (those blocks compute in FP32, the rest in FP16, I/O types unchanged), the Q/DQ structure
(every quantized weight and activation symmetric INT8 with zero point 0, nothing quantized inside the float
blocks), both artifacts running through `load_runtime` with their metadata and drift report, and bad input (no
calibration data, a folder without images, options that do not belong together), which fails before any model is
loaded. atto with random weights and two calibration images keep it short.
"""
from __future__ import annotations

import cv2
import numpy as np
import onnx
import pytest

from deimv2_deploy.exporters.onnx_export import export_onnx, run_onnx
from deimv2_deploy.exporters.onnx_precision import (
    FP16_KEEP,
    INT8_FLOAT,
    QdqError,
    convert_fp16,
    qdq_summary,
    quantize_int8,
    select_blocks,
)
from deimv2_deploy.exporters.parity import drift_summary, match_detections, parity_batch, tolerances
from deimv2_deploy.runtimes import load_runtime

FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16


def _types(model) -> dict[str, int]:
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input, *graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _io(model) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.output)}


@pytest.fixture(scope="module")
def images(tmp_path_factory, example_image_path):
    """Two calibration images: the example photo and a synthetic scene."""
    from deimv2_deploy.exporters.parity import parity_images

    folder = tmp_path_factory.mktemp("calibration")
    cv2.imwrite(str(folder / "a_photo.jpg"), cv2.imread(str(example_image_path)))
    cv2.imwrite(str(folder / "b_scene.png"), parity_images(1, seed=3)[0])
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def fp16_model(atto_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("fp16") / "atto_fp16.onnx"
    notes = convert_fp16(atto_onnx.path, path)
    return path, notes


@pytest.fixture(scope="module")
def int8_model(atto_onnx, images, tmp_path_factory):
    from deimv2_deploy.data.calibration import select_calibration_images
    from deimv2_deploy.exporters.calibration import CalibrationSet

    path = tmp_path_factory.mktemp("int8") / "atto_int8.onnx"
    calib = CalibrationSet(select_calibration_images(images, 2), atto_onnx.spec)
    notes = quantize_int8(atto_onnx.path, path, calib)
    return path, notes


# --- FP16 -------------------------------------------------------------------------------------------------
def test_fp16_keeps_io_and_the_keep_list_in_fp32(atto_onnx, fp16_model):
    path, notes = fp16_model
    model = onnx.load(str(path))
    assert _io(model) == _io(onnx.load(str(atto_onnx.path)))  # float32 images, int64 sizes in; float32 out
    types = _types(model)
    kept = select_blocks(model.graph, FP16_KEEP)
    assert all(kept.values()), {k: len(v) for k, v in kept.items()}  # every block of the list is found
    kept_names = {n for names in kept.values() for n in names}
    fp16_nodes = 0
    for node in model.graph.node:
        if node.op_type == "Cast":
            continue
        floats = [types[t] for t in node.output if types.get(t) in (FLOAT, FLOAT16)]
        if node.name in kept_names:
            assert FLOAT16 not in floats, f"{node.name} of the keep-list computes in FP16"
        elif floats and floats[0] == FLOAT16:
            fp16_nodes += 1
    assert fp16_nodes > 0.5 * len(model.graph.node) / 2  # the backbone and encoder really are FP16
    assert notes["fp32_blocks"] == list(FP16_KEEP) and notes["fp16_nodes"] > notes["fp32_nodes_total"]


def test_fp16_runs_in_load_runtime_close_to_fp32(atto_onnx, fp16_model):
    path, _ = fp16_model
    batch = parity_batch(atto_onnx.spec, 2)
    reference = run_onnx(atto_onnx.path)(batch.as_inputs())
    with load_runtime(path, variant="atto") as runtime:
        ours = runtime.infer(batch.as_inputs())
    assert ours["boxes"].dtype == np.float32 and ours["labels"].dtype == np.int64
    report = match_detections(ours, reference, **tolerances("fp16"))
    assert report["ok"], report
    assert drift_summary(ours, reference)["mean_iou"] > 0.9


def test_unknown_block_is_named(atto_onnx, tmp_path):
    with pytest.raises(ValueError, match="unknown graph block 'decoderr'"):
        convert_fp16(atto_onnx.path, tmp_path / "x.onnx", keep=("decoderr",))


# --- INT8 Q/DQ --------------------------------------------------------------------------------------------
def test_every_qdq_is_symmetric_int8_and_float_blocks_stay_float(int8_model):
    path, notes = int8_model
    model = onnx.load(str(path))
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) > 50
    for node in qdq:
        zero = constants[node.input[2]]
        assert zero.dtype == np.int8 and not zero.any(), node.name  # symmetric: INT8, zero point 0
        assert np.all(constants[node.input[1]] > 0), node.name  # constant positive scales
    weights = [n for n in qdq if n.op_type == "DequantizeLinear" and n.input[0] in constants]
    assert weights and all(constants[n.input[1]].size > 1 for n in weights if "Conv" in n.output[0])  # per channel
    dq_out = {o for n in qdq if n.op_type == "DequantizeLinear" for o in n.output}
    floats = {n for names in select_blocks(model.graph, INT8_FLOAT).values() for n in names}
    quantized = [n for n in model.graph.node if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[0] in dq_out]
    assert quantized and not [n.name for n in quantized if n.name in floats]
    assert notes["qdq"]["zero_points"] == "all 0" and notes["qdq"]["quantized_inputs"]["Conv"] == len(
        [n for n in quantized if n.op_type == "Conv"])


def test_int8_runs_in_load_runtime_and_drifts_within_its_tolerance(atto_onnx, int8_model):
    path, _ = int8_model
    batch = parity_batch(atto_onnx.spec, 2)
    reference = run_onnx(atto_onnx.path)(batch.as_inputs())
    with load_runtime(path, variant="atto") as runtime:
        ours = runtime.infer(batch.as_inputs())
    assert ours["scores"].dtype == np.float32 and ours["scores"].shape == reference["scores"].shape
    report = match_detections(ours, reference, box_tol=32.0, score_tol=0.2, min_matched=0.3)
    assert report["ok"], report  # random weights: drift is large, but the graph computes the same model


def test_qdq_summary_refuses_asymmetric_or_uint8(int8_model):
    model = onnx.load(str(int8_model[0]))
    assert qdq_summary(model)["type"] == "int8"
    zero = next(n for n in model.graph.node if n.op_type == "QuantizeLinear").input[2]
    tensor = next(t for t in model.graph.initializer if t.name == zero)
    tensor.CopyFrom(onnx.numpy_helper.from_array(np.uint8(128), zero))
    with pytest.raises(QdqError, match="uint8"):
        qdq_summary(model)
    tensor.CopyFrom(onnx.numpy_helper.from_array(np.int8(3), zero))
    with pytest.raises(QdqError, match="non-zero zero point"):
        qdq_summary(model)


# --- the export itself --------------------------------------------------------------------------------------
def test_export_onnx_fp16_carries_metadata_and_drift(tmp_path):
    result = export_onnx("atto", random_weights=True, output_dir=tmp_path, precision="fp16", quiet=True)
    assert result.path.name == "deimv2_atto_random_fp16.onnx"
    with load_runtime(result.path) as runtime:  # the spec comes from the file's metadata
        assert runtime.spec.precision == "fp16"
        assert runtime.spec.build["precision"]["fp32_blocks"] == list(FP16_KEEP)
        vs = runtime.spec.parity["vs_fp32_onnx"]
        assert vs["ok"] and 0.9 < vs["summary"]["mean_iou"] <= 1.0
        assert "onnxconverter_common" in runtime.spec.versions


@pytest.mark.slow
def test_export_onnx_int8_end_to_end(tmp_path, images):
    result = export_onnx("atto", random_weights=True, output_dir=tmp_path, precision="int8", calibration=images,
                         calibration_size=2, quiet=True)
    assert result.path.name == "deimv2_atto_random_int8.onnx"
    with load_runtime(result.path) as runtime:
        spec = runtime.spec
    assert spec.precision == "int8" and spec.build["precision"]["calibration"]["images"] == 2
    assert spec.parity["vs_fp32_onnx_calibration_images"]["images"] == "2 calibration images"
    assert qdq_summary(onnx.load(str(result.path)))["zero_points"] == "all 0"


def test_bad_input_fails_before_loading_the_model(tmp_path, monkeypatch):
    import deimv2_deploy.exporters.onnx_export as module

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(module, "deploy_graph", no_model)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    common = dict(random_weights=True, output_dir=tmp_path, quiet=True)
    with pytest.raises(ValueError, match="INT8 needs calibration data"):
        export_onnx("atto", precision="int8", **common)
    with pytest.raises(FileNotFoundError, match="no images"):
        export_onnx("atto", precision="int8", calibration=empty, **common)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx("atto", precision="int8", calibration=tmp_path / "missing", **common)
    with pytest.raises(ValueError, match="--calibration is for --precision int8"):
        export_onnx("atto", precision="fp16", calibration=empty, **common)
    with pytest.raises(ValueError, match="contradicts"):
        export_onnx("atto", precision="int8", fp16=True, **common)
    with pytest.raises(ValueError, match="one of fp32, fp16, int8"):
        export_onnx("atto", precision="bf16", **common)
    assert list(tmp_path.glob("*.onnx")) == []


def test_cli_refuses_int8_without_calibration(tmp_path, capsys):
    from deimv2_deploy.cli.export import main

    assert main(["atto", "--random-weights", "--precision", "int8", "--output-dir", str(tmp_path)]) != 0
    assert "INT8 needs calibration data" in capsys.readouterr().err
