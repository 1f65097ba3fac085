"""The training data pipeline: per-sample ops, the mosaic, the epoch policy, datasets and batch collation.

Geometric checks draw one filled rectangle per box, in a colour unique to its label, on a black image; after a
transform, the pixels of that colour must still be bounded by the box within a pixel or two.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch

from deimv2_deploy.training.augment_recipe import AUGMENT_RECIPES, get_augment_recipe, multiscale_sizes
from deimv2_deploy.training.collate import BatchCollator, collate_eval, copy_blend, mixup
from deimv2_deploy.training.dataset import DetectionRecord, EvalDataset, TrainDataset, as_record
from deimv2_deploy.training.mosaic import Mosaic, resize_shorter_side
from deimv2_deploy.training.transforms import (
    AugmentPolicy,
    RandomHorizontalFlip,
    RandomIoUCrop,
    RandomPhotometricDistort,
    RandomZoomOut,
    Resize,
    SanitizeBoundingBoxes,
    TrainTransforms,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    make_target,
    to_model_input,
)
from deimv2_deploy.variants import IMAGENET_MEAN, IMAGENET_STD

# Saturated colours far from black (the fill) and from each other; label k is drawn in PALETTE[k].
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                    [255, 128, 0], [128, 0, 255], [255, 255, 255], [0, 128, 128], [128, 128, 0], [128, 0, 128]],
                   dtype=np.uint8)


def scene(height: int, width: int, boxes, labels=None) -> tuple[np.ndarray, dict]:
    """Black image with rectangle k filling boxes[k] (integer pixel edges) in PALETTE[labels[k]]."""
    labels = list(range(len(boxes))) if labels is None else list(labels)
    image = np.zeros((height, width, 3), np.uint8)
    for (x1, y1, x2, y2), label in zip(boxes, labels, strict=True):
        image[int(y1):int(y2), int(x1):int(x2)] = PALETTE[label]
    return image, make_target(boxes, labels)


def random_scene(rng: np.random.Generator, height: int = 360, width: int = 480, count: int = 5, first_label: int = 0):
    """Non-overlapping rectangles on a grid of cells, one per label."""
    cols = 3
    cell_w, cell_h = width // cols, height // ((count + cols - 1) // cols)
    boxes = []
    for k in range(count):
        cx0, cy0 = (k % cols) * cell_w, (k // cols) * cell_h
        w, h = int(rng.integers(cell_w // 4, cell_w - 4)), int(rng.integers(cell_h // 4, cell_h - 4))
        x1, y1 = cx0 + int(rng.integers(1, cell_w - w)), cy0 + int(rng.integers(1, cell_h - h))
        boxes.append([x1, y1, x1 + w, y1 + h])
    return scene(height, width, boxes, range(first_label, first_label + count))


def colour_extent(image: np.ndarray, label: int, region=None, tol: int = 40):
    """(x1, y1, x2, y2) pixel-edge extent of the pixels close to PALETTE[label] (inside region), or None."""
    mask = (np.abs(image.astype(np.int16) - PALETTE[label].astype(np.int16)) <= tol).all(axis=2)
    if region is not None:
        x1, y1, x2, y2 = region
        keep = np.zeros_like(mask)
        keep[max(0, int(y1)):max(0, int(y2)), max(0, int(x1)):max(0, int(x2))] = True
        mask &= keep
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def assert_boxes_fit(image: np.ndarray, target: dict, tol: float = 1.0, tight: bool = True, margin: int = 4):
    """Every box bounds its rectangle's pixels within `tol` (and, when tight, is no larger than them + tol)."""
    h, w = image.shape[:2]
    assert target["boxes"].dtype == np.float32 and target["labels"].dtype == np.int64
    assert len(target["boxes"]) == len(target["labels"])
    for box, label in zip(target["boxes"], target["labels"], strict=True):
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h, box
        region = box + np.array([-margin, -margin, margin, margin])
        extent = colour_extent(image, int(label), region)
        assert extent is not None, f"no pixels of label {label} in its box {box}"
        # the rectangle does not leak out of its box
        assert extent[0] >= box[0] - tol and extent[1] >= box[1] - tol, (label, box, extent)
        assert extent[2] <= box[2] + tol and extent[3] <= box[3] + tol, (label, box, extent)
        if tight:
            np.testing.assert_allclose(extent, box, atol=tol, err_msg=f"label {label}")


