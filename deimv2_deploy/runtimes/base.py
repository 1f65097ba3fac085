"""Runtime: one interface over every backend (MMDeploy BaseWrapper style).

A backend implements `_infer` (the graph: named numpy inputs -> named numpy outputs) and its loading; the
base class validates inputs against the graph contract, runs preprocessing, maps boxes back and builds
`Detections`. Input/output names and order are the official export's (DESIGN.md).
"""
from __future__ import annotations

import abc
import inspect
from collections.abc import Iterator, Mapping, Sequence
from enum import Enum
from typing import Any, ClassVar

import numpy as np

from deimv2_deploy.detections import Detections
from deimv2_deploy.errors import BackendUnavailableError
from deimv2_deploy.precision import PrecisionChoice, executed_label
from deimv2_deploy.preprocess import PreparedBatch, Preprocessor, image_list
from deimv2_deploy.spec import ArtifactSpec

__all__ = ["Backend", "Runtime", "INPUT_NAMES", "OUTPUT_NAMES", "BackendUnavailableError"]

INPUT_NAMES = ("images", "orig_target_sizes")
OUTPUT_NAMES = ("labels", "boxes", "scores")


class Backend(str, Enum):
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"
    TENSORRT = "tensorrt"

    @classmethod
    def parse(cls, value: str | Backend) -> Backend:
        if isinstance(value, Backend):
            return value
        aliases = {"ort": "onnxruntime", "onnx": "onnxruntime", "ov": "openvino", "trt": "tensorrt",
                   "pytorch": "torch"}
        key = aliases.get(str(value).lower(), str(value).lower())
        try:
            return cls(key)
        except ValueError:
            raise ValueError(f"unknown backend {value!r}: choose one of {', '.join(b.value for b in cls)}") from None


