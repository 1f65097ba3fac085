"""COCO evaluation and deimv2-val: agreement with pycocotools, known AP values, a real runtime, every bad input."""
from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from deimv2_deploy.classes import COCO_CATEGORY_IDS, COCO_CLASSES
from deimv2_deploy.cli.val import main as val_main
from deimv2_deploy.data import DatasetError, load_coco
from deimv2_deploy.data.synth import SYNTH_CATEGORY_IDS, SYNTH_CLASSES, render_scene, write_dataset
from deimv2_deploy.detections import Detections
from deimv2_deploy.evaluation import METRIC_KEYS, coco_metrics, evaluate, evaluate_dataset, format_metrics
from deimv2_deploy.media import read_image
from deimv2_deploy.spec import ArtifactSpec

pycocotools = pytest.importorskip("pycocotools", reason="pycocotools (dev dependency) is the reference evaluator")
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402


def _pycocotools_stats(annotation_file: Path, results: list[dict], image_ids=None) -> np.ndarray:
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
        dt = gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(gt, dt, "bbox")
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats, ev


@pytest.fixture(scope="module")
def synth_val(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, {"val": 12}, image_size=192, seed=7)
    return root


# --- the evaluator against pycocotools ------------------------------------------------------------------------
def test_faster_coco_eval_equals_pycocotools(synth_val, tmp_path):
    data = json.loads((synth_val / "annotations" / "instances_val.json").read_text())
    for ann in data["annotations"][::9]:
        ann["iscrowd"] = 1  # crowd regions are matched differently: exercise that path too
    gt_file = tmp_path / "gt.json"
    gt_file.write_text(json.dumps(data))
    rng = np.random.default_rng(0)
    results = []
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(int(rng.integers(0, 3))):  # missed, found, or found twice (a duplicate)
            j = rng.normal(0, 0.12, 4) * [w, h, w, h]
            cid = ann["category_id"] if rng.random() < 0.85 else int(rng.choice(SYNTH_CATEGORY_IDS))
            results.append({"image_id": ann["image_id"], "category_id": cid,
                            "bbox": [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                            "score": float(rng.random())})
    for image in data["images"]:  # false positives
        for _ in range(15):
            x, y = rng.uniform(0, 150, 2)
            results.append({"image_id": image["id"], "category_id": int(rng.choice(SYNTH_CATEGORY_IDS)),
                            "bbox": [x, y, *rng.uniform(3, 60, 2)], "score": float(rng.random() * 0.7)})
    ours, per_class = coco_metrics(data, results)
    reference, ev = _pycocotools_stats(gt_file, results)
    assert 0.05 < ours["AP"] < 0.95  # a case with something to measure
    for key, ref in zip(METRIC_KEYS, reference, strict=True):
        assert (ours[key] is None and ref == -1) or abs(ours[key] - ref) <= 1e-4, (key, ours[key], ref)
    precision = ev.eval["precision"][:, :, :, 0, -1]
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        assert abs(per_class[cid] - p[p > -1].mean()) <= 1e-4
    # a subset of images, as --max-images evaluates
    ours, _ = coco_metrics(data, results, image_ids=[1, 2, 3])
    reference, _ = _pycocotools_stats(gt_file, results, image_ids=[1, 2, 3])
    assert all(abs(ours[k] - r) <= 1e-4 for k, r in zip(METRIC_KEYS, reference, strict=True) if r >= 0)


# --- an oracle runtime: known detections give known AP --------------------------------------------------------
class _Oracle:
    """A runtime that 'detects' the ground truth of each image (found by its pixels), boxes shifted right."""

    def __init__(self, dataset, shift: float = 0.0, drop_every: int = 0) -> None:
        self.spec = ArtifactSpec.for_variant("atto", class_names=SYNTH_CLASSES, category_ids=SYNTH_CATEGORY_IDS)
        self.max_batch = 8
        mapping = dataset.label_mapping()
        self.truth = {}
        for r in dataset.images:
            boxes = r.boxes.astype(np.float32).copy()
            boxes[:, 0::2] += shift * (boxes[:, 2:3] - boxes[:, 0:1])
            labels = mapping.to_labels(r.category_ids)
            keep = np.arange(len(r)) % drop_every != 0 if drop_every else np.ones(len(r), bool)
            self.truth[_digest(read_image(r.file))] = Detections(boxes[keep], np.full(keep.sum(), 0.9, np.float32),
                                                                 labels[keep], SYNTH_CLASSES)
        self.calls = []

    def predict(self, images, score_threshold=0.0):
        self.calls.append(len(images))
        return [self.truth[_digest(im)] for im in images]

    def describe(self):
        return {"backend": "oracle", "device": "cpu", "version": None}


def _digest(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


@pytest.fixture(scope="module")
def separated(tmp_path_factory) -> Path:
    """Objects that do not overlap (so a shifted box can only match its own object): IoU is then exact."""
    root = tmp_path_factory.mktemp("separated")
    (root / "img").mkdir()
    images, anns = [], []
    for i in range(6):
        cv2.imwrite(str(root / "img" / f"{i}.png"), render_scene(0, "val", i, 160).image)
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": 160, "height": 160})
        for k in range(3):
            w, h = 20 + 12 * i + 4 * k, 14 + 7 * k
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": SYNTH_CATEGORY_IDS[(i + k) % 8],
                         "bbox": [4 + 52 * k, 10 + 3 * i, w if k < 2 else w // 2, h], "area": w * h, "iscrowd": 0})
    cats = [{"id": c, "name": n} for c, n in zip(SYNTH_CATEGORY_IDS, SYNTH_CLASSES, strict=True)]
    (root / "ann.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return root


def test_perfect_detections_give_ap_one(separated):
    dataset = load_coco(separated / "img", separated / "ann.json")
    runtime = _Oracle(dataset)
    result = evaluate(runtime, separated / "img", separated / "ann.json", batch=4, progress=False)
    for key in METRIC_KEYS:
        assert result[key] is None or result[key] == pytest.approx(1.0), key
    assert result["APs"] is not None and result["APm"] is not None  # both ranges present in this set
    assert result["images"] == 6 and result["detections"] == 18 and runtime.calls == [4, 2]
    assert {c["name"]: c["AP"] for c in result["per_class"] if c["objects"]} == \
        {c["name"]: pytest.approx(1.0) for c in result["per_class"] if c["objects"]}
    assert result["evaluator"]["name"] == "faster-coco-eval" and result["artifact"]["backend"] == "oracle"


def test_shifted_boxes_lower_ap_as_expected(separated):
    dataset = load_coco(separated / "img", separated / "ann.json")
    # a box shifted by f of its width has IoU (1 - f) / (1 + f) with its object
    f = (1 - 0.625) / (1 + 0.625)  # IoU 0.625: matched at thresholds 0.50, 0.55, 0.60 of the ten
    result = evaluate_dataset(_Oracle(dataset, shift=f), dataset, progress=False)
    assert result["AP50"] == pytest.approx(1.0) and result["AP75"] == pytest.approx(0.0)
    assert result["AP"] == pytest.approx(0.3, abs=1e-6)
    aps = [evaluate_dataset(_Oracle(dataset, shift=s), dataset, progress=False)["AP"] for s in (0, 0.03, 0.08, 0.2)]
    assert all(a > b for a, b in zip(aps, aps[1:], strict=False)), aps
    # the first object of each image missed: AR is the mean over categories of the fraction found
    result = evaluate_dataset(_Oracle(dataset, drop_every=3), dataset, progress=False)
    found: dict[int, list[bool]] = {}
    for r in dataset.images:
        for k, cid in enumerate(r.category_ids.tolist()):
            found.setdefault(cid, []).append(k % 3 != 0)
    expected = np.mean([np.mean(v) for v in found.values()])
    assert expected < 0.8 and result["AR100"] == pytest.approx(expected, abs=1e-6)


def test_evaluation_leaves_the_dataset_untouched_and_honours_max_images(separated):
    dataset = load_coco(separated / "img", separated / "ann.json")
    before = json.dumps(dataset.coco_json, sort_keys=True)
    result = evaluate_dataset(_Oracle(dataset, shift=0.1), dataset, max_images=2, progress=False)
    assert json.dumps(dataset.coco_json, sort_keys=True) == before
    assert result["images"] == 2 and result["detections"] == 6 and result["dataset"]["images_total"] == 6
    text = format_metrics(result, per_class=True)
    assert " AR100  @[IoU=0.50:0.95 | area=all    | maxDets=100] =" in text and " circle " in text


def test_dataset_without_objects_is_an_error(separated, tmp_path):
    data = json.loads((separated / "ann.json").read_text())
    data["annotations"] = []
    (tmp_path / "empty.json").write_text(json.dumps(data))
    dataset = load_coco(separated / "img", tmp_path / "empty.json")
    with pytest.raises(DatasetError, match="nothing to measure"):
        evaluate_dataset(_Oracle(load_coco(separated / "img", separated / "ann.json")), dataset, progress=False)


# --- a real runtime: deimv2-val against an independent pycocotools evaluation ---------------------------------
def test_deimv2_val_equals_pycocotools_on_the_same_runtime(atto_onnx, coco80_from_detections, tmp_path, capsys):
    from deimv2_deploy.runtimes import load_runtime

    root, ann = coco80_from_detections
    out = tmp_path / "metrics.json"
    assert val_main([str(atto_onnx.path), "--images", str(root / "images"), "--annotations", str(ann),
                     "--json", str(out), "--batch", "4", "--quiet", "--per-class"]) == 0
    printed = capsys.readouterr().out
    assert " AP     @[IoU=0.50:0.95 | area=all    | maxDets=100] =" in printed
    assert " objects      AP" in printed and "categories without objects in these images not shown" in printed
    result = json.loads(out.read_text())
    # the independent path: the same runtime's top-300 detections, converted here, scored by pycocotools
    runtime = load_runtime(atto_onnx.path)
    runtime.clip_boxes = False  # deimv2-val scores the model's boxes as they are, unclipped (official protocol)
    label_to_id = dict(enumerate(COCO_CATEGORY_IDS))
    data = json.loads(ann.read_text())
    results = []
    for im in data["images"]:
        dets = runtime.predict(read_image(root / "images" / im["file_name"]))
        assert len(dets) == 300
        for (x0, y0, x1, y1), s, lab in zip(dets.xyxy.tolist(), dets.scores.tolist(), dets.labels.tolist(),
                                            strict=True):
            results.append({"image_id": im["id"], "category_id": label_to_id[lab], "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "score": s})
    reference, _ = _pycocotools_stats(ann, results)
    assert reference[1] > 0.2  # the runtime finds much of this ground truth: a comparison with substance
    for key, ref in zip(METRIC_KEYS[:3], reference[:3], strict=True):
        assert abs(result[key] - ref) <= 1e-3, (key, result[key], ref)
    assert set(METRIC_KEYS) <= set(result) and result["images"] == 12 and result["detections"] == 12 * 300
    assert result["artifact"]["path"] == str(atto_onnx.path) and result["artifact"]["backend"] == "onnxruntime"
    assert result["evaluator"]["name"] == "faster-coco-eval" and result["evaluator"]["version"]
    assert len(result["per_class"]) == 80 and not list(tmp_path.glob(".*partial*"))


# --- every bad input: one line on stderr, a non-zero exit, nothing written -------------------------------------
def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _as_coco80(data: dict) -> None:
    """The shapes dataset relabelled with COCO's 80 categories, so that a COCO model evaluates on it."""
    for a in data["annotations"]:
        a["category_id"] = COCO_CATEGORY_IDS[a["category_id"] - 1]
    data["categories"] = [{"id": c, "name": n} for c, n in zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True)]


@pytest.mark.parametrize("case, words", [
    ("missing", "annotation file not found"),
    ("not_json", "not valid JSON"),
    ("not_coco", "not a COCO detection file"),
    ("missing_images", "2 of 12 images listed"),
    ("empty", "lists no images"),
    ("unknown_category", "refer to category ids the file does not list (999)"),
    ("unknown_image", "refer to image ids the file does not list (4242)"),
    ("no_objects", "nothing to measure"),
    ("corrupt", "cannot decode image"),
    ("wrong_size", "is 192x192 but the annotation file says 200x192"),
    ("mismatch", "has 80 classes (person"),
    ("precision", "--precision does not apply to onnxruntime"),
])
def test_deimv2_val_bad_input(case, words, atto_onnx, synth_val, tmp_path, capsys):
    images = synth_val / "val"
    good = json.loads((synth_val / "annotations" / "instances_val.json").read_text())
    ann = tmp_path / "instances.json"
    extra = []
    if case == "not_json":
        _write(ann, "{oops")
    elif case == "not_coco":
        _write(ann, {"images": []})
    elif case == "missing_images":
        good["images"][3]["file_name"] = "gone.jpg"
        good["images"][5]["file_name"] = "also_gone.jpg"
        _write(ann, good)
        words += f" in instances.json are missing from {images}: gone.jpg, also_gone.jpg"
    elif case == "empty":
        _write(ann, {**good, "images": [], "annotations": []})
    elif case == "unknown_category":
        good["annotations"][0]["category_id"] = 999
        _write(ann, good)
    elif case == "unknown_image":
        good["annotations"][0]["image_id"] = 4242
        _write(ann, good)
    elif case == "no_objects":
        _write(ann, {**good, "annotations": []})
    elif case == "corrupt":
        _as_coco80(good)
        images = tmp_path / "images"
        images.mkdir()
        for im in good["images"]:
            (images / im["file_name"]).write_bytes((synth_val / "val" / im["file_name"]).read_bytes())
        (images / good["images"][4]["file_name"]).write_bytes(b"not a jpeg")
        _write(ann, good)
    elif case == "wrong_size":
        _as_coco80(good)
        good["images"][2]["width"] = 200
        _write(ann, good)
    elif case == "mismatch":
        _write(ann, good)  # the 8 shape classes; the artifact is an 80-class COCO model
        words += " ... but the dataset (instances.json) has 8 classes (circle"
    elif case == "precision":
        _write(ann, good)
        extra = ["--precision", "fp16"]
    out = tmp_path / "out" / "metrics.json"
    rc = val_main([str(atto_onnx.path), "--images", str(images), "--annotations", str(ann), "--json", str(out),
                   "--quiet", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("deimv2-val: error: ") and "Traceback" not in "\n".join(err)
    for part in words.split(" ... "):
        assert part in err[-1], err[-1]
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_deimv2_val_argument_errors(atto_onnx, synth_val, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        val_main([str(atto_onnx.path), "--images", str(synth_val / "val")])
    assert e.value.code == 2 and "--annotations FILE, or --data DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        val_main([str(atto_onnx.path), "--data", str(synth_val), "--batch", "0"])
    assert val_main([str(tmp_path / "none.onnx"), "--data", str(synth_val), "--quiet"]) == 1
    assert "artifact not found" in capsys.readouterr().err


def test_custom_class_model_through_the_torch_runtime(synth_val):
    """An 8-class model carrying the dataset's category ids evaluates on its dataset (random weights: AP ~ 0),
    and on a COCO dataset it is a mismatch naming both sides."""
    pytest.importorskip("torch", reason="the torch runtime needs the export extra")
    from deimv2_deploy.models import build_model
    from deimv2_deploy.models.graph import DeployGraph
    from deimv2_deploy.runtimes.torch_backend import TorchRuntime

    model = build_model("atto", num_classes=len(SYNTH_CLASSES)).eval().deploy().eval()
    spec = ArtifactSpec.for_variant("atto", class_names=SYNTH_CLASSES, category_ids=SYNTH_CATEGORY_IDS,
                                    random_weights=True)
    runtime = TorchRuntime(graph=DeployGraph(model), spec=spec)
    dataset = load_coco(synth_val / "val", synth_val / "annotations" / "instances_val.json")
    result = evaluate_dataset(runtime, dataset, max_images=3, progress=False)
    assert result["images"] == 3 and result["detections"] == 3 * 300
    assert [c["name"] for c in result["per_class"]] == list(SYNTH_CLASSES)
    assert all(result[k] is None or 0 <= result[k] <= 1 for k in METRIC_KEYS)
    coco = dataset.coco_json | {"categories": [{"id": c, "name": n} for c, n in
                                               zip(COCO_CATEGORY_IDS, COCO_CLASSES, strict=True)]}
    from deimv2_deploy.data import CategoryMismatchError
    from deimv2_deploy.data.categories import Category
    from deimv2_deploy.data.coco import CocoDataset

    other = CocoDataset(dataset.images, tuple(Category(c["id"], c["name"]) for c in coco["categories"]),
                        dataset.annotation_file, dataset.images_dir, coco)
    with pytest.raises(CategoryMismatchError, match="has 8 classes .* has 80 classes"):
        evaluate_dataset(runtime, other, progress=False)


def test_evaluation_and_synth_import_no_torch():
    code = ("import sys, deimv2_deploy.evaluation, deimv2_deploy.data.synth, deimv2_deploy.cli.val, "
            "deimv2_deploy.cli.data; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_images_are_read_in_stored_orientation(tmp_path):
    """EXIF rotation is not applied (as the official evaluation's PIL Image.open): boxes refer to stored pixels."""
    from PIL import Image

    from deimv2_deploy.data import ImageRecord, read_record_image

    pixels = np.zeros((40, 100, 3), np.uint8)
    pixels[:, :50] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(pixels).save(path, exif=exif)
    record = ImageRecord(1, path, 100, 40, np.zeros((0, 4)), np.zeros(0), np.zeros(0), np.zeros(0))
    image = read_record_image(record)
    assert image.shape == (40, 100, 3) and image[:, :50].mean() > 200 and image[:, 60:].mean() < 50
    assert read_image(path).shape[:2] == (100, 40)  # what an EXIF-applying reader would have scored instead


def test_hand_written_ground_truth_without_ids_areas_or_crowd_flags(separated, tmp_path):
    data = json.loads((separated / "ann.json").read_text())
    for a in data["annotations"]:
        del a["area"], a["iscrowd"]
        a["id"] = 7  # repeated: the evaluator must still see every object
    _write(tmp_path / "bare.json", data)
    dataset = load_coco(separated / "img", tmp_path / "bare.json")
    result = evaluate_dataset(_Oracle(dataset), dataset, progress=False)
    assert result["AP"] == pytest.approx(1.0) and result["AR100"] == pytest.approx(1.0)
    result = evaluate_dataset(_Oracle(dataset, drop_every=3), dataset, progress=False)
    assert result["AR100"] < 0.8  # the missed objects count: none was dropped as a duplicate id