# ---------------------------------------------------------------------------------------------------------
# Single ops
# ---------------------------------------------------------------------------------------------------------


def test_flip_maths():
    image, target = scene(50, 100, [[10, 20, 30, 40], [60, 0, 100, 10]])
    flip = RandomHorizontalFlip(p=1.0)
    out, t = flip(image, target, np.random.default_rng(0))
    np.testing.assert_array_equal(t["boxes"], [[70, 20, 90, 40], [0, 0, 40, 10]])
    np.testing.assert_array_equal(out, image[:, ::-1])
    np.testing.assert_array_equal(t["labels"], target["labels"])
    back, t2 = flip(out, t, np.random.default_rng(0))
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(t2["boxes"], target["boxes"])
    same, t3 = RandomHorizontalFlip(p=0.0)(image, target, np.random.default_rng(0))
    assert same is image and t3 is target
    assert_boxes_fit(out, t, tol=0)


def test_flip_rate_follows_p():
    image, target = scene(8, 8, [[1, 1, 3, 3]])
    flips = sum(RandomHorizontalFlip(0.5)(image, target, np.random.default_rng(i))[1]["boxes"][0, 0] == 5
                for i in range(400))
    assert 150 < flips < 250


@pytest.mark.parametrize("seed", range(6))
def test_zoom_out_places_the_image_on_a_filled_canvas(seed):
    image, target = random_scene(np.random.default_rng(seed))
    out, t = RandomZoomOut(fill=0, p=1.0)(image, target, np.random.default_rng(seed))
    h, w = image.shape[:2]
    assert w <= out.shape[1] <= 4 * w and h <= out.shape[0] <= 4 * h
    left, top = (t["boxes"][0, :2] - target["boxes"][0, :2]).astype(int)
    np.testing.assert_array_equal(t["boxes"], target["boxes"] + [left, top, left, top])
    np.testing.assert_array_equal(out[top:top + h, left:left + w], image)
    outside = out.copy()
    outside[top:top + h, left:left + w] = 0
    assert not outside.any()  # the rest is fill
    assert_boxes_fit(out, t, tol=0)
    unchanged, t0 = RandomZoomOut(p=0.0)(image, target, np.random.default_rng(seed))
    assert unchanged is image and t0 is target


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Each pixel encodes its own position, so a crop's offset can be read from its first pixel."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs % 256, ys % 256, (xs // 256) + 16 * (ys // 256)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("seed", range(12))
def test_iou_crop_keeps_the_boxes_whose_centres_are_inside(seed):
    rng = np.random.default_rng(100 + seed)
    h, w = 300, 400
    x1 = rng.uniform(-20, w - 10, 12)
    y1 = rng.uniform(-20, h - 10, 12)
    boxes = np.stack([x1, y1, x1 + rng.uniform(5, 150, 12), y1 + rng.uniform(5, 150, 12)], 1)
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    target = make_target(boxes, np.arange(12))
    image = coordinate_image(h, w)
    out, t = RandomIoUCrop(p=1.0)(image, target, np.random.default_rng(seed))
    if out is image:  # the "leave as is" option
        assert t is target
        return
    left = int(out[0, 0, 0]) + 256 * (int(out[0, 0, 2]) % 16)
    top = int(out[0, 0, 1]) + 256 * (int(out[0, 0, 2]) // 16)
    ch, cw = out.shape[:2]
    np.testing.assert_array_equal(out, image[top:top + ch, left:left + cw])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    inside = (left < cx) & (cx < left + cw) & (top < cy) & (cy < top + ch)
    assert inside.any()
    np.testing.assert_array_equal(t["labels"], np.flatnonzero(inside))
    expected = np.clip(boxes[inside] - [left, top, left, top], 0, [cw, ch, cw, ch])
    np.testing.assert_allclose(t["boxes"], expected, atol=1e-4)
    # scale and aspect limits of torchvision's defaults
    assert 0.3 * w - 1 <= cw <= w and 0.3 * h - 1 <= ch <= h and 0.5 <= cw / ch <= 2.0


def test_iou_crop_without_boxes_leaves_the_sample():
    image = np.zeros((100, 120, 3), np.uint8)
    target = make_target(np.zeros((0, 4)), [])
    for seed in range(5):
        out, t = RandomIoUCrop(p=1.0)(image, target, np.random.default_rng(seed))
        assert out is image and len(t["boxes"]) == 0


@pytest.mark.parametrize("seed", range(8))
def test_iou_crop_boxes_fit_the_image(seed):
    image, target = random_scene(np.random.default_rng(seed), count=6)
    out, t = RandomIoUCrop(p=1.0)(image, target, np.random.default_rng(seed))
    out, t = SanitizeBoundingBoxes(1)(out, t)
    assert_boxes_fit(out, t, tol=0)


def test_sanitize_drops_small_and_degenerate_boxes_with_their_labels():
    image = np.zeros((100, 200, 3), np.uint8)
    boxes = [[10, 10, 50, 50],    # kept
             [10, 10, 10, 50],    # zero width
             [10, 10, 50, 13],    # 3 px high < 4
             [60, 60, 40, 90],    # x2 < x1
             [-5, 10, 30, 40],    # outside left
             [150, 10, 201, 40],  # past the right edge
             [0, 0, 200, 100],    # the whole image: kept
             [100, 20, 104, 24],  # exactly min_size: kept
             [5, 5, np.nan, 9]]   # not finite
    target = make_target(boxes, [7, 1, 2, 3, 4, 5, 6, 8, 9])
    _, t = SanitizeBoundingBoxes(min_size=4)(image, target)
    np.testing.assert_array_equal(t["labels"], [7, 6, 8])
    np.testing.assert_array_equal(t["boxes"], np.asarray(boxes, np.float32)[[0, 6, 7]])
    with pytest.raises(ValueError, match="min_size"):
        SanitizeBoundingBoxes(0)


@pytest.mark.parametrize("size", [(320, 320), (416, 416), (200, 640)])
def test_resize_scales_boxes(size):
    image, target = random_scene(np.random.default_rng(3), 360, 480)
    out, t = Resize(size)(image, target)
    assert out.shape == (*size, 3)
    assert_boxes_fit(out, t, tol=1.0)


def test_photometric_distort_changes_colours_only():
    image, target = random_scene(np.random.default_rng(0))
    image = cv2.add(image, np.full_like(image, 30))  # no pure black, so brightness shows
    changed = 0
    for seed in range(10):
        out, t = RandomPhotometricDistort(p=1.0)(image, target, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        assert t is target
        changed += not np.array_equal(out, image)
    assert changed == 10
    out, _ = RandomPhotometricDistort(p=0.0)(image, target, np.random.default_rng(0))
    np.testing.assert_array_equal(out, image)


def test_photometric_channel_shuffle_is_a_permutation():
    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3)).astype(np.uint8)
    shuffle_only = RandomPhotometricDistort(brightness=(1, 1), contrast=(1, 1), saturation=(1, 1), hue=(0, 0), p=1.0)
    orders = set()
    for seed in range(30):
        out, _ = shuffle_only(image, {}, np.random.default_rng(seed))
        order = tuple(next(j for j in range(3) if np.array_equal(out[..., k], image[..., j])) for k in range(3))
        assert sorted(order) == [0, 1, 2]
        orders.add(order)
    assert len(orders) >= 4  # the order is drawn, not fixed


