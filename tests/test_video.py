"""Video pipeline: every frame in order, same size/fps out, batching, clear errors, failures that stop cleanly.

The model is the atto ONNX with random weights (exported once for this module, about 10 s); tests of the
plumbing alone use a tiny fake Runtime whose outputs depend on the frame, so mixing frames up would show.
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from deimv2_deploy.runtimes.base import Backend, Runtime
from deimv2_deploy.spec import ArtifactSpec
from deimv2_deploy.video import (
    VideoSourceError,
    VideoSummary,
    partial_path,
    preview_unavailable_reason,
    run_video,
    stream,
    write_synthetic_video,
)

FRAMES, WIDTH, HEIGHT, FPS = 130, 854, 480, 25.0


# --- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_synthetic_video(tmp_path_factory.mktemp("video") / "moving_shapes.mp4", FRAMES,
                                 (WIDTH, HEIGHT), FPS)


@pytest.fixture(scope="module")
def atto_path(atto_onnx) -> Path:
    """The session's atto ONNX (random weights), exported once in conftest.py."""
    return atto_onnx.path


@pytest.fixture(scope="module")
def atto(atto_path) -> Iterator[Runtime]:
    from deimv2_deploy.runtimes import load_runtime

    runtime = load_runtime(atto_path, backend="onnxruntime", threads=1)
    yield runtime
    runtime.close()


class FakeRuntime(Runtime):
    """Ten detections per image computed from the image itself (its channel means), so order matters."""

    backend = Backend.ONNXRUNTIME

    def __init__(self, batch: int | None = None) -> None:
        super().__init__(ArtifactSpec.for_variant("atto", batch=batch))
        self.calls: list[int] = []  # batch size of every graph call

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def version(cls) -> str | None:
        return "fake"

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, sizes = inputs["images"], inputs["orig_target_sizes"]
        n, k = images.shape[0], 10
        self.calls.append(n)
        means = images.mean(axis=(2, 3))  # (N, 3)
        frac = np.linspace(0.05, 0.5, k, dtype=np.float32)[None, :]  # (1, K)
        x1 = frac * means[:, :1]  # (N, K), in [0, 0.5]
        y1 = frac * means[:, 1:2]
        wh = sizes[:, None, :].astype(np.float32)  # (N, 1, 2) as (w, h)
        boxes = np.stack([x1, y1, x1 + 0.4, y1 + 0.4], axis=-1) * np.concatenate([wh, wh], axis=-1)
        scores = np.clip(means[:, 2:3] * (1.0 - frac), 0, 1).astype(np.float32)
        labels = (np.arange(k)[None, :] + (means[:, :1] * 100).astype(np.int64)) % 80
        return {"labels": labels.astype(np.int64), "boxes": boxes.astype(np.float32), "scores": scores}


class FailingRuntime(Runtime):
    """Wraps a runtime; its graph call raises once `fail_at` frames have gone through."""

    def __init__(self, inner: Runtime, fail_at: int) -> None:
        super().__init__(inner.spec, inner.device)
        self.inner, self.fail_at, self.seen = inner, fail_at, 0
        self.backend = inner.backend

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def version(cls) -> str | None:
        return "failing"

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = inputs["images"].shape[0]
        if self.seen + n > self.fail_at:
            raise RuntimeError(f"injected model failure at frame {self.fail_at}")
        self.seen += n
        return self.inner._infer(inputs)


class AsyncFakeRuntime(FakeRuntime):
    """The OpenVINO-style async hook: submit(inputs, userdata) + results(wait) -> [(userdata, outputs)]."""

    def __init__(self) -> None:
        super().__init__()
        self._done: list[tuple[object, dict[str, np.ndarray]]] = []
        self.submitted = 0

    def submit(self, inputs, userdata=None) -> None:
        self.submitted += 1
        self._done.append((userdata, self.infer(inputs)))

    def results(self, wait: bool = False):
        keep = 0 if wait else 1  # hold one back unless asked to wait, as a busy request would
        out, self._done = self._done[:len(self._done) - keep], self._done[len(self._done) - keep:]
        return out

    @property
    def pending(self) -> int:
        return len(self._done)


def read_video(path: Path) -> tuple[int, int, int, float, list[np.ndarray]]:
    """(frames decoded, width, height, fps, the first three frames)."""
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened(), f"cannot read back {path}"
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = cap.get(cv2.CAP_PROP_FPS)
    n, first = 0, []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        if n < 3:
            first.append(frame)
        n += 1
    cap.release()
    return n, w, h, fps, first


def pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("deimv2-video")]


