"""deimv2-bench: statistics, no trimming of slow calls, report schema and files, skips with reasons, CLI errors.

Timing assertions use synthetic sleeps and only lower bounds (a sleep can overrun on a busy machine, never
undershoot); nothing here passes or fails on how fast a real model runs.
"""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

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
    assert set(data) == {"schema_version", "tool", "created_utc", "elapsed_s", "command", "config", "system",
                         "accuracy", "rows", "choice"}
    assert set(data["config"]) == {"sizes", "backends", "precisions", "device", "batches", "threads", "warmup",
                                   "iters", "seconds", "mode", "video", "random_weights", "checkpoint_dir",
                                   "checkpoint", "calibration", "parity", "interleave", "accuracy", "max_ap_drop",
                                   "vit", "tasks"}
    assert data["accuracy"] is None and data["config"]["accuracy"] is None  # no --accuracy
    assert data["choice"] is None and data["config"]["max_ap_drop"] is None
    assert {"cpu", "threads", "gpus", "libraries", "os", "python", "command", "load_average"} <= set(data["system"])
    row_keys = {"size", "backend", "precision", "batch", "mode", "tier", "device", "device_name", "threads", "status",
                "reason", "artifact", "artifact_reused", "prepare_s", "backend_version", "weights", "random_weights",
                "load_s", "first_ms", "warmup", "iters", "latency_ms", "fps", "throughput_ips", "rss_mb",
                "peak_rss_mb", "load_1m", "speedup_vs_torch", "parity", "stages_ms", "notes", "samples_ms", "accuracy",
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
    config = BenchConfig(sizes=("atto",), backends=("tensorrt", "torch"), precisions=("int8",), device="cpu",
                         iters=3, warmup=1, progress=False, random_weights=True, command="pytest")
    result = run_benchmark(config)
    by_backend = {r.backend: r for r in result.rows}
    assert by_backend["tensorrt"].status == "skipped"
    assert "TensorRT" in by_backend["tensorrt"].reason and "GPU" in by_backend["tensorrt"].reason
    assert by_backend["torch"].status == "skipped" and "INT8" in by_backend["torch"].reason
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


# --- --accuracy: AP beside latency -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def person_dataset(tmp_path_factory):
    """(images, annotations): 3 images with one COCO 'person' each, exactly where the fake backends' best box (label
    0 = person, [0, 3, 6, 9] px) lies. The fakes' other labels have no ground truth, so AP is known in advance."""
    import cv2

    from deimv2_deploy.classes import COCO_CATEGORY_IDS, COCO_CLASSES

    root = tmp_path_factory.mktemp("persons")
    (root / "images").mkdir()
    images, anns = [], []
    for i in range(3):
        cv2.imwrite(str(root / "images" / f"{i}.png"), np.full((64, 64, 3), 40 * i, np.uint8))
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 64, "height": 64})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [0, 3, 6, 6], "area": 36, "iscrowd": 0})
    cats = [{"id": c, "name": n} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True)]
    ann = root / "instances_val.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root / "images", ann


