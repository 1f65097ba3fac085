"""deimv2-infer on videos for EoMT-DINOv3 and DINOv3 artifacts: the detector's video pipeline with other frames drawn
and other JSON lines. Tiny transformers-written models (tests/vit_helpers.py) on a short generated clip."""
from __future__ import annotations

import json
import os
import signal

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers (pinned 5.24)")

from vit_helpers import tiny_vit_artifacts  # noqa: E402

from deimv2_deploy.cli.infer import main as infer_main  # noqa: E402
from deimv2_deploy.drawing import draw_segmentation, embeddings_pca_image  # noqa: E402
from deimv2_deploy.runtimes import load_runtime  # noqa: E402
from deimv2_deploy.video import write_synthetic_video  # noqa: E402
from deimv2_deploy.vit_records import array_from_record, rle_decode  # noqa: E402
from deimv2_deploy.vit_video import run_vit_video  # noqa: E402

FRAMES, WIDTH, HEIGHT, FPS = 16, 192, 160, 12.0


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit_video")
    artifacts = tiny_vit_artifacts(root)
    clip = write_synthetic_video(root / "clip.mp4", FRAMES, (WIDTH, HEIGHT), FPS)
    return {**artifacts, "clip": clip}


def _frames(path, limit=None):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while limit is None or len(frames) < limit:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    fps = capture.get(cv2.CAP_PROP_FPS)
    capture.release()
    return frames, fps


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.timeout(120)
def test_eomt_video_draws_every_frame_and_writes_rle_json_lines(made, tmp_path, capsys):
    out = tmp_path / "out"
    assert infer_main([str(made["eomt"]), str(made["clip"]), "--output-dir", str(out), "--json", "--score", "0.2",
                       "--threads", "1", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clip.jsonl", "clip.mp4"]  # no temp left
    assert "end-to-end" in capsys.readouterr().out

    source, _ = _frames(made["clip"])
    drawn, fps = _frames(out / "clip.mp4")
    assert len(source) == len(drawn) == FRAMES and fps == pytest.approx(FPS)
    assert all(f.shape == (HEIGHT, 3 * WIDTH, 3) for f in drawn)  # semantic | instance | panoptic, each source size

    runtime = load_runtime(made["eomt"])
    records = _lines(out / "clip.jsonl")
    assert [r["frame"] for r in records] == list(range(FRAMES))
    assert [r["timestamp"] for r in records] == pytest.approx([i / FPS for i in range(FRAMES)], abs=1e-6)
    lines = (out / "clip.jsonl").read_text().splitlines()
    instances_seen = 0
    for frame, picture, record, line in zip(source, drawn, records, lines, strict=True):
        want = runtime.predict(frame, tasks=("semantic", "instance", "panoptic"))
        assert record["image_size"] == [HEIGHT, WIDTH]
        # semantic: one RLE mask per class present; together they rebuild the map exactly
        rebuilt = np.full((HEIGHT, WIDTH), -1, np.int64)
        for row in record["semantic"]["classes"]:
            mask = rle_decode(row["segmentation"])
            assert (rebuilt[mask] == -1).all() and row["pixels"] == mask.sum()
            rebuilt[mask] = row["label"]
        np.testing.assert_array_equal(rebuilt, want.semantic)
        kept = want.instances.filter(0.2)
        assert len(record["instances"]) == len(kept)
        for row, mask, score, label in zip(record["instances"], kept.masks, kept.scores, kept.labels, strict=True):
            np.testing.assert_array_equal(rle_decode(row["segmentation"]), mask)
            assert row["label"] == label and abs(row["score"] - score) < 1e-6
        instances_seen += len(kept)
        assert [s["id"] for s in record["panoptic"]["segments"]] == [s.id for s in want.panoptic.segments]
        for row in record["panoptic"]["segments"]:
            np.testing.assert_array_equal(rle_decode(row["segmentation"]), want.panoptic.mask(row["id"]))
        # the frame drawn is this frame's overlay (mp4v is lossy: close, not equal; the undrawn frame is far)
        expected = draw_segmentation(frame, want, 0.2).astype(np.float32)
        off = np.abs(picture - expected).mean()
        assert off < 12.0 and off < 0.25 * np.abs(picture - np.tile(frame, (1, 3, 1)).astype(np.float32)).mean()
        # a line stays small: its masks as RLE take less than the same masks packed at one bit per pixel, even for
        # the ragged masks of random weights (no PNG, no pixel lists; semantic: one mask per class present)
        masks = len(record["semantic"]["classes"]) + len(record["instances"]) + len(record["panoptic"]["segments"])
        assert len(line) < masks * HEIGHT * WIDTH / 8
        assert len(json.dumps(record["semantic"])) < len(record["semantic"]["classes"]) * HEIGHT * WIDTH / 8
    assert instances_seen > 0


@pytest.mark.timeout(120)
def test_eomt_video_task_max_detections_and_json_path(made, tmp_path):
    jsonl, video = tmp_path / "seg.jsonl", tmp_path / "v" / "seg.mp4"
    assert infer_main([str(made["eomt"]), str(made["clip"]), "--task", "instance", "--score", "0",
                       "--max-detections", "2", "--max-frames", "5", "--batch", "2", "--json", str(jsonl),
                       "--output", str(video), "--no-progress"]) == 0
    drawn, fps = _frames(video)
    assert len(drawn) == 5 and drawn[0].shape == (HEIGHT, WIDTH, 3) and fps == pytest.approx(FPS)  # one task
    records = _lines(jsonl)
    assert [r["frame"] for r in records] == list(range(5))
    assert all(len(r["instances"]) == 2 and "semantic" not in r and "panoptic" not in r for r in records)


@pytest.mark.timeout(120)
def test_dinov3_video_shows_pca_and_writes_cls_and_pooled(made, tmp_path):
    out = tmp_path / "d"
    assert infer_main([str(made["dino"]), str(made["clip"]), "--output-dir", str(out), "--json", "--batch", "3",
                       "--max-frames", "10", "--no-progress"]) == 0
    source, _ = _frames(made["clip"], 10)
    drawn, fps = _frames(out / "clip.mp4")
    assert len(drawn) == 10 and fps == pytest.approx(FPS)
    assert all(f.shape == (HEIGHT, 2 * WIDTH, 3) for f in drawn)  # frame | PCA colours
    runtime = load_runtime(made["dino"])
    records = _lines(out / "clip.jsonl")
    assert [r["frame"] for r in records] == list(range(10))
    for frame, picture, record in zip(source, drawn, records, strict=True):
        emb = runtime.predict(frame)
        assert "patches" not in record and record["grid"] == list(emb.grid) and record["dim"] == emb.dim
        # batches of 3 against one frame at a time: the same numbers up to float reordering
        np.testing.assert_allclose(array_from_record(record["cls"]), emb.cls, atol=1e-5)
        np.testing.assert_allclose(array_from_record(record["pooled"]), emb.pooled, atol=1e-5)
        assert np.abs(picture[:, :WIDTH] - frame.astype(np.float32)).mean() < 6.0
        assert np.abs(picture[:, WIDTH:] - embeddings_pca_image(emb).astype(np.float32)).mean() < 12.0


def _one_line(capsys, argv) -> str:
    capsys.readouterr()
    assert infer_main(argv) == 1
    *before, err = capsys.readouterr().err.strip().splitlines()
    assert err.startswith("deimv2-infer:") and "Traceback" not in err
    assert all(line.startswith("loaded ") for line in before), before  # at most the artifact's "loaded" line
    return err


def test_bad_video_inputs_are_one_line(made, tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "x"), "--no-progress"]
    err = _one_line(capsys, [str(made["eomt"]), "97", *out])
    assert "cannot open camera 97" in err
    err = _one_line(capsys, [str(made["dino"]), "--source", "97", *out])
    assert "cannot open camera 97" in err
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    err = _one_line(capsys, [str(made["eomt"]), str(corrupt), *out])
    assert f"cannot decode {corrupt} as a video" in err
    err = _one_line(capsys, [str(made["dino"]), str(tmp_path / "missing.mp4"), *out])
    assert "video not found" in err
    err = _one_line(capsys, [str(made["dino"]), str(made["clip"]), "--task", "semantic", *out])
    assert "--task is for EoMT segmentation artifacts" in err
    err = _one_line(capsys, [str(made["eomt_nostuff"]), str(made["clip"]), "--task", "panoptic", *out])
    assert "does not record which classes are stuff" in err
    err = _one_line(capsys, [str(made["eomt"]), str(made["clip"]), "--letterbox", *out])
    assert "--letterbox is for DEIMv2 detector artifacts" in err
    assert not (tmp_path / "x").exists()  # nothing was written for any of them


class _StopsAt:
    """A ViT runtime whose predict raises `error` (or sends `signum` to this process) once `at` frames are done."""

    def __init__(self, inner, at, error=None, signum=None):
        self.inner, self.at, self.error, self.signum, self.done = inner, at, error, signum, 0
        self.spec = inner.spec

    def describe(self):
        return self.inner.describe()

    def stuff_classes(self, override=None):
        return self.inner.stuff_classes(override)

    def predict(self, frames, **kwargs):
        if self.done + len(frames) > self.at:
            if self.signum is not None:
                os.kill(os.getpid(), self.signum)
            raise self.error
        self.done += len(frames)
        return self.inner.predict(frames, **kwargs)


@pytest.mark.timeout(120)
def test_a_failure_or_sigterm_keeps_partial_output(made, tmp_path):
    eomt = load_runtime(made["eomt"])
    out, jsonl = tmp_path / "e.mp4", tmp_path / "e.jsonl"
    with pytest.raises(RuntimeError, match="injected") as info:
        run_vit_video(_StopsAt(eomt, 6, RuntimeError("injected")), made["clip"], output=out, json_path=jsonl,
                      tasks=("semantic",), progress=False)
    assert any("partial output kept" in note for note in info.value.__notes__)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.partial.jsonl", "e.partial.mp4"]
    frames, _ = _frames(tmp_path / "e.partial.mp4")
    assert len(frames) == 6 and frames[0].shape == (HEIGHT, WIDTH, 3)
    assert [r["frame"] for r in _lines(tmp_path / "e.partial.jsonl")] == list(range(6))

    from deimv2_deploy.signals import Terminated

    dino = load_runtime(made["dino"])
    out = tmp_path / "t" / "d.mp4"
    with pytest.raises(Terminated):  # SIGTERM stops the run as Ctrl-C does
        run_vit_video(_StopsAt(dino, 4, RuntimeError("signal not delivered"), signal.SIGTERM), made["clip"],
                      output=out, batch=2, progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["d.partial.mp4"]
    assert len(_frames(out.parent / "d.partial.mp4")[0]) == 4


def test_run_vit_video_refuses_eomt_options_on_dinov3(made, tmp_path):
    with pytest.raises(ValueError, match="tasks is for EoMT segmentation"):
        run_vit_video(load_runtime(made["dino"]), made["clip"], tasks=("semantic",), progress=False)


def test_the_vit_video_path_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys, deimv2_deploy.vit_video, deimv2_deploy.cli.infer_vit, deimv2_deploy.runtimes.vit_runtime; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
