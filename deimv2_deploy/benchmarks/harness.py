"""The benchmark run: one row per (size, backend, precision, batch), on one device tier.

The parts: `config` (what to run, the rows and the result), `artifacts` (the table of row kinds: which artifact,
found in or exported to the model store, loaded how), `calls` (what is timed per mode, parity), `timing` (the
clocks); this module runs rows one after another or interleaved and collects the result.

For each row: find or export the artifact in the model store (reusing what is there), load it (load time),
run it once (first-inference latency), warm up, then time every call with `time.perf_counter_ns` (GPU work
synchronised before each clock read) for a fixed count or a fixed duration. Nothing is discarded: the
statistics see every timed call. Each backend's outputs are matched against PyTorch eager on the same
input (order-free, `exporters.parity.match_detections`). Rows that cannot run here are kept with the reason.

Modes:
- "model": `Runtime.infer` on a prepared batch (the graph: model + top-k postprocess).
- "end-to-end": per call, image read/decode, `Runtime.prepare`, `Runtime.infer` and
  `Runtime.detections_from_outputs` (box mapping + Detections), each stage timed separately.
- "video": frames of a video file through `Runtime.stream` (decode + everything above), per-frame latency.
- "predict": `Runtime.predict` on an in-memory 640x480 BGR image (preprocess + graph + detections), against the
  baselines a user has today timed as they run: PyTorch eager and the official-style exports graph-only (the
  official torch_inf.py times `model(images, orig_target_sizes)` on prepared inputs).

Baselines: the pseudo-backends `onnxruntime-official` and `openvino-official` run the ONNX file the official
exporter makes of the same model (`export_official_style_onnx`: plain trace, dynamic batch, no graph work) with
each library's stock settings. `BenchConfig.vit` times one EoMT-DINOv3 / DINOv3 model instead (benchmarks/vit.py:
its rows, artifacts, calls and parity; the timing, statistics and reports are these). With `interleave`, the rows
of one size and batch take turns call by call, so load from other processes hits them alike and their ratios stay
meaningful on a shared machine.
"""
from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from deimv2_deploy.benchmarks.accuracy import AccuracyProbe
from deimv2_deploy.benchmarks.artifacts import (
    PRECISIONS,
    artifact_notes,
    artifact_precision,
    load_row_runtime,
    load_torch_reference,
)
from deimv2_deploy.benchmarks.calls import References, bench_inputs, row_call, row_parity, video_timing
from deimv2_deploy.benchmarks.choice import choose_within_budget
from deimv2_deploy.benchmarks.config import (
    BACKEND_ORDER,
    MODES,
    OFFICIAL_BACKENDS,
    SCHEMA_VERSION,
    BenchConfig,
    BenchResult,
    BenchRow,
    Loader,
    RowKey,
    Skip,
    fail_row,
    rows_from_timings,
)
from deimv2_deploy.benchmarks.sysinfo import (
    command_line,
    cpu_info,
    device_name,
    gpu_info,
    load_average,
    system_fingerprint,
    tier_of,
)
from deimv2_deploy.benchmarks.timing import (
    Progress,
    Timing,
    make_sync,
    record_resources,
    record_timing,
    time_calls,
    time_round_robin,
)
from deimv2_deploy.runtimes.base import Backend, Runtime

__all__ = ["BenchConfig", "BenchRow", "BenchResult", "Skip", "Timing", "RowKey", "run_benchmark", "time_calls",
           "time_round_robin", "load_torch_reference", "MODES", "PRECISIONS", "BACKEND_ORDER", "OFFICIAL_BACKENDS",
           "SCHEMA_VERSION"]


def _open_row(key: RowKey, config: BenchConfig, loaders: Mapping[str, Loader], names: tuple[str, str],
              workdir: Path) -> tuple[BenchRow, Runtime | None]:
    """The row with its runtime loaded, or (skipped/failed row, None)."""
    row = BenchRow(key.size, key.backend, key.precision, key.batch, config.mode, tier_of(config.device),
                   config.device, names[0], config.threads_used)
    runtime = None
    try:
        if key.backend in loaders:
            t0 = time.perf_counter()
            runtime = loaders[key.backend](key, config)
            row.load_s = time.perf_counter() - t0
        else:
            runtime = load_row_runtime(key, config, row, workdir, lambda message: _log(config, message))
        row.backend_version = runtime.version()
        row.weights, row.random_weights = runtime.spec.weights, runtime.spec.random_weights
        row.notes += artifact_notes(runtime.spec)
        if runtime.spec.batch is not None and runtime.spec.batch != key.batch:
            raise Skip(f"{row.artifact} has a fixed batch of {runtime.spec.batch}; export a dynamic-batch artifact")
        return row, runtime
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others; the reason is reported
        _fail(row, e)
        if runtime is not None:
            runtime.close()
        return row, None


