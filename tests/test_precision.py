"""The precision policy (deimv2_deploy.precision) and what every runtime reports it runs.

The choice is unit-tested on fake capability sets of the three CPU classes (AVX2 only, AVX-512 VNNI, AMX); the
OpenVINO runtime is then run with the AMX capabilities forced, so the bf16 branch is exercised on any CPU, and its
report is held to what the compiled model says, never to an assumption about the CPU.
"""
from __future__ import annotations

import json

import pytest

from deimv2_deploy.cli.export import auto_export_precision
from deimv2_deploy.precision import (
    PRECISION_REQUESTS,
    bf16_capable,
    choose_precision,
    executed_label,
)

# what OpenVINO's CPU plugin lists (OPTIMIZATION_CAPABILITIES) and cpu_info()["isa"] says, per CPU class
_NO = {"AVX2": True, "AVX-512F": False, "AVX-512 VNNI": False, "AVX-VNNI": False, "AVX-512 BF16": False,
       "AMX-BF16": False, "AMX-INT8": False}
AVX2 = (("FP32", "INT8", "BIN", "EXPORT_IMPORT"), _NO)
VNNI = (("FP32", "INT8", "BIN", "EXPORT_IMPORT"), {**_NO, "AVX-512F": True, "AVX-512 VNNI": True})
AMX = (("FP32", "BF16", "INT8", "BIN", "EXPORT_IMPORT"),
       {**_NO, "AVX-512F": True, "AVX-512 VNNI": True, "AVX-512 BF16": True, "AMX-BF16": True, "AMX-INT8": True})


@pytest.mark.parametrize(("cpu", "weights", "precision", "hint"), [
    (AVX2, "fp32", "fp32", "f32"),
    (VNNI, "fp32", "fp32", "f32"),
    (AMX, "fp32", "bf16", "bf16"),
    (AMX, "fp16", "bf16", "bf16"),
    (AVX2, "fp16", "fp32", "f32"),
    (AVX2, "int8", "int8+fp32", "f32"),
    (VNNI, "int8", "int8+fp32", "f32"),
    (AMX, "int8", "int8+bf16", "bf16"),
])
def test_auto_chooses_per_cpu_class(cpu, weights, precision, hint):
    choice = choose_precision("auto", weights, *cpu)
    assert (choice.precision, choice.inference_precision, choice.requested) == (precision, hint, "auto")
    assert choice.reason


@pytest.mark.parametrize("cpu", [AVX2, VNNI, AMX])
def test_fp32_is_exact_fp32_on_every_cpu(cpu):
    choice = choose_precision("fp32", "fp32", *cpu)
    assert choice.inference_precision == "f32" and choice.precision == "fp32"


def test_explicit_precisions_and_their_limits():
    assert choose_precision("bf16", "fp32", *AMX).inference_precision == "bf16"
    no_bf16 = choose_precision("bf16", "fp32", *AVX2)
    assert no_bf16.inference_precision == "bf16" and "no native bf16" in no_bf16.reason  # OpenVINO falls back
    assert choose_precision("fp16", "fp32", *AVX2).inference_precision == "f16"
    assert choose_precision("int8", "int8", *AVX2).precision == "int8+fp32"
    assert choose_precision("F32", "fp32", *AMX).inference_precision == "f32"  # OpenVINO's spelling is accepted
    with pytest.raises(ValueError, match="needs an INT8 artifact, this one is fp32.*--precision int8 --calibration"):
        choose_precision("int8", "fp32", *AMX)
    with pytest.raises(ValueError, match=r"one of auto, fp32, bf16, fp16, int8, got 'int4'"):
        choose_precision("int4", "fp32", *AVX2)


def test_capabilities_win_over_flags_and_flags_are_the_fallback():
    assert bf16_capable(AMX[0], AVX2[1]) is True  # the library's list is what it will do
    assert bf16_capable(AVX2[0], AMX[1]) is False
    assert bf16_capable(None, AMX[1]) is True and bf16_capable(None, {**_NO, "AVX-512 BF16": True}) is True
    assert bf16_capable(None, AVX2[1]) is False and bf16_capable(None, None) is False  # unknown: f32
    assert choose_precision("auto", "fp32", None, AMX[1]).inference_precision == "bf16"


def test_executed_label():
    assert executed_label("fp32", "f32") == "fp32" and executed_label("fp32", "bf16") == "bf16"
    assert executed_label("fp16", "f32") == "fp32" and executed_label("int8", "bf16") == "int8+bf16"
    assert executed_label("fp16", None) == "fp16"  # a backend that does not say: the weights' precision


def test_export_auto():
    assert auto_export_precision("openvino", None)[0] == "fp32"
    assert auto_export_precision("onnx", None)[0] == "fp32"
    assert auto_export_precision("openvino", "images/")[0] == "int8"
    with pytest.raises(ValueError, match="add --format openvino"):
        auto_export_precision("onnx", "images/")
    with pytest.raises(ValueError, match="not tensorrt"):
        auto_export_precision("tensorrt", None)


