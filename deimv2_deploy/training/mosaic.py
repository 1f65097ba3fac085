"""Dense O2O mosaic (DEIM): four samples on one 2x2 canvas, then one random affine of the whole canvas.

Each of the four images is resized so its shorter side is `output_size` (PIL-like bilinear), the tiles are
placed at the top-left of the four quadrants of a canvas twice the largest tile (zeros elsewhere), and the
canvas goes through a random affine about its centre (rotation in [-r, r] degrees, translation up to a fraction
of the canvas rounded to whole pixels, scale in a range; nearest-neighbour, `fill_value` outside). Boxes follow:
the four corners of each box are mapped and the enclosing box is clamped to the canvas (torchvision's rule, so
a rotated box is loose); boxes pushed entirely outside are dropped.

The three partner samples come from one of two sources:
- "dataset" (default): three indices drawn from the sample's own generator and loaded through `loader`, so a
  sample depends only on (seed, epoch, index): deterministic for any number of workers and exactly resumable.
  Resized tiles are kept in a small LRU (`tile_cache_size`), a pure speed-up (a tile is a function of its index).
- "cache": the official cache. The current tile is appended to a list of at most `max_cached_images` (when
  full, a random entry other than the newest is evicted, or the oldest without `random_pop`) and the partners
  are drawn from that list, the current tile included. The list is state of this object (one per DataLoader
  worker, emptied on resume), so samples then depend on the order this worker saw them in.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import cv2
import numpy as np

from deimv2_deploy.preprocess import resize_like_pil

from .augment_recipe import MosaicSettings
from .transforms import Target, clamp_boxes, with_boxes

__all__ = ["Mosaic", "MOSAIC_SOURCES", "affine_matrix", "warp_affine", "resize_shorter_side"]

MOSAIC_SOURCES = ("dataset", "cache")
Loader = Callable[[int], tuple[np.ndarray, Target]]


def resize_shorter_side(image: np.ndarray, target: Target, size: int) -> tuple[np.ndarray, Target]:
    """Resize keeping aspect so the shorter side is `size` (torchvision Resize(int): the longer side is
    truncated to int(size * long / short))."""
    h, w = image.shape[:2]
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_h, new_w) == (h, w):
        return image, target
    scale = np.array([new_w / w, new_h / h, new_w / w, new_h / h], dtype=np.float32)
    return resize_like_pil(image, (new_h, new_w)), with_boxes(target, target["boxes"] * scale)


def affine_matrix(width: int, height: int, angle: float, translate: tuple[float, float], scale: float
                  ) -> np.ndarray:
    """2x3 forward map in continuous pixel coordinates (pixel i covers [i, i + 1)): rotate by `angle` degrees
    (counter-clockwise on screen) and scale about the canvas centre, then translate."""
    m = cv2.getRotationMatrix2D((width * 0.5, height * 0.5), float(angle), float(scale))
    m[:, 2] += translate
    return m


def warp_affine(image: np.ndarray, matrix: np.ndarray, fill: int) -> np.ndarray:
    """Apply a continuous-coordinate affine to an image (same size, nearest, constant fill)."""
    h, w = image.shape[:2]
    # OpenCV indexes pixel centres: p_idx = p - 0.5, so t_idx = t + A @ (0.5, 0.5) - 0.5
    m = matrix.copy()
    m[:, 2] += matrix[:, :2].sum(axis=1) * 0.5 - 0.5
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT,
                          borderValue=(fill, fill, fill))


def affine_boxes(boxes: np.ndarray, matrix: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boxes (N, 4) xyxy through the affine: enclosing box of the mapped corners, clamped to the canvas."""
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32)
    x1, y1, x2, y2 = boxes.T
    corners = np.stack([np.stack([x1, y1], 1), np.stack([x2, y1], 1), np.stack([x1, y2], 1),
                        np.stack([x2, y2], 1)], axis=1)  # (N, 4, 2)
    mapped = corners @ matrix[:, :2].T + matrix[:, 2]  # (N, 4, 2)
    out = np.concatenate([mapped.min(axis=1), mapped.max(axis=1)], axis=1)
    return clamp_boxes(out, width, height)


