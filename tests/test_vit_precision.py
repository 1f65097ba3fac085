"""FP16 / INT8 exports of EoMT-DINOv3 and DINOv3 (tiny models written by transformers): ONNX and OpenVINO IR,
checked against transformers FP32 by task-level agreement, loaded torch-free; refusals write nothing; bad inputs are
one line; deimv2-bench --vit gives a row per backend x precision with what really ran.

Nothing here depends on how fast anything runs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers (pinned 5.24)")
pytest.importorskip("onnxconverter_common", reason="FP16 ONNX needs the export extra")
pytest.importorskip("openvino")

from vit_helpers import make_confident  # noqa: E402

from deimv2_deploy.cli.export import main as export_main  # noqa: E402
from deimv2_deploy.exporters.onnx_precision import qdq_summary  # noqa: E402
from deimv2_deploy.exporters.parity import ParityError, parity_images  # noqa: E402
from deimv2_deploy.exporters.vit_export import export_vit  # noqa: E402
from deimv2_deploy.exporters.vit_precision import THRESHOLDS, agreement  # noqa: E402
from deimv2_deploy.media import write_image  # noqa: E402
from deimv2_deploy.precision import bf16_capable  # noqa: E402
from deimv2_deploy.runtimes import load_runtime  # noqa: E402

NAMES = {0: "person", 1: "car", 2: "sky", 3: "road"}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny confident EoMT (masked attention on), a tiny DINOv3 with registers, 4 calibration scenes, and the
    store deimv2-bench uses for the DINOv3 folder (so the bench test reuses these exports)."""
    root = tmp_path_factory.mktemp("vit_precision")
    torch.manual_seed(3)
    config = transformers.EomtDinov3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, num_register_tokens=1,
                                           num_blocks=1, num_queries=10, num_labels=4, id2label=NAMES)
    eomt = transformers.EomtDinov3ForUniversalSegmentation(config).eval()
    eomt.attn_mask_probs.fill_(1.0)
    make_confident(eomt, no_object_bias=4.0)
    eomt.save_pretrained(root / "eomt")
    dino = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, num_register_tokens=2)).eval()
    dino.save_pretrained(root / "dino")
    for i, image in enumerate(parity_images(4, seed=3)):
        write_image(root / "calib" / f"scene_{i}.png", image)
    return {"root": root, "eomt": root / "eomt", "dino": root / "dino", "calib": root / "calib",
            "store": root / "bench-dino"}


@pytest.fixture(scope="module")
def onnx_exports(made):
    """(family, precision) -> ExportResult of the ONNX exports."""
    out = {}
    for family, folder in (("eomt", made["eomt"]), ("dinov3", made["dino"])):
        for precision in ("fp16", "int8"):
            out[family, precision] = export_vit(
                family, folder, output_dir=made["store"], precision=precision,
                calibration=made["calib"] if precision == "int8" else None, quiet=True)
    return out


def _transformers(folder, pixels: np.ndarray) -> dict[str, np.ndarray]:
    config = json.loads((folder / "config.json").read_text())
    if config["model_type"] == "eomt_dinov3":
        model, names = transformers.EomtDinov3ForUniversalSegmentation, ("class_queries_logits", "masks_queries_logits")
    else:
        model, names = transformers.DINOv3ViTModel, ("last_hidden_state", "pooler_output")
    with torch.inference_mode():
        out = model.from_pretrained(str(folder)).eval()(pixel_values=torch.from_numpy(pixels))
    return {n: getattr(out, n).numpy() for n in names}


def _check_agreement(spec, precision, got, want):
    values = agreement(spec, got, want)
    for metric, limit in THRESHOLDS[spec.family][precision].items():
        assert values[metric] >= limit, (spec.family, precision, metric, values)
    return values


