"""TensorRT export and runtime.

Everything that needs neither TensorRT nor a GPU runs everywhere: batch profiles and MIN:OPT:MAX parsing, version
refusals, the precision an ONNX carries, strongly typed network flags, sidecar I/O, input checks
against a profile, dtype handling, and the errors on machines without TensorRT. Building and running an engine
needs TensorRT + pycuda + an NVIDIA GPU; those tests skip with the reason where that is missing.
"""
from __future__ import annotations

import json
import os
import stat

import cv2
import numpy as np
import pytest

from deimv2_deploy.exporters.tensorrt_export import (
    DEFAULT_DYNAMIC_BATCH,
    PRECISIONS,
    BatchProfile,
    TensorRtVersionError,
    build_settings,
    check_tensorrt_version,
    engine_spec,
    export_tensorrt,
    network_flags,
    onnx_precision_of,
    parity_tolerances,
    parse_batch_range,
    parse_dynamic_batch,
    profile_shapes,
    resolve_batch_profile,
)
from deimv2_deploy.runtimes import BackendUnavailableError, available_backends, load_runtime
from deimv2_deploy.runtimes.tensorrt_backend import (
    TensorRtRuntime,
    check_profile_shape,
    numpy_dtype,
    to_contract_dtype,
    to_engine_dtype,
)
from deimv2_deploy.spec import ArtifactSpec
from deimv2_deploy.tensorrt_support import parse_cuda_device, parse_version, read_sidecar, sidecar_path, write_sidecar

TRT_MISSING = TensorRtRuntime.unavailable_reason()
needs_tensorrt = pytest.mark.skipif(
    TRT_MISSING is not None,
    reason=f"TensorRT libraries are not installable here (needs an NVIDIA GPU + CUDA): {TRT_MISSING}")


# --- batch profile -----------------------------------------------------------------------------------------
def test_parse_batch_range_accepts_min_opt_max_and_single_value():
    assert parse_batch_range("1:4:8") == BatchProfile(1, 4, 8)
    assert parse_batch_range(" 2 : 2 : 16 ") == BatchProfile(2, 2, 16)
    assert parse_batch_range("4") == BatchProfile(4, 4, 4) and parse_batch_range("4").fixed
    assert parse_batch_range((1, 2, 3)) == BatchProfile(1, 2, 3)
    assert parse_dynamic_batch("1:1:8") == DEFAULT_DYNAMIC_BATCH
    assert str(BatchProfile(1, 4, 8)) == "1:4:8" and BatchProfile(1, 4, 8).to_dict() == {"min": 1, "opt": 4, "max": 8}


