"""Segmentation accuracy of an EoMT runtime on a COCO panoptic dataset: mIoU, PQ / SQ / RQ, mask AP. No torch.

Protocol: every image at its own size through `EomtRuntime.predict` (the official EoMT pre- and post-processing of
each task); the model's classes are mapped to the dataset's categories by name (case-insensitive). Per task:
- semantic: the predicted class map against the ground truth's category per pixel (unlabelled pixels void; crowd
  regions keep their category), accumulated in one confusion matrix (segmentation_metrics.SemanticConfusion);
- panoptic: the predicted segments (pixels no segment covers are void) against the PNG's, panopticapi's rules
  (segmentation_metrics.PanopticQuality); things and stuff are the dataset's (`isthing`);
- instance: COCO mask AP of the top-100 overlapping instance masks by faster-coco-eval (`segm`, pycocotools'
  rules) against the ground truth's thing segments (crowd kept as crowd); predictions of stuff classes are left
  out, as instance evaluation scores things only.
Panoptic needs the artifact's thing/stuff split (which classes merge into one segment): from its metadata or the
caller; without it PQ is skipped with a note and the other tasks still run.
"""
from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from deimv2_deploy.data.categories import CategoryMismatchError
from deimv2_deploy.data.coco import read_record_image
from deimv2_deploy.data.panoptic import VOID_ID, PanopticCategory, PanopticDataset, PanopticRecord, read_panoptic_ids
from deimv2_deploy.evaluation import METRIC_KEYS, coco_eval_summary, evaluator_info
from deimv2_deploy.segmentation_metrics import PanopticQuality, SemanticConfusion

__all__ = ["SEGMENTATION_TASKS", "match_classes_by_name", "evaluate_segmentation", "format_segmentation_metrics"]

SEGMENTATION_TASKS = ("semantic", "panoptic", "instance")


def _side(what: str, names: Sequence[str]) -> str:
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return f"{what} has {len(names)} classes ({shown})"


def match_classes_by_name(class_names: Sequence[str], categories: Sequence[PanopticCategory],
                          model: str = "the model", dataset: str = "the dataset") -> tuple[np.ndarray, tuple[str, ...]]:
    """(int64 array: model label -> index into `categories`, notes). Names are compared case-insensitively.
    CategoryMismatchError naming both sides when a model class is not a dataset category; dataset categories the
    model lacks are allowed (they can only be missed) and named in a note."""
    index = {}
    for k, c in enumerate(categories):
        key = c.name.strip().lower()
        if key in index:
            raise CategoryMismatchError(f"{dataset} names two categories {c.name!r}: classes cannot be mapped by name")
        index[key] = k
    unknown = [n for n in class_names if n.strip().lower() not in index]
    if unknown:
        raise CategoryMismatchError(
            f"{_side(model, list(class_names))}; {_side(dataset, [c.name for c in categories])}: the model's "
            f"{', '.join(repr(n) for n in unknown[:5])}{' ...' if len(unknown) > 5 else ''} "
            f"{'is' if len(unknown) == 1 else 'are'} not among the dataset's categories (matched by name); "
            "evaluate a model trained on this dataset's categories")
    mapping = np.array([index[n.strip().lower()] for n in class_names], np.int64)
    if len(set(mapping.tolist())) != len(mapping):
        raise CategoryMismatchError(f"{_side(model, list(class_names))}: two of its classes have the same name, so "
                                    "they cannot be mapped to the dataset's categories by name")
    lacking = [c.name for k, c in enumerate(categories) if k not in set(mapping.tolist())]
    notes = ((f"the model has no class for {len(lacking)} of the dataset's categories "
              f"({', '.join(lacking[:5])}{', ...' if len(lacking) > 5 else ''}): they can only be missed",)
             if lacking else ())
    return mapping, notes