@pytest.mark.parametrize("key", [("eomt", "fp16"), ("eomt", "int8"), ("dinov3", "fp16"), ("dinov3", "int8")])
def test_onnx_reduced_export_is_checked_and_described(onnx_exports, key):
    result = onnx_exports[key]
    family, precision = key
    assert result.path.name.endswith(f"_{precision}.onnx") and result.spec.precision == precision
    parity = result.parity
    assert parity == result.spec.parity and parity["ok"] and parity["precision"] == precision
    assert parity["backend"] == "onnxruntime" and parity["fp32_onnx"]["ok"]  # the trace itself passed 1e-4 first
    assert set(parity["agreement"]) >= set(THRESHOLDS[family][precision])
    for metric, checked in parity["agreement"].items():
        assert checked["ok"] and (checked["min"] is None or checked["value"] >= checked["min"]), metric
    assert parity["max_abs_diff"] > 0  # reduced precision is not bit-exact: the raw error is measured, not assumed
    assert result.spec.build["precision"]["prepared"]["folded_to_constants"]  # the RoPE tables
    if precision == "fp16":
        assert result.spec.build["precision"]["fp16_nodes"] > 0
        assert result.spec.build["precision"]["fp32_blocks"] == ["norms", "heads"]


def test_int8_onnx_is_symmetric_qdq(onnx_exports):
    import onnx

    for family in ("eomt", "dinov3"):
        result = onnx_exports[family, "int8"]
        model = onnx.load(str(result.path))
        summary = qdq_summary(model)  # raises QdqError on a non-zero zero point or a non-INT8 type
        assert summary["zero_points"] == "all 0" and summary["type"] == "int8"
        assert summary["quantized_inputs"].get("MatMul", 0) > 0 and summary["quantized_weights"] > 0
        zero_points = [t for t in model.graph.initializer if t.name.endswith("_zero_point")]
        assert zero_points and all(not np.any(onnx.numpy_helper.to_array(t)) for t in zero_points)
        assert all(onnx.numpy_helper.to_array(t).dtype == np.int8 for t in zero_points)
        # the patch embedding stays float: its Conv reads the raw pixel values, no DequantizeLinear
        conv = next(n for n in model.graph.node if n.op_type == "Conv")
        assert "DequantizeLinear" not in {p.op_type for p in model.graph.node if set(p.output) & set(conv.input)}
        calibration = result.spec.build["precision"]["calibration"]
        assert calibration["images"] == 4 and calibration["source"].endswith("calib")


