"""The data side of a training run: a COCO-format dataset -> augmented, multi-scale batches, epoch by epoch.

Joins `deimv2_deploy.data.coco` (reading, checking, sanitising, category -> label mapping) with the training
pipeline (`training.dataset`, `training.collate`). The order of the images in epoch e is a permutation drawn from
(seed, e) and every sample's augmentation from (seed, e, index), so `batches(e, start=k)` gives exactly the
batches a run that was not stopped would have seen from its k-th batch on: a resumed run continues identically.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from deimv2_deploy.data.coco import CocoDataset, DatasetError, load_coco, sanitize_for_training
from deimv2_deploy.training.augment_recipe import AugmentRecipe, get_augment_recipe
from deimv2_deploy.training.collate import BatchCollator
from deimv2_deploy.training.dataset import DetectionRecord, TrainDataset, worker_init_fn

__all__ = ["TrainingData", "build_training_data", "records_of", "default_workers"]


def records_of(dataset: CocoDataset) -> list[DetectionRecord]:
    """Training records (image path, boxes xyxy pixels, contiguous labels) of a sanitised dataset."""
    return [DetectionRecord(r.file, r.boxes.astype("float32"), dataset.labels(r), r.id) for r in dataset.images]


def default_workers() -> int:
    """One data-loading process per core beyond the two the model uses (none on a 2-core machine: there the
    main process augments between steps, which costs less than a worker competing with the model's threads)."""
    return max(0, min(4, (os.cpu_count() or 1) - 2))


class TrainingData:
    """Batches of one run. `class_names`/`category_ids` number the model's classes (label i = i-th category)."""

    def __init__(self, train: CocoDataset, recipe: AugmentRecipe, batch: int, seed: int, workers: int,
                 val: CocoDataset | None = None) -> None:
        self.train = train
        self.val = val
        self.recipe = recipe
        self.batch = int(batch)
        self.seed = int(seed)
        self.workers = int(workers)
        self.class_names = train.class_names
        self.category_ids = train.category_ids
        self.dataset = TrainDataset(records_of(train), recipe, seed=seed, num_classes=len(self.class_names))
        self.collator = BatchCollator(recipe, seed=seed)
        if len(self.dataset) < self.batch:
            raise DatasetError(f"the training set has {len(self.dataset)} images, fewer than one batch of "
                               f"{self.batch}: lower --batch or add images")

    @property
    def iterations_per_epoch(self) -> int:
        return len(self.dataset) // self.batch  # the last incomplete batch is dropped (batch-norm statistics)

    @property
    def has_validation(self) -> bool:
        return self.val is not None

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)
        self.collator.set_epoch(epoch)

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.dataset), generator=generator).tolist()

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]:
        """The batches of `epoch` from batch `start` on: images float32 (B, 3, S, S), targets per image
        {"boxes": (N, 4) normalised cxcywh, "labels": (N,) int64, "idx": ()}."""
        self.set_epoch(epoch)
        order = self.order(epoch)
        plan = [order[i * self.batch:(i + 1) * self.batch] for i in range(start, self.iterations_per_epoch)]
        if not plan:
            return iter(())
        # its own generator: a DataLoader iterator otherwise draws its base seed from torch's global generator,
        # which also drives the denoising noise; a resumed run creates its iterator at another point of that
        # sequence, so the noise would differ from the run that was not stopped
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=plan, collate_fn=self.collator, num_workers=self.workers,
            worker_init_fn=worker_init_fn if self.workers else None, persistent_workers=False,
            prefetch_factor=4 if self.workers else None,
            generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return iter(loader)


def build_training_data(settings: Any, config: Any, printer: Callable[[str], None] = print) -> TrainingData:
    """Read and check the datasets of `settings` (TrainSettings) for the size `config` (ModelConfig)."""
    train = load_coco(settings.train_images, settings.train_annotations)
    recipe = get_augment_recipe(config.name)
    train = sanitize_for_training(train, min_size=1.0)
    printer(f"training set: {len(train)} images, {train.num_objects} objects, {len(train.categories)} classes "
            f"({', '.join(train.class_names[:8])}{' ...' if len(train.categories) > 8 else ''})")
    if train.report is not None and train.report.summary():
        printer(f"  {train.report.summary()}")
    val = None
    if settings.val_images is not None:
        val = load_coco(settings.val_images, settings.val_annotations)
        if val.category_ids != train.category_ids or val.class_names != train.class_names:
            theirs = dict(zip(val.category_ids, val.class_names, strict=True))
            ours = dict(zip(train.category_ids, train.class_names, strict=True))
            raise DatasetError(f"the validation set's categories {theirs} differ from the training set's {ours}: "
                               "use annotation files with the same category list")
        printer(f"validation set: {len(val)} images, {val.num_objects} objects")
    epochs = settings.epochs or recipe.epochs
    if epochs != recipe.epochs:
        recipe = recipe.scaled(epochs=epochs)
    workers = default_workers() if settings.workers is None else int(settings.workers)
    if workers < 0:
        raise DatasetError(f"--workers must be >= 0, got {workers}")
    return TrainingData(train, recipe, settings.batch, settings.seed, workers, val)
