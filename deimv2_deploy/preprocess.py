"""Preprocessing in numpy/OpenCV (no torch): any uint8 image -> the graph's `images` and `orig_target_sizes`.

Resize modes:
- "stretch" (default, as the official evaluation): the image is resized to the input size ignoring aspect;
  `orig_target_sizes` is the original (width, height), so the graph returns boxes in original pixels.
- "letterbox": scaled to fit, centred, padded with grey (114); the graph returns boxes on the padded canvas
  and `Transform.boxes_to_original` maps them back exactly.
The official evaluation resizes with PIL bilinear + antialias. We resize each axis with OpenCV's area filter
when shrinking and bilinear when enlarging (PIL's bilinear is plain bilinear there), which stays within about
one grey level of PIL on average at a fraction of its cost (numbers in README).
Cost: a 640x480 BGR frame is resized in its own channel order (resizing is per channel), then each plane goes
through a 256-entry float32 table that applies the scale, offset and channel swap in one pass, writing straight
into the (3, H, W) batch: no colour-conversion pass, no float HWC temporary, no transpose.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from deimv2_deploy.spec import ArtifactSpec

__all__ = ["Transform", "PreparedBatch", "Preprocessor", "as_rgb_uint8", "image_list", "resize_like_pil", "letterbox"]

_NONE_IMAGE = ("image is None (cv2.imread returns None when a file is missing or cannot be decoded): check the path, "
               "or read it with deimv2_deploy.media.read_image, which says what is wrong")

PAD_VALUE = 114


@dataclass(frozen=True)
class Transform:
    """How one original image maps to the model input, to map boxes back."""

    orig_size: tuple[int, int]  # (height, width) of the original image
    scale: tuple[float, float] = (1.0, 1.0)  # (sx, sy) canvas pixels per original pixel (letterbox only)
    pad: tuple[float, float] = (0.0, 0.0)  # (left, top) padding on the canvas (letterbox only)
    letterboxed: bool = False

    def boxes_to_original(self, boxes: np.ndarray, clip: bool = True) -> np.ndarray:
        """Boxes (N, 4) xyxy from graph output coordinates to original-image pixels, clipped to the image unless
        `clip` is False (the model's boxes may reach a little past its edges: a 1x1 image would get x1 = -0.023)."""
        out = boxes.astype(np.float32, copy=True)
        if self.letterboxed:  # else the graph already scaled them by orig_target_sizes
            out[:, 0::2] = (out[:, 0::2] - self.pad[0]) / self.scale[0]
            out[:, 1::2] = (out[:, 1::2] - self.pad[1]) / self.scale[1]
        if not clip:
            return out
        h, w = self.orig_size
        np.clip(out[:, 0::2], 0.0, float(w), out=out[:, 0::2])
        np.clip(out[:, 1::2], 0.0, float(h), out=out[:, 1::2])
        return out


@dataclass(frozen=True)
class PreparedBatch:
    images: np.ndarray  # float32 (N, 3, H, W)
    orig_target_sizes: np.ndarray  # int64 (N, 2) as (width, height)
    transforms: tuple[Transform, ...]

    def as_inputs(self) -> dict[str, np.ndarray]:
        return {"images": self.images, "orig_target_sizes": self.orig_target_sizes}


def image_list(images: np.ndarray | Sequence[np.ndarray] | None) -> tuple[list[np.ndarray], bool]:
    """(the images as a list, whether one image was given rather than a list); clear errors for None (what
    cv2.imread returns for a missing file) and for arrays that are no image."""
    if images is None:
        raise ValueError(_NONE_IMAGE)
    if isinstance(images, np.ndarray):
        if images.ndim in (2, 3):
            return [images], True
        if images.ndim != 4:
            raise ValueError(f"image must have shape (H, W, 3), got an array of shape {images.shape}")
    items = list(images)
    if not items:
        raise ValueError("no images given")
    return items, False


def as_rgb_uint8(image: np.ndarray, color: str = "bgr") -> np.ndarray:
    """A (H, W, 3) uint8 RGB view/copy of `image` (BGR or RGB; gray and 4-channel accepted)."""
    if image is None:
        raise ValueError(_NONE_IMAGE)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array (H, W, 3) uint8, got {type(image).__name__}; "
                        "read files with deimv2_deploy.media.read_image")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (0..255), got dtype {image.dtype}; convert with "
                         "np.clip(x * 255, 0, 255).astype(np.uint8) if it is float in [0, 1]")
    if image.ndim in (2, 3) and (image.shape[0] < 1 or image.shape[1] < 1):
        raise ValueError(f"image is empty: shape {image.shape}")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image.reshape(image.shape[0], image.shape[1]), cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if color not in ("bgr", "rgb"):
        raise ValueError(f"color must be 'bgr' or 'rgb', got {color!r}")
    if image.shape[2] == 4:
        code = cv2.COLOR_BGRA2RGB if color == "bgr" else cv2.COLOR_RGBA2RGB
        return cv2.cvtColor(image, code)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if color == "bgr" else image


