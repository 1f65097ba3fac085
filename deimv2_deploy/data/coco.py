"""COCO-format detection datasets: read, check, and (for training) sanitise them. No torch.

A dataset is an images folder plus an instances JSON (`images`, `annotations`, `categories`). `load_coco` reads it
into one frozen `ImageRecord` per image and fails with a `DatasetError` (one line: what is wrong, what to do) on
anything it cannot use. It keeps the boxes as the file gives them, which is what evaluation must score against;
`sanitize_for_training` then clips, drops and counts, so that training never runs on silently wrong targets.

Labels: the model's label i is the i-th category of the dataset's category list ordered by id
(`CocoDataset.label_mapping`), never `category_id - 1`; for the COCO file this is the official 80-class table.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from deimv2_deploy.data.categories import Category, CategoryMapping

__all__ = ["DatasetError", "ImageRecord", "CocoDataset", "SanitizeReport", "DatasetPaths", "load_coco",
           "sanitize_for_training", "resolve_dataset", "read_annotation_json", "read_record_image"]

_SHOW = 5  # offending names listed in an error before "..."


class DatasetError(ValueError):
    """A COCO-format dataset that cannot be used as given; the message names the problem and what to do."""


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """One image and its objects. Arrays are read-only; `boxes` float32 (N, 4) xyxy in pixels of this image."""

    id: int
    file: Path
    width: int
    height: int
    boxes: np.ndarray  # float32 (N, 4) xyxy pixels
    category_ids: np.ndarray  # int64 (N,)
    iscrowd: np.ndarray  # bool (N,)
    areas: np.ndarray  # float32 (N,) the file's `area` (segment area), what COCO's small/medium/large use

    def __post_init__(self) -> None:
        n = len(self.category_ids)
        object.__setattr__(self, "boxes", _frozen(np.asarray(self.boxes, np.float32).reshape(n, 4)))
        object.__setattr__(self, "category_ids", _frozen(np.asarray(self.category_ids, np.int64).reshape(n)))
        object.__setattr__(self, "iscrowd", _frozen(np.asarray(self.iscrowd, bool).reshape(n)))
        object.__setattr__(self, "areas", _frozen(np.asarray(self.areas, np.float32).reshape(n)))

    def __len__(self) -> int:
        return int(self.category_ids.shape[0])

    def __repr__(self) -> str:
        return (f"ImageRecord(id={self.id}, file={str(self.file)!r}, size={self.width}x{self.height}, "
                f"objects={len(self)})")


@dataclass(frozen=True)
class SanitizeReport:
    """What `sanitize_for_training` changed, to print (never silent)."""

    images: int = 0
    objects_in: int = 0
    objects_out: int = 0
    boxes_clipped: int = 0  # boxes that reached outside their image, clipped to it
    boxes_degenerate: int = 0  # zero width or height (after clipping), skipped
    crowd_skipped: int = 0  # iscrowd=1 regions: not objects to match (as the official data pipeline)
    images_without_objects: int = 0  # kept: valid negatives

    def summary(self) -> str:
        parts = [f"{self.images} images, {self.objects_out} of {self.objects_in} objects kept"]
        if self.boxes_clipped:
            parts.append(f"{self.boxes_clipped} boxes clipped to their image")
        if self.boxes_degenerate:
            parts.append(f"{self.boxes_degenerate} zero-area boxes skipped")
        if self.crowd_skipped:
            parts.append(f"{self.crowd_skipped} crowd regions skipped")
        if self.images_without_objects:
            parts.append(f"{self.images_without_objects} images without objects kept as negatives")
        return "; ".join(parts)


@dataclass(frozen=True, eq=False)
class CocoDataset:
    """A checked COCO-format dataset: records in file order, categories ordered by id."""

    images: tuple[ImageRecord, ...]
    categories: tuple[Category, ...]
    annotation_file: Path
    images_dir: Path
    coco_json: dict[str, Any] = field(repr=False)  # the file as read (what an evaluator scores against)
    report: SanitizeReport | None = None  # set by sanitize_for_training

    def __len__(self) -> int:
        return len(self.images)

    @property
    def category_ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.categories)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    @property
    def num_objects(self) -> int:
        return sum(len(r) for r in self.images)

    def label_mapping(self) -> CategoryMapping:
        """Label i <-> the i-th category by id: how a model trained on this dataset numbers its classes."""
        return CategoryMapping(self.category_ids, self.class_names)

    def labels(self, record: ImageRecord) -> np.ndarray:
        """Contiguous labels (int64) of a record's objects."""
        return self.label_mapping().to_labels(record.category_ids)

    def subset(self, count: int | None) -> CocoDataset:
        """The first `count` images (file order); all of them for None."""
        if count is None or count >= len(self.images):
            return self
        if count < 1:
            raise DatasetError(f"the number of images to use must be >= 1, got {count}")
        return replace(self, images=self.images[:count])