def test_colour_adjustments_match_pil():
    pil_enhance = pytest.importorskip("PIL.ImageEnhance", reason="Pillow (dev extra) is the reference")
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3)).astype(np.uint8)
    pil = Image.fromarray(image)
    for factor in (0.5, 0.9, 1.3):
        for ours, theirs in ((adjust_brightness, pil_enhance.Brightness), (adjust_contrast, pil_enhance.Contrast),
                             (adjust_saturation, pil_enhance.Color)):
            expected = np.asarray(theirs(pil).enhance(factor)).astype(int)
            diff = np.abs(ours(image, factor).astype(int) - expected)
            assert diff.max() <= 2, (ours.__name__, factor, diff.max())
    for factor in (-0.05, 0.03, 0.2):  # torchvision's PIL hue kernel: shift H of PIL's HSV by int8(factor * 255)
        h, s, v = pil.convert("HSV").split()
        shifted = (np.asarray(h).astype(np.int64) + int(np.int8(factor * 255))) % 256
        hsv = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v))
        expected = np.asarray(hsv.convert("RGB")).astype(int)
        diff = np.abs(adjust_hue(image, factor).astype(int) - expected)
        moved = np.abs(image.astype(int) - expected).mean()
        # OpenCV's and PIL's 8-bit HSV round differently on greyish pixels: close on average, not per pixel
        assert diff.mean() < 2 and diff.mean() < moved / 4, (factor, diff.mean(), moved)


