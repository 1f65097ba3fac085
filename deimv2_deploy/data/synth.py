"""A procedurally generated COCO-format detection dataset ("synthetic shapes"). No torch.

Eight classes of flat shapes with distinct silhouettes (circle, triangle, rectangle, star, cross, ring, crescent,
arrow), each drawn with its own colour, shading and outline, at a random scale (small, medium and large in COCO's
area sense at the default 320 px image), aspect ratio and rotation, on textured backgrounds (gradients, value
noise, stripes, blurred blobs), among clutter that is not a class (lines, zigzags, squiggles, letters).
Later objects may cover earlier ones, but only so far that each keeps >= 70 % of its pixels and nearly all of
its extent, so every annotated object stays recognisable and its box is still determined by what is visible.

Annotations are exact: a shape paints every pixel its geometry touches, and its box is the tight box of those
pixels, (floor(min), floor(max) + 1) of the geometry per axis; boxes are amodal (occluders do not shrink them;
occlusion is bounded as above); `area` is the count of the object's visible pixels. Image i of a split
depends only on (seed, split, i): the same seed gives byte-identical files however many images are asked for.

Layout written by `write_dataset` (the COCO layout `resolve_dataset` reads):
    DIR/annotations/instances_<split>.json
    DIR/<split>/000000000001.jpg ...
and its panoptic ground truth, in the COCO panoptic layout (`data.panoptic.resolve_panoptic_dataset` reads it):
    DIR/annotations/panoptic_<split>.json
    DIR/annotations/panoptic_<split>/000000000001.png ...
Panoptic categories: the 8 shapes (ids 1..8, things) and one stuff category, "background" (id 9), that covers every
pixel no object owns (background and clutter); nothing is void. Segment ids per image: object i (drawing order, as
in the instances file) is i + 1, background is n + 1; a segment's bbox is the tight box of its visible pixels (the
panoptic convention; the instances file keeps amodal boxes). The instances file and images do not depend on
whether the panoptic files are written; `add_panoptic` writes them for a dataset that lacks them, from the seed,
split and image size its instances file records.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from deimv2_deploy.data.panoptic import encode_panoptic_png
from deimv2_deploy.media import atomic_path

__all__ = ["SYNTH_CLASSES", "SYNTH_CATEGORY_IDS", "SPLITS", "GENERATOR_VERSION", "BACKGROUND_CATEGORY_ID",
           "BACKGROUND_NAME", "SynthObject", "SynthScene", "render_scene", "coco_annotations", "panoptic_segments",
           "panoptic_annotations", "write_dataset", "add_panoptic"]

GENERATOR_VERSION = 1  # bump when a change alters the images or annotations a seed produces
SYNTH_CLASSES: tuple[str, ...] = ("circle", "triangle", "rectangle", "star", "cross", "ring", "crescent", "arrow")
SYNTH_CATEGORY_IDS: tuple[int, ...] = tuple(range(1, len(SYNTH_CLASSES) + 1))
SPLITS = ("train", "val")  # index in this tuple is part of every image's seed
BACKGROUND_CATEGORY_ID = len(SYNTH_CLASSES) + 1  # panoptic only: the stuff category of every pixel no object owns
BACKGROUND_NAME = "background"
_DESCRIPTION = "deimv2-deploy synthetic shapes"

MAX_OBJECTS = 12
MIN_VISIBLE = 0.7  # an object keeps at least this fraction of its pixels visible
MIN_EXTENT_IOU = 0.85  # ... and the box of its visible pixels overlaps its own box at least this much
JPEG_QUALITY = 92
# object extent (before aspect/rotation) as a fraction of the image side: (weight, low, high), log-uniform
_SCALE_BANDS = ((0.3, 0.055, 0.12), (0.3, 0.12, 0.35), (0.4, 0.35, 0.8))
_TEXT_CHARS = "BEFGHJKLMNPRSUWYZ2345679"  # none that looks like one of the classes (no O, X, T, A, V, 0, +)
_SHIFT = 4  # fixed-point bits for sub-pixel polygon vertices in cv2.fillPoly
_KERNEL3 = np.ones((3, 3), np.uint8)
_UNIT_CIRCLE = np.stack([np.cos(np.linspace(0, 2 * np.pi, 64, endpoint=False)),
                         np.sin(np.linspace(0, 2 * np.pi, 64, endpoint=False))], axis=1)


@dataclass(frozen=True, eq=False)
class SynthObject:
    """One annotated object: `box` xyxy (pixel edges, ints), `mask` its full shape in the window at `box`."""

    category_id: int
    box: tuple[int, int, int, int]
    area: int  # visible pixels
    mask: np.ndarray  # bool (y1 - y0, x1 - x0): the whole shape, occluded parts included


@dataclass(frozen=True, eq=False)
class SynthScene:
    image: np.ndarray  # uint8 (S, S, 3) BGR
    objects: tuple[SynthObject, ...]
    owner: np.ndarray  # int16 (S, S): index of the object seen at each pixel, -1 background or clutter


# --- geometry: shapes in unit coordinates (extent about [-1, 1]); a list of (polygon, fill 1 or cut 0) --------
def _shape(kind: int, rng: np.random.Generator) -> list[tuple[np.ndarray, int]]:
    name = SYNTH_CLASSES[kind]
    if name == "circle":
        return [(_UNIT_CIRCLE, 1)]
    if name == "triangle":
        angles = np.deg2rad(np.array([90.0, 210.0, 330.0]) + rng.uniform(-12, 12, 3))
        r = rng.uniform(0.85, 1.0, 3)
        return [(np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1), 1)]
    if name == "rectangle":
        return [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64), 1)]
    if name == "star":
        inner = rng.uniform(0.38, 0.5)
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, inner)
        return [(np.stack([r * np.cos(angles), r * np.sin(angles)], axis=1), 1)]
    if name == "cross":
        t = rng.uniform(0.26, 0.38)
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t),
               (-t, -t)]
        return [(np.array(pts, np.float64), 1)]
    if name == "ring":
        return [(_UNIT_CIRCLE, 1), (_UNIT_CIRCLE * rng.uniform(0.45, 0.65), 0)]
    if name == "crescent":
        r, d = rng.uniform(0.85, 1.0), rng.uniform(0.4, 0.6)
        return [(_UNIT_CIRCLE, 1), (_UNIT_CIRCLE * r + np.array([d, 0.0]), 0)]
    if name == "arrow":
        shaft, head, neck = rng.uniform(0.22, 0.34), rng.uniform(0.7, 0.95), rng.uniform(0.0, 0.3)
        pts = [(-1, -shaft), (neck, -shaft), (neck, -head), (1, 0), (neck, head), (neck, shaft), (-1, shaft)]
        return [(np.array(pts, np.float64), 1)]
    raise ValueError(f"unknown shape {kind}")


def _place(ops: list[tuple[np.ndarray, int]], scale: tuple[float, float],
           angle: float) -> list[tuple[np.ndarray, int]]:
    """Scale (x, y) then rotate; the result is centred on (0, 0) in pixels."""
    c, s = math.cos(angle), math.sin(angle)
    m = np.array([[c, -s], [s, c]]) @ np.diag(scale)
    return [(pts @ m.T, fill) for pts, fill in ops]


def _rasterise(ops: list[tuple[np.ndarray, int]], origin: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """bool (h, w) mask of the polygons (in image pixels) in the window at origin (x0, y0).

    OpenCV fills a polygon given with pixel centres at integer coordinates, end pixels included: shifted by half
    a pixel, that is every pixel the shape (pixel i spans [i, i+1]) touches."""
    h, w = size
    mask = np.zeros((h, w), np.uint8)
    offset = np.array([origin[0] + 0.5, origin[1] + 0.5])
    for pts, fill in ops:
        fixed = np.round((pts - offset) * (1 << _SHIFT)).astype(np.int32)
        cv2.fillPoly(mask, [fixed], int(fill), lineType=cv2.LINE_8, shift=_SHIFT)
    return mask.astype(bool)


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# --- backgrounds ----------------------------------------------------------------------------------------------
def _random_colour(rng: np.random.Generator, sat: tuple[float, float] = (0.0, 1.0),
                   val: tuple[float, float] = (0.1, 1.0)) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(*sat) * 255, rng.uniform(*val) * 255]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2BGR)[0, 0].astype(np.float32)


def _texture(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 (S, S, 3) in 0..255."""
    if kind == 0:  # linear gradient between two colours
        a, b = _random_colour(rng), _random_colour(rng)
        theta = rng.uniform(0, 2 * np.pi)
        t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        ramp = (math.cos(theta) * t[None, :] + math.sin(theta) * t[:, None]) / 1.42 + 0.5
        return a + (b - a) * ramp[..., None]
    if kind == 1:  # value noise: a coarse random grid, smoothly enlarged
        cells = int(rng.integers(3, 14))
        grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.float32)
        tint = _random_colour(rng, val=(0.5, 1.0)) / 255.0
        return cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 255) * tint
    if kind == 2:  # stripes (soft or hard) at a random angle and period
        a, b = _random_colour(rng), _random_colour(rng)
        theta, period = rng.uniform(0, np.pi), rng.uniform(0.03, 0.15) * size
        t = np.arange(size, dtype=np.float32)
        phase = (math.cos(theta) * t[None, :] + math.sin(theta) * t[:, None]) * (2 * np.pi / period)
        wave = 0.5 + 0.5 * np.sin(phase)
        if rng.random() < 0.5:
            wave = (wave > 0.5).astype(np.float32)
        return a + (b - a) * wave[..., None]
    # blurred blobs of colour, drawn and blurred at a quarter of the size, then enlarged (smooth anyway)
    small = max(16, size // 4)
    canvas = np.empty((small, small, 3), np.float32)
    canvas[:] = _random_colour(rng)
    for _ in range(int(rng.integers(3, 9))):
        centre = (int(rng.integers(0, small)), int(rng.integers(0, small)))
        axes = (int(rng.uniform(0.05, 0.35) * small), int(rng.uniform(0.05, 0.35) * small))
        cv2.ellipse(canvas, centre, axes, float(rng.uniform(0, 180)), 0, 360, _random_colour(rng).tolist(), -1)
    canvas = cv2.GaussianBlur(canvas, (0, 0), small * rng.uniform(0.02, 0.06))
    return cv2.resize(canvas, (size, size), interpolation=cv2.INTER_LINEAR)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 (S, S, 3): one or two textures, made at half size (they are smooth) and enlarged."""
    half = max(32, size // 2)
    bg = _texture(int(rng.integers(0, 4)), rng, half)
    if rng.random() < 0.5:  # a second texture mixed in
        alpha = rng.uniform(0.2, 0.5)
        bg = cv2.addWeighted(bg, 1 - alpha, _texture(int(rng.integers(0, 4)), rng, half), alpha, 0.0)
    bg = cv2.resize(bg, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.clip(bg, 0, 255, out=bg).astype(np.uint8)


# --- clutter (not a class) --------------------------------------------------------------------------------------
def _clutter_mask(rng: np.random.Generator, size: int) -> np.ndarray:
    """bool (S, S): one line, zigzag, squiggle or short string of letters."""
    mask = np.zeros((size, size), np.uint8)
    kind = int(rng.integers(0, 4))
    thick = max(1, int(round(rng.uniform(0.004, 0.015) * size)))
    if kind == 0:  # straight line
        p, q = rng.integers(0, size, 2), rng.integers(0, size, 2)
        cv2.line(mask, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), 1, thick)
    elif kind == 1:  # zigzag
        start = rng.uniform(0.1, 0.9, 2) * size
        steps = rng.normal(0, 0.12 * size, (int(rng.integers(3, 7)), 2))
        pts = np.cumsum(np.vstack([start, steps]), axis=0).round().astype(np.int32)
        cv2.polylines(mask, [pts], False, 1, thick)
    elif kind == 2:  # squiggle: a sine wave along a random direction
        length, amp = rng.uniform(0.15, 0.5) * size, rng.uniform(0.01, 0.05) * size
        t = np.linspace(0, length, 40)
        wave = np.stack([t, amp * np.sin(t / length * 2 * np.pi * rng.uniform(1, 4))], axis=1)
        pts = _place([(wave - [length / 2, 0], 1)], (1.0, 1.0), rng.uniform(0, np.pi))[0][0]
        pts = (pts + rng.uniform(0.15, 0.85, 2) * size).round().astype(np.int32)
        cv2.polylines(mask, [pts], False, 1, thick)
    else:  # letters
        text = "".join(rng.choice(list(_TEXT_CHARS), int(rng.integers(1, 4))))
        scale = rng.uniform(0.002, 0.006) * size
        org = (int(rng.uniform(0.0, 0.8) * size), int(rng.uniform(0.15, 1.0) * size))
        cv2.putText(mask, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 1, max(1, thick), cv2.LINE_8)
    return mask.astype(bool)


# --- the scene ------------------------------------------------------------------------------------------------
def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([GENERATOR_VERSION, seed, SPLITS.index(split),
                                                                      index])))


def _paint(image: np.ndarray, origin: tuple[int, int], mask: np.ndarray, rng: np.random.Generator,
           colour: np.ndarray) -> None:
    """Fill `mask` (placed at origin) with a shaded colour and, sometimes, an outline inside the mask."""
    h, w = mask.shape
    region = image[origin[1]:origin[1] + h, origin[0]:origin[0] + w]
    ys, xs = np.nonzero(mask)
    if rng.random() < 0.6:  # a linear light gradient across the object
        theta, strength = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.35)
        ramp = (math.cos(theta) / max(w, 1)) * xs + (math.sin(theta) / max(h, 1)) * ys
        shade = (1.0 + strength * (ramp - ramp.mean())).astype(np.float32)
        region[ys, xs] = np.minimum(colour[None, :] * shade[:, None], 255).astype(np.uint8)
    else:
        region[ys, xs] = colour.astype(np.uint8)
    if rng.random() < 0.5 and min(h, w) >= 8:
        width = 1 if min(h, w) < 40 else int(rng.integers(1, 4))
        inner = cv2.erode(np.ascontiguousarray(mask).view(np.uint8), _KERNEL3, iterations=width,
                          borderValue=0).view(bool)
        factor = rng.uniform(0.25, 0.55) if rng.random() < 0.7 else rng.uniform(1.6, 2.5)
        region[mask & ~inner] = np.minimum(colour * factor, 255).astype(np.uint8)


def _backdrop(image: np.ndarray, origin: tuple[int, int], mask: np.ndarray) -> np.ndarray:
    """float32 (n <= 256, 3): an even sample of the pixels `mask` will cover (background, clutter, objects)."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    step = max(1, len(ys) // 256)
    return image[origin[1] + ys[::step], origin[0] + xs[::step]].astype(np.float32)


def _distinct_colour(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """A colour that stands out from what it will cover: far from its mean colour, and close to few of its
    pixels (so a shape on stripes, or on an object of its own colour, keeps its silhouette)."""
    mean = behind.mean(axis=0)
    best, best_score = None, np.inf
    for _ in range(12):
        c = _random_colour(rng, sat=(0.2, 1.0), val=(0.25, 1.0))
        near = float(np.mean(np.abs(behind - c).max(axis=1) < 40))
        far = float(np.linalg.norm(c - mean)) >= 60
        if near <= 0.1 and far:
            return c
        score = near + (0 if far else 1)
        if score < best_score:
            best, best_score = c, score
    return best  # type: ignore[return-value]


class _Layers:
    """Who is visible where, to bound how much later shapes may cover earlier objects."""

    def __init__(self, size: int) -> None:
        self.owner = np.full((size, size), -1, np.int16)
        self.boxes: list[tuple[int, int, int, int]] = []
        self.pixels: list[int] = []  # full (unoccluded) pixel count per object
        self.visible: list[int] = []

    def allows(self, mask: np.ndarray, origin: tuple[int, int]) -> bool:
        """True when drawing `mask` at origin leaves every object enough of itself."""
        x0, y0 = origin
        h, w = mask.shape
        covered = self.owner[y0:y0 + h, x0:x0 + w][mask]
        hit = np.unique(covered[covered >= 0])
        for j in hit.tolist():
            lost = int(np.count_nonzero(covered == j))
            if self.visible[j] - lost < MIN_VISIBLE * self.pixels[j]:
                return False
            bx0, by0, bx1, by1 = self.boxes[j]
            view = self.owner[by0:by1, bx0:bx1] == j
            ix0, iy0 = max(bx0, x0), max(by0, y0)
            ix1, iy1 = min(bx1, x0 + w), min(by1, y0 + h)
            view[iy0 - by0:iy1 - by0, ix0 - bx0:ix1 - bx0] &= ~mask[iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0]
            box = _tight_box(view)
            if box is None or _iou(box, (0, 0, bx1 - bx0, by1 - by0)) < MIN_EXTENT_IOU:
                return False
        return True

    def cover(self, mask: np.ndarray, origin: tuple[int, int], index: int | None) -> None:
        """Draw `mask` on top: its pixels now belong to object `index` (None: clutter)."""
        x0, y0 = origin
        h, w = mask.shape
        window = self.owner[y0:y0 + h, x0:x0 + w]
        covered = window[mask]
        ids, lost_counts = np.unique(covered[covered >= 0], return_counts=True)
        for j, lost in zip(ids.tolist(), lost_counts.tolist(), strict=True):
            self.visible[j] -= lost
        window[mask] = -1 if index is None else index


def _iou(a: Sequence[int], b: Sequence[int]) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _sample_extent(rng: np.random.Generator, size: int) -> float:
    """A shape's extent in pixels: a size band by weight, then log-uniform within it."""
    u, acc = rng.random() * sum(b[0] for b in _SCALE_BANDS), 0.0
    band = _SCALE_BANDS[-1]
    for band in _SCALE_BANDS:  # noqa: B007 - the band found is used below
        acc += band[0]
        if u <= acc:
            break
    return math.exp(rng.uniform(math.log(band[1]), math.log(band[2]))) * size


def _finish(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sensor noise (made at half resolution: cheap, and looks like compressed noise) and, sometimes, a blur."""
    size = image.shape[0]
    sigma = rng.uniform(0, 6)
    if sigma > 0.5:
        half = (size + 1) // 2
        noise = np.rint(rng.standard_normal((half, half, 3), dtype=np.float32) * sigma).astype(np.int16)
        noise = cv2.resize(noise, (size, size), interpolation=cv2.INTER_NEAREST)
        image = cv2.add(image, noise, dtype=cv2.CV_8U)  # saturating
    if rng.random() < 0.25:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 0.8))
    return image


def render_scene(seed: int, split: str, index: int, image_size: int = 320) -> SynthScene:
    """Image `index` of `split` for `seed`: the image, its objects (exact boxes, visible areas) and who is where."""
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64, got {image_size}")
    rng = _rng(seed, split, index)
    size = int(image_size)
    image = _background(rng, size)
    layers = _Layers(size)

    def draw_clutter(on_top: bool) -> None:
        full = _clutter_mask(rng, size)
        box = _tight_box(full)
        if box is None:
            return
        mask, origin = full[box[1]:box[3], box[0]:box[2]], (box[0], box[1])
        if on_top and not layers.allows(mask, origin):
            return
        _paint(image, origin, mask, rng, _distinct_colour(rng, _backdrop(image, origin, mask)))
        layers.cover(mask, origin, None)

    clutter = int(rng.integers(0, 7))
    behind = int(rng.integers(0, clutter + 1))
    for _ in range(behind):
        draw_clutter(False)

    objects: list[tuple[int, tuple[int, int, int, int], np.ndarray]] = []
    wanted = int(rng.integers(1, MAX_OBJECTS + 1))
    # mostly larger shapes first, so that big objects find room and small ones lie on top (not always: a
    # small object may also be partly covered by a big one)
    extents = sorted((_sample_extent(rng, size) for _ in range(wanted)), reverse=True)
    if wanted > 1 and rng.random() < 0.3:
        extents = list(rng.permutation(extents))
    for extent in extents:
        kind = int(rng.integers(0, len(SYNTH_CLASSES)))
        placed = None
        for attempt in range(8):
            if attempt >= 4:  # no room at this size: try smaller
                extent = max(extent * 0.8, _SCALE_BANDS[0][1] * size)
            aspect = math.exp(rng.uniform(math.log(0.65), math.log(1.55)))
            scale = (extent / 2 * math.sqrt(aspect), extent / 2 / math.sqrt(aspect))
            ops = _place(_shape(kind, rng), scale, rng.uniform(0, 2 * np.pi))
            pts = np.vstack([p for p, _ in ops])
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            if np.any(hi - lo >= size - 2):
                continue
            centre = rng.uniform(-lo + 1, size - 1 - hi)  # the whole shape inside the image
            ops = [(p + centre, f) for p, f in ops]
            x0, y0 = (int(v) for v in np.floor(lo + centre))
            x1, y1 = (min(size, int(v) + 2) for v in np.ceil(hi + centre))
            x0, y0 = max(0, x0), max(0, y0)
            mask = _rasterise(ops, (x0, y0), (y1 - y0, x1 - x0))
            box = _tight_box(mask)
            if box is None or min(box[2] - box[0], box[3] - box[1]) < 4:
                continue
            # crop the window to the shape's own tight box
            mask = mask[box[1]:box[3], box[0]:box[2]]
            origin = (x0 + box[0], y0 + box[1])
            if layers.allows(mask, origin):
                placed = (mask, origin)
                break
        if placed is None:
            continue
        mask, (ox, oy) = placed
        h, w = mask.shape
        _paint(image, (ox, oy), mask, rng, _distinct_colour(rng, _backdrop(image, (ox, oy), mask)))
        index_ = len(objects)
        layers.boxes.append((ox, oy, ox + w, oy + h))
        layers.pixels.append(int(mask.sum()))
        layers.visible.append(int(mask.sum()))
        layers.cover(mask, (ox, oy), index_)
        objects.append((SYNTH_CATEGORY_IDS[kind], (ox, oy, ox + w, oy + h), mask))

    for _ in range(clutter - behind):
        draw_clutter(True)

    image = _finish(image, rng)
    result = tuple(SynthObject(cid, box, layers.visible[i], mask) for i, (cid, box, mask) in enumerate(objects))
    return SynthScene(image, result, layers.owner)


# --- writing ----------------------------------------------------------------------------------------------------
def _file_name(index: int) -> str:
    return f"{index + 1:012d}.jpg"


def coco_annotations(scenes: Sequence[tuple[int, Sequence[SynthObject]]], image_size: int, seed: int,
                     split: str) -> dict[str, Any]:
    """The instances JSON of (image index, its objects) pairs; image id = index + 1."""
    images, annotations = [], []
    for index, objects in scenes:
        images.append({"id": index + 1, "file_name": _file_name(index), "width": image_size, "height": image_size})
        for obj in objects:
            x0, y0, x1, y1 = obj.box
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": obj.category_id,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": obj.area, "iscrowd": 0})
    return {
        "info": {"description": _DESCRIPTION, "generator_version": GENERATOR_VERSION,
                 "seed": seed, "split": split, "image_size": image_size},
        "licenses": [],
        "categories": [{"id": cid, "name": name, "supercategory": "shape"}
                       for cid, name in zip(SYNTH_CATEGORY_IDS, SYNTH_CLASSES, strict=True)],
        "images": images,
        "annotations": annotations,
    }


def panoptic_segments(scene: SynthScene) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(int32 (S, S) segment ids, segments_info) of a scene: object i -> id i + 1, every pixel no object owns ->
    one "background" stuff segment, id n + 1 (left out when it has no pixel). bbox: the segment's visible pixels."""
    n = len(scene.objects)
    ids = np.where(scene.owner >= 0, scene.owner.astype(np.int32) + 1, np.int32(n + 1)).astype(np.int32)
    areas = np.bincount(ids.reshape(-1), minlength=n + 2)
    segments = []
    for sid in range(1, n + 2):
        if areas[sid] == 0:
            continue
        x0, y0, x1, y1 = _tight_box(ids == sid)  # type: ignore[misc]
        category = scene.objects[sid - 1].category_id if sid <= n else BACKGROUND_CATEGORY_ID
        segments.append({"id": sid, "category_id": category, "area": int(areas[sid]),
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "iscrowd": 0})
    return ids, segments


def panoptic_annotations(scenes: Sequence[tuple[int, Sequence[dict[str, Any]]]], image_size: int, seed: int,
                         split: str) -> dict[str, Any]:
    """The COCO panoptic JSON of (image index, its segments_info) pairs; image id = index + 1, PNG <stem>.png."""
    images, annotations = [], []
    for index, segments in scenes:
        name = _file_name(index)
        images.append({"id": index + 1, "file_name": name, "width": image_size, "height": image_size})
        annotations.append({"image_id": index + 1, "file_name": name[:-4] + ".png", "segments_info": list(segments)})
    categories = [{"id": cid, "name": name, "supercategory": "shape", "isthing": 1}
                  for cid, name in zip(SYNTH_CATEGORY_IDS, SYNTH_CLASSES, strict=True)]
    categories.append({"id": BACKGROUND_CATEGORY_ID, "name": BACKGROUND_NAME, "supercategory": "background",
                       "isthing": 0})
    return {"info": {"description": _DESCRIPTION, "generator_version": GENERATOR_VERSION, "seed": seed,
                     "split": split, "image_size": image_size},
            "licenses": [], "categories": categories, "images": images, "annotations": annotations}


@dataclass(frozen=True)
class _Rendered:
    index: int
    jpeg: bytes | None
    objects: tuple[SynthObject, ...]
    png: bytes | None
    segments: list[dict[str, Any]]


def _render_encoded(job: tuple[int, str, int, int, bool, bool]) -> _Rendered:
    """One image as JPEG bytes (if asked), its objects and (if asked) its panoptic PNG and segments (run in worker
    processes)."""
    seed, split, index, size, jpeg, panoptic = job
    scene = render_scene(seed, split, index, size)
    data = None
    if jpeg:
        ok, buf = cv2.imencode(".jpg", scene.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError("OpenCV could not encode a JPEG")
        data = buf.tobytes()
    png, segments = None, []
    if panoptic:
        ids, segments = panoptic_segments(scene)
        png = encode_panoptic_png(ids)
    return _Rendered(index, data, scene.objects, png, segments)


@contextlib.contextmanager
def _rendered(jobs: list[tuple[int, str, int, int, bool, bool]], workers: int) -> Iterator[Iterator[_Rendered]]:
    """The jobs' results in job order, rendered in `workers` processes."""
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers) as pool:
            yield pool.map(_render_encoded, jobs, chunksize=16)
    else:
        yield map(_render_encoded, jobs)


def _panoptic_paths(out: Path, split: str) -> tuple[Path, Path]:
    return out / "annotations" / f"panoptic_{split}.json", out / "annotations" / f"panoptic_{split}"


def write_dataset(output: str | os.PathLike, counts: dict[str, int], image_size: int = 320, seed: int = 0,
                  workers: int = 1, overwrite: bool = False, progress: Callable[[int], None] | None = None,
                  panoptic: bool = True) -> dict[str, Path]:
    """Write the splits in `counts` ({"train": N, "val": M}; 0 skips a split) under `output`, with their panoptic
    ground truth unless `panoptic` is False.

    Each split is rendered into hidden staging folders, which are renamed into place when complete; the
    annotation files are written last (the instances file after the panoptic one), under temporary names then
    renamed, so an interrupted run leaves no half-written split behind. Returns {split: instances file}.
    `progress(n)` is called as images finish.
    """
    out = Path(output)
    for split, n in counts.items():
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}: choose from {', '.join(SPLITS)}")
        if n < 0:
            raise ValueError(f"--{split} must be >= 0, got {n}")
    todo = {s: n for s, n in counts.items() if n > 0}
    if not todo:
        raise ValueError("nothing to write: give --train and/or --val a number of images > 0")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; pass a folder for the dataset")
    if not overwrite:
        existing = [p for s in todo for p in (out / s, out / "annotations" / f"instances_{s}.json",
                                              *_panoptic_paths(out, s)) if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(map(str, existing))} already exist; pass --overwrite to replace them, "
                                  "or choose another --output")
    written = {}
    for split, n in todo.items():
        written[split] = _write_split(out, split, n, image_size, seed, workers, progress, panoptic)
    return written


def _staging(path: Path) -> Path:
    staging = path.parent / f".{path.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)  # left by an interrupted run
    staging.mkdir(parents=True)
    return staging


def _publish_folder(staging: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def _write_split(out: Path, split: str, n: int, size: int, seed: int, workers: int,
                 progress: Callable[[int], None] | None, panoptic: bool) -> Path:
    staging = _staging(out / split)
    pan_json, pan_dir = _panoptic_paths(out, split)
    pan_staging = _staging(pan_dir) if panoptic else None
    jobs = [(seed, split, i, size, True, panoptic) for i in range(n)]
    scenes: list[tuple[int, tuple[SynthObject, ...]]] = []
    segments: list[tuple[int, list[dict[str, Any]]]] = []
    try:
        with _rendered(jobs, workers) as results:
            for r in results:
                (staging / _file_name(r.index)).write_bytes(r.jpeg)  # the staging folder is the temporary name
                scenes.append((r.index, r.objects))
                if pan_staging is not None:
                    (pan_staging / (_file_name(r.index)[:-4] + ".png")).write_bytes(r.png)
                    segments.append((r.index, r.segments))
                if progress is not None:
                    progress(1)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if pan_staging is not None:
            shutil.rmtree(pan_staging, ignore_errors=True)
        raise
    coco = coco_annotations(scenes, size, seed, split)
    ann = out / "annotations" / f"instances_{split}.json"
    ann.unlink(missing_ok=True)  # no annotation file may point at a folder in flux
    pan_json.unlink(missing_ok=True)
    _publish_folder(staging, out / split)
    if pan_staging is not None:
        _publish_folder(pan_staging, pan_dir)
        with atomic_path(pan_json) as tmp:
            tmp.write_text(json.dumps(panoptic_annotations(segments, size, seed, split), separators=(",", ":")))
    elif pan_dir.exists():  # an overwritten split keeps no panoptic files of the images it replaced
        shutil.rmtree(pan_dir)
    with atomic_path(ann) as tmp:
        tmp.write_text(json.dumps(coco, separators=(",", ":")))
    return ann


def add_panoptic(output: str | os.PathLike, splits: Sequence[str] | None = None, workers: int = 1,
                 overwrite: bool = False, progress: Callable[[int], None] | None = None,
                 on_split: Callable[[str, int], None] | None = None) -> dict[str, Path]:
    """Write the panoptic files of a synthetic dataset written without them (or by an older deimv2-deploy).

    The seed, split and image size come from each split's instances file; every image is rendered again and its
    objects must equal the file's annotations (category, box, area), else ValueError (the dataset is not this
    generator's output). `splits`: those to do (None: every split that has an instances file). Existing panoptic
    files are an error unless `overwrite`. `on_split(split, images)` is called before a split starts. Returns
    {split: panoptic JSON}. The images and instances files are only read."""
    out = Path(output)
    found = [s for s in SPLITS if (out / "annotations" / f"instances_{s}.json").is_file()]
    if not found:
        raise FileNotFoundError(f"{out} holds no synthetic dataset (no annotations/instances_{{{','.join(SPLITS)}}}"
                                ".json); generate one with deimv2-data synth --output DIR --val N")
    chosen = list(found if splits is None else splits)
    missing = [s for s in chosen if s not in found]
    if missing:
        raise FileNotFoundError(f"{out} has no {missing[0]!r} split (it has: {', '.join(found)})")
    if not overwrite:
        existing = [p for s in chosen for p in _panoptic_paths(out, s) if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(map(str, existing))} already exist; pass --overwrite to replace them")
    plans = {s: _synth_plan(out, s) for s in chosen}  # every split checked before any is written
    written = {}
    for split, (seed, size, indices, expected) in plans.items():
        if on_split is not None:
            on_split(split, len(indices))
        pan_json, pan_dir = _panoptic_paths(out, split)
        staging = _staging(pan_dir)
        segments: list[tuple[int, list[dict[str, Any]]]] = []
        try:
            with _rendered([(seed, split, i, size, False, True) for i in indices], workers) as results:
                for r in results:
                    got = [(o.category_id, list(_xywh(o.box)), o.area) for o in r.objects]
                    if got != expected[r.index]:
                        raise ValueError(f"image {_file_name(r.index)} of {out / split} does not match what seed "
                                         f"{seed} renders with generator version {GENERATOR_VERSION} (its objects "
                                         "differ from the instances file): regenerate the dataset with "
                                         "deimv2-data synth")
                    (staging / (_file_name(r.index)[:-4] + ".png")).write_bytes(r.png)
                    segments.append((r.index, r.segments))
                    if progress is not None:
                        progress(1)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        pan_json.unlink(missing_ok=True)
        _publish_folder(staging, pan_dir)
        with atomic_path(pan_json) as tmp:
            tmp.write_text(json.dumps(panoptic_annotations(segments, size, seed, split), separators=(",", ":")))
        written[split] = pan_json
    return written


def _xywh(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    return box[0], box[1], box[2] - box[0], box[3] - box[1]


def _synth_plan(out: Path, split: str) -> tuple[int, int, list[int], dict[int, list]]:
    """(seed, image size, image indices, index -> [(category, bbox, area)]) from a split's instances file, or
    ValueError when it is not a synthetic dataset this generator can render again."""
    ann = out / "annotations" / f"instances_{split}.json"
    data = json.loads(ann.read_text())
    info = data.get("info") if isinstance(data, dict) else None
    if not isinstance(info, dict) or info.get("description") != _DESCRIPTION:
        raise ValueError(f"{ann} was not written by deimv2-data synth (its info does not say so): panoptic files "
                         "can only be added to a synthetic dataset")
    if info.get("generator_version") != GENERATOR_VERSION or info.get("split") != split:
        raise ValueError(f"{ann} was written by generator version {info.get('generator_version')} for split "
                         f"{info.get('split')!r}; this deimv2-deploy renders version {GENERATOR_VERSION}: "
                         "regenerate the dataset with deimv2-data synth")
    seed, size = int(info["seed"]), int(info["image_size"])
    expected: dict[int, list] = {}
    for image in data["images"]:
        index = int(image["id"]) - 1
        if index < 0 or image.get("file_name") != _file_name(index) or (image.get("width"), image.get("height")) \
                != (size, size):
            raise ValueError(f"{ann}: image {image.get('id')} ({image.get('file_name')}) is not where the generator "
                             "puts image ids (file 00000000000<id>.jpg at the recorded size); was the file edited?")
        expected[index] = []
    for a in sorted(data["annotations"], key=lambda a: int(a["id"])):
        expected[int(a["image_id"]) - 1].append((int(a["category_id"]), [int(v) for v in a["bbox"]], int(a["area"])))
    return seed, size, sorted(expected), expected