@dataclass(frozen=True)
class DatasetPaths:
    images_dir: Path
    annotation_file: Path


# --- reading -------------------------------------------------------------------------------------------------
def read_annotation_json(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed instances file, or a DatasetError naming why it cannot be used."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"annotation file not found: {p}; pass the COCO instances JSON "
                           "(e.g. DIR/annotations/instances_val2017.json)")
    if p.is_dir():
        raise DatasetError(f"annotation path {p} is a folder; pass the instances JSON file inside it")
    try:
        with open(p, "rb") as f:
            data = json.loads(f.read())
    except OSError as e:
        raise DatasetError(f"cannot read annotation file {p}: {e.strerror or e}; check its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"annotation file {p} is not valid JSON ({e}); pass a COCO instances JSON") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{p} is not a COCO annotation file: its top level is a {type(data).__name__}, "
                           "not an object with 'images', 'annotations' and 'categories'")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        found = ", ".join(sorted(map(str, data))[:8]) or "none"
        raise DatasetError(f"{p} is not a COCO detection file: no list {', '.join(repr(k) for k in missing)} "
                           f"(top-level keys: {found}); pass an instances_*.json with images, annotations and "
                           "categories")
    return data


def _int_field(entry: Any, key: str, what: str, where: Path, minimum: int | None = None) -> int:
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: a {what} entry is a {type(entry).__name__}, not an object; fix the file")
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise DatasetError(f"{where}: {what} entry {_short(entry)} has no integer {key!r}; fix the file")
    if minimum is not None and value < minimum:
        raise DatasetError(f"{where}: {what} entry {_short(entry)} has {key}={value}, expected >= {minimum}; "
                           "fix the file")
    return int(value)


def _short(entry: Any) -> str:
    text = json.dumps(entry, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _list_some(items: Sequence[Any]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOW])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _SHOW else "")


