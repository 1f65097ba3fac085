"""The DEIMv2 data-pipeline settings of each size, as one table of frozen dataclasses.

Values are those the official configs resolve to (`configs/base/dataloader.yml` <- `base/deimv2.yml` <-
`configs/deimv2/deimv2_{hgnetv2_atto,femto,pico,n; dinov3_s,m,l,x}_coco.yml`). Data only: the optimiser and
schedule constants (learning rates, flat/no-aug epochs, batch size, EMA) are in `training.recipe`.

Epochs are 0-based indices, as in the official loop (`for epoch in range(start, epoches)`). A window
`(begin, end)` is active for `begin <= epoch < end`. `AugmentRecipe.scaled(epochs=N)` moves every epoch
constant to a run of N epochs in the official proportions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from deimv2_deploy.variants import VARIANT_NAMES, get_variant_info

__all__ = [
    "MosaicSettings",
    "CopyBlendSettings",
    "AugmentRecipe",
    "AUGMENT_RECIPES",
    "get_augment_recipe",
    "multiscale_sizes",
]


@dataclass(frozen=True)
class MosaicSettings:
    """Dense O2O mosaic: four images, each resized so its shorter side is `output_size`, on a 2x2 canvas, then
    one random affine (rotation, translation, scale) of the whole canvas."""

    output_size: int
    rotation_range: float = 10.0  # degrees, uniform in [-r, r]
    translation_range: tuple[float, float] = (0.1, 0.1)  # fraction of the canvas (x, y)
    scaling_range: tuple[float, float] = (0.5, 1.5)
    fill_value: int = 0  # pixels the affine uncovers
    probability: float = 1.0  # the transform's own chance (every config: 1); the policy's mosaic_prob comes first
    max_cached_images: int = 50  # cache mode only (see `training.mosaic`)
    random_pop: bool = True


@dataclass(frozen=True)
class CopyBlendSettings:
    """Batch-level copy-blend: objects of the batch pasted (blended) at random places into other images."""

    area_threshold: float = 100.0  # objects smaller than this many pixels (in the batch image) are not copied
    num_objects: int = 3  # objects pasted into each image
    random_num_objects: bool = False  # draw 1..num_objects instead
    with_expand: bool = True  # copy a margin around the box as well
    expand_ratios: tuple[float, float] = (0.1, 0.25)  # margin, as a fraction of the box side
    blend: bool = True  # blend with the destination (official type 'blend'), else paste over it


@dataclass(frozen=True)
class AugmentRecipe:
    """Everything the training data pipeline of one size needs."""

    size: str
    input_size: tuple[int, int]  # (height, width): the final Resize, and the validation resize
    mean: tuple[float, float, float] | None  # RGB on [0, 1] pixels; None: no normalisation (HGNetv2 sizes)
    std: tuple[float, float, float] | None
    epochs: int  # length of the schedule the epoch constants below belong to (official: epoches)
    # Per-sample ops and their policy
    policy_epochs: tuple[int, int, int]  # (e0, e1, e2): no aug < e0 <= mosaic+aug < e1 <= aug < e2 <= no aug
    mosaic_prob: float  # chance of the mosaic for a sample in [e0, e1); a mosaic sample skips zoom-out and crop
    mosaic: MosaicSettings
    min_size: float  # SanitizeBoundingBoxes: boxes narrower or shorter than this (pixels) are dropped
    photometric_p: float = 0.5  # per distortion (brightness, contrast, saturation, hue, channel order)
    zoom_out_p: float = 0.5
    zoom_out_side_range: tuple[float, float] = (1.0, 4.0)
    zoom_out_fill: int = 0
    iou_crop_p: float = 0.8
    flip_p: float = 0.5
    # Batch ops (BatchImageCollateFunction)
    base_size: int = 640
    base_size_repeat: int | None = None  # None: no multi-scale training
    stop_epoch: int = 0  # multi-scale only for epoch < stop_epoch
    mixup_prob: float = 0.0
    mixup_epochs: tuple[int, int] = (0, 0)
    copyblend_prob: float = 0.0
    copyblend_epochs: tuple[int, int] = (0, 0)
    copyblend: CopyBlendSettings = CopyBlendSettings()

    def __post_init__(self):
        e0, e1, e2 = self.policy_epochs
        if not 0 <= e0 <= e1 <= e2:
            raise ValueError(f"policy_epochs {self.policy_epochs} must be ordered 0 <= e0 <= e1 <= e2")
        for name in ("mosaic_prob", "photometric_p", "zoom_out_p", "iou_crop_p", "flip_p", "mixup_prob",
                     "copyblend_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is not a probability; use a value in [0, 1]")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs}: a schedule needs at least one epoch")
        if self.base_size_repeat is not None and self.base_size_repeat < 0:
            raise ValueError(f"base_size_repeat={self.base_size_repeat} must be >= 0, or None for no multi-scale")

    @property
    def normalize(self) -> bool:
        return self.mean is not None

    @property
    def scales(self) -> tuple[int, ...] | None:
        """Square sizes multi-scale training draws from (None: single scale)."""
        if self.base_size_repeat is None:
            return None
        return multiscale_sizes(self.base_size, self.base_size_repeat)

    def scaled(self, epochs: int) -> AugmentRecipe:
        """The same recipe for a run of `epochs` epochs: every epoch constant in the official proportion
        (rounded), so the stages keep their share of the run and their order."""
        if int(epochs) < 1:
            raise ValueError(f"epochs={epochs}: a run needs at least one epoch")
        epochs = int(epochs)

        def s(e: int) -> int:
            return min(epochs, int(round(e * epochs / self.epochs)))

        e0, e1, e2 = (s(e) for e in self.policy_epochs)
        return dataclasses.replace(
            self,
            epochs=epochs,
            policy_epochs=(e0, max(e0, e1), max(e0, e1, e2)),
            stop_epoch=s(self.stop_epoch),
            mixup_epochs=tuple(s(e) for e in self.mixup_epochs),
            copyblend_epochs=tuple(s(e) for e in self.copyblend_epochs),
        )


def multiscale_sizes(base_size: int, repeat: int) -> tuple[int, ...]:
    """Official multi-scale list: multiples of 32 from ~0.75x up to base_size, `repeat` copies of base_size
    (its weight in the draw), and multiples of 32 from ~1.25x down; e.g. 640 -> 480..608, 640 x repeat, 800..672."""
    low = int(base_size * 0.75 / 32) * 32
    high = int(base_size * 1.25 / 32) * 32
    steps = (base_size - low) // 32
    return (tuple(low + 32 * i for i in range(steps)) + (base_size,) * repeat
            + tuple(high - 32 * i for i in range(steps)))


def _hgnet(size: str, epochs: int, policy: tuple[int, int, int], mosaic_prob: float, mosaic_size: int,
           min_size: float, stop_epoch: int, **batch) -> AugmentRecipe:
    info = get_variant_info(size)
    return AugmentRecipe(size=size, input_size=info.input_size, mean=info.mean, std=info.std, epochs=epochs,
                         policy_epochs=policy, mosaic_prob=mosaic_prob, mosaic=MosaicSettings(mosaic_size),
                         min_size=min_size, base_size=info.input_size[0], stop_epoch=stop_epoch, **batch)


def _dinov3(size: str, epochs: int, policy: tuple[int, int, int], repeat: int) -> AugmentRecipe:
    info = get_variant_info(size)
    e0, e1, e2 = policy
    return AugmentRecipe(size=size, input_size=info.input_size, mean=info.mean, std=info.std, epochs=epochs,
                         policy_epochs=policy, mosaic_prob=0.5, mosaic=MosaicSettings(320), min_size=1.0,
                         base_size=640, base_size_repeat=repeat, stop_epoch=e2, mixup_prob=0.5,
                         mixup_epochs=(e0, e1), copyblend_prob=0.5, copyblend_epochs=(e0, e2))


AUGMENT_RECIPES: dict[str, AugmentRecipe] = {
    r.size: r
    for r in (
        # atto/femto/pico: no mixup, copy-blend or multi-scale (the configs set them off)
        _hgnet("atto", 500, (4, 250, 400), 0.3, 160, 12.0, 468),
        _hgnet("femto", 500, (4, 250, 400), 0.5, 208, 10.0, 468),
        _hgnet("pico", 500, (4, 250, 400), 0.5, 320, 8.0, 468),
        _hgnet("n", 160, (4, 78, 148), 0.5, 320, 1.0, 148, mixup_prob=0.5, mixup_epochs=(4, 78),
               copyblend_prob=0.4, copyblend_epochs=(4, 78)),
        _dinov3("s", 132, (4, 64, 120), 20),
        _dinov3("m", 102, (4, 49, 90), 6),
        _dinov3("l", 68, (4, 34, 60), 3),
        _dinov3("x", 58, (4, 29, 50), 3),
    )
}
assert tuple(AUGMENT_RECIPES) == VARIANT_NAMES  # one row per size, in the project's order


def get_augment_recipe(size: str, epochs: int | None = None) -> AugmentRecipe:
    """The official data recipe of `size` (atto femto pico n s m l x), scaled to `epochs` when given."""
    recipe = AUGMENT_RECIPES[get_variant_info(size).name]
    return recipe if epochs is None else recipe.scaled(epochs)
