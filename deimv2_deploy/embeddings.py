"""Embeddings: what a DINOv3 ViT gives for one image (CLS, registers, one vector per patch), no torch."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Embeddings"]


@dataclass(frozen=True)
class Embeddings:
    """DINOv3 features of one image: `pooled` is transformers' `pooler_output` (the normalised CLS token);
    `cls`, `registers` and `patches` are rows of `last_hidden_state` (after the final layer norm)."""

    cls: np.ndarray  # float32 (D,)
    registers: np.ndarray  # float32 (R, D)
    patches: np.ndarray  # float32 (rows, cols, D): one per patch, in image layout
    pooled: np.ndarray  # float32 (D,)
    image_size: tuple[int, int]  # (height, width) of the original image

    def __post_init__(self) -> None:
        d = self.cls.shape[-1]
        if self.cls.shape != (d,) or self.pooled.shape != (d,) or self.registers.ndim != 2 \
                or self.patches.ndim != 3 or self.patches.shape[-1] != d or self.registers.shape[-1] != d:
            raise ValueError(f"inconsistent embedding shapes: cls {self.cls.shape}, registers {self.registers.shape}, "
                             f"patches {self.patches.shape}, pooled {self.pooled.shape}")

    @property
    def dim(self) -> int:
        return int(self.cls.shape[0])

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.patches.shape[0]), int(self.patches.shape[1])
