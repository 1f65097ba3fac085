"""deimv2-val on EoMT-DINOv3 artifacts: mIoU, PQ and mask AP on the synthetic dataset's panoptic ground truth
(tiny random EoMT exported here), the pipeline fed its own ground truth (all metrics 1), and bad inputs."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers (pinned 5.24)")

from vit_helpers import make_confident  # noqa: E402

from deimv2_deploy.cli.val import main as val_main  # noqa: E402
from deimv2_deploy.data.panoptic import load_panoptic, read_panoptic_ids  # noqa: E402
from deimv2_deploy.data.synth import SYNTH_CLASSES, write_dataset  # noqa: E402
from deimv2_deploy.evaluation import METRIC_KEYS  # noqa: E402
from deimv2_deploy.segmentation import InstanceSegments, PanopticSegment, PanopticSegments, Segmentation  # noqa: E402
from deimv2_deploy.segmentation_evaluation import evaluate_segmentation  # noqa: E402
from deimv2_deploy.vit_spec import VitSpec  # noqa: E402

NAMES = SYNTH_CLASSES + ("background",)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from deimv2_deploy.exporters.vit_export import export_vit

    root = tmp_path_factory.mktemp("seg_val")
    torch.manual_seed(0)
    config = transformers.EomtDinov3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, num_register_tokens=1,
                                           num_blocks=1, num_queries=12, num_labels=len(NAMES),
                                           id2label=dict(enumerate(NAMES)))
    model = transformers.EomtDinov3ForUniversalSegmentation(config).eval()
    model.attn_mask_probs.fill_(0.0)
    make_confident(model, no_object_bias=12.0)  # some panoptic segments survive the 0.8 threshold
    model.save_pretrained(root / "eomt")
    dino = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, num_register_tokens=1)).eval()
    dino.save_pretrained(root / "dino")
    write_dataset(root / "data", {"val": 4}, image_size=64, seed=3)
    return {"eomt": export_vit("eomt", root / "eomt", output_dir=root, stuff_classes="background", quiet=True).path,
            "nostuff": export_vit("eomt", root / "eomt", output_dir=root / "ns", quiet=True).path,
            "dino": export_vit("dinov3", root / "dino", output_dir=root, quiet=True).path,
            "data": root / "data"}


def _finite_unit(value) -> bool:
    return value is not None and math.isfinite(value) and 0.0 <= value <= 1.0


def test_eomt_val_writes_every_metric(setup, tmp_path, capsys):
    out = tmp_path / "seg.json"
    assert val_main([str(setup["eomt"]), "--data", str(setup["data"]), "--json", str(out), "--per-class",
                     "--quiet", "--batch", "3"]) == 0
    printed = capsys.readouterr().out
    assert "EoMT-DINOv3: 4 images, tasks semantic, panoptic, instance" in printed and "background" in printed
    r = json.loads(out.read_text())
    assert set(r) >= {"images", "tasks", "semantic", "panoptic", "instance", "mIoU", "PQ", "artifact", "dataset",
                      "notes", "seconds"}
    assert r["images"] == 4 and r["tasks"] == ["semantic", "panoptic", "instance"]
    assert r["artifact"]["stuff_classes"] == ["background"] and r["dataset"]["things"] == 8
    s, p, i = r["semantic"], r["panoptic"], r["instance"]
    assert _finite_unit(s["mIoU"]) and _finite_unit(s["pixel_accuracy"]) and r["mIoU"] == s["mIoU"]
    assert [c["name"] for c in s["per_class"]] == list(NAMES)
    assert sum(c["gt_pixels"] for c in s["per_class"]) == 4 * 64 * 64  # the synthetic dataset has no void
    for group in ("all", "things", "stuff"):
        assert set(p[group]) == {"PQ", "SQ", "RQ", "n"} and p[group]["n"] > 0
        assert all(_finite_unit(p[group][k]) for k in ("PQ", "SQ", "RQ"))
    assert p["stuff"]["n"] == 1 and r["PQ"] == p["all"]["PQ"]
    assert {c["name"] for c in p["per_class"]} == set(NAMES)
    assert all(set(c) >= {"PQ", "SQ", "RQ", "TP", "FP", "FN", "isthing"} for c in p["per_class"])
    assert sum(c["FN"] + c["TP"] for c in p["per_class"]) > 4  # every ground-truth segment is counted
    assert set(i) >= set(METRIC_KEYS) | {"per_class", "evaluator", "detections"}
    assert _finite_unit(i["AP"]) and i["detections"] > 0 and len(i["per_class"]) == 8  # things only
    assert r["mIoU"] < 0.5 and r["PQ"] < 0.5  # random weights


def test_artifact_without_stuff_split_skips_pq_with_one_note(setup, tmp_path, capsys):
    out = tmp_path / "seg.json"
    assert val_main([str(setup["nostuff"]), "--data", str(setup["data"]), "--json", str(out), "--quiet",
                     "--max-images", "2", "--task", "semantic,panoptic", "--backend", "openvino"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if line.startswith("note: PQ skipped")]
    assert len(notes) == 1 and "--stuff-classes" in notes[0]
    r = json.loads(out.read_text())
    assert r["panoptic"] is None and r["PQ"] is None and _finite_unit(r["mIoU"]) and r["images"] == 2
    assert r["tasks"] == ["semantic"] and r["artifact"]["backend"] == "openvino"
    # the run can name the split itself
    assert val_main([str(setup["nostuff"]), "--data", str(setup["data"]), "--json", str(out), "--quiet",
                     "--max-images", "2", "--stuff-classes", "background", "--task", "panoptic"]) == 0
    r = json.loads(out.read_text())
    assert r["tasks"] == ["panoptic"] and _finite_unit(r["PQ"]) and r["semantic"] is None


class _Oracle:
    """A runtime that answers each image with the dataset's own ground truth (classes in another order than the
    dataset's categories, to exercise the mapping by name)."""

    def __init__(self, dataset, path):
        order = list(reversed(NAMES))
        self.spec = VitSpec(family="eomt", model_type="eomt_dinov3", input_size=(32, 32), patch_size=8, hidden_size=8,
                            num_register_tokens=0, class_names=tuple(order), num_queries=4,
                            stuff_classes=(order.index("background"),))
        self.path, self.backend, self.max_batch = path, "oracle", 8
        self._records = iter(dataset.images)
        self._label = {c.id: order.index(c.name) for c in dataset.categories}

    def stuff_classes(self, override=None):
        return self.spec.stuff_classes

    def predict(self, images, tasks, stuff_classes=None):
        out = []
        for image in images:
            record = next(self._records)
            ids = read_panoptic_ids(record)
            assert image.shape[:2] == ids.shape
            semantic = np.zeros(ids.shape, np.int64)
            segment_ids = np.full(ids.shape, -1, np.int32)
            segments, masks, labels = [], [], []
            for k, s in enumerate(record.segments):
                label = self._label[s.category_id]
                semantic[ids == s.id] = label
                segment_ids[ids == s.id] = k
                segments.append(PanopticSegment(k, label, NAMES[0], 1.0, label != self.spec.stuff_classes[0],
                                                int((ids == s.id).sum()), k))
                masks.append(ids == s.id)
                labels.append(label)
            n = len(masks)
            instances = InstanceSegments(np.stack(masks), np.ones(n, np.float32), np.array(labels, np.int64),
                                         np.arange(n))
            out.append(Segmentation(ids.shape, self.spec.class_names, semantic, instances,
                                    PanopticSegments(segment_ids, tuple(segments), self.spec.stuff_classes)))
        return out