class Mosaic:
    """The Dense O2O mosaic as a sample transform `(image, target, rng) -> (image, target)`.

    `loader(i)` returns sample i before any augmentation (RGB uint8 image, target in pixels); `num_items` is
    how many there are. Only the "dataset" source needs them.
    """

    def __init__(self, settings: MosaicSettings, loader: Loader | None = None, num_items: int = 0,
                 source: str = "dataset", tile_cache_size: int = 64):
        if source not in MOSAIC_SOURCES:
            raise ValueError(f"unknown mosaic source {source!r}: choose one of {', '.join(MOSAIC_SOURCES)}")
        if source == "dataset" and (loader is None or num_items < 1):
            raise ValueError("the 'dataset' mosaic source needs loader= and num_items >= 1 (or use source='cache')")
        self.settings = settings
        self.loader, self.num_items, self.source = loader, int(num_items), source
        self.tile_cache_size = int(tile_cache_size)
        self._tiles: OrderedDict[int, tuple[np.ndarray, Target]] = OrderedDict()  # dataset source: LRU
        self.cache: list[tuple[np.ndarray, Target]] = []  # cache source: the official list

    def _tile(self, index: int) -> tuple[np.ndarray, Target]:
        tile = self._tiles.get(index)
        if tile is not None:
            self._tiles.move_to_end(index)
            return tile
        image, target = self.loader(index)
        tile = resize_shorter_side(image, target, self.settings.output_size)
        if self.tile_cache_size > 0:
            self._tiles[index] = tile
            if len(self._tiles) > self.tile_cache_size:
                self._tiles.popitem(last=False)
        return tile

    def _partners(self, current: tuple[np.ndarray, Target], rng: np.random.Generator
                  ) -> list[tuple[np.ndarray, Target]]:
        if self.source == "dataset":
            return [self._tile(int(i)) for i in rng.integers(0, self.num_items, size=3)]
        self.cache.append(current)
        if len(self.cache) > self.settings.max_cached_images:
            drop = int(rng.integers(0, len(self.cache) - 1)) if self.settings.random_pop else 0
            self.cache.pop(drop)  # never the newest
        return [self.cache[int(i)] for i in rng.integers(0, len(self.cache), size=3)]

    def __call__(self, image: np.ndarray, target: Target, rng: np.random.Generator) -> tuple[np.ndarray, Target]:
        s = self.settings
        if s.probability < 1.0 and rng.random() >= s.probability:
            return image, target  # as the official: the sample then also skips zoom-out and crop
        current = resize_shorter_side(image, target, s.output_size)
        tiles = [current] + self._partners(current, rng)

        # 2x2 canvas of the largest tile's size; tile k at the top-left of quadrant k
        tile_h = max(t[0].shape[0] for t in tiles)
        tile_w = max(t[0].shape[1] for t in tiles)
        canvas = np.zeros((2 * tile_h, 2 * tile_w, 3), dtype=np.uint8)
        boxes, labels = [], []
        for (img, tgt), (ox, oy) in zip(tiles, ((0, 0), (tile_w, 0), (0, tile_h), (tile_w, tile_h)), strict=True):
            canvas[oy:oy + img.shape[0], ox:ox + img.shape[1]] = img
            boxes.append(tgt["boxes"] + np.array([ox, oy, ox, oy], dtype=np.float32))
            labels.append(tgt["labels"])
        boxes_all = np.concatenate(boxes).astype(np.float32).reshape(-1, 4)
        labels_all = np.concatenate(labels).astype(np.int64)

        # one random affine of the whole canvas (torchvision RandomAffine's draws)
        height, width = canvas.shape[:2]
        angle = rng.uniform(-s.rotation_range, s.rotation_range)
        max_dx, max_dy = s.translation_range[0] * width, s.translation_range[1] * height
        translate = (float(round(rng.uniform(-max_dx, max_dx))), float(round(rng.uniform(-max_dy, max_dy))))
        scale = rng.uniform(*s.scaling_range)
        matrix = affine_matrix(width, height, angle, translate, scale)
        out = warp_affine(canvas, matrix, s.fill_value)
        boxes_all = affine_boxes(boxes_all, matrix, width, height)
        keep = (boxes_all[:, 2] > boxes_all[:, 0]) & (boxes_all[:, 3] > boxes_all[:, 1])
        return out, {"boxes": boxes_all[keep], "labels": labels_all[keep]}
