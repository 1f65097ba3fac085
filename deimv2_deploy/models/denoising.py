"""Contrastive denoising groups: noised copies of the ground truth fed to the decoder during training.

Each group holds every ground-truth object of the image twice: a positive query (box jittered by less than half
its size, to be reconstructed) and a negative one (jittered by between one and two half-sizes, to be rejected).
Labels are flipped to a random class with probability `label_noise_ratio / 2`. Groups cannot see each other and
the matching queries cannot see any of them (the attention mask); `dn_meta` tells the criterion where the
positives are. Training only: the eval and deploy graphs never contain this.

The random draws happen in one fixed order (label mask, new labels, box signs, box magnitudes) so that a run is
reproducible from the torch seed.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["DenoisingGroups", "make_denoising_groups", "denoising_attention_mask"]


class DenoisingGroups:
    """The decoder inputs of the denoising queries and where they sit.

    content (B, D, C) embedded (noised) labels; ref_logits (B, D, 4) inverse-sigmoid of the noised boxes;
    attn_mask (D + Q, D + Q) bool, True where attention is forbidden; meta: the criterion's `dn_meta`.
    """

    def __init__(self, content: torch.Tensor, ref_logits: torch.Tensor, attn_mask: torch.Tensor,
                 meta: dict[str, Any]) -> None:
        self.content = content
        self.ref_logits = ref_logits
        self.attn_mask = attn_mask
        self.meta = meta


def _cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    w, h = w.clamp(min=0.0), h.clamp(min=0.0)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def _xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def denoising_attention_mask(group_size: int, num_groups: int, num_queries: int,
                             device: torch.device | None = None) -> torch.Tensor:
    """(D + Q, D + Q) bool, True = may not attend: groups are blind to each other, matching queries to all groups."""
    d = group_size * num_groups
    group_of = torch.arange(d, device=device) // group_size  # (D,)
    mask = torch.zeros(d + num_queries, d + num_queries, dtype=torch.bool, device=device)
    mask[:d, :d] = group_of[:, None] != group_of[None, :]
    mask[d:, :d] = True
    return mask


def make_denoising_groups(
    targets: Sequence[dict[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingGroups | None:
    """Denoising queries for a batch, or None when there is nothing to denoise (no objects, or disabled).

    targets: per image {"labels": (N,) int64, "boxes": (N, 4) normalised cxcywh}. The number of groups is
    num_denoising // (most objects in one image of the batch), at least 1; each group has 2 * that many queries.
    """
    if num_denoising <= 0:
        return None
    counts = [int(t["labels"].numel()) for t in targets]
    most = max(counts, default=0)
    if most == 0:
        return None
    device = targets[0]["labels"].device
    groups = max(num_denoising // most, 1)
    b = len(targets)

    # one padded row of `most` objects per image; padding has the "no object" class index num_classes
    labels = torch.full((b, most), num_classes, dtype=torch.int32, device=device)
    boxes = torch.zeros(b, most, 4, device=device)
    present = torch.zeros(b, most, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, counts, strict=True)):
        if n:
            labels[i, :n] = t["labels"].to(labels.dtype)
            boxes[i, :n] = t["boxes"].to(boxes.dtype)
            present[i, :n] = True

    # each group: `most` positive slots then `most` negative slots
    labels = labels.tile(1, 2 * groups)  # (B, D)
    boxes = boxes.tile(1, 2 * groups, 1)  # (B, D, 4)
    present = present.tile(1, 2 * groups)  # (B, D)
    negative = torch.zeros(b, 2 * most, 1, device=device)
    negative[:, most:] = 1.0
    negative = negative.tile(1, groups, 1)  # (B, D, 1)
    positive = (1.0 - negative).squeeze(-1) * present  # (B, D)
    positive_idx = torch.nonzero(positive)[:, 1].split([n * groups for n in counts])
    total = 2 * most * groups

    if label_noise_ratio > 0:
        flip = torch.rand_like(labels, dtype=torch.float) < label_noise_ratio * 0.5
        random_labels = torch.randint_like(flip, 0, num_classes, dtype=labels.dtype)
        labels = torch.where(flip & present, random_labels, labels)

    if box_noise_scale > 0:
        corners = _cxcywh_to_xyxy(boxes)
        half_size = (boxes[..., 2:] * 0.5).tile(1, 1, 2) * box_noise_scale  # (B, D, 4)
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes)
        magnitude = (magnitude + 1.0) * negative + magnitude * (1.0 - negative)  # negatives move 1..2 half-sizes
        corners = (corners + sign * magnitude * half_size).clamp(0.0, 1.0)
        boxes = _xyxy_to_cxcywh(corners)
        boxes = torch.where(boxes < 0, -boxes, boxes)
    ref_logits = _inverse_sigmoid(boxes)

    content = class_embed(labels)  # (B, D, C)
    mask = denoising_attention_mask(2 * most, groups, num_queries, device=device)
    meta = {"dn_positive_idx": positive_idx, "dn_num_group": groups, "dn_num_split": [total, num_queries]}
    return DenoisingGroups(content, ref_logits, mask, meta)
