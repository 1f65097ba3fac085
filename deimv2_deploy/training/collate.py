"""Batch collation of DEIMv2 training: stack, mixup or copy-blend, multi-scale resize (official
BatchImageCollateFunction).

In the order of the official collate function:
1. mixup (epochs in `mixup_epochs`, probability `mixup_prob`): every image is blended with the previous one in
   the batch (weight beta ~ U(0.45, 0.55) on its own), and gets that image's boxes as well;
2. otherwise copy-blend (epochs in `copyblend_epochs`, probability `copyblend_prob`): objects of the batch of at
   least `area_threshold` pixels are copied, with a margin when `with_expand`, to random places of each image
   and blended there with weight 1 - beta (or pasted); their boxes join that image's targets;
3. multi-scale (epochs before `stop_epoch`, when the recipe has scales): the whole batch is resized (nearest,
   as the official `F.interpolate` default) to a square size drawn from the scale list.
Boxes are normalised cxcywh, so they need no change when the batch is resized.

Randomness comes from `numpy.random.default_rng((seed, epoch, tag, *sample indices))`, so a batch is the
same for any number of workers. The official copy-blend compares the COCO annotation `area` (of the original
image, not kept aligned through the transforms); here the area is the box's, in pixels of the batch image.
The official mixup also records per-box mixing weights (`mixup` in the targets), which its criterion does not
read; they are left out.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .augment_recipe import AugmentRecipe

__all__ = ["BatchCollator", "collate_eval"]

_STREAM_TAG = 0xC0FFEE  # separates the batch generator from the per-sample ones


def collate_eval(items: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]
                 ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Stack images (B, 3, H, W); targets stay a list of dicts."""
    return torch.stack([image for image, _ in items]), [target for _, target in items]


class BatchCollator:
    """`collate_fn` for the training DataLoader; call `set_epoch(e)` before each epoch."""

    def __init__(self, recipe: AugmentRecipe, seed: int = 0):
        self.recipe = recipe
        self.seed = int(seed)
        self.scales = recipe.scales
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch={epoch}: epochs count from 0")
        self._epoch = int(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch

    def uses_multiscale(self, epoch: int | None = None) -> bool:
        epoch = self._epoch if epoch is None else epoch
        return self.scales is not None and epoch < self.recipe.stop_epoch

    def _rng(self, targets: Sequence[dict[str, torch.Tensor]]) -> np.random.Generator:
        indices = [int(t["idx"]) if "idx" in t else 0 for t in targets]
        return np.random.default_rng((self.seed, self._epoch, _STREAM_TAG, *indices))

    def __call__(self, items: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]
                 ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
        images, targets = collate_eval(items)
        rng = self._rng(targets)
        r, e = self.recipe, self._epoch
        beta = float(rng.uniform(0.45, 0.55))
        if rng.random() < r.mixup_prob and r.mixup_epochs[0] <= e < r.mixup_epochs[1]:
            images, targets = mixup(images, targets, beta)
        elif r.copyblend_epochs[0] <= e < r.copyblend_epochs[1] and rng.random() < r.copyblend_prob:
            images, targets = copy_blend(images, targets, beta, r, rng)
        if self.uses_multiscale():
            size = int(self.scales[int(rng.integers(len(self.scales)))])
            if images.shape[-2:] != (size, size):
                images = F.interpolate(images, size=(size, size), mode="nearest")
        return images, targets


def mixup(images: torch.Tensor, targets: list[dict[str, torch.Tensor]], beta: float
          ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Image i becomes beta * image i + (1 - beta) * image i-1 (cyclic) with both images' boxes."""
    mixed = images.roll(shifts=1, dims=0)  # a new tensor: image i-1 at i
    mixed.mul_(1.0 - beta).add_(images, alpha=beta)  # in place, one pass over the batch
    out = []
    for i, t in enumerate(targets):
        other = targets[i - 1]
        new = dict(t)
        new["boxes"] = torch.cat([t["boxes"], other["boxes"]])
        new["labels"] = torch.cat([t["labels"], other["labels"]])
        out.append(new)
    return mixed, out


def copy_blend(images: torch.Tensor, targets: list[dict[str, torch.Tensor]], beta: float, recipe: AugmentRecipe,
               rng: np.random.Generator) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Copy objects of the batch into each image (see the module docstring)."""
    cb = recipe.copyblend
    n, _, height, width = images.shape
    # pool: every object of the batch with a large enough box, as (image, box in pixels, label)
    pool: list[tuple[int, np.ndarray, torch.Tensor]] = []
    for i, t in enumerate(targets):
        boxes = t["boxes"].detach().cpu().numpy().astype(np.float64)
        areas = boxes[:, 2] * boxes[:, 3] * (width * height)
        for j in np.flatnonzero(areas >= cb.area_threshold):
            pool.append((i, boxes[j], t["labels"][j]))
    if not pool:
        return images, targets

    out_images = images.clone()
    out_targets = []
    for i in range(n):
        count = min(cb.num_objects, len(pool))
        if cb.random_num_objects:
            count = int(rng.integers(1, count + 1))
        new_boxes, new_labels = [], []
        for k in rng.choice(len(pool), size=count, replace=False):
            src, (cx, cy, bw, bh), label = pool[int(k)]
            x1s, y1s = max(int((cx - bw / 2) * width), 0), max(int((cy - bh / 2) * height), 0)
            x2s, y2s = min(int((cx + bw / 2) * width), width), min(int((cy + bh / 2) * height), height)
            w_px, h_px = x2s - x1s, y2s - y1s
            if w_px <= 0 or h_px <= 0:
                continue
            x1 = int(rng.integers(0, width - w_px + 1)) if w_px < width else 0
            y1 = int(rng.integers(0, height - h_px + 1)) if h_px < height else 0
            x2, y2 = x1 + w_px, y1 + h_px
            new_boxes.append([(x1 + w_px / 2) / width, (y1 + h_px / 2) / height, w_px / width, h_px / height])
            new_labels.append(label)
            if cb.with_expand:
                # the same margin on both sides of source and destination, as far as both images allow
                alpha = rng.uniform(*cb.expand_ratios)
                ew, eh = int(w_px * alpha), int(h_px * alpha)
                left, top = min(ew, x1s, x1), min(eh, y1s, y1)
                right, bottom = min(ew, width - x2s, width - x2), min(eh, height - y2s, height - y2)
                x1s, y1s, x2s, y2s = x1s - left, y1s - top, x2s + right, y2s + bottom
                x1, y1, x2, y2 = x1 - left, y1 - top, x2 + right, y2 + bottom
            patch = images[src, :, y1s:y2s, x1s:x2s]  # from the batch before any paste
            if cb.blend:
                out_images[i, :, y1:y2, x1:x2] = out_images[i, :, y1:y2, x1:x2] * beta + patch * (1.0 - beta)
            else:
                out_images[i, :, y1:y2, x1:x2] = patch
        t = dict(targets[i])
        if new_boxes:
            t["boxes"] = torch.cat([t["boxes"], torch.tensor(new_boxes, dtype=t["boxes"].dtype)])
            t["labels"] = torch.cat([t["labels"], torch.stack(new_labels).to(t["labels"].dtype)])
        out_targets.append(t)
    return out_images, out_targets