_fail = fail_row


def _finish_row(row: BenchRow, key: RowKey, runtime: Runtime, timing: Timing, graph_only: bool,
                config: BenchConfig, references: References, accuracy: AccuracyProbe | None) -> BenchRow:
    """Statistics, memory, parity (and with --accuracy, AP) of a timed row; closes its runtime."""
    try:
        record_resources(row)  # while the runtime is still loaded
        # outputs on the fixed parity input (graph-only timing: the timed input itself; other modes read JPEGs,
        # images or video frames, so one more untimed call on the exact input the PyTorch reference saw)
        described = runtime.describe()
        executed = described.get("inference_precision")  # the arithmetic that really ran
        row.executed_precision = described.get("executed_precision")
        outputs = None
        if config.parity or key.backend == "torch":
            outputs = (timing.output if graph_only and config.mode in ("model", "predict")
                       else runtime.infer(bench_inputs(runtime, key.batch).as_inputs()))
        if accuracy is not None:  # after the timing and the load figures: evaluation is not timed
            row.accuracy = accuracy.measure(runtime, key.batch)
    except Exception as e:  # noqa: BLE001
        _fail(row, e)
        return row
    finally:
        runtime.close()

    record_timing(row, timing, config.keep_samples)
    if outputs is not None:
        if key.backend == "torch" and key.precision == "fp32":
            references.put(key.size, key.batch, outputs)
        elif config.parity:
            reference = references.get(key.size, key.batch)
            row.parity = ({"against": "torch", "ok": None, "detail": reference} if isinstance(reference, str)
                          else row_parity(outputs, reference, artifact_precision(key), executed))
    return row


def _bench_row(key: RowKey, config: BenchConfig, loaders: Mapping[str, Loader], references: References,
               names: tuple[str, str], label: str, workdir: Path, accuracy: AccuracyProbe | None) -> BenchRow:
    row, runtime = _open_row(key, config, loaders, names, workdir)
    if runtime is None:
        return row
    graph_only = False
    bar = Progress(label, config.iters, config.seconds, config.progress)
    try:
        if config.mode == "video":
            timing = video_timing(runtime, config, bar)
        else:
            call, staged, graph_only = row_call(runtime, key, config, workdir, row)
            timing = time_calls(call, warmup=config.warmup, iters=config.iters, seconds=config.seconds,
                                sync=make_sync(config.device), progress=bar, staged=staged)
            if timing.stages_ns:
                timing.stages_ns.pop("detections", None)
    except Exception as e:  # noqa: BLE001 - one broken row must not lose the others; the reason is reported
        _fail(row, e)
        runtime.close()
        return row
    finally:
        bar.close()
    return _finish_row(row, key, runtime, timing, graph_only, config, references, accuracy)


def _bench_group(keys: Sequence[RowKey], config: BenchConfig, loaders: Mapping[str, Loader],
                 references: References, names: tuple[str, str], label: str, workdir: Path,
                 accuracy: AccuracyProbe | None) -> list[BenchRow]:
    """Rows of one size and batch, loaded together and timed in turns (`interleave`)."""
    opened = [(key, *_open_row(key, config, loaders, names, workdir)) for key in keys]
    calls, graph_only = {}, {}
    for i, (key, row, runtime) in enumerate(opened):
        if runtime is None:
            continue
        try:
            call, staged, graph_only[i] = row_call(runtime, key, config, workdir, row)
            calls[i] = (call, staged)
        except Exception as e:  # noqa: BLE001
            _fail(row, e)
            runtime.close()
    bar = Progress(label, config.iters, None if config.seconds is None else config.seconds * max(1, len(calls)),
                    config.progress)
    try:
        timings = time_round_robin(calls, warmup=config.warmup, iters=config.iters, seconds=config.seconds,
                                   sync=make_sync(config.device), progress=bar)
    finally:
        bar.close()
    def finish(i: int, key: RowKey, row: BenchRow, runtime: Runtime, timing: Timing) -> BenchRow:
        if timing.stages_ns:
            timing.stages_ns.pop("detections", None)
        return _finish_row(row, key, runtime, timing, graph_only[i], config, references, accuracy)

    return rows_from_timings(opened, calls, timings, finish)


