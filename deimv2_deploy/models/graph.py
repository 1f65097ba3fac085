"""DeployGraph: the deploy-mode model plus postprocessor, with the official export's I/O.

    images float32 (N, 3, H, W), orig_target_sizes int64 (N, 2) as (width, height)
    -> labels int64 (N, K), boxes float32 (N, K, 4) xyxy pixels, scores float32 (N, K)
This is what ONNX/OpenVINO/TensorRT artifacts contain and what the torch runtime runs.
"""
from __future__ import annotations

import torch
from torch import nn

from deimv2_deploy.models.postprocess import PostProcessor

__all__ = ["DeployGraph"]


class DeployGraph(nn.Module):
    def __init__(self, model: nn.Module, top_k: int = 300) -> None:
        super().__init__()
        self.model = model
        self.postprocessor = PostProcessor(top_k)

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outputs = self.model(images)
        labels, boxes, scores = self.postprocessor(outputs, orig_target_sizes)
        return labels, boxes, scores
