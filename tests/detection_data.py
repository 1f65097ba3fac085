"""Datasets whose ground truth is part of a runtime's own detections (jittered), plus objects it misses: a real
(random-weight) runtime then scores well above zero on them, so accuracy numbers have substance."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from deimv2_deploy.data.synth import render_scene
from deimv2_deploy.media import read_image

__all__ = ["write_dataset_from_detections", "nms", "iou", "THREE_CLASSES", "THREE_CATEGORY_IDS"]

THREE_CLASSES = ("cat", "dog", "bird")  # the custom-class model of the tests (conftest.three_class_model)
THREE_CATEGORY_IDS = (11, 37, 90)  # not 1..3: labels must map through the ids the model carries

SIZES = ((320, 240), (200, 300), (416, 416), (640, 480), (256, 256), (300, 180))  # (width, height)


def nms(order: list[int], boxes: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> list[int]:
    """Indices (best first) kept by greedy per-class suppression: ground truth that its own detection matches."""
    kept: list[int] = []
    for k in order:
        b = boxes[k]
        if all(labels[j] != labels[k] or iou(b, boxes[j]) < threshold for j in kept):
            kept.append(k)
    return kept


def iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def write_dataset_from_detections(runtime, root: Path, category_ids: Sequence[int], class_names: Sequence[str],
                                  count: int = 12, seed: int = 1) -> tuple[Path, Path]:
    """(images folder, annotation file) of `count` synthetic scenes of several sizes under `root`: up to 8 of the
    runtime's own detections per image (suppressed per class, jittered by about a pixel) as ground truth, labelled
    with `category_ids[label]` / `class_names`, plus one object per image it misses."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        image = cv2.resize(render_scene(3, "val", i, 320).image, (w, h), interpolation=cv2.INTER_AREA)
        name = f"{i:04d}.jpg"
        cv2.imwrite(str(images_dir / name), image)
        image = read_image(images_dir / name)
        images.append({"id": 100 + i, "file_name": name, "width": w, "height": h})
        dets = runtime.predict(image)
        boxes = dets.xyxy.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        wh = boxes[:, 2:] - boxes[:, :2]
        chosen = nms([k for k in range(len(dets)) if (wh[k] >= 4).all()], boxes, dets.labels)[:8]
        for k in chosen:
            x0, y0 = boxes[k, :2] + rng.normal(0, 1.0, 2)
            bw, bh = wh[k] * rng.uniform(0.93, 1.07, 2)
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": int(category_ids[dets.labels[k]]),
                         "bbox": [float(x0), float(y0), float(bw), float(bh)], "area": float(bw * bh), "iscrowd": 0})
        anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": int(category_ids[dets.labels[0]]),
                     "bbox": [2.0, h * 0.6, w / 3, h / 3], "area": w * h / 9, "iscrowd": 0})  # one it misses
    cats = [{"id": int(c), "name": n, "supercategory": ""} for c, n in zip(category_ids, class_names, strict=True)]
    ann = root / "instances_val.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return images_dir, ann
