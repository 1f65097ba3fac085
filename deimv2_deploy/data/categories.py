"""Model labels <-> dataset category ids. No torch.

A model predicts labels 0..K-1; a COCO-format dataset names its classes by category id (COCO: 80 ids among
1..90; a custom dataset: anything). The mapping is a table, never id arithmetic:
- an 80-class COCO model: label i -> `COCO_CATEGORY_IDS[i]`, the official table;
- a custom model: the category ids it carries in its metadata (`ArtifactSpec.category_ids`);
- a model trained here: label i <-> the i-th category of its training set ordered by id.
A model whose classes are not the dataset's is an error that names both sides.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from deimv2_deploy.classes import COCO_CATEGORY_IDS, COCO_CLASSES

__all__ = ["Category", "CategoryMapping", "CategoryMismatchError", "COCO80", "match_categories"]


class CategoryMismatchError(ValueError):
    """The model's classes are not the dataset's categories."""


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    supercategory: str = ""


@dataclass(frozen=True)
class CategoryMapping:
    """label i <-> category_ids[i] (names: class_names[i])."""

    category_ids: tuple[int, ...]
    class_names: tuple[str, ...]
    notes: tuple[str, ...] = field(default=(), compare=False)  # things a person should know (name differences)

    def __post_init__(self) -> None:
        ids = tuple(int(i) for i in self.category_ids)
        if len(ids) != len(self.class_names):
            raise ValueError(f"{len(ids)} category ids for {len(self.class_names)} class names")
        if len(set(ids)) != len(ids):
            raise ValueError(f"category ids must be unique, got {ids}")
        object.__setattr__(self, "category_ids", ids)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        order = np.argsort(np.asarray(ids, np.int64), kind="stable")
        object.__setattr__(self, "_sorted_ids", np.asarray(ids, np.int64)[order])
        object.__setattr__(self, "_sorted_labels", order.astype(np.int64))

    def __len__(self) -> int:
        return len(self.category_ids)

    def to_category_ids(self, labels: np.ndarray) -> np.ndarray:
        """int64 category id of each label (IndexError-free: labels outside 0..K-1 raise ValueError)."""
        labels = np.asarray(labels, np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self)):
            raise ValueError(f"labels must lie in 0..{len(self) - 1}, got {labels.min()}..{labels.max()}")
        return np.asarray(self.category_ids, np.int64)[labels]

    def to_labels(self, category_ids: np.ndarray) -> np.ndarray:
        """int64 label of each category id (ids the mapping lacks raise ValueError)."""
        ids = np.asarray(category_ids, np.int64)
        pos = np.searchsorted(self._sorted_ids, ids)  # type: ignore[attr-defined]
        pos = np.minimum(pos, len(self) - 1)
        ok = self._sorted_ids[pos] == ids  # type: ignore[attr-defined]
        if not np.all(ok):
            raise ValueError(f"category ids {sorted(set(ids[~ok].tolist()))[:5]} are not among "
                             f"{_ids_text(self.category_ids)}")
        return self._sorted_labels[pos]  # type: ignore[attr-defined]


COCO80 = CategoryMapping(COCO_CATEGORY_IDS, COCO_CLASSES)


def _ids_text(ids: Sequence[int], limit: int = 8) -> str:
    ids = list(ids)
    shown = ", ".join(map(str, ids[:limit]))
    return f"ids {shown}" + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def _side(kind: str, names: Sequence[str], ids: Sequence[int] | None) -> str:
    shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
    id_text = f"; {_ids_text(sorted(ids))}" if ids is not None else ""
    return f"{kind} has {len(names)} classes ({shown}{id_text})"


def match_categories(class_names: Sequence[str], category_ids: Sequence[int] | None,
                     dataset_categories: Sequence[Category], model: str = "the model",
                     dataset: str = "the dataset") -> CategoryMapping:
    """The label -> category id mapping of a model on a dataset, or CategoryMismatchError naming both sides.

    `category_ids` are the model's (None: a model without them; COCO's class names then mean COCO's ids, other
    names are matched to the dataset's category names). The model's ids must be exactly the dataset's.
    """
    names = tuple(class_names)
    data_ids = [c.id for c in dataset_categories]
    data_names = [c.name for c in dataset_categories]
    if category_ids is None and names == COCO_CLASSES:
        category_ids = COCO_CATEGORY_IDS
    if category_ids is None:  # custom names, no ids: the names must be the dataset's
        by_name = {c.name.lower(): c.id for c in dataset_categories}
        if len(by_name) == len(dataset_categories) and sorted(n.lower() for n in names) == sorted(by_name):
            return CategoryMapping(tuple(by_name[n.lower()] for n in names), names,
                                   notes=("matched the model's classes to the dataset's categories by name "
                                          "(the model carries no category ids)",))
        raise CategoryMismatchError(
            f"{_side(model, names, None)} and carries no category ids; {_side(dataset, data_names, data_ids)}: "
            "their names differ, so labels cannot be mapped; use a model trained on this dataset's categories")
    ids = tuple(int(i) for i in category_ids)
    if len(ids) != len(names):
        raise CategoryMismatchError(f"{model} has {len(names)} class names but {len(ids)} category ids; "
                                    "re-export it")
    if set(ids) != set(data_ids):
        lacking = sorted(set(data_ids) - set(ids))
        extra = sorted(set(ids) - set(data_ids))
        detail = []
        if extra:
            detail.append(f"the dataset lacks the model's {_ids_text(extra, 5)}")
        if lacking:
            detail.append(f"the model lacks the dataset's {_ids_text(lacking, 5)}")
        raise CategoryMismatchError(f"{_side(model, names, ids)} but {_side(dataset, data_names, data_ids)}: "
                                    f"{'; '.join(detail)}; evaluate a model trained on this dataset's categories")
    by_id = dict(zip(data_ids, data_names, strict=True))
    differ = [(i, by_id[i], n) for i, n in zip(ids, names, strict=True)
              if by_id[i].strip().lower() != n.strip().lower()]
    notes: tuple[str, ...] = ()
    if differ:
        shown = ", ".join(f"id {i}: dataset {d!r} vs model {m!r}" for i, d, m in differ[:3])
        notes = (f"{len(differ)} category names differ between {dataset} and {model} (mapped by id): {shown}",)
    return CategoryMapping(ids, names, notes=notes)
