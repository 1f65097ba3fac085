"""Detections: the result type of every runtime (boxes in original-image pixels)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deimv2_deploy.classes import COCO_CLASSES

__all__ = ["Detections"]


@dataclass(frozen=True, eq=False)
class Detections:
    """N detections of one image. `xyxy` float32 (N, 4) pixels, `scores` float32 (N,), `labels` int64 (N,).

    `class_names[label]` names a label; `category_ids[label]` is its dataset category id where the model carries
    them (a custom-class model; None for COCO-80 and models without ids)."""

    xyxy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    class_names: Sequence[str] = field(default=COCO_CLASSES, repr=False)
    image_size: tuple[int, int] | None = None  # (height, width) of the image the boxes refer to
    category_ids: Sequence[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        xyxy = np.asarray(self.xyxy, dtype=np.float32)
        xyxy = np.ascontiguousarray(xyxy.reshape(-1, 4) if xyxy.size == 0 else xyxy)
        scores = np.ascontiguousarray(np.asarray(self.scores, dtype=np.float32).reshape(-1))
        labels_in = np.asarray(self.labels)
        if labels_in.size and not np.issubdtype(labels_in.dtype, np.integer):
            if not np.all(np.equal(np.mod(labels_in, 1), 0)):
                raise ValueError(f"labels must be integers, got dtype {labels_in.dtype}")
        labels = np.ascontiguousarray(labels_in.astype(np.int64).reshape(-1))
        if xyxy.ndim != 2 or xyxy.shape[1] != 4:
            raise ValueError(f"xyxy must have shape (N, 4), got {xyxy.shape}")
        n = xyxy.shape[0]
        if scores.shape != (n,) or labels.shape != (n,):
            raise ValueError(f"xyxy, scores and labels disagree in length: {n}, {scores.shape[0]}, {labels.shape[0]}")
        if n and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in 0..{len(self.class_names) - 1}, got {labels.min()}..{labels.max()}")
        if not np.all(np.isfinite(xyxy)) or not np.all(np.isfinite(scores)):
            raise ValueError("boxes and scores must be finite")
        object.__setattr__(self, "xyxy", xyxy)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.category_ids is not None:
            ids = tuple(int(i) for i in self.category_ids)
            if len(ids) != len(self.class_names):
                raise ValueError(f"{len(ids)} category ids for {len(self.class_names)} class names")
            object.__setattr__(self, "category_ids", ids)

    # --- basics -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __getitem__(self, index: Any) -> Detections:
        """Select rows with an int, slice, index array or boolean mask."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return Detections(self.xyxy[index], self.scores[index], self.labels[index], self.class_names, self.image_size,
                          self.category_ids)

    @classmethod
    def empty(cls, class_names: Sequence[str] = COCO_CLASSES, image_size: tuple[int, int] | None = None,
              category_ids: Sequence[int] | None = None) -> Detections:
        zeros = np.zeros
        return cls(zeros((0, 4), np.float32), zeros(0, np.float32), zeros(0, np.int64), class_names, image_size,
                   category_ids)

    @property
    def names(self) -> list[str]:
        """Class name of each detection."""
        return [self.class_names[i] for i in self.labels]

    # --- filtering --------------------------------------------------------------------------------
    def filter(self, score_threshold: float = 0.0, classes: Sequence[int | str] | None = None,
               max_detections: int | None = None) -> Detections:
        """Detections with score >= threshold, of the given classes (ids or names), best first, at most N."""
        keep = self.scores >= score_threshold
        if classes is not None:
            ids = {self.class_names.index(c) if isinstance(c, str) else int(c) for c in classes}
            keep &= np.isin(self.labels, list(ids))
        idx = np.flatnonzero(keep)
        idx = idx[np.argsort(-self.scores[idx], kind="stable")]
        if max_detections is not None:
            idx = idx[:max_detections]
        return self[idx]

    # --- export -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: one entry per detection with box [x1, y1, x2, y2], score, label and class name (and the
        dataset category id where the model carries them)."""
        ids = self.category_ids
        return {
            "image_size": None if self.image_size is None else list(self.image_size),
            "detections": [
                {"box": [round(float(v), 3) for v in box], "score": round(float(s), 6), "label": int(lab),
                 "class_name": self.class_names[int(lab)], **({} if ids is None else {"category_id": ids[int(lab)]})}
                for box, s, lab in zip(self.xyxy, self.scores, self.labels, strict=True)
            ],
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def to_coco(self, image_id: int, category_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """COCO results format ([x, y, w, h]); `category_ids` maps labels to dataset ids (default: the model's own,
        else the label itself)."""
        if category_ids is None:
            category_ids = self.category_ids
        out = []
        for (x1, y1, x2, y2), s, lab in zip(self.xyxy, self.scores, self.labels, strict=True):
            cat = int(category_ids[lab]) if category_ids is not None else int(lab)
            out.append({"image_id": image_id, "category_id": cat, "score": float(s),
                        "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
        return out
