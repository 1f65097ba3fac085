"""OpenVINO IR export (FP32 / FP16 / INT8) and the OpenVINO runtime.

Exports share module-scoped fixtures: atto is loaded and exported once per precision. FP32 is held to the
export tolerances against PyTorch (boxes 1e-2 px, scores 1e-5, >= 98% matched, order-free); FP16 and INT8 must
run and report their drift; the async queue must keep input order.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="openvino is not installed")
torch = pytest.importorskip("torch", reason="the exporter needs torch (pip install .[export])")
pytest.importorskip("nncf", reason="INT8 export needs nncf (pip install .[export])")

from deimv2_deploy.exporters.openvino_export import (  # noqa: E402
    INT8_FLOAT_PATTERNS,
    INT8_FLOAT_TYPES,
    export_openvino,
    int8_speed_note,
    select_calibration_images,
)
from deimv2_deploy.exporters.parity import (  # noqa: E402
    FP32_BOX_TOL,
    FP32_SCORE_TOL,
    MIN_MATCHED,
    ParityError,
    match_detections,
    parity_batch,
    parity_images,
    reference_outputs,
    tolerances,
)
from deimv2_deploy.runtimes import BackendUnavailableError, load_runtime  # noqa: E402
from deimv2_deploy.runtimes.openvino_backend import OpenVinoRuntime, executed_precision, openvino_core  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _reference(variant: str):
    from deimv2_deploy.models.graph import DeployGraph
    from deimv2_deploy.models.reference import load_reference

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model, weights, _ = load_reference(variant, random_weights=True)
    return DeployGraph(model).eval(), weights


def _onnx_spec(path: Path):
    import onnx

    from deimv2_deploy.spec import ArtifactSpec

    return ArtifactSpec.from_metadata({p.key: p.value for p in onnx.load(str(path)).metadata_props})


def _assert_fp32_parity(runtime: OpenVinoRuntime, graph, count: int = 3) -> dict:
    # scenes at other sizes than the export's own check (which uses the first two), in one batch
    batch = parity_batch(runtime.spec, count=count)
    report = match_detections(runtime.infer(batch.as_inputs()), reference_outputs(graph, batch),
                              box_tol=FP32_BOX_TOL, score_tol=FP32_SCORE_TOL)
    assert report["ok"], report
    assert report["fraction"] >= MIN_MATCHED, report
    assert report["max_box_diff"] <= FP32_BOX_TOL and report["max_score_diff"] <= FP32_SCORE_TOL, report
    return report


# --- shared artifacts ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(model_store) -> Path:
    """The session's model store (conftest.py): it already holds the atto and s ONNX of the same weights."""
    return model_store


@pytest.fixture(scope="module")
def atto_graph():
    return _reference("atto")


@pytest.fixture(scope="module")
def atto_onnx(atto_onnx) -> Path:  # the session's export (conftest.py), as a path
    return atto_onnx.path


@pytest.fixture(scope="module")
def atto_fp32(store, atto_graph, atto_onnx):
    graph, weights = atto_graph  # source "auto" converts the store's ONNX of the same weights
    return export_openvino("atto", random_weights=True, output_dir=store, graph=graph, weights=weights, quiet=True)


@pytest.fixture(scope="module")
def atto_fp16(store, atto_graph, atto_onnx):
    graph, weights = atto_graph
    return export_openvino("atto", precision="fp16", random_weights=True, output_dir=store, graph=graph,
                           weights=weights, quiet=True)


@pytest.fixture(scope="module")
def calibration_dir(tmp_path_factory) -> Path:
    import cv2

    folder = tmp_path_factory.mktemp("calibration")
    for i, image in enumerate(parity_images(5, seed=7)):
        cv2.imwrite(str(folder / f"scene_{i}.png"), image)
    (folder / "notes.txt").write_text("not an image: must be skipped")
    return folder


@pytest.fixture(scope="module")
def atto_int8(store, atto_graph, atto_onnx, calibration_dir):
    graph, weights = atto_graph
    return export_openvino("atto", precision="int8", random_weights=True, output_dir=store, graph=graph,
                           weights=weights, quiet=True, calibration=calibration_dir, calibration_size=4)


