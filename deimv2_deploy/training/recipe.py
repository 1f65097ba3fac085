"""The official DEIMv2 COCO optimisation recipe of every size, as one frozen table.

Values come from the official configs (configs/base/{optimizer,dataloader,deimv2}.yml overridden by
configs/deimv2/deimv2_hgnetv2_{atto,femto,pico,n}_coco.yml and deimv2_dinov3_{s,m,l,x}_coco.yml, the ones
whose architectures the model zoo builds): schedule, AdamW groups, EMA, clipping, criterion. The data-pipeline
constants (augmentation policy epochs, mosaic, mixup, copy-blend, multi-scale) are in `training.augment_recipe`.
Epoch fields count epochs of the official COCO run; use `recipe.scaled(epochs=N, iters_per_epoch=K)` for a
shorter run or another dataset: it keeps every proportion of the official schedule.

    recipe = get_recipe("atto").scaled(epochs=60, iters_per_epoch=len(loader))
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = [
    "COCO_TRAIN_IMAGES",
    "ParamGroupRule",
    "TrainRecipe",
    "RECIPES",
    "RECIPE_NAMES",
    "get_recipe",
]

COCO_TRAIN_IMAGES = 118287  # train2017; the official loader drops the last incomplete batch

# Loss weights and matcher costs shared by every size (configs/base/deimv2.yml).
_WEIGHT_DICT = (("loss_mal", 1.0), ("loss_bbox", 5.0), ("loss_giou", 2.0), ("loss_fgl", 0.15), ("loss_ddf", 1.5))


@dataclass(frozen=True)
class ParamGroupRule:
    """One AdamW parameter group: the parameters whose name matches `pattern` (re.search).

    `lr` / `weight_decay` of None mean the optimiser's base value. Parameters no rule matches form a
    last group with the base values, as the official `get_optim_params` does.
    """

    name: str
    pattern: str
    lr: float | None = None
    weight_decay: float | None = None


# The official regexes, verbatim (their quirks included: in `(?!.*norm|bn)` the `bn` branch only tests the
# start of the name, so HGNetv2 `.bn.` parameters of the backbone land in the first group, with weight decay).
def _hgnet_groups(backbone_lr: float, head_no_decay: str) -> tuple[ParamGroupRule, ...]:
    return (
        ParamGroupRule("backbone", r"^(?=.*backbone)(?!.*norm|bn).*$", lr=backbone_lr),
        ParamGroupRule("backbone_norm", r"^(?=.*backbone)(?=.*norm|bn).*$", lr=backbone_lr, weight_decay=0.0),
        ParamGroupRule("head_norm", head_no_decay, weight_decay=0.0),
    )


def _dinov3_groups(backbone_lr: float) -> tuple[ParamGroupRule, ...]:
    return (
        ParamGroupRule("backbone", r"^(?=.*.dinov3)(?!.*(?:norm|bn|bias)).*$", lr=backbone_lr),
        ParamGroupRule("backbone_norm", r"^(?=.*.dinov3)(?=.*(?:norm|bn|bias)).*$", lr=backbone_lr, weight_decay=0.0),
        ParamGroupRule("head_norm", r"^(?=.*(?:sta|encoder|decoder))(?=.*(?:norm|bn|bias)).*$", weight_decay=0.0),
    )


_HEAD_NORM = r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn)).*$"  # atto: biases keep weight decay
_HEAD_NORM_BIAS = r"^(?=.*(?:encoder|decoder))(?=.*(?:norm|bn|bias)).*$"


@dataclass(frozen=True)
class TrainRecipe:
    """Every constant of one size's official training run. Epoch fields are 0-based epoch indices."""

    size: str
    input_size: int
    # schedule (engine/optim/lr_scheduler.py: warm-up, flat, cosine to lr * lr_gamma, constant at the end)
    epochs: int
    flat_epoch: int
    no_aug_epoch: int
    warmup_iter: int
    lr_gamma: float
    # AdamW
    lr: float
    backbone_lr: float
    weight_decay: float
    param_groups: tuple[ParamGroupRule, ...]
    batch_size: int  # total over all GPUs of the official run (scaled() counts the official iterations with it)
    # = epochs - no_aug_epoch: augmentation and multi-scale stop here, and the official loop restarts from its
    # best stage-1 checkpoint (model, EMA, optimiser) with the EMA decay set to ema_restart_decay
    stop_epoch: int
    # criterion
    losses: tuple[str, ...]
    use_uni_set: bool
    matcher_change_epoch: int
    # shared by all sizes
    betas: tuple[float, float] = (0.9, 0.999)
    clip_max_norm: float = 0.1
    ema_decay: float = 0.9999
    ema_warmups: int = 1000
    ema_restart_decay: float = 0.9999
    use_amp: bool = True
    weight_dict: tuple[tuple[str, float], ...] = _WEIGHT_DICT
    mal_gamma: float = 1.5
    reg_max: int = 32
    # Hungarian matching: (class, L1, GIoU) cost weights, the focal (alpha, gamma) of the class cost, and the
    # IoU exponent of the cost used from matcher_change_epoch on
    matcher_costs: tuple[float, float, float] = (2.0, 5.0, 2.0)
    matcher_focal: tuple[float, float] = (0.25, 2.0)
    iou_order_alpha: float = 4.0
    num_denoising: int = 100
    run_batch_size: int | None = None  # set by for_batch(): the batch of this run, when not the official one

    @property
    def iters_per_epoch_coco(self) -> int:
        """Iterations per epoch of the official COCO run (drop_last)."""
        return COCO_TRAIN_IMAGES // self.batch_size

    def scaled(self, epochs: int | None = None, iters_per_epoch: int | None = None) -> TrainRecipe:
        """This recipe stretched to `epochs` epochs of `iters_per_epoch` iterations, official proportions kept.

        Every epoch constant is scaled by epochs / self.epochs (rounded; a stage that ends at or after the last
        epoch stays beyond the end, e.g. n's flat_epoch 7800 = "never decay"). With `iters_per_epoch`, the
        iteration constants follow the total length of the run relative to the official COCO run: the lr
        warm-up, the EMA warm-up and the EMA time constant 1 / (1 - decay) (at least one iteration each).
        """
        new_epochs = self.epochs if epochs is None else int(epochs)
        if new_epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
        f = new_epochs / self.epochs

        def ep(x: int) -> int:
            if x < self.epochs:
                return min(round(x * f), new_epochs)
            if x == self.epochs:
                return new_epochs
            return new_epochs + max(1, round((x - self.epochs) * f))  # past the end stays past the end

        stop = ep(self.stop_epoch)
        no_aug = new_epochs - stop if self.stop_epoch == self.epochs - self.no_aug_epoch else ep(self.no_aug_epoch)
        changes: dict = dict(
            epochs=new_epochs, flat_epoch=ep(self.flat_epoch), no_aug_epoch=no_aug, stop_epoch=stop,
            matcher_change_epoch=ep(self.matcher_change_epoch),
        )
        if iters_per_epoch is not None:
            if int(iters_per_epoch) < 1:
                raise ValueError(f"iters_per_epoch must be a positive integer, got {iters_per_epoch!r}")
            g = new_epochs * int(iters_per_epoch) / (self.epochs * self.iters_per_epoch_coco)

            def decay(d: float) -> float:
                return 1.0 - 1.0 / max(1.0, (1.0 / (1.0 - d)) * g)

            changes.update(
                warmup_iter=max(1, round(self.warmup_iter * g)), ema_warmups=max(1, round(self.ema_warmups * g)),
                ema_decay=decay(self.ema_decay), ema_restart_decay=decay(self.ema_restart_decay),
            )
        return dataclasses.replace(self, **changes)

    def for_batch(self, batch: int, lr: float | None = None, rule: str = "sqrt") -> TrainRecipe:
        """This recipe for a run at batch size `batch`: every learning rate (base, backbone, each group) scaled
        by one factor, lr / self.lr when `lr` is given, else by the batch ratio under `rule`: "sqrt" (the
        square-root rule for Adam-type optimisers; default) or "linear" (batch / official batch)."""
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive integer, got {batch!r}")
        if lr is not None:
            if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
                raise ValueError(f"lr must be a positive number, got {lr!r}")
            f = float(lr) / self.lr
        elif rule == "sqrt":
            f = math.sqrt(batch / self.batch_size)
        elif rule == "linear":
            f = batch / self.batch_size
        else:
            raise ValueError(f"unknown lr scaling rule {rule!r}: use 'sqrt' or 'linear'")
        groups = tuple(dataclasses.replace(g, lr=None if g.lr is None else g.lr * f) for g in self.param_groups)
        return dataclasses.replace(self, lr=self.lr * f, backbone_lr=self.backbone_lr * f, param_groups=groups,
                                   run_batch_size=batch)

    def as_dict(self) -> dict:
        """JSON-friendly view (for logs and checkpoints)."""
        out = dataclasses.asdict(self)
        out["weight_dict"] = dict(self.weight_dict)
        return out


