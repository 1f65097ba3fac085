"""Reading and writing images (no torch). Video I/O lives in `deimv2_deploy.video`."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "read_image", "write_image", "expand_image_paths", "atomic_path",
           "publish"]

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


def publish(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename a finished temporary file onto its final name, with the permissions a new file would get
    (mkstemp creates 0600 files)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, final)
    return Path(final)


class atomic_path:
    """Context manager giving a temporary path beside `final`; renamed onto `final` only on success."""

    def __init__(self, final: str | os.PathLike) -> None:
        self.final = Path(final)

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.final.stem}.", suffix=f".partial{self.final.suffix}",
                                   dir=self.final.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None and self.tmp.exists() and self.tmp.stat().st_size > 0:
            publish(self.tmp, self.final)
        else:
            self.tmp.unlink(missing_ok=True)
            if exc_type is None:
                raise OSError(f"nothing was written to {self.final}")
        return False


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write atomically (no half-written file under the final name)."""
    p = Path(path)
    ext = p.suffix.lower() or ".jpg"
    ok, buf = cv2.imencode(ext, image)
    if not ok:
        raise ValueError(f"cannot encode an image as {ext}")
    with atomic_path(p) as tmp:
        buf.tofile(str(tmp))
    return p


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
