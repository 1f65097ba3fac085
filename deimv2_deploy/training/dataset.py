"""Training and validation datasets over plain records (image path, boxes in pixels, labels 0..K-1).

The records come from any reader (`deimv2_deploy.data.coco` for COCO JSON); nothing here knows a file format
beyond decoding the image. `TrainDataset[i]` is `(image, target)`: image float32 (3, H, W), target
{"boxes": float32 (N, 4) cxcywh normalised, "labels": int64 (N,), "idx": int64 ()}. Batch with
`training.collate.BatchCollator` (multi-scale, mixup, copy-blend) or `collate_eval`.

Randomness: sample i of epoch e draws everything from `numpy.random.default_rng((seed, e, i))`, so a run is
the same for any number of DataLoader workers and resumes exactly at an epoch boundary. Call `set_epoch(e)`
on the dataset (and the collator) before iterating epoch e, and build the DataLoader with
`persistent_workers=False` (the default), so the workers of each epoch get the new epoch; pass
`worker_init_fn=worker_init_fn` to keep OpenCV to one thread per worker. Usage: docs/training_data.md.
"""
from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from deimv2_deploy.media import read_image

from .augment_recipe import AugmentRecipe
from .mosaic import Mosaic
from .transforms import EvalTransforms, Target, TrainTransforms

__all__ = ["DetectionRecord", "as_record", "load_sample", "TrainDataset", "EvalDataset", "sample_rng",
           "worker_init_fn"]


@dataclass(frozen=True)
class DetectionRecord:
    """One annotated image: boxes float32 (N, 4) xyxy in pixels of the image file, labels int64 (N,) in 0..K-1."""

    image_path: Path
    boxes: np.ndarray
    labels: np.ndarray
    image_id: int | None = None  # the dataset's id (e.g. COCO image id), carried for reporting


def as_record(item: DetectionRecord | Mapping | Sequence, num_classes: int | None = None) -> DetectionRecord:
    """A checked `DetectionRecord` from a record, a mapping with image_path/boxes/labels[/image_id], or a
    (image_path, boxes, labels) sequence. Errors name the image and what to fix."""
    if isinstance(item, DetectionRecord):
        path, boxes, labels, image_id = item.image_path, item.boxes, item.labels, item.image_id
    elif isinstance(item, Mapping):
        missing = [k for k in ("image_path", "boxes", "labels") if k not in item]
        if missing:
            raise ValueError(f"record {dict(item)!r:.200} lacks {', '.join(missing)}: give image_path, boxes, labels")
        path, boxes, labels, image_id = item["image_path"], item["boxes"], item["labels"], item.get("image_id")
    elif isinstance(item, Sequence) and len(item) == 3:
        path, boxes, labels = item
        image_id = None
    else:
        raise TypeError(f"cannot read a record from {type(item).__name__}: use DetectionRecord(image_path, boxes, "
                        "labels)")
    path = Path(os.fspath(path))
    boxes = np.asarray(boxes, dtype=np.float32)
    labels = np.asarray(labels)
    if boxes.size == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{path}: boxes have shape {boxes.shape}; expected (N, 4) xyxy pixels")
    if labels.ndim != 1 or len(labels) != len(boxes):
        raise ValueError(f"{path}: {len(boxes)} boxes but labels of shape {labels.shape}; give one label per box")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers 0..K-1, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if not np.isfinite(boxes).all():
        raise ValueError(f"{path}: boxes contain NaN or infinity; fix or drop those annotations")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{path}: negative label {labels.min()}; labels are contiguous class indices 0..K-1")
    if num_classes is not None and labels.size and labels.max() >= num_classes:
        raise ValueError(f"{path}: label {labels.max()} is not below num_classes={num_classes}; map dataset "
                         "category ids to 0..K-1 first")
    return DetectionRecord(path, boxes, labels, None if image_id is None else int(image_id))