def test_bench_rows_for_the_policy_and_the_executed_precision_cell():
    from deimv2_deploy.benchmarks.artifacts import ROW_KINDS, RowKind, known_precisions
    from deimv2_deploy.benchmarks.report import _precision_cell

    assert {"auto", "bf16"} <= set(known_precisions())
    auto = ROW_KINDS[("openvino", "auto")]
    assert isinstance(auto, RowKind) and auto.options == {"precision": "auto"} and auto.artifact_precision == "fp32"
    stock = ROW_KINDS[("openvino-official", "fp32")]
    assert isinstance(stock, RowKind) and stock.options == {"stock": True} and stock.baseline
    assert isinstance(ROW_KINDS[("onnxruntime", "auto")], str)  # a skip with its reason, not a duplicate fp32 row
    assert _precision_cell({"precision": "auto", "executed_precision": "bf16"}) == "auto (ran bf16)"
    assert _precision_cell({"precision": "fp32", "executed_precision": "fp32"}) == "fp32"
    assert _precision_cell({"precision": "fp32"}) == "fp32"


# --- the runtimes -----------------------------------------------------------------------------------------------
ov = pytest.importorskip("openvino", reason="openvino is not installed")


def _load(path, **options):
    from deimv2_deploy.runtimes import load_runtime

    return load_runtime(path, threads=2, **options)


def test_openvino_auto_follows_the_capabilities_and_reports_what_ran(atto_onnx, monkeypatch):
    from deimv2_deploy.runtimes import openvino_backend

    real = _load(atto_onnx.path, backend="openvino", precision="auto")
    caps = openvino_backend.openvino_capabilities(real.core, "CPU")
    expected = "bf16" if "BF16" in caps else "f32"
    assert real.precision_choice.inference_precision == expected  # this CPU, as OpenVINO lists it
    info = real.describe()
    assert info["inference_precision"] == real.inference_precision()  # read from the compiled model
    assert info["executed_precision"] == executed_label("fp32", real.inference_precision())
    assert info["precision_choice"]["requested"] == "auto"

    # the AMX case, forced: the policy asks for bf16; what ran is still read back from the compiled model (on a
    # CPU without bf16 OpenVINO compiles f32 anyway, and describe() must not claim bf16)
    monkeypatch.setattr(openvino_backend, "openvino_capabilities", lambda core, device: AMX[0])
    amx = _load(atto_onnx.path, backend="openvino", precision="auto")
    assert amx.precision_choice.inference_precision == "bf16" and amx.config["INFERENCE_PRECISION_HINT"] == "bf16"
    compiled = openvino_backend.executed_precision(amx.compiled.get_property("INFERENCE_PRECISION_HINT"))
    assert amx.describe()["inference_precision"] == compiled
    assert amx.describe()["executed_precision"] == executed_label("fp32", compiled)
    if "BF16" not in caps:
        assert amx.describe()["executed_precision"] == "fp32"

    exact = _load(atto_onnx.path, backend="openvino", precision="fp32")  # AMX capabilities still forced
    assert exact.config["INFERENCE_PRECISION_HINT"] == "f32"
    assert exact.describe()["inference_precision"] == "f32" and exact.describe()["executed_precision"] == "fp32"
    for runtime in (real, amx, exact):
        runtime.close()


def test_stock_openvino_sets_nothing_but_threads(atto_onnx):
    runtime = _load(atto_onnx.path, backend="openvino", stock=True)
    info = runtime.describe()
    assert info["stock"] is True and info["compile_config"] == {"INFERENCE_NUM_THREADS": "2"}
    assert info["compiled_batches"] == ["any"]  # the graph as exported, as compile_model(path, "CPU") has it
    # the CPU's default precision: f32 here unless OpenVINO lists BF16 (AMX: bf16), read back either way
    from deimv2_deploy.runtimes.openvino_backend import openvino_core

    default = openvino_core().get_property("CPU", "INFERENCE_PRECISION_HINT")
    assert info["inference_precision"] == runtime.inference_precision() == \
        {"f32": "f32", "bf16": "bf16", "f16": "f16"}.get(default.get_type_name(), info["inference_precision"])
    with pytest.raises(ValueError, match="stock=True compiles with OpenVINO's defaults"):
        _load(atto_onnx.path, backend="openvino", stock=True, precision="fp32")
    runtime.close()


def test_precision_on_other_backends(atto_onnx):
    ort = _load(atto_onnx.path, backend="onnxruntime", precision="auto")
    info = ort.describe()
    assert info["inference_precision"] == "f32" and info["executed_precision"] == "fp32"
    assert info["precision_choice"]["precision"] == "fp32"
    assert "artifact's own precision" in info["precision_choice"]["reason"]
    ort.close()
    with pytest.raises(ValueError, match="runs the artifact's own precision \\(fp32\\), not bf16.*openvino"):
        _load(atto_onnx.path, backend="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        _load(atto_onnx.path, precision="int4")
    with pytest.raises(ValueError, match="give precision= once"):
        _load(atto_onnx.path, backend="openvino", precision="auto", inference_precision="f32")


def test_deimv2_infer_reports_the_precision_that_ran(atto_onnx, tmp_path, capsys):
    import cv2

    from deimv2_deploy.cli.infer import main
    from deimv2_deploy.exporters.parity import parity_images

    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), parity_images(1)[0])
    out = tmp_path / "all.json"
    rc = main([str(atto_onnx.path), str(image), "--backend", "openvino", "--precision", "auto", "--threads", "2",
               "--no-draw", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["precision"] in ("fp32", "bf16") and data["images"][0]["precision"] == data["precision"]
    assert f"runs {data['precision']} (auto on a fp32 artifact" in capsys.readouterr().err


def test_precision_requests_are_the_cli_choices():
    from deimv2_deploy.cli.infer import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "precision")
    assert tuple(action.choices) == PRECISION_REQUESTS and action.default is None