# --- with the atto ONNX ----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_run_video_writes_every_frame_at_source_size_and_fps(atto, video, tmp_path):
    out, jsonl = tmp_path / "out" / "annotated.mp4", tmp_path / "out" / "detections.jsonl"
    summary = run_video(atto, video, output=out, json_path=jsonl, score_threshold=0.5, max_detections=5,
                        progress=False)

    n, w, h, fps, first = read_video(out)
    assert (n, w, h) == (FRAMES, WIDTH, HEIGHT)
    assert fps == pytest.approx(FPS)
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert len(records) == FRAMES
    assert [r["frame"] for r in records] == list(range(FRAMES))
    assert [r["timestamp"] for r in records] == pytest.approx([i / FPS for i in range(FRAMES)])
    for r in records:
        assert len(r["boxes"]) == len(r["scores"]) == len(r["labels"]) == len(r["class_names"]) <= 5
        assert all(s >= 0.5 for s in r["scores"]) and r["scores"] == sorted(r["scores"], reverse=True)
    assert sum(len(r["boxes"]) for r in records) > 0, "random weights should still give some boxes to draw"
    # the output is the source with boxes drawn on it: close to the source away from the boxes, not equal
    source_first = read_video(video)[4][0]
    assert not np.array_equal(first[0], source_first)
    assert sorted(p.name for p in out.parent.iterdir()) == ["annotated.mp4", "detections.jsonl"]  # no temp left

    assert isinstance(summary, VideoSummary)
    assert (summary.frames, summary.width, summary.height, summary.fps) == (FRAMES, WIDTH, HEIGHT, FPS)
    assert summary.output == str(out) and summary.json_path == str(jsonl)
    assert summary.end_to_end_fps > 0 and summary.model_fps >= summary.end_to_end_fps * 0.5
    assert set(summary.stage_s) == {"decode", "preprocess", "infer", "draw+encode"}
    assert all(v > 0 for v in summary.stage_s.values())
    as_json = json.loads(summary.to_json())
    assert as_json["frames"] == FRAMES and as_json["runtime"]["backend"] == "onnxruntime"
    assert "| infer | caller |" in summary.table()
    assert not pipeline_threads()




@pytest.mark.timeout(60)
def test_batch_of_four_gives_the_same_detections_as_one(atto, video):
    one = list(stream(atto, video, batch=1, max_frames=22))
    four = list(stream(atto, video, batch=4, max_frames=22))  # 22 = 5 full batches + a partial one
    assert [i for i, _, _ in four] == list(range(22))
    for (i, _, a), (j, _, b) in zip(one, four, strict=True):
        assert i == j and len(a) == len(b) == 300
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-4)
        # top-k order may swap near-equal scores: compare the confident ones, which are well separated
        top = a.scores > a.scores[20]
        np.testing.assert_allclose(b.xyxy[top], a.xyxy[top], atol=1e-2)
        np.testing.assert_array_equal(b.labels[top], a.labels[top])


@pytest.mark.timeout(60)
def test_model_failure_stops_the_run_and_keeps_a_partial_video(atto, video, tmp_path):
    out, jsonl = tmp_path / "out.mp4", tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError, match="injected model failure at frame 50") as info:
        run_video(FailingRuntime(atto, fail_at=50), video, output=out, json_path=jsonl, score_threshold=0.5,
                  max_detections=5, progress=False)
    assert not out.exists() and not jsonl.exists()
    assert partial_path(out) == tmp_path / "out.partial.mp4"
    n, w, h, fps, _ = read_video(tmp_path / "out.partial.mp4")
    assert n == 50 and (w, h) == (WIDTH, HEIGHT)  # every frame inferred before the failure was written
    assert len((tmp_path / "out.partial.jsonl").read_text().splitlines()) == 50
    assert any("partial output kept" in note for note in getattr(info.value, "__notes__", []))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.partial.jsonl", "out.partial.mp4"]
    assert not pipeline_threads()


# --- plumbing with a fake model --------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_stream_yields_every_frame_in_order(video):
    runtime, seen = FakeRuntime(), []
    cap = cv2.VideoCapture(str(video))
    for index, frame, dets in runtime.stream(video, score_threshold=0.3, batch=3):
        ok, expected = cap.read()
        assert ok and np.array_equal(frame, expected)  # the untouched decoded frame, in order
        assert dets.image_size == (HEIGHT, WIDTH)
        # the fake's detections are a function of the frame: they must be this frame's
        assert len(dets) and np.all(dets.scores >= 0.3)
        alone = runtime.predict(expected, score_threshold=0.3)
        np.testing.assert_allclose(dets.scores, alone.scores, rtol=1e-6)
        np.testing.assert_allclose(dets.xyxy, alone.xyxy, rtol=1e-6)
        seen.append(index)
    cap.release()
    assert seen == list(range(FRAMES))
    assert not pipeline_threads()


