"""COCO panoptic datasets: read and check them, encode and decode their PNGs. No torch.

The COCO panoptic layout (cocodataset.org/#format-data, as panopticapi reads it):
    DIR/annotations/panoptic_<split>.json   images, annotations, categories (each with `isthing` 0/1)
    DIR/annotations/panoptic_<split>/       one PNG per image, named by its annotation's `file_name`
    DIR/<split>/                            the images
An annotation is {image_id, file_name, segments_info: [{id, category_id, area, bbox, iscrowd}]}; its PNG is RGB
with segment id = R + 256 G + 256^2 B per pixel, 0 = void (unlabelled). `load_panoptic` reads the JSON into one
frozen `PanopticRecord` per image and fails with a `DatasetError` (one line: what is wrong, what to do) on
anything it cannot use; `read_panoptic_ids` reads one PNG and checks it against its segments.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from deimv2_deploy.data.coco import DatasetError, _list_some, _split_names, read_annotation_json

__all__ = ["VOID_ID", "PanopticCategory", "SegmentInfo", "PanopticRecord", "PanopticDataset", "PanopticPaths",
           "rgb_to_id", "id_to_rgb", "encode_panoptic_png", "load_panoptic", "read_panoptic_ids",
           "resolve_panoptic_dataset"]

VOID_ID = 0  # a pixel no segment covers


def rgb_to_id(rgb: np.ndarray) -> np.ndarray:
    """int64 (H, W) segment ids of an RGB uint8 (H, W, 3) panoptic PNG: R + 256 G + 256^2 B."""
    c = rgb.astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 65536 * c[..., 2]


def id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) of segment ids (0 .. 256^3 - 1), the inverse of `rgb_to_id`."""
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 1 << 24):
        raise ValueError(f"panoptic segment ids must lie in 0..{(1 << 24) - 1}, got {ids.min()}..{ids.max()}")
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], axis=-1).astype(np.uint8)


def encode_panoptic_png(ids: np.ndarray) -> bytes:
    """PNG bytes of a segment id map (OpenCV writes BGR arrays, so the channels are flipped to store RGB)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(id_to_rgb(ids)[..., ::-1]))
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


@dataclass(frozen=True)
class PanopticCategory:
    id: int
    name: str
    isthing: bool
    supercategory: str = ""


@dataclass(frozen=True)
class SegmentInfo:
    id: int  # its value in the PNG (> 0)
    category_id: int
    iscrowd: bool = False
    area: int = 0  # as the file states it (metrics count pixels in the PNG)


@dataclass(frozen=True)
class PanopticRecord:
    """One image: where it and its PNG are, and its segments."""

    image_id: int
    file: Path  # the image
    png: Path  # its panoptic PNG
    width: int
    height: int
    segments: tuple[SegmentInfo, ...]


@dataclass(frozen=True, eq=False)
class PanopticDataset:
    """A checked COCO panoptic dataset: records in the file's image order, categories ordered by id."""

    images: tuple[PanopticRecord, ...]
    categories: tuple[PanopticCategory, ...]
    annotation_file: Path
    images_dir: Path
    masks_dir: Path

    def __len__(self) -> int:
        return len(self.images)

    @property
    def category_ids(self) -> tuple[int, ...]:
        return tuple(c.id for c in self.categories)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.categories)

    def subset(self, count: int | None) -> PanopticDataset:
        """The first `count` images; all of them for None."""
        if count is None or count >= len(self.images):
            return self
        if count < 1:
            raise DatasetError(f"the number of images to use must be >= 1, got {count}")
        return replace(self, images=self.images[:count])


@dataclass(frozen=True)
class PanopticPaths:
    images_dir: Path
    annotation_file: Path
    masks_dir: Path


