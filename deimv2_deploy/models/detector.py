"""DEIMv2: backbone -> encoder -> DEIM decoder, and the in-place conversion to the official deploy form."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["DEIMv2"]


class DEIMv2(nn.Module):
    """The whole detector. `forward(images)` -> `{"pred_logits": (B, Q, C), "pred_boxes": (B, Q, 4)}`.

    images: float (B, 3, H, W) RGB in [0, 1], normalised beforehand where the variant needs it. Boxes are
    normalised cxcywh; `postprocess` turns them into pixel detections. State-dict keys are `backbone.*`,
    `encoder.*`, `decoder.*`, as in the official checkpoints.
    """

    def __init__(self, backbone: nn.Module, encoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        # registration order backbone, decoder, encoder gives the official checkpoints' key order
        self.backbone = backbone
        self.decoder = decoder
        self.encoder = encoder

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None) -> dict:
        """Eval: `{"pred_logits", "pred_boxes"}`. In training mode the official training output for the
        DEIM criterion (every decoder layer, encoder proposals, denoising queries built from `targets`)."""
        feats = self.backbone(images)  # list of (B, C_i, H / s_i, W / s_i)
        feats = self.encoder(feats)  # list of (B, hidden, H / s_j, W / s_j)
        return self.decoder(feats, targets) if self.training else self.decoder(feats)

    def deploy(self) -> DEIMv2:
        """Convert in place to the official deploy form and switch to eval mode; returns self.

        Every submodule with a `fuse_for_deploy()` converts itself: encoder conv+BN pairs and RepVGG
        branches are fused, the decoder precomputes its bin weights and drops what follows its eval
        layer. Parents convert before their children (children created by a conversion are visited
        too). Calling it again changes nothing.
        """
        self.eval()
        for module in self.modules():  # a generator: each module converts before its children are listed
            fuse = getattr(module, "fuse_for_deploy", None)
            if callable(fuse):
                fuse()
        return self