@pytest.mark.timeout(60)
def test_async_hook_and_fixed_batch_give_the_same_results_as_plain_infer(video):
    plain = [(i, d) for i, _, d in stream(FakeRuntime(), video, max_frames=30)]

    asynchronous = AsyncFakeRuntime()
    got = [(i, d) for i, _, d in stream(asynchronous, video, max_frames=30)]
    assert asynchronous.submitted == 30 and asynchronous.pending == 0

    fixed = FakeRuntime(batch=4)  # a fixed-batch artifact: 30 frames = 7 batches + 2 frames padded to 4
    padded = [(i, d) for i, _, d in stream(fixed, video, max_frames=30)]
    assert fixed.calls == [4] * 8

    for other in (got, padded):
        assert [i for i, _ in other] == list(range(30))
        for (_, a), (_, b) in zip(plain, other, strict=True):
            np.testing.assert_allclose(b.xyxy, a.xyxy, rtol=1e-6)
            np.testing.assert_array_equal(b.labels, a.labels)


@pytest.mark.timeout(60)
def test_breaking_out_of_stream_stops_the_reader(video):
    for index, _, _ in stream(FakeRuntime(), video, queue_size=2):
        if index == 5:
            break
    # the generator is closed when it is collected; close explicitly to be deterministic
    it = stream(FakeRuntime(), video, queue_size=2)
    next(it)
    it.close()
    assert not pipeline_threads()


@pytest.mark.timeout(60)
def test_error_in_the_reader_stage_is_raised_and_partial_kept(video, tmp_path):
    class FailingPreprocess(FakeRuntime):  # prepare() runs in the reader thread
        def prepare(self, images, color="bgr"):
            self.frames = getattr(self, "frames", 0) + len(images)
            if self.frames > 40:
                raise ValueError("injected decode-side failure")
            return super().prepare(images, color)

    out = tmp_path / "r.mp4"
    with pytest.raises(ValueError, match="injected decode-side failure"):
        run_video(FailingPreprocess(), video, output=out, progress=False)
    assert not out.exists()
    assert read_video(tmp_path / "r.partial.mp4")[0] == 40
    assert not pipeline_threads()


@pytest.mark.timeout(60)
def test_error_in_the_writer_stage_is_raised_without_hanging(video, tmp_path, monkeypatch):
    import deimv2_deploy.video as video_module

    calls = {"n": 0}
    real = video_module.annotate

    def annotate_then_fail(image, detections, **kwargs):
        calls["n"] += 1
        if calls["n"] > 30:
            raise OSError("injected encoder failure")
        return real(image, detections, **kwargs)

    monkeypatch.setattr(video_module, "annotate", annotate_then_fail)
    out = tmp_path / "w.mp4"
    with pytest.raises(OSError, match="injected encoder failure"):
        run_video(FakeRuntime(), video, output=out, json_path=tmp_path / "w.jsonl", progress=False, queue_size=2)
    assert not out.exists()
    assert read_video(tmp_path / "w.partial.mp4")[0] == 30
    assert len((tmp_path / "w.partial.jsonl").read_text().splitlines()) == 30
    assert not pipeline_threads()


@pytest.mark.timeout(60)
def test_max_frames_and_json_only(video, tmp_path):
    jsonl = tmp_path / "d.jsonl"
    summary = run_video(FakeRuntime(), video, json_path=jsonl, max_frames=12, batch=5, progress=False,
                        score_threshold=0.0)
    assert summary.frames == 12 and summary.output is None and summary.batch == 5
    records = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(12))
    assert all(len(r["boxes"]) == 10 for r in records)