def load_coco(images_dir: str | os.PathLike, annotation_file: str | os.PathLike,
              check_images: bool = True) -> CocoDataset:
    """Read and check a COCO-format detection dataset (boxes as the file gives them, converted to xyxy).

    Raises DatasetError for: a missing/unreadable/non-COCO annotation file, malformed or duplicate entries, no
    images, annotations naming unknown images or categories, and (check_images) listed images missing on disk.
    """
    ann_path, img_dir = Path(annotation_file), Path(images_dir)
    data = read_annotation_json(ann_path)
    if check_images:
        if not img_dir.exists():
            raise DatasetError(f"image folder not found: {img_dir}; pass the folder holding the images that "
                               f"{ann_path.name} lists")
        if not img_dir.is_dir():
            raise DatasetError(f"image folder {img_dir} is a file; pass the folder holding the images")

    categories: dict[int, Category] = {}
    for entry in data["categories"]:
        cid = _int_field(entry, "id", "category", ann_path, minimum=0)
        if cid in categories:
            raise DatasetError(f"{ann_path}: category id {cid} is listed twice; fix the file")
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise DatasetError(f"{ann_path}: category {cid} has no name; fix the file")
        categories[cid] = Category(cid, name, str(entry.get("supercategory") or ""))
    if not categories:
        raise DatasetError(f"{ann_path} lists no categories; a detection dataset needs at least one")

    images: dict[int, dict[str, Any]] = {}
    for entry in data["images"]:
        iid = _int_field(entry, "id", "image", ann_path)
        if iid in images:
            raise DatasetError(f"{ann_path}: image id {iid} is listed twice; fix the file")
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise DatasetError(f"{ann_path}: image {iid} has no file_name; fix the file")
        for key in ("width", "height"):
            _int_field(entry, key, "image", ann_path, minimum=1)
        images[iid] = entry
    if not images:
        raise DatasetError(f"{ann_path} lists no images: the dataset is empty; pass a split that has images")

    per_image: dict[int, list[tuple[list[float], int, bool, float]]] = {iid: [] for iid in images}
    unknown_images: list[int] = []
    unknown_categories: list[int] = []
    for entry in data["annotations"]:
        image_id = _int_field(entry, "image_id", "annotation", ann_path)
        category_id = _int_field(entry, "category_id", "annotation", ann_path)
        bbox = entry.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float))
                                                                    and not isinstance(v, bool) for v in bbox)
                or not all(math.isfinite(v) for v in bbox)):
            raise DatasetError(f"{ann_path}: annotation {_short(entry)} has no bbox [x, y, width, height] of 4 "
                               "finite numbers; fix the file")
        if image_id not in images:
            unknown_images.append(image_id)
            continue
        if category_id not in categories:
            unknown_categories.append(category_id)
            continue
        x, y, w, h = (float(v) for v in bbox)
        area = entry.get("area")
        area = float(area) if isinstance(area, (int, float)) and not isinstance(area, bool) else w * h
        per_image[image_id].append(([x, y, x + w, y + h], category_id, bool(entry.get("iscrowd", 0)), area))
    if unknown_images:
        raise DatasetError(f"{ann_path}: {len(unknown_images)} annotations refer to image ids the file does not "
                           f"list ({_list_some(sorted(set(unknown_images)))}); fix or remove them")
    if unknown_categories:
        raise DatasetError(f"{ann_path}: {len(unknown_categories)} annotations refer to category ids the file does "
                           f"not list ({_list_some(sorted(set(unknown_categories)))}); known ids: "
                           f"{_list_some(sorted(categories))}; fix the categories or the annotations")

    records = []
    for iid, entry in images.items():
        objs = per_image[iid]
        records.append(ImageRecord(
            id=iid, file=img_dir / entry["file_name"], width=int(entry["width"]), height=int(entry["height"]),
            boxes=np.array([o[0] for o in objs], np.float64).reshape(-1, 4),
            category_ids=np.array([o[1] for o in objs], np.int64), iscrowd=np.array([o[2] for o in objs], bool),
            areas=np.array([o[3] for o in objs], np.float64)))
    if check_images:
        _check_files(records, img_dir, ann_path)
    return CocoDataset(tuple(records), tuple(categories[c] for c in sorted(categories)), ann_path, img_dir, data)


def _check_files(records: Iterable[ImageRecord], img_dir: Path, ann_path: Path) -> None:
    records = list(records)
    missing = [r.file for r in records if not r.file.is_file()]
    if missing:
        names = [str(m.relative_to(img_dir)) if m.is_relative_to(img_dir) else str(m) for m in missing]
        raise DatasetError(f"{len(missing)} of {len(records)} images listed in {ann_path.name} are missing from "
                           f"{img_dir}: {_list_some(names)}; check that the image folder belongs to this "
                           "annotation file")


def read_record_image(record: ImageRecord) -> np.ndarray:
    """BGR uint8 (H, W, 3) pixels of a record as its annotations see them: in stored orientation (EXIF rotation
    not applied, as PIL's Image.open in the official code) and of the size the file states (else DatasetError)."""
    try:
        data = np.fromfile(str(record.file), dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"cannot read image {record.file}: {e.strerror or e}") from None
    image = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if image is None:
        raise DatasetError(f"cannot decode image {record.file} (empty, corrupt or not an image); fix or remove it")
    if image.shape[:2] != (record.height, record.width):
        raise DatasetError(f"image {record.file} is {image.shape[1]}x{image.shape[0]} but the annotation file says "
                           f"{record.width}x{record.height}: its boxes would not match; fix the file's width/height")
    return image


