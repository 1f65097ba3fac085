"""Reading and writing images (no torch). Video I/O lives in `deimv2_deploy.video`."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from deimv2_deploy.files import atomic_write as atomic_path  # the one atomic writer, under its older name
from deimv2_deploy.files import write_bytes

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "read_image", "write_image", "expand_image_paths", "atomic_path"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


def read_image(path: str | os.PathLike, exif_orientation: bool = True) -> np.ndarray:
    """A BGR uint8 (H, W, 3) image; clear errors for missing, empty or undecodable files.

    exif_orientation=False keeps the stored orientation, the one COCO annotation files (and the official PIL
    reader) describe: training and evaluation read their images that way."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"image not found: {p}")
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a folder; pass image files, or the folder to deimv2-infer")
    if p.stat().st_size == 0:
        raise ValueError(f"image file is empty: {p}")
    data = np.fromfile(str(p), dtype=np.uint8)
    flags = cv2.IMREAD_COLOR if exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    image = cv2.imdecode(data, flags)
    if image is None:
        raise ValueError(f"cannot decode {p} as an image (corrupt, or not one of {', '.join(IMAGE_EXTENSIONS)})")
    return image


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write atomically (no half-written file under the final name; the size is checked before publishing)."""
    p = Path(path)
    ext = p.suffix.lower() or ".jpg"
    ok, buf = cv2.imencode(ext, image)
    if not ok:
        raise ValueError(f"cannot encode an image as {ext}")
    return write_bytes(p, buf.tobytes())


def expand_image_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files from files and folders (folders: their images, sorted, not recursive)."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file())
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    return paths
