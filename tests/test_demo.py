"""`make demo` (deimv2_deploy.demo): export, image inference and the video step run end to end.

The model table (all eight sizes) and the benchmark step are covered by the slow test; the fast one runs atto
through export -> deimv2-infer -> the video pipeline, which is where the demo meets every part of the package.
"""
from __future__ import annotations

import json

import cv2
import pytest

pytest.importorskip("torch", reason="the demo exports models: needs torch (pip install .[export])")

from deimv2_deploy.demo import main  # noqa: E402


def _video_facts(path) -> tuple[int, int, int]:
    capture = cv2.VideoCapture(str(path))
    try:
        frames = 0
        while capture.read()[0]:
            frames += 1
        return frames, int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    finally:
        capture.release()


def _check_outputs(out, example_image_path) -> None:
    annotated = out / "atto" / (example_image_path.stem + ".jpg")
    assert annotated.exists() and cv2.imread(str(annotated)) is not None
    assert _video_facts(out / "clip.mp4") == (120, 854, 480)
    assert _video_facts(out / "clip_annotated.mp4") == (120, 854, 480)
    records = [json.loads(line) for line in (out / "clip.jsonl").read_text().splitlines()]
    assert [r["frame"] for r in records] == list(range(120))
    # random weights: the demo draws (and records) only the ten best detections of each frame
    assert all(len(r["scores"]) <= 10 for r in records) and any(r["scores"] for r in records)
    assert not list(out.glob("*.partial.*")) and not list(out.glob(".*tmp*"))


def test_demo_exports_infers_and_runs_the_video(tmp_path, example_image_path, capsys):
    out = tmp_path / "out"
    code = main(["--shared", str(example_image_path.parents[1]), "--store", str(tmp_path / "store"),
                 "--out", str(out), "--sizes", "atto", "--skip", "table,bench,trained"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "DETERMINISTIC RANDOM WEIGHTS" in printed and "video pipeline" in printed
    assert (tmp_path / "store" / "deimv2_atto_random_fp32.onnx").exists()
    _check_outputs(out, example_image_path)


@pytest.mark.parametrize("args, message", [
    (["--sizes", "atto,huge"], "--sizes"),
    (["--sizes", ","], "--sizes"),
    (["--skip", "tabel"], "--skip: unknown part"),
])
def test_demo_refuses_bad_options(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_whole_demo_as_make_demo_runs_it(tmp_path, example_image_path, capsys):
    out = tmp_path / "out"
    code = main(["--shared", str(example_image_path.parents[1]), "--store", str(tmp_path / "store"),
                 "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for size in ("atto", "femto", "pico", "n", "s", "m", "l", "x"):
        assert f"\n{size} " in printed, f"model table has no row for {size}"
    assert (out / "s").is_dir()
    _check_outputs(out, example_image_path)
