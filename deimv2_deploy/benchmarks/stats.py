"""Latency statistics over every timed call: nothing is trimmed, no "fastest N".

Samples are integer nanoseconds from `time.perf_counter_ns` (monotonic); statistics are in milliseconds.
Percentiles interpolate linearly between order statistics (numpy's default "linear" method), written out
here so the tests can check them against numpy independently. `std` is the sample standard deviation
(ddof=1; 0 for a single sample).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["LatencyStats", "summarize", "percentile", "fps_from_mean", "throughput_from_mean"]

NS_PER_MS = 1_000_000


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation between neighbours."""
    n = len(sorted_values)
    if n == 0:
        raise ValueError("percentile of no samples")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must lie in 0..100, got {q}")
    position = (n - 1) * q / 100.0  # fractional rank
    lower = math.floor(position)
    upper = min(lower + 1, n - 1)
    weight = position - lower
    return float(sorted_values[lower]) + (float(sorted_values[upper]) - float(sorted_values[lower])) * weight


@dataclass(frozen=True)
class LatencyStats:
    """Summary of `count` timed calls, in milliseconds."""

    count: int
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float
    total_s: float  # sum of the timed calls (not wall time: gaps between calls are not included)

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def summarize(samples_ns: Sequence[int]) -> LatencyStats:
    """Statistics of every sample (no trimming: slow outliers count in mean, std, p99 and max)."""
    if len(samples_ns) == 0:
        raise ValueError("no timed samples: run at least one iteration")
    ms = sorted(s / NS_PER_MS for s in samples_ns)
    n = len(ms)
    total = math.fsum(ms)
    mean = total / n
    var = math.fsum((x - mean) ** 2 for x in ms) / (n - 1) if n > 1 else 0.0
    return LatencyStats(
        count=n,
        mean=mean,
        std=math.sqrt(var),
        min=ms[0],
        p50=percentile(ms, 50),
        p90=percentile(ms, 90),
        p99=percentile(ms, 99),
        max=ms[-1],
        total_s=total / 1000.0,
    )


def fps_from_mean(mean_ms: float) -> float:
    """Calls per second at this mean latency (frames per second at batch 1)."""
    return 1000.0 / mean_ms if mean_ms > 0 else float("inf")


def throughput_from_mean(mean_ms: float, batch: int) -> float:
    """Images per second when each call processes `batch` images."""
    return batch * fps_from_mean(mean_ms)
