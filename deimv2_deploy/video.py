"""Video inference that keeps up with the model: decode -> infer -> draw -> encode, pipelined.

    for index, frame, detections in runtime.stream("street.mp4", score_threshold=0.4):
        ...
    summary = run_video(runtime, "street.mp4", output="out.mp4", json_path="out.jsonl")
    print(summary.table())

Three threads, joined by bounded queues (memory stays flat whatever the video's length):

    reader   cv2.VideoCapture.read + preprocessing, grouped into batches of `batch` frames
    caller   inference (the runtime's async hook when it has one, else `runtime.infer`) + Detections
    writer   annotate + cv2.VideoWriter + JSON lines + progress bar (+ preview window)

OpenCV and the inference libraries release the GIL, so the stages overlap. Frames keep their order (every stage
is one FIFO). End of stream travels as a sentinel; an error in any stage is handed to the caller, which stops the
other stages, joins them, keeps what was written as `<name>.partial.mp4` / `<name>.partial.jsonl` and re-raises.
Successful output is written under a temporary name, verified (the video reads back with every frame, the JSON
lines file has one line per frame) and only then renamed onto its final name (`deimv2_deploy.files`). A frame
the encoder cannot write (a full disk) stops the run at once. SIGTERM and SIGHUP stop a run as Ctrl-C does
(`deimv2_deploy.signals`).

Async hook (duck-typed, as `OpenVinoRuntime` has it): a runtime with `submit(inputs, userdata)` (starts one graph
call; blocks only while all its requests are busy) and `results(wait: bool) -> [(userdata, outputs), ...]`
(finished calls in submission order) gets several batches in flight at once. Runtimes without it use `infer`.

Other models (EoMT segmentation, DINOv3 features: vit_video.py) use the same pipeline through `run_frames` and a
`FrameModel`: their own prepare (reader), predict (caller), draw and JSON fields (writer); the source, the verified
atomic outputs, partial files, signals, progress and summary are this module's.

Torch-free: this module needs only numpy, OpenCV and (for the progress bar) tqdm.
"""
from __future__ import annotations

import errno
import json
import math
import os
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from deimv2_deploy.detections import Detections
from deimv2_deploy.drawing import annotate
from deimv2_deploy.files import AtomicWrite, free_bytes, partial_path
from deimv2_deploy.native import native_output_captured
from deimv2_deploy.preprocess import PreparedBatch
from deimv2_deploy.signals import shielded, stop_signals_as_interrupt

__all__ = ["stream", "run_video", "run_frames", "FrameModel", "VideoSummary", "VideoSourceError", "VideoSource",
           "open_source", "preview_unavailable_reason", "partial_path", "write_synthetic_video",
           "video_runtime_options", "STAGES"]

STAGES = ("decode", "preprocess", "infer", "draw+encode")
DEFAULT_FPS = 25.0  # for sources that do not report one (many cameras and streams)
_POLL_S = 0.1  # how often a blocked thread looks whether the pipeline was stopped
_URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://", "udp://", "tcp://", "srt://")
_OPEN_TIMEOUT_MS = 10_000  # network sources: give up opening / reading after this long


class VideoSourceError(ValueError):
    """The source cannot be read as a video: empty, corrupt, no frames, or an unopenable camera / URL."""


# --- the source ------------------------------------------------------------------------------------------
@dataclass
class VideoSource:
    """An opened cv2.VideoCapture and what it says about itself."""

    capture: Any  # cv2.VideoCapture
    name: str  # for messages: the path, "camera 0" or the URL
    kind: str  # "file" | "camera" | "url"
    fps: float  # frames per second (DEFAULT_FPS when the source reports none)
    fps_reported: bool  # False: DEFAULT_FPS stands in
    frame_count: int | None  # None where unknown (live sources, some containers)
    live: bool  # a camera or live stream (no end, no time stamps of its own), not a file or a file URL

    def release(self) -> None:
        self.capture.release()


def _parse_source(source: str | int | os.PathLike) -> tuple[str, Any]:
    """("camera", index) | ("url", str) | ("file", Path)."""
    if isinstance(source, (int, np.integer)) and not isinstance(source, bool):
        return "camera", int(source)
    text = os.fspath(source)
    if text.isdigit():  # "0" from a command line
        return "camera", int(text)
    if text.lower().startswith(_URL_SCHEMES):
        return "url", text
    return "file", Path(text)


