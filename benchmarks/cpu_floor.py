"""How far issue 10's speed targets are from this CPU's FP32 arithmetic limit.

    .venv/bin/python benchmarks/cpu_floor.py --speed benchmarks/cpu_speed.json --out benchmarks/cpu_floor.md

A target is a ratio against PyTorch eager measured in the same run, so on this machine it asks for an
end-to-end latency of `eager mean / target ratio` (eager and ours from the interleaved deimv2-bench run in
--speed). No FP32 graph can run faster than its FLOPs divided by the best FP32 rate the two threads reach
(a large matrix product through torch, the best of a few calls: the most favourable case, with perfect
threading and no memory traffic). The table puts the two side by side: where the target latency is below that
floor, it cannot be met in FP32 on this CPU by any graph work; only fewer FLOPs or lower precision could.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_profile import SIZES, model_gflops, write_report  # noqa: E402  (same FLOP count as the per-layer profile)

# Issue 10's target speed-ups over PyTorch eager (2 threads, batch 1, FP32, end to end).
TARGET_SPEEDUP = {"atto": 6.1, "femto": 6.8, "pico": 5.8, "n": 4.1, "s": 2.4, "m": 2.0, "l": 3.2, "x": 2.9}


def two_thread_peak(n: int = 2048, calls: int = 8) -> float:
    """Best wall-clock FP32 GFLOP/s of an n^3 matrix product on 2 threads."""
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def speed_rows(path: Path) -> dict[str, dict[str, float]]:
    """Per size: eager mean and our best end-to-end mean (ms) from a deimv2-bench JSON."""
    data = json.loads(path.read_text())
    out: dict[str, dict[str, float]] = {}
    for row in data["rows"]:
        if row["status"] != "ok" or row["precision"] != "fp32":
            continue
        entry = out.setdefault(row["size"], {})
        mean = row["latency_ms"]["mean"]
        if row["backend"] == "torch":
            entry["eager"] = mean
        elif row["backend"] in ("onnxruntime", "openvino"):
            if mean < entry.get("ours", float("inf")):
                entry["ours"], entry["ours_backend"] = mean, row["backend"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speed", default="benchmarks/cpu_speed.json", help="interleaved deimv2-bench JSON")
    p.add_argument("--sizes", nargs="+", default=["all"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    from deimv2_deploy.models.reference import load_reference

    speed = speed_rows(Path(args.speed))
    sizes = [s for s in (SIZES if args.sizes == ["all"] else args.sizes) if s in speed]
    peak = two_thread_peak()
    command = argv if argv is not None else sys.argv[1:]
    lines = ["# Issue 10's targets against this CPU's FP32 limit (2 threads)", "",
             f"Command: `.venv/bin/python benchmarks/cpu_floor.py {' '.join(command)}`. "
             f"Eager and ours: `{args.speed}` (one interleaved run). FP32 limit of the two threads: {peak:.0f} GFLOP/s "
             "(2048^3 matrix product, torch, best of 8).", "",
             "| size | GFLOP | eager ms | target | target ms | FP32 floor ms | target needs | ours ms | ours runs at |",
             "|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        torch.set_num_threads(1)
        model, _, _ = load_reference(size, random_weights=True)
        gflop = model_gflops(model, size)["total"]
        del model
        row = speed[size]
        target_ms = row["eager"] / TARGET_SPEEDUP[size]
        floor_ms = 1000 * gflop / peak
        lines.append(f"| {size} | {gflop:.1f} | {row['eager']:.1f} | {TARGET_SPEEDUP[size]}x | {target_ms:.1f} | "
                     f"{floor_ms:.1f} | {100 * floor_ms / target_ms:.0f}% of peak | {row['ours']:.1f} "
                     f"({row['ours_backend']}) | {100 * floor_ms / row['ours']:.0f}% of peak |")
        print(lines[-1], flush=True)
    lines += ["", "`target needs`: the share of the two threads' FP32 peak a graph would have to sustain, end to end "
              "(preprocessing and postprocessing included), to meet the target. Above 100%, the target is out of reach "
              "of FP32 arithmetic on this CPU. `ours runs at`: the same share for our measured end-to-end latency."]
    return write_report(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
