"""INT8 calibration image selection (deimv2_deploy.data.calibration): folders, COCO datasets, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from deimv2_deploy.data import DatasetError
from deimv2_deploy.data.calibration import select_calibration_images


def _dataset(root: Path, count: int = 5) -> tuple[Path, Path]:
    """(images folder, annotation file) of `count` tiny images, one box each, plus an image the file does not list."""
    images = root / "val"
    images.mkdir(parents=True)
    entries = []
    for i in range(count):
        cv2.imwrite(str(images / f"im_{i}.png"), np.full((16, 16, 3), 10 * i, np.uint8))
        entries.append({"id": i + 1, "file_name": f"im_{i}.png", "width": 16, "height": 16})
    cv2.imwrite(str(images / "unlisted.png"), np.zeros((16, 16, 3), np.uint8))
    ann = root / "annotations" / "instances_val.json"
    ann.parent.mkdir()
    ann.write_text(json.dumps({"images": entries, "categories": [{"id": 1, "name": "thing"}],
                               "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1,
                                                "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}
                                               for i in range(count)]}))
    return images, ann


def test_folder_selection_is_sorted_spread_and_deterministic(tmp_path):
    images, _ = _dataset(tmp_path)
    every = sorted(images.glob("*.png"))
    assert select_calibration_images(images, 300) == every
    two = select_calibration_images(images, 2)
    assert two == [every[0], every[3]] and two == select_calibration_images(str(images), 2)
    assert select_calibration_images([every[4], images], 300) == every  # a list: files and folders, each once


def test_a_coco_dataset_gives_the_images_its_annotation_file_lists(tmp_path):
    images, ann = _dataset(tmp_path)
    listed = [images / f"im_{i}.png" for i in range(5)]
    assert select_calibration_images(ann, 300) == listed  # the annotation file: not unlisted.png
    assert select_calibration_images(tmp_path, 300) == listed  # the dataset folder (COCO layout, val split)
    assert select_calibration_images(ann, 2) == [listed[0], listed[2]]


def test_calibration_bad_input_says_what_to_pass(tmp_path):
    images, ann = _dataset(tmp_path / "d")
    with pytest.raises(ValueError, match="at least 1"):
        select_calibration_images(images, 0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        select_calibration_images(tmp_path / "nowhere", 3)
    with pytest.raises(NotADirectoryError, match="must be a folder of images or a COCO-format dataset"):
        select_calibration_images(images / "im_0.png", 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no COCO dataset layout"):
        select_calibration_images(tmp_path / "empty", 3)
    (images / "im_1.png").unlink()  # listed but missing on disk
    with pytest.raises(DatasetError, match="im_1.png"):
        select_calibration_images(ann, 3)
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError):
        select_calibration_images(tmp_path / "bad.json", 3)