def open_source(source: str | int | os.PathLike) -> VideoSource:
    """Open a video file, camera index or RTSP/HTTP URL; a clear error when that is impossible."""
    kind, target = _parse_source(source)
    if kind == "file":
        path: Path = target
        if not path.exists():
            raise FileNotFoundError(f"video not found: {path}")
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder, not a video file; pass a file such as {path / 'clip.mp4'}")
        if path.stat().st_size == 0:
            raise VideoSourceError(f"video file is empty (0 bytes): {path}")
        capture = cv2.VideoCapture(str(path))
        name = str(path)
        if not capture.isOpened():
            capture.release()
            raise VideoSourceError(f"cannot decode {path} as a video: the file is corrupt, truncated, or in a "
                                   "format this OpenCV build cannot read (check it plays with ffprobe/ffplay)")
    elif kind == "camera":
        capture = cv2.VideoCapture(target)
        name = f"camera {target}"
        if not capture.isOpened():
            capture.release()
            raise VideoSourceError(f"cannot open camera {target}: no such device or it is in use "
                                   f"(on Linux check that /dev/video{target} exists and is readable)")
    else:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, _OPEN_TIMEOUT_MS]
        capture = cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
        name = target
        if not capture.isOpened():
            capture.release()
            raise VideoSourceError(f"cannot open stream {target}: unreachable, wrong path or credentials, or a "
                                   f"protocol this OpenCV build lacks (open timeout {_OPEN_TIMEOUT_MS / 1000:.0f} s)")
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    fps_reported = math.isfinite(fps) and 0.0 < fps < 1000.0
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
    frame_count = int(count) if kind != "camera" and math.isfinite(count) and count > 0 else None
    live = kind == "camera" or (kind == "url" and frame_count is None)  # an http://.../clip.mp4 is a file
    return VideoSource(capture, name, kind, fps if fps_reported else DEFAULT_FPS, fps_reported, frame_count, live)


# --- stage timing --------------------------------------------------------------------------------------------
class _Clock:
    """Seconds spent per stage; each stage is written by one thread only."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - since
        return now


# --- queue plumbing ------------------------------------------------------------------------------------------
class _End:
    """End of stream."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = _End()


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put, waiting for room unless the pipeline is stopped (then False: the item is dropped)."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue, producer: threading.Thread, what: str) -> Any:
    """Get, but never wait forever on a producer that has died without a word."""
    while True:
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if not producer.is_alive() and q.empty():
                raise RuntimeError(f"the {what} thread stopped without a result (bug): report it") from None


# --- reader: decode + preprocess -----------------------------------------------------------------------------
@dataclass
class _Batch:
    indices: list[int]
    timestamps: list[float]  # seconds: the file's time stamps; live sources: since the first frame
    frames: list[np.ndarray]  # BGR uint8, fresh arrays from the decoder (never reused)
    prepared: Any  # what the model's prepare() made of the frames (a detector: a PreparedBatch)


class _Reader(threading.Thread):
    """Decodes `batch` frames at a time and runs `prepare(frames)` on them (the model's preprocessing)."""

    def __init__(self, source: VideoSource, prepare: Callable[[list[np.ndarray]], Any], batch: int,
                 max_frames: int | None, capacity: int) -> None:
        super().__init__(name="deimv2-video-reader", daemon=True)
        self.source = source
        self.prepare = prepare
        self.batch = batch
        self.max_frames = max_frames
        self.out: queue.Queue = queue.Queue(maxsize=capacity)
        self.stop = threading.Event()
        self.clock = _Clock()
        self.frames_read = 0

    def run(self) -> None:
        try:
            self._read_all()
            _put(self.out, _END, self.stop)
        except BaseException as e:  # noqa: BLE001 - every failure goes to the caller, which re-raises it
            _put(self.out, _Failure(e), self.stop)
        finally:
            self.source.release()

    def _read_all(self) -> None:
        capture, fps, live = self.source.capture, self.source.fps, self.source.live
        started = time.monotonic()
        done = False
        while not done and not self.stop.is_set():
            frames, indices, stamps = [], [], []
            t = time.perf_counter()
            while len(frames) < self.batch:
                if self.max_frames is not None and self.frames_read >= self.max_frames:
                    done = True
                    break
                ok, frame = capture.read()
                if not ok or frame is None:
                    done = True
                    break
                index = self.frames_read
                self.frames_read += 1
                frames.append(frame)
                indices.append(index)
                stamps.append(time.monotonic() - started if live else _file_timestamp(capture, index, fps))
            t = self.clock.add("decode", t)
            if not frames:
                break
            prepared = self.prepare(frames)
            self.clock.add("preprocess", t)
            if not _put(self.out, _Batch(indices, stamps, frames, prepared), self.stop):
                return
        if self.frames_read == 0 and not self.stop.is_set():
            raise VideoSourceError(f"no frames could be decoded from {self.source.name}: the video is empty, "
                                   "corrupt, or uses a codec this OpenCV build cannot decode")


def _file_timestamp(capture: Any, index: int, fps: float) -> float:
    """Seconds of the frame just read: the container's time stamp (right for variable frame rates too)."""
    ms = capture.get(cv2.CAP_PROP_POS_MSEC)
    if math.isfinite(ms) and (ms > 0 or index == 0):
        return ms / 1000.0
    return index / fps  # the backend gives no time stamps


# --- inference ---------------------------------------------------------------------------------------------
def _pad(prepared: PreparedBatch, size: int) -> PreparedBatch:
    """Repeat the last image up to a fixed-batch artifact's batch size (the extra results are dropped)."""
    n = prepared.images.shape[0]
    take = list(range(n)) + [n - 1] * (size - n)
    return PreparedBatch(prepared.images[take], prepared.orig_target_sizes[take],
                         prepared.transforms + (prepared.transforms[-1],) * (size - n))


