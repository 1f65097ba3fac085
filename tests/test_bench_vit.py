"""deimv2-bench --vit: EoMT-DINOv3 and DINOv3 rows (tiny transformers-written models) on ONNX Runtime and OpenVINO,
model and predict modes, in the same reports as DEIMv2 rows, with parity; the one-line errors of a bad --vit.

Nothing here depends on how fast the models run: the rows must be timed, reported and agree with their reference.
"""
from __future__ import annotations

import csv
import io
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("openvino")

from vit_helpers import tiny_vit_artifacts  # noqa: E402

from deimv2_deploy.benchmarks import BenchConfig, run_benchmark  # noqa: E402
from deimv2_deploy.benchmarks.report import to_csv, to_markdown  # noqa: E402
from deimv2_deploy.cli.bench import main as bench_main  # noqa: E402


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit_bench")
    return root, tiny_vit_artifacts(root)


def _config(model, store, **kw) -> BenchConfig:
    base = dict(vit=str(model), checkpoint_dir=str(store), warmup=1, iters=3, threads=1, progress=False,
                command="pytest")
    return BenchConfig(**{**base, **kw})


def _check_timed(rows, iters=3):
    for row in rows:
        assert row.status == "ok", (row.backend, row.reason)
        assert row.latency.count == iters and row.latency.mean > 0 and row.first_ms > 0 and row.load_s is not None
        assert row.tier == "CPU" and row.precision == "fp32" and row.executed_precision == "fp32"


@pytest.mark.parametrize("mode", ["model", "predict"])
def test_folder_rows_on_every_backend_match_transformers(vit, tmp_path, mode):
    root, _ = vit
    store = tmp_path / "store"
    result = run_benchmark(_config(root / "eomt", store, mode=mode, batches=(1, 2)))
    assert [(r.size, r.backend, r.batch) for r in result.rows] == [
        ("eomt", b, n) for b in ("torch", "onnxruntime", "openvino") for n in (1, 2)]
    _check_timed(result.rows)
    torch_rows = [r for r in result.rows if r.backend == "torch"]
    assert all("transformers" in r.artifact and r.parity is None for r in torch_rows)
    for row in result.rows[2:]:
        assert row.parity["against"] == "transformers" and row.parity["ok"] is True
        assert 0 <= row.parity["max_abs_diff"] < 1e-3
        assert set(row.parity["outputs"]) == {"class_queries_logits", "masks_queries_logits"}
        assert row.speedup_vs_torch and row.artifact.endswith(".onnx" if row.backend == "onnxruntime" else ".xml")
    assert {r.artifact_reused for r in result.rows[2:]} == {False, True}  # exported once per format, then reused
    if mode == "predict":
        assert all("baseline: graph only" in " ".join(r.notes) for r in torch_rows)
        assert all("predict tasks: semantic, instance" in r.notes for r in result.rows[2:])
    # a second run reuses the store's exports
    again = run_benchmark(_config(root / "eomt", store, backends=("onnxruntime",), iters=2))
    assert again.rows[0].artifact_reused is True and again.rows[0].parity["against"] == "transformers"


@pytest.mark.parametrize("mode", ["model", "predict"])
def test_artifact_rows_compare_with_onnxruntime(vit, tmp_path, mode):
    _, artifacts = vit
    for name in ("eomt", "dino"):
        config = _config(artifacts[name], tmp_path, mode=mode, iters=2,
                         tasks=("semantic", "panoptic") if name == "eomt" and mode == "predict" else ())
        result = run_benchmark(config)
        torch_row, ort_row, ov_row = result.rows
        assert torch_row.status == "skipped" and "transformers folder" in torch_row.reason
        _check_timed([ort_row, ov_row], iters=2)
        assert ort_row.size == ov_row.size == artifacts[name].stem
        assert ort_row.parity["ok"] is None and "reference" in ort_row.parity["detail"]
        assert ov_row.parity["against"] == "onnxruntime" and ov_row.parity["ok"] is True
        assert ov_row.parity["max_abs_diff"] < 1e-3
        assert "OpenVINO reading the ONNX file" in ov_row.notes
        if config.tasks:
            assert "predict tasks: semantic, panoptic" in ov_row.notes