# ---------------------------------------------------------------------------------------------------------
# Mosaic
# ---------------------------------------------------------------------------------------------------------


def _scenes(n: int, count: int = 3):
    """n images with distinct labels across them (so any four can share a mosaic)."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        h, w = int(rng.integers(200, 400)), int(rng.integers(200, 400))
        out.append(random_scene(rng, h, w, count=count, first_label=(i * count) % len(PALETTE)))
    return out


def test_mosaic_without_affine_places_four_tiles():
    samples = _scenes(4)
    settings = dataclasses.replace(get_augment_recipe("pico").mosaic, rotation_range=0.0,
                                   translation_range=(0.0, 0.0), scaling_range=(1.0, 1.0))
    mosaic = Mosaic(settings, loader=lambda i: samples[i], num_items=4)
    rng = np.random.default_rng(1)
    partners = np.random.default_rng(1).integers(0, 4, size=3)
    image, target = mosaic(*samples[0], rng)
    tiles = [resize_shorter_side(*samples[i], settings.output_size) for i in [0, *partners]]
    th, tw = max(t[0].shape[0] for t in tiles), max(t[0].shape[1] for t in tiles)
    assert image.shape == (2 * th, 2 * tw, 3)
    assert min(tiles[0][0].shape[:2]) == settings.output_size
    expected = np.concatenate([t[1]["boxes"] + [ox, oy, ox, oy] for t, (ox, oy)
                               in zip(tiles, ((0, 0), (tw, 0), (0, th), (tw, th)), strict=True)])
    np.testing.assert_allclose(target["boxes"], expected, atol=1e-3)
    np.testing.assert_array_equal(target["labels"], np.concatenate([t[1]["labels"] for t in tiles]))
    np.testing.assert_array_equal(image[:tiles[0][0].shape[0], :tiles[0][0].shape[1]], tiles[0][0])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("source", ["dataset", "cache"])
def test_mosaic_boxes_follow_the_affine(seed, source):
    samples = _scenes(4)
    settings = get_augment_recipe("n").mosaic  # output 320, rotation 10, translation 0.1, scale 0.5..1.5
    mosaic = Mosaic(settings, loader=lambda i: samples[i], num_items=len(samples), source=source)
    if source == "cache":
        for i in range(1, 4):
            mosaic(*samples[i], np.random.default_rng(1000 + i))
    image, target = mosaic(*samples[0], np.random.default_rng(seed))
    assert image.dtype == np.uint8 and image.ndim == 3
    assert len(target["boxes"]) > 0
    h, w = image.shape[:2]
    for box, label in zip(target["boxes"], target["labels"], strict=True):
        assert 0 <= box[0] < box[2] <= w and 0 <= box[1] < box[3] <= h
        at_border = box[0] <= 1 or box[1] <= 1 or box[2] >= w - 1 or box[3] >= h - 1
        extent = colour_extent(image, int(label), box + [-4, -4, 4, 4])
        if extent is None:  # the corner of a rotated rectangle, clamped at the border, may hold no pixel centre
            assert at_border, (label, box)
            continue
        # nearest sampling at up to 1.5x scale moves an edge by up to about a pixel and a half
        assert (extent[:2] >= box[:2] - 2).all() and (extent[2:] <= box[2:] + 2).all(), (label, box, extent)
        if not at_border:  # the enclosing box of a rotated rectangle is its exact extent
            np.testing.assert_allclose(extent, box, atol=2, err_msg=f"label {label}")


def test_mosaic_cache_is_bounded_and_keeps_the_newest():
    samples = _scenes(6, count=1)
    settings = dataclasses.replace(get_augment_recipe("atto").mosaic, max_cached_images=5)
    mosaic = Mosaic(settings, source="cache")
    for step in range(20):
        image, target = samples[step % 6]
        mosaic(image, target, np.random.default_rng(step))
        assert len(mosaic.cache) == min(step + 1, 5)
        newest = mosaic.cache[-1][0]
        np.testing.assert_array_equal(newest, resize_shorter_side(image, target, settings.output_size)[0])


def test_mosaic_own_probability():
    samples = _scenes(2)
    never = dataclasses.replace(get_augment_recipe("atto").mosaic, probability=0.0)
    image, target = samples[0]
    out, t = Mosaic(never, loader=lambda i: samples[i], num_items=2)(image, target, np.random.default_rng(0))
    assert out is image and t is target
    always = Mosaic(dataclasses.replace(never, probability=1.0), loader=lambda i: samples[i], num_items=2)
    assert always(image, target, np.random.default_rng(0))[0].shape != image.shape


def test_mosaic_arguments_are_checked():
    settings = get_augment_recipe("atto").mosaic
    with pytest.raises(ValueError, match="loader"):
        Mosaic(settings)
    with pytest.raises(ValueError, match="source"):
        Mosaic(settings, source="ring")


# ---------------------------------------------------------------------------------------------------------
# Full per-sample pipeline and the epoch policy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["atto", "pico"])
@pytest.mark.parametrize("seed", range(6))
def test_pipeline_keeps_boxes_on_their_objects(size, seed):
    samples = _scenes(4)
    recipe = dataclasses.replace(get_augment_recipe(size), photometric_p=0.0)  # colours stay identifiable
    mosaic = Mosaic(recipe.mosaic, loader=lambda i: samples[i], num_items=4)
    pipeline = TrainTransforms(recipe, mosaic)
    for epoch in (0, recipe.policy_epochs[0], recipe.policy_epochs[1]):
        image, target = pipeline.augment(*samples[seed % 4], np.random.default_rng(seed), epoch)
        assert image.shape == (*recipe.input_size, 3)
        w = target["boxes"][:, 2] - target["boxes"][:, 0]
        h = target["boxes"][:, 3] - target["boxes"][:, 1]
        assert (w >= recipe.min_size).all() and (h >= recipe.min_size).all()
        # stretching to the input size blends edges: 2 px, and boxes of rotated tiles are loose
        for box, label in zip(target["boxes"], target["labels"], strict=True):
            extent = colour_extent(image, int(label), box + [-4, -4, 4, 4])
            if extent is not None:
                assert (extent[:2] >= box[:2] - 2).all() and (extent[2:] <= box[2:] + 2).all(), (epoch, label)


def test_policy_stages_per_epoch():
    recipe = get_augment_recipe("atto")  # policy (4, 250, 400), mosaic_prob 0.3
    pipeline = TrainTransforms(recipe, mosaic=lambda image, target, rng: (image, target))
    names = {id(pipeline.mosaic): "mosaic", id(pipeline.photometric): "photometric", id(pipeline.zoom_out): "zoom",
             id(pipeline.iou_crop): "crop", id(pipeline.sanitize): "sanitize", id(pipeline.flip): "flip",
             id(pipeline.resize): "resize"}
    tail = ["sanitize", "flip", "resize", "sanitize"]

    def plan(epoch, seed):
        return [names[id(op)] for op in pipeline.ops(np.random.default_rng(seed), epoch)]

    for epoch in (0, 3, 400, 499):
        assert plan(epoch, 0) == tail, epoch
    for epoch in (250, 399):
        assert plan(epoch, 0) == ["photometric", "zoom", "crop", *tail]
    plans = [plan(100, seed) for seed in range(3000)]
    mosaics = [p for p in plans if p[0] == "mosaic"]
    assert all(p == ["mosaic", "photometric", *tail] for p in mosaics)  # no zoom-out or crop after a mosaic
    assert all(p == ["photometric", "zoom", "crop", *tail] for p in plans if p[0] != "mosaic")
    assert abs(len(mosaics) / 3000 - 0.3) < 0.04
    policy = AugmentPolicy((4, 250, 400), 0.3)
    assert [policy.stage(e) for e in (0, 4, 249, 250, 399, 400)] == ["no_aug", "mosaic", "mosaic", "aug", "aug",
                                                                     "no_aug"]
    pipeline.set_epoch(7)
    assert pipeline.epoch == 7
    with pytest.raises(ValueError, match="epoch"):
        pipeline.set_epoch(-1)


def test_to_model_input_normalises_and_converts_boxes():
    image = np.full((20, 40, 3), (255, 128, 0), np.uint8)
    target = make_target([[0, 0, 40, 20], [10, 5, 20, 15]], [1, 2])
    chw, t = to_model_input(image, target)
    assert chw.shape == (3, 20, 40) and chw.dtype == np.float32
    np.testing.assert_allclose(chw[:, 0, 0], [1.0, 128 / 255, 0.0], rtol=1e-6)
    np.testing.assert_allclose(t["boxes"], [[0.5, 0.5, 1.0, 1.0], [0.375, 0.5, 0.25, 0.5]])
    norm, _ = to_model_input(image, target, IMAGENET_MEAN, IMAGENET_STD)
    expected = (np.array([1.0, 128 / 255, 0.0]) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(norm[:, 5, 7], expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Recipes
# ---------------------------------------------------------------------------------------------------------


def test_recipe_table_covers_every_size_with_its_normalisation():
    assert list(AUGMENT_RECIPES) == ["atto", "femto", "pico", "n", "s", "m", "l", "x"]
    for size, recipe in AUGMENT_RECIPES.items():
        assert recipe.normalize == (size in ("s", "m", "l", "x")), size
        if recipe.normalize:
            assert recipe.mean == IMAGENET_MEAN and recipe.std == IMAGENET_STD
        e0, e1, e2 = recipe.policy_epochs
        assert e2 <= recipe.stop_epoch < recipe.epochs or recipe.size in ("atto", "femto", "pico")
    # sizes whose configs turn the batch augmentations off
    for size in ("atto", "femto", "pico"):
        r = AUGMENT_RECIPES[size]
        assert r.mixup_prob == 0 and r.copyblend_prob == 0 and r.scales is None
    assert AUGMENT_RECIPES["atto"].mosaic.output_size == 160 and AUGMENT_RECIPES["atto"].min_size == 12
    assert AUGMENT_RECIPES["n"].scales is None and AUGMENT_RECIPES["s"].scales is not None


def test_scaled_recipe_keeps_the_official_proportions():
    s = get_augment_recipe("s")  # 132 epochs, policy (4, 64, 120), stop 120, mixup (4, 64), copy-blend (4, 120)
    assert s.scaled(s.epochs) == s
    short = s.scaled(33)
    assert short.epochs == 33
    assert short.policy_epochs == (1, 16, 30)
    assert short.stop_epoch == 30 and short.mixup_epochs == (1, 16) and short.copyblend_epochs == (1, 30)
    assert short.mosaic == s.mosaic and short.input_size == s.input_size
    for size in AUGMENT_RECIPES:
        for epochs in (1, 2, 5, 12, 1000):
            r = get_augment_recipe(size, epochs)
            e0, e1, e2 = r.policy_epochs
            assert 0 <= e0 <= e1 <= e2 <= epochs and r.stop_epoch <= epochs
    with pytest.raises(ValueError, match="epoch"):
        s.scaled(0)


def test_multiscale_sizes_and_stop_epoch():
    assert multiscale_sizes(640, 3) == (480, 512, 544, 576, 608, 640, 640, 640, 800, 768, 736, 704, 672)
    assert multiscale_sizes(320, 0) == (224, 256, 288, 384, 352, 320)
    recipe = get_augment_recipe("l")  # base 640, repeat 3, stop 60
    collator = BatchCollator(recipe, seed=0)
    items = [(torch.zeros(3, 32, 32), _target([], [], i)) for i in range(2)]  # small: the draw is what matters
    seen = set()
    for epoch in range(0, 60, 6):
        collator.set_epoch(epoch)
        for k in range(6):
            images, _ = collator([(im, dict(t, idx=torch.tensor(10 * k + i))) for i, (im, t) in enumerate(items)])
            assert images.shape[-1] == images.shape[-2] and images.shape[-1] in recipe.scales
            seen.add(images.shape[-1])
    assert len(seen) >= 8
    base = (torch.zeros(3, 640, 640), _target([], [], 0))
    for epoch in (60, 67):
        collator.set_epoch(epoch)
        assert collator([base])[0].shape[-2:] == (640, 640)
    atto = BatchCollator(get_augment_recipe("atto"))
    assert not any(atto.uses_multiscale(e) for e in (0, 100, 499))


# ---------------------------------------------------------------------------------------------------------
# Batch augmentations
# ---------------------------------------------------------------------------------------------------------


def _target(boxes, labels, idx=0):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64), "idx": torch.tensor(idx)}


def test_mixup_blends_neighbours_and_joins_their_boxes():
    images = torch.rand(3, 3, 8, 8)
    targets = [_target([[0.5, 0.5, 0.2, 0.2]], [1]), _target([], []), _target([[0.1, 0.1, 0.1, 0.1]] * 2, [2, 3])]
    mixed, out = mixup(images, targets, 0.55)
    torch.testing.assert_close(mixed[1], 0.55 * images[1] + 0.45 * images[0])
    torch.testing.assert_close(mixed[0], 0.55 * images[0] + 0.45 * images[2])
    assert out[0]["labels"].tolist() == [1, 2, 3] and out[1]["labels"].tolist() == [1]
    assert out[2]["labels"].tolist() == [2, 3]
    assert targets[0]["labels"].tolist() == [1]  # inputs untouched


def test_copy_blend_pastes_objects_with_their_boxes():
    recipe = get_augment_recipe("s")
    cb = dataclasses.replace(recipe.copyblend, with_expand=False, num_objects=2)
    recipe = dataclasses.replace(recipe, copyblend=cb)
    images = torch.zeros(2, 3, 64, 64)
    images[0, :, 8:24, 8:40] = 1.0  # one object (32 x 16 px) in image 0, box in normalised cxcywh
    targets = [_target([[24 / 64, 16 / 64, 32 / 64, 16 / 64], [0.9, 0.9, 0.05, 0.05]], [4, 5], 0),
               _target([], [], 1)]
    beta = 0.5
    out, new = copy_blend(images, targets, beta, recipe, np.random.default_rng(0))
    assert [len(t["boxes"]) for t in new] == [3, 1]  # the 3x3 px object is under the area threshold
    box = new[1]["boxes"][0].numpy() * 64
    x1, y1 = int(round(box[0] - box[2] / 2)), int(round(box[1] - box[3] / 2))
    assert (round(box[2]), round(box[3])) == (32, 16) and new[1]["labels"].tolist() == [4]
    torch.testing.assert_close(out[1, :, y1:y1 + 16, x1:x1 + 32], torch.full((3, 16, 32), 1 - beta))
    assert out[1].sum() == pytest.approx(3 * 16 * 32 * (1 - beta))  # nothing else changed
    assert (new[0]["boxes"][:2] == targets[0]["boxes"]).all()


def test_collator_applies_batch_ops_only_in_their_epochs():
    recipe = dataclasses.replace(get_augment_recipe("n"), mixup_prob=1.0, copyblend_prob=1.0)  # windows (4, 78)
    collator = BatchCollator(recipe, seed=0)
    items = [(torch.rand(3, 32, 32), _target([[0.5, 0.5, 0.5, 0.5]], [i], i)) for i in range(2)]
    collator.set_epoch(2)
    images, targets = collator(items)
    assert [len(t["boxes"]) for t in targets] == [1, 1]
    torch.testing.assert_close(images[0], items[0][0])
    collator.set_epoch(10)
    _, targets = collator(items)
    assert [t["labels"].tolist() for t in targets] == [[0, 1], [1, 0]]  # mixup comes first


# ---------------------------------------------------------------------------------------------------------
# Datasets: records, determinism, normalisation
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("augment_images")
    out = []
    for i, (image, target) in enumerate(_scenes(8)):
        path = folder / f"{i}.png"
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        out.append(DetectionRecord(path, target["boxes"], target["labels"], image_id=100 + i))
    return out


def test_train_dataset_sample_format(records):
    recipe = get_augment_recipe("pico", epochs=20)
    dataset = TrainDataset(records, recipe, seed=0)
    for epoch in range(0, 20, 3):
        dataset.set_epoch(epoch)
        image, target = dataset[epoch % len(dataset)]
        assert image.dtype == torch.float32 and image.shape == (3, 640, 640)
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
        boxes = target["boxes"]
        assert boxes.dtype == torch.float32 and boxes.shape[1] == 4 and target["labels"].dtype == torch.int64
        assert ((boxes >= 0) & (boxes <= 1)).all()
        assert int(target["idx"]) == epoch % len(dataset)


def test_samples_are_deterministic_per_seed_epoch_index(records):
    recipe = get_augment_recipe("n", epochs=30)
    a, b = TrainDataset(records, recipe, seed=5), TrainDataset(records, recipe, seed=5)
    for epoch in (0, 3, 12):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        for index in (3, 0, 5):  # order does not matter
            (ia, ta), (ib, tb) = a[index], b[index]
            torch.testing.assert_close(ia, ib, rtol=0, atol=0)
            torch.testing.assert_close(ta["boxes"], tb["boxes"], rtol=0, atol=0)
    c = TrainDataset(records, recipe, seed=6)
    a.set_epoch(5)
    c.set_epoch(5)
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(4))


def test_batches_do_not_depend_on_worker_count(records):
    recipe = get_augment_recipe("s", epochs=20)  # mosaic, mixup, copy-blend and multi-scale all active
    dataset = TrainDataset(records, recipe, seed=1)
    collator = BatchCollator(recipe, seed=1)

    def run(workers):
        dataset.set_epoch(3)
        collator.set_epoch(3)
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=False, num_workers=workers,
                                             collate_fn=collator)
        return list(loader)

    single, multi = run(0), run(2)
    assert len(single) == len(multi) == 3
    for (ia, ta), (ib, tb) in zip(single, multi, strict=True):
        torch.testing.assert_close(ia, ib, rtol=0, atol=0)
        for x, y in zip(ta, tb, strict=True):
            torch.testing.assert_close(x["boxes"], y["boxes"], rtol=0, atol=0)
            assert x["labels"].tolist() == y["labels"].tolist()


@pytest.mark.parametrize("size", ["atto", "s", "x"])
def test_eval_dataset_resizes_and_normalises(records, size):
    recipe = get_augment_recipe(size)
    dataset = EvalDataset.from_recipe(records[:2], recipe)
    image, target = dataset[1]
    assert image.shape == (3, *recipe.input_size)
    raw = cv2.cvtColor(cv2.imread(str(records[1].image_path)), cv2.COLOR_BGR2RGB)
    assert target["orig_size"].tolist() == [raw.shape[1], raw.shape[0]]
    ref = cv2.resize(raw, recipe.input_size[::-1], interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    if recipe.normalize:
        ref = (ref - np.array(recipe.mean, np.float32)) / np.array(recipe.std, np.float32)
    # corner pixel: background, unaffected by the resize filter
    np.testing.assert_allclose(image[:, 0, 0].numpy(), ref[0, 0], rtol=1e-5, atol=1e-5)
    wh = np.array([raw.shape[1], raw.shape[0]] * 2, np.float32)
    b = records[1].boxes / wh
    cxcywh = np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], axis=1)
    np.testing.assert_allclose(target["boxes"].numpy(), cxcywh, atol=1e-6)
    images, targets = collate_eval([dataset[0], dataset[1]])
    assert images.shape == (2, 3, *recipe.input_size) and len(targets) == 2


def test_train_dataset_normalises_for_dinov3_sizes(records):
    for size in ("s", "m", "l", "x", "n"):
        recipe = get_augment_recipe(size)
        dataset = TrainDataset(records[:2], recipe)
        dataset.set_epoch(recipe.policy_epochs[2])  # no-aug stage: only flip and resize
        image, _ = dataset[0]
        # the corner stays background (black) under flip + resize
        expected = (0.0 - np.array(recipe.mean)) / np.array(recipe.std) if recipe.normalize else np.zeros(3)
        np.testing.assert_allclose(image[:, 0, 0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_records_are_checked_with_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"a\.png.*\(N, 4\)"):
        as_record((tmp_path / "a.png", np.zeros((2, 3)), [0, 1]))
    with pytest.raises(ValueError, match="one label per box"):
        as_record((tmp_path / "a.png", np.zeros((2, 4)), [0]))
    with pytest.raises(ValueError, match="num_classes"):
        as_record({"image_path": "b.png", "boxes": [[0, 0, 1, 1]], "labels": [3]}, num_classes=3)
    with pytest.raises(ValueError, match="negative"):
        as_record(("c.png", [[0, 0, 1, 1]], [-1]))
    with pytest.raises(ValueError, match="NaN"):
        as_record(("d.png", [[0, 0, np.nan, 1]], [0]))
    with pytest.raises(ValueError, match="lacks"):
        as_record({"boxes": [], "labels": []})
    empty = as_record(("e.png", [], []))
    assert empty.boxes.shape == (0, 4) and empty.labels.dtype == np.int64
    with pytest.raises(ValueError, match="empty"):
        TrainDataset([], get_augment_recipe("atto"))
    dataset = TrainDataset([(tmp_path / "missing.png", [[0, 0, 5, 5]], [0])], get_augment_recipe("atto"))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        dataset[0]


def test_boxes_outside_the_image_are_clipped_on_load(tmp_path):
    path = tmp_path / "img.png"
    cv2.imwrite(str(path), np.zeros((50, 60, 3), np.uint8))
    record = as_record((path, [[-10, 5, 20, 70], [70, 0, 90, 10], [10, 10, 30, 30]], [0, 1, 2]))
    dataset = TrainDataset([record], get_augment_recipe("atto"))
    image, target = dataset.load_item(0)
    np.testing.assert_array_equal(target["boxes"], [[0, 5, 20, 50], [10, 10, 30, 30]])
    assert target["labels"].tolist() == [0, 2]
