"""The video half of deimv2-infer: a video file, camera or stream through the pipelined `run_video`.

deimv2-infer's parser gets the video options from `add_video_arguments(parser)` and hands over with
`run_video(args, runtime)` when the input is a video (`looks_like_video`) or `--source` is given. Options that
deimv2-infer already has are shared, not added twice: `artifact`, `inputs`, `--output-dir`, `--score`, `--json`,
`--no-draw`, `--backend`, `--device`, `--variant`, `--threads`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from deimv2_deploy.files import write_text
from deimv2_deploy.media import VIDEO_EXTENSIONS

__all__ = ["add_video_arguments", "run_video", "looks_like_video", "default_outputs", "video_outputs",
           "preview_wanted", "pipeline_options", "report"]

_STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "tcp://", "srt://")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add(group: Any, parser: argparse.ArgumentParser, *flags: str, **kwargs: Any) -> None:
    """Add an option unless the parser already has one of its flags (deimv2-infer's own take precedence)."""
    if any(flag in parser._option_string_actions for flag in flags):
        return
    group.add_argument(*flags, **kwargs)


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """The video options (a group "video") on an existing deimv2-infer parser."""
    g = parser.add_argument_group("video (a video file, --source camera index or RTSP/HTTP URL)")
    _add(g, parser, "--source", metavar="SRC",
         help="camera index (0), RTSP/HTTP URL, or video file to read instead of INPUTS")
    _add(g, parser, "--output", "-o", metavar="PATH",
         help="annotated video (.mp4, mp4v, source size and fps); default <output-dir>/<name>.mp4")
    _add(g, parser, "--batch", type=_positive_int, default=1, help="frames per inference call (default 1)")
    _add(g, parser, "--max-frames", type=_positive_int, metavar="N", help="stop after N frames")
    _add(g, parser, "--max-detections", type=int, metavar="N", help="draw and record at most N per frame")
    _add(g, parser, "--queue-size", type=_positive_int, default=8,
         help="frames buffered between pipeline stages (default 8)")
    _add(g, parser, "--preview", action="store_true",
         help="show frames in a window (needs a display and opencv-python, not -headless)")
    _add(g, parser, "--no-progress", action="store_true", help="no progress bar")
    _add(g, parser, "--summary-json", metavar="PATH",
         help="write the run summary (frames, FPS, time per stage) as JSON; '-' for stdout")


def looks_like_video(value: str) -> bool:
    """True for a video file name, a camera index or a stream URL (HTTP URLs: only with a video extension)."""
    text = str(value)
    lower = text.lower().split("?", 1)[0]
    return (text.isdigit() or lower.startswith(_STREAM_SCHEMES)
            or Path(lower).suffix in VIDEO_EXTENSIONS)


def _source_of(args: argparse.Namespace) -> str:
    source = getattr(args, "source", None)
    inputs = list(getattr(args, "inputs", None) or [])
    if source is not None:
        if inputs:
            raise ValueError(f"give either --source or input files, not both (got --source {source} and {inputs})")
        return str(source)
    if len(inputs) != 1:
        raise ValueError(f"a video run takes exactly one input (a file, camera index or URL), got {inputs}")
    return str(inputs[0])


def default_outputs(source: str, output_dir: str | Path, json_flag: Any, draw: bool) -> tuple[Path | None, Path | None]:
    """(video path, JSON lines path) from deimv2-infer's --output-dir / --json conventions."""
    text = str(source)
    if text.isdigit():
        stem = f"camera{text}"
    elif "://" in text:
        stem = Path(text.split("?", 1)[0].rstrip("/")).stem or "stream"
    else:
        stem = Path(text).stem
    out_dir = Path(output_dir)
    video = out_dir / f"{stem}.mp4" if draw else None
    if json_flag is True:
        jsonl = out_dir / f"{stem}.jsonl"
    elif json_flag:
        jsonl = Path(json_flag)
    else:
        jsonl = None
    return video, jsonl


def video_outputs(args: argparse.Namespace) -> tuple[str, Path | None, Path | None, bool]:
    """(source, video path or None, JSON lines path or None, draw) from the parsed arguments, checked."""
    source = _source_of(args)
    draw = not getattr(args, "no_draw", False)
    video_out, jsonl = default_outputs(source, getattr(args, "output_dir", None) or "out", getattr(args, "json", None),
                                       draw)
    if getattr(args, "output", None):
        if not draw:
            raise ValueError("--output and --no-draw contradict each other: drop one")
        video_out = Path(args.output)
    if video_out is not None and not source.isdigit() and "://" not in source:
        if video_out.resolve() == Path(source).resolve():
            raise ValueError(f"the output {video_out} would overwrite the input video: pass --output elsewhere")
    return source, video_out, jsonl, draw


def preview_wanted(args: argparse.Namespace) -> bool:
    """--preview, unless no window can be shown here (then a line on stderr says why)."""
    if not getattr(args, "preview", False):
        return False
    from deimv2_deploy.video import preview_unavailable_reason

    reason = preview_unavailable_reason()
    if reason:
        print(f"no preview window: {reason}", file=sys.stderr)
        return False
    return True


def pipeline_options(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline options every model kind shares: batch, max_frames, progress, queue_size."""
    return {"batch": getattr(args, "batch", 1), "max_frames": getattr(args, "max_frames", None),
            "progress": not getattr(args, "no_progress", False), "queue_size": getattr(args, "queue_size", 8)}


def report(summary: Any, args: argparse.Namespace) -> int:
    """Print the summary table (and --summary-json); the exit status of a finished run."""
    print(summary.table())
    target = getattr(args, "summary_json", None)
    if target == "-":
        print(summary.to_json(indent=2))
    elif target:
        write_text(target, json.dumps(summary.to_dict(), indent=2) + "\n")
        print(f"summary written to {target}", file=sys.stderr)
    return 0


def run_video(args: argparse.Namespace, runtime: Any = None) -> int:
    """Run the pipeline as the parsed arguments say; prints the summary table. Returns the exit status."""
    from deimv2_deploy.video import run_video as run_pipeline

    source, video_out, jsonl, draw = video_outputs(args)
    if runtime is None:
        from deimv2_deploy.runtimes import load_runtime

        options = {"threads": args.threads} if getattr(args, "threads", None) else {}
        runtime = load_runtime(args.artifact, backend=getattr(args, "backend", None),
                               device=getattr(args, "device", "cpu"), variant=getattr(args, "variant", None),
                               **options)
    score = getattr(args, "score", None)
    # errors carry a note saying where the partial output was kept; run_cli prints it with the error
    summary = run_pipeline(
        runtime, int(source) if source.isdigit() else source, output=video_out, json_path=jsonl,
        score_threshold=0.4 if score is None else float(score), draw=draw, preview=preview_wanted(args),
        max_detections=getattr(args, "max_detections", None), **pipeline_options(args))
    return report(summary, args)