class Runtime(abc.ABC):
    """A loaded artifact on one backend and device."""

    backend: ClassVar[Backend]
    input_names: tuple[str, ...] = INPUT_NAMES
    output_names: tuple[str, ...] = OUTPUT_NAMES

    def __init__(self, spec: ArtifactSpec, device: str = "cpu") -> None:
        self.spec = spec
        self.device = device
        self.preprocessor = Preprocessor(spec)
        self.max_batch = spec.batch or 8  # predict() chunks lists of images into batches of at most this
        # Detections' boxes are clipped to their image; False keeps them as the model gives them (the official
        # COCO evaluation scores unclipped boxes)
        self.clip_boxes = True
        # what the precision policy chose, when a precision was asked for (load_runtime(precision=...))
        self.precision_choice: PrecisionChoice | None = None

    # --- per backend --------------------------------------------------------------------------------
    @classmethod
    def import_library(cls) -> Any:
        """The backend's Python library, imported now; BackendUnavailableError (with an install hint) if missing."""
        raise NotImplementedError

    @classmethod
    def is_available(cls) -> bool:
        """True when the backend's library can be imported here."""
        try:
            cls.import_library()
            return True
        except BackendUnavailableError:
            return False

    @classmethod
    def version(cls) -> str | None:
        """The backend library's version, or None when it is not installed."""
        try:
            return str(cls.import_library().__version__)
        except BackendUnavailableError:
            return None

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why the backend cannot run here (None when it can)."""
        return None if cls.is_available() else f"{cls.backend.value} is not installed"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The keyword options this backend takes besides path, device and variant (for load_runtime's check)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return tuple(p.name for p in params if p.name not in ("self", "path", "device", "variant")
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))

    @abc.abstractmethod
    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on validated inputs; return fresh arrays (never views of reused buffers)."""

    def inference_precision(self) -> str | None:
        """The arithmetic the graph really runs in ("f32", "bf16", "f16"), as the backend reports it; None where
        it does not say."""
        return None

    def describe(self) -> dict[str, Any]:
        """What this runtime compiled for (backend, device, precision, threads...) for reports. `precision` is the
        artifact's (its weights), `inference_precision` the arithmetic that really runs (read from the backend),
        `executed_precision` both in one word ("fp32", "bf16", "int8+bf16"...), `precision_choice` what the
        precision policy decided and why (None when no precision was asked for)."""
        arithmetic = self.inference_precision()
        choice = getattr(self, "precision_choice", None)
        return {"backend": self.backend.value, "version": self.version(), "device": self.device,
                "precision": self.spec.precision, "variant": self.spec.variant,
                "inference_precision": arithmetic,
                "executed_precision": executed_label(self.spec.precision, arithmetic),
                "precision_choice": None if choice is None else choice.to_dict()}

    def close(self) -> None:  # noqa: B027 - optional hook: most backends have nothing to release
        """Release the backend's resources."""

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the graph ----------------------------------------------------------------------------------
    def check_inputs(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Inputs as the graph needs them, or a ValueError naming what was expected and what came."""
        missing = [n for n in self.input_names if n not in inputs]
        extra = [n for n in inputs if n not in self.input_names]
        if missing or extra:
            raise ValueError(f"inputs must be exactly {list(self.input_names)}; missing {missing}, unexpected {extra}")
        images, sizes = inputs["images"], inputs["orig_target_sizes"]
        h, w = self.spec.input_size
        if not isinstance(images, np.ndarray) or images.dtype != np.float32:
            raise ValueError(f"'images' must be a float32 numpy array, got {getattr(images, 'dtype', type(images))}")
        if images.ndim != 4 or images.shape[1:] != (3, h, w) or images.shape[0] < 1:
            raise ValueError(f"'images' must have shape (N, 3, {h}, {w}), got {images.shape}")
        if not isinstance(sizes, np.ndarray) or sizes.dtype != np.int64:
            raise ValueError(f"'orig_target_sizes' must be an int64 numpy array, got "
                             f"{getattr(sizes, 'dtype', type(sizes))}")
        if sizes.shape != (images.shape[0], 2):
            raise ValueError(f"'orig_target_sizes' must have shape ({images.shape[0]}, 2) as (width, height), "
                             f"got {sizes.shape}")
        if self.spec.batch is not None and images.shape[0] != self.spec.batch:
            raise ValueError(f"this artifact has a fixed batch of {self.spec.batch}, got {images.shape[0]} images; "
                             "re-export with --dynamic-batch or pass that many")
        return {"images": np.ascontiguousarray(images), "orig_target_sizes": np.ascontiguousarray(sizes)}

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph: {'images', 'orig_target_sizes'} -> {'labels', 'boxes', 'scores'} (numpy)."""
        return self._infer(self.check_inputs(inputs))

    # --- images -------------------------------------------------------------------------------------
    def prepare(self, images: np.ndarray | Sequence[np.ndarray], color: str = "bgr") -> PreparedBatch:
        return self.preprocessor(images, color)

    def detections_from_outputs(self, outputs: Mapping[str, np.ndarray], batch: PreparedBatch,
                                score_threshold: float = 0.0) -> list[Detections]:
        names = self.spec.class_names
        if outputs["labels"].size and int(outputs["labels"].max()) >= len(names):
            raise ValueError(f"the model predicted label {int(outputs['labels'].max())} but its metadata names only "
                             f"{len(names)} classes ({', '.join(names[:3])}, ...): an artifact of a custom-class model "
                             "without deimv2 metadata? Export it with deimv2-export --class-names FILE|a,b,c")
        results = []
        for i, transform in enumerate(batch.transforms):
            scores = outputs["scores"][i]
            keep = np.flatnonzero(scores >= score_threshold)
            keep = keep[np.argsort(-scores[keep], kind="stable")]
            boxes = transform.boxes_to_original(outputs["boxes"][i][keep], clip=getattr(self, "clip_boxes", True))
            results.append(Detections(boxes, scores[keep], outputs["labels"][i][keep], names, transform.orig_size,
                                      self.spec.category_ids))
        return results

    def predict(self, images: np.ndarray | Sequence[np.ndarray], score_threshold: float = 0.0,
                color: str = "bgr") -> Detections | list[Detections]:
        """Detections of one image (returns Detections) or a list of images (returns a list).

        Images are uint8 (H, W, 3), BGR unless color="rgb", any size; results are best first, boxes in the
        original image's pixels. score_threshold=0 keeps all top-k (300) detections, as the official model.
        """
        items, single = image_list(images)
        results: list[Detections] = []
        step = self.spec.batch or self.max_batch
        for start in range(0, len(items), step):
            chunk = items[start:start + step]
            batch = self.prepare(chunk, color)
            if self.spec.batch is not None and len(chunk) < self.spec.batch:  # pad a fixed-batch artifact
                batch = _pad_batch(batch, self.spec.batch)
            outputs = self.infer(batch.as_inputs())
            results.extend(self.detections_from_outputs(outputs, batch, score_threshold)[:len(chunk)])
        return results[0] if single else results

    def stream(self, source: Any, **options: Any) -> Iterator[tuple[int, np.ndarray, Detections]]:
        """`for frame_index, frame, detections in runtime.stream("video.mp4")`: see deimv2_deploy.video."""
        from deimv2_deploy.video import stream as _stream

        return _stream(self, source, **options)


def _pad_batch(batch: PreparedBatch, size: int) -> PreparedBatch:
    n = batch.images.shape[0]
    reps = [0] * n + [n - 1] * (size - n)  # repeat the last image; its results are dropped
    return PreparedBatch(batch.images[reps], batch.orig_target_sizes[reps],
                         batch.transforms + (batch.transforms[-1],) * (size - n))
