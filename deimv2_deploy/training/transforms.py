"""Per-sample training transforms of DEIMv2 in numpy + OpenCV, and the epoch policy that schedules them.

A sample is an RGB uint8 image (H, W, 3) and a target {"boxes": float32 (N, 4) xyxy in pixels, "labels": int64
(N,)}. Every transform is `op(image, target, rng) -> (image, target)`: it draws all its randomness from the
`numpy.random.Generator` it is given (so a sample depends only on its seed) and never writes into its inputs
(an op that does nothing returns them as they are). Behaviour follows the torchvision v2 transforms the official
pipeline uses (RandomPhotometricDistort, RandomZoomOut, RandomIoUCrop, SanitizeBoundingBoxes,
RandomHorizontalFlip, Resize), applied to PIL images there: colour maths as PIL's, resizing close to PIL's
bilinear with antialias. Geometric ops clamp boxes to the new canvas, as torchvision does.

`TrainTransforms` is the official `Compose` with its 'stop_epoch' policy; `EvalTransforms` is resize only.
Both end in `to_model_input`: float32 CHW on [0, 1] (normalised for the DINOv3 sizes) and boxes as cxcywh
normalised by the image size, the format the criterion takes. No torch here: the dataset makes tensors.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from deimv2_deploy.preprocess import resize_like_pil

from .augment_recipe import AugmentRecipe

__all__ = [
    "Target",
    "SampleTransform",
    "RandomPhotometricDistort",
    "RandomZoomOut",
    "RandomIoUCrop",
    "SanitizeBoundingBoxes",
    "RandomHorizontalFlip",
    "Resize",
    "AugmentPolicy",
    "TrainTransforms",
    "EvalTransforms",
    "make_target",
    "with_boxes",
    "clamp_boxes",
    "to_model_input",
    "xyxy_to_cxcywh_normalized",
]

Target = dict[str, np.ndarray]  # {"boxes": float32 (N, 4) xyxy pixels, "labels": int64 (N,)}


class SampleTransform(Protocol):
    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[np.ndarray, Target]:
        ...


def make_target(boxes: np.ndarray | Sequence, labels: np.ndarray | Sequence) -> Target:
    """A target with the canonical dtypes and shapes: boxes float32 (N, 4), labels int64 (N,)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels: give one label per box")
    return {"boxes": boxes, "labels": labels}


def with_boxes(target: Target, boxes: np.ndarray, keep: np.ndarray | None = None) -> Target:
    """A new target with `boxes` (already filtered by `keep`, if given) and the matching labels."""
    labels = target["labels"] if keep is None else target["labels"][keep]
    return {"boxes": boxes.astype(np.float32, copy=False), "labels": labels}