@pytest.mark.parametrize("text, message", [
    ("1:8", "MIN:OPT:MAX"),
    ("1:2:3:4", "MIN:OPT:MAX"),
    ("a:b:c", "MIN:OPT:MAX"),
    ("1:-2:4", "MIN:OPT:MAX"),
    ("8:4:1", "MIN <= OPT <= MAX, got 8:4:1"),
    ("2:1:4", "MIN <= OPT <= MAX, got 2:1:4"),
    ("0:1:2", "positive integer, got 0"),
    ((1, 2), "3 values"),
])
def test_parse_batch_range_rejects_bad_ranges_naming_them(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        parse_batch_range(text)
    if isinstance(text, str) and "MIN:OPT:MAX" in message:
        assert repr(text) in str(info.value)


def test_resolve_batch_profile():
    assert resolve_batch_profile() == DEFAULT_DYNAMIC_BATCH == BatchProfile(1, 1, 8)
    assert resolve_batch_profile(batch=4) == BatchProfile(4, 4, 4)
    assert resolve_batch_profile(dynamic_batch="1:2:16") == BatchProfile(1, 2, 16)
    assert resolve_batch_profile(onnx_batch=2) == BatchProfile(2, 2, 2)  # a fixed-batch ONNX fixes the engine
    assert resolve_batch_profile(batch=2, onnx_batch=2) == BatchProfile(2, 2, 2)
    with pytest.raises(ValueError, match="either batch"):
        resolve_batch_profile(batch=2, dynamic_batch="1:2:4")
    with pytest.raises(ValueError, match="fixed batch of 2"):
        resolve_batch_profile(dynamic_batch="1:2:4", onnx_batch=2)
    with pytest.raises(ValueError, match="positive integer"):
        resolve_batch_profile(batch=0)


def test_profile_shapes_cover_both_inputs_with_one_batch_range():
    shapes = profile_shapes((320, 320), BatchProfile(1, 4, 8))
    assert shapes["images"] == ((1, 3, 320, 320), (4, 3, 320, 320), (8, 3, 320, 320))
    assert shapes["orig_target_sizes"] == ((1, 2), (4, 2), (8, 2))
    assert profile_shapes((640, 480), BatchProfile(2, 2, 2))["images"][0] == (2, 3, 640, 480)


# --- versions ----------------------------------------------------------------------------------------------
def test_parse_version():
    assert parse_version("10.6.0.post1") == (10, 6, 0)
    assert parse_version("10.14.1.48") == (10, 14, 1, 48)
    assert parse_version("11.4.0.106") >= (11,)
    with pytest.raises(ValueError, match="version"):
        parse_version("trt")


def test_fp16_refused_before_10_6_naming_the_bug():
    with pytest.raises(TensorRtVersionError) as info:
        check_tensorrt_version("10.4.0", "fp16")
    message = str(info.value)
    for needle in ("10.4.0", "10.6", "#53", "#112", "force", "wrong FP16 outputs"):
        assert needle in message, needle
    cautions = check_tensorrt_version("10.4.0", "fp16", force=True)
    assert len(cautions) == 1 and "#112" in cautions[0] and "force" in cautions[0]
    assert check_tensorrt_version("10.6.0", "fp16") == []
    assert check_tensorrt_version("10.13.3.9", "fp16") == []
    assert check_tensorrt_version("10.4.0", "fp32") == []  # the bug is FP16-only
    assert check_tensorrt_version("10.4.0", "int8") == []  # an INT8 Q/DQ ONNX has no FP16 tensors


def test_tensorrt_too_old_is_refused_and_11_builds_every_precision():
    with pytest.raises(TensorRtVersionError, match="too old"):
        check_tensorrt_version("8.6.1", "fp32")
    for precision in PRECISIONS:  # strongly typed: TensorRT 11 needs none of the flags it removed
        assert check_tensorrt_version("11.4.0.106", precision) == []
    with pytest.raises(ValueError, match="precision"):
        check_tensorrt_version("10.6.0", "bf16")


# --- calibration -------------------------------------------------------------------------------------------
@pytest.fixture
def calibration_folder(tmp_path):
    rng = np.random.default_rng(0)
    sizes = [(240, 320), (480, 640), (300, 300), (375, 500), (200, 260)]
    for i, (h, w) in enumerate(sizes):
        cv2.imwrite(str(tmp_path / f"img_{i}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


# --- strongly typed: the precision is the ONNX's ---------------------------------------------------------------
def _tiny_onnx(kind: str):
    """A one-Conv ONNX model in FP32, FP16 (FP16 weights, Casts at the borders) or INT8 (Q/DQ)."""
    from onnx import TensorProto, helper, numpy_helper

    dtype = np.float16 if kind == "fp16" else np.float32
    weight = numpy_helper.from_array(np.ones((1, 1, 1, 1), dtype), "w")
    x, y = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2]), \
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2])
    if kind == "fp16":
        nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16),
                 helper.make_node("Conv", ["x16", "w"], ["y16"]), helper.make_node("Cast", ["y16"], ["y"], to=1)]
        inits = [weight]
    elif kind == "int8":
        scale, zero = numpy_helper.from_array(np.float32(0.1), "s"), numpy_helper.from_array(np.int8(0), "z")
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]), helper.make_node("Conv", ["dq", "w"],
                                                                                                 ["y"])]
        inits = [weight, scale, zero]
    else:
        nodes, inits = [helper.make_node("Conv", ["x", "w"], ["y"])], [weight]
    return helper.make_model(helper.make_graph(nodes, "tiny", [x], [y], inits))