def test_openvino_ir_alone_and_interleaved_rows(vit, tmp_path):
    root, _ = vit
    ir = run_benchmark(_config(root / "dino", tmp_path, backends=("openvino",), iters=2)).rows[0].artifact
    result = run_benchmark(_config(ir, tmp_path, backends=("onnxruntime", "openvino"), iters=2))
    ort_row, ov_row = result.rows
    assert ort_row.status == "skipped" and "OpenVINO IR" in ort_row.reason
    assert ov_row.status == "ok" and "no reference" in ov_row.parity["detail"]
    interleaved = run_benchmark(_config(root / "dino", tmp_path, interleave=True, iters=3, mode="predict"))
    _check_timed(interleaved.rows)
    assert all(r.parity["ok"] for r in interleaved.rows[1:])
    assert "ONNX Runtime spinning off (interleaved rows)" in interleaved.rows[1].notes


def test_reports_carry_the_rows(vit, tmp_path, capsys):
    root, _ = vit
    out, md, csv_path = tmp_path / "r.json", tmp_path / "r.md", tmp_path / "r.csv"
    rc = bench_main(["--vit", str(root / "eomt"), "--checkpoint-dir", str(tmp_path / "store"), "--iters", "2",
                     "--warmup", "1", "--threads", "1", "--mode", "predict", "--task", "instance", "--quiet",
                     "--output", str(out), "--markdown", str(md), "--csv", str(csv_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| model | backend |" in text and "parity (max abs diff vs reference)" in text
    assert "mode predict (EoMT tasks instance)" in text and "AVX2" in text and "Load average" in text
    assert "max abs diff" in text and "vs transformers" in text
    data = json.loads(out.read_text())
    assert data["config"]["vit"] == str(root / "eomt") and data["config"]["tasks"] == ["instance"]
    assert data["config"]["sizes"] == [] and data["system"]["cpu"]["isa"] is not None
    assert [r["backend"] for r in data["rows"]] == ["torch", "onnxruntime", "openvino"]
    assert all(len(r["samples_ms"]) == 2 and r["size"] == "eomt" for r in data["rows"])
    lines = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert [float(line["parity_max_abs_diff"]) < 1e-3 for line in lines[1:]] == [True, True]
    assert lines[0]["parity_max_abs_diff"] == "" and lines[0]["mean_ms"]
    assert md.read_text() == to_markdown(data, f"{root / 'eomt'} latency") and to_csv(data) == csv_path.read_text()


def test_bad_vit_inputs_are_one_line_errors(vit, tmp_path, atto_onnx, capsys):
    root, artifacts = vit

    def error(*argv):
        assert bench_main(["--quiet", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "is a DEIMv2-atto detector artifact" in error("--vit", str(atto_onnx.path))
    assert "--sizes atto" in error("--vit", str(atto_onnx.path))
    (tmp_path / "det").mkdir()
    (tmp_path / "det" / "config.json").write_text(json.dumps({"model_type": "deimv2"}))
    message = error("--vit", str(tmp_path / "det"))
    assert "type 'deimv2'" in message and "without --vit" in message
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert "type 'bert', expected dinov3_vit or eomt_dinov3" in error("--vit", str(tmp_path / "bert"))
    assert "leave --sizes out" in error("--vit", str(root / "eomt"), "--sizes", "atto")
    assert "no such file or folder" in error("--vit", str(tmp_path / "missing.onnx"))
    (tmp_path / "x.pth").write_text("")
    assert "not a .pth file" in error("--vit", str(tmp_path / "x.pth"))
    assert "is DINOv3" in error("--vit", str(artifacts["dino"]), "--mode", "predict", "--task", "semantic")
    assert "add --mode predict" in error("--vit", str(artifacts["eomt"]), "--task", "semantic")
    assert "not an EoMT task" in error("--vit", str(artifacts["eomt"]), "--mode", "predict", "--task", "depth")
    assert "does not record" in error("--vit", str(artifacts["eomt_nostuff"]), "--mode", "predict", "--task",
                                      "panoptic")
    assert "not 'tensorrt'" in error("--vit", str(artifacts["dino"]), "--backends", "tensorrt")
    assert "unknown precision 'fp8'" in error("--vit", str(artifacts["dino"]), "--precision", "fp8")
    assert "--mode model or predict" in error("--vit", str(artifacts["dino"]), "--mode", "end-to-end")
    assert "--random-weights is for DEIMv2 rows" in error("--vit", str(artifacts["dino"]), "--random-weights")
    assert "--plot compares DEIMv2 sizes" in error("--vit", str(artifacts["dino"]), "--plot", "x.png")
    assert "needs --vit" in error("--sizes", "atto", "--task", "semantic")
