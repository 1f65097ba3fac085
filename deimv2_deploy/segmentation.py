"""EoMT's official pre- and post-processing in numpy/OpenCV (no torch), and the results it produces.

Follows the official evaluation code (github.com/tue-mps/eomt, training/lightning_module.py and
mask_classification_{semantic,instance,panoptic}.py), written anew here:
- semantic: the image is scaled so its short side equals the input size S, cut into ceil(long / S) overlapping
  S x S windows along its long side (evenly spread, the last one flush with the edge); each window's per-pixel class
  scores are sum_q sigmoid(mask_q) * softmax(class_q)[:-1] with the masks bilinearly upsampled to S x S; windows are
  averaged where they overlap, the result bilinearly resized to the image and argmax'ed.
- instance: the image is scaled to fit inside S x S (aspect kept) and padded right/bottom with 0; masks are
  upsampled to S x S, cropped to the scaled image and resized to the image. The top 100 (query, class) pairs of
  softmax(class)[:, :-1] (no-object column dropped) are kept, mask = logit > 0, score = class probability x mean
  sigmoid inside the mask; masks may overlap, there is no threshold.
- panoptic: the instance canvas and mask resizing; each query's class is the argmax of softmax(class) over all
  C + 1 columns; queries whose class is no-object or whose probability is not above 0.8 are dropped. Every pixel
  goes to the kept query with the largest probability x sigmoid(mask) (first query on ties); a query becomes a
  segment where its own mask (sigmoid >= 0.5) and the pixels it won overlap, if it won at least 0.8 times the area
  of its own mask (won / own >= 0.8: transformers asks for > 0.8) and the overlap is not empty. Queries are taken in
  query order; a stuff class gets one segment (later queries of that class join the first one's), thing classes one
  segment per query. Segment ids count from 0 in that order; -1 marks pixels no segment covers (the official void).
  The official code gives segments no score: ours carry the class probability of the (first) query, as
  transformers does. Which classes are stuff is not in the model: it is the dataset's (the official configs list
  it, e.g. COCO panoptic 80..132); the runtime takes it from the artifact's metadata or the caller.
Bilinear resizing of logits is OpenCV's INTER_LINEAR, which is torch's `interpolate(mode="bilinear",
align_corners=False)` (half-pixel centres, no antialias). Image resizing is `preprocess.resize_like_pil` (OpenCV,
close to but not bit-equal with PIL's bilinear that the official code uses).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from deimv2_deploy.preprocess import resize_like_pil

__all__ = ["Segmentation", "InstanceSegments", "PanopticSegment", "PanopticSegments", "semantic_windows",
           "semantic_from_windows", "instance_canvas", "instances_from_outputs", "canvas_mask_logits",
           "panoptic_from_outputs", "resize_maps", "softmax", "sigmoid", "TOP_K_INSTANCES", "PANOPTIC_SCORE",
           "PANOPTIC_OVERLAP", "MASK_PROBABILITY"]

TOP_K_INSTANCES = 100
PANOPTIC_SCORE = 0.8  # official mask_thresh: a query's class probability must be > this
PANOPTIC_OVERLAP = 0.8  # official overlap_thresh: won area / own mask area must be >= this
MASK_PROBABILITY = 0.5  # a query's own mask: sigmoid(logit) >= this


@dataclass(frozen=True)
class InstanceSegments:
    """Instance segments of one image, best first: masks may overlap (the official instance output)."""

    masks: np.ndarray  # bool (K, H, W) in the image's pixels
    scores: np.ndarray  # float32 (K,) class probability x mean mask probability inside the mask
    labels: np.ndarray  # int64 (K,)
    queries: np.ndarray  # int64 (K,) which query each came from
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def filter(self, score_threshold: float) -> InstanceSegments:
        keep = self.scores >= score_threshold
        return InstanceSegments(self.masks[keep], self.scores[keep], self.labels[keep], self.queries[keep],
                                self.class_names)


@dataclass(frozen=True)
class PanopticSegment:
    """One panoptic segment: `id` is its value in PanopticSegments.segment_ids."""

    id: int
    label: int
    class_name: str
    score: float  # class probability of the query that made it (the first one, for a merged stuff segment)
    is_thing: bool
    area: int  # pixels in the image
    query: int  # the (first) query it came from

    def to_dict(self) -> dict:
        return {"id": self.id, "label": self.label, "class_name": self.class_name, "score": round(self.score, 6),
                "is_thing": self.is_thing, "area": self.area, "query": self.query}


@dataclass(frozen=True)
class PanopticSegments:
    """The panoptic output of one image: every pixel in at most one segment."""

    segment_ids: np.ndarray  # int32 (H, W): a segment's id, -1 where no segment covers the pixel
    segments: tuple[PanopticSegment, ...]
    stuff_classes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.segment_ids.ndim != 2 or self.segment_ids.dtype != np.int32:
            raise ValueError(f"segment_ids must be an int32 (H, W) map, got {self.segment_ids.dtype} "
                             f"{self.segment_ids.shape}")

    def __len__(self) -> int:
        return len(self.segments)

    def mask(self, segment_id: int) -> np.ndarray:
        """bool (H, W) of one segment."""
        return self.segment_ids == int(segment_id)

    def label_map(self, void: int = -1) -> np.ndarray:
        """int64 (H, W) class per pixel, `void` where no segment covers it (the official void is num_classes)."""
        lut = np.full(max((s.id for s in self.segments), default=-1) + 2, void, np.int64)
        for s in self.segments:
            lut[s.id + 1] = s.label
        return lut[self.segment_ids.astype(np.int64) + 1]


@dataclass(frozen=True)
class Segmentation:
    """What EoMT finds in one image: a semantic map, instance segments and/or panoptic segments, in the image's
    pixels (each None unless its task was asked for)."""

    image_size: tuple[int, int]  # (height, width)
    class_names: tuple[str, ...]
    semantic: np.ndarray | None = None  # int64 (H, W) class index per pixel
    instances: InstanceSegments | None = None
    panoptic: PanopticSegments | None = None
    extras: dict = field(default_factory=dict)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    z = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


def resize_maps(maps: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(C, h, w) float32 -> (C, H, W), bilinear with half-pixel centres (torch's align_corners=False)."""
    c = maps.shape[0]
    h, w = size_hw
    if maps.shape[1:] == (h, w):
        return maps.astype(np.float32, copy=True)
    out = np.empty((c, h, w), np.float32)
    step = 256  # OpenCV takes at most 512 channels per call
    for start in range(0, c, step):
        chunk = np.ascontiguousarray(maps[start:start + step].transpose(1, 2, 0), dtype=np.float32)
        resized = cv2.resize(chunk, (w, h), interpolation=cv2.INTER_LINEAR)
        out[start:start + step] = resized.reshape(h, w, -1).transpose(2, 0, 1)
    return out


