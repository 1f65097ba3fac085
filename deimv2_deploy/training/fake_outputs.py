"""Random training-mode outputs in the official structure, for tests and timings of the criterion.

The tensors are leaves (requires_grad) so a test can see where gradients go; the teacher entries are the same
tensor objects as in the real model (the last decoder layer for aux layers, the last dn layer for dn layers).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["random_targets", "random_training_outputs"]


def _boxes(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Normalised cxcywh boxes inside the image, sides 0.02 .. 0.5."""
    wh = 0.02 + 0.48 * torch.rand(*shape, 2, generator=g)
    centre = wh / 2 + (1 - wh) * torch.rand(*shape, 2, generator=g)
    return torch.cat([centre, wh], dim=-1)


def random_targets(objects: Sequence[int], num_classes: int = 80, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """One target dict per image with `objects[i]` random boxes and labels."""
    g = torch.Generator().manual_seed(seed)
    return [{"boxes": _boxes((n,), g), "labels": torch.randint(0, num_classes, (n,), generator=g)} for n in objects]


def random_training_outputs(targets: Sequence[dict[str, torch.Tensor]], num_queries: int = 300, num_classes: int = 80,
                            num_layers: int = 3, reg_max: int = 32, num_denoising: int = 100, reg_scale: int = 4,
                            seed: int = 0, requires_grad: bool = True) -> dict:
    """Outputs of a DEIM decoder with `num_layers` layers for these targets (denoising groups sized as the
    official ones: num_denoising // max objects groups of 2 * max objects queries, none without objects)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(targets)
    bins = 4 * (reg_max + 1)

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.requires_grad_(requires_grad)

    def layer(q: int, corners: bool) -> dict:
        out = {"pred_logits": leaf(torch.randn(batch, q, num_classes, generator=g) - 2.0),
               "pred_boxes": leaf(_boxes((batch, q), g))}
        if corners:
            out["pred_corners"] = leaf(torch.randn(batch, q, bins, generator=g))
            out["ref_points"] = _boxes((batch, q), g)
        return out

    main = layer(num_queries, True)
    ref = main["ref_points"]
    outputs: dict = dict(main)
    outputs["up"] = torch.tensor([0.5])
    outputs["reg_scale"] = torch.tensor([reg_scale])
    aux = []
    for _ in range(num_layers - 1):
        a = layer(num_queries, True)
        a["ref_points"] = ref  # every layer refines from the same first-layer boxes
        a["teacher_corners"], a["teacher_logits"] = main["pred_corners"], main["pred_logits"]
        aux.append(a)
    outputs["aux_outputs"] = aux
    outputs["pre_outputs"] = layer(num_queries, False)
    outputs["enc_aux_outputs"] = [layer(num_queries, False)]
    outputs["enc_meta"] = {"class_agnostic": False}

    sizes = [len(t["labels"]) for t in targets]
    max_gt = max(sizes, default=0)
    if max_gt and num_denoising > 0:
        groups = max(num_denoising // max_gt, 1)
        dn = [layer(2 * max_gt * groups, True) for _ in range(num_layers)]
        for d in dn:
            d["ref_points"] = dn[0]["ref_points"]
            d["teacher_corners"], d["teacher_logits"] = dn[-1]["pred_corners"], dn[-1]["pred_logits"]
        outputs["dn_outputs"] = dn
        outputs["dn_pre_outputs"] = layer(2 * max_gt * groups, False)
        positive = tuple(torch.cat([gi * 2 * max_gt + torch.arange(n) for gi in range(groups)]) if n else
                         torch.zeros(0, dtype=torch.int64) for n in sizes)
        outputs["dn_meta"] = {"dn_positive_idx": positive, "dn_num_group": groups,
                              "dn_num_split": [2 * max_gt * groups, num_queries]}
    return outputs