def _semantic_target(ids: np.ndarray, record: PanopticRecord, position: dict[int, int]) -> np.ndarray:
    """int64 (H, W) dataset category index per pixel, -1 where void."""
    lut_ids = np.array([VOID_ID] + [s.id for s in record.segments], np.int64)
    lut_cls = np.array([-1] + [position[s.category_id] for s in record.segments], np.int64)
    order = np.argsort(lut_ids)
    return lut_cls[order][np.searchsorted(lut_ids[order], ids)]


def _thing_ground_truth(record: PanopticRecord, ids: np.ndarray, things: set[int], first_id: int) -> list[dict]:
    """COCO instance annotations (RLE) of a record's thing segments."""
    from deimv2_deploy.vit_records import rle_encode

    segments = [s for s in record.segments if s.category_id in things]
    if not segments:
        return []
    masks = np.stack([ids == s.id for s in segments])
    out = []
    for k, (s, mask, rle) in enumerate(zip(segments, masks, rle_encode(masks), strict=True)):
        ys, xs = np.nonzero(mask)
        box = [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)] if xs.size else [0.0] * 4
        out.append({"id": first_id + k, "image_id": record.image_id, "category_id": s.category_id,
                    "segmentation": rle, "area": float(mask.sum()), "bbox": box, "iscrowd": int(s.iscrowd)})
    return out


def _mask_ap(images: list[dict], categories: list[dict], gt: list[dict], results: list[dict]) -> dict[str, Any]:
    """The 12 COCO metrics and AP per category of mask results, by faster-coco-eval (iouType segm)."""
    import faster_coco_eval as lib

    with contextlib.redirect_stdout(io.StringIO()):
        coco = lib.COCO({"images": images, "categories": categories, "annotations": gt})
        dt = coco.loadRes(results) if results else None
        if dt is None:  # no prediction at all: every AP is 0 where there is ground truth
            metrics = {k: (0.0 if gt else None) for k in METRIC_KEYS}
            return {**metrics, "per_class": {c["id"]: (0.0 if any(a["category_id"] == c["id"] for a in gt)
                                                       else None) for c in categories}}
        ev = lib.COCOeval_faster(coco, dt, iouType="segm", print_function=lambda *a, **k: None)
        metrics, per_class = coco_eval_summary(ev)
    return {**metrics, "per_class": per_class}


