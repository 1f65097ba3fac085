"""The DEIM decoder of DEIMv2: query selection, deformable decoder layers, fine-grained distribution refinement.

Every parameter of the official `DEIMTransformer` exists under its official name, so official checkpoints load
with strict=True. Eval/deploy (`model.eval()`) returns the last layer's logits and boxes and is what the exporters
trace; training (`model.train()`, with targets) returns every layer's outputs, the encoder proposals and the
contrastive denoising queries (`models/denoising.py`) in the official structure the DEIM criterion takes.

Data flow for B images and N tokens over L levels, C = hidden_dim, Q = num_queries:
    feats -> input_proj -> memory (B, N, C)
    queries: top-Q tokens by max class logit of the valid-masked memory; content = the selected memory,
             reference box = enc_bbox_head(content) + anchor (logit space)
    layers:  self-attention -> deformable cross-attention into the (unmasked) memory -> gate or residual
             -> SwiGLU FFN; every layer refines 4 edge distributions of 33 bins relative to layer 0's box
    output:  last (eval) layer's class logits + LQE quality term, boxes normalised cxcywh
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .common import get_activation
from .denoising import make_denoising_groups

__all__ = [
    "RMSNorm",
    "MLP",
    "SwiGLU",
    "GatewayFusion",
    "DeformableCrossAttention",
    "DecoderLayer",
    "LocationQuality",
    "RefinementDecoder",
    "DEIMDecoder",
    "make_anchors",
    "bin_weights",
    "edges_to_boxes",
]


def _prior_logit(prob: float) -> float:
    """Bias whose sigmoid is `prob` (the focal-loss prior for fresh classification heads)."""
    return -math.log((1.0 - prob) / prob)


def _inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.clamp(0.0, 1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


# ---------------------------------------------------------------------------------------------------------
# Fixed functions of the box parameterisation
# ---------------------------------------------------------------------------------------------------------


def bin_weights(up: torch.Tensor, reg_scale: torch.Tensor, reg_max: int, exact: bool = False) -> torch.Tensor:
    """The non-uniform value W(n) of each of the reg_max + 1 distribution bins, (reg_max + 1,).

    Symmetric around the middle bin (0); the inner bins grow geometrically up to +-up * reg_scale, the two
    outer bins sit at +-2 * up * reg_scale. `exact=True` is the deploy-mode table: computed once in
    double precision from the stored scalars, then cast (what the official deploy mode precomputes);
    otherwise it is computed in the parameters' dtype on every call, as the train-format model does.
    """
    half = reg_max // 2
    if exact:
        bound = float((up[0].abs() * reg_scale.abs()).reshape(-1)[0])  # the product in the stored dtype
        step = (bound + 1.0) ** (2.0 / (reg_max - 2))
        inner = [step**i - 1.0 for i in range(1, half)]
        table = [-2.0 * bound] + [-v for v in reversed(inner)] + [0.0] + inner + [2.0 * bound]
        return torch.tensor(table, dtype=torch.float64).to(device=up.device, dtype=up.dtype)
    bound = up[0].abs() * reg_scale.abs()  # (1,), float
    step = (bound + 1) ** (2 / (reg_max - 2))
    inner = [step**i - 1 for i in range(1, half)]
    pieces = [-2 * bound] + [-v for v in reversed(inner)] + [torch.zeros_like(bound)] + inner + [2 * bound]
    return torch.cat(pieces)


def edges_to_boxes(ref: torch.Tensor, edges: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """Boxes (..., 4) cxcywh from reference boxes `ref` (..., 4) cxcywh and edge offsets (..., 4) l, t, r, b.

    An offset d moves its edge to centre -+ (reg_scale / 2 + d) * size / reg_scale: d = 0 keeps the
    reference edge, each unit moves it by size / reg_scale.
    """
    reg_scale = reg_scale.abs()
    centre, size = ref[..., :2], ref[..., 2:]
    top_left = centre - (0.5 * reg_scale + edges[..., :2]) * (size / reg_scale)
    bottom_right = centre + (0.5 * reg_scale + edges[..., 2:]) * (size / reg_scale)
    return torch.cat([(top_left + bottom_right) / 2, bottom_right - top_left], dim=-1)


def make_anchors(
    shapes: Sequence[tuple[int, int]], eps: float = 0.01, base_size: float = 0.05, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid anchors of all levels in logit space (1, N, 4) and their validity (1, N, 1) bool.

    Level l of size (h, w) has one anchor per cell: centre ((x + 0.5) / w, (y + 0.5) / h), width and height
    base_size * 2**l. Anchors with any coordinate outside (eps, 1 - eps) are invalid; their logits are +inf.
    """
    rows = []
    for level, (h, w) in enumerate(shapes):
        cx = (torch.arange(w, dtype=torch.float32) + 0.5) / w  # (w,)
        cy = (torch.arange(h, dtype=torch.float32) + 0.5) / h  # (h,)
        centres = torch.stack([cx.repeat(h), cy.repeat_interleave(w)], dim=1)  # row-major cells, (h*w, 2)
        side = torch.full_like(centres, base_size) * 2.0**level  # float32(base_size) scaled, as the official
        rows.append(torch.cat([centres, side], dim=1))
    anchors = torch.cat(rows).unsqueeze(0).to(device)  # (1, N, 4)
    inside = (anchors > eps) & (anchors < 1 - eps)
    valid = inside.all(dim=-1, keepdim=True)  # (1, N, 1)
    return (anchors / (1 - anchors)).log().masked_fill(~valid, float("inf")), valid


