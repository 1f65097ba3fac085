"""deimv2-bench: statistics, no trimming of slow calls, report schema and files, skips with reasons, CLI errors.

Timing assertions use synthetic sleeps and only lower bounds (a sleep can overrun on a busy machine, never
undershoot); nothing here passes or fails on how fast a real model runs.
"""
from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest

from deimv2_deploy.benchmarks import BenchConfig, run_benchmark, summarize, time_calls
from deimv2_deploy.benchmarks.harness import SCHEMA_VERSION, BenchResult
from deimv2_deploy.benchmarks.report import (
    CSV_FIELDS,
    load_json,
    to_markdown,
    write_csv,
    write_json,
    write_markdown,
    write_plot,
)
from deimv2_deploy.benchmarks.stats import percentile
from deimv2_deploy.benchmarks.sysinfo import system_fingerprint
from deimv2_deploy.cli.bench import main as bench_main
from deimv2_deploy.runtimes.base import Backend, Runtime
from deimv2_deploy.spec import ArtifactSpec

K = 10  # detections per image of the fake backends


class FakeRuntime(Runtime):
    """Sleeps `fast_s` per call, `slow_s` on every `slow_every`-th call (counting from 1, warm-up included)."""

    backend = Backend.ONNXRUNTIME

    def __init__(self, fast_s: float = 0.001, slow_s: float = 0.05, slow_every: int = 0, box_shift: float = 0.0):
        super().__init__(ArtifactSpec.for_variant("atto", random_weights=True, weights="fake"), "cpu")
        self.fast_s, self.slow_s, self.slow_every, self.box_shift = fast_s, slow_s, slow_every, box_shift
        self.calls = 0

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def version(cls) -> str:
        return "fake-1.0"

    def _infer(self, inputs):
        self.calls += 1
        slow = self.slow_every and self.calls % self.slow_every == 0
        time.sleep(self.slow_s if slow else self.fast_s)
        n = inputs["images"].shape[0]
        boxes = np.tile(np.arange(K * 4, dtype=np.float32).reshape(1, K, 4) * 3, (n, 1, 1)) + self.box_shift
        scores = np.tile(np.linspace(0.9, 0.1, K, dtype=np.float32), (n, 1))
        return {"labels": np.tile(np.arange(K, dtype=np.int64), (n, 1)), "boxes": boxes, "scores": scores}


def fake_loaders(**fakes):
    return {name: (lambda key, config, kw=kw: FakeRuntime(**kw)) for name, kw in fakes.items()}


def fake_config(**overrides) -> BenchConfig:
    base = dict(sizes=("atto",), backends=("torch", "fake"), warmup=1, iters=20, progress=False, random_weights=True,
                command="pytest")
    base.update(overrides)
    return BenchConfig(**base)


@pytest.fixture(scope="module")
def fake_result() -> BenchResult:
    """torch (fast fake) and 'fake' (slow every 5th call, boxes shifted by 1e-3 px), 20 timed calls each."""
    loaders = fake_loaders(torch={}, fake={"slow_every": 5, "box_shift": 1e-3})
    return run_benchmark(fake_config(), loaders=loaders)


# --- statistics ------------------------------------------------------------------------------------------
def test_statistics_match_numpy_on_a_known_series():
    rng = np.random.default_rng(3)
    samples_ns = [int(x) for x in rng.integers(900_000, 1_200_000, 997)] + [50_000_000, 75_000_000, 120_000_000]
    stats = summarize(samples_ns)
    ms = np.asarray(samples_ns, dtype=np.float64) / 1e6
    assert stats.count == 1000
    assert stats.mean == pytest.approx(ms.mean(), rel=1e-12)
    assert stats.std == pytest.approx(ms.std(ddof=1), rel=1e-9)
    assert stats.min == pytest.approx(ms.min()) and stats.max == pytest.approx(120.0)
    for q, value in ((50, stats.p50), (90, stats.p90), (99, stats.p99)):
        assert value == pytest.approx(np.percentile(ms, q), rel=1e-12), q
    assert stats.total_s == pytest.approx(ms.sum() / 1000)
    # the three slow calls move the mean by ~0.24 ms: they were not dropped
    assert stats.mean > np.mean(np.sort(ms)[:-3]) + 0.2


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 101])
def test_percentile_interpolates_like_numpy(n):
    values = sorted(np.random.default_rng(n).normal(10, 3, n).tolist())
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-12)


def test_statistics_reject_empty_input():
    with pytest.raises(ValueError, match="no timed samples"):
        summarize([])
    with pytest.raises(ValueError, match="0..100"):
        percentile([1.0], 101)


