"""COCO mAP of any Runtime on a COCO-format dataset, with the official evaluation protocol. No torch.

Protocol (as the official `val`): every image at its own size through the runtime's preprocessing; the model's
top-k (300) detections per image with no score threshold; boxes in the original image's pixels (what
`Runtime.predict` returns), written as COCO results (xywh, category id through the label mapping); bbox
evaluation by faster-coco-eval, a maintained C++ re-implementation of pycocotools' COCOeval that gives the same
numbers. Its 12 standard metrics are returned under METRIC_KEYS; a metric COCO leaves undefined (-1: no
ground truth in that area range) is None.
"""
from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from deimv2_deploy.data.categories import CategoryMapping, match_categories
from deimv2_deploy.data.coco import CocoDataset, DatasetError, load_coco, read_record_image
from deimv2_deploy.detections import Detections

__all__ = ["METRIC_KEYS", "coco_eval_summary", "evaluate", "evaluate_dataset", "evaluation_subset", "coco_results",
           "coco_metrics", "evaluator_info", "format_metrics"]

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_METRIC_TEXT = {  # the rows of pycocotools' summary, for the printed table
    "AP": "@[IoU=0.50:0.95 | area=all    | maxDets=100]",
    "AP50": "@[IoU=0.50      | area=all    | maxDets=100]",
    "AP75": "@[IoU=0.75      | area=all    | maxDets=100]",
    "APs": "@[IoU=0.50:0.95 | area=small  | maxDets=100]",
    "APm": "@[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "APl": "@[IoU=0.50:0.95 | area=large  | maxDets=100]",
    "AR1": "@[IoU=0.50:0.95 | area=all    | maxDets=1  ]",
    "AR10": "@[IoU=0.50:0.95 | area=all    | maxDets=10 ]",
    "AR100": "@[IoU=0.50:0.95 | area=all    | maxDets=100]",
    "ARs": "@[IoU=0.50:0.95 | area=small  | maxDets=100]",
    "ARm": "@[IoU=0.50:0.95 | area=medium | maxDets=100]",
    "ARl": "@[IoU=0.50:0.95 | area=large  | maxDets=100]",
}


def _import_evaluator() -> Any:
    try:
        import faster_coco_eval
    except ImportError:
        raise ImportError("COCO evaluation needs faster-coco-eval: pip install faster-coco-eval") from None
    return faster_coco_eval


def evaluator_info() -> dict[str, str]:
    lib = _import_evaluator()
    return {"name": "faster-coco-eval", "version": str(getattr(lib, "__version__", "unknown"))}


def coco_results(detections: Detections, image_id: int, mapping: CategoryMapping) -> np.ndarray:
    """One image's detections as COCO result rows: float64 (N, 7) [image_id, x, y, w, h, score, category_id]."""
    xyxy = detections.xyxy.astype(np.float64)
    rows = np.empty((len(detections), 7), np.float64)
    rows[:, 0] = image_id
    rows[:, 1:3] = xyxy[:, :2]
    rows[:, 3:5] = xyxy[:, 2:] - xyxy[:, :2]
    rows[:, 5] = detections.scores
    rows[:, 6] = mapping.to_category_ids(detections.labels)
    return rows


