"""The DEIM training criterion of DEIMv2: MAL, L1 + GIoU, FGL + DDF, on every decoder output.

    criterion = build_criterion("n", num_classes=80)
    losses = criterion(outputs, targets, epoch=epoch)      # {"loss_mal": ..., "loss_bbox_aux_0": ..., ...}
    sum(losses.values()).backward()

`outputs` is the official training-mode output of the model: the last decoder layer (`pred_logits` (B, Q, C),
`pred_boxes` (B, Q, 4) normalised cxcywh, `pred_corners` (B, Q, 4 * (reg_max + 1)), `ref_points` (B, Q, 4),
`up`, `reg_scale`) plus `aux_outputs` (layers 0 .. L-2, with `teacher_corners` / `teacher_logits` = the last
layer's), `pre_outputs` (layer 0 before refinement), `enc_aux_outputs` + `enc_meta` (encoder proposals) and the
denoising groups `dn_outputs`, `dn_pre_outputs`, `dn_meta`. `targets` is one dict per image with `boxes` (N, 4)
normalised cxcywh and `labels` (N,) int64; images without objects are fine.

Terms (each multiplied by its weight; suffix "" for the last layer, _aux_i, _pre, _enc_i, _dn_i, _dn_pre):
- loss_mal   matchability-aware loss: BCE towards IoU**gamma at the matched class, negatives weighted p**gamma;
             normalised by the number of targets in the batch (times Q / Q: mean over queries, times Q).
- loss_bbox, loss_giou   L1 and 1 - GIoU of matched boxes / number of targets.
- loss_fgl   fine-grained localisation: each edge's distribution vs the two bins around the true edge offset
             (relative to the layer's reference box), weighted by the box IoU.
- loss_ddf   decoupled distillation: KL(last layer || this layer) of the edge distributions at temperature 5,
             weighted by the teacher's confidence (matched queries: the IoU), matched and unmatched queries
             balanced by sqrt of their counts.
Matching: Hungarian per output (see matcher.py). With `use_uni_set`, the box and local terms of every non-dn
output use the union of all these matchings (per query the most frequent target; normalised by its size).
Denoising outputs are matched to their source target by construction and normalised by targets * groups.
Teacher tensors, IoU weights, reference points and the FGL bin targets carry no gradient, as in the official code.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deimv2_deploy.models.decoder import bin_weights
from deimv2_deploy.training.box_ops import cxcywh_to_xyxy, paired_giou, paired_iou
from deimv2_deploy.training.matcher import HungarianMatcher, Matching
from deimv2_deploy.training.recipe import TrainRecipe, get_recipe

__all__ = ["DEIMCriterion", "build_criterion", "edge_bin_targets", "union_matching"]

_LOSS_KINDS = ("mal", "boxes", "local")
_DDF_TEMPERATURE = 5.0


@dataclass(frozen=True)
class _Pairs:
    """Matched (image, query, target) triples of one output, flattened over the batch; `target` indexes the
    batch's concatenated targets. `key` identifies the matching (FGL targets are cached per matching)."""

    batch: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    key: str


def union_matching(stages: Sequence[Sequence[Matching]]) -> list[Matching]:
    """Per image, the union of several matchings: each query keeps the target it was matched to most often;
    pairs ordered by count, most frequent first. Equal counts are ordered as the official code orders them (below):
    by (query, target) when few pairs share a count, so the smaller target index wins."""
    result: list[Matching] = []
    for per_stage in zip(*stages, strict=True):
        rows = torch.cat([m[0] for m in per_stage])
        cols = torch.cat([m[1] for m in per_stage])
        if rows.numel() == 0:
            result.append((rows.clone(), cols.clone()))
            continue
        width = int(cols.max()) + 1
        keys, counts = torch.unique(rows * width + cols, return_counts=True)  # sorted by (query, target)
        # most frequent first. Ties keep the (query, target) order for short lists; longer ones come in the order of
        # torch's (unstable) CPU sort, which is what the official code uses: the same call on the same counts
        order = torch.argsort(counts, descending=True)
        keys = keys[order]
        q, t = keys // width, keys % width
        uniq, inverse = torch.unique(q, return_inverse=True)
        first = torch.full((len(uniq),), len(q), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(len(q)), reduce="amin")  # each query's best pair
        keep = torch.sort(first).values
        result.append((q[keep], t[keep]))
    return result