# --- semantic ----------------------------------------------------------------------------------------------
def semantic_windows(rgb: np.ndarray, size: int) -> tuple[list[np.ndarray], list[tuple[int, int]], tuple[int, int]]:
    """(S x S RGB windows, (start, end) of each along the long side, the scaled image's (h, w)).

    The image is scaled so that its short side is `size` (the official `scale_img_size_semantic`)."""
    h, w = rgb.shape[:2]
    factor = max(size / h, size / w)
    new_h, new_w = round(h * factor), round(w * factor)
    scaled = resize_like_pil(rgb, (new_h, new_w))
    long_side = max(new_h, new_w)
    count = math.ceil(long_side / size)
    overlap = count * size - long_side
    per_window = overlap / (count - 1) if overlap > 0 else 0
    windows, spans = [], []
    for j in range(count):
        start = int(j * (size - per_window))
        end = start + size
        windows.append(scaled[start:end] if new_h > new_w else scaled[:, start:end])
        spans.append((start, end))
    return windows, spans, (new_h, new_w)


def semantic_from_windows(class_logits: np.ndarray, mask_logits: np.ndarray, spans: list[tuple[int, int]],
                          scaled_hw: tuple[int, int], image_hw: tuple[int, int], size: int) -> np.ndarray:
    """Per-pixel class map (H, W) int64 from the windows' outputs.

    class_logits (n, Q, C + 1), mask_logits (n, Q, h, w): one row per window."""
    num_classes = class_logits.shape[-1] - 1
    new_h, new_w = scaled_hw
    sums = np.zeros((num_classes, new_h, new_w), np.float32)
    counts = np.zeros((new_h, new_w), np.float32)
    tall = image_hw[0] > image_hw[1]  # the official code picks the axis from the original size
    for i, (start, end) in enumerate(spans):
        masks = sigmoid(resize_maps(mask_logits[i], (size, size)))  # (Q, S, S)
        probs = softmax(class_logits[i].astype(np.float32))[:, :-1]  # (Q, C)
        per_pixel = np.einsum("qhw,qc->chw", masks, probs, optimize=True)  # (C, S, S)
        if tall:
            sums[:, start:end] += per_pixel[:, :new_h - start]
            counts[start:end] += 1
        else:
            sums[:, :, start:end] += per_pixel[:, :, :new_w - start]
            counts[:, start:end] += 1
    logits = resize_maps(sums / counts, image_hw)
    return np.argmax(logits, axis=0).astype(np.int64)


# --- instance ----------------------------------------------------------------------------------------------
def instance_canvas(rgb: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """(the S x S RGB canvas: image scaled to fit, padded right/bottom with 0; the scaled (h, w))."""
    h, w = rgb.shape[:2]
    factor = min(size / h, size / w)
    new_h, new_w = round(h * factor), round(w * factor)
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:new_h, :new_w] = resize_like_pil(rgb, (new_h, new_w))
    return canvas, (new_h, new_w)