def test_time_calls_keeps_every_call_and_times_the_first_alone():
    runtime = FakeRuntime(slow_every=4)
    inputs = runtime.prepare(np.zeros((48, 64, 3), np.uint8)).as_inputs()
    timing = time_calls(lambda: runtime.infer(inputs), warmup=3, iters=12)
    assert runtime.calls == 15  # 3 warm-up (the first is first_ns) + 12 timed
    assert len(timing.samples_ns) == 12 and timing.warmup == 3
    # calls 1..3 warm up, 4..15 are timed; calls 4, 8 and 12 sleep 50 ms and must all be in the samples
    slow = [s for s in timing.samples_ns if s >= 50_000_000]
    assert len(slow) >= 3
    with pytest.raises(ValueError, match="exactly one"):
        time_calls(lambda: None, warmup=1, iters=3, seconds=1.0)


def test_seconds_mode_runs_at_least_three_calls():
    runtime = FakeRuntime(fast_s=0.0)
    inputs = runtime.prepare(np.zeros((32, 32, 3), np.uint8)).as_inputs()
    timing = time_calls(lambda: runtime.infer(inputs), warmup=1, seconds=1e-6)
    assert len(timing.samples_ns) >= 3


# --- the harness on fake backends -------------------------------------------------------------------------
def test_slow_calls_show_up_in_mean_p99_and_max(fake_result):
    slow = next(r for r in fake_result.rows if r.backend == "fake")
    fast = next(r for r in fake_result.rows if r.backend == "torch")
    assert slow.status == "ok" and slow.latency.count == 20 and slow.warmup == 1
    # timed calls are 2..21: calls 5, 10, 15, 20 sleep 50 ms -> 4 slow samples among 20
    assert sum(s >= 50.0 for s in slow.samples_ms) >= 4
    assert slow.latency.max >= 50.0
    assert slow.latency.p99 >= 40.0  # interpolates between the two largest: both slow
    assert slow.latency.mean >= (16 * 1.0 + 4 * 50.0) / 20  # a trimmed mean would be ~1 ms
    assert slow.latency.mean == pytest.approx(np.mean(slow.samples_ms), rel=1e-3)
    assert slow.speedup_vs_torch == pytest.approx(fast.latency.mean / slow.latency.mean)
    assert fast.speedup_vs_torch == pytest.approx(1.0)
    assert slow.fps == pytest.approx(1000 / slow.latency.mean) and slow.throughput == pytest.approx(slow.fps)


def test_parity_is_reported_against_torch(fake_result):
    slow = next(r for r in fake_result.rows if r.backend == "fake")
    assert slow.parity["against"] == "torch"
    assert slow.parity["matched_fraction"] == 1.0 and slow.parity["ok"] is True
    assert slow.parity["max_box_diff"] == pytest.approx(1e-3, rel=1e-2)
    # boxes 1 px off are beyond the FP32 tolerance (0.01 px): reported as mismatched, not hidden
    far = run_benchmark(fake_config(iters=3), loaders=fake_loaders(torch={}, fake={"box_shift": 1.0}))
    row = next(r for r in far.rows if r.backend == "fake")
    assert row.parity["ok"] is False and row.parity["matched_fraction"] == 0.0


def test_batch_rows_report_throughput_not_fps():
    result = run_benchmark(fake_config(backends=("fake",), batches=(1, 3), iters=3, parity=False),
                           loaders=fake_loaders(fake={}))
    one, three = result.rows
    assert (one.batch, three.batch) == (1, 3)
    assert three.fps is None and three.throughput == pytest.approx(3 * 1000 / three.latency.mean)


def test_end_to_end_mode_times_each_stage():
    result = run_benchmark(fake_config(mode="end-to-end", iters=4),
                           loaders=fake_loaders(torch={}, fake={"fast_s": 0.002}))
    row = result.rows[1]
    assert row.status == "ok", row.reason
    assert row.parity["matched_fraction"] == 1.0  # checked on the exact parity input, not the JPEG round trip
    assert set(row.stages) == {"read", "preprocess", "infer", "postprocess"}
    assert all(s.count == 4 for s in row.stages.values())
    assert row.stages["infer"].mean >= 2.0
    assert row.latency.mean >= sum(s.mean for s in row.stages.values()) * 0.999


