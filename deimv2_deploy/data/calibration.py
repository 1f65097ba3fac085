"""INT8 calibration images from a folder of images or a COCO-format dataset (OpenVINO and TensorRT exports,
deimv2-bench's INT8 rows). No torch."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from deimv2_deploy.data.coco import DatasetError, load_coco, resolve_dataset
from deimv2_deploy.media import IMAGE_EXTENSIONS, expand_image_paths

__all__ = ["select_calibration_images", "CALIBRATION_SPLITS"]

CALIBRATION_SPLITS = ("val", "train")  # the split of a dataset folder calibration reads, the first one present

_WHAT = ("a folder of images like those the model will see, or a COCO-format dataset (its folder, or its "
         "annotation .json)")


def select_calibration_images(source: str | os.PathLike | Sequence[str | os.PathLike], count: int) -> list[Path]:
    """Up to `count` image files, spread evenly over the sorted list (deterministic), from `source`:

    - a folder of images;
    - a COCO-format dataset folder (`deimv2_deploy.data.resolve_dataset`'s layouts; its val split, else train):
      the images its annotation file lists;
    - a COCO annotation file (.json): the images it lists (found as `resolve_dataset` finds them);
    - a list of image files and folders.
    """
    if count < 1:
        raise ValueError(f"calibration_size must be at least 1, got {count}")
    if isinstance(source, (str, os.PathLike)):
        paths = _images_of(Path(source))
    else:
        paths = sorted(set(expand_image_paths(source)))
        if not paths:
            raise FileNotFoundError(f"no calibration images found in {source}")
    if len(paths) <= count:
        return paths
    return [paths[(i * len(paths)) // count] for i in range(count)]


def _images_of(root: Path) -> list[Path]:
    if not root.exists():
        raise FileNotFoundError(f"calibration folder {root} does not exist: pass --calibration DIR, {_WHAT}")
    if root.is_file():
        if root.suffix.lower() != ".json":
            raise NotADirectoryError(f"--calibration must be a folder of images or a COCO-format dataset (its folder "
                                     f"or annotation .json), got the file {root}")
        return _dataset_images(resolve_dataset(annotations=root))
    images = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if images:
        return images
    for split in CALIBRATION_SPLITS:
        try:
            paths = resolve_dataset(root, split=split)
        except DatasetError:
            continue
        return _dataset_images(paths)
    raise FileNotFoundError(f"calibration folder {root} has no images ({', '.join(IMAGE_EXTENSIONS)}) and no COCO "
                            f"dataset layout ({' or '.join(CALIBRATION_SPLITS)} split): pass {_WHAT}")


def _dataset_images(paths) -> list[Path]:
    dataset = load_coco(paths.images_dir, paths.annotation_file)  # DatasetError names what is wrong with it
    return sorted({record.file for record in dataset.images})
