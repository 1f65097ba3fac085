"""INT8 calibration feeding for the exporters: the images `deimv2_deploy.data.calibration.select_calibration_images`
chooses (a folder of images, a COCO-format dataset or its instances JSON), preprocessed exactly as at inference and
given as the exported graph takes them: the detector's `images` float32 NCHW + `orig_target_sizes` int64, one image
per item; a DINOv3 / EoMT graph's `pixel_values` with the ViT runtime's own resize and normalisation
(`vit_calibration_inputs`). No torch."""
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
from deimv2_deploy.vit_spec import VitSpec

__all__ = ["NO_CALIBRATION", "CalibrationSet", "calibration_inputs", "vit_calibration_inputs", "calibration_set"]

# what to say when INT8 is asked for without calibration data
NO_CALIBRATION = ("INT8 needs calibration data: pass --calibration DIR (calibration=...), a folder of a few hundred "
                  "images like those the model will see, or a COCO-format dataset (its folder or its instances "
                  "JSON); they are only read, never stored")


def calibration_inputs(paths: Sequence[Path], spec: ArtifactSpec) -> Iterator[dict[str, np.ndarray]]:
    """Graph inputs of one image each, preprocessed exactly as at inference; images are read lazily."""
    prepare = Preprocessor(spec)
    for path in paths:
        yield prepare(read_image(path)).as_inputs()


def vit_calibration_inputs(paths: Sequence[Path], spec: VitSpec) -> Iterator[dict[str, np.ndarray]]:
    """`pixel_values` items of a DINOv3 / EoMT graph: each image's crops as predict() makes them
    (`vit_runtime.graph_crops`: DINOv3 1, EoMT 2 per image), normalised with the spec's mean/std; one crop per item,
    or `spec.batch` crops for a fixed-batch graph (the last item padded by repeating its last crop)."""
    from deimv2_deploy.runtimes.vit_runtime import graph_crops, normalize

    step = spec.batch or 1
    pending: list[np.ndarray] = []
    for path in paths:
        rgb = np.ascontiguousarray(read_image(path)[:, :, ::-1])
        pending.extend(normalize(crop, spec) for crop in graph_crops(rgb, spec))
        while len(pending) >= step:
            yield {"pixel_values": np.stack(pending[:step])}
            pending = pending[step:]
    if pending:
        yield {"pixel_values": np.stack(pending + [pending[-1]] * (step - len(pending)))}


class CalibrationSet:
    """Re-iterable calibration inputs (a quantizer may walk the data more than once): the detector's preprocessing
    for an ArtifactSpec, the ViT runtime's for a VitSpec. `len()` counts graph calls, `describe()` images."""

    def __init__(self, paths: Sequence[Path], spec: ArtifactSpec | VitSpec, source: str = "") -> None:
        self.paths, self.spec, self.source = list(paths), spec, source

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        if isinstance(self.spec, VitSpec):
            return vit_calibration_inputs(self.paths, self.spec)
        return calibration_inputs(self.paths, self.spec)

    def __len__(self) -> int:
        if not isinstance(self.spec, VitSpec):
            return len(self.paths)
        crops = len(self.paths) * (1 if self.spec.family == "dinov3" else 2)
        return -(-crops // (self.spec.batch or 1))

    def describe(self) -> dict[str, Any]:
        """What the artifact's build notes record (never the images themselves)."""
        return {"source": self.source, "images": len(self.paths)}


def calibration_set(source: str | os.PathLike | Sequence[str | os.PathLike] | None, count: int,
                    spec: ArtifactSpec | VitSpec) -> CalibrationSet:
    """Up to `count` calibration images of `source` for a graph of `spec`; ValueError / FileNotFoundError (one line,
    what to pass instead) when `source` is missing or holds no images. Only lists the files: nothing is read yet."""
    if source is None:
        raise ValueError(NO_CALIBRATION)
    paths = select_calibration_images(source, count)
    if not paths:  # an empty list of files
        raise ValueError(NO_CALIBRATION)
    described = str(source) if isinstance(source, (str, os.PathLike)) else f"{len(list(source))} paths"
    return CalibrationSet(paths, spec, described)
