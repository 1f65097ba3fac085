"""The classes a model predicts: COCO's 80 by default, or a custom model's own names and dataset category ids.

An 80-class COCO model predicts labels 0..79; the COCO annotation files number the same classes with ids
among 1..90 (ten ids were never used). `COCO_CATEGORY_IDS[label]` is the id, as the official code maps it.

A model fine-tuned on K classes of its own carries `ModelClasses`: the name of each label and, where known, the
dataset category id of each label. `resolve_classes` decides what an export stores (the user's names, the
checkpoint's, COCO-80 for an 80-class model without names, else `class_0..` with a warning); `read_class_names`
and `read_category_ids` read `--class-names` / `--category-ids`. No torch.
"""
from __future__ import annotations

import json
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["COCO_CLASSES", "COCO_CATEGORY_IDS", "ModelClasses", "COCO80_CLASSES", "resolve_classes",
           "generic_class_names", "checked_category_ids", "read_class_names", "read_category_ids"]

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)

# The ten ids of the 2014 category list that COCO detection never used; the 80 others, ascending, are the labels'.
_UNUSED_COCO_IDS = frozenset({12, 26, 29, 30, 45, 66, 68, 69, 71, 83})
COCO_CATEGORY_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _UNUSED_COCO_IDS)


def checked_category_ids(ids: object, num_classes: int) -> tuple[int, ...]:
    """One integer id >= 0 per class, all different (COCO ids are usually 1.., Roboflow exports start at 0)."""
    try:
        values = tuple(ids)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"category_ids must be a sequence of integers, got {ids!r}") from None
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0]
    if bad:
        raise ValueError(f"category_ids must be integers >= 0, got {bad[:5]}")
    values = tuple(int(v) for v in values)
    if len(values) != num_classes:
        raise ValueError(f"category_ids has {len(values)} ids but there are {num_classes} class names; "
                         "give one dataset category id per class")
    if len(set(values)) != len(values):
        dupes = sorted({v for v in values if values.count(v) > 1})
        raise ValueError(f"category_ids must be unique, got {dupes} more than once")
    return values


def _checked_names(names: object) -> tuple[str, ...]:
    if isinstance(names, str):
        raise ValueError(f"class names must be a sequence of strings, got the string {names!r}")
    try:
        values = tuple(names)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"class names must be a sequence of strings, got {names!r}") from None
    if not values:
        raise ValueError("a model has at least one class: got no class names")
    bad = [v for v in values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"class names must be non-empty strings, got {bad[:5]}")
    return tuple(v.strip() for v in values)


