"""annotate(image, detections) -> image: boxes, class names and scores in readable colours."""
from __future__ import annotations

import cv2
import numpy as np

from deimv2_deploy.detections import Detections

__all__ = ["annotate", "class_color"]

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


def annotate(image: np.ndarray, detections: Detections, score_threshold: float | None = None,
             copy: bool = True) -> np.ndarray:
    """Draw `detections` on a BGR uint8 image; returns the drawn image (a copy unless copy=False)."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"annotate needs a (H, W, 3) uint8 BGR image, got "
                         f"{getattr(image, 'shape', type(image).__name__)} {getattr(image, 'dtype', '')}")
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