def _lite(size: str, *, input_size: int, lr: float, backbone_lr: float, head_pattern: str) -> TrainRecipe:
    """atto, femto, pico: LiteEncoder, 500 epochs at batch 128, mal + boxes only, no union set."""
    return TrainRecipe(
        size=size, input_size=input_size, epochs=500, flat_epoch=250, no_aug_epoch=32, warmup_iter=4000,
        lr_gamma=0.5, lr=lr, backbone_lr=backbone_lr, weight_decay=0.0001,
        param_groups=_hgnet_groups(backbone_lr, head_pattern), batch_size=128, stop_epoch=468,
        losses=("mal", "boxes"), use_uni_set=False, matcher_change_epoch=450,
    )


def _vit(size: str, *, epochs: int, flat: int, no_aug: int, backbone_lr: float, weight_decay: float,
         matcher_change_epoch: int) -> TrainRecipe:
    """s, m, l, x: DINOv3 / ViT-Tiny backbones with STA, batch 32, mal + boxes + local on the union set."""
    return TrainRecipe(
        size=size, input_size=640, epochs=epochs, flat_epoch=flat, no_aug_epoch=no_aug, warmup_iter=2000,
        lr_gamma=0.5, lr=0.0005, backbone_lr=backbone_lr, weight_decay=weight_decay,
        param_groups=_dinov3_groups(backbone_lr), batch_size=32, stop_epoch=epochs - no_aug,
        losses=("mal", "boxes", "local"), use_uni_set=True, matcher_change_epoch=matcher_change_epoch,
    )


