"""The DINOv3-distilled ViT-Tiny (DEIMv2 s: embed 192, 3 heads) and ViT-Tiny+ (m: embed 256, 4 heads).

A 12-block pre-norm ViT/16 with one class token, 2-D RoPE on the patch tokens (no learned position
table, so any grid works), LayerNorm eps 1e-6, GELU MLP of ratio 4, no LayerScale and no k-bias mask.
Unlike DINOv3, the returned intermediate layers are NOT passed through a final norm (the model has none).

The official checkpoints keep these weights one level down, under `_model.` (`_model.cls_token`,
`_model.patch_embed.proj`, `_model.blocks.N...`, `_model.rope_embed.periods`); `TinyViTParts` is that
level, so the state dicts load strictly.
"""
from __future__ import annotations

import torch
from torch import nn

from deimv2_deploy.models.dinov3 import MLP, PatchEmbed, RopeEmbedding, ViTBlock, init_vit_weights, tokens_to_map

__all__ = ["TinyViTParts", "ViTTiny"]


class TinyViTParts(nn.Module):
    """The weights of ViT-Tiny, in checkpoint order: cls_token, patch_embed, blocks, rope_embed."""

    def __init__(self, embed_dim: int, num_heads: int, depth: int, mlp_ratio: float, patch_size: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.ModuleList(
            ViTBlock(embed_dim, num_heads, MLP(embed_dim, hidden), norm_eps=1e-6) for _ in range(depth)
        )
        self.rope_embed = RopeEmbedding(embed_dim // num_heads)


class ViTTiny(nn.Module):
    """ViT-Tiny returning the (un-normed) patch tokens of `return_layers` as stride-16 maps."""

    def __init__(
        self,
        embed_dim: int = 192,
        num_heads: int = 3,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        return_layers: tuple[int, ...] = (3, 7, 11),
        patch_size: int = 16,
    ) -> None:
        super().__init__()
        if not return_layers or any(not 0 <= i < depth for i in return_layers):
            raise ValueError(f"return_layers {return_layers} must be non-empty block indexes in [0, {depth})")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.return_layers = tuple(return_layers)
        self._model = TinyViTParts(embed_dim, num_heads, depth, mlp_ratio, patch_size)

        nn.init.trunc_normal_(self._model.cls_token, std=0.02)
        init_vit_weights(self._model.blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> one (B, D, H/16, W/16) map per returned layer."""
        parts = self._model
        patches, grid = parts.patch_embed(x)  # (B, h*w, D)
        tokens = torch.cat((parts.cls_token.expand(patches.shape[0], -1, -1), patches), dim=1)  # (B, 1 + h*w, D)
        sin, cos = parts.rope_embed(grid[0], grid[1], prefix=1)  # (1 + h*w, head_dim)
        outs = []
        for i, block in enumerate(parts.blocks):
            tokens = block(tokens, sin, cos)
            if i in self.return_layers:
                outs.append(tokens_to_map(tokens[:, 1:], grid))
        return outs