def _effective_batch(runtime: Any, batch: int) -> int:
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    fixed = getattr(runtime.spec, "batch", None)
    if fixed is not None and batch != fixed:
        if batch != 1:
            raise ValueError(f"this artifact has a fixed batch of {fixed}; pass batch={fixed} (or 1), "
                             f"or re-export it with a dynamic batch to use batch={batch}")
        return int(fixed)  # batch=1 is the default: fill the artifact's batch rather than padding every frame
    return int(batch)


def _uses_async(runtime: Any) -> bool:
    return callable(getattr(runtime, "submit", None)) and callable(getattr(runtime, "results", None))


def _read_batches(reader: _Reader) -> Iterator[_Batch]:
    """Start `reader` and yield its batches until the source ends; a reader failure is raised here. The caller
    stops and joins the reader (in its `finally`)."""
    reader.start()
    while True:
        item = _get(reader.out, reader, "video reader")
        if isinstance(item, _Failure):
            raise item.error
        if item is _END:
            return
        yield item


def _infer_batches(runtime: Any, reader: _Reader, score_threshold: float, max_detections: int | None,
                   clock: _Clock) -> Iterator[tuple[_Batch, list[Detections]]]:
    """Batches from the reader with their detections, in order. Stops and joins the reader on exit."""
    pipelined = _uses_async(runtime)
    fixed = getattr(runtime.spec, "batch", None)

    def detections(done: tuple[_Batch, PreparedBatch], outputs: dict[str, np.ndarray]
                   ) -> tuple[_Batch, list[Detections]]:
        item, prepared = done
        dets = runtime.detections_from_outputs(outputs, prepared, score_threshold)[:len(item.frames)]
        if max_detections is not None:  # results come best first
            dets = [d[:max_detections] for d in dets]
        return item, dets

    try:
        for item in _read_batches(reader):
            prepared = item.prepared
            if fixed is not None and prepared.images.shape[0] < fixed:
                prepared = _pad(prepared, fixed)
            t = time.perf_counter()
            if pipelined:
                runtime.submit(prepared.as_inputs(), (item, prepared))  # blocks only while every request is busy
                finished = runtime.results(wait=False)
                clock.add("infer", t)
                for done, outputs in finished:
                    yield detections(done, outputs)
            else:
                outputs = runtime.infer(prepared.as_inputs())
                clock.add("infer", t)
                yield detections((item, prepared), outputs)
        if pipelined:
            t = time.perf_counter()
            finished = runtime.results(wait=True)
            clock.add("infer", t)
            for done, outputs in finished:
                yield detections(done, outputs)
    finally:
        reader.stop.set()
        reader.join()
        if pipelined and getattr(runtime, "pending", 0):
            try:  # collect what is still in flight so the runtime is clean for its next user
                runtime.results(wait=True)
            except Exception:  # noqa: BLE001 - the first error is already on its way up
                pass


def _check_options(score_threshold: float, max_frames: int | None, max_detections: int | None,
                   queue_size: int) -> None:
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None (all frames), got {max_frames}")
    if max_detections is not None and max_detections < 0:
        raise ValueError(f"max_detections must be >= 0 or None (no limit), got {max_detections}")
    if queue_size < 1:
        raise ValueError(f"queue_size must be >= 1 (frames buffered between stages), got {queue_size}")


def _queue_capacity(queue_size: int, batch: int) -> int:
    return max(1, math.ceil(queue_size / batch))  # the queues hold batches; queue_size counts frames


def stream(runtime: Any, source: str | int | os.PathLike, *, batch: int = 1, score_threshold: float = 0.0,
           max_frames: int | None = None, queue_size: int = 8, max_detections: int | None = None
           ) -> Iterator[tuple[int, np.ndarray, Detections]]:
    """`(frame_index, frame_bgr, detections)` for every frame of `source`, in order.

    `source` is a video file, a camera index (int or "0") or an RTSP/HTTP URL. Decoding and preprocessing run
    in a background thread, `queue_size` frames ahead at most; inference runs in the consuming thread. Leaving
    the loop early (break, exception) stops and joins the reader. Detections are best first, at most
    `max_detections` per frame. Errors (missing / empty / corrupt file, camera or URL that cannot be opened)
    are raised by this call, before the first frame.
    """
    _check_options(score_threshold, max_frames, max_detections, queue_size)
    batch = _effective_batch(runtime, batch)
    src = open_source(source)
    reader = _Reader(src, _detector_prepare(runtime), batch, max_frames, _queue_capacity(queue_size, batch))
    return _stream_frames(runtime, reader, score_threshold, max_detections)


def _stream_frames(runtime: Any, reader: _Reader, score_threshold: float, max_detections: int | None
                   ) -> Iterator[tuple[int, np.ndarray, Detections]]:
    batches = _infer_batches(runtime, reader, score_threshold, max_detections, _Clock())
    try:
        for item, dets in batches:
            yield from zip(item.indices, item.frames, dets, strict=True)
    finally:
        batches.close()


