"""The DEIMv2 postprocessor in deploy mode: top-k over per-class sigmoid scores, boxes in pixels.

No NMS, no score threshold, no clipping: every (query, class) pair competes in one top-k, so one query
may appear with several labels. Labels are 0-based class indices (no COCO category-id remap).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["postprocess", "PostProcessor", "cxcywh_to_xyxy"]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size boxes -> (..., 4) corner boxes."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def postprocess(
    outputs: Mapping[str, torch.Tensor], orig_target_sizes: torch.Tensor, top_k: int = 300
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Detections of a batch from the model's raw outputs.

    outputs: `pred_logits` (B, Q, C) and `pred_boxes` (B, Q, 4) normalised cxcywh.
    orig_target_sizes: (B, 2) as (width, height) of the original images.
    Returns labels int64 (B, K), boxes float (B, K, 4) xyxy in pixels, scores float (B, K), best first,
    with K = min(top_k, Q * C) (the official postprocessor fails where Q * C < top_k).
    """
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    _, num_queries, num_classes = logits.shape
    k = min(int(top_k), num_queries * num_classes)

    # one ranking over all (query, class) pairs; pair index = query * C + class
    scores, pair = torch.sigmoid(logits).flatten(1).topk(k, dim=-1)  # (B, K)
    query = pair // num_classes
    labels = pair - query * num_classes  # pair % C, in ops every exporter handles

    chosen = boxes.gather(1, query.unsqueeze(-1).expand(-1, -1, 4))  # (B, K, 4) cxcywh in [0, 1]
    wh = orig_target_sizes.unsqueeze(1)  # (B, 1, 2) = (width, height)
    return labels, cxcywh_to_xyxy(chosen) * torch.cat([wh, wh], dim=-1), scores


class PostProcessor(nn.Module):
    """`postprocess` as a module, for an exported graph: (outputs, orig_target_sizes) -> (labels, boxes, scores)."""

    def __init__(self, top_k: int = 300) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.top_k = int(top_k)

    def forward(
        self, outputs: Mapping[str, torch.Tensor], orig_target_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return postprocess(outputs, orig_target_sizes, self.top_k)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}"
