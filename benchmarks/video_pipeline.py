"""Does the video pipeline keep up with the model? Three measurements side by side, in one process:

- pipeline:    deimv2_deploy.video.run_video (reader thread, inference in the caller, writer thread)
- sequential:  one thread doing the same work frame by frame (read, predict, annotate, encode)
- model-only:  runtime.infer on one preprocessed frame, repeated (the ceiling the pipeline aims at); for a
               runtime with the async API (OpenVINO) the better of that and `infer_many` over as many copies

for each size x runtime configuration, with the model on `--threads` threads. The modes alternate (pipeline,
sequential, model-only, then again) `--repeats` times and the median is reported, because shared machines drift.

Configurations: `ort` (ONNX Runtime as `load_runtime` builds it), `ort-nospin` (the same with
`session.intra_op.allow_spinning=0`: idle ORT threads sleep instead of spinning, leaving the cores to the
pipeline's reader and writer), `ov-latency` (OpenVINO, one request), `ov-throughput` (OpenVINO throughput hint:
several streams and requests, which the pipeline keeps busy through `submit`/`results`).

    PYTHONPATH=. .venv/bin/python benchmarks/video_pipeline.py --sizes atto pico

Models: `<models-dir>/deimv2_<size>_random_fp32.onnx`, exported with random weights when missing (needs torch).
Random weights score almost every query high, so drawing is capped at `--max-detections` per frame (default 20,
about a busy street scene) in both the pipeline and the sequential loop.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from deimv2_deploy.benchmarks.sysinfo import cpu_info
from deimv2_deploy.drawing import annotate
from deimv2_deploy.files import write_text
from deimv2_deploy.runtimes import load_runtime
from deimv2_deploy.video import open_source, run_video, write_synthetic_video


def model_path(models_dir: Path, size: str) -> Path:
    path = models_dir / f"deimv2_{size}_random_fp32.onnx"
    if not path.exists():
        from deimv2_deploy.exporters.onnx_export import export_onnx

        print(f"exporting {size} with random weights to {models_dir} ...", file=sys.stderr)
        path = export_onnx(size, random_weights=True, output_dir=models_dir, quiet=True).path
    return path


def run_pipeline(runtime, video: Path, out: Path, score: float, max_dets: int, frames: int) -> float:
    summary = run_video(runtime, video, output=out, score_threshold=score, max_detections=max_dets,
                        max_frames=frames, progress=False)
    return summary.end_to_end_fps


def run_sequential(runtime, video: Path, out: Path, score: float, max_dets: int, frames: int) -> float:
    src = open_source(video)
    writer = None
    done = 0
    start = time.perf_counter()
    while done < frames:
        ok, frame = src.capture.read()
        if not ok:
            break
        dets = runtime.predict(frame, score_threshold=score)[:max_dets]
        image = annotate(frame, dets, copy=False)
        if writer is None:
            writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), src.fps,
                                     (frame.shape[1], frame.shape[0]))
        writer.write(image)
        done += 1
    writer.release()
    src.release()
    return done / (time.perf_counter() - start)


def run_model_only(runtime, video: Path, frames: int) -> float:
    src = open_source(video)
    ok, frame = src.capture.read()
    src.release()
    inputs = runtime.prepare(frame).as_inputs()
    for _ in range(3):  # warm-up
        runtime.infer(inputs)
    start = time.perf_counter()
    for _ in range(frames):
        runtime.infer(inputs)
    fps = frames / (time.perf_counter() - start)
    if callable(getattr(runtime, "infer_many", None)):  # the async API can run several requests at once
        runtime.infer_many([inputs] * 4)
        start = time.perf_counter()
        runtime.infer_many([inputs] * frames)
        fps = max(fps, frames / (time.perf_counter() - start))
    return fps


CONFIGS = {
    "ort": ("onnxruntime", {}),
    "ort-nospin": ("onnxruntime", {"spinning": False}),
    "ov-latency": ("openvino", {"mode": "latency"}),
    "ov-throughput": ("openvino", {"mode": "throughput"}),
}


def load_config(onnx: Path, config: str, threads: int):
    backend, options = CONFIGS[config]
    return load_runtime(onnx, backend=backend, threads=threads, **options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["atto", "pico"])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2, help="model threads")
    p.add_argument("--frames", type=int, default=150, help="frames per measurement")
    p.add_argument("--repeats", type=int, default=3, help="rounds of the three modes; the median is reported")
    p.add_argument("--video", help="a video to use (default: a synthetic 854x480 25 fps one)")
    p.add_argument("--models-dir", default=os.environ.get("DEIMV2_MODELS", "models"))
    p.add_argument("--score", type=float, default=0.4)
    p.add_argument("--max-detections", type=int, default=20)
    p.add_argument("--markdown", default=str(Path(__file__).with_name("video_pipeline.md")))
    p.add_argument("--json", help="also write the raw results as JSON here")
    args = p.parse_args(argv)

    notes = []
    configs = list(args.configs)
    if importlib.util.find_spec("deimv2_deploy.runtimes.openvino_backend") is None:
        configs = [c for c in configs if CONFIGS[c][0] != "openvino"]
        notes.append("OpenVINO skipped: deimv2_deploy.runtimes.openvino_backend is missing in this checkout.")
    models_dir = Path(args.models_dir)
    tmp = Path(tempfile.mkdtemp(prefix="deimv2_video_bench_"))
    video = Path(args.video) if args.video else write_synthetic_video(tmp / "synthetic.mp4", args.frames)
    load_before = os.getloadavg()

    rows = []
    for size in args.sizes:
        onnx = model_path(models_dir, size)
        for config in configs:
            runtime = load_config(onnx, config, args.threads)
            runtime.predict(np.zeros((480, 854, 3), np.uint8))  # compile / warm up
            fps: dict[str, list[float]] = {"pipeline": [], "sequential": [], "model-only": []}
            for _ in range(args.repeats):
                fps["pipeline"].append(run_pipeline(runtime, video, tmp / "pipeline.mp4", args.score,
                                                    args.max_detections, args.frames))
                fps["sequential"].append(run_sequential(runtime, video, tmp / "sequential.mp4", args.score,
                                                        args.max_detections, args.frames))
                fps["model-only"].append(run_model_only(runtime, video, args.frames))
            med = {k: statistics.median(v) for k, v in fps.items()}
            row = {"size": size, "config": config, "backend": runtime.backend.value, "version": runtime.version(),
                   "threads": args.threads,
                   **{f"{k}_fps": round(v, 2) for k, v in med.items()},
                   "runs": {k: [round(x, 2) for x in v] for k, v in fps.items()},
                   "pipeline_vs_model": round(med["pipeline"] / med["model-only"], 3),
                   "sequential_vs_model": round(med["sequential"] / med["model-only"], 3),
                   "pipeline_vs_sequential": round(med["pipeline"] / med["sequential"], 3)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            runtime.close()

    width, height = (int(v) for v in _video_size(video))
    command = "PYTHONPATH=. .venv/bin/python benchmarks/video_pipeline.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "# Video pipeline vs model-only FPS",
        "",
        f"- date: {dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- CPU: {cpu_info()['model']}, {os.cpu_count()} logical cores; model on {args.threads} threads; "
        f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after (other jobs share this machine)",
        f"- command: `{command}`",
        f"- video: {'synthetic ' if not args.video else ''}{width}x{height}, {args.frames} frames per measurement, "
        f"median of {args.repeats} alternating rounds; score >= {args.score}, at most {args.max_detections} boxes "
        "drawn per frame (random weights score nearly every query high)",
        "- pipeline: `run_video` (reader: decode + preprocess; caller: inference; writer: draw + mp4v encode); "
        "sequential: the same work in one thread; model-only: `runtime.infer` on one preprocessed frame, repeated "
        "(OpenVINO: the better of that and `infer_many`, which keeps all its requests busy)",
        "- runtimes: `ort` ONNX Runtime as `load_runtime` builds it (idle threads spin); `ort-nospin` the same with "
        "`session.intra_op.allow_spinning=0`; `ov-latency` OpenVINO, one request; `ov-throughput` OpenVINO "
        "throughput hint (2 streams x 1 thread, 2 requests), fed by the pipeline through `submit`/`results`",
        "",
        "| size | runtime | model-only FPS | pipeline FPS | sequential FPS | pipeline / model-only | "
        "sequential / model-only | pipeline / sequential |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['size']} | {r['config']} ({r['backend']} {r['version']}) | {r['model-only_fps']:.1f} | "
                     f"{r['pipeline_fps']:.1f} | {r['sequential_fps']:.1f} | {r['pipeline_vs_model']:.2f} | "
                     f"{r['sequential_vs_model']:.2f} | {r['pipeline_vs_sequential']:.2f} |")
    lines += ["", "Runs (FPS per round):", ""]
    for r in rows:
        lines.append(f"- {r['size']} / {r['config']}: " + "; ".join(f"{k} {v}" for k, v in r["runs"].items()))
    if notes:
        lines += [""] + [f"Note: {n}" for n in notes]
    write_text(args.markdown, "\n".join(lines) + "\n")
    print(f"wrote {args.markdown}", file=sys.stderr)
    if args.json:
        write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


def _video_size(video: Path) -> tuple[float, float]:
    cap = cv2.VideoCapture(str(video))
    size = cap.get(cv2.CAP_PROP_FRAME_WIDTH), cap.get(cv2.CAP_PROP_FRAME_HEIGHT)
    cap.release()
    return size


if __name__ == "__main__":
    sys.exit(main())
