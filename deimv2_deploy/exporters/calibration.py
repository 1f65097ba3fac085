"""INT8 calibration feeding for the exporters: the images `deimv2_deploy.data.calibration.select_calibration_images`
chooses (a folder of images, a COCO-format dataset or its instances JSON), preprocessed exactly as at inference and
given as the exported graph takes them (`images` float32 NCHW, `orig_target_sizes` int64), one image per item.
No torch."""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.data.calibration import select_calibration_images
from deimv2_deploy.media import read_image
from deimv2_deploy.preprocess import Preprocessor
from deimv2_deploy.spec import ArtifactSpec

__all__ = ["NO_CALIBRATION", "CalibrationSet", "calibration_inputs", "calibration_set"]

# what to say when INT8 is asked for without calibration data
NO_CALIBRATION = ("INT8 needs calibration data: pass --calibration DIR (calibration=...), a folder of a few hundred "
                  "images like those the model will see, or a COCO-format dataset (its folder or its instances "
                  "JSON); they are only read, never stored")


def calibration_inputs(paths: Sequence[Path], spec: ArtifactSpec) -> Iterator[dict[str, np.ndarray]]:
    """Graph inputs of one image each, preprocessed exactly as at inference; images are read lazily."""
    prepare = Preprocessor(spec)
    for path in paths:
        yield prepare(read_image(path)).as_inputs()


class CalibrationSet:
    """Re-iterable calibration inputs (a quantizer may walk the data more than once)."""

    def __init__(self, paths: Sequence[Path], spec: ArtifactSpec, source: str = "") -> None:
        self.paths, self.spec, self.source = list(paths), spec, source

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return calibration_inputs(self.paths, self.spec)

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> dict[str, Any]:
        """What the artifact's build notes record (never the images themselves)."""
        return {"source": self.source, "images": len(self.paths)}


def calibration_set(source: str | os.PathLike | Sequence[str | os.PathLike] | None, count: int,
                    spec: ArtifactSpec) -> CalibrationSet:
    """Up to `count` calibration images of `source` for a graph of `spec`; ValueError / FileNotFoundError (one line,
    what to pass instead) when `source` is missing or holds no images. Only lists the files: nothing is read yet."""
    if source is None:
        raise ValueError(NO_CALIBRATION)
    paths = select_calibration_images(source, count)
    if not paths:  # an empty list of files
        raise ValueError(NO_CALIBRATION)
    described = str(source) if isinstance(source, (str, os.PathLike)) else f"{len(list(source))} paths"
    return CalibrationSet(paths, spec, described)
