"""ArtifactSpec: the identity and preprocessing every exported artifact carries.

ONNX stores it in `metadata_props`, OpenVINO IR in `rt_info`, a TensorRT engine in a JSON sidecar. A runtime
reads it from there and never guesses normalisation from a file name. Stored as one JSON document under
`METADATA_KEY`, plus a few flat keys so a person looking at the file (Netron, `ovc`) sees what it is.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from deimv2_deploy import __version__
from deimv2_deploy.classes import COCO_CATEGORY_IDS, COCO_CLASSES, checked_category_ids
from deimv2_deploy.variants import get_variant_info

__all__ = ["ArtifactSpec", "METADATA_KEY", "SPEC_FORMAT", "RESIZE_MODES", "EXPORTER", "resolve_spec"]

METADATA_KEY = "deimv2.spec"
SPEC_FORMAT = 1
RESIZE_MODES = ("stretch", "letterbox")
EXPORTER = f"deimv2-deploy {__version__}"  # the `exporter` of every artifact (and reference) this package makes


@dataclass(frozen=True)
class ArtifactSpec:
    variant: str
    input_size: tuple[int, int]  # (height, width) of the `images` input
    mean: tuple[float, float, float] | None  # RGB on [0, 1]; None: the graph takes plain [0, 1] RGB
    std: tuple[float, float, float] | None
    resize: str = "stretch"  # how images are brought to input_size: "stretch" (official eval) or "letterbox"
    class_names: tuple[str, ...] = COCO_CLASSES
    # dataset category id of each label (custom classes); None: the COCO-80 ids when class_names are COCO's
    category_ids: tuple[int, ...] | None = None
    top_k: int = 300  # detections per image the graph returns
    weights: str = "unknown"  # where the weights came from (checkpoint path + sha256, or "random ...")
    random_weights: bool = False  # True: deterministic untrained weights, for plumbing and timing only
    precision: str = "fp32"
    batch: int | None = None  # None: dynamic batch axis
    exporter: str = "unknown"  # "deimv2-deploy X.Y.Z" or "official (no metadata)"
    versions: dict[str, str] = field(default_factory=dict)  # libraries used to build the artifact
    parity: dict[str, Any] | None = None  # the export's parity report against PyTorch
    build: dict[str, Any] = field(default_factory=dict)  # backend-specific build settings
    format: int = SPEC_FORMAT

    def __post_init__(self) -> None:
        get_variant_info(self.variant)  # validates the name
        h, w = self.input_size
        if h <= 0 or w <= 0 or h % 32 or w % 32:
            raise ValueError(f"input_size must be positive multiples of 32, got {self.input_size}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must both be given or both be None")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        object.__setattr__(self, "input_size", (int(h), int(w)))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.category_ids is not None:
            object.__setattr__(self, "category_ids", checked_category_ids(self.category_ids, len(self.class_names)))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))

    # --- constructors -------------------------------------------------------------------------------
    @classmethod
    def for_variant(cls, variant: str, **overrides: Any) -> ArtifactSpec:
        """The spec of an artifact of `variant` with the official preprocessing."""
        info = get_variant_info(variant)
        base = dict(variant=info.name, input_size=info.input_size, mean=info.mean, std=info.std)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def for_official_export(cls, variant: str) -> ArtifactSpec:
        """An artifact from the official exporter: no metadata, so the user named the variant."""
        return cls.for_variant(variant, exporter="official (no metadata)", weights="unknown (official export)")

    def with_(self, **changes: Any) -> ArtifactSpec:
        return replace(self, **changes)

    # --- serialisation ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["class_names"] = list(self.class_names)
        d["category_ids"] = None if self.category_ids is None else list(self.category_ids)
        for name in ("mean", "std"):
            d[name] = None if d[name] is None else list(d[name])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArtifactSpec:
        if int(d.get("format", 0)) > SPEC_FORMAT:
            raise ValueError(f"artifact metadata format {d.get('format')} is newer than this deimv2-deploy "
                             f"understands ({SPEC_FORMAT}); upgrade deimv2-deploy")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in d.items() if k in known}
        kwargs["input_size"] = tuple(kwargs["input_size"])
        if kwargs.get("category_ids") is not None:
            kwargs["category_ids"] = tuple(kwargs["category_ids"])
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> ArtifactSpec:
        return cls.from_dict(json.loads(text))

    def to_metadata(self) -> dict[str, str]:
        """Flat string key/values for ONNX metadata_props / OpenVINO rt_info."""
        return {
            METADATA_KEY: json.dumps(self.to_dict(), sort_keys=True),
            "deimv2.variant": self.variant,
            "deimv2.input_size": f"{self.input_size[0]}x{self.input_size[1]}",
            "deimv2.normalize": "imagenet" if self.mean is not None else "none",
            "deimv2.weights": self.weights,
        }

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> ArtifactSpec | None:
        """The spec stored by `to_metadata`, or None where the artifact has none (official exporter)."""
        text = metadata.get(METADATA_KEY)
        return None if text is None else cls.from_json(text)

    def dataset_category_ids(self) -> tuple[int, ...] | None:
        """The dataset category id of each label: `category_ids`, else COCO's 80 ids for a COCO-80 model, else None."""
        if self.category_ids is not None:
            return self.category_ids
        return COCO_CATEGORY_IDS if self.class_names == COCO_CLASSES else None

    # --- for people ---------------------------------------------------------------------------------
    def describe(self) -> str:
        norm = "ImageNet mean/std" if self.mean is not None else "none"
        batch = "dynamic" if self.batch is None else str(self.batch)
        weights = "RANDOM (deterministic, untrained: not for real detection)" if self.random_weights else self.weights
        return (f"DEIMv2-{self.variant} {self.input_size[0]}x{self.input_size[1]}, normalisation {norm}, "
                f"resize {self.resize}, {self.precision}, batch {batch}, weights: {weights}")