def clamp_boxes(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """Boxes (N, 4) xyxy clamped to the canvas [0, width] x [0, height] (a new array)."""
    out = np.empty_like(boxes, dtype=np.float32)
    np.clip(boxes[:, 0::2], 0.0, width, out=out[:, 0::2])
    np.clip(boxes[:, 1::2], 0.0, height, out=out[:, 1::2])
    return out


# ---------------------------------------------------------------------------------------------------------
# Photometric
# ---------------------------------------------------------------------------------------------------------


def _lut(table: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(table), 0, 255).astype(np.uint8)


_RAMP = np.arange(256, dtype=np.float32)


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with black (PIL ImageEnhance.Brightness)."""
    return cv2.LUT(image, _lut(_RAMP * factor))


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level of the image (PIL ImageEnhance.Contrast: mean of the L image, rounded)."""
    mean = int(cv2.mean(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))[0] + 0.5)
    return cv2.LUT(image, _lut(mean + factor * (_RAMP - mean)))


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey version of the image (PIL ImageEnhance.Color)."""
    gray = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(image, factor, gray, 1.0 - factor, 0.0)


def adjust_hue(image: np.ndarray, factor: float) -> np.ndarray:
    """Rotate the hue by `factor` turns (in [-0.5, 0.5]) on the 8-bit HSV wheel, wrapping, as PIL HSV does."""
    shift = int(factor * 255)  # truncation, as torchvision's np.int8 cast
    if shift == 0:
        return image
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV_FULL)  # H on 0..255, like PIL's HSV
    hsv[..., 0] = ((np.arange(256) + shift) % 256).astype(np.uint8)[hsv[..., 0]]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


class RandomPhotometricDistort:
    """SSD-style colour distortion: each of brightness, contrast, saturation, hue and a channel shuffle applied
    with probability `p`, contrast either before saturation/hue or after them (even odds). Boxes unchanged."""

    def __init__(self, brightness: tuple[float, float] = (0.875, 1.125), contrast: tuple[float, float] = (0.5, 1.5),
                 saturation: tuple[float, float] = (0.5, 1.5), hue: tuple[float, float] = (-0.05, 0.05),
                 p: float = 0.5):
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.p = float(p)

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[np.ndarray, Target]:
        factors = [rng.uniform(*r) if rng.random() < self.p else None
                   for r in (self.brightness, self.contrast, self.saturation, self.hue)]
        b, c, s, h = factors
        contrast_before = rng.random() < 0.5
        permutation = rng.permutation(3) if rng.random() < self.p else None
        if b is not None:
            image = adjust_brightness(image, b)
        if c is not None and contrast_before:
            image = adjust_contrast(image, c)
        if s is not None:
            image = adjust_saturation(image, s)
        if h is not None:
            image = adjust_hue(image, h)
        if c is not None and not contrast_before:
            image = adjust_contrast(image, c)
        if permutation is not None:
            out = np.empty_like(image)  # out[..., k] = image[..., permutation[k]]
            pairs = [int(v) for k, src in enumerate(permutation) for v in (src, k)]
            image = cv2.mixChannels([image], [out], pairs)[0]
        return image, target


# ---------------------------------------------------------------------------------------------------------
# Geometric
# ---------------------------------------------------------------------------------------------------------


class RandomZoomOut:
    """With probability `p`, place the image at a random spot of a canvas `r` times its size (r uniform in
    `side_range`) filled with `fill`: objects get smaller relative to the frame."""

    def __init__(self, fill: int = 0, side_range: tuple[float, float] = (1.0, 4.0), p: float = 0.5):
        if side_range[0] < 1.0 or side_range[0] > side_range[1]:
            raise ValueError(f"side_range {side_range} must satisfy 1 <= min <= max")
        self.fill, self.side_range, self.p = int(fill), tuple(side_range), float(p)

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[np.ndarray, Target]:
        if rng.random() >= self.p:
            return image, target
        h, w = image.shape[:2]
        r = self.side_range[0] + rng.random() * (self.side_range[1] - self.side_range[0])
        canvas_w, canvas_h = int(w * r), int(h * r)
        u, v = rng.random(2)
        left, top = int((canvas_w - w) * u), int((canvas_h - h) * v)
        canvas = np.full((canvas_h, canvas_w, 3), self.fill, dtype=np.uint8)
        canvas[top:top + h, left:left + w] = image
        boxes = target["boxes"] + np.array([left, top, left, top], dtype=np.float32)
        return canvas, with_boxes(target, boxes)


def box_iou(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """IoU (M, N) of boxes (M, 4) and (N, 4), xyxy."""
    lt = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    return inter / np.maximum(area1[:, None] + area2[None, :] - inter, 1e-12)


class RandomIoUCrop:
    """SSD random crop, as torchvision's RandomIoUCrop, applied with probability `p` (the official wrapper).

    Draw a minimum IoU from `sampler_options` (a value >= 1 means: leave the sample as it is); then up to
    `trials` times draw a crop (sides `min_scale..max_scale` of the image's, aspect within limits, random
    position) and accept it when some box has its centre strictly inside and one of those boxes overlaps the
    crop with IoU >= the minimum; when every trial fails, draw a new option. The crop keeps only the boxes whose
    centres are inside, clamped to it (torchvision marks the others degenerate for a later
    SanitizeBoundingBoxes; dropping them here gives the same result).
    """

    def __init__(self, min_scale: float = 0.3, max_scale: float = 1.0, min_aspect_ratio: float = 0.5,
                 max_aspect_ratio: float = 2.0, sampler_options: Sequence[float] | None = None, trials: int = 40,
                 p: float = 1.0, max_rounds: int = 1000):
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.min_aspect_ratio, self.max_aspect_ratio = float(min_aspect_ratio), float(max_aspect_ratio)
        self.options = tuple(float(o) for o in (sampler_options if sampler_options is not None
                                                else (0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)))
        if not self.options:
            raise ValueError("sampler_options is empty: give at least one minimum IoU (1.0 = no crop)")
        self.trials, self.p = int(trials), float(p)
        # torchvision loops until an option succeeds; bounded here so options without 1.0 cannot hang
        self.max_rounds = int(max_rounds)

    def _find_crop(self, boxes: np.ndarray, w: int, h: int, rng: np.random.Generator):
        cx = 0.5 * (boxes[:, 0] + boxes[:, 2])
        cy = 0.5 * (boxes[:, 1] + boxes[:, 3])
        for _ in range(self.max_rounds):
            min_iou = self.options[int(rng.integers(len(self.options)))]
            if min_iou >= 1.0:
                return None
            # all trials of this option at once; the first that passes is taken, as in the sequential loop
            r = self.min_scale + (self.max_scale - self.min_scale) * rng.random((self.trials, 2))
            new_w, new_h = (w * r[:, 0]).astype(np.int64), (h * r[:, 1]).astype(np.int64)
            u = rng.random((self.trials, 2))
            left, top = ((w - new_w) * u[:, 0]).astype(np.int64), ((h - new_h) * u[:, 1]).astype(np.int64)
            right, bottom = left + new_w, top + new_h
            with np.errstate(divide="ignore", invalid="ignore"):
                aspect = new_w / new_h
            ok = (new_w > 0) & (new_h > 0) & (self.min_aspect_ratio <= aspect) & (aspect <= self.max_aspect_ratio)
            inside = ((left[:, None] < cx) & (cx < right[:, None])
                      & (top[:, None] < cy) & (cy < bottom[:, None]))  # (trials, N)
            ok &= inside.any(axis=1)
            if not ok.any():
                continue
            crops = np.stack([left, top, right, bottom], axis=1).astype(np.float64)
            iou = np.where(inside, box_iou(crops, boxes.astype(np.float64)), -1.0)
            ok &= iou.max(axis=1, initial=-1.0) >= min_iou
            if ok.any():
                t = int(np.argmax(ok))
                return int(left[t]), int(top[t]), int(new_w[t]), int(new_h[t]), inside[t]
        return None

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[np.ndarray, Target]:
        if rng.random() >= self.p:
            return image, target
        h, w = image.shape[:2]
        found = self._find_crop(target["boxes"], w, h, rng)
        if found is None:
            return image, target
        left, top, new_w, new_h, inside = found
        crop = image[top:top + new_h, left:left + new_w]  # a view: the next resize or copy reads it once
        boxes = target["boxes"][inside] - np.array([left, top, left, top], dtype=np.float32)
        return crop, with_boxes(target, clamp_boxes(boxes, new_w, new_h), inside)


class SanitizeBoundingBoxes:
    """Drop boxes narrower or shorter than `min_size` pixels, or not inside the image, with their labels
    (torchvision's rule: w >= min_size, h >= min_size, every coordinate in [0, W] / [0, H])."""

    def __init__(self, min_size: float = 1.0):
        if min_size < 1:
            raise ValueError(f"min_size={min_size}: boxes under one pixel are degenerate; use min_size >= 1")
        self.min_size = float(min_size)

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, Target]:
        h, w = image.shape[:2]
        b = target["boxes"]
        keep = ((b[:, 2] - b[:, 0] >= self.min_size) & (b[:, 3] - b[:, 1] >= self.min_size)
                & (b >= 0).all(axis=1) & (b[:, 0::2] <= w).all(axis=1) & (b[:, 1::2] <= h).all(axis=1)
                & np.isfinite(b).all(axis=1))
        if keep.all():
            return image, target
        return image, with_boxes(target, b[keep], keep)


