"""EoMT's official pre- and post-processing in numpy/OpenCV (no torch), and the results it produces.

Follows the official evaluation code (github.com/tue-mps/eomt, training/lightning_module.py and
mask_classification_{semantic,instance}.py), written anew here:
- semantic: the image is scaled so its short side equals the input size S, cut into ceil(long / S) overlapping
  S x S windows along its long side (evenly spread, the last one flush with the edge); each window's per-pixel class
  scores are sum_q sigmoid(mask_q) * softmax(class_q)[:-1] with the masks bilinearly upsampled to S x S; windows are
  averaged where they overlap, the result bilinearly resized to the image and argmax'ed.
- instance: the image is scaled to fit inside S x S (aspect kept) and padded right/bottom with 0; masks are
  upsampled to S x S, cropped to the scaled image and resized to the image. The top 100 (query, class) pairs of
  softmax(class)[:, :-1] (no-object column dropped) are kept, mask = logit > 0, score = class probability x mean
  sigmoid inside the mask; masks may overlap, there is no threshold.
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

__all__ = ["Segmentation", "InstanceSegments", "semantic_windows", "semantic_from_windows", "instance_canvas",
           "instances_from_outputs", "resize_maps", "softmax", "sigmoid", "TOP_K_INSTANCES"]

TOP_K_INSTANCES = 100


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
class Segmentation:
    """What EoMT finds in one image: a semantic map and/or instance segments, in the image's pixels."""

    image_size: tuple[int, int]  # (height, width)
    class_names: tuple[str, ...]
    semantic: np.ndarray | None = None  # int64 (H, W) class index per pixel
    instances: InstanceSegments | None = None
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
    logits = resize_maps(mask_logits[unique].astype(np.float32), (size, size))
    logits = resize_maps(logits[:, :scaled_hw[0], :scaled_hw[1]], image_hw)
    masks_u = logits > 0
    mask_prob = (sigmoid(logits) * masks_u).reshape(len(unique), -1).sum(1) / (masks_u.reshape(len(unique), -1)
                                                                               .sum(1) + 1e-6)
    scores = (flat[order] * mask_prob[inverse]).astype(np.float32)
    best = np.argsort(-scores, kind="stable")
    return InstanceSegments(masks_u[inverse][best], scores[best], labels[best].astype(np.int64),
                            queries[best].astype(np.int64), tuple(class_names))
