"""JSON records of EoMT segmentations and DINOv3 embeddings: what deimv2-infer writes and deimv2-serve answers.

One format for both, so a client of the service and a reader of deimv2-infer's files parse the same thing:
- masks (instances, panoptic segments, and on request the semantic map, one mask per class present) are COCO RLE
  dicts `{"size": [H, W], "counts": str}` (faster-coco-eval's / pycocotools' mask API, counts as text), with COCO
  `bbox` [x, y, w, h];
- arrays (DINOv3 features) are `{"dtype": "float32", "shape": [...], "data": base64}` of the little-endian bytes:
  exact, a third of the size of a list of decimal numbers, and `np.frombuffer(b64decode(data), "<f4")` reads them.
No torch, no runtime: these take the numpy results (Segmentation, Embeddings).
"""
from __future__ import annotations

import base64
from typing import Any

import numpy as np

from deimv2_deploy.embeddings import Embeddings
from deimv2_deploy.segmentation import Segmentation

__all__ = ["rle_encode", "rle_decode", "mask_bbox", "segmentation_record", "array_record", "array_from_record",
           "embeddings_record"]


def rle_encode(masks: np.ndarray) -> list[dict[str, Any]]:
    """bool (K, H, W) -> COCO RLE dicts {"size": [H, W], "counts": str} (faster-coco-eval's mask API)."""
    from faster_coco_eval.core import mask as mask_api

    if len(masks) == 0:
        return []
    encoded = mask_api.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in encoded]


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """One COCO RLE dict (counts as text, as rle_encode writes it) -> bool (H, W)."""
    from faster_coco_eval.core import mask as mask_api

    counts = rle["counts"]
    return mask_api.decode({"size": list(rle["size"]),
                            "counts": counts.encode("ascii") if isinstance(counts, str) else counts}).astype(bool)


def mask_bbox(mask: np.ndarray) -> list[int]:
    """[x, y, w, h] (COCO) of a non-empty mask, [0, 0, 0, 0] for an empty one."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if ys.size == 0:
        return [0, 0, 0, 0]
    return [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)]


def segmentation_record(seg: Segmentation, score_threshold: float, max_instances: int | None = None,
                        semantic_masks: bool = False) -> dict[str, Any]:
    """A Segmentation as JSON-ready data: `semantic.classes` (label, class name, pixels; with `semantic_masks` also
    each class's region as RLE `segmentation` and its `bbox`), `instances` (score >= score_threshold, best first,
    at most max_instances) and `panoptic.segments`, each with its RLE mask and bbox."""
    record: dict[str, Any] = {"image_size": list(seg.image_size)}
    names = seg.class_names
    if seg.semantic is not None:
        present, counts = np.unique(seg.semantic, return_counts=True)
        classes = [{"label": int(c), "class_name": names[int(c)], "pixels": int(n)}
                   for c, n in zip(present, counts, strict=True)]
        if semantic_masks and len(present):
            masks = seg.semantic[None] == present[:, None, None]  # (C, H, W)
            for row, mask, rle in zip(classes, masks, rle_encode(masks), strict=True):
                row.update(bbox=mask_bbox(mask), segmentation=rle)
        record["semantic"] = {"classes": classes}
    if seg.instances is not None:
        kept = seg.instances.filter(score_threshold)
        count = len(kept) if max_instances is None else min(len(kept), max_instances)
        rles = rle_encode(kept.masks[:count])
        record["instances"] = [{"label": int(kept.labels[i]), "class_name": names[int(kept.labels[i])],
                                "score": round(float(kept.scores[i]), 6), "query": int(kept.queries[i]),
                                "area": int(kept.masks[i].sum()), "bbox": mask_bbox(kept.masks[i]),
                                "segmentation": rles[i]} for i in range(count)]
        record["instance_score_threshold"] = score_threshold
    if seg.panoptic is not None:
        pan = seg.panoptic
        rles = rle_encode(np.stack([pan.mask(s.id) for s in pan.segments])) if len(pan) else []
        record["panoptic"] = {"stuff_classes": list(pan.stuff_classes),
                              "segments": [{**s.to_dict(), "bbox": mask_bbox(pan.mask(s.id)), "segmentation": rles[i]}
                                           for i, s in enumerate(pan.segments)]}
    return record


def array_record(array: np.ndarray) -> dict[str, Any]:
    """A float32 array as {"dtype": "float32", "shape": [...], "data": base64 of its little-endian bytes}."""
    a = np.ascontiguousarray(array, dtype="<f4")
    return {"dtype": "float32", "shape": [int(n) for n in a.shape], "data": base64.b64encode(a.tobytes()).decode()}


def array_from_record(record: dict[str, Any]) -> np.ndarray:
    """The inverse of array_record."""
    if record.get("dtype") != "float32":
        raise ValueError(f"expected a float32 array record, got dtype {record.get('dtype')!r}")
    return np.frombuffer(base64.b64decode(record["data"]), "<f4").reshape(record["shape"]).astype(np.float32)


def embeddings_record(emb: Embeddings, patches: bool = False) -> dict[str, Any]:
    """DINOv3 Embeddings as JSON-ready data: dim, patch grid, image size, and `cls`, `pooled`, `registers` (and the
    `patches` grid (rows, cols, D) when asked) as array records."""
    record: dict[str, Any] = {"image_size": list(emb.image_size), "dim": emb.dim, "grid": list(emb.grid),
                              "cls": array_record(emb.cls), "pooled": array_record(emb.pooled),
                              "registers": array_record(emb.registers)}
    if patches:
        record["patches"] = array_record(emb.patches)
    return record
