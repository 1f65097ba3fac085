"""Helpers for the EoMT / DINOv3 tests."""
from __future__ import annotations

import torch


def make_confident(eomt, no_object_bias: float) -> None:
    """Random EoMT weights give near-uniform classes (below panoptic's 0.8) and almost flat masks: scale the class
    head and the last mask layer so some queries are sure of a class and their masks have edges. `no_object_bias`
    sets how many queries still say "no object"."""
    with torch.no_grad():
        eomt.class_predictor.weight.mul_(40.0)
        eomt.class_predictor.bias.zero_()
        eomt.class_predictor.bias[-1] = no_object_bias
        eomt.mask_head.fc3.weight.mul_(300.0)
        eomt.mask_head.fc3.bias.mul_(300.0)
