"""Timing: every call timed with `time.perf_counter_ns` (GPU work synchronised before each clock read), nothing
discarded; one call after another (`time_calls`) or several taking turns (`time_round_robin`)."""
from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deimv2_deploy.benchmarks.config import MIN_ITERS, BenchRow
from deimv2_deploy.benchmarks.stats import fps_from_mean, summarize, throughput_from_mean
from deimv2_deploy.benchmarks.sysinfo import load_average, tier_of

__all__ = ["Timing", "time_calls", "time_round_robin", "make_sync", "Progress", "memory_mb", "record_timing",
           "record_resources"]


@dataclass
class Timing:
    first_ns: int
    warmup: int  # untimed calls including the first
    samples_ns: list[int]
    output: Any  # what the first call returned (for parity)
    stages_ns: dict[str, list[int]] | None = None


def make_sync(device: str) -> Callable[[], None] | None:
    """torch.cuda.synchronize for CUDA rows, so queued GPU work is inside the timed span."""
    if tier_of(device) != "GPU" or "torch" not in sys.modules:
        return None
    torch = sys.modules["torch"]
    if not torch.cuda.is_available():
        return None
    return torch.cuda.synchronize


def _timed(call: Callable[[], Any], sync: Callable[[], None] | None) -> tuple[int, Any]:
    """(nanoseconds, result) of one call, queued GPU work included (synchronised before and after)."""
    if sync:
        sync()
    t0 = time.perf_counter_ns()
    result = call()
    if sync:
        sync()
    return time.perf_counter_ns() - t0, result


def time_calls(call: Callable[[], Any], *, warmup: int, iters: int | None = None, seconds: float | None = None,
               sync: Callable[[], None] | None = None, progress: Callable[[int, float], None] | None = None,
               staged: bool = False) -> Timing:
    """Time `call()` after `warmup` untimed calls (the first of which is timed alone as first-inference).

    Exactly one of `iters` / `seconds`. With `staged=True`, `call()` returns (output, {stage: ns}) and
    the per-stage times are kept next to the whole-call time. Every timed call is kept.
    """
    if (iters is None) == (seconds is None):
        raise ValueError("give exactly one of iters or seconds")
    clock = time.perf_counter_ns

    def once() -> tuple[int, Any]:
        return _timed(call, sync)

    first_ns, first = once()
    output = first[0] if staged else first
    for _ in range(warmup - 1):
        once()
    samples: list[int] = []
    stages: dict[str, list[int]] = {}
    deadline = None if seconds is None else clock() + int(seconds * 1e9)
    start = clock()
    while True:
        if iters is not None and len(samples) >= iters:
            break
        if deadline is not None and len(samples) >= MIN_ITERS and clock() >= deadline:
            break
        ns, out = once()
        samples.append(ns)
        if staged:
            for name, value in out[1].items():
                stages.setdefault(name, []).append(value)
        if progress:
            progress(len(samples), (clock() - start) / 1e9)
    return Timing(first_ns, warmup, samples, output, stages if staged else None)


class Progress:
    """A tqdm bar over timed calls (count) or over seconds; silent when disabled or tqdm is missing."""

    def __init__(self, label: str, iters: int | None, seconds: float | None, enabled: bool) -> None:
        self.bar = None
        self.by_time = iters is None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        if self.by_time:
            # disable=None: no bar when stderr is not a terminal (logs get the one line per row instead)
            self.bar = tqdm(total=round(float(seconds), 1), desc=label, unit="s", leave=False, file=sys.stderr,
                            disable=None, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s "
                                                     "{postfix}")
        else:
            self.bar = tqdm(total=iters, desc=label, unit="call", leave=False, file=sys.stderr, disable=None)

    def __call__(self, done: int, elapsed: float) -> None:
        if self.bar is None:
            return
        if self.by_time:
            self.bar.set_postfix_str(f"{done} calls", refresh=False)
            self.bar.update(max(0.0, min(elapsed, self.bar.total) - self.bar.n))
        else:
            self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def memory_mb() -> tuple[float | None, float]:
    """(current RSS, process peak RSS) in MiB; both are process-wide, not per row."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20, peak
    except ImportError:
        return None, peak


def time_round_robin(calls: Mapping[Any, tuple[Callable[[], Any], bool]], *, warmup: int, iters: int | None = None,
                     seconds: float | None = None, sync: Callable[[], None] | None = None,
                     progress: Callable[[int, float], None] | None = None) -> dict[Any, Timing | Exception]:
    """`time_calls` for several calls that take turns: every round times each call once, in order.

    `calls` maps a key to (call, staged). With `seconds`, rounds continue until `seconds` per call have passed in
    all (at least MIN_ITERS rounds). A call that raises drops out; its key maps to the exception.
    """
    if (iters is None) == (seconds is None):
        raise ValueError("give exactly one of iters or seconds")
    clock = time.perf_counter_ns
    live = dict(calls)
    out: dict[Any, Timing | Exception] = {}
    first: dict[Any, tuple[int, Any]] = {}
    samples: dict[Any, list[int]] = {k: [] for k in calls}
    stages: dict[Any, dict[str, list[int]]] = {k: {} for k in calls}

    def once(key: Any) -> tuple[int, Any] | None:
        try:
            return _timed(live[key][0], sync)
        except Exception as e:  # noqa: BLE001 - reported in the row
            out[key] = e
            del live[key]
            return None

    for key in list(live):
        done = once(key)
        if done is not None:
            first[key] = done
            for _ in range(warmup - 1):
                if key in live:
                    once(key)
    deadline = None if seconds is None else clock() + int(seconds * 1e9) * max(1, len(live))
    start, rounds = clock(), 0
    while live:
        if iters is not None and rounds >= iters:
            break
        if deadline is not None and rounds >= MIN_ITERS and clock() >= deadline:
            break
        for key in list(live):
            done = once(key)
            if done is None:
                continue
            samples[key].append(done[0])
            if live[key][1]:
                for name, value in done[1][1].items():
                    stages[key].setdefault(name, []).append(value)
        rounds += 1
        if progress:
            progress(rounds, (clock() - start) / 1e9)
    for key in live:
        staged = live[key][1]
        output = first[key][1][0] if staged else first[key][1]
        out[key] = Timing(first[key][0], warmup, samples[key], output, stages[key] if staged else None)
    return out


def record_timing(row: BenchRow, timing: Timing, keep_samples: bool) -> None:
    """A timed row's figures from every timed call: first call, statistics, FPS / throughput, stages, samples."""
    row.first_ms = timing.first_ns / 1e6
    row.warmup = timing.warmup
    row.latency = summarize(timing.samples_ns)
    row.fps = fps_from_mean(row.latency.mean) if row.batch == 1 else None
    row.throughput = throughput_from_mean(row.latency.mean, row.batch)
    if timing.stages_ns:
        row.stages = {name: summarize(values) for name, values in timing.stages_ns.items()}
    if keep_samples:
        row.samples_ms = [round(s / 1e6, 4) for s in timing.samples_ns]


def record_resources(row: BenchRow) -> None:
    """Process memory (current, peak) and the system's 1-minute load average, as the row ends."""
    row.rss_mb, row.peak_rss_mb = memory_mb()
    row.load_1m = (load_average() or [None])[0]