def test_ground_truth_as_prediction_scores_one(setup):
    dataset = load_panoptic(setup["data"] / "val", setup["data"] / "annotations" / "panoptic_val.json")
    r = evaluate_segmentation(_Oracle(dataset, setup["eomt"]), dataset, batch=3, progress=False)
    assert r["mIoU"] == 1.0 and r["semantic"]["pixel_accuracy"] == 1.0
    assert r["PQ"] == 1.0 and r["panoptic"]["things"]["PQ"] == r["panoptic"]["stuff"]["PQ"] == 1.0
    assert r["instance"]["AP"] == pytest.approx(1.0) and r["instance"]["AP75"] == pytest.approx(1.0)
    assert r["notes"] == []


def _one_line(capsys, argv) -> str:
    assert val_main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deimv2-val: error: "), err
    return err


def test_bad_inputs_are_one_line(setup, tmp_path, capsys):
    eomt, data = str(setup["eomt"]), setup["data"]
    err = _one_line(capsys, [str(setup["dino"]), "--data", str(data), "--quiet"])
    assert "DINOv3 feature extractor" in err and "no such metric" in err
    plain = tmp_path / "plain"
    write_dataset(plain, {"val": 1}, image_size=64, seed=0, panoptic=False)
    err = _one_line(capsys, [eomt, "--data", str(plain), "--quiet"])
    assert "no panoptic 'val' split" in err and "--panoptic-only" in err
    err = _one_line(capsys, [eomt, "--images", str(data / "val"), "--annotations",
                             str(data / "annotations" / "instances_val.json"), "--quiet"])
    assert "--annotations is for DEIMv2 detector artifacts" in err and "--panoptic" in err
    err = _one_line(capsys, [eomt, "--panoptic", str(data / "annotations" / "instances_val.json"), "--images",
                             str(data / "val"), "--quiet"])
    assert "not a COCO panoptic file" in err
    err = _one_line(capsys, [eomt, "--data", str(data), "--task", "depth", "--quiet"])
    assert "--task 'depth' is not a segmentation task" in err
    renamed = tmp_path / "renamed"
    shutil.copytree(data, renamed)
    pan = renamed / "annotations" / "panoptic_val.json"
    content = json.loads(pan.read_text())
    content["categories"][0]["name"] = "disc"
    pan.write_text(json.dumps(content))
    err = _one_line(capsys, [eomt, "--data", str(renamed), "--quiet"])
    assert "'circle' is not among the dataset's categories" in err and "disc" in err and "triangle" in err
    err = _one_line(capsys, [eomt, "--data", str(data), "--precision", "int8", "--quiet"])
    assert "--precision is for DEIMv2 detector artifacts" in err


