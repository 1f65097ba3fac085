"""Segmentation metrics in numpy (no torch): mIoU for semantic maps, PQ / SQ / RQ for panoptic segments.

Semantic (`SemanticConfusion`): a confusion matrix over classes 0..C-1 accumulated over all images (rows: ground
truth, columns: prediction); ground-truth pixels marked void (any negative label) are ignored. IoU of class c =
TP / (TP + FP + FN) over the whole dataset; mIoU is the mean over the classes that occur in the ground truth or
the prediction (a class absent from both has no IoU and is left out: the usual convention, torchmetrics'
`MulticlassJaccardIndex(average="macro")` too); pixel accuracy = correct / non-void pixels.

Panoptic (`PanopticQuality`): the COCO panoptic rules of panopticapi's `pq_compute` (Kirillov et al. 2019), image
by image. Segment ids > 0, 0 = void (ground truth: unlabelled; prediction: no segment). A predicted and a
ground-truth segment of the same category match when IoU > 0.5, with the prediction's pixels on ground-truth void
left out of the union (they neither help nor hurt); crowd ground truth is never matched. Unmatched ground truth
(not crowd) is a false negative. An unmatched prediction is a false positive unless more than half of it lies on
ground-truth void plus crowd regions of its own category. Per category: PQ = sum IoU / (TP + FP/2 + FN/2),
SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2); averages (all, things, stuff) over the categories with
TP + FP + FN > 0. Areas are pixel counts of the maps given. Where torchmetrics' `PanopticQuality` differs (it has
no crowd; it also removes the ground truth's pixels that the prediction leaves void from the union, and does not
count as a false negative a ground-truth segment mostly left void by the prediction), panopticapi is followed; the
two agree when the prediction covers every pixel (tests/test_segmentation_metrics.py).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["SemanticConfusion", "PanopticQuality", "MATCH_IOU", "IGNORE_FRACTION"]

MATCH_IOU = 0.5  # a match needs IoU strictly above this
IGNORE_FRACTION = 0.5  # an unmatched prediction more than this much on void/crowd is not a false positive


class SemanticConfusion:
    """Pixel confusion matrix over `num_classes` classes, accumulated image by image."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.matrix = np.zeros((self.num_classes, self.num_classes), np.int64)  # [target, prediction]

    def update(self, target: np.ndarray, prediction: np.ndarray) -> None:
        """target: int (H, W) class per pixel, negative = void (ignored); prediction: int (H, W) in 0..C-1."""
        target, prediction = np.asarray(target), np.asarray(prediction)
        if target.shape != prediction.shape:
            raise ValueError(f"target {target.shape} and prediction {prediction.shape} must have the same shape")
        c = self.num_classes
        t, p = target.reshape(-1).astype(np.int64), prediction.reshape(-1).astype(np.int64)
        if t.size and t.max() >= c:
            raise ValueError(f"target labels must be < {c} (negative = void), got {t.max()}")
        if p.size and (p.min() < 0 or p.max() >= c):
            raise ValueError(f"predicted labels must lie in 0..{c - 1}, got {p.min()}..{p.max()}")
        valid = t >= 0
        self.matrix += np.bincount(t[valid] * c + p[valid], minlength=c * c).reshape(c, c)

    def iou(self) -> list[float | None]:
        """IoU per class; None for a class neither in the ground truth nor predicted."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - tp
        return [float(i / u) if u > 0 else None for i, u in zip(tp, union, strict=True)]

    def scores(self) -> dict[str, Any]:
        """{"mIoU", "pixel_accuracy", "iou" (per class, None where absent), "gt_pixels" per class}; None where
        nothing was counted."""
        ious = self.iou()
        present = [v for v in ious if v is not None]
        total = int(self.matrix.sum())
        return {"mIoU": float(np.mean(present)) if present else None,
                "pixel_accuracy": float(np.trace(self.matrix) / total) if total else None,
                "iou": ious, "gt_pixels": self.matrix.sum(1).tolist()}


class PanopticQuality:
    """TP / FP / FN / sum of IoU per category, accumulated image by image (panopticapi's rules)."""

    def __init__(self, category_ids: Iterable[int]) -> None:
        ids = [int(c) for c in category_ids]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"category ids must be a non-empty list without repeats, got {ids}")
        self.category_ids = tuple(ids)
        self._index = {c: i for i, c in enumerate(ids)}
        n = len(ids)
        self.tp, self.fp, self.fn = (np.zeros(n, np.int64) for _ in range(3))
        self.iou = np.zeros(n, np.float64)

    def _row(self, category_id: int, what: str) -> int:
        row = self._index.get(int(category_id))
        if row is None:
            raise ValueError(f"{what} has category {category_id}, which is not one of the evaluated categories "
                             f"{list(self.category_ids)[:8]}{' ...' if len(self.category_ids) > 8 else ''}")
        return row

    def update(self, gt_ids: np.ndarray, gt_segments: Mapping[int, tuple[int, bool]], pred_ids: np.ndarray,
               pred_segments: Mapping[int, int]) -> None:
        """One image. gt_ids / pred_ids: int (H, W) segment ids, 0 = void. gt_segments: id -> (category id,
        iscrowd); pred_segments: id -> category id. Every non-zero id of a map must be listed for it; a listed
        prediction without pixels is ignored, a listed ground-truth segment without pixels is a false negative
        (as panopticapi, which takes the list as the ground truth)."""
        gt_ids, pred_ids = np.asarray(gt_ids, np.int64), np.asarray(pred_ids, np.int64)
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(f"ground truth {gt_ids.shape} and prediction {pred_ids.shape} must have the same shape")
        # every check before anything is counted: a bad image leaves the totals as they were
        gt_rows = {int(s): self._row(c, f"ground-truth segment {s}") for s, (c, _) in gt_segments.items()}
        pred_rows = {int(s): self._row(c, f"predicted segment {s}") for s, c in pred_segments.items()}
        g_vals, g_inv = np.unique(gt_ids.reshape(-1), return_inverse=True)
        p_vals, p_inv = np.unique(pred_ids.reshape(-1), return_inverse=True)
        for vals, listed, what in ((g_vals, gt_segments, "ground truth"), (p_vals, pred_segments, "prediction")):
            unknown = [int(v) for v in vals if v != 0 and int(v) not in listed]
            if unknown:
                raise ValueError(f"{what} segment ids {unknown[:5]} appear in the map but not in its segment list")
        inter = np.bincount(g_inv * len(p_vals) + p_inv, minlength=len(g_vals) * len(p_vals))
        inter = inter.reshape(len(g_vals), len(p_vals))  # pixels of gt segment i and predicted segment j
        g_area, p_area = inter.sum(1), inter.sum(0)
        g_pos = {int(v): i for i, v in enumerate(g_vals)}
        p_pos = {int(v): j for j, v in enumerate(p_vals)}
        on_void = inter[g_pos[0]] if 0 in g_pos else np.zeros(len(p_vals), np.int64)  # per predicted segment

        matched_gt: set[int] = set()
        matched_pred: set[int] = set()
        for gid, (gcat, crowd) in gt_segments.items():
            row = gt_rows[int(gid)]
            i = g_pos.get(int(gid))
            if crowd:
                continue
            if i is not None:
                for j in np.flatnonzero(inter[i]).tolist():
                    pid = int(p_vals[j])
                    if pid == 0 or int(pred_segments[pid]) != int(gcat):
                        continue
                    union = p_area[j] + g_area[i] - inter[i, j] - on_void[j]
                    iou = inter[i, j] / union
                    if iou > MATCH_IOU:  # at most one such prediction per segment (segments do not overlap)
                        self.tp[row] += 1
                        self.iou[row] += iou
                        matched_gt.add(int(gid))
                        matched_pred.add(pid)
            if int(gid) not in matched_gt:
                self.fn[row] += 1
        crowd_rows: dict[int, list[int]] = {}  # category -> rows of its crowd regions in `inter`
        for gid, (gcat, crowd) in gt_segments.items():
            if crowd and int(gid) in g_pos:
                crowd_rows.setdefault(int(gcat), []).append(g_pos[int(gid)])
        for pid, pcat in pred_segments.items():
            row = pred_rows[int(pid)]
            j = p_pos.get(int(pid))
            if j is None or int(pid) in matched_pred:  # no pixels, or matched
                continue
            ignored = on_void[j] + sum(inter[i, j] for i in crowd_rows.get(int(pcat), ()))
            if ignored / p_area[j] > IGNORE_FRACTION:
                continue
            self.fp[row] += 1

    def per_category(self) -> dict[int, dict[str, float | int | None]]:
        """category id -> {PQ, SQ, RQ, TP, FP, FN, IoU_sum}; PQ/SQ/RQ None where TP + FP + FN = 0."""
        out = {}
        for k, cid in enumerate(self.category_ids):
            tp, fp, fn, iou = int(self.tp[k]), int(self.fp[k]), int(self.fn[k]), float(self.iou[k])
            denominator = tp + 0.5 * fp + 0.5 * fn
            if tp + fp + fn == 0:
                pq = sq = rq = None
            else:
                pq, sq, rq = iou / denominator, (iou / tp if tp else 0.0), tp / denominator
            out[cid] = {"PQ": pq, "SQ": sq, "RQ": rq, "TP": tp, "FP": fp, "FN": fn, "IoU_sum": iou}
        return out

    def scores(self, thing_ids: Sequence[int]) -> dict[str, Any]:
        """{"all", "things", "stuff"}: each {PQ, SQ, RQ, n} averaged over its categories that have TP + FP + FN > 0
        (None and n = 0 when none has), and "per_class" (per_category). `thing_ids`: the categories that are things
        (every other evaluated category is stuff)."""
        per = self.per_category()
        things = {int(c) for c in thing_ids}
        groups = {"all": list(per), "things": [c for c in per if c in things],
                  "stuff": [c for c in per if c not in things]}
        result: dict[str, Any] = {}
        for name, members in groups.items():
            counted = [per[c] for c in members if per[c]["PQ"] is not None]
            result[name] = {key: (float(np.mean([p[key] for p in counted])) if counted else None)
                            for key in ("PQ", "SQ", "RQ")}
            result[name]["n"] = len(counted)
        result["per_class"] = per
        return result