def _speedups(rows: Sequence[BenchRow]) -> None:
    torch_mean = {(r.size, r.batch, r.device, r.mode): r.latency.mean
                  for r in rows if r.backend == "torch" and r.precision == "fp32" and r.status == "ok" and r.latency}
    for r in rows:
        base = torch_mean.get((r.size, r.batch, r.device, r.mode))
        if r.status == "ok" and r.latency and base:
            r.speedup_vs_torch = base / r.latency.mean


def _log(config: BenchConfig, message: str) -> None:
    if config.progress:
        print(message, file=sys.stderr, flush=True)


def _describe_row(row: BenchRow) -> str:
    head = f"{row.size} {row.backend} {row.precision} b{row.batch}"
    if row.status != "ok":
        return f"{head}: {row.status.upper()} ({row.reason})"
    lat = row.latency
    return (f"{head}: mean {lat.mean:.2f} ms, p50 {lat.p50:.2f}, p99 {lat.p99:.2f}, max {lat.max:.2f} "
            f"over {lat.count} calls; first {row.first_ms:.1f} ms, load {row.load_s:.2f} s")


# --- the run ---------------------------------------------------------------------------------------------
def run_benchmark(config: BenchConfig, loaders: Mapping[str, Loader] | None = None,
                  on_row: Callable[[BenchResult], None] | None = None) -> BenchResult:
    """Every (size, backend, precision, batch) row of `config`, in order size > backend > precision > batch; with
    `config.vit`, the rows (backend > batch) of that EoMT / DINOv3 model (benchmarks/vit.py).

    `loaders` maps a backend name to a function building its Runtime (tests use it for synthetic backends);
    other names must be real backends. `on_row(result)` is called after each row with the partial result
    (e.g. to save it during a long run).
    """
    loaders = dict(loaders or {})
    for b in config.backends:
        if b not in loaders and b not in OFFICIAL_BACKENDS:
            Backend.parse(b)  # raises with the list of backends
    backends = sorted({b if b in loaders or b in OFFICIAL_BACKENDS else Backend.parse(b).value
                       for b in config.backends},
                      key=lambda b: (BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER), b))
    cpu, gpus = cpu_info(), (gpu_info() if tier_of(config.device) == "GPU" else [])
    names = (device_name(config.device, cpu, gpus), config.device)
    system = system_fingerprint(config.threads_used, config.command or command_line())
    accuracy = AccuracyProbe(config) if config.accuracy else None  # a bad dataset stops the run before any row
    result = BenchResult(config, system, accuracy=None if accuracy is None else accuracy.describe())
    references = References(config)
    vit = None
    if config.vit is not None:  # one EoMT / DINOv3 model (vit.py); a bad --vit stops the run here, before any row
        from deimv2_deploy.benchmarks.vit import VitBench

        vit = VitBench(config, names[0], lambda message: _log(config, message))
        keys = vit.keys(backends)
    else:
        keys = [RowKey(s, b, p, n) for s in config.sizes for b in backends for p in config.precisions
                for n in config.batches]
    if config.interleave:  # one group per (size, batch): its rows take turns
        groups: dict[tuple[str, int], list[RowKey]] = {}
        for key in keys:
            groups.setdefault((key.size, key.batch), []).append(key)
        steps = list(groups.values())
    else:
        steps = [[key] for key in keys]
    t0 = time.perf_counter()
    done = 0
    with tempfile.TemporaryDirectory(prefix="deimv2-bench-") as tmp:
        for step in steps:
            first = step[0]
            label = (f"[{done + 1}/{len(keys)}] {first.size} {first.backend} {first.precision} b{first.batch}"
                     if len(step) == 1 else f"[{done + 1}-{done + len(step)}/{len(keys)}] {first.size} b{first.batch}"
                     f" ({len(step)} rows in turns)")
            rows = (vit.run(step, label) if vit is not None
                    else [_bench_row(first, config, loaders, references, names, label, Path(tmp), accuracy)]
                    if not config.interleave
                    else _bench_group(step, config, loaders, references, names, label, Path(tmp), accuracy))
            for row in rows:
                done += 1
                result.rows.append(row)
                _log(config, f"[{done}/{len(keys)}] {_describe_row(row)}")
            _speedups(result.rows)
            result.elapsed_s = time.perf_counter() - t0
            system["load_average_end"] = load_average()
            if config.max_ap_drop is not None:
                result.choice = choose_within_budget([r.to_dict() for r in result.rows], config.max_ap_drop)
            if on_row:
                on_row(result)
    return result