def test_json_schema_is_stable(fake_result, tmp_path):
    data = json.loads(write_json(fake_result, tmp_path / "r.json").read_text())
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert set(data) == {"schema_version", "tool", "created_utc", "elapsed_s", "command", "config", "system", "rows"}
    assert set(data["config"]) == {"sizes", "backends", "precisions", "device", "batches", "threads", "warmup",
                                   "iters", "seconds", "mode", "video", "random_weights", "checkpoint_dir",
                                   "calibration", "parity", "interleave"}
    assert {"cpu", "threads", "gpus", "libraries", "os", "python", "command", "load_average"} <= set(data["system"])
    row_keys = {"size", "backend", "precision", "batch", "mode", "tier", "device", "device_name", "threads", "status",
                "reason", "artifact", "artifact_reused", "prepare_s", "backend_version", "weights", "random_weights",
                "load_s", "first_ms", "warmup", "iters", "latency_ms", "fps", "throughput_ips", "rss_mb",
                "peak_rss_mb", "load_1m", "speedup_vs_torch", "parity", "stages_ms", "notes", "samples_ms",
                "executed_precision"}
    for row in data["rows"]:
        assert set(row) == row_keys
        assert set(row["latency_ms"]) == {"count", "mean", "std", "min", "p50", "p90", "p99", "max", "total_s"}
        assert row["tier"] == "CPU" and row["device"] == "cpu" and row["device_name"]
        assert len(row["samples_ms"]) == row["iters"] == 20
    parity = data["rows"][1]["parity"]
    assert {"against", "ok", "matched_fraction", "max_box_diff", "max_score_diff"} <= set(parity)
    assert load_json(tmp_path / "r.json")["rows"][1]["backend"] == "fake"


def test_unavailable_backends_are_listed_with_their_reason():
    config = BenchConfig(sizes=("atto",), backends=("tensorrt", "onnxruntime"), precisions=("int8",), device="cpu",
                         iters=3, warmup=1, progress=False, random_weights=True, command="pytest")
    result = run_benchmark(config)
    by_backend = {r.backend: r for r in result.rows}
    assert by_backend["tensorrt"].status == "skipped"
    assert "TensorRT" in by_backend["tensorrt"].reason and "GPU" in by_backend["tensorrt"].reason
    assert by_backend["onnxruntime"].status == "skipped" and "INT8" in by_backend["onnxruntime"].reason
    text = to_markdown(result)
    assert "TensorRT runs only on NVIDIA GPUs" in text and "| skipped |" in text


def test_markdown_and_csv_are_written_and_parse(fake_result, tmp_path):
    md = write_markdown(fake_result, tmp_path / "r.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    header, rule, *rows = table
    ncols = header.count("|")
    assert rule.count("|") == ncols and all(line.count("|") == ncols for line in rows)
    assert len(rows) == len(fake_result.rows)
    assert "AMD" in md or "CPU:" in md  # the fingerprint is in the report
    assert "Command: `pytest`" in md
    with open(write_csv(fake_result, tmp_path / "r.csv"), newline="") as f:
        reader = csv.DictReader(f)
        lines = list(reader)
    assert tuple(reader.fieldnames) == CSV_FIELDS
    assert [line["backend"] for line in lines] == ["torch", "fake"]
    for line, row in zip(lines, fake_result.rows, strict=True):
        assert float(line["mean_ms"]) == pytest.approx(row.latency.mean)
        assert float(line["p99_ms"]) == pytest.approx(row.latency.p99)
        assert line["tier"] == "CPU" and int(line["schema_version"]) == 1


def test_plot_is_written(fake_result, tmp_path):
    path = write_plot(fake_result, tmp_path / "r.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fingerprint_names_cpu_flags_and_libraries():
    info = system_fingerprint(threads=2, command="x")
    assert info["threads"] == 2 and info["command"] == "x"
    assert info["cpu"]["logical_cores"] >= 1 and info["cpu"]["model"]
    assert info["libraries"]["numpy"] == np.__version__
    if info["cpu"]["isa"]:  # x86 Linux: the flags that matter are reported either way
        assert {"AVX2", "AVX-512F", "AVX-512 VNNI", "AMX"} <= set(info["cpu"]["isa"])


# --- configuration and CLI errors --------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(iters=5, seconds=1.0), "either --iters or --seconds"),
    (dict(sizes=("huge",)), "unknown DEIMv2 size 'huge'"),
    (dict(precisions=("int4",)), "unknown precision 'int4'"),
    (dict(warmup=0), "--warmup must be at least 1"),
    (dict(mode="video"), "--video PATH"),
    (dict(device="tpu"), "device must be"),
    (dict(batches=(0,)), "batch sizes must be positive"),
])
def test_config_errors_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BenchConfig(**kwargs)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        run_benchmark(BenchConfig(backends=("nope",), progress=False))