# --- training ------------------------------------------------------------------------------------------------
def sanitize_for_training(dataset: CocoDataset, min_size: float = 1.0) -> CocoDataset:
    """Targets fit to train on, with a report of every change.

    Boxes reaching outside their image are clipped to it; boxes narrower or lower than `min_size` pixels after
    clipping are skipped; crowd regions are skipped (they are not single objects); images without objects stay,
    as negatives. Category ids are kept: `dataset.labels(record)` maps them to contiguous labels.
    """
    counts = dict(objects_in=0, objects_out=0, boxes_clipped=0, boxes_degenerate=0, crowd_skipped=0,
                  images_without_objects=0)
    records = []
    for r in dataset.images:
        boxes = r.boxes.astype(np.float64)
        clipped = boxes.copy()
        clipped[:, 0::2] = np.clip(clipped[:, 0::2], 0.0, r.width)
        clipped[:, 1::2] = np.clip(clipped[:, 1::2], 0.0, r.height)
        changed = np.any(clipped != boxes, axis=1)
        size_ok = ((clipped[:, 2] - clipped[:, 0]) >= min_size) & ((clipped[:, 3] - clipped[:, 1]) >= min_size)
        crowd = r.iscrowd
        keep = size_ok & ~crowd
        counts["objects_in"] += len(r)
        counts["crowd_skipped"] += int(crowd.sum())
        counts["boxes_degenerate"] += int((~size_ok & ~crowd).sum())
        counts["boxes_clipped"] += int((changed & keep).sum())
        counts["objects_out"] += int(keep.sum())
        counts["images_without_objects"] += int(not keep.any())
        records.append(replace(r, boxes=clipped[keep], category_ids=r.category_ids[keep], iscrowd=r.iscrowd[keep],
                               areas=r.areas[keep]))
    report = SanitizeReport(images=len(records), **counts)
    return replace(dataset, images=tuple(records), report=report)


# --- where a dataset lives -----------------------------------------------------------------------------------
def _split_names(split: str) -> list[str]:
    names = [split, f"{split}2017"]
    if split in ("val", "valid", "validation"):
        names += ["val", "val2017", "valid", "validation"]
    return list(dict.fromkeys(names))


def resolve_dataset(dataset: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
                    annotations: str | os.PathLike | None = None, split: str = "val") -> DatasetPaths:
    """Images folder + annotation file from explicit paths, or from a dataset folder in a standard layout.

    Layouts recognised under `dataset` for `split` (also `<split>2017`, and `valid` for val):
    `DIR/annotations/instances_<split>.json` + `DIR/<split>/` (COCO, `deimv2-data synth`; or `DIR/images/<split>/`,
    `DIR/images/`), and
    `DIR/<split>/_annotations.coco.json` with the images beside it (Roboflow). With only `annotations` given,
    the images are looked for where the COCO layout puts them (`../<split>/` next to `annotations/`).
    """
    if dataset is not None and (images is not None or annotations is not None):
        raise DatasetError("give a dataset folder, or --images and --annotations, not both")
    if dataset is None:
        if annotations is None:
            raise DatasetError("no annotations given: pass the instances JSON (--annotations) and the image folder "
                               "(--images), or a dataset folder")
        ann = Path(annotations)
        if images is not None:
            return DatasetPaths(Path(images), ann)
        guess = ann.parent.parent / ann.stem.removeprefix("instances_")
        if ann.parent.name == "annotations" and ann.stem.startswith("instances_") and guess.is_dir():
            return DatasetPaths(guess, ann)
        if ann.parent.is_dir() and ann.name == "_annotations.coco.json":
            return DatasetPaths(ann.parent, ann)
        raise DatasetError(f"no image folder given for {ann}, and none in the COCO layout at {guess}; "
                           "pass --images DIR")
    root = Path(dataset)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    names = _split_names(split)
    for name in names:
        ann = root / "annotations" / f"instances_{name}.json"
        if ann.is_file():
            for img in (root / name, root / "images" / name, root / "images"):
                if img.is_dir():
                    return DatasetPaths(img, ann)
            raise DatasetError(f"found {ann} but no image folder for it ({root / name}/ or {root / 'images'}/); "
                               "pass --images DIR")
        ann = root / name / "_annotations.coco.json"
        if ann.is_file():
            return DatasetPaths(root / name, ann)
    alternatives = ",".join(names)
    raise DatasetError(f"{root} holds no {split!r} split in a known layout (looked for "
                       f"annotations/instances_{{{alternatives}}}.json and {{{alternatives}}}/_annotations.coco.json); "
                       "pass --images and --annotations")