def _as_dicts(results: np.ndarray | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fresh result dicts (the library adds fields to them), from rows or from dicts."""
    if isinstance(results, np.ndarray):
        return [{"image_id": int(r[0]), "bbox": r[1:5].tolist(), "score": float(r[5]), "category_id": int(r[6])}
                for r in results]
    return [{**r, "bbox": list(r["bbox"])} for r in results]


def _gt_annotation(a: dict[str, Any], number: int) -> dict[str, Any]:
    """A ground-truth annotation as bbox evaluation reads it. Ids are renumbered (a file's missing or repeated
    ids would make the evaluator drop objects); `area` (what small/medium/large use) defaults to the box's and
    `iscrowd` to 0, as files written by hand often omit them."""
    out = {k: a[k] for k in ("image_id", "category_id", "ignore") if k in a}
    out["id"] = number
    out["bbox"] = list(a["bbox"])
    out["area"] = a["area"] if isinstance(a.get("area"), (int, float)) else float(a["bbox"][2] * a["bbox"][3])
    out["iscrowd"] = int(a.get("iscrowd", 0) or 0)
    return out


def coco_metrics(ground_truth: dict[str, Any], results: np.ndarray | list[dict[str, Any]],
                 image_ids: Sequence[int] | None = None) -> tuple[dict[str, float | None], dict[int, float | None]]:
    """(the 12 metrics, AP per category id) of `results` against a COCO ground-truth dict, by faster-coco-eval.

    `results`: rows as `coco_results` makes them, or COCO result dicts (image_id, category_id, bbox xywh, score).

    `image_ids` restricts the evaluation to those images (None: all the ground truth lists).
    """
    lib = _import_evaluator()
    # the library adds fields to the dicts it is given: hand it copies, of what bbox evaluation reads
    gt_data = {"info": copy.deepcopy(ground_truth.get("info", {})),
               "images": [{k: im[k] for k in ("id", "width", "height", "file_name") if k in im}
                          for im in ground_truth["images"]],
               "categories": copy.deepcopy(ground_truth["categories"]),
               "annotations": [_gt_annotation(a, i) for i, a in enumerate(ground_truth["annotations"], 1)]}
    with contextlib.redirect_stdout(io.StringIO()):  # the library logs its progress
        gt = lib.COCO(gt_data)
        dt = gt.loadRes(_as_dicts(results))
        ev = lib.COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        return coco_eval_summary(ev)


def coco_eval_summary(ev: Any) -> tuple[dict[str, float | None], dict[int, float | None]]:
    """Run a prepared COCOeval (bbox or segm) and read its 12 metrics (METRIC_KEYS; undefined -> None) and AP per
    category id (None where that category has no ground truth)."""
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = np.asarray(ev.stats, np.float64)[:len(METRIC_KEYS)]
    metrics = {k: (None if v < 0 else float(v)) for k, v in zip(METRIC_KEYS, stats, strict=True)}
    # precision: [IoU thresholds, recall points, categories, area ranges, max dets]; area "all", 100 dets
    precision = np.asarray(ev.eval["precision"])[:, :, :, 0, -1]
    per_class: dict[int, float | None] = {}
    for k, cid in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        p = p[p > -1]
        per_class[int(cid)] = float(p.mean()) if p.size else None
    return metrics, per_class


def evaluate(runtime: Any, images_dir: str | os.PathLike, annotations: str | os.PathLike, batch: int = 8,
             max_images: int | None = None, progress: bool = True) -> dict[str, Any]:
    """COCO metrics of `runtime` on the dataset `annotations` (instances JSON) with images in `images_dir`.

    Returns the 12 metrics under METRIC_KEYS, `per_class` AP, `images`, `detections`, the artifact's identity,
    the dataset and the evaluator's name/version. DatasetError (a ValueError) for a dataset that cannot be used,
    CategoryMismatchError when the model's classes are not the dataset's.
    """
    return evaluate_dataset(runtime, load_coco(images_dir, annotations), batch=batch, max_images=max_images,
                            progress=progress)


def evaluate_dataset(runtime: Any, dataset: CocoDataset, batch: int = 8, max_images: int | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """`evaluate` on a dataset already loaded with `load_coco` (as a training loop holds it)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    evaluator = evaluator_info()
    subset = evaluation_subset(dataset, max_images)
    artifact = _artifact_identity(runtime)
    mapping = match_categories(runtime.spec.class_names, runtime.spec.dataset_category_ids(), dataset.categories,
                               model=f"the model ({artifact['path'] or artifact['variant']})",
                               dataset=f"the dataset ({dataset.annotation_file.name})")

    from tqdm import tqdm

    rows: list[np.ndarray] = []  # per image, (300, 7): compact until the evaluator needs its dicts
    records = subset.images
    saved_max_batch = getattr(runtime, "max_batch", None)
    if saved_max_batch is not None and runtime.spec.batch is None:
        runtime.max_batch = batch  # predict() chunks a list into batches of this size
    saved_clip = getattr(runtime, "clip_boxes", None)
    if saved_clip is not None:
        runtime.clip_boxes = False  # the official protocol scores the model's boxes as they are, unclipped
    try:
        with tqdm(total=len(records), desc="evaluating", unit="img", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(records), batch):
                chunk = records[start:start + batch]
                images = [read_record_image(r) for r in chunk]
                for record, dets in zip(chunk, runtime.predict(images, score_threshold=0.0), strict=True):
                    rows.append(coco_results(dets, record.id, mapping))
                bar.update(len(chunk))
    finally:
        if saved_max_batch is not None:
            runtime.max_batch = saved_max_batch
        if saved_clip is not None:
            runtime.clip_boxes = saved_clip
    results = np.concatenate(rows) if rows else np.zeros((0, 7))
    del rows
    metrics, per_class_ap = coco_metrics(dataset.coco_json, results, [r.id for r in records])
    counts: dict[int, int] = {}
    for r in records:
        for cid in r.category_ids[~r.iscrowd].tolist():
            counts[cid] = counts.get(cid, 0) + 1
    per_class = [{"category_id": c.id, "name": c.name, "AP": per_class_ap.get(c.id), "objects": counts.get(c.id, 0)}
                 for c in dataset.categories]
    return {**metrics, "per_class": per_class, "images": len(records), "detections": len(results),
            "artifact": artifact, "evaluator": evaluator,
            "dataset": {"annotations": str(dataset.annotation_file), "images_dir": str(dataset.images_dir),
                        "images_total": len(dataset), "categories": len(dataset.categories),
                        "objects": sum(counts.values())},
            "protocol": {"top_k": runtime.spec.top_k, "score_threshold": 0.0, "boxes": "original image pixels"},
            "notes": list(mapping.notes)}


def evaluation_subset(dataset: CocoDataset, max_images: int | None = None) -> CocoDataset:
    """The images an evaluation reads (the first `max_images`); DatasetError when they hold no object to find."""
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    subset = dataset.subset(max_images)
    if not any(len(r) and not r.iscrowd.all() for r in subset.images):
        raise DatasetError(f"the {len(subset)} images evaluated from {dataset.annotation_file} have no annotated "
                           "objects: there is nothing to measure; pass a dataset with annotations")
    return subset


def _artifact_identity(runtime: Any) -> dict[str, Any]:
    spec = runtime.spec
    path = getattr(runtime, "path", None)
    described = runtime.describe() if hasattr(runtime, "describe") else {}
    return {"path": str(path) if path is not None else None, "variant": spec.variant, "precision": spec.precision,
            "weights": spec.weights, "random_weights": spec.random_weights, "exporter": spec.exporter,
            "classes": len(spec.class_names), "backend": described.get("backend"), "device": described.get("device"),
            "backend_version": described.get("version")}


def format_metrics(result: dict[str, Any], per_class: bool = False) -> str:
    """The metrics as a table (pycocotools' row names), optionally with AP per class."""
    def value(v: float | None) -> str:
        return "   n/a" if v is None else f"{v:6.3f}"

    lines = [f" {key:<6} {_METRIC_TEXT[key]} = {value(result[key])}" for key in METRIC_KEYS]
    if per_class and result.get("per_class"):
        present = [c for c in result["per_class"] if c["objects"]]
        width = max([len(c["name"]) for c in present] + [5])
        lines.append("")
        lines.append(f" {'class':<{width}}  {'id':>5}  {'objects':>7}  {'AP':>6}")
        for c in present:
            lines.append(f" {c['name']:<{width}}  {c['category_id']:>5}  {c['objects']:>7}  {value(c['AP'])}")
        absent = len(result["per_class"]) - len(present)
        if absent:
            lines.append(f" ({absent} categories without objects in these images not shown)")
    return "\n".join(lines)