def resolve_spec(stored: ArtifactSpec | None, path: str | os.PathLike, variant: str | None, *,
                 where: str = "deimv2-deploy metadata", input_hw: Sequence[int | None] | None = None,
                 batch: int | None = None, example: str = "load_runtime(path, variant='atto') or --variant atto",
                 **official: Any) -> ArtifactSpec:
    """The spec an artifact runs with; every backend (and the TensorRT exporter) resolves it here.

    `stored`: the spec the artifact carries (ONNX metadata, IR rt_info, engine sidecar), None where it has none.
    Then `variant` (the size the user named) must agree with it. Without one (an official-exporter ONNX, a
    `trtexec` engine) the user must name the size, and the official preprocessing of that size is used, checked
    against the graph's image input size `input_hw` (height, width; None or negative where dynamic) and fixed at
    the graph's `batch` when that is static. `official`: fields to set on such a spec (e.g. precision).
    `where` names what was looked for, `example` how to pass the size, in the errors.
    """
    if stored is not None:
        if variant is not None and get_variant_info(variant).name != stored.variant:
            raise ValueError(f"{path} is DEIMv2-{stored.variant} (from its {where}), not {variant!r}")
        return stored
    if variant is None:
        raise ValueError(f"{path} has no {where} (an official export?): pass the size, e.g. {example}")
    spec = ArtifactSpec.for_official_export(variant)
    if official:
        spec = spec.with_(**official)
    hw = tuple(input_hw) if input_hw is not None else ()
    if len(hw) == 2 and all(isinstance(d, int) and d > 0 for d in hw) and hw != spec.input_size:
        raise ValueError(f"{path} takes {hw[0]}x{hw[1]} images but DEIMv2-{spec.variant} uses "
                         f"{spec.input_size[0]}x{spec.input_size[1]}: is it really size {variant!r}?")
    if batch is not None and batch > 0:
        spec = spec.with_(batch=int(batch))
    return spec