class RandomHorizontalFlip:
    """Mirror left-right with probability `p`; box x -> W - x."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[np.ndarray, Target]:
        if rng.random() >= self.p:
            return image, target
        w = image.shape[1]
        b = target["boxes"]
        boxes = np.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], axis=1) if len(b) else b.copy()
        return cv2.flip(image, 1), with_boxes(target, boxes)


class Resize:
    """Stretch to (height, width), as PIL bilinear with antialias; boxes scaled per axis."""

    def __init__(self, size: int | tuple[int, int]):
        self.size = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
        if min(self.size) < 1:
            raise ValueError(f"resize size {size} must be positive (height, width)")

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, Target]:
        h, w = image.shape[:2]
        th, tw = self.size
        if (h, w) == (th, tw):
            return image, target
        scale = np.array([tw / w, th / h, tw / w, th / h], dtype=np.float32)
        return resize_like_pil(image, (th, tw)), with_boxes(target, target["boxes"] * scale)


# ---------------------------------------------------------------------------------------------------------
# To the model's format
# ---------------------------------------------------------------------------------------------------------


def xyxy_to_cxcywh_normalized(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes (N, 4) xyxy pixels -> (N, 4) cxcywh divided by the image size (float32)."""
    x1, y1, x2, y2 = boxes.T
    out = np.stack([(x1 + x2) * 0.5 / width, (y1 + y2) * 0.5 / height, (x2 - x1) / width, (y2 - y1) / height],
                   axis=1)
    return out.astype(np.float32, copy=False).reshape(-1, 4)