@dataclass(frozen=True)
class ModelClasses:
    """Label i of a model is `names[i]`, with dataset category id `category_ids[i]` (None: no ids known; COCO's
    80 names then mean COCO's ids, see `ArtifactSpec.dataset_category_ids`)."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...] | None = None
    source: str = ""  # where they came from, for messages: "the checkpoint", "--class-names", "COCO-80 default"...

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", _checked_names(self.names))
        if self.category_ids is not None:
            object.__setattr__(self, "category_ids", checked_category_ids(self.category_ids, len(self.names)))

    def __len__(self) -> int:
        return len(self.names)

    def spec_fields(self) -> dict[str, object]:
        """The ArtifactSpec fields that carry these classes: `ArtifactSpec.for_variant(size, **c.spec_fields())`."""
        return {"class_names": self.names, "category_ids": self.category_ids}


COCO80_CLASSES = ModelClasses(COCO_CLASSES, None, "COCO-80")


def generic_class_names(num_classes: int) -> tuple[str, ...]:
    """class_0 .. class_{K-1}: the names of a model that carries none."""
    return tuple(f"class_{i}" for i in range(num_classes))


def resolve_classes(num_classes: int | None, stored: ModelClasses | None = None,
                    names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None,
                    model: str = "the model") -> ModelClasses:
    """The classes to give a model of `num_classes` outputs (None: not known, e.g. an official-exporter ONNX).

    Names: the user's `names`, else those the checkpoint carries (`stored`), else COCO's for an 80-class model,
    else `class_0..` with a warning. Category ids: the user's, else the checkpoint's, else none. A list whose
    length is not the model's number of classes is a ValueError naming both; `model` names the model in it.
    """
    k = num_classes
    if stored is not None and k is not None and len(stored) != k:
        raise ValueError(f"{model} has {k} classes but carries {len(stored)} class names ({_few(stored.names)}): "
                         "the checkpoint is inconsistent; pass --class-names with one name per class")
    if names is not None:
        names = _checked_names(names)
        if k is not None and len(names) != k:
            raise ValueError(f"{len(names)} class names were given ({_few(names)}) but {model} has {k} classes: "
                             "give exactly one name per class, in label order")
    if category_ids is not None:
        category_ids = tuple(category_ids)
        expected = k if k is not None else len(names) if names is not None else None
        if expected is not None and len(category_ids) != expected:
            raise ValueError(f"{len(category_ids)} category ids were given but {model} has {expected} classes: "
                             "give exactly one dataset category id per class, in label order")
    if names is not None:
        chosen, source = names, "given class names"
    elif stored is not None:
        chosen, source = stored.names, stored.source or "the checkpoint"
    elif k is None or k == len(COCO_CLASSES):
        chosen, source = COCO_CLASSES, "COCO-80 (no class names in the checkpoint)"
    else:
        chosen, source = generic_class_names(k), "class_0.. (no class names in the checkpoint)"
        warnings.warn(f"{model} has {k} classes but carries no class names: they are named class_0..class_{k - 1}; "
                      "name them with --class-names FILE|a,b,c (and their dataset ids with --category-ids)",
                      UserWarning, stacklevel=2)
    if category_ids is not None:
        ids: tuple[int, ...] | None = category_ids
    elif stored is not None and stored.category_ids is not None and len(chosen) == len(stored):
        ids = stored.category_ids
    else:
        ids = None
    return ModelClasses(chosen, ids, source)


def _few(names: Sequence[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def _split_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _read_list_file(path: Path, what: str) -> object:
    """A JSON document, or the non-empty lines of a text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{what} file {path} is not UTF-8 text") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} file {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_class_names(value: str) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """(names, category ids or None) from `--class-names`: a comma list `a,b,c`, or a file: one name per line, a
    JSON list of names, or a COCO annotation file (its categories ordered by id: names and ids, as deimv2-train
    numbers a dataset's classes)."""
    path = Path(value)
    if not path.is_file():
        if path.suffix.lower() in (".txt", ".json", ".names") or path.is_dir():
            raise FileNotFoundError(f"class names file not found: {path} (pass a file, or the names as a,b,c)")
        names = _split_list(value)
        if not names:
            raise ValueError(f"no class names in {value!r}: pass a,b,c or a file with one name per line")
        return _checked_names(names), None
    data = _read_list_file(path, "class names")
    if isinstance(data, dict) and isinstance(data.get("categories"), list):
        try:
            categories = sorted(data["categories"], key=lambda c: int(c["id"]))
            return (_checked_names([c["name"] for c in categories]),
                    checked_category_ids([c["id"] for c in categories], len(categories)))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the categories of {path} are not COCO's (id and name each): {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"class names file {path} must hold a JSON list of names or a COCO annotation file "
                         f"(with 'categories'), got a JSON {type(data).__name__}")
    return _checked_names(data), None


def read_category_ids(value: str) -> tuple[int, ...]:
    """Category ids from `--category-ids`: a comma list `1,5,9`, or a file (one id per line, or a JSON list)."""
    path = Path(value)
    items: object = _read_list_file(path, "category ids") if path.is_file() else _split_list(value)
    if not isinstance(items, list) or not items:
        raise ValueError(f"no category ids in {value!r}: pass 1,5,9 or a file with one id per line")
    try:
        ids = [int(v) if isinstance(v, str) else v for v in items]
    except ValueError:
        raise ValueError(f"category ids must be whole numbers, got {value!r}") from None
    return checked_category_ids(ids, len(ids))