# --- clear errors ------------------------------------------------------------------------------------------
def test_missing_empty_corrupt_and_frameless_files_give_clear_errors(tmp_path):
    runtime = FakeRuntime()
    with pytest.raises(FileNotFoundError, match="video not found"):
        run_video(runtime, tmp_path / "nope.mp4", progress=False)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoSourceError, match="empty"):
        list(stream(runtime, empty))
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoSourceError, match="cannot decode .*corrupt"):
        run_video(runtime, corrupt, output=tmp_path / "o.mp4", progress=False)
    with pytest.raises(IsADirectoryError, match="folder"):
        run_video(runtime, tmp_path, progress=False)

    # an AVI cut right after its header: opens, but holds no frame
    avi = tmp_path / "full.avi"
    writer = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(5):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    data = avi.read_bytes()
    frameless = tmp_path / "frameless.avi"
    frameless.write_bytes(data[:data.index(b"movi") + 4])
    out = tmp_path / "frameless_out.mp4"
    with pytest.raises(VideoSourceError, match="no frames could be decoded"):
        run_video(runtime, frameless, output=out, json_path=tmp_path / "f.jsonl", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.mp4", "empty.mp4", "frameless.avi", "full.avi"]
    assert not pipeline_threads()


def test_bad_options_and_unopenable_camera(video, tmp_path):
    runtime = FakeRuntime()
    with pytest.raises(ValueError, match="score_threshold"):
        run_video(runtime, video, score_threshold=1.5, progress=False)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        run_video(runtime, video, batch=0, progress=False)
    with pytest.raises(ValueError, match="fixed batch of 4"):
        stream(FakeRuntime(batch=4), video, batch=3)
    with pytest.raises(ValueError, match="output must be a video file"):
        run_video(runtime, video, output=tmp_path / "out.txt", progress=False)
    with pytest.raises(VideoSourceError, match="cannot open camera 97"):
        stream(runtime, 97)
    with pytest.raises(VideoSourceError, match="cannot open stream rtsp://127.0.0.1:9/none"):
        stream(runtime, "rtsp://127.0.0.1:9/none")  # nothing listens on the discard port: refused at once
    with pytest.raises(ValueError, match="is the input video"):
        run_video(runtime, video, output=video, progress=False)


def test_preview_without_a_display_warns_and_still_runs(video, tmp_path):
    reason = preview_unavailable_reason()
    if reason is None:
        pytest.skip("this machine can show a window; the headless path is not exercised here")
    with pytest.warns(RuntimeWarning, match="no preview window"):
        summary = run_video(FakeRuntime(), video, max_frames=3, preview=True, progress=False)
    assert summary.frames == 3


# --- the command line ----------------------------------------------------------------------------------------
@pytest.mark.timeout(60)
def test_deimv2_infer_runs_a_video_through_the_pipeline(atto_path, video, tmp_path, capsys):
    from deimv2_deploy.cli.infer import main

    summary_path = tmp_path / "summary.json"
    status = main([str(atto_path), str(video), "--output-dir", str(tmp_path), "--json", "--max-frames", "12",
                   "--batch", "2", "--threads", "1", "--no-progress", "--summary-json", str(summary_path)])
    assert status == 0
    assert read_video(tmp_path / "moving_shapes.mp4")[:3] == (12, WIDTH, HEIGHT)
    assert len((tmp_path / "moving_shapes.jsonl").read_text().splitlines()) == 12
    summary = json.loads(summary_path.read_text())
    assert summary["frames"] == 12 and summary["batch"] == 2
    assert "end-to-end" in capsys.readouterr().out

    status = main([str(atto_path), str(tmp_path / "missing.mp4"), "--no-progress"])
    assert status == 1
    assert "video not found" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_deimv2_infer_runs_openvino_videos_with_requests_in_flight(atto_path, video, tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed")
    from deimv2_deploy.cli.infer import main

    summary_path = tmp_path / "summary.json"
    status = main([str(atto_path), str(video), "--backend", "openvino", "--output-dir", str(tmp_path), "--json",
                   "--max-frames", "12", "--no-progress", "--summary-json", str(summary_path)])
    assert status == 0
    summary = json.loads(summary_path.read_text())
    assert summary["runtime"]["backend"] == "openvino" and summary["runtime"]["performance_mode"] == "throughput"
    records = [json.loads(line) for line in (tmp_path / "moving_shapes.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(12))  # several requests in flight, order kept


def test_video_runtime_options_per_backend():
    from deimv2_deploy.video import video_runtime_options

    assert video_runtime_options("m/deimv2_atto_fp32.onnx") == {"spinning": False}
    assert video_runtime_options("m/deimv2_atto_fp32.xml") == {"mode": "throughput"}
    assert video_runtime_options("m/deimv2_atto_fp32.onnx", "openvino") == {"mode": "throughput"}
    assert video_runtime_options("m/deimv2_atto_fp32.onnx", "ORT") == {"spinning": False}
    assert video_runtime_options("m/deimv2_atto_fp16.engine") == {}
    assert video_runtime_options("checkpoint.pth", "torch") == {}


def test_video_cli_helpers():
    from deimv2_deploy.cli.video_cli import default_outputs, looks_like_video

    assert looks_like_video("clip.MP4") and looks_like_video("0") and looks_like_video("rtsp://cam/stream")
    assert not looks_like_video("photo.jpg") and not looks_like_video("http://host/photo.jpg")
    assert default_outputs("in/clip.mp4", "out", True, True) == (Path("out/clip.mp4"), Path("out/clip.jsonl"))
    assert default_outputs("0", "out", "d.jsonl", False) == (None, Path("d.jsonl"))
    assert default_outputs("rtsp://cam:554/live", "o", None, True) == (Path("o/live.mp4"), None)


def test_the_video_path_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, deimv2_deploy.video, deimv2_deploy.cli.video_cli; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
