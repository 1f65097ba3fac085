"""DINOv3 ViT-S/16 and ViT-S+/16, the semantic branch of DEIMv2 l and x, and the transformer parts
that the distilled ViT-Tiny of s and m shares with them.

A plain pre-norm ViT with 2-D rotary position embedding (RoPE) on the patch tokens and no learned
position table, so it runs on any grid: the rotation angles are computed for the actual input grid
on every call. DINOv3 adds four storage (register) tokens after the class token, LayerScale on both
residual branches, and a qkv projection whose key bias is masked out (`bias_mask`: 1 on q and v, 0 on
k). The intermediate layers that DEIMv2 reads are passed through the final LayerNorm.

Module and parameter names follow the official checkpoints (`patch_embed.proj`, `rope_embed.periods`,
`blocks.N.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp,ls2}`, `norm`, `cls_token`, `storage_tokens`,
`mask_token`) so that their state dicts load strictly. The training-time RoPE coordinate rescaling
of the official model is not reproduced: this is an inference model.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RopeEmbedding",
    "apply_rope",
    "PatchEmbed",
    "MaskedKBiasLinear",
    "SelfAttention",
    "MLP",
    "SwiGLU",
    "LayerScale",
    "ViTBlock",
    "init_vit_weights",
    "tokens_to_map",
    "DINOv3ViT",
]


class RopeEmbedding(nn.Module):
    """Axial 2-D RoPE: sin/cos tables of shape (H*W, head_dim) for an H x W patch grid.

    Each axis gets head_dim/4 frequencies (periods base**(2i / (head_dim/2))); the angle vector of a
    token is [row angles, column angles] repeated twice, to pair with the rotate-half convention.
    Patch centres are normalised per axis to (-1, 1), so the angles depend on the grid's shape only
    through its aspect, never through its pixel size.
    """

    def __init__(self, head_dim: int, base: float = 100.0, rescale_coords: float | None = None) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs a head dimension divisible by 4, got {head_dim}")
        if rescale_coords is not None and rescale_coords < 1:
            raise ValueError(f"rescale_coords must be >= 1 (a factor range [1/r, r]), got {rescale_coords}")
        # training-time augmentation of DINOv3: all coordinates scaled by one factor drawn log-uniformly
        # from [1/r, r] per forward pass; eval and export never rescale
        self.rescale_coords = rescale_coords
        exponents = torch.arange(head_dim // 4, dtype=torch.float32) * 2 / (head_dim // 2)
        # Persistent: official checkpoints carry it, and `load_state_dict(strict=True)` expects it.
        self.register_buffer("periods", base**exponents, persistent=True)

    def _axis_angles(self, n: int, scale: torch.Tensor | None = None) -> torch.Tensor:
        centres = torch.arange(0.5, n, device=self.periods.device, dtype=torch.float32) / n  # (n,) in (0, 1)
        centres = 2.0 * centres - 1.0
        if scale is not None:
            centres = centres * scale
        return 2 * math.pi * centres[:, None] / self.periods[None, :]  # (n, head_dim / 4)

    def forward(self, height: int, width: int, prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """sin, cos tables (prefix + H*W, head_dim); the `prefix` leading rows (class and storage tokens) are
        the identity rotation (sin 0, cos 1), so every token can be rotated in one elementwise pass."""
        scale = None
        if self.training and self.rescale_coords is not None:
            log_r = math.log(self.rescale_coords)
            scale = torch.empty(1, device=self.periods.device).uniform_(-log_r, log_r).exp()
        rows = self._axis_angles(height, scale)[:, None, :].expand(height, width, -1)
        cols = self._axis_angles(width, scale)[None, :, :].expand(height, width, -1)
        angles = torch.cat((rows, cols), dim=-1).reshape(height * width, -1)  # (H*W, head_dim / 2)
        angles = angles.repeat(1, 2)  # (H*W, head_dim)
        sin, cos = angles.sin(), angles.cos()
        if prefix:
            sin = torch.cat((sin.new_zeros(prefix, sin.shape[1]), sin))
            cos = torch.cat((cos.new_ones(prefix, cos.shape[1]), cos))
        return sin, cos


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate the feature pairs (i, i + d/2) of `x` (..., d) by the angles of sin/cos (broadcast against x)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class PatchEmbed(nn.Module):
    """Non-overlapping patch_size x patch_size patches -> tokens (B, H*W, D), plus the grid (H, W)."""

    def __init__(self, embed_dim: int, patch_size: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)  # (B, D, H, W)
        grid = (x.shape[2], x.shape[3])
        return x.flatten(2).transpose(1, 2), grid  # (B, H*W, D)


class MaskedKBiasLinear(nn.Linear):
    """The qkv projection of DINOv3: its bias is multiplied by `bias_mask`, which zeroes the key part.

    The mask is a persistent buffer (it is in the checkpoints); the official DEIMv2 copy leaves it
    uninitialised, here it is 1 on the q and v thirds and 0 on the k third, as DINOv3 trained it.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=True)
        if out_features % 3:
            raise ValueError(f"a qkv projection needs out_features divisible by 3, got {out_features}")
        third = out_features // 3
        mask = torch.ones(out_features)
        mask[third : 2 * third] = 0.0
        self.register_buffer("bias_mask", mask, persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE. The sin/cos tables cover every token; prefix tokens (class,
    storage) have identity rows, which leaves them unrotated exactly (x * 1 + y * 0 = x)."""

    def __init__(self, dim: int, num_heads: int, mask_k_bias: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embedding dimension {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = MaskedKBiasLinear(dim, 3 * dim) if mask_k_bias else nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """x (B, N, C); sin, cos (N, head_dim)."""
        b, n, c = x.shape
        # Token-major throughout: the head transposes sit right at the attention, where exported graphs fold
        # them into the fused attention op instead of copying q, k and v into head-major order first.
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # 3 x (B, N, heads, head_dim)
        sin, cos = sin[:, None, :], cos[:, None, :]  # (N, 1, head_dim): the same angles for every head
        # RoPE runs in the tables' dtype (float32) whatever the activations' dtype, as the official does.
        q = apply_rope(q.to(sin.dtype), sin, cos).to(v.dtype)
        k = apply_rope(k.to(sin.dtype), sin, cos).to(v.dtype)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x); the hidden width is 2/3 of `hidden_dim`, rounded up to a multiple of 8
    (DINOv3's rule: ViT-S+ has ffn_ratio 6, so 384 * 6 * 2/3 = 1536)."""

    def __init__(self, dim: int, hidden_dim: int, align_to: int = 8) -> None:
        super().__init__()
        width = int(hidden_dim * 2 / 3)
        width += -width % align_to
        self.w1 = nn.Linear(dim, width)
        self.w2 = nn.Linear(dim, width)
        self.w3 = nn.Linear(width, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    LayerScale is absent (identity, no state) when `layerscale_init` is None, as in ViT-Tiny.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp: nn.Module,
        norm_eps: float,
        layerscale_init: float | None = None,
        mask_k_bias: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, mask_k_bias=mask_k_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = mlp
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), sin, cos))
        return x + self.ls2(self.mlp(self.norm2(x)))


