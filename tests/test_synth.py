"""The synthetic shapes dataset: exact boxes and areas, bounded occlusion, determinism, atomic writing, the CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from deimv2_deploy.cli.data import main as data_main
from deimv2_deploy.data import load_coco, synth
from deimv2_deploy.data.synth import MAX_OBJECTS, MIN_VISIBLE, SYNTH_CATEGORY_IDS, render_scene, write_dataset


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _tight(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(5, "train", i, 320) for i in range(40)]


def test_boxes_are_tight_on_the_rendered_masks_and_areas_are_visible_pixels(scenes):
    for scene in scenes:
        size = scene.image.shape[0]
        for j, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size
            assert obj.mask.shape == (y1 - y0, x1 - x0)
            assert _tight(obj.mask) == (0, 0, x1 - x0, y1 - y0)  # every edge of the box touches the shape
            visible = scene.owner == j
            assert obj.area == int(visible.sum())  # COCO area: the pixels one sees
            vy, vx = np.nonzero(visible)
            assert vx.min() >= x0 and vx.max() < x1 and vy.min() >= y0 and vy.max() < y1
            # what is seen of the object is part of its shape, and enough of it stays visible
            assert np.all(obj.mask[vy - y0, vx - x0])
            assert obj.area >= MIN_VISIBLE * obj.mask.sum() - 1e-9


def test_painted_pixels_are_exactly_the_visible_masks(monkeypatch):
    """On a black background without clutter, noise or blur, the non-black pixels are exactly the union of the
    objects' visible masks (every colour the generator paints has a channel >= 16): the image agrees with the
    masks, which the boxes are tight on, to the pixel."""
    monkeypatch.setattr(synth, "_background", lambda rng, size: np.zeros((size, size, 3), np.uint8))
    monkeypatch.setattr(synth, "_clutter_mask", lambda rng, size: np.zeros((size, size), bool))
    monkeypatch.setattr(synth, "_finish", lambda image, rng: image)
    objects = 0
    for i in range(25):
        scene = render_scene(2, "val", i, 256)
        painted = scene.image.max(axis=2) > 0
        np.testing.assert_array_equal(painted, scene.owner >= 0)
        for j, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.box
            full = np.zeros(painted.shape, bool)
            full[y0:y1, x0:x1] = obj.mask
            assert np.all(full[scene.owner == j]) and _tight(full) == obj.box
            objects += 1
    assert objects > 50


def test_scene_statistics(scenes):
    counts = [len(s.objects) for s in scenes]
    assert 1 <= min(counts) and max(counts) <= MAX_OBJECTS and np.mean(counts) > 3
    classes = {o.category_id for s in scenes for o in s.objects}
    assert classes == set(SYNTH_CATEGORY_IDS)
    areas = np.array([o.area for s in scenes for o in s.objects])
    # COCO's small (< 32^2), medium and large (> 96^2) objects all occur in good numbers at 320 px
    small, large = (areas < 32 ** 2).mean(), (areas > 96 ** 2).mean()
    assert small > 0.2 and large > 0.08 and 1 - small - large > 0.3
    occluded = sum(o.area < o.mask.sum() for s in scenes for o in s.objects)
    assert occluded > 10  # partial occlusion happens


def test_deterministic_and_independent_of_the_count(tmp_path):
    write_dataset(tmp_path / "a", {"val": 5}, image_size=128, seed=3)
    write_dataset(tmp_path / "b", {"val": 5}, image_size=128, seed=3, workers=2)
    write_dataset(tmp_path / "c", {"val": 3}, image_size=128, seed=3)
    write_dataset(tmp_path / "d", {"val": 3}, image_size=128, seed=4)
    a, b, c, d = (_tree_digest(tmp_path / x) for x in "abcd")
    assert a == b  # byte-identical, whatever the number of workers
    assert all(a[k] == v for k, v in c.items() if k.endswith(".jpg")) and len(c) == 3 * 2 + 2  # + PNGs, 2 JSONs
    assert all(d[k] != v for k, v in c.items() if k.endswith(".jpg"))  # another seed, other images
    ja, jc = (json.loads((tmp_path / x / "annotations" / "instances_val.json").read_text()) for x in "ac")
    assert ja["images"][:3] == jc["images"]
    assert [x for x in ja["annotations"] if x["image_id"] <= 3] == jc["annotations"]
    assert ja["info"]["seed"] == 3 and len(ja["categories"]) == len(SYNTH_CATEGORY_IDS)
    assert not any(p.name.startswith(".") for p in (tmp_path / "a").iterdir())  # no staging left


def test_written_dataset_is_valid_coco_and_round_trips(tmp_path):
    write_dataset(tmp_path, {"train": 4, "val": 3}, image_size=160, seed=1)
    val = load_coco(tmp_path / "val", tmp_path / "annotations" / "instances_val.json")
    assert len(val) == 3 and val.class_names == synth.SYNTH_CLASSES
    scene = render_scene(1, "val", 0, 160)
    record = val.images[0]
    assert record.file.name == "000000000001.jpg" and (record.width, record.height) == (160, 160)
    np.testing.assert_array_equal(record.boxes, [o.box for o in scene.objects])
    assert record.areas.tolist() == [o.area for o in scene.objects]
    train = load_coco(tmp_path / "train", tmp_path / "annotations" / "instances_train.json")
    assert len(train) == 4
    from pycocotools.coco import COCO

    gt = COCO(str(tmp_path / "annotations" / "instances_val.json"))
    assert len(gt.getImgIds()) == 3 and len(gt.getCatIds()) == len(SYNTH_CATEGORY_IDS)


def test_interrupted_run_leaves_nothing_half_written(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = synth._render_encoded

    def flaky(job):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(synth, "_render_encoded", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path, {"val": 5}, image_size=96, seed=0)
    assert not (tmp_path / "val").exists() and not (tmp_path / "annotations" / "instances_val.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name != "annotations"] == []


def test_cli_synth_val_only_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "ds"
    assert data_main(["synth", "--output", str(out), "--train", "0", "--val", "2", "--image-size", "96",
                      "--workers", "1", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["annotations", "val"]
    assert sorted(p.name for p in (out / "annotations").iterdir()) == ["instances_val.json", "panoptic_val",
                                                                       "panoptic_val.json"]
    assert "val: 2 images" in capsys.readouterr().out
    before = _tree_digest(out)
    assert data_main(["synth", "--output", str(out), "--val", "2", "--image-size", "96", "--seed", "9",
                      "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err and err.count("\n") == 1
    assert _tree_digest(out) == before
    assert data_main(["synth", "--output", str(out), "--val", "2", "--image-size", "96", "--seed", "9",
                      "--overwrite", "--quiet"]) == 0
    assert _tree_digest(out) != before


@pytest.mark.parametrize("args, words", [
    (["--val", "0"], "nothing to generate"),
    (["--val", "-1"], ">= 0"),
    (["--val", "1", "--image-size", "10"], "--image-size must be >= 64"),
])
def test_cli_synth_bad_arguments(tmp_path, capsys, args, words):
    assert data_main(["synth", "--output", str(tmp_path / "x"), *args, "--quiet"]) == 1
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_check(tmp_path, capsys):
    write_dataset(tmp_path, {"val": 2}, image_size=96, seed=0)
    assert data_main(["check", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 images" in out and "8 categories (1:circle" in out and "for training:" in out
    (tmp_path / "val" / "000000000002.jpg").unlink()
    assert data_main(["check", str(tmp_path)]) == 1
    assert "1 of 2 images" in capsys.readouterr().err


def test_rasterised_geometry_is_pixel_exact():
    """A polygon in continuous pixel coordinates (pixel i spans [i, i+1]) paints exactly the pixels it touches:
    the box of a shape is (floor(min), floor(min), floor(max) + 1, floor(max) + 1) of its geometry."""
    square = [(np.array([[10.3, 12.2], [20.6, 12.2], [20.6, 29.9], [10.3, 29.9]]), 1)]
    mask = synth._rasterise(square, (5, 6), (40, 40))
    assert synth._tight_box(mask) == (10 - 5, 12 - 6, 21 - 5, 30 - 6) and mask.sum() == 11 * 18
    ring = [(synth._UNIT_CIRCLE * 20 + 50.25, 1), (synth._UNIT_CIRCLE * 10 + 50.25, 0)]
    mask = synth._rasterise(ring, (0, 0), (100, 100))
    assert synth._tight_box(mask) == (30, 30, 71, 71) and not mask[50, 50]
    assert abs(mask.sum() - np.pi * (20 ** 2 - 10 ** 2)) < 0.1 * np.pi * 300