def evaluate_segmentation(runtime: Any, dataset: PanopticDataset, tasks: Sequence[str] = SEGMENTATION_TASKS,
                          batch: int = 8, max_images: int | None = None, progress: bool = True,
                          stuff_classes: str | Sequence[int | str] | None = None) -> dict[str, Any]:
    """mIoU / PQ / mask AP of an EomtRuntime on a COCO panoptic dataset (see the module's protocol).

    Returns {"images", "tasks" (those run), "semantic", "panoptic", "instance" (each None when not run),
    "mIoU", "PQ" (headline numbers, None when not run), "artifact", "dataset", "notes"}. CategoryMismatchError
    when the model's classes are not the dataset's; DatasetError for an unusable image or PNG."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    unknown = [t for t in tasks if t not in SEGMENTATION_TASKS]
    if unknown or not tasks:
        raise ValueError(f"unknown task {unknown[0] if unknown else '(none)'!r}: choose from "
                         f"{', '.join(SEGMENTATION_TASKS)}")
    tasks = tuple(t for t in SEGMENTATION_TASKS if t in tasks)
    spec = runtime.spec
    subset = dataset.subset(max_images)
    mapping, notes_t = match_classes_by_name(spec.class_names, dataset.categories,
                                             model=f"the model ({runtime.path.name})",
                                             dataset=f"the dataset ({dataset.annotation_file.name})")
    notes = list(notes_t)
    categories = dataset.categories
    cat_ids = np.array([c.id for c in categories], np.int64)
    things = {c.id for c in categories if c.isthing}
    position = {c.id: k for k, c in enumerate(categories)}
    label_to_cat = cat_ids[mapping]  # model label -> dataset category id

    stuff: tuple[int, ...] | None = None
    if "panoptic" in tasks:
        try:
            stuff = runtime.stuff_classes(stuff_classes)
        except ValueError as e:
            notes.append(f"PQ skipped: {e}")
            tasks = tuple(t for t in tasks if t != "panoptic")
        else:
            model_stuff = {spec.class_names[i].strip().lower() for i in stuff}
            data_stuff = {c.name.strip().lower() for c in categories if not c.isthing}
            data_stuff &= {n.strip().lower() for n in spec.class_names}
            if model_stuff != data_stuff:
                notes.append(f"the model's stuff classes ({', '.join(sorted(model_stuff)) or 'none'}) are not the "
                             f"dataset's ({', '.join(sorted(data_stuff)) or 'none'}): PQ groups categories by the "
                             "dataset's isthing; the model merges segments by its own")
    if not tasks:
        raise ValueError("nothing to evaluate: give a task (semantic, instance) that this artifact can run")

    semantic = SemanticConfusion(len(categories)) if "semantic" in tasks else None
    panoptic = PanopticQuality(cat_ids.tolist()) if "panoptic" in tasks else None
    instance_gt: list[dict] = []
    instance_dt: list[dict] = []

    from tqdm import tqdm

    records = subset.images
    saved = runtime.max_batch
    if spec.batch is None:
        runtime.max_batch = batch
    try:
        with tqdm(total=len(records), desc="evaluating", unit="img", disable=not progress, file=sys.stderr,
                  dynamic_ncols=True) as bar:
            for start in range(0, len(records), batch):
                chunk = records[start:start + batch]
                images = [read_record_image(r) for r in chunk]  # type: ignore[arg-type]  # file/width/height
                predictions = runtime.predict(images, tasks=tasks,
                                              **({"stuff_classes": stuff} if stuff is not None else {}))
                for record, seg in zip(chunk, predictions, strict=True):
                    ids = read_panoptic_ids(record)
                    if semantic is not None:
                        semantic.update(_semantic_target(ids, record, position), mapping[seg.semantic])
                    if panoptic is not None:
                        pan = seg.panoptic
                        pred_ids = pan.segment_ids.astype(np.int64) + 1  # -1 void -> 0
                        panoptic.update(ids, {s.id: (s.category_id, s.iscrowd) for s in record.segments}, pred_ids,
                                        {s.id + 1: int(label_to_cat[s.label]) for s in pan.segments if s.area > 0})
                    if "instance" in tasks:
                        instance_gt.extend(_thing_ground_truth(record, ids, things, len(instance_gt) + 1))
                        instance_dt.extend(_instance_results(seg.instances, record.image_id, label_to_cat, things))
                bar.update(len(chunk))
    finally:
        runtime.max_batch = saved

    names = {c.id: c.name for c in categories}
    result: dict[str, Any] = {"images": len(records), "tasks": list(tasks), "semantic": None, "panoptic": None,
                              "instance": None, "mIoU": None, "PQ": None}
    if semantic is not None:
        s = semantic.scores()
        result["semantic"] = {
            "mIoU": s["mIoU"], "pixel_accuracy": s["pixel_accuracy"],
            "per_class": [{"category_id": c.id, "name": c.name, "IoU": s["iou"][k], "gt_pixels": s["gt_pixels"][k]}
                          for k, c in enumerate(categories)]}
        result["mIoU"] = s["mIoU"]
    if panoptic is not None:
        p = panoptic.scores(sorted(things))
        result["panoptic"] = {
            "all": p["all"], "things": p["things"], "stuff": p["stuff"],
            "per_class": [{"category_id": cid, "name": names[cid], "isthing": cid in things, **v}
                          for cid, v in p["per_class"].items()]}
        result["PQ"] = p["all"]["PQ"]
    if "instance" in tasks:
        evaluator = evaluator_info()
        images = [{"id": r.image_id, "width": r.width, "height": r.height} for r in records]
        cats = [{"id": c.id, "name": c.name} for c in categories if c.isthing]
        if not cats:
            notes.append("mask AP skipped: the dataset has no thing categories")
        else:
            ap = _mask_ap(images, cats, instance_gt, instance_dt)
            result["instance"] = {**{k: ap[k] for k in METRIC_KEYS}, "evaluator": evaluator,
                                  "detections": len(instance_dt),
                                  "per_class": [{"category_id": c["id"], "name": c["name"],
                                                 "AP": ap["per_class"].get(c["id"])} for c in cats]}
    result["artifact"] = {"path": str(runtime.path), "family": spec.family, "precision": spec.precision,
                          "weights": spec.weights, "backend": runtime.backend,
                          "input_size": list(spec.input_size), "classes": len(spec.class_names),
                          "stuff_classes": None if stuff is None else [spec.class_names[i] for i in stuff]}
    result["dataset"] = {"annotations": str(dataset.annotation_file), "images_dir": str(dataset.images_dir),
                         "masks_dir": str(dataset.masks_dir), "images_total": len(dataset),
                         "categories": len(categories), "things": len(things)}
    result["notes"] = notes
    return result


def _instance_results(instances: Any, image_id: int, label_to_cat: np.ndarray, things: set[int]) -> list[dict]:
    from deimv2_deploy.vit_records import rle_encode

    if instances is None or len(instances) == 0:
        return []
    cats = label_to_cat[instances.labels]
    keep = np.flatnonzero(np.isin(cats, sorted(things)))
    if keep.size == 0:
        return []
    rles = rle_encode(instances.masks[keep])
    return [{"image_id": image_id, "category_id": int(cats[k]), "segmentation": rle,
             "score": float(instances.scores[k])} for k, rle in zip(keep.tolist(), rles, strict=True)]


def format_segmentation_metrics(result: dict[str, Any], per_class: bool = False) -> str:
    """The metrics as a short table, optionally per class."""
    def v(x: float | None) -> str:
        return "  n/a" if x is None else f"{100 * x:5.1f}"

    lines = []
    if result["semantic"] is not None:
        s = result["semantic"]
        lines.append(f" semantic  mIoU {v(s['mIoU'])}   pixel accuracy {v(s['pixel_accuracy'])}")
    if result["panoptic"] is not None:
        p = result["panoptic"]
        lines.append(f" panoptic  {'':6}  {'PQ':>5}  {'SQ':>5}  {'RQ':>5}  {'N':>3}")
        for group in ("all", "things", "stuff"):
            g = p[group]
            lines.append(f" {'':8}  {group:<6}  {v(g['PQ'])}  {v(g['SQ'])}  {v(g['RQ'])}  {g['n']:>3}")
    if result["instance"] is not None:
        i = result["instance"]
        lines.append(f" instance  mask AP {v(i['AP'])}   AP50 {v(i['AP50'])}   AP75 {v(i['AP75'])}")
    if per_class:
        rows: dict[int, dict[str, Any]] = {}
        for key, section, field in (("IoU", "semantic", "IoU"), ("PQ", "panoptic", "PQ"), ("AP", "instance", "AP")):
            if result[section] is not None:
                for c in result[section]["per_class"]:
                    rows.setdefault(c["category_id"], {"name": c["name"]})[key] = c[field]
        if rows:
            width = max(max(len(r["name"]) for r in rows.values()), 5)
            lines.append("")
            lines.append(f" {'class':<{width}}  {'id':>5}  {'IoU':>5}  {'PQ':>5}  {'AP':>5}")
            for cid, r in rows.items():
                lines.append(f" {r['name']:<{width}}  {cid:>5}  {v(r.get('IoU'))}  {v(r.get('PQ'))}  {v(r.get('AP'))}")
    return "\n".join(lines)