@torch.no_grad()
def edge_bin_targets(ref_points: torch.Tensor, target_xyxy: torch.Tensor, reg_max: int, reg_scale: torch.Tensor,
                     up: torch.Tensor, eps: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FGL targets of N matched queries: for each of the 4 edges (l, t, r, b), flattened to (4N,),
    the left bin (as float, in [0, reg_max - eps]) and the interpolation weights of the right and left bins.

    The true edge offset, in units of the reference size / reg_scale and relative to the reference edge, is
    located in the non-uniform bin values W(n); offsets below the first value go fully to bin 0, beyond the
    last fully to bin reg_max.
    """
    reg_scale = reg_scale.abs()
    half = 0.5 * reg_scale
    unit_w = ref_points[:, 2] / reg_scale + 1e-16
    unit_h = ref_points[:, 3] / reg_scale + 1e-16
    offsets = torch.stack([
        (ref_points[:, 0] - target_xyxy[:, 0]) / unit_w - half,
        (ref_points[:, 1] - target_xyxy[:, 1]) / unit_h - half,
        (target_xyxy[:, 2] - ref_points[:, 0]) / unit_w - half,
        (target_xyxy[:, 3] - ref_points[:, 1]) / unit_h - half,
    ], dim=-1).reshape(-1)  # (4N,)
    values = bin_weights(up, reg_scale, reg_max)  # (reg_max + 1,), increasing
    left = ((values.unsqueeze(0) - offsets.unsqueeze(1)) <= 0).sum(dim=1) - 1  # last bin value <= offset
    inside = (left >= 0) & (left < reg_max)
    safe = left.clamp(0, reg_max - 1)
    dist_left = (offsets - values[safe]).abs()
    dist_right = (values[safe + 1] - offsets).abs()
    w_right_in = dist_left / (dist_left + dist_right)
    below = left < 0
    w_right = torch.where(inside, w_right_in, torch.where(below, 0.0, 1.0).to(offsets.dtype))
    w_left = torch.where(inside, 1.0 - w_right_in, torch.where(below, 1.0, 0.0).to(offsets.dtype))
    bins = torch.where(inside, left.to(offsets.dtype),
                       torch.where(below, 0.0, reg_max - 0.1).to(offsets.dtype))
    return bins.clamp(min=0, max=reg_max - eps), w_right, w_left


def _power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """x ** exponent, with cheap exact-enough forms for the official exponents (1.5 and 2: ~1 ulp)."""
    if exponent == 1.5:
        return x.sqrt().mul_(x)
    if exponent == 2.0:
        return x * x
    return x.pow(exponent)


def _global_count(n: float, device: torch.device) -> float:
    """Count averaged over distributed workers (when running distributed), at least 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.as_tensor([n], dtype=torch.float32, device=device)
        torch.distributed.all_reduce(t)
        n = t.item() / torch.distributed.get_world_size()
    return max(float(n), 1.0)


class DEIMCriterion(nn.Module):
    """DEIM loss of one training step; see the module docstring. No parameters, no state across calls."""

    def __init__(
        self,
        matcher: HungarianMatcher,
        weight_dict: Mapping[str, float],
        losses: Sequence[str],
        num_classes: int = 80,
        gamma: float = 1.5,
        mal_alpha: float | None = None,
        reg_max: int = 32,
        use_uni_set: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        unknown = [k for k in losses if k not in _LOSS_KINDS]
        if unknown:
            raise ValueError(f"unknown loss {unknown[0]!r}: choose from {', '.join(_LOSS_KINDS)}")
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.num_classes = num_classes
        self.gamma = gamma
        self.mal_alpha = mal_alpha
        self.reg_max = reg_max
        self.use_uni_set = use_uni_set

    def extra_repr(self) -> str:
        return (f"losses={list(self.losses)}, num_classes={self.num_classes}, use_uni_set={self.use_uni_set}, "
                f"matcher_change_epoch={self.matcher.matcher_change_epoch}")

    # ---------------------------------------------------------------------------------------------- checks

    def _check(self, outputs: Mapping, targets: Sequence[Mapping[str, torch.Tensor]]) -> None:
        for key in ("pred_logits", "pred_boxes"):
            if key not in outputs:
                raise ValueError(f"criterion: outputs lack {key!r}; pass the model's training-mode output dict")
        logits = outputs["pred_logits"]
        if logits.dim() != 3 or logits.shape[-1] != self.num_classes:
            raise ValueError(f"criterion built for num_classes={self.num_classes} got pred_logits of shape "
                             f"{tuple(logits.shape)}; build the model and the criterion with the same num_classes")
        if len(targets) != logits.shape[0]:
            raise ValueError(f"criterion: {len(targets)} target dicts for a batch of {logits.shape[0]} images")
        for i, t in enumerate(targets):
            boxes, labels = t.get("boxes"), t.get("labels")
            if boxes is None or labels is None:
                raise ValueError(f"criterion: target {i} needs 'boxes' (N, 4) and 'labels' (N,)")
            if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"criterion: target {i} has boxes {tuple(boxes.shape)} and labels "
                                 f"{tuple(labels.shape)}; expected (N, 4) and (N,)")
        labels = torch.cat([t["labels"].reshape(-1) for t in targets])
        if labels.numel():
            if labels.is_floating_point():
                raise ValueError("criterion: target labels must be integer class indices")
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"criterion: target label {lo if lo < 0 else hi} is outside 0..{self.num_classes - 1}"
                                 f"; map the dataset's categories to contiguous indices first")
        if "local" in self.losses:
            missing = [k for k in ("pred_corners", "ref_points", "up", "reg_scale") if k not in outputs]
            if missing:
                raise ValueError(f"criterion with 'local' losses needs outputs[{missing[0]!r}] (FGL/DDF); "
                                 f"run the model in training mode")
            width = outputs["pred_corners"].shape[-1]
            if width != 4 * (self.reg_max + 1):
                raise ValueError(f"pred_corners has {width} values per query, expected 4 * (reg_max + 1) = "
                                 f"{4 * (self.reg_max + 1)}")

    # ---------------------------------------------------------------------------------------------- matching

    @staticmethod
    def _enc_targets(outputs: Mapping, targets: Sequence[Mapping[str, torch.Tensor]]) -> tuple[list, bool]:
        agnostic = bool(outputs.get("enc_meta", {}).get("class_agnostic", False))
        if not agnostic:
            return list(targets), False
        return [{"boxes": t["boxes"], "labels": torch.zeros_like(t["labels"])} for t in targets], True

    def matchings(self, outputs: Mapping, targets: Sequence[Mapping[str, torch.Tensor]], epoch: int = 0,
                  with_union: bool = True) -> OrderedDict[str, list[Matching]]:
        """Every matching the loss uses, per stage ('main', 'aux_i', 'pre', 'enc_i', 'uni_set', 'dn'):
        a (query indices, target indices) pair per image, on the CPU."""
        stages: OrderedDict[str, list[Matching]] = OrderedDict()
        names, outs = ["main"], [outputs]
        for i, aux in enumerate(outputs.get("aux_outputs", ())):
            names.append(f"aux_{i}")
            outs.append(aux)
        if "pre_outputs" in outputs:
            names.append("pre")
            outs.append(outputs["pre_outputs"])
        enc_targets, agnostic = self._enc_targets(outputs, targets)
        enc_outs = list(outputs.get("enc_aux_outputs", ()))
        if agnostic:
            found = (self.matcher.match_many(outs, targets, epoch)
                     + self.matcher.match_many(enc_outs, enc_targets, epoch))
        else:
            found = self.matcher.match_many(outs + enc_outs, targets, epoch)
        names += [f"enc_{i}" for i in range(len(enc_outs))]
        stages.update(zip(names, found, strict=True))
        if with_union:
            stages["uni_set"] = union_matching(list(stages.values()))
        if "dn_outputs" in outputs and "dn_meta" in outputs:
            stages["dn"] = self._dn_matching(outputs["dn_meta"], targets)
        return stages

    @staticmethod
    def _dn_matching(dn_meta: Mapping, targets: Sequence[Mapping[str, torch.Tensor]]) -> list[Matching]:
        """Denoising query i of group g reconstructs target i: its own matching, by construction."""
        groups = int(dn_meta["dn_num_group"])
        result = []
        for b, t in enumerate(targets):
            n = len(t["labels"])
            if n == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                result.append((empty, empty))
                continue
            queries = torch.as_tensor(dn_meta["dn_positive_idx"][b]).to("cpu", torch.int64)
            if len(queries) != n * groups:
                raise ValueError(f"dn_meta of image {b}: {len(queries)} positive queries for {n} targets x "
                                 f"{groups} groups; the denoising groups were built for other targets")
            result.append((queries, torch.arange(n, dtype=torch.int64).repeat(groups)))
        return result

    @staticmethod
    def _pairs(matching: list[Matching], offsets: list[int], device: torch.device, key: str) -> _Pairs:
        batch = torch.cat([torch.full_like(q, b) for b, (q, _) in enumerate(matching)])
        query = torch.cat([q for q, _ in matching])
        target = torch.cat([t + offsets[b] for b, (_, t) in enumerate(matching)])
        return _Pairs(batch.to(device), query.to(device), target.to(device), key)

    # ---------------------------------------------------------------------------------------------- terms

    def _loss_mal(self, out: Mapping, pairs: _Pairs, norm: float, labels: torch.Tensor, boxes: torch.Tensor,
                  num_classes: int) -> dict[str, torch.Tensor]:
        logits = out["pred_logits"].float()  # (B, Q, C)
        B, Q, C = logits.shape
        if C != num_classes:
            raise ValueError(f"an output has {C} classes, the criterion {num_classes}")
        with torch.no_grad():
            src = out["pred_boxes"][pairs.batch, pairs.query].float()
            iou = paired_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(boxes[pairs.target]))[0]  # (N,)
            where = (pairs.batch, pairs.query, labels[pairs.target])  # the matched class of each matched query
            # negatives: weight confidence**gamma, target 0; positives: weight 1, target IoU**gamma
            weight = _power(logits.sigmoid(), self.gamma)  # (B, Q, C)
            if self.mal_alpha is not None:
                weight.mul_(self.mal_alpha)
            weight[where] = 1.0
            soft = torch.zeros_like(logits)
            soft[where] = iou.to(logits.dtype).pow(self.gamma)
        loss = F.binary_cross_entropy_with_logits(logits, soft, weight=weight, reduction="none")
        return {"loss_mal": loss.mean(1).sum() * Q / norm}

    @staticmethod
    def _loss_boxes(out: Mapping, pairs: _Pairs, norm: float, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        src = out["pred_boxes"][pairs.batch, pairs.query].float()  # (N, 4)
        tgt = boxes[pairs.target]
        l1 = F.l1_loss(src, tgt, reduction="none").sum() / norm
        giou = (1 - paired_giou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt))).sum() / norm
        return {"loss_bbox": l1, "loss_giou": giou}

    def _loss_local(self, out: Mapping, pairs: _Pairs, norm: float, boxes: torch.Tensor, geometry: Mapping,
                    cache: dict, is_dn: bool) -> dict[str, torch.Tensor]:
        if "pred_corners" not in out:
            return {}
        bins = self.reg_max + 1
        tgt = boxes[pairs.target]
        corners = out["pred_corners"].float()
        matched = corners[pairs.batch, pairs.query].reshape(-1, bins)  # (4N, bins), edges l t r b per query
        group = "dn" if is_dn else "det"
        cached = cache.get(group)
        if cached is None or cached[0] != pairs.key:
            # once per matching: every layer of a group shares the first evaluated layer's reference points
            ref = out["ref_points"][pairs.batch, pairs.query].detach().float()
            cached = (pairs.key, edge_bin_targets(ref, cxcywh_to_xyxy(tgt), self.reg_max, geometry["reg_scale"],
                                                  geometry["up"]))
            cache[group] = cached
        left, w_right, w_left = cached[1]
        with torch.no_grad():
            src = out["pred_boxes"][pairs.batch, pairs.query].float()
            iou = paired_iou(cxcywh_to_xyxy(src), cxcywh_to_xyxy(tgt))[0]  # (N,)
        log_p = F.log_softmax(matched, dim=-1)
        left_i = left.long()
        ce_left = -log_p.gather(1, left_i.unsqueeze(1)).squeeze(1)
        ce_right = -log_p.gather(1, (left_i + 1).unsqueeze(1)).squeeze(1)
        fgl = (ce_left * w_left + ce_right * w_right) * iou.repeat_interleave(4)
        result = {"loss_fgl": fgl.sum() / norm}

        teacher = out.get("teacher_corners")
        if teacher is None or teacher is out["pred_corners"] or torch.equal(teacher, out["pred_corners"]):
            return result  # the last layer is its own teacher: no distillation term
        B, Q = corners.shape[:2]
        with torch.no_grad():
            # the teacher (the last layer) is shared by every layer of a group: its softmax and confidence once
            if cache.get(("teacher", group), (None,))[0] is not teacher:
                target = F.softmax(teacher.detach().float().reshape(-1, bins) / _DDF_TEMPERATURE, dim=1)
                cache[("teacher", group)] = (
                    teacher, target, torch.xlogy(target, target),
                    out["teacher_logits"].detach().float().sigmoid().amax(dim=-1),  # (B, Q)
                )
            _, target, target_log_target, confidence = cache[("teacher", group)]
            confidence = confidence.clone()
            confidence[pairs.batch, pairs.query] = iou.to(confidence.dtype)
            weight = confidence.unsqueeze(-1).expand(B, Q, 4).reshape(-1)  # (B*Q*4,)
            mask = torch.zeros((B, Q), dtype=torch.bool, device=corners.device)
            mask[pairs.batch, pairs.query] = True
            mask = mask.unsqueeze(-1).expand(B, Q, 4).reshape(-1)
        student = F.log_softmax(corners.reshape(-1, bins) / _DDF_TEMPERATURE, dim=1)
        kl = (target_log_target - target * student).sum(-1)  # KL(teacher || student) per edge, (B*Q*4,)
        per_edge = weight * (_DDF_TEMPERATURE**2) * kl
        if not is_dn or cache.get("balance") is None:
            # set by each non-dn layer (the last one wins); denoising layers reuse it, as the official code does
            scale = 8 / B  # per-GPU batch size must not change the balance
            cache["balance"] = ((mask.sum() * scale) ** 0.5, ((~mask).sum() * scale) ** 0.5)
        num_pos, num_neg = cache["balance"]
        pos = per_edge[mask].mean() if bool(mask.any()) else per_edge.new_zeros(())
        neg = per_edge[~mask].mean() if bool((~mask).any()) else per_edge.new_zeros(())
        result["loss_ddf"] = (pos * num_pos + neg * num_neg) / (num_pos + num_neg)
        return result

    # ---------------------------------------------------------------------------------------------- forward

    def forward(self, outputs: Mapping, targets: Sequence[Mapping[str, torch.Tensor]], epoch: int = 0,
                **_metas) -> dict[str, torch.Tensor]:
        """Every weighted loss term of one batch (sum them for the total). `epoch` selects the matching cost;
        the official loop's step / global_step / epoch_step keywords are accepted and ignored."""
        self._check(outputs, targets)
        device = outputs["pred_logits"].device
        dtype = torch.promote_types(outputs["pred_boxes"].dtype, torch.float32)
        sizes = [len(t["labels"]) for t in targets]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        boxes = torch.cat([t["boxes"].reshape(-1, 4) for t in targets]).to(device=device, dtype=dtype)
        labels = torch.cat([t["labels"].reshape(-1) for t in targets]).to(device=device, dtype=torch.int64)
        agnostic = self._enc_targets(outputs, targets)[1]
        enc_labels = torch.zeros_like(labels) if agnostic else labels

        stages = self.matchings(outputs, targets, epoch, with_union=self.use_uni_set)
        pairs = {k: self._pairs(v, offsets, device, k) for k, v in stages.items()}
        num_boxes = _global_count(sum(sizes), device)
        uni = pairs.get("uni_set")
        num_uni = _global_count(float(len(uni.query)), device) if uni is not None else num_boxes

        geometry = {}
        if "local" in self.losses:
            geometry = {k: torch.as_tensor(outputs[k], device=device).reshape(-1) for k in ("up", "reg_scale")}
        cache: dict = {}
        losses: dict[str, torch.Tensor] = {}

        def add(terms: dict[str, torch.Tensor], suffix: str) -> None:
            for k, v in terms.items():
                if k in self.weight_dict:
                    losses[k + suffix] = v * self.weight_dict[k]

        def run(out: Mapping, suffix: str, own: str, uni_kinds: tuple[str, ...], is_dn: bool = False,
                n_cls: int = self.num_classes, lab: torch.Tensor = labels) -> None:
            for kind in self.losses:
                shared = self.use_uni_set and kind in uni_kinds
                p = uni if shared else pairs[own]
                norm = num_uni if shared else num_boxes
                if is_dn:
                    norm = num_boxes * int(outputs["dn_meta"]["dn_num_group"])
                if kind == "mal":
                    add(self._loss_mal(out, p, norm, lab, boxes, n_cls), suffix)
                elif kind == "boxes":
                    add(self._loss_boxes(out, p, norm, boxes), suffix)
                else:
                    add(self._loss_local(out, p, norm, boxes, geometry, cache, is_dn), suffix)

        run(outputs, "", "main", ("boxes", "local"))
        for i, aux in enumerate(outputs.get("aux_outputs", ())):
            run(aux, f"_aux_{i}", f"aux_{i}", ("boxes", "local"))
        if "pre_outputs" in outputs:
            run(outputs["pre_outputs"], "_pre", "pre", ("boxes", "local"))
        for i, enc in enumerate(outputs.get("enc_aux_outputs", ())):
            run(enc, f"_enc_{i}", f"enc_{i}", ("boxes",), n_cls=1 if agnostic else self.num_classes, lab=enc_labels)
        if "dn" in pairs:
            for i, dn in enumerate(outputs["dn_outputs"]):
                run(dn, f"_dn_{i}", "dn", (), is_dn=True)
            if "dn_pre_outputs" in outputs:
                run(outputs["dn_pre_outputs"], "_dn_pre", "dn", (), is_dn=True)
        return {k: torch.nan_to_num(v, nan=0.0) for k, v in losses.items()}


def build_criterion(size: str, num_classes: int = 80, *, recipe: TrainRecipe | None = None) -> DEIMCriterion:
    """The official criterion of `size` (losses, union-set matching, matcher change epoch from its recipe).

    Pass `recipe` (e.g. `get_recipe(size).scaled(epochs=N)`) to move the matcher change epoch with a shorter run.
    """
    official = get_recipe(size)
    r = official if recipe is None else recipe
    if r.size != official.size:
        raise ValueError(f"build_criterion({size!r}) got the recipe of size {r.size!r}; pass the same size")
    costs = dict(zip(("cost_class", "cost_bbox", "cost_giou"), r.matcher_costs, strict=True))
    focal = dict(zip(("alpha", "gamma"), r.matcher_focal, strict=True))
    matcher = HungarianMatcher(**costs, **focal, change_matcher=True, iou_order_alpha=r.iou_order_alpha,
                               matcher_change_epoch=r.matcher_change_epoch)
    return DEIMCriterion(matcher, dict(r.weight_dict), r.losses, num_classes=num_classes, gamma=r.mal_gamma,
                         reg_max=r.reg_max, use_uni_set=r.use_uni_set)