def canvas_mask_logits(mask_logits: np.ndarray, scaled_hw: tuple[int, int], image_hw: tuple[int, int],
                       size: int) -> np.ndarray:
    """(K, h, w) mask logits of the S x S canvas -> (K, H, W) in the image's pixels: upsampled to S x S, cropped to
    the scaled image, resized to the image (the official revert of the instance/panoptic canvas)."""
    logits = resize_maps(mask_logits.astype(np.float32), (size, size))
    return resize_maps(logits[:, :scaled_hw[0], :scaled_hw[1]], image_hw)


def instances_from_outputs(class_logits: np.ndarray, mask_logits: np.ndarray, scaled_hw: tuple[int, int],
                           image_hw: tuple[int, int], size: int, top_k: int = TOP_K_INSTANCES,
                           class_names: tuple[str, ...] = ()) -> InstanceSegments:
    """The official instance output of one image: class_logits (Q, C + 1), mask_logits (Q, h, w)."""
    probs = softmax(class_logits.astype(np.float32))[:, :-1]  # (Q, C)
    num_classes = probs.shape[1]
    flat = probs.reshape(-1)
    k = min(top_k, flat.size)
    order = np.argsort(-flat, kind="stable")[:k]  # the top-k pairs, best first
    queries, labels = order // num_classes, order % num_classes
    unique, inverse = np.unique(queries, return_inverse=True)  # each query's mask is resized once
    logits = canvas_mask_logits(mask_logits[unique], scaled_hw, image_hw, size)
    masks_u = logits > 0
    mask_prob = (sigmoid(logits) * masks_u).reshape(len(unique), -1).sum(1) / (masks_u.reshape(len(unique), -1)
                                                                               .sum(1) + 1e-6)
    scores = (flat[order] * mask_prob[inverse]).astype(np.float32)
    best = np.argsort(-scores, kind="stable")
    return InstanceSegments(masks_u[inverse][best], scores[best], labels[best].astype(np.int64),
                            queries[best].astype(np.int64), tuple(class_names))


# --- panoptic ----------------------------------------------------------------------------------------------
def panoptic_from_outputs(class_logits: np.ndarray, mask_logits: np.ndarray, scaled_hw: tuple[int, int],
                          image_hw: tuple[int, int], size: int, stuff_classes: tuple[int, ...] | list[int],
                          class_names: tuple[str, ...] = (), score_threshold: float = PANOPTIC_SCORE,
                          overlap_threshold: float = PANOPTIC_OVERLAP) -> PanopticSegments:
    """The official panoptic output of one image: class_logits (Q, C + 1), mask_logits (Q, h, w) of the instance
    canvas; `stuff_classes` the labels merged into one segment per class (all others are things)."""
    probs = softmax(class_logits.astype(np.float32))  # (Q, C + 1): no-object included
    no_object = probs.shape[1] - 1
    best_class = np.argmax(probs, axis=1)
    best_prob = probs[np.arange(probs.shape[0]), best_class]
    kept = np.flatnonzero((best_class != no_object) & (best_prob > score_threshold))  # query order
    segment_ids = np.full(image_hw, -1, np.int32)
    if kept.size == 0:
        return PanopticSegments(segment_ids, (), tuple(int(c) for c in stuff_classes))
    stuff = {int(c) for c in stuff_classes}
    masks = sigmoid(canvas_mask_logits(mask_logits[kept], scaled_hw, image_hw, size))  # (K, H, W)
    winner = np.argmax(best_prob[kept][:, None, None] * masks, axis=0)  # (H, W) index into kept
    won_area = np.bincount(winner.reshape(-1), minlength=kept.size)
    made: list[tuple[int, int, int]] = []  # (segment id, label, query)
    stuff_ids: dict[int, int] = {}
    for k, query in enumerate(kept.tolist()):
        own = masks[k] >= MASK_PROBABILITY
        own_area = int(own.sum())
        region = own & (winner == k)
        if own_area == 0 or won_area[k] == 0 or not region.any() or won_area[k] / own_area < overlap_threshold:
            continue
        label = int(best_class[query])
        if label in stuff and label in stuff_ids:  # a stuff class already has its segment: this query joins it
            segment_ids[region] = stuff_ids[label]
            continue
        segment_id = len(made)
        if label in stuff:
            stuff_ids[label] = segment_id
        segment_ids[region] = segment_id
        made.append((segment_id, label, query))
    areas = np.bincount(segment_ids.reshape(-1) + 1, minlength=len(made) + 1)[1:]
    segments = tuple(PanopticSegment(id=sid, label=label, class_name=_name(class_names, label),
                                     score=float(best_prob[query]), is_thing=label not in stuff,
                                     area=int(areas[sid]), query=int(query)) for sid, label, query in made)
    return PanopticSegments(segment_ids, segments, tuple(sorted(stuff)))


def _name(class_names: tuple[str, ...], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else f"class_{label}"
