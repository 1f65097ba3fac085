"""What a row times, per mode: the graph on a prepared batch ("model"), read + prepare + infer + detections each
timed ("end-to-end"), `Runtime.predict` on an in-memory image ("predict"; the baselines graph only, as users run
them), frames through `Runtime.stream` ("video"); and the parity of a row's outputs against PyTorch."""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.benchmarks.artifacts import ROW_KINDS, RowKind, load_torch_reference
from deimv2_deploy.benchmarks.config import MIN_ITERS, BenchConfig, BenchRow, RowKey, Skip
from deimv2_deploy.benchmarks.timing import Timing, make_sync
from deimv2_deploy.runtimes.base import Runtime

__all__ = ["row_call", "bench_inputs", "end_to_end_call", "predict_call", "video_timing", "row_parity", "References",
           "is_baseline", "PREDICT_IMAGE_HW"]


def is_baseline(key: RowKey) -> bool:
    """A baseline row (PyTorch eager, the official-style exports): timed graph only in predict mode."""
    kind = ROW_KINDS.get((key.backend, key.precision))
    return isinstance(kind, RowKind) and kind.baseline


def row_call(runtime: Runtime, key: RowKey, config: BenchConfig, workdir: Path, row: BenchRow
              ) -> tuple[Callable[[], Any], bool, bool]:
    """(call, staged, graph_only) timed for this row in model, end-to-end and predict modes (video rows are timed
    by `video_timing`)."""
    if config.mode == "model":
        inputs = bench_inputs(runtime, key.batch).as_inputs()
        return (lambda: runtime.infer(inputs)), False, True
    if config.mode == "end-to-end":
        return end_to_end_call(runtime, key.batch, workdir), True, False
    call, graph_only = predict_call(runtime, key)
    if graph_only:
        row.notes.append("baseline: graph only on prepared inputs, as users run it today")
    return call, False, graph_only


def bench_inputs(runtime: Runtime, batch: int):
    """The fixed test scenes of the exporters' parity check, preprocessed: the same input on every backend."""
    from deimv2_deploy.exporters.parity import parity_batch

    return parity_batch(runtime.spec, count=batch)


def end_to_end_call(runtime: Runtime, batch: int, workdir: Path) -> Callable[[], tuple[Any, dict[str, int]]]:
    """Read + prepare + infer + detections of `batch` JPEG scenes, each stage timed (a staged call)."""
    from deimv2_deploy.exporters.parity import parity_images
    from deimv2_deploy.media import read_image, write_image

    paths = [write_image(workdir / f"scene_{i}.jpg", image) for i, image in enumerate(parity_images(batch))]
    sync = make_sync(runtime.device)
    clock = time.perf_counter_ns

    def call() -> tuple[Any, dict[str, int]]:
        t0 = clock()
        images = [read_image(p) for p in paths]
        t1 = clock()
        prepared = runtime.prepare(images)
        t2 = clock()
        outputs = runtime.infer(prepared.as_inputs())
        if sync:
            sync()
        t3 = clock()
        detections = runtime.detections_from_outputs(outputs, prepared)
        t4 = clock()
        return outputs, {"read": t1 - t0, "preprocess": t2 - t1, "infer": t3 - t2, "postprocess": t4 - t3,
                         "detections": len(detections)}

    return call


PREDICT_IMAGE_HW = (480, 640)


def predict_call(runtime: Runtime, key: RowKey) -> tuple[Callable[[], Any], bool]:
    """(call, graph_only) for predict mode: our runtimes end to end on in-memory 640x480 BGR images; the
    baselines (PyTorch eager, official-style exports) on prepared inputs, as users run them today."""
    from deimv2_deploy.exporters.parity import parity_images

    if is_baseline(key):
        inputs = bench_inputs(runtime, key.batch).as_inputs()
        return (lambda: runtime.infer(inputs)), True
    image = parity_images(1)[0]  # the 640x480 scene
    assert image.shape[:2] == PREDICT_IMAGE_HW
    if key.batch == 1:
        return (lambda: runtime.predict(image)), False
    images = [image] * key.batch
    return (lambda: runtime.predict(images)), False


