"""Panoptic ground truth of the synthetic dataset (COCO panoptic layout), adding it to an existing dataset, and
reading COCO panoptic datasets (data/panoptic.py)."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from deimv2_deploy.cli.data import main as data_main
from deimv2_deploy.data import DatasetError
from deimv2_deploy.data.panoptic import (
    VOID_ID,
    id_to_rgb,
    load_panoptic,
    read_panoptic_ids,
    resolve_panoptic_dataset,
    rgb_to_id,
)
from deimv2_deploy.data.synth import (
    BACKGROUND_CATEGORY_ID,
    SYNTH_CLASSES,
    add_panoptic,
    render_scene,
    write_dataset,
)

SEED, SIZE, COUNT = 4, 128, 6


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_panoptic")
    write_dataset(root, {"val": COUNT}, image_size=SIZE, seed=SEED)
    return root


def test_png_id_encoding_round_trips():
    ids = np.array([[0, 1, 255], [256, 65535, 65536 * 3 + 7]], np.int64)
    rgb = id_to_rgb(ids)
    assert rgb.dtype == np.uint8 and rgb[1, 0].tolist() == [0, 1, 0]  # id = R + 256 G + 256^2 B
    np.testing.assert_array_equal(rgb_to_id(rgb), ids)
    with pytest.raises(ValueError, match="0..16777215"):
        id_to_rgb(np.array([1 << 24]))


def test_panoptic_files_decode_to_the_scene_owner_map_and_categories(dataset):
    data = load_panoptic(dataset / "val", dataset / "annotations" / "panoptic_val.json")
    assert len(data) == COUNT
    assert [(c.id, c.name, c.isthing) for c in data.categories] == (
        [(i + 1, n, True) for i, n in enumerate(SYNTH_CLASSES)] + [(BACKGROUND_CATEGORY_ID, "background", False)])
    raw = json.loads((dataset / "annotations" / "panoptic_val.json").read_text())
    instances = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    assert raw["images"] == instances["images"]  # the same images, ids and file names
    for index, record in enumerate(data.images):
        scene = render_scene(SEED, "val", index, SIZE)
        n = len(scene.objects)
        ids = read_panoptic_ids(record)
        assert record.png.name == f"{index + 1:012d}.png" and record.file.name == f"{index + 1:012d}.jpg"
        assert not (ids == VOID_ID).any()  # background covers every pixel no object owns: nothing is void
        owner = np.where(ids <= n, ids - 1, -1)  # object i has id i + 1, background n + 1
        np.testing.assert_array_equal(owner, scene.owner)
        info = {s["id"]: s for s in raw["annotations"][index]["segments_info"]}
        for sid, s in info.items():
            mask = ids == sid
            cat = scene.objects[sid - 1].category_id if sid <= n else BACKGROUND_CATEGORY_ID
            ys, xs = np.nonzero(mask)
            assert s["category_id"] == cat and s["area"] == int(mask.sum()) and s["iscrowd"] == 0
            assert s["bbox"] == [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]
            if sid <= n:
                assert s["area"] == scene.objects[sid - 1].area  # the instances file's visible area
        assert set(info) == set(np.unique(ids).tolist())


def test_images_and_instances_do_not_depend_on_panoptic(tmp_path, dataset):
    write_dataset(tmp_path / "plain", {"val": COUNT}, image_size=SIZE, seed=SEED, panoptic=False)
    with_panoptic, plain = _digest(dataset), _digest(tmp_path / "plain")
    assert plain and all(with_panoptic[k] == v for k, v in plain.items())
    assert not (tmp_path / "plain" / "annotations" / "panoptic_val.json").exists()


def test_add_panoptic_to_an_existing_dataset_equals_writing_it(tmp_path, dataset, capsys):
    root = tmp_path / "old"
    write_dataset(root, {"val": COUNT}, image_size=SIZE, seed=SEED, panoptic=False)
    before = _digest(root)
    assert data_main(["synth", "--output", str(root), "--panoptic-only", "--workers", "2", "--quiet"]) == 0
    assert f"val: {COUNT} panoptic PNGs" in capsys.readouterr().out
    after, reference = _digest(root), _digest(dataset)
    assert all(after[k] == v for k, v in before.items())  # images and instances untouched
    assert after == reference  # byte-identical to the files written with the dataset
    # again: refused without --overwrite, one line
    assert data_main(["synth", "--output", str(root), "--panoptic-only", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err and err.count("\n") == 1
    assert data_main(["synth", "--output", str(root), "--panoptic-only", "--overwrite", "--quiet"]) == 0
    assert _digest(root) == reference
    # a split overwritten without panoptic files keeps none of the images it replaced
    write_dataset(root, {"val": 2}, image_size=SIZE, seed=SEED + 1, overwrite=True, panoptic=False)
    assert sorted(p.name for p in (root / "annotations").iterdir()) == ["instances_val.json"]


def test_add_panoptic_refuses_a_dataset_it_cannot_render_again(tmp_path, dataset, capsys):
    root = tmp_path / "edited"
    shutil.copytree(dataset, root)
    shutil.rmtree(root / "annotations" / "panoptic_val")
    (root / "annotations" / "panoptic_val.json").unlink()
    ann = root / "annotations" / "instances_val.json"
    data = json.loads(ann.read_text())
    data["annotations"][0]["area"] += 1
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match what seed 4 renders"):
        add_panoptic(root)
    assert not (root / "annotations" / "panoptic_val").exists()  # the staging folder is gone
    assert not any(p.name.startswith(".") for p in (root / "annotations").iterdir())
    data["info"]["description"] = "someone else's"
    ann.write_text(json.dumps(data))
    assert data_main(["synth", "--output", str(root), "--panoptic-only", "--quiet"]) == 1
    assert "not written by deimv2-data synth" in capsys.readouterr().err
    assert data_main(["synth", "--output", str(tmp_path / "none"), "--panoptic-only", "--quiet"]) == 1
    assert "no synthetic dataset" in capsys.readouterr().err
    assert data_main(["synth", "--output", str(root), "--panoptic-only", "--val", "3", "--quiet"]) == 1
    assert "leave out --val" in capsys.readouterr().err


def test_resolve_and_load_errors(tmp_path, dataset):
    paths = resolve_panoptic_dataset(dataset, split="val")
    assert paths.images_dir == dataset / "val" and paths.masks_dir == dataset / "annotations" / "panoptic_val"
    explicit = resolve_panoptic_dataset(panoptic=dataset / "annotations" / "panoptic_val.json")
    assert explicit == paths  # images found where the COCO layout puts them
    plain = tmp_path / "plain"
    write_dataset(plain, {"val": 2}, image_size=96, seed=0, panoptic=False)
    with pytest.raises(DatasetError, match="--panoptic-only"):  # says how to add the files
        resolve_panoptic_dataset(plain, split="val")
    with pytest.raises(DatasetError, match="not a COCO panoptic file.*instances file"):
        load_panoptic(plain / "val", plain / "annotations" / "instances_val.json")
    broken = tmp_path / "broken"
    shutil.copytree(dataset, broken)
    pan = broken / "annotations" / "panoptic_val.json"
    data = json.loads(pan.read_text())
    del data["categories"][0]["isthing"]
    pan.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="no 'isthing'"):
        load_panoptic(broken / "val", pan)
    data = json.loads((dataset / "annotations" / "panoptic_val.json").read_text())
    data["annotations"][0]["segments_info"].pop(0)  # the PNG still holds that segment
    pan.write_text(json.dumps(data))
    loaded = load_panoptic(broken / "val", pan)
    with pytest.raises(DatasetError, match="segment ids 1 that its segments_info does not list"):
        read_panoptic_ids(loaded.images[0])
    (broken / "annotations" / "panoptic_val" / "000000000002.png").unlink()
    with pytest.raises(DatasetError, match="1 of 6 panoptic PNGs .* missing"):
        load_panoptic(broken / "val", pan)
    small = np.zeros((10, 10, 3), np.uint8)
    cv2.imwrite(str(broken / "annotations" / "panoptic_val" / "000000000002.png"), small)
    with pytest.raises(DatasetError, match="is 10x10 but its image is 128x128"):
        read_panoptic_ids(load_panoptic(broken / "val", pan).images[1])