@pytest.fixture(scope="module")
def atto_runtime(atto_fp32):
    runtime = OpenVinoRuntime(atto_fp32.path, threads=2)
    yield runtime
    runtime.close()


# --- FP32 parity -----------------------------------------------------------------------------------------
def test_fp32_ir_matches_pytorch_atto(atto_fp32, atto_graph):
    path = atto_fp32.path
    assert path.name == "deimv2_atto_random_fp32.xml" and path.with_suffix(".bin").exists()
    assert not [p.name for p in path.parent.iterdir() if ".partial" in p.name or ".check" in p.name]
    assert atto_fp32.parity["ok"] and atto_fp32.parity["max_box_diff"] <= FP32_BOX_TOL
    runtime = load_runtime(path, threads=2)  # backend picked from .xml, spec from rt_info
    assert isinstance(runtime, OpenVinoRuntime)
    assert runtime.spec.precision == "fp32" and runtime.spec.random_weights
    assert runtime.spec.parity["ok"] and runtime.spec.build["source"] == "onnx"  # auto found the store's ONNX
    info = runtime.describe()
    assert info["backend"] == "openvino" and info["openvino_device"] == "CPU"
    assert info["inference_precision"] == "f32" and info["performance_mode"] == "latency"
    assert info["threads"] == 2 and info["streams"] >= 1
    _assert_fp32_parity(runtime, atto_graph[0])


def test_fp32_ir_matches_pytorch_s(s_onnx, store):
    graph, weights = _reference("s")
    result = export_openvino("s", random_weights=True, output_dir=store, graph=graph, weights=weights, quiet=True)
    runtime = OpenVinoRuntime(result.path, threads=2)
    assert runtime.spec.build["source"] == "onnx"  # auto: the store's ONNX of the same weights
    assert runtime.spec.mean is not None  # ImageNet normalisation travels in rt_info
    _assert_fp32_parity(runtime, graph, count=1)


def test_onnx_on_openvino_uses_its_metadata(atto_onnx, atto_runtime):
    onnx_path = atto_onnx
    runtime = load_runtime(onnx_path, backend="openvino", threads=2)
    assert runtime.spec == _onnx_spec(onnx_path)
    batch = parity_batch(runtime.spec)
    report = match_detections(runtime.infer(batch.as_inputs()), atto_runtime.infer(batch.as_inputs()))
    assert report["ok"] and report["fraction"] == 1.0, report


def test_official_onnx_without_metadata_needs_variant(atto_onnx, tmp_path):
    import onnx

    model = onnx.load(str(atto_onnx))
    del model.metadata_props[:]
    bare = tmp_path / "official.onnx"
    onnx.save(model, str(bare))
    with pytest.raises(ValueError, match="variant="):
        load_runtime(bare, backend="openvino")
    with pytest.raises(ValueError, match="320x320"):
        load_runtime(bare, backend="openvino", variant="s")
    runtime = load_runtime(bare, backend="openvino", variant="atto")
    assert runtime.spec.exporter.startswith("official") and runtime.spec.mean is None


# --- FP16 / INT8 -----------------------------------------------------------------------------------------
def _assert_drift_as_executed(runtime: OpenVinoRuntime, reference: OpenVinoRuntime) -> str:
    """The runtime's detections against the FP32 IR's, held to what its weights AND the arithmetic it reports
    it runs in allow (describe(), read from the compiled model): never to an assumption about the CPU. FP16
    weights in f32 arithmetic (AVX2, AVX-512) move boxes by a fraction of a pixel; bf16 arithmetic (the CPU
    default on AMX Xeons) lets near-tied queries trade places, so about two thirds match."""
    executed = runtime.describe()["inference_precision"]
    assert executed in ("f32", "bf16", "f16"), runtime.describe()
    batch = parity_batch(runtime.spec)
    limits = tolerances(runtime.spec.precision, executed)
    drift = match_detections(runtime.infer(batch.as_inputs()), reference.infer(batch.as_inputs()), **limits)
    assert drift["ok"], (executed, limits, drift)
    return executed