def _is_three_channel_uint8(image: object) -> bool:
    return (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            and image.shape[0] > 0 and image.shape[1] > 0)


def resize_like_pil(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize to (height, width) close to PIL bilinear-with-antialias: area when shrinking, bilinear when enlarging."""
    h, w = image.shape[:2]
    th, tw = size_hw
    if (h, w) == (th, tw):
        return image
    shrink_x, shrink_y = tw < w, th < h
    if shrink_x == shrink_y:  # one filter serves both axes
        return cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA if shrink_x else cv2.INTER_LINEAR)
    # mixed: shrink one axis with area, then enlarge the other bilinearly
    if shrink_x:
        image = cv2.resize(image, (tw, h), interpolation=cv2.INTER_AREA)
        return cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR)
    image = cv2.resize(image, (w, th), interpolation=cv2.INTER_AREA)
    return cv2.resize(image, (tw, th), interpolation=cv2.INTER_LINEAR)


def letterbox(image: np.ndarray, size_hw: tuple[int, int]) -> tuple[np.ndarray, Transform]:
    """Fit inside (height, width) keeping aspect, centred on a grey canvas."""
    h, w = image.shape[:2]
    th, tw = size_hw
    r = min(th / h, tw / w)
    nh, nw = max(1, round(h * r)), max(1, round(w * r))
    resized = resize_like_pil(image, (nh, nw))
    top, left = (th - nh) // 2, (tw - nw) // 2
    canvas = np.full((th, tw, 3), PAD_VALUE, np.uint8)
    canvas[top:top + nh, left:left + nw] = resized
    return canvas, Transform((h, w), (nw / w, nh / h), (float(left), float(top)), letterboxed=True)


class Preprocessor:
    """Turns images into the graph's inputs exactly as the artifact's spec says."""

    def __init__(self, spec: ArtifactSpec, resize: str | None = None) -> None:
        self.spec = spec
        self.resize = resize or spec.resize
        if self.resize not in ("stretch", "letterbox"):
            raise ValueError(f"resize must be 'stretch' or 'letterbox', got {self.resize!r}")
        # normalisation as one table lookup per pixel: value v of channel c -> float32(v) * scale_c + offset_c,
        # rounded exactly as the arithmetic would be (x / 255 -> (x / 255 - mean) / std)
        if spec.mean is not None:
            std = np.asarray(spec.std, np.float32)
            scale = (1.0 / (255.0 * std)).astype(np.float32)
            offset = (-np.asarray(spec.mean, np.float32) / std).astype(np.float32)
        else:
            scale = np.full(3, 1.0 / 255.0, np.float32)
            offset = np.zeros(3, np.float32)
        levels = np.arange(256, dtype=np.float32)
        self._tables = tuple(levels * scale[c] + offset[c] for c in range(3))  # RGB order, (256,) float32 each

    def prepare_one(self, image: np.ndarray, color: str = "bgr", out: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray, Transform]:
        """(chw float32 (3, H, W), orig_target_size int64 (2,), Transform) of one image."""
        if _is_three_channel_uint8(image) and color in ("bgr", "rgb"):
            pixels = np.ascontiguousarray(image)  # resized in its own channel order, undone by the lookup
            first_plane = 2 if color == "bgr" else 0
        else:
            pixels, first_plane = as_rgb_uint8(image, color), 0  # validates and converts gray / 4-channel
        h, w = pixels.shape[:2]
        if self.resize == "letterbox":
            resized, transform = letterbox(pixels, self.spec.input_size)
            target = np.array([self.spec.input_size[1], self.spec.input_size[0]], np.int64)
        else:
            resized = resize_like_pil(pixels, self.spec.input_size)
            transform = Transform((h, w))
            target = np.array([w, h], np.int64)
        chw = out if out is not None else np.empty((3, *self.spec.input_size), np.float32)
        planes = cv2.split(np.ascontiguousarray(resized))  # 3 x (H, W) uint8
        for c, table in enumerate(self._tables):  # one pass per plane: swap, scale and offset at once
            plane = planes[abs(first_plane - c)]
            written = cv2.LUT(plane, table, dst=chw[c])
            if not np.shares_memory(written, chw):  # OpenCV allocated instead of writing in place
                chw[c] = written
        return chw, target, transform

    def __call__(self, images: np.ndarray | Sequence[np.ndarray], color: str = "bgr") -> PreparedBatch:
        images, _ = image_list(images)
        n = len(images)
        batch = np.empty((n, 3, *self.spec.input_size), np.float32)
        targets = np.empty((n, 2), np.int64)
        transforms = []
        for i, image in enumerate(images):
            _, targets[i], t = self.prepare_one(image, color, out=batch[i])
            transforms.append(t)
        return PreparedBatch(batch, targets, tuple(transforms))