def to_model_input(image: np.ndarray, target: Target, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> tuple[np.ndarray, Target]:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W) on [0, 1], then (x - mean) / std when given; boxes -> normalised
    cxcywh. One fused scale/offset pass per pixel."""
    h, w = image.shape[:2]
    scale = np.full(3, 1.0 / 255.0, dtype=np.float32)
    offset = np.zeros(3, dtype=np.float32)
    if mean is not None:
        std_arr = np.asarray(std, dtype=np.float32)
        scale = scale / std_arr
        offset = np.asarray(mean, dtype=np.float32) / std_arr
    chw = np.empty((3, h, w), dtype=np.float32)
    for c in range(3):  # (H, W) plane per channel, written straight into the CHW array
        np.multiply(image[..., c], scale[c], out=chw[c], dtype=np.float32)
        chw[c] -= offset[c]
    return chw, {"boxes": xyxy_to_cxcywh_normalized(target["boxes"], w, h), "labels": target["labels"]}


# ---------------------------------------------------------------------------------------------------------
# Policy and pipelines
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentPolicy:
    """The official 4-stage 'stop_epoch' policy over epochs (e0, e1, e2):

    - epoch < e0 and epoch >= e2: no photometric distortion, zoom-out, IoU crop or mosaic ("no_aug");
    - e0 <= epoch < e1: each sample is a mosaic with probability `mosaic_prob` ("mosaic"); a mosaic sample skips
      zoom-out and IoU crop, the others get every op;
    - e1 <= epoch < e2: every op but the mosaic ("aug").
    Flip, resize and sanitising run in every epoch.
    """

    epochs: tuple[int, int, int]
    mosaic_prob: float

    def stage(self, epoch: int) -> str:
        e0, e1, e2 = self.epochs
        if epoch < e0 or epoch >= e2:
            return "no_aug"
        return "mosaic" if epoch < e1 else "aug"

    def plan(self, epoch: int, rng: np.random.Generator) -> tuple[bool, bool]:
        """(mosaic, augment) for one sample: draws the mosaic coin in the mosaic stage only."""
        stage = self.stage(epoch)
        if stage == "no_aug":
            return False, False
        return (stage == "mosaic" and rng.random() < self.mosaic_prob), True


class TrainTransforms:
    """The official training pipeline of one size, scheduled by epoch:

        [Mosaic] -> PhotometricDistort -> ZoomOut -> IoUCrop -> Sanitize -> Flip -> Resize -> Sanitize
        -> float CHW [0, 1] (-> Normalize) + normalised cxcywh boxes

    `mosaic` (a `training.mosaic.Mosaic`, which needs access to other samples) may be None: then no sample is a
    mosaic. Call `set_epoch` at the start of every epoch.
    """

    def __init__(self, recipe: AugmentRecipe, mosaic: SampleTransform | None = None):
        self.recipe = recipe
        self.policy = AugmentPolicy(recipe.policy_epochs, recipe.mosaic_prob)
        self.mosaic = mosaic
        self.photometric = RandomPhotometricDistort(p=recipe.photometric_p)
        self.zoom_out = RandomZoomOut(fill=recipe.zoom_out_fill, side_range=recipe.zoom_out_side_range,
                                      p=recipe.zoom_out_p)
        self.iou_crop = RandomIoUCrop(p=recipe.iou_crop_p)
        self.sanitize = SanitizeBoundingBoxes(recipe.min_size)
        self.flip = RandomHorizontalFlip(recipe.flip_p)
        self.resize = Resize(recipe.input_size)
        self._epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch={epoch}: epochs count from 0")
        self._epoch = int(epoch)

    @property
    def epoch(self) -> int:
        return self._epoch

    def ops(self, rng: np.random.Generator, epoch: int | None = None) -> list[SampleTransform]:
        """The ops one sample goes through in `epoch` (default: the current one), up to and including resize."""
        with_mosaic, augment = self.policy.plan(self._epoch if epoch is None else epoch, rng)
        with_mosaic = with_mosaic and self.mosaic is not None
        ops: list[SampleTransform] = []
        if with_mosaic:
            ops.append(self.mosaic)
        if augment:
            ops.append(self.photometric)
            if not with_mosaic:
                ops += [self.zoom_out, self.iou_crop]
        return ops + [self.sanitize, self.flip, self.resize, self.sanitize]

    def augment(self, image: np.ndarray, target: Target, rng: np.random.Generator, epoch: int | None = None
                ) -> tuple[np.ndarray, Target]:
        """The augmented sample before conversion: RGB uint8 at the input size, boxes xyxy pixels."""
        for op in self.ops(rng, epoch):
            image, target = op(image, target, rng)
        return image, target

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator, epoch: int | None = None
                 ) -> tuple[np.ndarray, Target]:
        image, target = self.augment(image, target, rng, epoch)
        return to_model_input(image, target, self.recipe.mean, self.recipe.std)


class EvalTransforms:
    """Validation: stretch to the input size, then the same conversion as training."""

    def __init__(self, input_size: tuple[int, int], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None):
        self.resize = Resize(input_size)
        self.mean, self.std = mean, std

    @classmethod
    def from_recipe(cls, recipe: AugmentRecipe) -> EvalTransforms:
        return cls(recipe.input_size, recipe.mean, recipe.std)

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator | None = None
                 ) -> tuple[np.ndarray, Target]:
        image, target = self.resize(image, target)
        return to_model_input(image, target, self.mean, self.std)
