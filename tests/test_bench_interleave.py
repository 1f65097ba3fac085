"""deimv2-bench additions for side-by-side speed comparisons: interleaved rows, predict mode, official baselines.

Fake runtimes that sleep; assertions on call counts, order and lower bounds only (never on how fast anything is).
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from deimv2_deploy.benchmarks import BenchConfig, run_benchmark
from deimv2_deploy.benchmarks.harness import OFFICIAL_BACKENDS, time_round_robin
from deimv2_deploy.cli.bench import parse_backends
from deimv2_deploy.runtimes.base import Backend, Runtime
from deimv2_deploy.spec import ArtifactSpec

K = 10


class CountingRuntime(Runtime):
    """Sleeps `sleep_s` per graph call and records the order of calls (shared `log`) and of predicts."""

    backend = Backend.ONNXRUNTIME

    def __init__(self, name: str, log: list[str], sleep_s: float = 0.001):
        super().__init__(ArtifactSpec.for_variant("atto", random_weights=True, weights="fake"), "cpu")
        self.name, self.log, self.sleep_s = name, log, sleep_s
        self.predicts = 0

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def version(cls) -> str:
        return "fake-1.0"

    def predict(self, images, score_threshold=0.0, color="bgr"):
        self.predicts += 1
        return super().predict(images, score_threshold, color)

    def _infer(self, inputs):
        self.log.append(self.name)
        time.sleep(self.sleep_s)
        n = inputs["images"].shape[0]
        boxes = np.tile(np.arange(K * 4, dtype=np.float32).reshape(1, K, 4) * 3, (n, 1, 1))
        scores = np.tile(np.linspace(0.9, 0.1, K, dtype=np.float32), (n, 1))
        return {"labels": np.tile(np.arange(K, dtype=np.int64), (n, 1)), "boxes": boxes, "scores": scores}


def _loaders(log, runtimes, **sleeps):
    def make(name, sleep_s):
        def load(key, config):
            runtimes[name] = CountingRuntime(name, log, sleep_s)
            return runtimes[name]
        return load
    return {name: make(name, s) for name, s in sleeps.items()}


def test_round_robin_takes_turns_and_keeps_every_call():
    order = []
    calls = {k: ((lambda k=k: order.append(k)), False) for k in "abc"}
    timings = time_round_robin(calls, warmup=2, iters=5)
    # warm-up per call first (first call timed alone), then 5 rounds of a, b, c in turn
    assert order == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 5
    assert all(len(t.samples_ns) == 5 and t.warmup == 2 and t.first_ns > 0 for t in timings.values())


def test_round_robin_drops_a_failing_call_and_reports_it():
    def broken():
        raise RuntimeError("boom")

    timings = time_round_robin({"ok": ((lambda: None), False), "bad": (broken, False)}, warmup=1, iters=3)
    assert isinstance(timings["bad"], RuntimeError) and len(timings["ok"].samples_ns) == 3
    with pytest.raises(ValueError, match="exactly one"):
        time_round_robin({}, warmup=1)


def test_interleaved_rows_of_a_size_take_turns():
    log, runtimes = [], {}
    config = BenchConfig(sizes=("atto",), backends=("torch", "fast", "slow"), warmup=1, iters=6, progress=False,
                         random_weights=True, command="pytest", interleave=True)
    result = run_benchmark(config, loaders=_loaders(log, runtimes, torch=0.001, fast=0.001, slow=0.004))
    assert [r.backend for r in result.rows] == ["torch", "fast", "slow"]
    assert all(r.status == "ok" and r.latency.count == 6 for r in result.rows)
    timed = [name for name in log if name != "torch"][2:]  # after each one's first (warm-up) call
    assert timed[:12] == ["fast", "slow"] * 6  # alternating, not one row after the other
    slow, fast = result.rows[2], result.rows[1]
    assert slow.latency.min >= 4.0 and slow.speedup_vs_torch < fast.speedup_vs_torch
    assert result.to_dict()["config"]["interleave"] is True


def test_predict_mode_times_our_runtimes_end_to_end_and_baselines_graph_only():
    log, runtimes = [], {}
    config = BenchConfig(sizes=("atto",), backends=("torch", "ours"), warmup=1, iters=3, progress=False,
                         random_weights=True, command="pytest", mode="predict", interleave=True)
    result = run_benchmark(config, loaders=_loaders(log, runtimes, torch=0.001, ours=0.001))
    torch_row, ours_row = result.rows
    assert runtimes["torch"].predicts == 0  # the baseline runs the graph on prepared inputs
    assert runtimes["ours"].predicts == 1 + 3  # warm-up + timed calls through Runtime.predict
    assert any("graph only" in note for note in torch_row.notes) and not ours_row.notes
    assert ours_row.parity["ok"]  # checked on the same prepared input as the reference


def test_official_baselines_are_accepted_by_name():
    assert parse_backends("torch,onnxruntime-official,openvino-official,ov") == (
        "torch", "onnxruntime-official", "openvino-official", "openvino")
    assert set(OFFICIAL_BACKENDS) == {"onnxruntime-official", "openvino-official"}
    with pytest.raises(ValueError):
        parse_backends("onnx-official")
    with pytest.raises(ValueError, match="interleave"):
        BenchConfig(mode="video", video=__file__, interleave=True)


def test_official_onnxruntime_row_runs_the_official_style_export(tmp_path):
    config = BenchConfig(sizes=("atto",), backends=("onnxruntime-official",), warmup=1, iters=2, progress=False,
                         random_weights=True, checkpoint_dir=str(tmp_path), command="pytest", threads=1)
    (row,) = run_benchmark(config).rows
    assert row.status == "ok", row.reason
    assert row.artifact.endswith("deimv2_atto_random_fp32_official.onnx") and row.artifact_reused is False
    assert row.parity["ok"] and any("official-style" in note for note in row.notes)