RECIPES: dict[str, TrainRecipe] = {
    "atto": _lite("atto", input_size=320, lr=0.002, backbone_lr=0.001, head_pattern=_HEAD_NORM),
    "femto": _lite("femto", input_size=416, lr=0.0016, backbone_lr=0.0008, head_pattern=_HEAD_NORM_BIAS),
    "pico": _lite("pico", input_size=640, lr=0.0016, backbone_lr=0.0008, head_pattern=_HEAD_NORM_BIAS),
    "n": TrainRecipe(
        size="n", input_size=640, epochs=160, flat_epoch=7800, no_aug_epoch=12, warmup_iter=2000, lr_gamma=1.0,
        lr=0.0008, backbone_lr=0.0004, weight_decay=0.0001, param_groups=_hgnet_groups(0.0004, _HEAD_NORM_BIAS),
        batch_size=32, stop_epoch=148, losses=("mal", "boxes", "local"), use_uni_set=True, matcher_change_epoch=136,
    ),
    "s": _vit("s", epochs=132, flat=64, no_aug=12, backbone_lr=0.000025, weight_decay=0.0001, matcher_change_epoch=100),
    "m": _vit("m", epochs=102, flat=49, no_aug=12, backbone_lr=0.000025, weight_decay=0.0001, matcher_change_epoch=80),
    "l": _vit("l", epochs=68, flat=34, no_aug=8, backbone_lr=0.0000125, weight_decay=0.000125, matcher_change_epoch=50),
    "x": _vit("x", epochs=58, flat=29, no_aug=8, backbone_lr=0.00001, weight_decay=0.000125, matcher_change_epoch=45),
}
RECIPE_NAMES = tuple(RECIPES)


def get_recipe(size: str) -> TrainRecipe:
    """The official recipe of `size` (atto femto pico n s m l x, case-insensitive)."""
    key = str(size).strip().lower()
    if key not in RECIPES:
        raise ValueError(f"unknown DEIMv2 size {size!r}: choose one of {', '.join(RECIPE_NAMES)}")
    return RECIPES[key]


def _check_table() -> None:
    # Cheap invariants of the table, so an edit that breaks one fails at import, not mid-training.
    for r in RECIPES.values():
        if r.epochs - r.no_aug_epoch != r.stop_epoch:
            raise RuntimeError(f"recipe {r.size}: stop_epoch {r.stop_epoch} != epochs - no_aug_epoch")


_check_table()