def test_reduced_onnx_runs_torch_free_and_agrees_with_transformers(made, onnx_exports, tmp_path):
    paths = {f"{f}_{p}": str(r.path) for (f, p), r in onnx_exports.items()}
    out = tmp_path / "outputs.npz"
    code = textwrap.dedent(f"""
        import sys, json
        import numpy as np
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        from deimv2_deploy.runtimes import load_runtime
        saved = {{}}
        for name, path in {paths!r}.items():
            runtime = load_runtime(path, precision="auto")
            info = runtime.describe()
            assert info["executed_precision"] == runtime.spec.precision, info
            pixels = np.random.default_rng(7).normal(size=(3, 3, 32, 32)).astype(np.float32)
            for k, v in runtime.infer(pixels).items():
                saved[name + "/" + k] = v
            runtime.predict(np.zeros((20, 30, 3), np.uint8))
        np.savez({str(out)!r}, **saved)
        assert "torch" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    saved = np.load(out)
    pixels = np.random.default_rng(7).normal(size=(3, 3, 32, 32)).astype(np.float32)
    for (family, precision), result in onnx_exports.items():
        want = _transformers(made["eomt" if family == "eomt" else "dino"], pixels)
        got = {n: saved[f"{family}_{precision}/{n}"] for n in want}
        _check_agreement(result.spec, precision, got, want)


def test_broken_reduced_artifact_is_refused_and_nothing_written(made, tmp_path, monkeypatch):
    """A rewrite that silently breaks the graph (here: every output negated) must not reach the store."""
    import onnx

    from deimv2_deploy.exporters import vit_precision

    real = vit_precision.rewrite_onnx

    def negating(src, dst, precision, spec, calibration=None, method="minmax"):
        notes = real(src, dst, precision, spec, calibration, method)
        model = onnx.load(str(dst))
        for value in model.graph.output:
            inner = value.name + "_before_neg"
            for node in model.graph.node:
                node.output[:] = [inner if o == value.name else o for o in node.output]
                node.input[:] = [inner if i == value.name else i for i in node.input]
            model.graph.node.append(onnx.helper.make_node("Neg", [inner], [value.name]))
        onnx.save(model, str(dst))
        return notes

    monkeypatch.setattr(vit_precision, "rewrite_onnx", negating)
    store = tmp_path / "store"
    with pytest.raises(ParityError, match="mask_sign 0.0[0-9]* \\(min 0.99\\).*Nothing was written"):
        export_vit("eomt", made["eomt"], output_dir=store, precision="fp16", quiet=True)
    with pytest.raises(ParityError, match="pooler_cosine -[01][.][0-9]+ \\(min 0.95\\)"):
        export_vit("dinov3", made["dino"], output_dir=store, precision="int8", calibration=made["calib"],
                   quiet=True)
    assert not store.exists() or not any(store.iterdir())


def test_corrupt_calibration_image_is_one_line_and_writes_nothing(made, tmp_path, capsys):
    bad = tmp_path / "calib"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG not really")
    store = tmp_path / "store"
    code = export_main(["dinov3", "--checkpoint", str(made["dino"]), "--precision", "int8", "--calibration", str(bad),
                        "--output-dir", str(store), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "broken.png" in err, err
    assert not store.exists() or not any(store.iterdir())


def _one_line(capsys, argv) -> str:
    assert export_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("deimv2-export: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_precision_inputs_are_one_line(made, tmp_path, capsys):
    base = ["--checkpoint", str(made["dino"]), "--output-dir", str(tmp_path / "store"), "--quiet"]
    assert "INT8 needs calibration data: pass --calibration DIR" in _one_line(
        capsys, ["dinov3", *base, "--precision", "int8"])
    err = _one_line(capsys, ["eomt", "--checkpoint", str(made["eomt"]), "--precision", "bf16", "--quiet"])
    assert "bf16 is not a file precision" in err and "ONNX Runtime's CPU provider has no bf16" in err
    assert "export --precision fp32" in _one_line(capsys, ["dinov3", *base, "--precision", "bf16", "--format",
                                                           "openvino"])
    assert "--calibration is for --precision int8, not fp16" in _one_line(
        capsys, ["dinov3", *base, "--precision", "fp16", "--calibration", str(made["calib"])])
    assert "calibration folder" in _one_line(capsys, ["dinov3", *base, "--precision", "int8", "--calibration",
                                                      str(tmp_path / "missing")])
    assert "add --format openvino" in _one_line(capsys, ["dinov3", *base, "--precision", "auto", "--calibration",
                                                         str(made["calib"])])
    # the detector's exports say the same (bf16 used to be an argparse choice error)
    assert "bf16 is not a file precision" in _one_line(capsys, ["atto", "--random-weights", "--precision", "bf16",
                                                                "--output-dir", str(tmp_path / "store"), "--quiet"])
    assert not (tmp_path / "store").exists()
    with pytest.raises(ValueError, match="precision must be one of fp32, fp16, int8, got 'fp8'"):
        export_vit("dinov3", made["dino"], output_dir=tmp_path / "store", precision="fp8")
    with pytest.raises(SystemExit):  # argparse: not a choice
        export_main(["dinov3", *base, "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_runtime_precision_requests(onnx_exports):
    path = onnx_exports["dinov3", "fp16"].path
    runtime = load_runtime(path, precision="fp16")
    assert runtime.describe()["precision_choice"]["reason"].startswith("onnxruntime runs the artifact's own")
    with pytest.raises(ValueError, match="not bf16: bf16 arithmetic is an OpenVINO option"):
        load_runtime(path, precision="bf16")
    with pytest.raises(ValueError, match="not int8: export a int8 artifact"):
        load_runtime(path, precision="int8")
    assert load_runtime(onnx_exports["dinov3", "int8"].path).describe()["executed_precision"] == "int8"


def _executed_here(weights: str) -> str:
    """What OpenVINO runs here for a reduced IR with its default hint: f32 arithmetic unless the CPU has bf16."""
    from deimv2_deploy.cpu import cpu_info
    from deimv2_deploy.precision import openvino_capabilities
    from deimv2_deploy.runtimes.openvino_backend import openvino_core

    bf16 = bf16_capable(openvino_capabilities(openvino_core()), cpu_info()["isa"])
    return ("int8+" if weights == "int8" else "") + ("bf16" if bf16 else "fp32")


def test_openvino_fp16_ir_has_compressed_weights_and_reports_what_ran(made):
    import openvino as ov

    from deimv2_deploy.runtimes.openvino_backend import openvino_core

    result = export_vit("dinov3", made["dino"], output_dir=made["store"], fmt="openvino", precision="fp16",
                        quiet=True)
    assert result.path.name.endswith("_fp16.xml") and result.parity["ok"] and result.parity["backend"] == "openvino"
    assert result.spec.build["compress_to_fp16"] is True
    model = openvino_core().read_model(str(result.path))
    weights = [op for op in model.get_ops() if op.get_type_name() == "Constant" and op.get_output_size() == 1
               and np.prod(op.get_output_shape(0)) >= 16 * 16]  # the linear layers' matrices
    assert weights and all(op.get_output_element_type(0) == ov.Type.f16 for op in weights)
    runtime = load_runtime(result.path)
    info = runtime.describe()
    assert info["precision"] == "fp16" and info["executed_precision"] == _executed_here("fp16")
    pixels = np.random.default_rng(2).normal(size=(2, 3, 32, 32)).astype(np.float32)
    _check_agreement(runtime.spec, "fp16", runtime.infer(pixels), _transformers(made["dino"], pixels))
    asked = load_runtime(result.path, precision="fp16").describe()  # the f16 hint: what runs is read back
    assert asked["precision_choice"]["requested"] == "fp16" and asked["executed_precision"] in ("fp16", "fp32")


@pytest.mark.slow  # NNCF statistics and two OpenVINO compilations per family: ~40 s on a busy 2-core machine
@pytest.mark.parametrize("family", ["eomt", "dinov3"])
def test_openvino_int8_ir_agrees_and_reports_what_ran(made, family):
    folder = made["eomt" if family == "eomt" else "dino"]
    result = export_vit(family, folder, output_dir=made["store"], fmt="openvino", precision="int8",
                        calibration=made["calib"], quiet=True)
    assert result.parity["ok"] and result.spec.build["calibration"]["images"] == 4
    from deimv2_deploy.runtimes.openvino_backend import openvino_core

    ops = [op.get_type_name() for op in openvino_core().read_model(str(result.path)).get_ops()]
    assert ops.count("FakeQuantize") > 0
    runtime = load_runtime(result.path)
    assert runtime.describe()["executed_precision"] == _executed_here("int8")
    pixels = np.random.default_rng(4).normal(size=(2, 3, 32, 32)).astype(np.float32)
    _check_agreement(runtime.spec, "int8", runtime.infer(pixels), _transformers(folder, pixels))


def test_bench_onnxruntime_rows_per_precision(made, onnx_exports):
    from deimv2_deploy.benchmarks import BenchConfig, run_benchmark

    config = BenchConfig(vit=str(made["dino"]), checkpoint_dir=str(made["root"]), calibration=str(made["calib"]),
                         backends=("torch", "onnxruntime"), precisions=("fp32", "fp16", "int8", "bf16"),
                         warmup=1, iters=2, threads=1, progress=False, command="pytest")
    result = run_benchmark(config)
    rows = {(r.backend, r.precision): r for r in result.rows}
    assert [(r.backend, r.precision) for r in result.rows] == [(b, p) for b in ("torch", "onnxruntime")
                                                               for p in ("fp32", "fp16", "int8", "bf16")]
    assert rows["torch", "int8"].status == "skipped" and "runs FP32" in rows["torch", "int8"].reason
    assert rows["onnxruntime", "bf16"].status == "skipped" and "no bf16" in rows["onnxruntime", "bf16"].reason
    for precision in ("fp32", "fp16", "int8"):
        row = rows["onnxruntime", precision]
        assert row.status == "ok" and row.executed_precision == precision and row.parity["ok"] is True
        assert row.parity["against"] == "transformers" and row.speedup_vs_torch
    assert rows["onnxruntime", "fp16"].artifact_reused and rows["onnxruntime", "int8"].artifact_reused
    assert set(rows["onnxruntime", "int8"].parity["agreement"]) == {"pooler_cosine", "patch_cosine",
                                                                     "patch_cosine_min"}
    assert "agreement" not in rows["onnxruntime", "fp32"].parity  # FP32: the exporter's 1e-4 tolerance
    from deimv2_deploy.benchmarks.report import to_markdown

    assert "pooler_cosine" in to_markdown(result, "t") and "fp16" in to_markdown(result, "t")


@pytest.mark.slow  # exports the FP32 and INT8 (NNCF) IRs: ~30 s on a busy 2-core machine
def test_bench_rows_per_backend_and_precision(made, onnx_exports):
    from deimv2_deploy.benchmarks import BenchConfig, run_benchmark

    config = BenchConfig(vit=str(made["dino"]), checkpoint_dir=str(made["root"]), calibration=str(made["calib"]),
                         backends=("torch", "onnxruntime", "openvino"), precisions=("fp32", "fp16", "int8", "bf16"),
                         warmup=1, iters=2, threads=1, progress=False, command="pytest")
    assert config.store == made["store"]  # the exports above are reused
    rows = {(r.backend, r.precision): r for r in run_benchmark(config).rows}
    assert rows["torch", "fp32"].status == "ok"
    for precision in ("fp16", "int8", "bf16"):
        assert rows["torch", precision].status == "skipped" and "FP32" in rows["torch", precision].reason
    assert rows["onnxruntime", "bf16"].status == "skipped" and "no bf16" in rows["onnxruntime", "bf16"].reason
    expected = {("onnxruntime", "fp32"): "fp32", ("onnxruntime", "fp16"): "fp16", ("onnxruntime", "int8"): "int8",
                ("openvino", "fp32"): "fp32", ("openvino", "fp16"): _executed_here("fp16"),
                ("openvino", "int8"): _executed_here("int8"), ("openvino", "bf16"): _executed_here("fp32")}
    for key, executed in expected.items():
        row = rows[key]
        assert row.status == "ok", (key, row.reason)
        assert row.executed_precision == executed, key
        assert row.latency.count == 2 and row.parity["against"] == "transformers" and row.parity["ok"] is True, key
        # held to the agreement limits unless an FP32 artifact ran in f32 (then the 1e-4 tolerance)
        assert ("agreement" in row.parity) == (key[1] in ("fp16", "int8") or executed != "fp32"), key
    assert rows["onnxruntime", "int8"].artifact_reused is True  # the module's export, by weights digest
    assert any("INT8 (Q/DQ) calibrated on 4 images" in n for n in rows["onnxruntime", "int8"].notes)
    assert rows["onnxruntime", "fp32"].parity["max_abs_diff"] < 1e-3


def test_bench_of_a_reduced_artifact_runs_its_own_precision(onnx_exports, tmp_path):
    from deimv2_deploy.benchmarks import BenchConfig, run_benchmark

    path = onnx_exports["dinov3", "int8"].path
    base = dict(vit=str(path), checkpoint_dir=str(tmp_path), backends=("onnxruntime", "openvino"), warmup=1, iters=2,
                threads=1, progress=False, command="pytest")
    ort_row, ov_row = run_benchmark(BenchConfig(**base)).rows  # no --precision: the artifact's own
    assert ort_row.precision == ov_row.precision == "int8" and ort_row.status == ov_row.status == "ok"
    assert ort_row.parity["ok"] is None and "reference" in ort_row.parity["detail"]
    assert ov_row.parity["against"] == "onnxruntime int8" and ov_row.parity["ok"] is True
    assert ov_row.parity["limits_of"] == "int8" and ov_row.parity["agreement"]["pooler_cosine"] > 0.95
    [row] = run_benchmark(BenchConfig(**{**base, "backends": ("onnxruntime",), "precisions": ("fp16",)})).rows
    assert row.status == "skipped" and "is a int8 artifact, this row needs fp16" in row.reason