# --- the summary -------------------------------------------------------------------------------------------
@dataclass
class VideoSummary:
    """What a run did and where the time went (`str()` / `table()` for people, `to_json()` for scripts)."""

    source: str
    frames: int
    width: int
    height: int
    fps: float  # the source's frame rate (also the output's)
    wall_s: float  # first read to last write
    batch: int
    stage_s: dict[str, float] = field(default_factory=dict)  # seconds per stage, each stage in its own thread
    output: str | None = None
    json_path: str | None = None
    expected_frames: int | None = None  # what the container announced (None: unknown / live)
    stopped_early: bool = False  # q / Esc in the preview window, or Ctrl-C on a live source
    runtime: dict[str, Any] = field(default_factory=dict)
    fps_reported: bool = True  # False: the source gave none and DEFAULT_FPS was used
    output_size: list[int] | None = None  # [width, height] of the output video where it differs from the source's

    @property
    def end_to_end_fps(self) -> float:
        return self.frames / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def model_fps(self) -> float:
        """Frames per second of inference time alone (as timed inside the pipeline, with the others running)."""
        t = self.stage_s.get("infer", 0.0)
        return self.frames / t if t > 0 else 0.0

    @property
    def bottleneck(self) -> str | None:
        """The stage with the most time per frame; its thread sets the pace (decode+preprocess share one)."""
        if not self.stage_s:
            return None
        threads = {"decode+preprocess": self.stage_s.get("decode", 0.0) + self.stage_s.get("preprocess", 0.0),
                   "infer": self.stage_s.get("infer", 0.0), "draw+encode": self.stage_s.get("draw+encode", 0.0)}
        return max(threads, key=threads.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["end_to_end_fps"] = round(self.end_to_end_fps, 3)
        d["model_fps"] = round(self.model_fps, 3)
        d["stage_ms_per_frame"] = {k: round(1e3 * v / self.frames, 3) if self.frames else None
                                   for k, v in self.stage_s.items()}
        d["stage_s"] = {k: round(v, 4) for k, v in self.stage_s.items()}
        d["wall_s"] = round(self.wall_s, 4)
        d["bottleneck"] = self.bottleneck
        return d

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        lines = [
            f"source      {self.source} ({self.width}x{self.height} @ {self.fps:g} fps"
            + (", not reported: assumed)" if not self.fps_reported else ")"),
            f"output      {self.output or '-'}"
            + (f" ({self.output_size[0]}x{self.output_size[1]})" if self.output and self.output_size else "")
            + (f"   JSON lines: {self.json_path}" if self.json_path else ""),
            f"frames      {self.frames}" + (f" of {self.expected_frames}" if self.expected_frames else "")
            + ("   (stopped by the user)" if self.stopped_early else ""),
            f"wall time   {self.wall_s:.2f} s   end-to-end {self.end_to_end_fps:.1f} FPS   "
            f"model-only {self.model_fps:.1f} FPS   batch {self.batch}",
            "",
            "| stage | thread | total s | ms / frame |",
            "|---|---|---:|---:|",
        ]
        thread_of = {"decode": "reader", "preprocess": "reader", "infer": "caller", "draw+encode": "writer"}
        for stage in STAGES:
            s = self.stage_s.get(stage, 0.0)
            per = f"{1e3 * s / self.frames:.2f}" if self.frames else "-"
            lines.append(f"| {stage} | {thread_of[stage]} | {s:.3f} | {per} |")
        if self.bottleneck:
            lines.append(f"\nslowest thread: {self.bottleneck}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


# --- writer: draw + encode + JSON lines --------------------------------------------------------------------
def preview_unavailable_reason() -> str | None:
    """Why cv2.imshow cannot work here (None when it can)."""
    gui = [line for line in cv2.getBuildInformation().splitlines() if line.strip().startswith("GUI:")]
    if gui and gui[0].split(":", 1)[1].strip().upper() in ("NONE", "NO"):
        return ("this OpenCV build has no GUI (opencv-python-headless): install opencv-python instead "
                "for a preview window")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return "no display (DISPLAY / WAYLAND_DISPLAY unset): run on a desktop session or with X forwarding"
    return None


def _open_video_writer(path: Path, fps: float, size: tuple[int, int], final: Path | None = None) -> Any:
    """An mp4v cv2.VideoWriter on `path`, or the reason it cannot be one: the folder (read-only, not writable,
    full: the OSError of creating the file) or the container."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if writer.isOpened():
        return writer
    writer.release()
    try:
        with open(path, "wb"):  # raises what keeps OpenCV from creating the file (EROFS, EACCES, ENOSPC...)
            pass
    except OSError as e:
        e.filename = str(final or path)
        raise
    path.unlink(missing_ok=True)
    what = f"{final or path}, {size[0]}x{size[1]} @ {fps:g} fps"
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"OpenCV cannot write mp4v video into a {path.suffix} file ({what}): use an .mp4 output name")
    raise ValueError(f"OpenCV cannot write mp4v video ({what}): this OpenCV build may lack FFmpeg's video writer; "
                     "install opencv-python-headless from PyPI")


def _write_frame(writer: Any, image: np.ndarray, index: int, final: Path) -> None:
    """writer.write, or an OSError when the encoder could not write the frame (OpenCV >= 4.9 reports it)."""
    if writer.write(image) is not False:
        return
    free = free_bytes(final.parent)
    if free is not None and free < max(1 << 20, 2 * image.nbytes):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final))
    raise OSError(f"the video encoder could not write frame {index} to {final}")


def video_frame_count(path: str | os.PathLike) -> int | None:
    """Frames a video file holds as its container says (None: it cannot be opened, or does not say). FFmpeg's
    own complaints about a broken file ("moov atom not found") are kept off the console: the caller says it."""
    with native_output_captured():
        capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            return None
        count = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        return int(count) if math.isfinite(count) and count > 0 else None
    finally:
        capture.release()


def _check_video(final: Path, frames: int) -> Any:
    """A verify for AtomicWrite: the video reads back with all `frames` frames."""
    def verify(tmps: list[Path]) -> None:
        count = video_frame_count(tmps[0])
        if count is None or count < frames:
            found = "it cannot be read back" if count is None else f"it holds {count}"
            raise OSError(f"the video written to {final} is incomplete: {frames} frames were encoded but {found} "
                          "(was the disk full?)")
    return verify


def _check_lines(final: Path, lines: int) -> Any:
    """A verify for AtomicWrite: the JSON lines file has `lines` complete lines."""
    def verify(tmps: list[Path]) -> None:
        with open(tmps[0], "rb") as fh:
            found = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
        if found != lines:
            raise OSError(f"{final} is incomplete: {found} of {lines} lines were written (was the disk full?)")
    return verify


def video_runtime_options(artifact: str | os.PathLike, backend: str | None = None) -> dict[str, Any]:
    """`load_runtime` options for a video pipeline, where the model shares the CPU with decoding, drawing and
    encoding (benchmarks/video_pipeline.md, 2 cores): ONNX Runtime's idle workers sleep instead of spinning (atto
    44 instead of 39 FPS), OpenVINO keeps one request per stream in flight (throughput mode: atto 70 instead of
    58 FPS, pico 17.5 instead of 14.3). Frames keep their order either way."""
    name, kind = str(artifact).lower(), (backend or "").lower()
    if kind in ("onnxruntime", "ort", "onnx") or not kind and name.endswith(".onnx"):
        return {"spinning": False}
    if kind in ("openvino", "ov") or not kind and name.endswith(".xml"):
        return {"mode": "throughput"}
    return {}


def write_synthetic_video(path: str | os.PathLike, frames: int = 120, size: tuple[int, int] = (854, 480),
                          fps: float = DEFAULT_FPS) -> Path:
    """An mp4v clip of moving shapes on a gradient with the frame number printed top-left, for demos, tests and
    benchmarks on machines without a camera or sample video. Written under a temporary name, renamed when done."""
    if frames < 1 or fps <= 0 or min(size) < 160:
        raise ValueError(f"need frames >= 1, fps > 0 and a size of at least 160x160, got {frames}, {fps}, {size}")
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    background = np.dstack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)]).astype(np.uint8)
    final = Path(path)
    with AtomicWrite(final, verify=_check_video(final, frames)) as tmp:  # VideoWriter picks the container from .mp4
        writer = _open_video_writer(tmp, fps, (w, h), final)
        try:
            for i in range(frames):
                frame = background.copy()
                x = 20 + 5 * i % (w - 140)  # shapes wrap around instead of leaving a long clip's frame
                cv2.rectangle(frame, (x, 60), (x + 120, 200), (40, 200, 40), -1)
                cv2.circle(frame, (w - 60 - 4 * i % (w - 120), h // 2 + int(h / 8 * np.sin(i / 10))), 50,
                           (30, 30, 220), -1)
                cv2.ellipse(frame, (w // 2, h - 80), (90, 40), 3 * i, 0, 360, (220, 180, 30), -1)
                cv2.putText(frame, f"{i:04d}", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
                _write_frame(writer, frame, i, final)
        finally:
            writer.release()
    return Path(path)


def _frame_line(index: int, timestamp: float, fields: dict[str, Any]) -> str:
    """One JSON line: the frame's index and time stamp, then the model's fields."""
    return json.dumps({"frame": index, "timestamp": round(timestamp, 6), **fields}, separators=(",", ":"))


def _detection_fields(dets: Detections) -> dict[str, Any]:
    names, ids = dets.class_names, dets.category_ids
    return {
        "boxes": [[round(float(v), 2) for v in box] for box in dets.xyxy],
        "scores": [round(float(s), 5) for s in dets.scores],
        "labels": [int(lab) for lab in dets.labels],
        "class_names": [names[int(lab)] for lab in dets.labels],
        **({} if ids is None else {"category_ids": [ids[int(lab)] for lab in dets.labels]}),
    }


def _json_record(index: int, timestamp: float, dets: Detections) -> str:
    return _frame_line(index, timestamp, _detection_fields(dets))


def _annotate_in_place(frame: np.ndarray, dets: Detections) -> np.ndarray:
    return annotate(frame, dets, copy=False)  # the frame is ours alone: draw in place


class _Writer(threading.Thread):
    """Draws each frame (`draw_frame(frame, result)`; any size, the same for every frame), encodes it and writes
    `record(result)` as the frame's JSON line."""

    def __init__(self, video: AtomicWrite | None, jsonl: AtomicWrite | None, fps: float, draw: bool, preview: bool,
                 progress: Any, capacity: int,
                 draw_frame: Callable[[np.ndarray, Any], np.ndarray] = _annotate_in_place,
                 record: Callable[[Any], dict[str, Any]] = _detection_fields) -> None:
        super().__init__(name="deimv2-video-writer", daemon=True)
        self.video, self.jsonl = video, jsonl
        self.fps, self.draw, self.preview, self.progress = fps, draw, preview, progress
        self.draw_frame, self.record = draw_frame, record
        self.inbox: queue.Queue = queue.Queue(maxsize=capacity)
        self.clock = _Clock()
        self.error: BaseException | None = None
        self.failed = threading.Event()
        self.user_stop = threading.Event()
        self.frames_written = 0
        self.size: tuple[int, int] | None = None  # (width, height) of the source frames
        self.output_size: tuple[int, int] | None = None  # (width, height) of the frames written
        self._video: Any = None
        self._json: Any = None

    def run(self) -> None:
        try:
            while True:
                item = self.inbox.get()  # the caller always ends with _END, even when it fails
                if item is _END:
                    break
                if self.error is None and not self.user_stop.is_set():
                    self._write(*item)
        except BaseException as e:  # noqa: BLE001 - handed to the caller, which re-raises it
            self._failed(e)
            self._drain()
        finally:
            try:
                self._close()
            except BaseException as e:  # noqa: BLE001 - e.g. the last JSON lines cannot be flushed to a full disk
                self._failed(e)

    def _failed(self, error: BaseException) -> None:
        if self.error is None:
            for out in (self.jsonl, self.video):  # an OSError naming no file comes from writing the JSON lines
                if out is not None:
                    out.name_error(error)  # the final file's name, not the temporary one's
            self.error = error
        self.failed.set()

    def _drain(self) -> None:
        while True:  # keep taking items so the caller never blocks on a full queue, until it says end
            if self.inbox.get() is _END:
                return

    def _write(self, index: int, timestamp: float, frame: np.ndarray, result: Any) -> None:
        t = time.perf_counter()
        image = self.draw_frame(frame, result) if self.draw else frame
        size = (image.shape[1], image.shape[0])
        if self.size is None:
            self.size, self.output_size = (frame.shape[1], frame.shape[0]), size
            self._open()
        elif size != self.output_size:
            raise ValueError(f"frame {index} was drawn at {size[0]}x{size[1]}, the video is "
                             f"{self.output_size[0]}x{self.output_size[1]}: every frame must be drawn at one size")
        if self._video is not None:
            _write_frame(self._video, image, index, self.video.finals[0])
        if self._json is not None:
            self._json.write(_frame_line(index, timestamp, self.record(result)) + "\n")
        self.frames_written += 1
        self.clock.add("draw+encode", t)
        if self.preview:
            cv2.imshow("deimv2 (q / Esc to stop)", image)
            if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                self.user_stop.set()
        if self.progress is not None:
            self.progress.update(1)

    def _open(self) -> None:
        if self.video is not None:
            self._video = _open_video_writer(self.video.tmp, self.fps, self.output_size, self.video.finals[0])
        if self.jsonl is not None:
            self._json = open(self.jsonl.tmp, "w", encoding="utf-8")  # noqa: SIM115 - closed in _close

    def _close(self) -> None:
        video, self._video = self._video, None
        if video is not None:
            video.release()  # writes the container index: a partial file stays playable
        json_file, self._json = self._json, None
        if json_file is not None:
            json_file.close()  # raises when the last lines cannot be written
        if self.preview:
            try:
                cv2.destroyAllWindows()
            except cv2.error:
                pass


def _finalise(video: AtomicWrite | None, jsonl: AtomicWrite | None, frames: int, error: BaseException | None
              ) -> tuple[BaseException | None, list[Path]]:
    """Publish the outputs when the run succeeded and every one verifies (the video reads back with all its
    frames, the JSON lines file has a line per frame); else keep what is usable as `<name>.partial<ext>`.
    Returns (the run's error, or the verification's; the paths now on disk)."""
    outputs = [o for o in (video, jsonl) if o is not None]
    if frames == 0:
        for out in outputs:
            out.discard()
        return error, []
    if video is not None:
        video.verify = _check_video(video.finals[0], frames)
    if jsonl is not None:
        jsonl.verify = _check_lines(jsonl.finals[0], frames)
    if error is None:
        try:
            for out in outputs:  # all verified before any is published
                out.check()
            return None, [path for out in outputs for path in out.publish()]
        except OSError as e:
            error = e
    kept = []
    if video is not None:
        kept += video.keep_partial(check=lambda p: video_frame_count(p) is not None)  # an unplayable one is removed
    if jsonl is not None:
        kept += jsonl.keep_partial()
    return error, kept


# --- run_video -------------------------------------------------------------------------------------------
def run_video(runtime: Any, source: str | int | os.PathLike, *, output: str | os.PathLike | None = None,
              json_path: str | os.PathLike | None = None, score_threshold: float = 0.4, batch: int = 1,
              max_frames: int | None = None, draw: bool = True, progress: bool = True, preview: bool = False,
              queue_size: int = 8, max_detections: int | None = None) -> VideoSummary:
    """Detect objects in every frame of `source`; write an annotated video and/or JSON lines.

    output: an .mp4 (mp4v, the source's resolution and frame rate). json_path: one JSON object per frame
    (`frame`, `timestamp` s, `boxes` xyxy px, `scores`, `labels`, `class_names`, and `category_ids` for a model
    carrying dataset category ids). On failure the stages stop, what was written is kept as
    `<name>.partial.<ext>` and the error is re-raised; nothing appears under the final names (Ctrl-C on a camera
    or stream is a normal end, not a failure). preview: a window (when this OpenCV has a GUI and a display exists;
    else a warning).
    max_detections: draw and record at most this many per frame (best first).
    """
    _check_options(score_threshold, max_frames, max_detections, queue_size)
    batch = _effective_batch(runtime, batch)

    def batches(reader: _Reader, clock: _Clock) -> Iterator[tuple[_Batch, list[Any]]]:
        return _infer_batches(runtime, reader, score_threshold, max_detections, clock)

    describe = getattr(runtime, "describe", None)
    return _run_source(source, output, json_path, preview, _Stages(
        _detector_prepare(runtime), batches, _annotate_in_place, _detection_fields,
        describe if callable(describe) else dict), batch=batch, max_frames=max_frames, draw=draw, progress=progress,
        capacity=_queue_capacity(queue_size, batch))


@dataclass(frozen=True)
class FrameModel:
    """Any per-frame model in the video pipeline (`run_frames`), one callable per stage, each called in its
    stage's thread: `prepare(frames)` in the reader (default: nothing), `predict(frames, prepared)` -> one result
    per frame in the caller, `draw(frame, result)` -> the output frame (any size, the same for every frame; it
    may draw on `frame`, which is its alone) and `record(result)` -> the JSON line's fields (beside `frame` and
    `timestamp`) in the writer. `describe()` goes into the summary's `runtime`."""

    predict: Callable[[list[np.ndarray], Any], Sequence[Any]]
    draw: Callable[[np.ndarray, Any], np.ndarray]
    record: Callable[[Any], dict[str, Any]]
    prepare: Callable[[list[np.ndarray]], Any] = lambda frames: None
    describe: Callable[[], dict[str, Any]] = dict


def run_frames(model: FrameModel, source: str | int | os.PathLike, *, output: str | os.PathLike | None = None,
               json_path: str | os.PathLike | None = None, batch: int = 1, max_frames: int | None = None,
               draw: bool = True, progress: bool = True, preview: bool = False, queue_size: int = 8
               ) -> VideoSummary:
    """`run_video` for a model that is not a DEIMv2 detector (EoMT segmentation, DINOv3 features: vit_video.py):
    the same source opening, reader thread, writer (verified, published atomically, `<name>.partial.<ext>` kept
    on failure, Ctrl-C or SIGTERM), progress bar and summary; `batch` frames per `model.predict` call."""
    _check_options(0.0, max_frames, None, queue_size)
    if not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")

    def batches(reader: _Reader, clock: _Clock) -> Iterator[tuple[_Batch, Sequence[Any]]]:
        try:
            for item in _read_batches(reader):
                t = time.perf_counter()
                results = model.predict(item.frames, item.prepared)
                clock.add("infer", t)
                if len(results) != len(item.frames):
                    raise ValueError(f"the model gave {len(results)} results for {len(item.frames)} frames (bug)")
                yield item, results
        finally:
            reader.stop.set()
            reader.join()

    return _run_source(source, output, json_path, preview,
                       _Stages(model.prepare, batches, model.draw, model.record, model.describe),
                       batch=int(batch), max_frames=max_frames, draw=draw, progress=progress,
                       capacity=_queue_capacity(queue_size, int(batch)))


@dataclass(frozen=True)
class _Stages:
    """What the pipeline runs in each thread (the detector's, or a FrameModel's)."""

    prepare: Callable[[list[np.ndarray]], Any]  # reader
    batches: Callable[[_Reader, _Clock], Iterator[tuple[_Batch, Sequence[Any]]]]  # caller: starts, stops the reader
    draw: Callable[[np.ndarray, Any], np.ndarray]  # writer
    record: Callable[[Any], dict[str, Any]]  # writer
    describe: Callable[[], dict[str, Any]]


def _detector_prepare(runtime: Any) -> Callable[[list[np.ndarray]], PreparedBatch]:
    return lambda frames: runtime.prepare(frames, "bgr")


def _run_source(source: str | int | os.PathLike, output: str | os.PathLike | None,
                json_path: str | os.PathLike | None, preview: bool, stages: _Stages, **options: Any) -> VideoSummary:
    """Check the output names, open the source and the outputs, run the pipeline."""
    out_path = Path(output) if output is not None else None
    jsonl_path = Path(json_path) if json_path is not None else None
    for p in (out_path, jsonl_path):
        if p is not None and p.is_dir():
            raise IsADirectoryError(f"{p} is a folder: give a file name such as {p / 'out.mp4'}")
    if out_path is not None and out_path.suffix.lower() not in (".mp4", ".m4v", ".mov", ".avi", ".mkv"):
        raise ValueError(f"output must be a video file name ending in .mp4 (mp4v codec), got {out_path}")
    if preview:
        reason = preview_unavailable_reason()
        if reason:
            warnings.warn(f"no preview window: {reason}", RuntimeWarning, stacklevel=3)
            preview = False

    kind, target = _parse_source(source)
    if out_path is not None and kind == "file" and out_path.resolve() == target.resolve():
        raise ValueError(f"output {out_path} is the input video: choose another output name")
    with stop_signals_as_interrupt():  # SIGTERM / SIGHUP end the run as Ctrl-C does: partial output kept
        src = open_source(source)
        try:  # the output folders only now: a source that cannot be read leaves none behind
            video_out = AtomicWrite(out_path).prepare() if out_path is not None else None
            jsonl_out = AtomicWrite(jsonl_path).prepare() if jsonl_path is not None else None
        except BaseException:
            src.release()
            raise
        return _run_pipeline(stages, src, video_out, jsonl_out, preview=preview, **options)


def _run_pipeline(stages: _Stages, src: VideoSource, video_out: AtomicWrite | None, jsonl_out: AtomicWrite | None, *,
                  batch: int, max_frames: int | None, draw: bool, progress: bool, preview: bool, capacity: int
                  ) -> VideoSummary:
    expected = src.frame_count if max_frames is None else (min(src.frame_count, max_frames)
                                                           if src.frame_count else max_frames)
    bar = None
    reader = _Reader(src, stages.prepare, batch, max_frames, capacity)
    writer = _Writer(video_out, jsonl_out, src.fps, draw, preview, None, capacity * batch, stages.draw,
                     stages.record)
    infer_clock = _Clock()
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=expected, unit="frame", desc=Path(src.name).name if src.kind == "file" else src.name,
                       dynamic_ncols=True, smoothing=0.1)
            writer.progress = bar
        writer.start()
        batches = stages.batches(reader, infer_clock)
        try:
            for item, results in batches:
                for record in zip(item.indices, item.timestamps, item.frames, results, strict=True):
                    if not _put(writer.inbox, record, writer.failed):
                        raise writer.error  # type: ignore[misc]  # the writer failed: stop feeding it
                if writer.user_stop.is_set():
                    break
        finally:
            with shielded():
                batches.close()  # stops and joins the reader
    except BaseException as e:  # noqa: BLE001 - finalised below, then re-raised
        error = e
    with shielded():  # a stop signal now waits until the outputs are published or kept as partial
        if writer.ident is not None:  # started
            writer.inbox.put(_END)  # the writer drains until _END even after a failure: this cannot block long
            writer.join()
        if bar is not None:
            bar.close()
        if error is None and writer.error is not None:
            error = writer.error
        stopped = writer.user_stop.is_set()
        if isinstance(error, KeyboardInterrupt) and src.live:  # Ctrl-C is how a camera or stream run ends
            error, stopped = None, True
        if reader.ident is None:
            src.release()  # the reader never started (when it runs, it releases the source itself)
        wall = time.perf_counter() - start
        error, written = _finalise(video_out, jsonl_out, writer.frames_written, error)
    if error is not None:
        if written:
            error.add_note(f"{writer.frames_written} frames done; partial output kept: " + ", ".join(map(str, written)))
        elif writer.frames_written and (video_out or jsonl_out):
            error.add_note(f"{writer.frames_written} frames done; nothing usable was written")
        raise error
    final_video = video_out.finals[0] if video_out is not None else None
    final_json = jsonl_out.finals[0] if jsonl_out is not None else None
    if not writer.frames_written:
        final_video = final_json = None
    seconds = {**reader.clock.seconds}
    seconds["infer"] = infer_clock.seconds["infer"]
    seconds["draw+encode"] = writer.clock.seconds["draw+encode"]
    width, height = writer.size or (0, 0)
    return VideoSummary(
        source=src.name, frames=writer.frames_written, width=width, height=height, fps=src.fps,
        fps_reported=src.fps_reported, wall_s=wall,
        batch=batch, stage_s=seconds, output=str(final_video) if final_video else None,
        json_path=str(final_json) if final_json else None, expected_frames=expected,
        stopped_early=stopped, runtime=stages.describe(),
        output_size=list(writer.output_size) if final_video and writer.output_size != writer.size else None,
    )