def test_fp16_ir_runs_and_reports_drift(atto_fp16, atto_fp32, atto_runtime):
    parity = atto_fp16.parity
    assert parity["enforced"] is False and "drift" in parity
    assert 0.0 <= parity["drift"]["mean_iou"] <= 1.0
    # weights really are FP16: the .bin is about half the FP32 one
    fp16_bytes = atto_fp16.path.with_suffix(".bin").stat().st_size
    assert fp16_bytes < 0.6 * atto_fp32.path.with_suffix(".bin").stat().st_size
    runtime = OpenVinoRuntime(atto_fp16.path, threads=2)  # no hint: the CPU's default arithmetic
    assert runtime.spec.precision == "fp16" and runtime.describe()["precision"] == "fp16"
    executed = _assert_drift_as_executed(runtime, atto_runtime)
    assert executed == runtime.inference_precision()


def _cpu_has_bf16() -> bool:
    from deimv2_deploy.cpu import cpu_info

    isa = cpu_info()["isa"]
    return bool(isa.get("AVX-512 BF16") or isa.get("AMX-BF16"))


def test_describe_reports_the_precision_the_compiled_model_runs_in(atto_fp16, atto_runtime):
    """A forced bf16 hint runs in bf16 where the CPU has it; elsewhere OpenVINO falls back to f32 without a word,
    and describe() must say so (read from the compiled model, not from what was asked)."""
    runtime = OpenVinoRuntime(atto_fp16.path, threads=2, inference_precision="bf16")
    compiled = runtime.compiled.get_property("INFERENCE_PRECISION_HINT")
    assert runtime.describe()["inference_precision"] == executed_precision(compiled)
    if not _cpu_has_bf16():
        assert runtime.describe()["inference_precision"] == "f32"  # this CPU: the silent fallback
    _assert_drift_as_executed(runtime, atto_runtime)
    forced = OpenVinoRuntime(atto_fp16.path, threads=2, inference_precision="f32")
    assert forced.describe()["inference_precision"] == "f32"


def test_expectations_follow_the_reported_precision(atto_fp16, atto_runtime, monkeypatch):
    """What a run on an AMX CPU reports (the compiled model's INFERENCE_PRECISION_HINT is bf16), forced here:
    describe() says bf16 and the test's expectation loosens to bf16's."""
    runtime = OpenVinoRuntime(atto_fp16.path, threads=2)
    real = runtime._property
    monkeypatch.setattr(runtime, "_property", lambda name: ov.Type.bf16 if name == "INFERENCE_PRECISION_HINT"
                        else real(name))
    assert runtime.describe()["inference_precision"] == "bf16"
    assert tolerances("fp16", "bf16")["min_matched"] < tolerances("fp16", "f32")["min_matched"]
    assert tolerances("fp16", "bf16")["box_tol"] > tolerances("fp16")["box_tol"] == 2.0
    _assert_drift_as_executed(runtime, atto_runtime)  # f32 arithmetic in fact: holds all the more
    assert executed_precision(ov.Type.dynamic, ov.properties.hint.ExecutionMode.ACCURACY) == "f32"
    assert executed_precision(None) is None and executed_precision("bf16") == "bf16"


def test_int8_ir_builds_from_images_and_runs(atto_int8, calibration_dir):
    parity = atto_int8.parity
    assert "vs_fp32" in parity and "summary" in parity["vs_fp32"] and parity["enforced"] is False
    calib = atto_int8.spec.build["calibration"]
    assert calib["images"] == 4 and calib["float_patterns"] == list(INT8_FLOAT_PATTERNS)
    assert calib["float_types"] == list(INT8_FLOAT_TYPES)
    model = openvino_core().read_model(str(atto_int8.path))
    fq = [op for op in model.get_ops() if op.get_type_name() == "FakeQuantize"]
    assert fq, "no FakeQuantize nodes: the IR is not quantized"
    # the decoder and postprocessing stay in floating point: nothing there reads a quantized activation
    float_part = re.compile("|".join(INT8_FLOAT_PATTERNS))
    consumers = [t.get_node().get_friendly_name() for op in fq for t in op.output(0).get_target_inputs()]
    assert consumers and not [c for c in consumers if float_part.fullmatch(c)]
    runtime = load_runtime(atto_int8.path, threads=2)
    assert runtime.spec.precision == "int8"
    detections = runtime.predict(parity_images(1)[0])
    assert len(detections) == runtime.spec.top_k and np.isfinite(detections.xyxy).all()


