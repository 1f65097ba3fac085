"""deimv2-infer on EoMT-DINOv3 and DINOv3 artifacts: overlays, JSON with COCO RLE masks, semantic PNGs, .npz."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers (pinned 5.24)")

from vit_helpers import TINY_NAMES, tiny_vit_artifacts  # noqa: E402

from deimv2_deploy.cli.infer import main as infer_main  # noqa: E402
from deimv2_deploy.runtimes import load_runtime  # noqa: E402
from deimv2_deploy.vit_records import rle_decode  # noqa: E402

NAMES = TINY_NAMES


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer_vit")
    made = tiny_vit_artifacts(root)
    images = root / "images"
    for folder in ("a", "b"):  # the same file name twice: outputs must not collide
        (images / folder).mkdir(parents=True)
        rng = np.random.default_rng(len(folder) + ord(folder))
        cv2.imwrite(str(images / folder / "photo.png"), rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    return {**made, "images": images}


def test_eomt_images_write_overlays_json_rle_and_semantic_png(artifacts, tmp_path, capsys):
    out = tmp_path / "out"
    images = artifacts["images"]
    assert infer_main([str(artifacts["eomt"]), str(images / "a"), str(images / "b" / "photo.png"), "--output-dir",
                       str(out), "--score", "0.2"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a_photo_png.jpg", "a_photo_png.json", "a_photo_png_semantic.png", "b_photo_png.jpg",
                     "b_photo_png.json", "b_photo_png_semantic.png"]  # infer.output_names: folders tell them apart
    runtime = load_runtime(artifacts["eomt"])
    image = cv2.imread(str(images / "a" / "photo.png"))
    want = runtime.predict(image, tasks=("semantic", "instance", "panoptic"))
    record = json.loads((out / "a_photo_png.json").read_text())
    assert record["tasks"] == ["semantic", "instance", "panoptic"] and record["image_size"] == [37, 53]
    overlay = cv2.imread(str(out / "a_photo_png.jpg"))
    assert overlay.shape == (37, 53 * 3, 3)  # semantic | instance | panoptic
    png = cv2.imread(str(out / "a_photo_png_semantic.png"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(png, want.semantic)
    kept = want.instances.filter(0.2)
    assert len(record["instances"]) == len(kept) >= 1
    for row, mask, score, label in zip(record["instances"], kept.masks, kept.scores, kept.labels, strict=True):
        np.testing.assert_array_equal(rle_decode(row["segmentation"]), mask)
        assert row["label"] == label and row["class_name"] == NAMES[int(label)] and row["score"] >= 0.2
        assert abs(row["score"] - score) < 1e-6 and row["area"] == mask.sum()
    segments = record["panoptic"]["segments"]
    assert len(segments) == len(want.panoptic) >= 1 and record["panoptic"]["stuff_classes"] == [2, 3]
    for row in segments:
        np.testing.assert_array_equal(rle_decode(row["segmentation"]), want.panoptic.mask(row["id"]))
        assert row["is_thing"] == (row["label"] not in (2, 3))
    assert "a_photo_png.json" in capsys.readouterr().out


def test_eomt_task_and_max_detections(artifacts, tmp_path):
    out = tmp_path / "o"
    assert infer_main([str(artifacts["eomt"]), "--task", "instance", str(artifacts["images"] / "a"),
                       "--max-detections", "1", "--score", "0", "--output-dir", str(out), "--no-draw"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["photo.json"]
    record = json.loads((out / "photo.json").read_text())
    assert len(record["instances"]) == 1 and "panoptic" not in record and "semantic" not in record


def test_dinov3_writes_npz_and_pca(artifacts, tmp_path):
    out = tmp_path / "d"
    assert infer_main([str(artifacts["dino"]), str(artifacts["images"] / "a" / "photo.png"), "--output-dir",
                       str(out)]) == 0
    emb = load_runtime(artifacts["dino"]).predict(cv2.imread(str(artifacts["images"] / "a" / "photo.png")))
    saved = np.load(out / "photo.npz")
    for name in ("cls", "registers", "patches", "pooled"):
        np.testing.assert_array_equal(saved[name], getattr(emb, name))
    assert cv2.imread(str(out / "photo.jpg")).shape == (37, 106, 3)  # image | PCA colours


def _one_line(capsys, argv) -> str:
    capsys.readouterr()
    assert infer_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("deimv2-infer:") and "Traceback" not in err
    return err


def test_bad_inputs_are_one_line(artifacts, tmp_path, capsys):
    image = str(artifacts["images"] / "a" / "photo.png")
    out = ["--output-dir", str(tmp_path / "x")]
    err = _one_line(capsys, [str(artifacts["eomt"]), image, "--letterbox", *out])
    assert "--letterbox is for DEIMv2 detector artifacts" in err
    err = _one_line(capsys, [str(artifacts["eomt"]), image, "--task", "depth", *out])
    assert "--task 'depth' is not an EoMT task" in err
    err = _one_line(capsys, [str(artifacts["eomt_nostuff"]), image, "--task", "panoptic", *out])
    assert "does not record which classes are stuff" in err
    err = _one_line(capsys, [str(artifacts["dino"]), image, "--task", "semantic", *out])
    assert "--task is for EoMT segmentation artifacts" in err
    err = _one_line(capsys, [str(artifacts["eomt"]), str(tmp_path / "clip.mp4"), *out])
    assert "video not found" in err  # videos go through the video pipeline (tests/test_infer_vit_video.py)
    assert not (tmp_path / "x").exists()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    capsys.readouterr()
    assert infer_main([str(artifacts["eomt"]), str(broken), image, "--task", "semantic", *out]) == 1
    captured = capsys.readouterr()
    assert f"skipped {broken}" in captured.err and (tmp_path / "x" / "photo.json").is_file()
    # panoptic on an artifact without the split works when the run names it
    assert infer_main([str(artifacts["eomt_nostuff"]), image, "--task", "panoptic", "--stuff-classes", "none",
                       "--output-dir", str(tmp_path / "y")]) == 0
    segments = json.loads((tmp_path / "y" / "photo.json").read_text())["panoptic"]["segments"]
    assert all(s["is_thing"] for s in segments)