def _int(entry: dict, key: str, what: str, where: Path) -> int:
    value = entry.get(key) if isinstance(entry, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise DatasetError(f"{where}: a {what} entry has no integer {key!r} ({str(entry)[:80]}); fix the file")
    return int(value)


def load_panoptic(images_dir: str | os.PathLike, annotation_file: str | os.PathLike,
                  masks_dir: str | os.PathLike | None = None, check_files: bool = True) -> PanopticDataset:
    """Read and check a COCO panoptic dataset. `masks_dir` defaults to the JSON's path without `.json` (the COCO
    layout, as panopticapi assumes). DatasetError for: an instances (not panoptic) file, categories without
    `isthing`, annotations without `segments_info` or naming unknown images or categories, repeated or zero
    segment ids, images without an annotation, and (check_files) images or PNGs missing on disk."""
    ann_path = Path(annotation_file)
    data = read_annotation_json(ann_path)
    masks = Path(masks_dir) if masks_dir is not None else ann_path.with_suffix("")
    img_dir = Path(images_dir)
    annotations = data["annotations"]
    if annotations and isinstance(annotations[0], dict) and "segments_info" not in annotations[0]:
        raise DatasetError(f"{ann_path} is not a COCO panoptic file (its annotations have no 'segments_info'"
                           f"{': it looks like an instances file' if 'bbox' in annotations[0] else ''}); pass "
                           "panoptic_<split>.json (deimv2-data synth writes one beside instances_<split>.json)")
    categories: dict[int, PanopticCategory] = {}
    for entry in data["categories"]:
        cid = _int(entry, "id", "category", ann_path)
        if cid in categories:
            raise DatasetError(f"{ann_path}: category id {cid} is listed twice; fix the file")
        if not isinstance(entry.get("name"), str) or not entry["name"]:
            raise DatasetError(f"{ann_path}: category {cid} has no name; fix the file")
        if entry.get("isthing") not in (0, 1, True, False):
            raise DatasetError(f"{ann_path}: category {cid} ({entry['name']}) has no 'isthing' 0 or 1, which "
                               "panoptic quality needs (things vs stuff); fix the file")
        categories[cid] = PanopticCategory(cid, entry["name"], bool(entry["isthing"]),
                                           str(entry.get("supercategory") or ""))
    if not categories:
        raise DatasetError(f"{ann_path} lists no categories; a panoptic dataset needs at least one")
    images: dict[int, dict[str, Any]] = {}
    for entry in data["images"]:
        iid = _int(entry, "id", "image", ann_path)
        if iid in images:
            raise DatasetError(f"{ann_path}: image id {iid} is listed twice; fix the file")
        if not isinstance(entry.get("file_name"), str) or not entry["file_name"]:
            raise DatasetError(f"{ann_path}: image {iid} has no file_name; fix the file")
        for key in ("width", "height"):
            if _int(entry, key, "image", ann_path) < 1:
                raise DatasetError(f"{ann_path}: image {iid} has {key} < 1; fix the file")
        images[iid] = entry
    if not images:
        raise DatasetError(f"{ann_path} lists no images: the dataset is empty; pass a split that has images")
    by_image: dict[int, tuple[str, tuple[SegmentInfo, ...]]] = {}
    for entry in annotations:
        iid = _int(entry, "image_id", "annotation", ann_path)
        if iid not in images:
            raise DatasetError(f"{ann_path}: an annotation refers to image id {iid}, which the file does not list; "
                               "fix or remove it")
        if iid in by_image:
            raise DatasetError(f"{ann_path}: image {iid} has two annotations; a panoptic file has one per image")
        if not isinstance(entry.get("file_name"), str) or not isinstance(entry.get("segments_info"), list):
            raise DatasetError(f"{ann_path}: the annotation of image {iid} lacks 'file_name' (its PNG) or "
                               "'segments_info'; fix the file")
        segments, seen = [], set()
        for s in entry["segments_info"]:
            sid, cid = _int(s, "id", "segment", ann_path), _int(s, "category_id", "segment", ann_path)
            if sid <= VOID_ID or sid in seen:
                raise DatasetError(f"{ann_path}: image {iid} has segment id {sid} "
                                   f"{'twice' if sid in seen else '(ids must be > 0: 0 is void)'}; fix the file")
            if cid not in categories:
                raise DatasetError(f"{ann_path}: segment {sid} of image {iid} has category {cid}, which the file "
                                   f"does not list (known: {_list_some(sorted(categories))}); fix the file")
            seen.add(sid)
            area = s.get("area")
            segments.append(SegmentInfo(sid, cid, bool(s.get("iscrowd", 0)),
                                        int(area) if isinstance(area, (int, float)) else 0))
        by_image[iid] = (entry["file_name"], tuple(segments))
    lacking = sorted(set(images) - set(by_image))
    if lacking:
        raise DatasetError(f"{ann_path}: {len(lacking)} images have no panoptic annotation ({_list_some(lacking)}); "
                           "every image needs one (an empty segments_info is fine)")
    records = tuple(PanopticRecord(iid, img_dir / e["file_name"], masks / by_image[iid][0], int(e["width"]),
                                   int(e["height"]), by_image[iid][1]) for iid, e in images.items())
    if check_files:
        for folder, what in ((img_dir, "image"), (masks, "panoptic PNG")):
            if not folder.is_dir():
                raise DatasetError(f"{what} folder not found: {folder}; pass the folder holding the {what}s that "
                                   f"{ann_path.name} lists")
        for attr, what, folder in (("file", "images", img_dir), ("png", "panoptic PNGs", masks)):
            missing = [getattr(r, attr).name for r in records if not getattr(r, attr).is_file()]
            if missing:
                raise DatasetError(f"{len(missing)} of {len(records)} {what} listed in {ann_path.name} are missing "
                                   f"from {folder}: {_list_some(missing)}; check that the folder belongs to this "
                                   "annotation file")
    return PanopticDataset(records, tuple(categories[c] for c in sorted(categories)), ann_path, img_dir, masks)


def read_panoptic_ids(record: PanopticRecord) -> np.ndarray:
    """int64 (H, W) segment ids of a record's PNG (0 = void); DatasetError when the PNG cannot be read, has another
    size than its image, or holds an id its segments_info lacks."""
    data = np.fromfile(str(record.png), dtype=np.uint8) if record.png.is_file() else np.zeros(0, np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) if data.size else None
    if bgr is None:
        raise DatasetError(f"cannot read panoptic PNG {record.png} (missing, empty or not an image)")
    if bgr.shape[:2] != (record.height, record.width):
        raise DatasetError(f"panoptic PNG {record.png} is {bgr.shape[1]}x{bgr.shape[0]} but its image is "
                           f"{record.width}x{record.height}; fix the dataset")
    ids = rgb_to_id(bgr[..., ::-1])
    listed = {s.id for s in record.segments}
    unknown = sorted(set(np.unique(ids).tolist()) - listed - {VOID_ID})
    if unknown:
        raise DatasetError(f"panoptic PNG {record.png} holds segment ids {_list_some(unknown)} that its "
                           "segments_info does not list; fix the dataset")
    return ids


def resolve_panoptic_dataset(dataset: str | os.PathLike | None = None, images: str | os.PathLike | None = None,
                             panoptic: str | os.PathLike | None = None, masks: str | os.PathLike | None = None,
                             split: str = "val") -> PanopticPaths:
    """Images folder, panoptic JSON and PNG folder from explicit paths or a dataset folder in the COCO layout
    (`DIR/annotations/panoptic_<split>.json`, `DIR/annotations/panoptic_<split>/`, images in `DIR/<split>/` or
    `DIR/images/<split>/`; also `<split>2017`). Without `images`, the images are looked for where that layout
    puts them; without `masks`, the PNGs are the JSON's path without `.json`."""
    if dataset is not None and (images is not None or panoptic is not None):
        raise DatasetError("give a dataset folder, or --images and --panoptic, not both")
    if dataset is None:
        if panoptic is None:
            raise DatasetError("no panoptic annotations given: pass the panoptic JSON (--panoptic) and the image "
                               "folder (--images), or a dataset folder (--data)")
        ann = Path(panoptic)
        png = Path(masks) if masks is not None else ann.with_suffix("")
        if images is not None:
            return PanopticPaths(Path(images), ann, png)
        guess = ann.parent.parent / ann.stem.removeprefix("panoptic_")
        if ann.parent.name == "annotations" and ann.stem.startswith("panoptic_") and guess.is_dir():
            return PanopticPaths(guess, ann, png)
        raise DatasetError(f"no image folder given for {ann}, and none in the COCO layout at {guess}; "
                           "pass --images DIR")
    root = Path(dataset)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    names = _split_names(split)
    for name in names:
        ann = root / "annotations" / f"panoptic_{name}.json"
        if ann.is_file():
            png = Path(masks) if masks is not None else ann.with_suffix("")
            for img in (root / name, root / "images" / name, root / "images"):
                if img.is_dir():
                    return PanopticPaths(img, ann, png)
            raise DatasetError(f"found {ann} but no image folder for it ({root / name}/ or {root / 'images'}/); "
                               "pass --images DIR")
    hint = ""
    if any((root / "annotations" / f"instances_{n}.json").is_file() for n in names):
        hint = (" (it has instances annotations only: for a deimv2-data synth dataset, add the panoptic files with "
                f"`deimv2-data synth --output {root} --panoptic-only`)")
    raise DatasetError(f"{root} holds no panoptic {split!r} split: looked for annotations/panoptic_"
                       f"{{{','.join(names)}}}.json{hint}; pass --images and --panoptic")