def test_accuracy_columns_show_each_rows_ap(person_dataset, tmp_path):
    """The exact fake box: AP 1.0; shifted by 1 px (IoU 0.53): matched at IoU 0.50 only, so AP 0.1 and AP50 1.0.
    Table, CSV and JSON carry them; random weights say so; a row whose classes are not the dataset's keeps its
    latency and says why it has no AP."""
    images, ann = person_dataset
    loaders = fake_loaders(torch={}, fake={"box_shift": 1.0})
    config = fake_config(iters=3, accuracy_images=str(images), accuracy_annotations=str(ann))
    result = run_benchmark(config, loaders=loaders)
    exact, shifted = (r.accuracy for r in result.rows)
    assert exact["AP"] == pytest.approx(1.0) and exact["AP50"] == pytest.approx(1.0) and exact["images"] == 3
    assert shifted["AP"] == pytest.approx(0.1) and shifted["AP50"] == pytest.approx(1.0)
    assert shifted["random_weights"] is True and shifted["detections"] == 3 * K
    assert result.accuracy["images"] == 3 and result.accuracy["evaluator"]["name"] == "faster-coco-eval"
    md = to_markdown(result)
    header = next(line for line in md.splitlines() if line.startswith("| tier"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[columns.index("img/s") + 1:columns.index("img/s") + 3] == ["AP", "AP50"]
    assert "0.100 (random weights)" in md and "1.000 (random weights)" in md
    assert "Accuracy: COCO bbox AP and AP50 of each row's own runtime on 3 of 3 images" in md
    with open(write_csv(result, tmp_path / "r.csv"), newline="") as f:
        lines = list(csv.DictReader(f))
    assert [float(line["AP"]) for line in lines] == pytest.approx([1.0, 0.1])
    assert lines[1]["AP50"] and lines[1]["accuracy_note"] == "random weights" and lines[1]["accuracy_images"] == "3"
    data = json.loads(write_json(result, tmp_path / "r.json").read_text())
    assert data["rows"][1]["accuracy"]["AP"] == pytest.approx(0.1)
    assert data["config"]["accuracy"] == {"images": str(images), "annotations": str(ann), "max_images": None}
    # the first image only
    one = run_benchmark(fake_config(iters=3, accuracy_images=str(images), accuracy_annotations=str(ann),
                                    max_images=1), loaders=loaders)
    assert [r.accuracy["images"] for r in one.rows] == [1, 1]
    # a dataset of other classes: latency stays, the AP cell says n/a and the note why
    other = json.loads(ann.read_text())
    other["categories"] = [{"id": 1, "name": "widget"}]
    other_ann = tmp_path / "other.json"
    other_ann.write_text(json.dumps(other))
    mismatch = run_benchmark(fake_config(backends=("fake",), iters=3, accuracy_images=str(images),
                                         accuracy_annotations=str(other_ann)), loaders=loaders).rows[0]
    assert mismatch.status == "ok" and mismatch.latency.count == 3
    assert mismatch.accuracy["AP"] is None and "has 80 classes" in mismatch.accuracy["error"]
    assert "no AP: " in to_markdown(run_benchmark(fake_config(backends=("fake",), iters=3,
                                                              accuracy_images=str(images),
                                                              accuracy_annotations=str(other_ann)), loaders=loaders))


def test_accuracy_ap_equals_deimv2_val_on_the_same_artifact(atto_onnx, coco80_from_detections, tmp_path, capsys):
    from deimv2_deploy.cli.val import main as val_main

    root, ann = coco80_from_detections
    out = tmp_path / "bench.json"
    assert bench_main(["--sizes", "atto", "--backends", "torch,onnxruntime", "--iters", "2", "--warmup", "1",
                       "--threads", "1", "--random-weights", "--checkpoint-dir", str(atto_onnx.path.parent),
                       "--accuracy", "--images", str(root / "images"), "--annotations", str(ann), "--max-images",
                       "8", "--output", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    rows = {r["backend"]: r for r in load_json(out)["rows"]}
    assert rows["onnxruntime"]["artifact"] == str(atto_onnx.path) and rows["onnxruntime"]["accuracy"]["images"] == 8
    val_json = tmp_path / "val.json"
    assert val_main([str(atto_onnx.path), "--images", str(root / "images"), "--annotations", str(ann), "--max-images",
                     "8", "--batch", "1", "--json", str(val_json), "--quiet"]) == 0
    val = json.loads(val_json.read_text())
    assert val["AP50"] > 0.2  # a dataset with something to measure
    for key in ("AP", "AP50", "AP75"):
        assert rows["onnxruntime"]["accuracy"][key] == pytest.approx(val[key], abs=1e-9), key
        assert rows["torch"]["accuracy"][key] == pytest.approx(val[key], abs=0.01), key  # PyTorch: FP32 parity
    assert f"{val['AP']:.3f} (random weights)" in table


def test_accuracy_options_and_bad_datasets_are_one_line_errors(person_dataset, tmp_path, capsys):
    images, ann = person_dataset
    out = tmp_path / "r.json"
    base = ["--sizes", "atto", "--backends", "tensorrt", "--iters", "2", "--random-weights", "--quiet",
            "--output", str(out)]
    cases = [
        (["--accuracy"], "--accuracy needs a COCO-format dataset"),
        (["--images", str(images), "--annotations", str(ann)], "--images gives the dataset of --accuracy"),
        (["--accuracy", "--annotations", str(tmp_path / "none.json"), "--images", str(images)],
         "annotation file not found"),
        (["--accuracy", "--data", str(tmp_path)], "holds no 'val' split"),
        (["--max-ap-drop", "0.5"], "--max-ap-drop chooses among rows by their measured AP: add --accuracy"),
        (["--accuracy", "--images", str(images), "--annotations", str(ann), "--max-ap-drop", "-1"],
         "cannot be negative"),
    ]
    for extra, says in cases:
        assert bench_main([*base, *extra]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("deimv2-bench: error: ") and says in err[-1], err
        assert not out.exists()
    with pytest.raises(SystemExit):
        bench_main([*base, "--accuracy", "--data", str(tmp_path), "--max-images", "0"])
    empty = json.loads(ann.read_text()) | {"annotations": []}
    (tmp_path / "empty.json").write_text(json.dumps(empty))
    empty_args = ["--accuracy", "--images", str(images), "--annotations", str(tmp_path / "empty.json")]
    assert bench_main([*base, *empty_args]) == 1
    assert "nothing to measure" in capsys.readouterr().err and not out.exists()


def test_int8_rows_calibrate_on_the_accuracy_dataset(person_dataset, tmp_path):
    """No --calibration: INT8 rows calibrate on the --accuracy dataset's images; --calibration (here its annotation
    file: the images it lists, see test_calibration.py) wins."""
    from deimv2_deploy.benchmarks.artifacts import calibration_folder
    from deimv2_deploy.data.calibration import select_calibration_images

    images, ann = person_dataset
    config = fake_config(accuracy_images=str(images), accuracy_annotations=str(ann))
    assert calibration_folder(config, tmp_path) == str(images)
    assert select_calibration_images(calibration_folder(config, tmp_path), 300) == sorted(images.glob("*.png"))
    assert calibration_folder(fake_config(accuracy_images=str(images), accuracy_annotations=str(ann),
                                          calibration=str(ann)), tmp_path) == str(ann)


def test_a_given_checkpoint_gets_its_own_store_folder(tmp_path):
    """--checkpoint FILE: the weights of that file, exported into a store folder keyed by its digest, so artifacts
    of another checkpoint with the same size and precision are never reused for it."""
    from deimv2_deploy.benchmarks.artifacts import checkpoint_for

    a, b = tmp_path / "model.pth", tmp_path / "other" / "model.pth"
    b.parent.mkdir()
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights b")
    config_a = BenchConfig(sizes=("atto",), checkpoint=str(a), checkpoint_dir=str(tmp_path / "store"))
    config_b = BenchConfig(sizes=("atto",), checkpoint=str(b), checkpoint_dir=str(tmp_path / "store"))
    assert config_a.store.parent == tmp_path / "store" and config_a.store.name.startswith("bench-model-")
    assert config_a.store != config_b.store
    assert checkpoint_for("atto", config_a) == a and config_a.to_dict()["checkpoint"] == str(a)
    with pytest.raises(ValueError, match="one size"):
        BenchConfig(sizes=("atto", "n"), checkpoint=str(a))
    with pytest.raises(ValueError, match="contradict"):
        BenchConfig(sizes=("atto",), checkpoint=str(a), random_weights=True)
    with pytest.raises(FileNotFoundError, match="no such file"):
        BenchConfig(sizes=("atto",), checkpoint=str(tmp_path / "missing.pth"))


# --- --max-ap-drop: the fastest row within an AP budget ------------------------------------------------------------
def _measured(backend, precision, ms, ap, executed=None, batch=1, size="atto", random=False, status="ok"):
    return {"size": size, "backend": backend, "precision": precision, "batch": batch, "status": status,
            "executed_precision": executed, "artifact": f"{backend}-{precision}", "latency_ms": {"mean": ms * batch},
            "accuracy": {"AP": ap, "random_weights": random}}


def test_max_ap_drop_chooses_the_fastest_row_within_the_budget():
    from deimv2_deploy.benchmarks.choice import choose_within_budget

    rows = [_measured("onnxruntime", "fp32", 12.0, 0.530), _measured("openvino", "fp32", 11.0, 0.531),
            _measured("openvino", "auto", 7.0, 0.528, executed="bf16"),  # -0.3 points
            _measured("openvino", "int8", 6.0, 0.520, executed="int8+f32"),  # -1.1 points: fastest, over 0.5
            _measured("onnxruntime", "fp16", 5.0, None),  # no AP (e.g. its evaluation failed): never chosen
            _measured("tensorrt", "fp16", 1.0, 0.6, status="skipped")]
    (entry,) = choose_within_budget(rows, 0.5)
    assert entry["reference"]["backend"] == "openvino" and entry["reference"]["AP"] == 0.531  # best exact FP32
    assert (entry["chosen"]["precision"], entry["chosen"]["executed_precision"]) == ("auto", "bf16")
    assert entry["chosen"]["ap_drop"] == pytest.approx(0.3) and entry["chosen"]["speedup_vs_reference"] == \
        pytest.approx(11 / 7, abs=1e-3)
    assert [(r["precision"], r["ap_drop"]) for r in entry["faster_over_budget"]] == [("int8", pytest.approx(1.1))]
    (loose,) = choose_within_budget(rows, 2.0)
    assert loose["chosen"]["precision"] == "int8" and loose["faster_over_budget"] == []
    (strict,) = choose_within_budget(rows, 0.0)  # nothing may drop: the fastest FP32 (or better) row
    assert strict["chosen"]["backend"] == "openvino" and strict["chosen"]["precision"] == "fp32"
    # an "fp32" row that ran bf16 (stock OpenVINO on AMX) is not the reference; random weights choose nothing
    no_ref = choose_within_budget([_measured("openvino", "fp32", 7.0, 0.5, executed="bf16")], 0.5)
    assert "no FP32 row" in no_ref[0]["error"]
    random = choose_within_budget([_measured("onnxruntime", "fp32", 12.0, 0.01, random=True)], 0.5)
    assert "random weights" in random[0]["error"]
    # per size and batch
    both = choose_within_budget([*rows, _measured("onnxruntime", "fp32", 40.0, 0.6, size="n"),
                                 _measured("onnxruntime", "fp32", 8.0, 0.53, batch=4)], 0.5)
    assert [(e["size"], e["batch"]) for e in both] == [("atto", 1), ("n", 1), ("atto", 4)]
    assert both[2]["chosen"]["ms_per_image"] == pytest.approx(8.0)  # latency per image at batch 4


def test_max_ap_drop_in_the_report(person_dataset):
    """The exact fake row (AP 1.0) is the reference; the shifted one (AP 0.1) is 90 points below it: a budget
    of 95 points takes it where it is faster, 0.5 does not. The report's section says so."""
    from deimv2_deploy.benchmarks.choice import choose_within_budget

    images, ann = person_dataset
    loaders = fake_loaders(torch={}, fake={"box_shift": 1.0})
    result = run_benchmark(fake_config(iters=3, accuracy_images=str(images), accuracy_annotations=str(ann),
                                       max_ap_drop=0.5), loaders=loaders)
    assert result.choice and "random weights" in result.choice[0]["error"]  # the fakes say random weights
    assert "## Fastest within 0.5 AP points of FP32" in to_markdown(result)
    rows = [r.to_dict() for r in result.rows]
    for row in rows:
        row["accuracy"]["random_weights"] = False  # as if trained: the choice itself
    (entry,) = choose_within_budget(rows, 0.5)
    assert entry["reference"]["AP"] == pytest.approx(1.0) and entry["chosen"]["AP"] == pytest.approx(1.0)
    result.choice = [entry]
    md = to_markdown(result)
    assert "**torch fp32**" in md and "equal to FP32's 1.000" in md


def test_onnxruntime_int8_row_runs_the_qdq_export(model_store, example_image_path, tmp_path):
    """The ONNX Runtime INT8 row exports the explicit Q/DQ ONNX (calibrated on --calibration), runs it and says how
    it was calibrated; its parity against PyTorch is reported (INT8 drifts: it is not required to match)."""
    import shutil

    calibration = tmp_path / "calibration"
    calibration.mkdir()
    shutil.copy(example_image_path, calibration / "photo.jpg")
    config = BenchConfig(sizes=("atto",), backends=("onnxruntime",), precisions=("int8",), iters=2, warmup=1,
                         threads=1, progress=False, random_weights=True, checkpoint_dir=str(model_store),
                         calibration=str(calibration), command="pytest")
    (row,) = run_benchmark(config).rows
    assert row.status == "ok", row.reason
    assert row.artifact.endswith(".onnx") and "int8" in Path(row.artifact).name
    assert "INT8 (Q/DQ) calibrated on 1 images: calibration" in row.notes
    assert row.parity is not None and row.latency.count == 2