def test_explicit_paths_and_dataset_categories_the_model_lacks(setup, tmp_path, capsys):
    """--images + --panoptic (PNGs found beside the JSON); a dataset with an extra category the model cannot
    predict is evaluated, with a note."""
    data = tmp_path / "extra"
    shutil.copytree(setup["data"], data)
    pan = data / "annotations" / "panoptic_val.json"
    content = json.loads(pan.read_text())
    content["categories"].append({"id": 20, "name": "hexagon", "supercategory": "shape", "isthing": 1})
    pan.write_text(json.dumps(content))
    out = tmp_path / "r.json"
    assert val_main([str(setup["eomt"]), "--images", str(data / "val"), "--panoptic", str(pan), "--json", str(out),
                     "--quiet", "--task", "semantic", "--max-images", "1"]) == 0
    assert "has no class for 1 of the dataset's categories (hexagon)" in capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["semantic"]["per_class"][-1] == {"category_id": 20, "name": "hexagon", "IoU": None, "gt_pixels": 0}


def test_eomt_val_runs_without_torch(setup, tmp_path):
    """The whole EoMT evaluation (runtime, metrics, mask AP) imports no torch."""
    import subprocess
    import sys

    out = tmp_path / "r.json"
    code = ("import sys; from deimv2_deploy.cli.val import main; "
            f"rc = main([{str(setup['eomt'])!r}, '--data', {str(setup['data'])!r}, '--json', {str(out)!r}, "
            "'--quiet', '--max-images', '1']); "
            "assert rc == 0 and 'torch' not in sys.modules, (rc, 'torch imported')")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert json.loads(out.read_text())["instance"] is not None
