"""Drawing on BGR images: detections (`annotate`), EoMT segmentation (`draw_semantic`, `draw_instances`,
`draw_panoptic`, or `draw_segmentation` for whatever a Segmentation holds) and DINOv3 patch features
(`embeddings_pca_image`: the first three principal components of the patch embeddings as RGB).

Every function returns a new image (the input is never changed unless copy=False where offered). Colours come
from one palette per class id, so a class has the same colour in boxes, semantic maps and segments.
"""
from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from deimv2_deploy.detections import Detections
from deimv2_deploy.embeddings import Embeddings
from deimv2_deploy.segmentation import InstanceSegments, PanopticSegments, Segmentation

__all__ = ["annotate", "class_color", "draw_semantic", "draw_instances", "draw_panoptic", "draw_segmentation",
           "embeddings_pca_image"]

# 20 well-separated colours (BGR), cycled over the class ids
_PALETTE = (
    (56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72), (23, 204, 146),
    (134, 219, 61), (52, 147, 26), (187, 212, 0), (168, 153, 44), (255, 194, 0), (147, 69, 52), (255, 115, 100),
    (236, 24, 0), (255, 56, 132), (133, 0, 82), (255, 56, 203), (200, 149, 255), (199, 55, 255),
)


def class_color(label: int) -> tuple[int, int, int]:
    return _PALETTE[int(label) % len(_PALETTE)]


