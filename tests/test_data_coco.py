"""COCO-format datasets: reading, every bad input, training-side sanitising, layouts; the category mapping."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deimv2_deploy.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from deimv2_deploy.data import (
    COCO80,
    Category,
    CategoryMismatchError,
    DatasetError,
    load_coco,
    match_categories,
    resolve_dataset,
    sanitize_for_training,
)
from deimv2_deploy.spec import ArtifactSpec


def _dataset(root: Path, images=None, annotations=None, categories=None, files=True, name="ann.json") -> Path:
    """A tiny COCO dataset on disk (empty image files: load_coco checks existence, not pixels)."""
    images = [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 80},
              {"id": 2, "file_name": "b.jpg", "width": 50, "height": 60}] if images is None else images
    annotations = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 20, 30, 40], "area": 900, "iscrowd": 0},
                   {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25}] \
        if annotations is None else annotations
    categories = [{"id": 3, "name": "three"}, {"id": 1, "name": "one"}] if categories is None else categories
    (root / "img").mkdir(parents=True, exist_ok=True)
    if files:
        for im in images:
            (root / "img" / im["file_name"]).write_bytes(b"x")
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def test_reads_records_boxes_xyxy_and_categories_by_id(tmp_path):
    ds = load_coco(tmp_path / "img", _dataset(tmp_path))
    assert len(ds) == 2 and ds.num_objects == 2
    assert ds.category_ids == (1, 3) and ds.class_names == ("one", "three")  # ordered by id, not file order
    r = ds.images[0]
    assert r.id == 1 and r.file == tmp_path / "img" / "a.jpg" and (r.width, r.height) == (100, 80)
    np.testing.assert_array_equal(r.boxes, [[10, 20, 40, 60], [0, 0, 5, 5]])
    assert r.category_ids.tolist() == [3, 1] and r.iscrowd.tolist() == [False, False]
    assert r.areas.tolist() == [900, 25]
    assert ds.labels(r).tolist() == [1, 0]
    assert len(ds.images[1]) == 0 and ds.images[1].boxes.shape == (0, 4)
    with pytest.raises(ValueError):
        r.boxes[0, 0] = 1  # records are frozen, arrays read-only
    assert ds.subset(1).images == ds.images[:1]


@pytest.mark.parametrize("content, words", [
    (None, ["annotation file not found"]),
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["not a COCO annotation file", "list"]),
    (json.dumps({"images": [], "categories": []}), ["not a COCO detection file", "'annotations'"]),
    (json.dumps({"info": {}}), ["'images', 'annotations', 'categories'"]),
])
def test_unusable_annotation_files(tmp_path, content, words):
    path = tmp_path / "instances.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DatasetError) as e:
        load_coco(tmp_path, path)
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def test_annotation_path_is_a_folder(tmp_path):
    with pytest.raises(DatasetError, match="is a folder"):
        load_coco(tmp_path, tmp_path)


def test_missing_images_named_with_count(tmp_path):
    images = [{"id": i, "file_name": f"{i:03d}.jpg", "width": 10, "height": 10} for i in range(1, 9)]
    path = _dataset(tmp_path, images=images, annotations=[], files=False)
    (tmp_path / "img" / "003.jpg").write_bytes(b"x")
    with pytest.raises(DatasetError) as e:
        load_coco(tmp_path / "img", path)
    msg = str(e.value)
    assert "7 of 8 images" in msg and "001.jpg, 002.jpg, 004.jpg" in msg and "(7 in all)" in msg
    assert "003.jpg" not in msg
    load_coco(tmp_path / "img", path, check_images=False)  # the check can be skipped on purpose


def test_missing_image_folder(tmp_path):
    with pytest.raises(DatasetError, match="image folder not found"):
        load_coco(tmp_path / "nope", _dataset(tmp_path))


@pytest.mark.parametrize("kwargs, words", [
    (dict(images=[]), "lists no images"),
    (dict(categories=[]), "lists no categories"),
    (dict(annotations=[{"id": 1, "image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1]},
                       {"id": 2, "image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1]}]),
     "2 annotations refer to image ids the file does not list (7, 9)"),
    (dict(annotations=[{"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}]),
     "refer to category ids the file does not list (5); known ids: 1, 3"),
    (dict(annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1]}]), "no bbox"),
    (dict(annotations=[{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, "a", 1]}]), "no bbox"),
    (dict(images=[{"id": 1, "file_name": "a.jpg", "width": 10}]), "no integer 'height'"),
    (dict(images=[{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10}] * 2), "image id 1 is listed twice"),
    (dict(categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]), "category id 1 is listed twice"),
    (dict(categories=[{"id": 1}]), "category 1 has no name"),
])
def test_malformed_datasets(tmp_path, kwargs, words):
    kwargs.setdefault("annotations", [])
    with pytest.raises(DatasetError) as e:
        load_coco(tmp_path / "img", _dataset(tmp_path, **kwargs))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_sanitize_clips_skips_and_counts(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [-5, 10, 20, 20]},  # reaches left: clipped
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [90, 70, 30, 30]},  # reaches right/bottom: clipped
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [10, 10, 0, 10]},  # zero width: skipped
        {"id": 4, "image_id": 1, "category_id": 3, "bbox": [120, 10, 10, 10]},  # wholly outside: skipped
        {"id": 5, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 1},  # crowd: skipped
        {"id": 6, "image_id": 1, "category_id": 1, "bbox": [30, 30, 10, 10]},  # fine
    ]
    ds = sanitize_for_training(load_coco(tmp_path / "img", _dataset(tmp_path, annotations=anns)))
    rep = ds.report
    assert (rep.objects_in, rep.objects_out, rep.boxes_clipped, rep.boxes_degenerate, rep.crowd_skipped,
            rep.images_without_objects) == (6, 3, 2, 2, 1, 1)
    assert len(ds) == 2  # the image without objects stays: a valid negative
    np.testing.assert_array_equal(ds.images[0].boxes, [[0, 10, 15, 30], [90, 70, 100, 80], [30, 30, 40, 40]])
    assert ds.images[0].category_ids.tolist() == [1, 3, 1]
    text = rep.summary()
    assert "3 of 6 objects kept" in text and "2 boxes clipped" in text and "2 zero-area" in text
    assert "1 crowd" in text and "1 images without objects kept" in text


def test_huge_and_sparse_category_ids_map_through_the_list(tmp_path):
    cats = [{"id": 10**12, "name": "big"}, {"id": 7, "name": "seven"}, {"id": 0, "name": "zero"}]
    anns = [{"id": i, "image_id": 1, "category_id": c, "bbox": [0, 0, 5, 5]} for i, c in
            enumerate([10**12, 0, 7, 10**12], 1)]
    ds = sanitize_for_training(load_coco(tmp_path / "img", _dataset(tmp_path, annotations=anns, categories=cats)))
    assert ds.category_ids == (0, 7, 10**12)
    assert ds.labels(ds.images[0]).tolist() == [2, 0, 1, 2]
    mapping = ds.label_mapping()
    assert mapping.to_category_ids(np.array([0, 1, 2])).tolist() == [0, 7, 10**12]
    with pytest.raises(ValueError, match="not among"):
        mapping.to_labels(np.array([8]))
    with pytest.raises(ValueError, match="labels must lie"):
        mapping.to_category_ids(np.array([3]))


# --- layouts ------------------------------------------------------------------------------------------------
def test_resolve_layouts(tmp_path):
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    (coco / "val2017").mkdir()
    (coco / "annotations" / "instances_val2017.json").write_text("{}")
    p = resolve_dataset(coco)
    assert p.images_dir == coco / "val2017" and p.annotation_file.name == "instances_val2017.json"
    # only the annotation file: the images are where the COCO layout puts them
    assert resolve_dataset(annotations=p.annotation_file).images_dir == coco / "val2017"
    assert resolve_dataset(images=tmp_path, annotations=p.annotation_file).images_dir == tmp_path
    rf = tmp_path / "roboflow"
    (rf / "valid").mkdir(parents=True)
    (rf / "valid" / "_annotations.coco.json").write_text("{}")
    assert resolve_dataset(rf, split="val").images_dir == rf / "valid"
    with pytest.raises(DatasetError, match="no 'train' split"):
        resolve_dataset(coco, split="train")
    (coco / "annotations" / "instances_train.json").write_text("{}")
    with pytest.raises(DatasetError, match="but no image folder for it"):
        resolve_dataset(coco, split="train")
    (coco / "images" / "train").mkdir(parents=True)
    assert resolve_dataset(coco, split="train").images_dir == coco / "images" / "train"
    with pytest.raises(DatasetError, match="not both"):
        resolve_dataset(coco, images=tmp_path)
    with pytest.raises(DatasetError, match="no image folder given"):
        resolve_dataset(annotations=tmp_path / "elsewhere.json")
    with pytest.raises(DatasetError, match="dataset folder not found"):
        resolve_dataset(tmp_path / "missing")


# --- the category mapping -----------------------------------------------------------------------------------
def test_coco80_is_the_official_table():
    # the ids COCO detection never used, and spot checks of the official label -> id table
    assert len(COCO_CATEGORY_IDS) == 80 == len(set(COCO_CATEGORY_IDS))
    assert set(range(1, 91)) - set(COCO_CATEGORY_IDS) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    table = {0: 1, 10: 11, 11: 13, 24: 27, 26: 31, 39: 44, 40: 46, 60: 67, 61: 70, 62: 72, 72: 82, 73: 84, 79: 90}
    assert {k: COCO80.to_category_ids(np.array([k]))[0] for k in table} == table
    named = dict(zip(COCO_CLASSES, COCO_CATEGORY_IDS, strict=True))
    assert (named["stop sign"], named["dining table"], named["tv"], named["book"], named["toothbrush"]) == \
        (13, 67, 72, 84, 90)
    assert COCO80.to_labels(np.array(COCO_CATEGORY_IDS)).tolist() == list(range(80))


def _coco_categories(order=None):
    cats = [Category(i, n) for i, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True)]
    return cats if order is None else [cats[i] for i in order]


def test_coco_model_on_coco_dataset():
    spec = ArtifactSpec.for_variant("atto")
    assert spec.category_ids is None and spec.dataset_category_ids() == COCO_CATEGORY_IDS
    shuffled = _coco_categories(np.random.default_rng(0).permutation(80))
    mapping = match_categories(spec.class_names, spec.dataset_category_ids(), shuffled)
    assert mapping == COCO80 and mapping.notes == ()


def test_coco_model_on_a_three_class_dataset_names_both_sides():
    cats = [Category(1, "circle"), Category(2, "square"), Category(3, "star")]
    with pytest.raises(CategoryMismatchError) as e:
        match_categories(COCO_CLASSES, None, cats, model="model.onnx", dataset="shapes.json")
    msg = str(e.value)
    assert "model.onnx has 80 classes (person" in msg and "shapes.json has 3 classes (circle, square, star" in msg
    assert "the dataset lacks the model's ids 4, 5" in msg and "\n" not in msg


def test_custom_model_maps_through_its_category_ids():
    spec = ArtifactSpec.for_variant("atto", class_names=("cat", "dog", "bird"), category_ids=(17, 3, 250))
    cats = [Category(3, "dog"), Category(250, "bird"), Category(17, "cat")]
    mapping = match_categories(spec.class_names, spec.dataset_category_ids(), cats)
    assert mapping.to_category_ids(np.array([0, 1, 2, 2])).tolist() == [17, 3, 250, 250]
    assert mapping.notes == ()
    with pytest.raises(CategoryMismatchError, match=r"the model lacks the dataset's ids 4"):
        match_categories(spec.class_names, spec.category_ids, cats + [Category(4, "fish")])
    with pytest.raises(CategoryMismatchError, match=r"the dataset lacks the model's ids 250"):
        match_categories(spec.class_names, spec.category_ids, cats[:1] + cats[2:] + [Category(251, "bird")])
    renamed = [Category(3, "hound"), Category(250, "bird"), Category(17, "cat")]
    notes = match_categories(spec.class_names, spec.category_ids, renamed).notes
    assert len(notes) == 1 and "'hound' vs model 'dog'" in notes[0]


def test_custom_model_without_ids_matches_by_name_or_fails():
    cats = [Category(5, "Dog"), Category(9, "cat")]
    mapping = match_categories(("cat", "dog"), None, cats)
    assert mapping.category_ids == (9, 5) and "by name" in mapping.notes[0]
    with pytest.raises(CategoryMismatchError, match="carries no category ids"):
        match_categories(("cat", "fish"), None, cats)


def test_spec_category_ids_validation_and_old_metadata():
    spec = ArtifactSpec.for_variant("atto", class_names=("a", "b"), category_ids=[np.int64(4), 2])
    assert spec.category_ids == (4, 2) and isinstance(spec.category_ids[0], int)
    again = ArtifactSpec.from_metadata(spec.to_metadata())
    assert again == spec and again.category_ids == (4, 2)
    old = ArtifactSpec.for_variant("atto").to_dict()
    del old["category_ids"]  # metadata written before the field existed
    assert ArtifactSpec.from_dict(old).category_ids is None
    for ids, words in [((1,), "one dataset category id per class"), ((1, 1), "unique"), ((1, -2), ">= 0"),
                       ((1, 2.5), "integers"), ((True, 2), "integers")]:
        with pytest.raises(ValueError, match=words):
            ArtifactSpec.for_variant("atto", class_names=("a", "b"), category_ids=ids)
