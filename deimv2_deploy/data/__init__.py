"""COCO-format datasets (reading, checking, label mapping) and the synthetic dataset generator. No torch."""
from __future__ import annotations

from deimv2_deploy.data.categories import COCO80, Category, CategoryMapping, CategoryMismatchError, match_categories
from deimv2_deploy.data.coco import (
    CocoDataset,
    DatasetError,
    DatasetPaths,
    ImageRecord,
    SanitizeReport,
    load_coco,
    read_record_image,
    resolve_dataset,
    sanitize_for_training,
)

__all__ = ["COCO80", "Category", "CategoryMapping", "CategoryMismatchError", "match_categories", "CocoDataset",
           "DatasetError", "DatasetPaths", "ImageRecord", "SanitizeReport", "load_coco", "read_record_image",
           "resolve_dataset", "sanitize_for_training"]