# ---------------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.scale


class MLP(nn.Module):
    """`num_layers` Linear layers with `act` between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, act: str = "relu") -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *hidden, last = self.layers
        for layer in hidden:
            x = self.act(layer(x))
        return last(x)


class SwiGLU(nn.Module):
    """w3(silu(a) * b) with [a, b] = w12(x): the gated feed-forward of the decoder layers."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)
        nn.init.xavier_uniform_(self.w12.weight)
        nn.init.zeros_(self.w12.bias)
        nn.init.xavier_uniform_(self.w3.weight)
        nn.init.zeros_(self.w3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class GatewayFusion(nn.Module):
    """norm(g1 * x + g2 * y) with per-channel gates [g1, g2] = sigmoid(gate([x, y])) (sizes n..x)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, _prior_logit(0.5))  # start as an even mix
        self.norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g1, g2 = torch.sigmoid(self.gate(torch.cat([x, y], dim=-1))).chunk(2, dim=-1)
        return self.norm(g1 * x + g2 * y)


class DeformableCrossAttention(nn.Module):
    """Multi-scale deformable attention with a per-level number of sampling points.

    No value or output projection: each head samples its slice of the memory channels directly. Sampling
    locations are reference centre + offset * (1 / points of that level) * reference size * offset_scale;
    one softmax runs over the points of all levels together.
    """

    def __init__(self, dim: int, num_heads: int, points_per_level: Sequence[int], offset_scale: float = 0.5) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_dim {dim} must be divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.points_per_level = [int(p) for p in points_per_level]
        self.offset_scale = offset_scale
        total = sum(self.points_per_level)
        self.total_points = total
        # 1 / points of the point's level, for each of the `total` points (persistent: in the checkpoints)
        scale = [1.0 / p for p in self.points_per_level for _ in range(p)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        self.sampling_offsets = nn.Linear(dim, num_heads * total * 2)
        self.attention_weights = nn.Linear(dim, num_heads * total)
        self._init_offsets()

    @torch.no_grad()
    def _init_offsets(self) -> None:
        # head k looks along angle 2 pi k / heads (pushed out to the unit square); the j-th point of a
        # level starts j steps out along it
        angle = 2.0 * math.pi * torch.arange(self.num_heads, dtype=torch.float32) / self.num_heads
        direction = torch.stack((angle.cos(), angle.sin()), dim=1)
        direction /= direction.abs().amax(dim=1, keepdim=True)  # (heads, 2)
        steps = torch.cat([torch.arange(1, p + 1) for p in self.points_per_level]).to(direction)  # (total,)
        nn.init.zeros_(self.sampling_offsets.weight)
        self.sampling_offsets.bias.copy_(torch.einsum("hc,p->hpc", direction, steps).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(
        self,
        query: torch.Tensor,
        ref_boxes: torch.Tensor,
        values: Sequence[torch.Tensor],
        shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """query (B, Q, C); ref_boxes (B, Q, 4) cxcywh in [0, 1]; values per level (B, heads, C / heads, h * w)."""
        heads, total = self.num_heads, self.total_points
        offsets = self.sampling_offsets(query).unflatten(-1, (heads, total, 2))  # (B, Q, heads, P, 2)
        weights = self.attention_weights(query).unflatten(-1, (heads, total)).softmax(dim=-1)  # (B, Q, heads, P)

        ref = ref_boxes[:, :, None, None, :]  # (B, Q, 1, 1, 4)
        point_scale = self.num_points_scale.to(query.dtype).unsqueeze(-1)  # (total, 1)
        locations = ref[..., :2] + offsets * point_scale * ref[..., 2:] * self.offset_scale  # (B, Q, heads, P, 2)

        # grid_sample wants [-1, 1] coordinates and one batch entry per (image, head)
        grids = (2 * locations - 1).transpose(1, 2).flatten(0, 1)  # (B*heads, Q, P, 2)
        per_level = [
            F.grid_sample(
                value.flatten(0, 1).unflatten(-1, (h, w)),  # (B*heads, C/heads, h, w)
                grid, mode="bilinear", padding_mode="zeros", align_corners=False,
            )  # (B*heads, C/heads, Q, P_level)
            for value, (h, w), grid in zip(values, shapes, grids.split(self.points_per_level, dim=2), strict=True)
        ]
        mix = weights.transpose(1, 2).flatten(0, 1).unsqueeze(1)  # (B*heads, 1, Q, P)
        out = (torch.cat(per_level, dim=-1) * mix).sum(-1)  # (B*heads, C/heads, Q)
        return out.unflatten(0, (-1, heads)).flatten(1, 2).transpose(1, 2)  # (B, Q, C)


class DecoderLayer(nn.Module):
    """Self-attention -> deformable cross-attention -> SwiGLU FFN, with RMSNorm after each step."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        dim_feedforward: int,
        points_per_level: Sequence[int],
        use_gateway: bool,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=0.0, batch_first=True)
        self.norm1 = RMSNorm(dim)
        self.cross_attn = DeformableCrossAttention(dim, num_heads, points_per_level)
        self.use_gateway = use_gateway
        if use_gateway:
            self.gateway = GatewayFusion(dim)
        else:
            self.norm2 = RMSNorm(dim)
        self.swish_ffn = SwiGLU(dim, dim_feedforward // 2)
        self.norm3 = RMSNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        ref_boxes: torch.Tensor,
        values: Sequence[torch.Tensor],
        shapes: Sequence[tuple[int, int]],
        pos: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = x + pos
        attended, _ = self.self_attn(q, q, value=x, attn_mask=attn_mask, need_weights=False)
        x = self.norm1(x + attended)

        sampled = self.cross_attn(x + pos, ref_boxes, values, shapes)
        x = self.gateway(x, sampled) if self.use_gateway else self.norm2(x + sampled)

        x = x + self.swish_ffn(x)
        return self.norm3(x.clamp(min=-65504, max=65504))  # keep fp16 finite


class LocationQuality(nn.Module):
    """LQE: a score correction from how peaked the four edge distributions are.

    Per edge: the top-k bin probabilities and their mean (4 * (k + 1) features), through a small MLP to
    one logit that is added to every class.
    """

    def __init__(self, reg_max: int, k: int = 4, hidden_dim: int = 64, act: str = "relu") -> None:
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, 2, act=act)
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, logits: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        """logits (B, Q, classes); corners (B, Q, 4 * (reg_max + 1)) edge-distribution logits."""
        top = corners.unflatten(-1, (4, self.reg_max + 1)).softmax(dim=-1).topk(self.k, dim=-1).values  # (B, Q, 4, k)
        features = torch.cat([top, top.mean(dim=-1, keepdim=True)], dim=-1).flatten(-2)  # (B, Q, 4 * (k + 1))
        return logits + self.reg_conf(features)