def _text_color(bgr: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.114 * bgr[0] + 0.587 * bgr[1] + 0.299 * bgr[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def _check_image(image: np.ndarray, who: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{who} needs a (H, W, 3) uint8 BGR image, got "
                         f"{getattr(image, 'shape', type(image).__name__)} {getattr(image, 'dtype', '')}")


def annotate(image: np.ndarray, detections: Detections, score_threshold: float | None = None,
             copy: bool = True) -> np.ndarray:
    """Draw `detections` on a BGR uint8 image; returns the drawn image (a copy unless copy=False)."""
    _check_image(image, "annotate")
    out = image.copy() if copy else image
    if score_threshold is not None:
        detections = detections.filter(score_threshold)
    h, w = out.shape[:2]
    scale = max(h, w) / 640.0
    thickness = max(1, round(2 * scale))
    font_scale = max(0.4, 0.5 * scale)
    order = np.argsort(detections.scores, kind="stable")  # best drawn last, on top
    for i in order:
        x1, y1, x2, y2 = detections.xyxy[i]
        p1 = (int(np.clip(x1, 0, w - 1)), int(np.clip(y1, 0, h - 1)))
        p2 = (int(np.clip(x2, 0, w - 1)), int(np.clip(y2, 0, h - 1)))
        label = int(detections.labels[i])
        color = class_color(label)
        cv2.rectangle(out, p1, p2, color, thickness, cv2.LINE_AA)
        text = f"{detections.class_names[label]} {detections.scores[i]:.2f}"
        (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, max(1, thickness - 1))
        top = p1[1] - th - baseline - 2 if p1[1] - th - baseline - 2 >= 0 else p1[1]  # inside the box at the top edge
        cv2.rectangle(out, (p1[0], top), (p1[0] + tw + 2, top + th + baseline + 2), color, -1)
        cv2.putText(out, text, (p1[0] + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, _text_color(color),
                    max(1, thickness - 1), cv2.LINE_AA)
    return out


# --- segmentation ----------------------------------------------------------------------------------------------
def _check_map(image: np.ndarray, values: np.ndarray, what: str) -> None:
    if values.shape[:2] != image.shape[:2]:
        raise ValueError(f"the {what} is {values.shape[0]}x{values.shape[1]} but the image is "
                         f"{image.shape[0]}x{image.shape[1]}: draw on the image it was predicted for")


def _shade(label: int, index: int) -> tuple[int, int, int]:
    """The class colour, lightened or darkened a little per instance so that touching instances differ."""
    base = np.asarray(class_color(label), np.float32)
    factor = (1.0, 0.7, 1.3, 0.85, 1.15)[index % 5]
    return tuple(int(v) for v in np.clip(base * factor, 0, 255))


def _label_text(out: np.ndarray, text: str, mask: np.ndarray, color: tuple[int, int, int]) -> None:
    """`text` on a filled box at the pixel of `mask` farthest from its edge (inside the region, even if concave)."""
    h, w = out.shape[:2]
    inside = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(inside)), inside.shape)
    scale = max(h, w) / 640.0
    font_scale, thickness = max(0.35, 0.45 * scale), max(1, round(scale))
    (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
    left = int(np.clip(x - tw // 2, 0, max(0, w - tw - 2)))
    top = int(np.clip(y - th // 2, 0, max(0, h - th - baseline - 2)))
    cv2.rectangle(out, (left, top), (left + tw + 2, top + th + baseline + 2), color, -1)
    cv2.putText(out, text, (left + 1, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, _text_color(color),
                thickness, cv2.LINE_AA)


def _outline(out: np.ndarray, mask: np.ndarray, color: tuple[int, int, int], thickness: int) -> None:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, color, thickness, cv2.LINE_AA)


def _thickness(image: np.ndarray) -> int:
    return max(1, round(max(image.shape[:2]) / 400))


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label] if 0 <= label < len(class_names) else f"class_{label}"


def draw_semantic(image: np.ndarray, semantic: np.ndarray, class_names: Sequence[str] = (), alpha: float = 0.5,
                  labels: bool = True) -> np.ndarray:
    """A semantic map (H, W) of class indices (negative: nothing) blended over the image in class colours, with
    outlines where the class changes and each class's name at its largest region."""
    _check_image(image, "draw_semantic")
    _check_map(image, semantic, "semantic map")
    semantic = np.asarray(semantic).astype(np.int64)
    present = [int(c) for c in np.unique(semantic) if c >= 0]
    lut = np.zeros((max(present, default=0) + 1, 3), np.uint8)
    for c in present:
        lut[c] = class_color(c)
    valid = semantic >= 0
    colours = lut[np.where(valid, semantic, 0)]
    out = image.copy()
    out[valid] = (image[valid] * (1 - alpha) + colours[valid] * alpha).astype(np.uint8)
    edges = np.zeros(semantic.shape, bool)  # a pixel whose right or lower neighbour has another class
    edges[:, :-1] |= semantic[:, :-1] != semantic[:, 1:]
    edges[:-1] |= semantic[:-1] != semantic[1:]
    out[edges] = (out[edges] * 0.3).astype(np.uint8)
    if labels:
        for c in present:
            count, components, stats, _ = cv2.connectedComponentsWithStats((semantic == c).astype(np.uint8), 8)
            if count > 1:
                biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
                _label_text(out, _name(class_names, c), components == biggest, class_color(c))
    return out


def draw_instances(image: np.ndarray, instances: InstanceSegments, score_threshold: float = 0.5,
                   alpha: float = 0.5, max_instances: int | None = None) -> np.ndarray:
    """Instance masks with a score >= `score_threshold` (at most `max_instances`, best first) blended over the image,
    outlined, with "name score" inside each; better instances are drawn on top of worse ones where they overlap."""
    _check_image(image, "draw_instances")
    kept = instances.filter(score_threshold)
    if len(kept) and kept.masks.shape[1:] != image.shape[:2]:
        _check_map(image, kept.masks[0], "instance mask")
    count = len(kept) if max_instances is None else min(len(kept), max_instances)
    out = image.copy()
    thickness = _thickness(image)
    for i in reversed(range(count)):  # worst first: the best ends on top
        mask = kept.masks[i]
        if not mask.any():
            continue
        color = _shade(int(kept.labels[i]), i)
        out[mask] = (out[mask] * (1 - alpha) + np.asarray(color, np.float32) * alpha).astype(np.uint8)
        _outline(out, mask, color, thickness)
    for i in reversed(range(count)):
        if kept.masks[i].any():
            label = int(kept.labels[i])
            _label_text(out, f"{_name(kept.class_names, label)} {kept.scores[i]:.2f}", kept.masks[i],
                        _shade(label, i))
    return out


def draw_panoptic(image: np.ndarray, panoptic: PanopticSegments, class_names: Sequence[str] = (),
                  alpha: float = 0.5) -> np.ndarray:
    """Panoptic segments blended over the image: stuff in its class colour, each thing in a shade of its class
    colour, outlines around every segment, the class name (things: with the score) inside each."""
    _check_image(image, "draw_panoptic")
    _check_map(image, panoptic.segment_ids, "panoptic map")
    out = image.copy()
    thickness = _thickness(image)
    for n, seg in enumerate(panoptic.segments):
        mask = panoptic.mask(seg.id)
        color = _shade(seg.label, n) if seg.is_thing else class_color(seg.label)
        out[mask] = (out[mask] * (1 - alpha) + np.asarray(color, np.float32) * alpha).astype(np.uint8)
        _outline(out, mask, (255, 255, 255) if seg.is_thing else color, thickness)
    for n, seg in enumerate(panoptic.segments):
        name = seg.class_name or _name(class_names, seg.label)
        text = f"{name} {seg.score:.2f}" if seg.is_thing else name
        _label_text(out, text, panoptic.mask(seg.id), _shade(seg.label, n) if seg.is_thing else class_color(seg.label))
    return out


def draw_segmentation(image: np.ndarray, segmentation: Segmentation, score_threshold: float = 0.5) -> np.ndarray:
    """Whatever `segmentation` holds, side by side left to right: semantic, instances (>= score_threshold),
    panoptic; one image when it holds one result."""
    panels = []
    if segmentation.semantic is not None:
        panels.append(draw_semantic(image, segmentation.semantic, segmentation.class_names))
    if segmentation.instances is not None:
        panels.append(draw_instances(image, segmentation.instances, score_threshold))
    if segmentation.panoptic is not None:
        panels.append(draw_panoptic(image, segmentation.panoptic, segmentation.class_names))
    if not panels:
        raise ValueError("this Segmentation holds no result: predict with tasks semantic, instance and/or panoptic")
    return panels[0] if len(panels) == 1 else np.concatenate(panels, axis=1)


# --- DINOv3 features -----------------------------------------------------------------------------------------
def embeddings_pca_image(embeddings: Embeddings, size_hw: tuple[int, int] | None = None,
                         smooth: bool = False) -> np.ndarray:
    """The patch embeddings' first three principal components as a BGR uint8 image (R = first component): each
    component min-max scaled over the image's patches (1st and 99th percentiles), shown one block per patch
    (nearest) at `size_hw` (default: the original image's size), or bilinearly blended with smooth=True."""
    rows, cols, dim = embeddings.patches.shape
    x = embeddings.patches.reshape(-1, dim).astype(np.float64)
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)  # rows of vt: principal directions, largest first
    k = min(3, vt.shape[0])
    comps = x @ vt[:k].T  # (P, k)
    for j in range(k):  # a component's sign is arbitrary: make its largest projection positive, for stable colours
        if abs(comps[:, j].min()) > abs(comps[:, j].max()):
            comps[:, j] = -comps[:, j]
    rgb = np.zeros((rows * cols, 3), np.float64)
    for j in range(k):
        lo, hi = np.percentile(comps[:, j], [1, 99])
        rgb[:, j] = np.clip((comps[:, j] - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
    grid = (rgb.reshape(rows, cols, 3)[:, :, ::-1] * 255).round().astype(np.uint8)  # RGB -> BGR
    h, w = size_hw or embeddings.image_size
    return cv2.resize(grid, (int(w), int(h)), interpolation=cv2.INTER_LINEAR if smooth else cv2.INTER_NEAREST)