def init_vit_weights(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights and zero biases; other layers keep torch defaults."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, D) patch tokens -> (B, D, H, W) feature map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid[0], grid[1])


class DINOv3ViT(nn.Module):
    """DINOv3 ViT/16 returning the final-normed patch tokens of `return_layers` as stride-16 maps.

    l: embed_dim 384, 6 heads, MLP ratio 4 (ViT-S/16); x: the same with a SwiGLU ratio-6 FFN (ViT-S+/16).
    """

    def __init__(
        self,
        embed_dim: int = 384,
        num_heads: int = 6,
        depth: int = 12,
        ffn: Literal["mlp", "swiglu"] = "mlp",
        ffn_ratio: float = 4.0,
        return_layers: tuple[int, ...] = (5, 8, 11),
        num_storage_tokens: int = 4,
        layerscale_init: float = 1e-5,
        patch_size: int = 16,
        norm_eps: float = 1e-5,
        rope_rescale_coords: float | None = 2.0,
    ) -> None:
        super().__init__()
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"unknown DINOv3 feed-forward {ffn!r}; use 'mlp' or 'swiglu'")
        if not return_layers or any(not 0 <= i < depth for i in return_layers):
            raise ValueError(f"return_layers {return_layers} must be non-empty block indexes in [0, {depth})")
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.return_layers = tuple(return_layers)
        self.num_prefix_tokens = 1 + num_storage_tokens

        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.empty(1, num_storage_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))  # masked-image training only; kept for the keys
        self.patch_embed = PatchEmbed(embed_dim, patch_size)
        self.rope_embed = RopeEmbedding(embed_dim // num_heads, rescale_coords=rope_rescale_coords)
        hidden = int(embed_dim * ffn_ratio)
        self.blocks = nn.ModuleList(
            ViTBlock(
                embed_dim,
                num_heads,
                MLP(embed_dim, hidden) if ffn == "mlp" else SwiGLU(embed_dim, hidden),
                norm_eps=norm_eps,
                layerscale_init=layerscale_init,
                mask_k_bias=True,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        init_vit_weights(self.blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> one (B, D, H/16, W/16) map per returned layer."""
        patches, grid = self.patch_embed(x)  # (B, h*w, D)
        b = patches.shape[0]
        prefix = torch.cat((self.cls_token, self.storage_tokens), dim=1).expand(b, -1, -1)
        tokens = torch.cat((prefix, patches), dim=1)  # (B, 5 + h*w, D)
        sin, cos = self.rope_embed(grid[0], grid[1], prefix=self.num_prefix_tokens)  # (5 + h*w, head_dim)
        outs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, sin, cos)
            if i in self.return_layers:
                outs.append(tokens_to_map(self.norm(tokens[:, self.num_prefix_tokens :]), grid))
        return outs