class RefinementDecoder(nn.Module):
    """The layer stack with fine-grained distribution refinement (official `TransformerDecoder`).

    `up` and `reg_scale` are the parent's parameters, registered here too as the official model does
    (so both names are in the state dict). Deploy mode keeps the layers up to `eval_idx`, keeps LQE only
    for that layer and stores the bin weights as a precomputed table.
    """

    def __init__(
        self,
        layer: DecoderLayer,
        num_layers: int,
        num_heads: int,
        reg_max: int,
        up: nn.Parameter,
        reg_scale: nn.Parameter,
        eval_idx: int,
        lqe_act: str,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.reg_max = reg_max
        self.eval_idx = eval_idx
        self.up = up
        self.reg_scale = reg_scale
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.lqe_layers = nn.ModuleList(LocationQuality(reg_max, act=lqe_act) for _ in range(num_layers))
        self.deployed = False

    def fuse_for_deploy(self) -> None:
        if self.deployed:
            return
        table = bin_weights(self.up, self.reg_scale, self.reg_max, exact=True)
        self.register_buffer("project", table, persistent=False)  # not in the state dict, as in the official
        last = self.eval_idx
        self.layers = nn.ModuleList(list(self.layers)[: last + 1])
        self.lqe_layers = nn.ModuleList([nn.Identity() for _ in range(last)] + [self.lqe_layers[last]])
        self.deployed = True

    def _edge_offsets(self, corners: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Expected bin value of each edge distribution: (B, Q, 4 * (reg_max + 1)) -> (B, Q, 4)."""
        probs = corners.unflatten(-1, (4, self.reg_max + 1)).softmax(dim=-1)  # (B, Q, 4, reg_max + 1)
        return F.linear(probs, weights)

    def forward(
        self,
        content: torch.Tensor,
        ref_logits: torch.Tensor,
        memory: torch.Tensor,
        shapes: Sequence[tuple[int, int]],
        bbox_heads: nn.ModuleList,
        score_heads: nn.ModuleList,
        query_pos_head: MLP,
        pre_bbox_head: MLP,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """content (B, Q, C), ref_logits (B, Q, 4), memory (B, N, C) -> logits (B, Q, classes), boxes (B, Q, 4)."""
        # per level (B, heads, C / heads, h * w): each head reads its own channel slice
        sizes = [h * w for h, w in shapes]
        values = memory.unflatten(-1, (self.num_heads, -1)).permute(0, 2, 3, 1).split(sizes, dim=-1)
        weights = self.project if self.deployed else bin_weights(self.up, self.reg_scale, self.reg_max)

        def decode(corners: torch.Tensor) -> torch.Tensor:
            return edges_to_boxes(base, self._edge_offsets(corners, weights), self.reg_scale)

        start = torch.sigmoid(ref_logits)  # (B, Q, 4)
        pos = query_pos_head(start).clamp(min=-10, max=10)  # once, from the selected boxes
        x = self.layers[0](content, start, values, shapes, pos)
        # layer 0's coarse box: the base that every layer's edge distributions are decoded against
        base = torch.sigmoid(pre_bbox_head(x) + _inverse_sigmoid(start))
        corners = bbox_heads[0](x)  # (B, Q, 4 * (reg_max + 1))
        for i in range(1, self.eval_idx + 1):
            # each later layer samples around the previous layer's box and adds to its corner logits
            prev = x
            x = self.layers[i](x, decode(corners), values, shapes, pos)
            corners = corners + bbox_heads[i](x + prev)
        logits = self.lqe_layers[self.eval_idx](score_heads[self.eval_idx](x), corners)
        return logits, decode(corners)

    def forward_train(
        self,
        content: torch.Tensor,
        ref_logits: torch.Tensor,
        memory: torch.Tensor,
        shapes: Sequence[tuple[int, int]],
        bbox_heads: nn.ModuleList,
        score_heads: nn.ModuleList,
        query_pos_head: MLP,
        pre_bbox_head: MLP,
        attn_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every layer's outputs, for the losses (the official training forward).

        Returns stacked per-layer `logits` (L, B, Q, classes), `boxes` (L, B, Q, 4), `corners`
        (L, B, Q, 4 * (reg_max + 1)), `refs` (L, B, Q, 4) (the layer-0 base box every layer decodes against),
        and layer 0's `pre_logits` (B, Q, classes) / `pre_boxes` (B, Q, 4). Gradients: each layer samples
        around the previous layer's box detached, its bbox head sees the previous output detached, while the
        corner logits accumulate with gradient (as the official).
        """
        if self.deployed:
            raise RuntimeError("a deployed decoder has dropped its training layers; build a fresh model to train")
        sizes = [h * w for h, w in shapes]
        values = memory.unflatten(-1, (self.num_heads, -1)).permute(0, 2, 3, 1).split(sizes, dim=-1)
        weights = bin_weights(self.up, self.reg_scale, self.reg_max)

        ref = torch.sigmoid(ref_logits)  # (B, Q, 4), no gradient into the query selection
        pos = query_pos_head(ref).clamp(min=-10, max=10)
        # the first layer's output gives the coarse boxes (pre_boxes) that every layer's corner distributions
        # then refine (FDR); each layer adds its corners to the previous layer's, seeing its output detached
        x = layer_input = self.layers[0](content, ref, values, shapes, pos, attn_mask)
        pre_boxes = torch.sigmoid(pre_bbox_head(x) + _inverse_sigmoid(ref))
        pre_logits = score_heads[0](x)
        base = pre_boxes.detach()
        out: dict[str, list[torch.Tensor]] = {"logits": [], "boxes": [], "corners": [], "refs": []}
        corners: torch.Tensor | float = 0.0
        residual: torch.Tensor | float = 0.0
        for i, layer in enumerate(self.layers):
            if i:
                x = layer(layer_input, ref, values, shapes, pos, attn_mask)
            corners = corners + bbox_heads[i](x + residual)
            out["boxes"].append(edges_to_boxes(base, self._edge_offsets(corners, weights), self.reg_scale))
            out["logits"].append(self.lqe_layers[i](score_heads[i](x), corners))
            out["corners"].append(corners)
            out["refs"].append(base)
            ref, residual, layer_input = out["boxes"][-1].detach(), x.detach(), x
        return {**{k: torch.stack(v) for k, v in out.items()}, "pre_logits": pre_logits, "pre_boxes": pre_boxes}


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


class DEIMDecoder(nn.Module):
    """DEIM decoder: encoder maps -> `{"pred_logits": (B, Q, classes), "pred_boxes": (B, Q, 4) cxcywh}`.

    `anchors` (1, N, 4) and `valid_mask` (1, N, 1) are persistent buffers built for `eval_size` as in
    the official constructor; feature maps of any other size get anchors built for them at run time.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        feat_channels: Sequence[int],
        feat_strides: Sequence[int],
        eval_size: tuple[int, int],
        num_points: Sequence[int],
        num_layers: int,
        dim_feedforward: int,
        num_heads: int = 8,
        eval_idx: int = -1,
        reg_max: int = 32,
        reg_scale: int = 4,
        use_gateway: bool = True,
        share_bbox_head: bool = False,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        mlp_act: str = "silu",
        lqe_act: str = "silu",
        anchor_eps: float = 1e-2,
    ) -> None:
        super().__init__()
        if len(feat_channels) != len(feat_strides) or len(num_points) != len(feat_strides):
            raise ValueError(
                f"feat_channels {list(feat_channels)}, feat_strides {list(feat_strides)} and num_points "
                f"{list(num_points)} must have one entry per level"
            )
        if not -num_layers <= eval_idx < num_layers:
            raise ValueError(f"eval_idx {eval_idx} is out of range for {num_layers} decoder layers")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.feat_strides = [int(s) for s in feat_strides]
        self.eval_size = (int(eval_size[0]), int(eval_size[1]))
        self.eval_idx = eval_idx % num_layers
        self.reg_max = reg_max
        self.anchor_eps = anchor_eps
        self.deployed = False

        self.input_proj = nn.ModuleList(self._projection(c, hidden_dim) for c in feat_channels)

        # int64 reg_scale as in the official checkpoints (its YAML value is an integer)
        self.up = nn.Parameter(torch.tensor([0.5]), requires_grad=False)
        self.reg_scale = nn.Parameter(torch.tensor([reg_scale]), requires_grad=False)
        layer = DecoderLayer(hidden_dim, num_heads, dim_feedforward, num_points, use_gateway)
        self.decoder = RefinementDecoder(
            layer, num_layers, num_heads, reg_max, self.up, self.reg_scale, self.eval_idx, lqe_act
        )
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        if num_denoising > 0:  # training only (denoising queries); in the checkpoints
            self.denoising_class_embed = nn.Embedding(num_classes + 1, hidden_dim, padding_idx=num_classes)

        def mlp(in_dim: int, out_dim: int) -> MLP:  # every head MLP has 3 layers, hidden width C
            return MLP(in_dim, hidden_dim, out_dim, num_layers=3, act=mlp_act)

        # query selection heads, then the box/score heads of the layers
        self.enc_score_head = nn.Linear(hidden_dim, num_classes)
        self.enc_bbox_head = mlp(hidden_dim, 4)
        self.query_pos_head = mlp(4, hidden_dim)
        self.pre_bbox_head = mlp(hidden_dim, 4)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, num_classes) for _ in range(num_layers))
        corner_dim = 4 * (reg_max + 1)
        # with share_bbox_head the layers up to eval_idx use one head, listed under each of their indices
        shared = mlp(hidden_dim, corner_dim) if share_bbox_head else None
        self.dec_bbox_head = nn.ModuleList(
            shared if shared is not None and i <= self.eval_idx else mlp(hidden_dim, corner_dim)
            for i in range(num_layers)
        )

        anchors, valid_mask = make_anchors(self._eval_shapes(), eps=anchor_eps)
        self.register_buffer("anchors", anchors)
        self.register_buffer("valid_mask", valid_mask)
        self._init_heads()

    @staticmethod
    def _projection(in_channels: int, hidden_dim: int) -> nn.Module:
        if in_channels == hidden_dim:
            return nn.Identity()
        return nn.Sequential(
            OrderedDict(conv=nn.Conv2d(in_channels, hidden_dim, 1, bias=False), norm=nn.BatchNorm2d(hidden_dim))
        )

    @torch.no_grad()
    def _init_heads(self) -> None:
        prior = _prior_logit(0.01)
        nn.init.constant_(self.enc_score_head.bias, prior)
        for mlp in (self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head):
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        for head in self.dec_score_head:
            nn.init.constant_(head.bias, prior)
        for linear in self.query_pos_head.layers:
            nn.init.xavier_uniform_(linear.weight)
        for proj in self.input_proj:
            if isinstance(proj, nn.Sequential):
                nn.init.xavier_uniform_(proj.conv.weight)
        if hasattr(self, "denoising_class_embed"):
            nn.init.normal_(self.denoising_class_embed.weight[:-1])

    def _eval_shapes(self) -> list[tuple[int, int]]:
        h, w = self.eval_size
        return [(int(h / s), int(w / s)) for s in self.feat_strides]

    def fuse_for_deploy(self) -> None:
        """Drop the score heads other than eval_idx's and the bbox heads past it (official deploy mode)."""
        if self.deployed:
            return
        keep = self.eval_idx
        self.dec_score_head = nn.ModuleList([nn.Identity() for _ in range(keep)] + [self.dec_score_head[keep]])
        self.dec_bbox_head = nn.ModuleList(
            head if i <= keep else nn.Identity() for i, head in enumerate(self.dec_bbox_head)
        )
        self.deployed = True

    def _flatten(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        if len(feats) != len(self.input_proj):
            raise ValueError(f"the decoder takes {len(self.input_proj)} feature maps, got {len(feats)}")
        tokens, shapes = [], []
        for proj, feat in zip(self.input_proj, feats, strict=True):
            feat = proj(feat)  # (B, C, h, w)
            shapes.append((int(feat.shape[2]), int(feat.shape[3])))
            tokens.append(feat.flatten(2).permute(0, 2, 1))  # (B, h*w, C)
        return torch.cat(tokens, dim=1), shapes  # (B, N, C)

    def _anchors_for(self, shapes: list[tuple[int, int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if shapes == self._eval_shapes():
            return self.anchors, self.valid_mask
        # another input size: the official model fails here; build the grid for these maps instead
        anchors, valid = make_anchors(shapes, eps=self.anchor_eps, device=device)
        return anchors.to(self.anchors.dtype), valid

    def forward(
        self, feats: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]] | None = None
    ) -> dict[str, Any]:
        """Eval: `{"pred_logits", "pred_boxes"}`. Training: the official training output (see `forward_train`)."""
        memory, shapes = self._flatten(feats)  # (B, N, C)
        b, n, c = memory.shape
        if n < self.num_queries:
            raise ValueError(
                f"the feature maps {shapes} hold {n} tokens, fewer than the {self.num_queries} queries; "
                "use a larger input size"
            )
        if self.training:
            return self.forward_train(memory, shapes, targets)
        anchors, valid = self._anchors_for(shapes, memory.device)

        # query selection on the valid-masked memory; the layers sample the unmasked memory
        masked = valid.to(memory.dtype) * memory
        enc_logits = self.enc_score_head(masked)  # (B, N, classes)
        _, top = torch.topk(enc_logits.max(-1).values, self.num_queries, dim=-1)  # (B, Q)
        content = masked.gather(1, top.unsqueeze(-1).expand(-1, -1, c))  # (B, Q, C)
        top_anchors = anchors.expand(b, -1, -1).gather(1, top.unsqueeze(-1).expand(-1, -1, 4))  # (B, Q, 4)
        ref_logits = self.enc_bbox_head(content) + top_anchors

        logits, boxes = self.decoder(
            content, ref_logits, memory, shapes,
            self.dec_bbox_head, self.dec_score_head, self.query_pos_head, self.pre_bbox_head,
        )
        return {"pred_logits": logits, "pred_boxes": boxes}

    def forward_train(
        self,
        memory: torch.Tensor,
        shapes: list[tuple[int, int]],
        targets: Sequence[dict[str, torch.Tensor]] | None,
    ) -> dict[str, Any]:
        """The official training output, the structure the DEIM criterion takes.

        `pred_logits`, `pred_boxes`, `pred_corners`, `ref_points` of the last layer, `up`, `reg_scale`;
        `aux_outputs` (the other layers, with the last layer's corners/logits as `teacher_*`),
        `pre_outputs` (layer 0's pre-refinement head), `enc_aux_outputs` (the selected encoder proposals),
        `enc_meta`; with targets and denoising: `dn_outputs`, `dn_pre_outputs`, `dn_meta`.
        targets: per image {"labels": (N,) int64 in [0, classes), "boxes": (N, 4) normalised cxcywh}.
        """
        if self.deployed:
            raise RuntimeError("a deployed model cannot be trained: its decoder was pruned; build a fresh model")
        b, _, c = memory.shape
        # anchors for the maps of this batch (multi-scale training changes them every few iterations)
        anchors, valid = make_anchors(shapes, eps=self.anchor_eps, device=memory.device)
        anchors = anchors.to(memory.dtype)

        masked = valid.to(memory.dtype) * memory
        enc_logits = self.enc_score_head(masked)  # (B, N, classes)
        _, top = torch.topk(enc_logits.max(-1).values, self.num_queries, dim=-1)  # (B, Q)
        top_memory = masked.gather(1, top.unsqueeze(-1).expand(-1, -1, c))  # (B, Q, C)
        top_logits = enc_logits.gather(1, top.unsqueeze(-1).expand(-1, -1, enc_logits.shape[-1]))
        top_anchors = anchors.expand(b, -1, -1).gather(1, top.unsqueeze(-1).expand(-1, -1, 4))
        enc_ref_logits = self.enc_bbox_head(top_memory) + top_anchors  # (B, Q, 4)
        enc_out = {"pred_logits": top_logits, "pred_boxes": torch.sigmoid(enc_ref_logits)}

        # the decoder starts from the proposals without gradient into the selection
        content, ref_logits = top_memory.detach(), enc_ref_logits.detach()
        dn = None
        if targets is not None and hasattr(self, "denoising_class_embed"):
            dn = make_denoising_groups(
                targets, self.num_classes, self.num_queries, self.denoising_class_embed,
                num_denoising=self.num_denoising, label_noise_ratio=self.label_noise_ratio,
                box_noise_scale=self.box_noise_scale,
            )
        attn_mask = None
        if dn is not None:
            content = torch.cat([dn.content, content], dim=1)
            ref_logits = torch.cat([dn.ref_logits, ref_logits], dim=1)
            attn_mask = dn.attn_mask

        out = self.decoder.forward_train(
            content, ref_logits, memory, shapes,
            self.dec_bbox_head, self.dec_score_head, self.query_pos_head, self.pre_bbox_head, attn_mask,
        )
        layers = {k: out[k] for k in ("logits", "boxes", "corners", "refs")}  # (L, B, D + Q, ...)
        pre_logits, pre_boxes = out["pre_logits"], out["pre_boxes"]
        if dn is not None:
            split = dn.meta["dn_num_split"]
            dn_layers = {k: v.split(split, dim=2)[0] for k, v in layers.items()}
            layers = {k: v.split(split, dim=2)[1] for k, v in layers.items()}
            dn_pre_logits, pre_logits = pre_logits.split(split, dim=1)
            dn_pre_boxes, pre_boxes = pre_boxes.split(split, dim=1)

        result: dict[str, Any] = {
            "pred_logits": layers["logits"][-1], "pred_boxes": layers["boxes"][-1],
            "pred_corners": layers["corners"][-1], "ref_points": layers["refs"][-1],
            "up": self.up, "reg_scale": self.reg_scale,
            "aux_outputs": _layer_outputs(layers, last=False),
            "enc_aux_outputs": [enc_out],
            "pre_outputs": {"pred_logits": pre_logits, "pred_boxes": pre_boxes},
            "enc_meta": {"class_agnostic": False},
        }
        if dn is not None:
            result["dn_outputs"] = _layer_outputs(dn_layers, last=True)
            result["dn_pre_outputs"] = {"pred_logits": dn_pre_logits, "pred_boxes": dn_pre_boxes}
            result["dn_meta"] = dn.meta
        return result


def _layer_outputs(layers: dict[str, torch.Tensor], last: bool) -> list[dict[str, torch.Tensor]]:
    """Per-layer output dicts (all layers, or all but the last), each with the last layer as its teacher."""
    count = layers["logits"].shape[0] if last else layers["logits"].shape[0] - 1
    teacher_corners, teacher_logits = layers["corners"][-1], layers["logits"][-1]
    return [
        {"pred_logits": layers["logits"][i], "pred_boxes": layers["boxes"][i], "pred_corners": layers["corners"][i],
         "ref_points": layers["refs"][i], "teacher_corners": teacher_corners, "teacher_logits": teacher_logits}
        for i in range(count)
    ]
