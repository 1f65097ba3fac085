"""Hungarian matching of queries to ground-truth objects, with DEIM's epoch-dependent cost.

Cost of query q for target t (smaller is better):
    before `matcher_change_epoch`: cost_bbox * L1(box_q, box_t) + cost_class * focal(p_q[label_t])
                                   + cost_giou * -GIoU(box_q, box_t),
                                   focal(p) = alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8))
    from `matcher_change_epoch` on: -(p_q[label_t] * IoU(box_q, box_t) ** iou_order_alpha)
with p = sigmoid(logit). NaN costs count as 1. Each image is solved on its own (scipy's
linear_sum_assignment); an image without targets matches nothing.

The costs of several outputs of the same batch (every decoder layer, the pre head, the encoder proposals)
are computed in one batched pass over targets padded to the largest image, and copied to the CPU once.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from deimv2_deploy.training.box_ops import cxcywh_to_xyxy, paired_giou, paired_iou

__all__ = ["HungarianMatcher", "Matching", "pad_targets"]

# One image's matching: (query indices, target indices), int64, equal length, queries ascending.
Matching = tuple[torch.Tensor, torch.Tensor]


def _linear_sum_assignment():
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as e:  # scipy comes with the `train` extra
        raise ImportError("training needs scipy: pip install 'deimv2-deploy[train]'") from e
    return linear_sum_assignment


def pad_targets(targets: Sequence[Mapping[str, torch.Tensor]], device: torch.device, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Targets padded to the largest image: labels (B, T) int64 (pad 0), boxes (B, T, 4) cxcywh (pad a unit box)."""
    sizes = [len(t["labels"]) for t in targets]
    width = max(sizes, default=0)
    labels = torch.zeros(len(targets), width, dtype=torch.int64, device=device)
    boxes = torch.full((len(targets), width, 4), 0.5, dtype=dtype, device=device)
    for i, (t, n) in enumerate(zip(targets, sizes, strict=True)):
        if n:
            labels[i, :n] = t["labels"].to(device)
            boxes[i, :n] = t["boxes"].to(device=device, dtype=dtype)
    return labels, boxes, sizes


def _target_logits(logits: torch.Tensor, tgt_labels: torch.Tensor) -> torch.Tensor:
    """(..., B, Q, C) logits at each padded target's class (B, T) -> (..., B, Q, T)."""
    if tgt_labels.numel() and int(tgt_labels.max()) >= logits.shape[-1]:
        raise ValueError(f"target label {int(tgt_labels.max())} is out of range for {logits.shape[-1]} classes")
    index = tgt_labels.unsqueeze(-2).expand(*logits.shape[:-1], tgt_labels.shape[-1])
    return logits.gather(-1, index)


class HungarianMatcher:
    """The official DEIM HungarianMatcher (focal class cost, L1 and GIoU; IoU-order cost after the change epoch)."""

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        change_matcher: bool = True,
        iou_order_alpha: float = 4.0,
        matcher_change_epoch: int = 10000,
    ) -> None:
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_bbox and cost_giou are all 0; give one a weight")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma
        self.change_matcher = change_matcher
        self.iou_order_alpha = iou_order_alpha
        self.matcher_change_epoch = matcher_change_epoch

    def uses_iou_order(self, epoch: int) -> bool:
        return self.change_matcher and epoch >= self.matcher_change_epoch

    @torch.no_grad()
    def cost(self, logits: torch.Tensor, boxes: torch.Tensor, tgt_labels: torch.Tensor, tgt_boxes: torch.Tensor,
             epoch: int = 0) -> torch.Tensor:
        """Cost matrices (..., B, Q, T) of predictions (..., B, Q, C) / (..., B, Q, 4) against padded targets
        (B, T) / (B, T, 4); padded columns hold garbage and are ignored by the caller."""
        return self._cost(_target_logits(logits, tgt_labels), boxes, tgt_boxes, epoch)

    def _cost(self, tgt_logits: torch.Tensor, boxes: torch.Tensor, tgt_boxes: torch.Tensor, epoch: int) -> torch.Tensor:
        prob = tgt_logits.sigmoid()  # p of each target's class, (..., B, Q, T)
        pred_xyxy = cxcywh_to_xyxy(boxes).unsqueeze(-2)  # (..., B, Q, 1, 4)
        tgt_xyxy = cxcywh_to_xyxy(tgt_boxes).unsqueeze(-3)  # (B, 1, T, 4)
        if self.uses_iou_order(epoch):
            iou = paired_iou(pred_xyxy, tgt_xyxy)[0]
            cost = -(prob * torch.pow(iou, self.iou_order_alpha))
        else:
            neg = (1 - self.alpha) * (prob**self.gamma) * (-(1 - prob + 1e-8).log())
            pos = self.alpha * ((1 - prob) ** self.gamma) * (-(prob + 1e-8).log())
            d = (boxes.unsqueeze(-2) - tgt_boxes.unsqueeze(-3)).abs()  # (..., B, Q, T, 4)
            l1 = d[..., 0] + d[..., 1] + d[..., 2] + d[..., 3]
            giou = paired_giou(pred_xyxy, tgt_xyxy)
            cost = self.cost_bbox * l1 + self.cost_class * (pos - neg) + self.cost_giou * -giou
        return torch.nan_to_num(cost, nan=1.0)

    @torch.no_grad()
    def match_many(self, outputs: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, torch.Tensor]],
                   epoch: int = 0) -> list[list[Matching]]:
        """Match several outputs of one batch (each with pred_logits (B, Q, C), pred_boxes (B, Q, 4)).

        Returns one list of B matchings per output. Outputs of equal shape share one batched cost pass.
        """
        result: list[list[Matching] | None] = [None] * len(outputs)
        if not outputs:
            return []
        ref = outputs[0]["pred_logits"]
        work = torch.promote_types(ref.dtype, torch.float32)  # half-precision outputs are matched in float32
        labels, tboxes, sizes = pad_targets(targets, ref.device, work)
        groups: dict[tuple, list[int]] = {}
        for k, out in enumerate(outputs):
            shape = (tuple(out["pred_logits"].shape), tuple(out["pred_boxes"].shape))
            groups.setdefault(shape, []).append(k)
        lsa = _linear_sum_assignment()
        empty = torch.zeros(0, dtype=torch.int64)
        for members in groups.values():
            if max(sizes, default=0) == 0:
                for k in members:
                    result[k] = [(empty, empty) for _ in sizes]
                continue
            tgt_logits = torch.stack([_target_logits(outputs[k]["pred_logits"].detach(), labels)
                                      for k in members]).to(work)  # (K, B, Q, T)
            boxes = torch.stack([outputs[k]["pred_boxes"].detach() for k in members]).to(work)  # (K, B, Q, 4)
            cost = self._cost(tgt_logits, boxes, tboxes, epoch).cpu().numpy()  # (K, B, Q, T)
            for j, k in enumerate(members):
                per_image = []
                for b, n in enumerate(sizes):
                    if n == 0:
                        per_image.append((empty, empty))
                        continue
                    rows, cols = lsa(cost[j, b, :, :n])
                    per_image.append((torch.from_numpy(np.asarray(rows, dtype=np.int64)),
                                      torch.from_numpy(np.asarray(cols, dtype=np.int64))))
                result[k] = per_image
        return result  # type: ignore[return-value]

    def __call__(self, outputs: Mapping[str, torch.Tensor], targets: Sequence[Mapping[str, torch.Tensor]],
                 epoch: int = 0) -> list[Matching]:
        """Matchings of one output: a (query indices, target indices) pair per image."""
        return self.match_many([outputs], targets, epoch)[0]
