"""Parity of an exported graph against the PyTorch reference, order-free.

Top-k over near-equal scores may list equal detections in another order, or trade one at the k boundary, so
detections are matched one-to-one (same label, box and score within tolerance), not compared by index. The report
says how many matched and the largest box/score difference among matched ones. Torch-free: the reference outputs
come in as numpy.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from deimv2_deploy.preprocess import PreparedBatch, Preprocessor
from deimv2_deploy.spec import ArtifactSpec

__all__ = ["FP32_BOX_TOL", "FP32_SCORE_TOL", "MIN_MATCHED", "PRECISION_TOLERANCES", "ARITHMETIC_TOLERANCES",
           "tolerances", "ParityError", "match_detections", "drift_summary", "parity_images", "parity_batch",
           "compare_graph_outputs", "reference_outputs"]

FP32_BOX_TOL = 1e-2  # pixels
FP32_SCORE_TOL = 1e-5
MIN_MATCHED = 0.98

# How closely an artifact's detections follow FP32 PyTorch, by the precision of its weights (the artifact's
# precision). FP32 is the exporters' enforced check; FP16 and INT8 are reported against these.
PRECISION_TOLERANCES = {
    "fp32": {"box_tol": FP32_BOX_TOL, "score_tol": FP32_SCORE_TOL, "min_matched": MIN_MATCHED},
    "fp16": {"box_tol": 2.0, "score_tol": 1e-2, "min_matched": 0.9},
    "int8": {"box_tol": 8.0, "score_tol": 5e-2, "min_matched": 0.5},
}
# ... and by the arithmetic the runtime executes in, as it reports it (`Runtime.describe()["inference_precision"]`,
# never an assumption about the CPU: OpenVINO runs FP16 and FP32 graphs in bf16 on AMX CPUs unless told not to).
# bf16 keeps 8 bits of mantissa: scores that tie to three decimals (untrained weights) then pick other queries,
# so only about two thirds of the detections match at any tolerance (atto: 75.8 % measured on an AMX Xeon, 66-74 %
# in a bf16 emulation), while the others stay valid. f16 is finer than bf16, so bf16's bounds hold for it too.
ARITHMETIC_TOLERANCES = {
    "bf16": {"box_tol": 8.0, "score_tol": 5e-2, "min_matched": 0.5},
    "f16": {"box_tol": 8.0, "score_tol": 5e-2, "min_matched": 0.5},
}


def tolerances(precision: str, executed: str | None = None) -> dict[str, float]:
    """`match_detections` tolerances for an artifact of `precision` whose runtime executes in `executed` ("f32",
    "bf16", "f16"; None: as the weights allow): the looser of the two."""
    if precision not in PRECISION_TOLERANCES:
        raise ValueError(f"no tolerances for precision {precision!r}: one of {', '.join(PRECISION_TOLERANCES)}")
    out = dict(PRECISION_TOLERANCES[precision])
    arithmetic = ARITHMETIC_TOLERANCES.get(str(executed).lower()) if executed is not None else None
    if arithmetic is not None:
        for key in ("box_tol", "score_tol"):
            out[key] = max(out[key], arithmetic[key])
        out["min_matched"] = min(out["min_matched"], arithmetic["min_matched"])
    return out


class ParityError(RuntimeError):
    """An exported artifact disagrees with PyTorch beyond the FP32 tolerance."""


def _match_rows(ours: np.ndarray, ref: np.ndarray, tol: np.ndarray) -> tuple[int, np.ndarray]:
    """Greedy one-to-one matching of rows within per-column tolerances; (matched, index pairs)."""
    scaled = np.abs(ref[:, None, :] - ours[None, :, :]) / tol  # (R, O, cols) in units of tolerance
    cost = scaled.max(-1)
    used = np.zeros(len(ours), bool)
    pairs = []
    for r in np.argsort(cost.min(1), kind="stable"):  # most certain reference rows first
        free = np.flatnonzero(~used & (cost[r] <= 1.0))
        if free.size:
            o = free[np.argmin(cost[r, free])]
            used[o] = True
            pairs.append((r, o))
    return len(pairs), np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def _inner_ties(ours: np.ndarray, ref: np.ndarray, pairs: np.ndarray, unmatched: np.ndarray, cutoff: float,
                score_tol: float) -> int:
    """Unmatched reference rows above the cutoff that an inner top-k (the encoder's query selection) may have
    swapped by rounding: the reference itself holds another row of the same label and score (within the
    tolerance), and ours holds an unmatched row of that label and score. A trained model's scores almost never
    tie, so a wrong box with a right score is still caught there."""
    free = np.setdiff1d(np.arange(len(ours)), pairs[:, 1])
    used = np.zeros(len(ours), bool)
    count = 0
    for k in unmatched:
        label, score = ref[k, 0], ref[k, 5]
        if score <= cutoff:
            continue  # counted as a cutoff tie
        twins = (ref[:, 0] == label) & (np.abs(ref[:, 5] - score) <= score_tol)
        if twins.sum() < 2:
            continue
        candidates = free[(ours[free, 0] == label) & (np.abs(ours[free, 5] - score) <= score_tol) & ~used[free]]
        if candidates.size:
            used[candidates[0]] = True
            count += 1
    return count


def match_detections(ours: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], box_tol: float = FP32_BOX_TOL,
                     score_tol: float = FP32_SCORE_TOL, min_matched: float = MIN_MATCHED) -> dict[str, Any]:
    """Compare graph outputs {labels (N,K), boxes (N,K,4), scores (N,K)} image by image, order-free."""
    n = ref["scores"].shape[0]
    if ours["scores"].shape != ref["scores"].shape:
        return {"ok": False, "matched": 0, "total": int(ref["scores"].size), "fraction": 0.0,
                "max_box_diff": float("inf"), "max_score_diff": float("inf"), "box_tol": box_tol,
                "score_tol": score_tol, "detail": f"shapes differ: {ours['scores'].shape} vs {ref['scores'].shape}"}
    tol = np.array([0.5, box_tol, box_tol, box_tol, box_tol, score_tol])  # labels must be equal
    matched = total = excused = 0
    max_box = max_score = 0.0
    worst_image = 1.0
    for i in range(n):
        rows = [np.concatenate([d["labels"][i][:, None].astype(np.float64), d["boxes"][i].astype(np.float64),
                                d["scores"][i][:, None].astype(np.float64)], 1) for d in (ours, ref)]
        m, pairs = _match_rows(rows[0], rows[1], tol)
        # Top-k cutoff ties: a row whose score is within the tolerance of the lowest score either side kept can
        # be swapped for another equally scored one by rounding alone (common in barely trained models, whose
        # scores all sit near the prior); unmatched, it is excused and counted, not a failure.
        cutoff = max(rows[0][:, 5].min(), rows[1][:, 5].min()) + score_tol if len(rows[1]) else 0.0
        unmatched = np.setdiff1d(np.arange(len(rows[1])), pairs[:, 0])
        tied = int((rows[1][unmatched, 5] <= cutoff).sum()) + _inner_ties(rows[0], rows[1], pairs, unmatched,
                                                                          cutoff, score_tol)
        matched, total, excused = matched + m, total + len(rows[1]), excused + tied
        worst_image = min(worst_image, m / max(1, len(rows[1]) - tied))
        if m:
            diff = np.abs(rows[1][pairs[:, 0]] - rows[0][pairs[:, 1]])
            max_box = max(max_box, float(diff[:, 1:5].max()))
            max_score = max(max_score, float(diff[:, 5].max()))
    # the score tolerance is loose for near-ties; also report how far the unmatched ones are
    return {"ok": bool(worst_image >= min_matched), "matched": int(matched), "total": int(total),
            "fraction": round(matched / max(1, total), 4), "max_box_diff": max_box, "max_score_diff": max_score,
            "box_tol": box_tol, "score_tol": score_tol, "min_matched": min_matched, "score_ties": int(excused)}


def parity_images(count: int = 2, seed: int = 0) -> list[np.ndarray]:
    """Fixed BGR test scenes of different sizes (640x480 and 500x375): gradients, rectangles and discs."""
    rng = np.random.default_rng(seed)
    sizes = [(480, 640), (375, 500), (720, 1280), (300, 300)]
    images = []
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([c[0] * xx / w + c[1] * yy / h + c[2] for c in rng.uniform(0, 120, (3, 3))], -1)
        img = base.copy()
        for _ in range(12):
            x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
            x1, y1 = min(w, x0 + rng.integers(20, w // 2)), min(h, y0 + rng.integers(20, h // 2))
            color = rng.uniform(0, 255, 3)
            if rng.random() < 0.5:
                img[y0:y1, x0:x1] = color
            else:
                mask = ((xx - (x0 + x1) / 2) ** 2 / max(1, (x1 - x0) / 2) ** 2
                        + (yy - (y0 + y1) / 2) ** 2 / max(1, (y1 - y0) / 2) ** 2) <= 1
                img[mask] = color
        img += rng.uniform(0, 12, img.shape)
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return images


def parity_batch(spec: ArtifactSpec, count: int = 2) -> PreparedBatch:
    """The fixed input every export is checked on, preprocessed as at inference."""
    return Preprocessor(spec)(parity_images(count))


def compare_graph_outputs(run_artifact: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
                          reference: Mapping[str, np.ndarray], batch: PreparedBatch, **tolerances: Any
                          ) -> dict[str, Any]:
    """Run the artifact on `batch` and match its detections against the reference outputs."""
    ours = run_artifact(batch.as_inputs())
    ours = {k: np.asarray(ours[k]) for k in ("labels", "boxes", "scores")}
    return match_detections(ours, reference, **tolerances)


def reference_outputs(graph: Any, batch: PreparedBatch) -> dict[str, np.ndarray]:
    """PyTorch outputs of a DeployGraph on `batch` (imports torch)."""
    import torch

    with torch.inference_mode():
        labels, boxes, scores = graph(torch.from_numpy(batch.images), torch.from_numpy(batch.orig_target_sizes))
    return {"labels": labels.numpy(), "boxes": boxes.float().numpy(), "scores": scores.float().numpy()}


# --- drift ----------------------------------------------------------------------------------------------
def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1, y1 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x2, y2 = np.minimum(box[2], boxes[:, 2]), np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(box) + area(boxes) - inter, 1e-9)


def drift_summary(ours: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], top: int = 100) -> dict[str, Any]:
    """How far reduced-precision detections moved, tolerance-free: for each of the `top` best reference
    detections per image, the best-overlapping detection of the same class among all of ours (IoU and score)."""
    ious, score_diffs = [], []
    for i in range(ref["scores"].shape[0]):
        order = np.argsort(-ref["scores"][i], kind="stable")[:top]
        for r in order:
            same = np.flatnonzero(ours["labels"][i] == ref["labels"][i][r])
            if same.size == 0:
                ious.append(0.0)
                continue
            overlap = _iou(ref["boxes"][i][r], ours["boxes"][i][same])
            j = same[int(np.argmax(overlap))]
            ious.append(float(overlap.max()))
            score_diffs.append(abs(float(ours["scores"][i][j]) - float(ref["scores"][i][r])))
    ious_a = np.asarray(ious)
    return {"top": top, "mean_iou": round(float(ious_a.mean()), 4),
            "iou_over_0.5": round(float((ious_a > 0.5).mean()), 4),
            "iou_over_0.9": round(float((ious_a > 0.9).mean()), 4),
            "median_score_diff": float(np.median(score_diffs)) if score_diffs else None,
            "max_score_diff": float(np.max(score_diffs)) if score_diffs else None}