@pytest.mark.parametrize("kind", ["fp32", "fp16", "int8"])
def test_the_engine_precision_is_read_from_the_onnx(kind):
    assert onnx_precision_of(_tiny_onnx(kind)) == kind


def test_networks_are_created_strongly_typed_on_10_and_11():
    from types import SimpleNamespace

    trt10 = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1))
    assert network_flags(trt10) == 1 << 1
    trt11 = SimpleNamespace(NetworkDefinitionCreationFlag=SimpleNamespace())  # every network strongly typed
    assert network_flags(trt11) == 0


def test_no_api_that_tensorrt_11_removed_is_used():
    """TensorRT 11 removed the weakly typed precision API; none of it may come back into the package."""
    import re
    from pathlib import Path

    import deimv2_deploy

    removed = re.compile(r"BuilderFlag\.(FP16|BF16|INT8|FP8|OBEY_PRECISION_CONSTRAINTS|PREFER_PRECISION_CONSTRAINTS)"
                         r"|IInt8\w*Calibrator\w*|int8_calibrator|set_calibration_profile|platform_has_fast_"
                         r"|device_memory_size(?!_v2)\b")
    root = Path(deimv2_deploy.__file__).parent
    found = [f"{p.relative_to(root)}:{i}" for p in root.rglob("*.py") for i, line in
             enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if removed.search(line) and not line.lstrip().startswith(("#", "`"))
             and "removed" not in line]
    assert found == []


# --- sidecar and spec --------------------------------------------------------------------------------------
def _settings(**overrides):
    base = dict(precision="fp16", profile=BatchProfile(1, 2, 8), workspace_gb=4.0, tensorrt="10.6.0",
                device="NVIDIA T4", compute_capability=(7, 5), fp32_attention=True,
                onnx={"file": "x.onnx", "sha256": "ab", "precision": "fp16", "build": {"fp32_blocks": ["lqe"]}})
    base.update(overrides)
    return build_settings(**base)


def test_build_settings_are_json_and_complete():
    build = _settings()
    assert json.loads(json.dumps(build)) == build
    assert build["batch_profile"] == {"min": 1, "opt": 2, "max": 8}
    assert build["compute_capability"] == "7.5" and build["tensorrt"] == "10.6.0" and build["fp32_attention"] is True
    assert build["network"].startswith("strongly typed") and build["forced"] is False and build["tf32"] is False