def test_cli_errors(capsys):
    with pytest.raises(SystemExit) as e:
        bench_main(["--iters", "3", "--seconds", "2"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert bench_main(["--sizes", "atto,giant"]) == 1
    assert "unknown DEIMv2 size 'giant'" in capsys.readouterr().err
    assert bench_main(["--backends", "tensorflow"]) == 1
    assert "unknown backend 'tensorflow'" in capsys.readouterr().err


def test_cli_writes_every_report_for_skipped_rows(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = bench_main(["--sizes", "atto", "--backends", "tensorrt", "--iters", "3", "--random-weights", "--quiet",
                     "--output", str(out), "--markdown", str(tmp_path / "r.md"), "--csv", str(tmp_path / "r.csv"),
                     "--plot", str(tmp_path / "r.png")])
    assert rc == 0
    captured = capsys.readouterr()
    assert "| skipped |" in captured.out and "no row was timed" in captured.err
    data = load_json(out)
    assert data["command"].startswith("deimv2-bench --sizes atto --backends tensorrt")
    assert data["rows"][0]["status"] == "skipped" and "TensorRT" in data["rows"][0]["reason"]
    assert (tmp_path / "r.md").exists() and (tmp_path / "r.csv").exists() and not (tmp_path / "r.png").exists()


# --- a real artifact (exported once per session by conftest) ------------------------------------------------
def test_real_atto_rows_reuse_the_store_and_match_torch(atto_onnx):
    store = atto_onnx.path.parent
    config = BenchConfig(sizes=("atto",), backends=("torch", "onnxruntime"), warmup=1, iters=3, threads=1,
                         random_weights=True, checkpoint_dir=str(store), progress=False, command="pytest")
    result = run_benchmark(config)
    torch_row, ort_row = result.rows
    assert torch_row.status == "ok", torch_row.reason
    assert ort_row.status == "ok", ort_row.reason
    assert ort_row.artifact == str(atto_onnx.path) and ort_row.artifact_reused is True
    assert ort_row.parity["ok"] is True and ort_row.parity["matched_fraction"] >= 0.98
    assert ort_row.parity["max_box_diff"] <= 1e-2
    assert ort_row.speedup_vs_torch == pytest.approx(torch_row.latency.mean / ort_row.latency.mean)
    assert ort_row.load_s > 0 and ort_row.first_ms > 0 and ort_row.peak_rss_mb > 0
    e2e = run_benchmark(BenchConfig(sizes=("atto",), backends=("onnxruntime",), mode="end-to-end", warmup=1, iters=2,
                                    threads=1, random_weights=True, checkpoint_dir=str(store), parity=False,
                                    progress=False))
    row = e2e.rows[0]
    assert row.status == "ok", row.reason
    assert set(row.stages) == {"read", "preprocess", "infer", "postprocess"} and row.stages["infer"].mean > 0


def test_video_mode_times_frames_of_a_file(tmp_path):
    import cv2

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 64))
    if not writer.isOpened():
        pytest.skip("OpenCV here cannot write MJPG .avi files")
    for i in range(12):
        writer.write(np.full((64, 96, 3), i * 20, np.uint8))
    writer.release()
    result = run_benchmark(fake_config(backends=("fake",), mode="video", video=str(path), warmup=2, iters=5,
                                       parity=False), loaders=fake_loaders(fake={"fast_s": 0.001}))
    row = result.rows[0]
    assert row.status == "ok", row.reason
    assert row.latency.count == 5 and row.warmup == 2 and row.mode == "video"
    # a clip shorter than warm-up + iters: timed what it had, and says so through the count
    short = run_benchmark(fake_config(backends=("fake",), mode="video", video=str(path), warmup=2, iters=50,
                                      parity=False), loaders=fake_loaders(fake={}))
    assert short.rows[0].status == "ok" and short.rows[0].latency.count == 12 - 2


def test_a_new_kind_of_row_is_one_table_entry(atto_onnx, monkeypatch):
    """backend x precision x format: here ONNX Runtime on the store's FP32 ONNX with basic graph optimisation, as
    a precision of its own; nothing but the entry in ROW_KINDS is added."""
    from deimv2_deploy.benchmarks import artifacts

    entry = artifacts.RowKind("onnxruntime", artifacts.ONNX, artifact_precision="fp32",
                              options={"optimization": "basic"}, notes=("basic graph optimisation",))
    monkeypatch.setitem(artifacts.ROW_KINDS, ("onnxruntime", "fp32-basic"), entry)
    config = BenchConfig(sizes=("atto",), backends=("torch", "onnxruntime"), precisions=("fp32", "fp32-basic"),
                         warmup=1, iters=2, threads=1, random_weights=True, checkpoint_dir=str(atto_onnx.path.parent),
                         progress=False, command="pytest")
    rows = {(r.backend, r.precision): r for r in run_benchmark(config).rows}
    row = rows[("onnxruntime", "fp32-basic")]
    assert row.status == "ok", row.reason
    assert row.artifact == str(atto_onnx.path) and row.artifact_reused  # the FP32 file, found in the store
    assert "basic graph optimisation" in row.notes and row.parity["ok"], row.parity
    assert rows[("torch", "fp32-basic")].status == "skipped"  # no such kind of torch row: says so
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        BenchConfig(precisions=("fp8",))
