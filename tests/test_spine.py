"""The torch-free spine: ArtifactSpec, Detections, preprocessing, drawing, media errors."""
from __future__ import annotations

import numpy as np
import pytest

from deimv2_deploy.detections import Detections
from deimv2_deploy.drawing import annotate
from deimv2_deploy.media import read_image, write_image
from deimv2_deploy.preprocess import Preprocessor, letterbox, resize_like_pil
from deimv2_deploy.spec import ArtifactSpec
from deimv2_deploy.variants import VARIANT_NAMES, get_variant_info


def test_variant_facts_cover_eight_sizes():
    assert VARIANT_NAMES == ("atto", "femto", "pico", "n", "s", "m", "l", "x")
    assert get_variant_info("ATTO").input_size == (320, 320) and not get_variant_info("atto").normalize
    assert get_variant_info("femto").input_size == (416, 416)
    assert get_variant_info("l").mean == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="unknown DEIMv2 size 'tiny'.*atto"):
        get_variant_info("tiny")


def test_spec_round_trips_through_metadata_and_json():
    spec = ArtifactSpec.for_variant("s", weights="x.pth sha256:abc", batch=4, parity={"ok": True, "matched": 3})
    assert ArtifactSpec.from_metadata(spec.to_metadata()) == spec
    assert ArtifactSpec.from_json(spec.to_json()) == spec
    assert spec.to_metadata()["deimv2.normalize"] == "imagenet"
    assert ArtifactSpec.from_metadata({"other": "1"}) is None
    with pytest.raises(ValueError, match="multiples of 32"):
        ArtifactSpec.for_variant("atto", input_size=(320, 300))
    with pytest.raises(ValueError, match="newer"):
        ArtifactSpec.from_dict({**spec.to_dict(), "format": 99})


def test_detections_validate_and_filter():
    d = Detections(np.array([[0, 0, 10, 10], [5, 5, 20, 20], [1, 1, 2, 2]]), [0.9, 0.3, 0.6], [0, 2, 0])
    assert d.xyxy.dtype == np.float32 and d.labels.dtype == np.int64 and len(d) == 3
    best = d.filter(0.5)
    assert best.scores.tolist() == pytest.approx([0.9, 0.6]) and best.names == ["person", "person"]
    assert len(d.filter(classes=["car"])) == 1
    assert d.to_dict()["detections"][1]["class_name"] == "car"
    assert d.to_coco(7)[0]["bbox"] == [0.0, 0.0, 10.0, 10.0]
    with pytest.raises(ValueError, match="disagree in length"):
        Detections(np.zeros((2, 4)), [0.1], [0, 1])
    with pytest.raises(ValueError, match=r"labels must lie in 0..79"):
        Detections(np.zeros((1, 4)), [0.1], [80])
    with pytest.raises(ValueError, match="shape \\(N, 4\\)"):
        Detections(np.zeros((1, 3)), [0.1], [1])
    assert len(Detections.empty()) == 0


def test_resize_close_to_pil_bilinear(example_image_path):
    from PIL import Image

    bgr = read_image(example_image_path)
    rgb = bgr[:, :, ::-1].copy()
    for size in (320, 416, 640):
        pil = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR)).astype(np.float32)
        ours = resize_like_pil(rgb, (size, size)).astype(np.float32)
        assert np.abs(ours - pil).mean() < 1.0, size  # within one grey level on average


def test_preprocess_normalises_only_when_the_spec_says():
    img = np.full((48, 64, 3), (0, 128, 255), np.uint8)  # BGR
    plain = Preprocessor(ArtifactSpec.for_variant("atto"))(img)
    assert plain.images.shape == (1, 3, 320, 320) and plain.images.dtype == np.float32
    assert plain.images[0, :, 5, 5] == pytest.approx([1.0, 128 / 255, 0.0])  # RGB order, [0, 1]
    assert plain.orig_target_sizes.tolist() == [[64, 48]]
    imagenet = Preprocessor(ArtifactSpec.for_variant("s"))(img)
    expected = (np.array([1.0, 128 / 255, 0.0]) - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert imagenet.images[0, :, 5, 5] == pytest.approx(expected, rel=1e-5)
    rgb = Preprocessor(ArtifactSpec.for_variant("atto"))(img[:, :, ::-1].copy(), color="rgb")
    np.testing.assert_array_equal(rgb.images, plain.images)


def test_letterbox_maps_boxes_back_exactly():
    img = np.zeros((200, 400, 3), np.uint8)
    canvas, t = letterbox(img, (320, 320))
    assert canvas.shape == (320, 320, 3) and t.scale == (0.8, 0.8) and t.pad == (0.0, 80.0)
    box_on_canvas = np.array([[0.0, 80.0, 320.0, 240.0]], np.float32)  # the whole image
    np.testing.assert_allclose(t.boxes_to_original(box_on_canvas), [[0, 0, 400, 200]], atol=1e-4)


@pytest.mark.parametrize("bad, match", [
    (np.zeros((10, 10, 3), np.float32), "uint8"),
    (np.zeros((10, 10, 5), np.uint8), r"\(H, W, 3\)"),
    ("not an image", "numpy array"),
])
def test_preprocess_rejects_bad_images(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Preprocessor(ArtifactSpec.for_variant("atto"))(bad)


def test_unreadable_images_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        read_image(tmp_path / "missing.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_image(empty)
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not a jpeg" * 10)
    with pytest.raises(ValueError, match="cannot decode"):
        read_image(junk)


def test_annotate_draws_and_write_is_atomic(tmp_path):
    img = np.zeros((100, 200, 3), np.uint8)
    d = Detections(np.array([[10, 10, 90, 60]]), [0.8], [2])
    out = annotate(img, d)
    assert out is not img and img.sum() == 0 and out.sum() > 0
    path = write_image(tmp_path / "a.png", out)
    np.testing.assert_array_equal(read_image(path), out)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]  # no temporary left behind
