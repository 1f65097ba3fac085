"""Custom classes end to end: a 3-class model (category ids 11, 37, 90) through deimv2-export (ONNX, OpenVINO),
the runtimes, deimv2-infer, deimv2-val and drawing with its own class names; what an export stores when the
checkpoint carries names, carries none, or the user gives them; every mistake a one-line error."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
from detection_data import THREE_CATEGORY_IDS, THREE_CLASSES

from deimv2_deploy.classes import (
    COCO_CLASSES,
    ModelClasses,
    read_category_ids,
    read_class_names,
    resolve_classes,
)
from deimv2_deploy.detections import Detections
from deimv2_deploy.spec import ArtifactSpec


# --- which classes an export stores ------------------------------------------------------------------------------
def test_resolve_classes_prefers_the_user_then_the_checkpoint_then_coco():
    stored = ModelClasses(("a", "b", "c"), (4, 8, 15), "the checkpoint")
    assert resolve_classes(3, stored) == stored
    renamed = resolve_classes(3, stored, names=["x", "y", "z"])
    assert renamed.names == ("x", "y", "z") and renamed.category_ids == (4, 8, 15)  # the ids stay the dataset's
    assert resolve_classes(3, stored, category_ids=[1, 2, 3]).category_ids == (1, 2, 3)
    coco = resolve_classes(80)
    assert coco.names == COCO_CLASSES and coco.category_ids is None  # ids: COCO's table, through the spec
    spec = ArtifactSpec.for_variant("atto", **coco.spec_fields())
    assert spec.dataset_category_ids()[:3] == (1, 2, 3) and spec.dataset_category_ids()[-1] == 90
    assert resolve_classes(None).names == COCO_CLASSES  # an official ONNX: nothing known, today's default


def test_a_model_without_names_gets_generic_ones_with_a_warning():
    with pytest.warns(UserWarning, match=r"m.pth has 17 classes but carries no class names.*--class-names"):
        classes = resolve_classes(17, model="m.pth")
    assert classes.names[0] == "class_0" and classes.names[-1] == "class_16" and classes.category_ids is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an 80-class model without names is COCO's, silently
        assert resolve_classes(80).names == COCO_CLASSES


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_classes=3, names=["a", "b"]), r"2 class names were given \(a, b\) but m.pth has 3 classes"),
    (dict(num_classes=200, names=["a"] * 3), r"3 class names were given .* but m.pth has 200 classes"),
    (dict(num_classes=3, category_ids=[1, 2]), r"2 category ids were given but m.pth has 3 classes"),
    (dict(num_classes=3, names=["a", "b", "c"], category_ids=[1, 1, 2]), r"unique, got \[1\]"),
    (dict(num_classes=3, names=["a", "", "c"]), "non-empty strings"),
    (dict(num_classes=4, stored=ModelClasses(("a", "b", "c"))), r"m.pth has 4 classes but carries 3 class names"),
])
def test_class_lists_that_do_not_fit_the_model_are_errors_naming_both(kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve_classes(kwargs.pop("num_classes"), model="m.pth", **kwargs)


def test_class_names_and_ids_from_the_command_line(tmp_path):
    assert read_class_names("cat, dog,bird") == (("cat", "dog", "bird"), None)
    lines = tmp_path / "names.txt"
    lines.write_text("traffic light\n\nfire hydrant\n")
    assert read_class_names(str(lines)) == (("traffic light", "fire hydrant"), None)
    listed = tmp_path / "names.json"
    listed.write_text(json.dumps(["a", "b"]))
    assert read_class_names(str(listed))[0] == ("a", "b")
    coco = tmp_path / "instances_train.json"  # categories ordered by id, as deimv2-train numbers them
    coco.write_text(json.dumps({"images": [], "annotations": [],
                                "categories": [{"id": 90, "name": "bird"}, {"id": 11, "name": "cat"}]}))
    assert read_class_names(str(coco)) == (("cat", "bird"), (11, 90))
    assert read_category_ids("11, 37,90") == (11, 37, 90)
    ids = tmp_path / "ids.txt"
    ids.write_text("3\n5\n")
    assert read_category_ids(str(ids)) == (3, 5)
    with pytest.raises(FileNotFoundError, match="class names file not found"):
        read_class_names(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_class_names(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="whole numbers"):
        read_category_ids("1,two")


def test_checkpoints_and_hugging_face_folders_carry_their_classes(tmp_path, three_class_model):
    from deimv2_deploy.models.reference import checkpoint_classes

    got = checkpoint_classes(three_class_model.checkpoint)
    assert got.names == THREE_CLASSES and got.category_ids == THREE_CATEGORY_IDS
    assert checkpoint_classes(three_class_model.plain) is None  # the official training code saves none
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"id2label": {"1": "dog", "0": "cat"}}))
    assert checkpoint_classes(folder).names == ("cat", "dog")
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "cat", "2": "dog"}}))
    with pytest.raises(ValueError, match="id2label must number the labels 0..1"):
        checkpoint_classes(folder)


# --- the 3-class model end to end ----------------------------------------------------------------------------------
def test_exported_artifacts_and_the_torch_runtime_carry_the_classes(three_class_model):
    from deimv2_deploy.runtimes import load_runtime

    for path in (three_class_model.onnx, three_class_model.xml, three_class_model.checkpoint):
        with load_runtime(path) as runtime:
            assert runtime.spec.class_names == THREE_CLASSES, path
            assert runtime.spec.category_ids == THREE_CATEGORY_IDS, path
            detections = runtime.predict((np.random.default_rng(0).random((180, 240, 3)) * 255).astype(np.uint8))
            assert len(detections) == 300 and set(detections.labels.tolist()) <= {0, 1, 2}
            assert set(detections.names) <= set(THREE_CLASSES)
            record = detections.to_dict()["detections"][0]
            assert THREE_CATEGORY_IDS[record["label"]] == record["category_id"]
            assert record["class_name"] == THREE_CLASSES[record["label"]]
    with pytest.warns(UserWarning, match="has 3 classes but carries no class names"):
        runtime = load_runtime(three_class_model.plain)  # no names anywhere: class_0.., said once
    assert runtime.spec.class_names == ("class_0", "class_1", "class_2") and runtime.spec.category_ids is None


def test_deimv2_infer_prints_draws_and_writes_json_with_the_classes(three_class_model, three_class_dataset, tmp_path,
                                                                   capsys):
    from deimv2_deploy.cli.infer import main as infer_main

    images, _ = three_class_dataset
    image = sorted(images.iterdir())[0]
    out = tmp_path / "out"
    assert infer_main([str(three_class_model.xml), str(image), "--score", "0", "--max-detections", "20", "--json",
                       "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"20 detections \((\d+ (cat|dog|bird)(, )?)+\)", printed), printed  # counts by class name
    record = json.loads((out / f"{image.stem}.json").read_text())
    assert len(record["detections"]) == 20
    for d in record["detections"]:
        assert d["class_name"] == THREE_CLASSES[d["label"]] and d["category_id"] == THREE_CATEGORY_IDS[d["label"]]
    assert (out / f"{image.stem}.jpg").stat().st_size > 0


def test_deimv2_val_maps_labels_through_the_models_category_ids(three_class_model, three_class_dataset, tmp_path,
                                                               capsys, atto_onnx):
    """Ground truth labelled 11/37/90 from the model's own detections: the model scores well on it only if its labels
    go through the ids it carries; ONNX Runtime and OpenVINO agree; a COCO-80 model there is a mismatch."""
    from deimv2_deploy.cli.val import main as val_main

    images, annotations = three_class_dataset
    results = {}
    for path in (three_class_model.onnx, three_class_model.xml):
        out = tmp_path / f"{path.suffix[1:]}.json"
        assert val_main([str(path), "--images", str(images), "--annotations", str(annotations), "--json", str(out),
                         "--per-class", "--quiet"]) == 0
        results[path.suffix] = json.loads(out.read_text())
    printed = capsys.readouterr().out
    onnx, ir = results[".onnx"], results[".xml"]
    # the per-class table names the model's classes (those with objects in these images; random weights may
    # put all of the model's own top detections in one class)
    present = [c["name"] for c in onnx["per_class"] if c["objects"]]
    assert present and all(f" {name} " in printed for name in present), printed
    assert onnx["AP50"] > 0.5 and onnx["AP"] > 0.2, onnx  # the labels were mapped to 11, 37, 90 correctly
    assert abs(onnx["AP"] - ir["AP"]) < 0.02 and abs(onnx["AP50"] - ir["AP50"]) < 0.02
    assert [(c["category_id"], c["name"]) for c in onnx["per_class"]] == list(zip(THREE_CATEGORY_IDS, THREE_CLASSES,
                                                                                   strict=True))
    assert onnx["artifact"]["classes"] == 3 and onnx["detections"] == onnx["images"] * 300
    # a COCO-80 artifact on this dataset: one line naming both sides, nothing written
    out = tmp_path / "coco.json"
    assert val_main([str(atto_onnx.path), "--images", str(images), "--annotations", str(annotations), "--json",
                     str(out), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "has 80 classes" in err[-1] and "has 3 classes (cat, dog, bird" in err[-1]
    assert not out.exists()


def test_export_mistakes_about_classes_are_one_line_and_write_nothing(three_class_model, tmp_path, capsys):
    from deimv2_deploy.cli.export import main as export_main

    store = tmp_path / "store"
    cases = [
        (["--class-names", "cat,dog"], "2 class names were given (cat, dog) but official_format.pth has 3 classes"),
        (["--class-names", "a,b,c", "--category-ids", "1,2"], "2 category ids were given but official_format.pth"),
        (["--class-names", str(tmp_path / "names.txt")], "class names file not found"),
        (["--category-ids", "1,x,3"], "category ids must be whole numbers"),
    ]
    for extra, says in cases:
        code = export_main(["atto", "--checkpoint", str(three_class_model.plain), "--output-dir", str(store),
                            "--quiet", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1 and err[-1].startswith("deimv2-export: error: ") and says in err[-1], err
        assert not store.exists() or not any(store.iterdir())


# --- the pieces that carry class names ---------------------------------------------------------------------------
def test_detections_json_video_records_and_drawing_use_the_models_classes():
    from deimv2_deploy.drawing import annotate
    from deimv2_deploy.video import _json_record

    d = Detections(np.array([[10, 10, 60, 50], [5, 5, 20, 30]]), [0.9, 0.6], [2, 0], THREE_CLASSES, (80, 100),
                   THREE_CATEGORY_IDS)
    assert [x["category_id"] for x in d.to_dict()["detections"]] == [90, 11]
    assert [x["category_id"] for x in d.to_coco(5)] == [90, 11]  # the model's own ids by default
    assert d[1:].category_ids == THREE_CATEGORY_IDS and d.filter(classes=["bird"]).names == ["bird"]
    record = json.loads(_json_record(3, 0.1, d))
    assert record["class_names"] == ["bird", "cat"] and record["category_ids"] == [90, 11]
    coco_model = Detections(d.xyxy, d.scores, d.labels)  # COCO-80, no ids carried: the JSON stays as it was
    assert "category_id" not in coco_model.to_dict()["detections"][0]
    assert "category_ids" not in json.loads(_json_record(3, 0.1, coco_model))
    drawn = annotate(np.zeros((80, 100, 3), np.uint8), d)
    assert drawn.any()
    with pytest.raises(ValueError, match="2 category ids for 3 class names"):
        Detections(d.xyxy, d.scores, d.labels, THREE_CLASSES, None, (1, 2))


def test_a_label_beyond_the_metadatas_classes_is_a_clear_error():
    """An official-exporter ONNX of a 200-class model runs with COCO's 80 names: say what to do."""
    from deimv2_deploy.runtimes.base import Backend, Runtime

    class TwoHundred(Runtime):
        backend = Backend.ONNXRUNTIME

        def __init__(self):
            super().__init__(ArtifactSpec.for_official_export("atto"))

        def _infer(self, inputs):
            n = inputs["images"].shape[0]
            return {"labels": np.full((n, 2), 150, np.int64), "boxes": np.ones((n, 2, 4), np.float32),
                    "scores": np.full((n, 2), 0.5, np.float32)}

    with pytest.raises(ValueError, match=r"predicted label 150 but its metadata names only 80 classes.*--class-names"):
        TwoHundred().predict(np.zeros((32, 32, 3), np.uint8))