def test_sidecar_round_trip(tmp_path):
    onnx_spec = ArtifactSpec.for_variant("s", weights="deimv2_dinov3_s_coco.pth sha256:0123", exporter="x",
                                         versions={"torch": "2.13"})
    parity = {"ok": True, "matched": 600, "total": 600, "fraction": 1.0, "max_box_diff": 0.7,
              "max_score_diff": 0.004, "box_tol": 4.0, "score_tol": 0.05}
    spec = engine_spec(onnx_spec, "fp16", BatchProfile(1, 2, 8), _settings(), parity, {"tensorrt": "10.6.0"})
    assert spec.precision == "fp16" and spec.batch is None and spec.exporter.startswith("deimv2-deploy")
    assert spec.versions == {"torch": "2.13", "tensorrt": "10.6.0"} and spec.mean == onnx_spec.mean
    engine = tmp_path / "deimv2_s_fp16.engine"
    assert sidecar_path(engine).name == "deimv2_s_fp16.engine.json"
    assert read_sidecar(engine) is None
    write_sidecar(engine, spec)
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(sidecar_path(engine).stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    back = read_sidecar(engine)
    assert back == spec
    assert back.build["onnx"]["build"] == {"fp32_blocks": ["lqe"]}
    fixed = engine_spec(onnx_spec, "fp32", BatchProfile(4, 4, 4), _settings(precision="fp32"), None, {})
    assert fixed.batch == 4


def test_corrupt_sidecar_is_named(tmp_path):
    engine = tmp_path / "m.engine"
    sidecar_path(engine).write_text("{not json")
    with pytest.raises(ValueError, match="m.engine.json"):
        read_sidecar(engine)


def test_parity_tolerances_loosen_with_precision():
    fp32, fp16, int8 = (parity_tolerances(p) for p in ("fp32", "fp16", "int8"))
    assert fp32["box_tol"] < fp16["box_tol"] < int8["box_tol"]
    assert fp32["min_matched"] > fp16["min_matched"]


# --- runtime helpers ---------------------------------------------------------------------------------------
def test_inputs_checked_against_the_profile():
    lo, hi = (1, 3, 320, 320), (8, 3, 320, 320)
    check_profile_shape("images", (1, 3, 320, 320), lo, hi)
    check_profile_shape("images", (8, 3, 320, 320), lo, hi)
    with pytest.raises(ValueError) as info:
        check_profile_shape("images", (12, 3, 320, 320), lo, hi)
    message = str(info.value)
    assert "(12, 3, 320, 320)" in message and "(1, 3, 320, 320) .. (8, 3, 320, 320)" in message
    assert "1 to 8 images" in message and "--dynamic-batch 1:8:12" in message
    with pytest.raises(ValueError, match="exactly 4 image"):
        check_profile_shape("orig_target_sizes", (2, 2), (4, 2), (4, 2))
    with pytest.raises(ValueError, match="dimension 2, 3"):
        check_profile_shape("images", (1, 3, 640, 640), lo, hi)
    with pytest.raises(ValueError, match="4 dimensions"):
        check_profile_shape("images", (3, 320, 320), lo, hi)


def test_int64_and_dtype_handling():
    sizes = np.array([[640, 480], [500, 375]], np.int64)
    assert to_engine_dtype("orig_target_sizes", sizes, np.int64) is not None
    as32 = to_engine_dtype("orig_target_sizes", sizes, np.int32)
    assert as32.dtype == np.int32 and as32.tolist() == sizes.tolist()
    with pytest.raises(ValueError, match="do not fit"):
        to_engine_dtype("orig_target_sizes", np.array([[1 << 40, 1]], np.int64), np.int32)
    labels32 = np.array([[3, 7]], np.int32)
    out = to_contract_dtype("labels", labels32)
    assert out.dtype == np.int64 and out.tolist() == [[3, 7]]
    boxes = np.ones((1, 2, 4), np.float32)
    copied = to_contract_dtype("boxes", boxes)
    boxes[:] = 5  # the staging buffer is reused by the next call: results must not follow it
    assert copied.dtype == np.float32 and not np.shares_memory(copied, boxes) and copied.max() == 1
    assert to_contract_dtype("scores", np.ones((1, 2), np.float16)).dtype == np.float32
    assert numpy_dtype("FLOAT") == np.float32 and numpy_dtype("DataType.INT64") == np.int64
    assert numpy_dtype("HALF") == np.float16
    with pytest.raises(ValueError, match="BF16"):
        numpy_dtype("BF16")


def test_parse_cuda_device():
    assert parse_cuda_device("cuda") == 0 and parse_cuda_device("cuda:1") == 1 and parse_cuda_device(2) == 2
    assert parse_cuda_device("cpu") == 0  # load_runtime's default: an engine only runs on a GPU
    with pytest.raises(ValueError, match="cuda:N"):
        parse_cuda_device("tpu")


# --- machines without TensorRT -----------------------------------------------------------------------------
@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are available here")
def test_unavailable_reason_says_what_is_missing_and_how_to_install():
    reason = TensorRtRuntime.unavailable_reason()
    for needle in ("TensorRT", "pycuda", "pip install", "10.6", "NVIDIA GPU", "CUDA"):
        assert needle in reason, needle
    assert not TensorRtRuntime.is_available() and TensorRtRuntime.version() is None
    assert available_backends()["tensorrt"] == reason


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are available here")
@pytest.mark.parametrize("suffix", [".engine", ".plan"])
def test_load_runtime_of_an_engine_raises_with_an_install_hint(tmp_path, suffix):
    engine = tmp_path / f"model{suffix}"
    engine.write_bytes(b"\0" * 16)
    with pytest.raises(BackendUnavailableError, match=r"pip install 'tensorrt>=10\.6"):
        load_runtime(engine)
    with pytest.raises(BackendUnavailableError, match="pip install"):
        TensorRtRuntime(engine, variant="atto")


@pytest.mark.skipif(TRT_MISSING is None, reason="TensorRT and a GPU are available here")
def test_export_checks_options_then_names_the_missing_library(tmp_path, calibration_folder):
    with pytest.raises(ValueError, match="calibration images"):
        export_tensorrt("atto", precision="int8", random_weights=True, output_dir=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        export_tensorrt("atto", precision="int8", calibration=empty, random_weights=True, output_dir=tmp_path)
    with pytest.raises(ValueError, match="HGNetv2"):
        export_tensorrt("atto", precision="fp16", fp32_attention=True, random_weights=True, output_dir=tmp_path)
    with pytest.raises(ValueError, match="only matters"):
        export_tensorrt("s", precision="fp32", fp32_attention=True, random_weights=True, output_dir=tmp_path)
    with pytest.raises(ValueError, match="precision"):
        export_tensorrt("atto", precision="fp8", random_weights=True, output_dir=tmp_path)
    with pytest.raises(ValueError, match="either batch"):
        export_tensorrt("atto", batch=2, dynamic_batch="1:2:4", random_weights=True, output_dir=tmp_path)
    with pytest.raises(ValueError, match="MIN:OPT:MAX"):
        export_tensorrt("atto", dynamic_batch="1-8", random_weights=True, output_dir=tmp_path)
    with pytest.raises(BackendUnavailableError, match="pip install"):
        export_tensorrt("atto", precision="int8", calibration=calibration_folder, random_weights=True,
                        output_dir=tmp_path)
    assert list(tmp_path.glob("*.engine")) == []


# --- on a machine with TensorRT and an NVIDIA GPU ----------------------------------------------------------
@pytest.fixture(scope="module")
def atto_onnx(tmp_path_factory):
    from deimv2_deploy.exporters.onnx_export import export_onnx

    return export_onnx("atto", random_weights=True, output_dir=tmp_path_factory.mktemp("onnx"), quiet=True)


@needs_tensorrt
def test_fp32_engine_matches_onnxruntime_and_checks_its_profile(atto_onnx, tmp_path):
    from deimv2_deploy.exporters.parity import match_detections, parity_batch
    from deimv2_deploy.runtimes.onnxruntime_backend import OnnxRuntime

    result = export_tensorrt("atto", onnx_path=atto_onnx.path, output_dir=tmp_path, dynamic_batch="1:2:4",
                             quiet=True)
    assert result.path.suffix == ".engine" and sidecar_path(result.path).exists()
    assert result.spec.build["batch_profile"] == {"min": 1, "opt": 2, "max": 4} and result.parity["ok"]
    batch = parity_batch(result.spec, count=3)
    reference = OnnxRuntime(atto_onnx.path).infer(batch.as_inputs())
    with load_runtime(result.path, device="cuda") as runtime:
        first = runtime.infer(batch.as_inputs())
        assert first["labels"].dtype == np.int64 and first["boxes"].dtype == np.float32
        report = match_detections(first, reference, **parity_tolerances("fp32"))
        assert report["ok"], report
        kept = {k: v.copy() for k, v in first.items()}
        runtime.infer(parity_batch(result.spec, count=1).as_inputs())  # reuses (and resizes) the buffers
        for k in kept:
            np.testing.assert_array_equal(first[k], kept[k])  # results are copies, not views of the buffers
        too_many = parity_batch(result.spec, count=5)
        with pytest.raises(ValueError, match=r"\.\. \(4, 3, 320, 320\)"):
            runtime.infer(too_many.as_inputs())


@needs_tensorrt
def test_engine_without_sidecar_needs_the_variant(atto_onnx, tmp_path):
    result = export_tensorrt("atto", onnx_path=atto_onnx.path, output_dir=tmp_path, batch=None, quiet=True)
    sidecar_path(result.path).unlink()
    with pytest.raises(ValueError, match="variant="):
        load_runtime(result.path, device="cuda")
    with load_runtime(result.path, device="cuda", variant="atto") as runtime:
        assert runtime.spec.variant == "atto" and runtime.spec.exporter.startswith("official")