def video_timing(runtime: Runtime, config: BenchConfig, progress: Any) -> Timing:
    """Per-frame time of `Runtime.stream`: the interval between frames it delivers.

    The stream decodes and preprocesses in a background thread while the caller's thread infers, so the
    interval is the pipeline's time per frame (1 / its FPS), not the sum of the stages.
    """
    try:
        import deimv2_deploy.video  # noqa: F401
    except ImportError as e:
        raise Skip(f"video mode needs deimv2_deploy.video, which is not available here ({e})") from None
    frames: Iterator[Any] = iter(runtime.stream(config.video))

    def call() -> Any:
        try:
            return next(frames)
        except StopIteration:
            raise _VideoEnded from None

    clock = time.perf_counter_ns
    t0 = clock()
    try:
        call()
    except _VideoEnded:
        raise Skip(f"the video {config.video} has no frames") from None
    first_ns = clock() - t0
    samples: list[int] = []
    warm = 1
    target = config.iters
    deadline = None if config.seconds is None else clock() + int(config.seconds * 1e9)
    start = clock()
    try:
        while warm < config.warmup:
            call()
            warm += 1
        while (target is None or len(samples) < target) and (deadline is None or clock() < deadline
                                                                or len(samples) < MIN_ITERS):
            t = clock()
            call()
            samples.append(clock() - t)
            if progress:
                progress(len(samples), (clock() - start) / 1e9)
    except _VideoEnded:
        pass  # a short video: report what it had (the row says how many frames were timed)
    finally:
        close = getattr(frames, "close", None)
        if close:
            close()  # stops the stream's reader thread
    if not samples:
        raise Skip(f"the video {config.video} has no frames left after {warm} warm-up frames: use a longer video "
                   "or a smaller --warmup")
    return Timing(first_ns, warm, samples, None)


class _VideoEnded(Exception):
    pass


def row_parity(outputs: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], precision: str,
               executed: str | None = None) -> dict[str, Any]:
    """Detections of a row against PyTorch's, within the tolerances of its precision and of the arithmetic its
    runtime reports it executes (`executed`, e.g. OpenVINO's bf16 on AMX CPUs)."""
    from deimv2_deploy.exporters.parity import match_detections, tolerances

    limits = tolerances(precision, executed)
    box_tol, score_tol = limits["box_tol"], limits["score_tol"]
    report = match_detections({k: np.asarray(outputs[k]) for k in ("labels", "boxes", "scores")}, reference,
                              **limits)
    return {"against": "torch", "ok": report["ok"], "matched_fraction": report["fraction"],
            "matched": report["matched"], "total": report["total"], "max_box_diff": report["max_box_diff"],
            "max_score_diff": report["max_score_diff"], "box_tol": box_tol, "score_tol": score_tol,
            **({"executed": executed} if executed else {})}


class References:
    """PyTorch outputs on the benchmark input per (size, batch): from the torch row, or built just for parity."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.outputs: dict[tuple[str, int], dict[str, np.ndarray] | str] = {}

    def put(self, size: str, batch: int, outputs: Mapping[str, np.ndarray]) -> None:
        self.outputs[(size, batch)] = {k: np.asarray(outputs[k]) for k in ("labels", "boxes", "scores")}

    def get(self, size: str, batch: int) -> dict[str, np.ndarray] | str:
        """The reference outputs, or a string saying why there are none."""
        if (size, batch) not in self.outputs:
            try:
                runtime = load_torch_reference(size, self.config)
                self.put(size, batch, runtime.infer(bench_inputs(runtime, batch).as_inputs()))
                runtime.close()
            except Skip as e:
                self.outputs[(size, batch)] = f"no PyTorch reference: {e}"
            except Exception as e:  # noqa: BLE001 - a broken reference must not stop the timing
                self.outputs[(size, batch)] = f"no PyTorch reference: {type(e).__name__}: {e}"
        return self.outputs[(size, batch)]