def test_calibration_selection_is_spread_and_deterministic(calibration_dir):
    chosen = select_calibration_images(calibration_dir, 2)
    assert [p.name for p in chosen] == ["scene_0.png", "scene_2.png"]
    assert len(select_calibration_images(calibration_dir, 50)) == 5


def test_int8_speed_note_only_for_x86_cpus_without_int8_dot_products():
    avx2_only = {"AVX2": True, "AVX-512F": False, "AVX-512 VNNI": False, "AVX-VNNI": False, "AMX-INT8": False}
    note = int8_speed_note(avx2_only)
    assert note is not None and "no VNNI" in note and "deimv2-bench" in note
    for flag in ("AVX-512 VNNI", "AVX-VNNI", "AMX-INT8"):
        assert int8_speed_note({**avx2_only, flag: True}) is None, flag
    assert int8_speed_note({}) is None  # not x86, or /proc/cpuinfo unreadable: nothing is claimed


# --- async / throughput ------------------------------------------------------------------------------------
def _many_inputs(spec, count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    h, w = spec.input_size
    return [{"images": rng.random((1, 3, h, w), dtype=np.float32),
             "orig_target_sizes": np.array([[100 + 7 * i, 80 + 5 * i]], np.int64)} for i in range(count)]


def test_throughput_queue_keeps_input_order(atto_fp32, atto_runtime):
    inputs = _many_inputs(atto_runtime.spec, 64)
    expected = [atto_runtime.infer(x) for x in inputs]
    runtime = OpenVinoRuntime(atto_fp32.path, mode="throughput", threads=2, streams=2)
    info = runtime.describe()
    assert info["performance_mode"] == "throughput" and info["streams"] == 2
    got = runtime.infer_many(inputs)
    assert len(got) == 64
    for ours, ref in zip(got, expected, strict=True):  # sizes differ per input, so a swap shows as a box mismatch
        assert match_detections(ours, ref)["ok"]
        np.testing.assert_allclose(ours["boxes"].max(), ref["boxes"].max(), rtol=1e-4)

    # submit/results: userdata comes back in submission order, none dropped
    seen = []
    for i, x in enumerate(inputs):
        runtime.submit(x, userdata=i)
        x["images"][:] = 0  # the input was copied in: reusing the buffer must not change the result
        seen.extend(runtime.results())
    seen.extend(runtime.results(wait=True))
    assert [u for u, _ in seen] == list(range(64)) and runtime.pending == 0
    for (_, ours), ref in zip(seen, expected, strict=True):
        assert match_detections(ours, ref)["ok"]

    # a batch in throughput mode is split over the streams and comes back whole, in order
    batch = {k: np.concatenate([x[k] for x in _many_inputs(runtime.spec, 4)]) for k in inputs[0]}
    split = runtime.infer(batch)
    whole = atto_runtime.infer(batch)
    assert split["boxes"].shape == (4, 300, 4) and match_detections(split, whole)["ok"]
    runtime.close()


def test_outputs_are_copies(atto_runtime):
    a, b = _many_inputs(atto_runtime.spec, 2)
    first = atto_runtime.infer(a)
    kept = {k: v.copy() for k, v in first.items()}
    atto_runtime.infer(b)
    for k in kept:
        np.testing.assert_array_equal(first[k], kept[k])
        assert not np.shares_memory(first[k], atto_runtime._request.get_tensor(k).data)


# --- errors ----------------------------------------------------------------------------------------------
def test_missing_bin_names_the_file(atto_fp32, tmp_path):
    xml = tmp_path / "lonely.xml"
    shutil.copy(atto_fp32.path, xml)
    with pytest.raises(FileNotFoundError, match=r"lonely\.bin"):
        load_runtime(xml)


def test_truncated_bin_names_the_file(atto_fp32, tmp_path):
    xml = tmp_path / "cut.xml"
    shutil.copy(atto_fp32.path, xml)
    data = atto_fp32.path.with_suffix(".bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.bin.*truncated"):
        load_runtime(xml)


def test_unsupported_device_lists_available(atto_fp32):
    with pytest.raises(ValueError, match="CPU"):
        OpenVinoRuntime(atto_fp32.path, device="cuda")
    if "NPU" not in openvino_core().available_devices:
        with pytest.raises(BackendUnavailableError, match="devices here: CPU"):
            OpenVinoRuntime(atto_fp32.path, device="npu")
    with pytest.raises(ValueError, match="mode"):
        OpenVinoRuntime(atto_fp32.path, mode="fastest")


def test_calibration_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="has no images"):
        export_openvino("atto", precision="int8", random_weights=True, output_dir=tmp_path, calibration=empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_openvino("atto", precision="int8", random_weights=True, output_dir=tmp_path,
                        calibration=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--calibration DIR"):
        export_openvino("atto", precision="int8", random_weights=True, output_dir=tmp_path)
    assert not list(tmp_path.glob("*.xml")) and not list(tmp_path.glob("*.bin"))


def test_failed_fp32_parity_writes_nothing(atto_graph, atto_onnx, tmp_path, monkeypatch):
    import deimv2_deploy.exporters.openvino_export as ov_export

    shutil.copy(atto_onnx, tmp_path)  # reuse the ONNX: no re-export
    broken = lambda *a, **k: {"ok": False, "matched": 0, "total": 600, "fraction": 0.0, "max_box_diff": 9.0,  # noqa: E731
                              "max_score_diff": 1.0, "box_tol": 1e-2, "score_tol": 1e-5}
    monkeypatch.setattr(ov_export, "match_detections", broken)
    graph, weights = atto_graph
    with pytest.raises(ParityError, match="Nothing was written"):
        export_openvino("atto", random_weights=True, output_dir=tmp_path, graph=graph, weights=weights, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deimv2_atto_random_fp32.onnx"]


def test_inference_path_imports_no_torch(atto_fp32):
    code = ("import sys; from deimv2_deploy.runtimes import load_runtime; import numpy as np; "
            f"rt = load_runtime({str(atto_fp32.path)!r}); "
            "rt.predict(np.zeros((48, 64, 3), np.uint8)); assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


# Runtimes made and released in an order OpenVINO's CPU plugin does not expect (out of creation order, and on
# another thread), then a signal handled in Python: with one Core per runtime this died with SIGSEGV, because each
# Core's plugin left the main thread's alternate signal stack pointing at memory it had unmapped.
_RELEASE_THEN_SIGNAL = """
import faulthandler, gc, os, signal, sys, threading
faulthandler.enable()  # as under pytest: the main thread gets an alternate signal stack
from deimv2_deploy.runtimes.openvino_backend import OpenVinoRuntime
first, second, third = (OpenVinoRuntime(sys.argv[1], threads=1) for _ in range(3))
image = __import__("numpy").zeros((48, 64, 3), "uint8")
for runtime in (first, second, third):
    runtime.predict(image)
del first, second                                  # out of creation order
gc.collect()
worker = threading.Thread(target=lambda: (third.__dict__.clear(), gc.collect()))  # the last one on another thread
worker.start()
worker.join()
handled = []
signal.signal(signal.SIGUSR1, lambda *_: handled.append(1))
os.kill(os.getpid(), signal.SIGUSR1)
print("handled", len(handled))
"""


def test_released_runtimes_leave_signal_handling_intact(atto_fp32):
    run = subprocess.run([sys.executable, "-c", _RELEASE_THEN_SIGNAL, str(atto_fp32.path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, f"exit {run.returncode} (-11 is SIGSEGV)\n{run.stderr[-2000:]}"
    assert run.stdout.split()[-2:] == ["handled", "1"]
