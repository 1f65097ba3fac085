"""Box conversions and overlap measures for the matcher and the criterion.

Every function broadcasts over leading dimensions: `paired_*` compare box i of `a` with box i of `b`
(the diagonal of the pairwise matrix, without building it); `pairwise_*` give the (..., N, M) matrix.
The arithmetic follows the official box_ops step for step (same operations in the same order), so
float32 results agree with it to the last bit and matchings never flip on rounding.
"""
from __future__ import annotations

import torch

__all__ = [
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "box_area",
    "paired_iou",
    "paired_giou",
    "pairwise_iou",
    "pairwise_giou",
]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size -> corners; negative sizes count as 0 (a degenerate box, never an inverted one)."""
    cx, cy, w, h = boxes.unbind(-1)
    half_w, half_h = 0.5 * w.clamp(min=0.0), 0.5 * h.clamp(min=0.0)
    return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corners -> centre/size."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) xyxy -> (...)."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def paired_iou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IoU and union area of corresponding xyxy boxes, shapes broadcast: (..., 4), (..., 4) -> (...), (...)."""
    lt = torch.max(a[..., :2], b[..., :2])
    rb = torch.min(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = box_area(a) + box_area(b) - inter
    return inter / union, union


def paired_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of corresponding xyxy boxes: IoU - (hull - union) / hull, in [-1, 1]."""
    iou, union = paired_iou(a, b)
    lt = torch.min(a[..., :2], b[..., :2])
    rb = torch.max(a[..., 2:], b[..., 2:])
    wh = (rb - lt).clamp(min=0)
    hull = wh[..., 0] * wh[..., 1]
    return iou - (hull - union) / hull


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., N, 4) x (..., M, 4) xyxy -> IoU matrix (..., N, M)."""
    return paired_iou(a.unsqueeze(-2), b.unsqueeze(-3))[0]


def pairwise_giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., N, 4) x (..., M, 4) xyxy -> generalised IoU matrix (..., N, M)."""
    return paired_giou(a.unsqueeze(-2), b.unsqueeze(-3))