def load_sample(record: DetectionRecord) -> tuple[np.ndarray, Target]:
    """The image (RGB uint8) and its target, boxes clipped to the image and empty ones dropped (as the official
    COCO reader does)."""
    image = cv2.cvtColor(read_image(record.image_path, exif_orientation=False), cv2.COLOR_BGR2RGB)
    h, w = image.shape[:2]
    boxes = record.boxes.copy()
    np.clip(boxes[:, 0::2], 0, w, out=boxes[:, 0::2])
    np.clip(boxes[:, 1::2], 0, h, out=boxes[:, 1::2])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return image, {"boxes": boxes[keep], "labels": record.labels[keep]}


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample: a function of (seed, epoch, index) only."""
    return np.random.default_rng((int(seed), int(epoch), int(index)))


def worker_init_fn(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: one OpenCV thread per worker (the workers are the parallelism; OpenCV's own
    pool would oversubscribe the cores). Randomness needs no seeding here: it comes from `sample_rng`.

    Workers ignore Ctrl-C and SIGTERM: a terminal's Ctrl-C (or `kill` of the process group) reaches every
    process, and a worker dying of it would abort the run before the trainer saves its checkpoint; the trainer
    stops them itself when it has saved."""
    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _to_tensors(image: np.ndarray, target: Target, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    return torch.from_numpy(image), {"boxes": torch.from_numpy(np.ascontiguousarray(target["boxes"])),
                                     "labels": torch.from_numpy(np.ascontiguousarray(target["labels"])),
                                     "idx": torch.tensor(index, dtype=torch.int64)}


class TrainDataset(torch.utils.data.Dataset):
    """Augmented training samples of one size's recipe (see `training.transforms.TrainTransforms`).

    `mosaic_source`: "dataset" (deterministic partners drawn by index) or "cache" (the official per-worker
    cache); see `training.mosaic`.
    """

    def __init__(self, records: Sequence[DetectionRecord | Mapping | Sequence], recipe: AugmentRecipe,
                 seed: int = 0, num_classes: int | None = None, mosaic_source: str = "dataset"):
        self.records = [as_record(r, num_classes) for r in records]
        if not self.records:
            raise ValueError("no training records: the dataset is empty (check the annotation file and image folder)")
        self.recipe = recipe
        self.seed = int(seed)
        self.mosaic = Mosaic(recipe.mosaic, loader=self.load_item, num_items=len(self.records), source=mosaic_source)
        self.transforms = TrainTransforms(recipe, self.mosaic)

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.transforms.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.transforms.epoch

    def load_item(self, index: int) -> tuple[np.ndarray, Target]:
        """Sample `index` before augmentation: RGB uint8 image, boxes xyxy pixels."""
        return load_sample(self.records[index])

    def augmented(self, index: int, epoch: int | None = None) -> tuple[np.ndarray, Target]:
        """Sample `index` as augmented in `epoch` (default: the current one), before conversion: RGB uint8 at the
        input size, boxes xyxy pixels. For looking at the pipeline; `self[index]` gives the same sample."""
        epoch = self.epoch if epoch is None else int(epoch)
        image, target = self.load_item(index)
        return self.transforms.augment(image, target, sample_rng(self.seed, epoch, index), epoch)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = int(index)
        if not 0 <= index < len(self.records):
            raise IndexError(f"sample {index} out of range for {len(self.records)} records")
        image, target = self.load_item(index)
        image, target = self.transforms(image, target, sample_rng(self.seed, self.epoch, index))
        return _to_tensors(image, target, index)


class EvalDataset(torch.utils.data.Dataset):
    """Validation samples: stretched to the input size, normalised as in training, no randomness. The target
    also carries `orig_size` int64 (2,) as (width, height), for mapping boxes back to the image."""

    def __init__(self, records: Sequence[DetectionRecord | Mapping | Sequence], input_size: tuple[int, int],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 num_classes: int | None = None):
        self.records = [as_record(r, num_classes) for r in records]
        self.transforms = EvalTransforms(input_size, mean, std)

    @classmethod
    def from_recipe(cls, records: Sequence, recipe: AugmentRecipe, num_classes: int | None = None) -> EvalDataset:
        return cls(records, recipe.input_size, recipe.mean, recipe.std, num_classes)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index = int(index)
        image, target = load_sample(self.records[index])
        h, w = image.shape[:2]
        image, target = self.transforms(image, target)
        image_t, target_t = _to_tensors(image, target, index)
        target_t["orig_size"] = torch.tensor([w, h], dtype=torch.int64)
        return image_t, target_t
