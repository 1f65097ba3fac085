"""VitSpec: the identity and preprocessing a DINOv3 / EoMT-DINOv3 artifact carries (no torch).

The detector's ArtifactSpec (spec.py) is tied to the eight DEIMv2 sizes; these models are sized by their config,
so they get their own spec, stored under its own metadata key (ONNX metadata_props, OpenVINO rt_info). A runtime
reads it to know the family, the fixed input size, the normalisation and (EoMT) the class names.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["VitSpec", "parse_stuff_classes", "VIT_METADATA_KEY", "VIT_SPEC_FORMAT", "GRAPH_IO", "IMAGENET_MEAN",
           "IMAGENET_STD"]

VIT_METADATA_KEY = "deimv2.vit_spec"
VIT_SPEC_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# family -> (input names, output names), as transformers names them
GRAPH_IO: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "dinov3": (("pixel_values",), ("last_hidden_state", "pooler_output")),
    "eomt": (("pixel_values",), ("class_queries_logits", "masks_queries_logits")),
}
_PREPROCESS = {
    # transformers' DINOv3ViTImageProcessor: resize to the input size ignoring aspect, /255, ImageNet mean/std
    "dinov3": "stretch",
    # the official EoMT evaluation: semantic = short side to the input size + overlapping square windows along the
    # long side; instance/panoptic = fit inside, pad right/bottom with 0; then /255 and ImageNet mean/std
    "eomt": "eomt-official",
}


@dataclass(frozen=True)
class VitSpec:
    family: str  # "dinov3" | "eomt"
    model_type: str  # transformers' model_type: dinov3_vit | eomt_dinov3
    input_size: tuple[int, int]  # (height, width) of pixel_values: fixed in the graph
    patch_size: int
    hidden_size: int
    num_register_tokens: int
    mean: tuple[float, float, float] = IMAGENET_MEAN  # RGB on [0, 1]
    std: tuple[float, float, float] = IMAGENET_STD
    resize: str = ""  # "stretch" | "eomt-official" (filled from the family when empty)
    class_names: tuple[str, ...] = ()  # EoMT: label order of class_queries_logits (the last column is no-object)
    num_queries: int = 0  # EoMT
    masked_attention: tuple[float, ...] = ()  # EoMT: attn_mask_probs baked into the graph (each 0 or 1)
    # EoMT panoptic: the labels that are stuff (one segment per class); () = every class is a thing; None = not
    # known (transformers' config does not keep it; `deimv2-export eomt --stuff-classes` records it)
    stuff_classes: tuple[int, ...] | None = None
    weights: str = "unknown"
    precision: str = "fp32"
    batch: int | None = None  # None: dynamic batch axis
    exporter: str = "unknown"
    versions: dict[str, str] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    build: dict[str, Any] = field(default_factory=dict)
    format: int = VIT_SPEC_FORMAT

    def __post_init__(self) -> None:
        if self.family not in GRAPH_IO:
            raise ValueError(f"unknown model family {self.family!r}: expected one of {', '.join(GRAPH_IO)}")
        h, w = (int(v) for v in self.input_size)
        if h <= 0 or w <= 0 or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input_size must be positive multiples of the patch size {self.patch_size}, "
                             f"got {self.input_size}")
        if self.family == "eomt" and (h != w or not self.class_names or self.num_queries < 1):
            raise ValueError(f"an EoMT spec needs a square input (got {h}x{w}), class names and num_queries")
        object.__setattr__(self, "input_size", (h, w))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "masked_attention", tuple(float(p) for p in self.masked_attention))
        if self.stuff_classes is not None:
            if self.family != "eomt":
                raise ValueError(f"stuff_classes are for EoMT artifacts, not {self.family}")
            stuff = tuple(sorted({int(c) for c in self.stuff_classes}))
            bad = [c for c in stuff if not 0 <= c < len(self.class_names)]
            if bad:
                raise ValueError(f"stuff class {bad[0]} is not a label of this model (0..{len(self.class_names) - 1})")
            object.__setattr__(self, "stuff_classes", stuff)
        object.__setattr__(self, "resize", self.resize or _PREPROCESS[self.family])

    @property
    def input_names(self) -> tuple[str, ...]:
        return GRAPH_IO[self.family][0]

    @property
    def output_names(self) -> tuple[str, ...]:
        return GRAPH_IO[self.family][1]

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of patches."""
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    def with_(self, **changes: Any) -> VitSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("input_size", "mean", "std", "class_names", "masked_attention"):
            d[name] = list(d[name])
        if d["stuff_classes"] is not None:
            d["stuff_classes"] = list(d["stuff_classes"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VitSpec:
        if int(d.get("format", 0)) > VIT_SPEC_FORMAT:
            raise ValueError(f"artifact metadata format {d.get('format')} is newer than this deimv2-deploy "
                             f"understands ({VIT_SPEC_FORMAT}); upgrade deimv2-deploy")
        known = set(cls.__dataclass_fields__)
        kwargs = {k: v for k, v in d.items() if k in known}
        for name in ("input_size", "mean", "std", "class_names", "masked_attention"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        if kwargs.get("stuff_classes") is not None:
            kwargs["stuff_classes"] = tuple(kwargs["stuff_classes"])
        return cls(**kwargs)

    def to_metadata(self) -> dict[str, str]:
        """Flat string key/values for ONNX metadata_props / OpenVINO rt_info."""
        return {VIT_METADATA_KEY: json.dumps(self.to_dict(), sort_keys=True),
                "deimv2.family": self.family,
                "deimv2.input_size": f"{self.input_size[0]}x{self.input_size[1]}",
                "deimv2.weights": self.weights}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> VitSpec | None:
        """The stored spec, or None where the artifact has none (not a DINOv3/EoMT export of ours)."""
        text = metadata.get(VIT_METADATA_KEY)
        return None if text is None else cls.from_dict(json.loads(text))

    def describe(self) -> str:
        h, w = self.input_size
        stuff = ("unknown" if self.stuff_classes is None else
                 f"{len(self.stuff_classes)} stuff / {len(self.class_names) - len(self.stuff_classes)} thing")
        what = (f"EoMT-DINOv3 ({len(self.class_names)} classes ({stuff}), {self.num_queries} queries, masked "
                f"attention {list(self.masked_attention)})" if self.family == "eomt" else
                f"DINOv3 ViT (dim {self.hidden_size}, {self.num_register_tokens} registers)")
        batch = "dynamic" if self.batch is None else str(self.batch)
        return f"{what} {h}x{w}, patch {self.patch_size}, {self.precision}, batch {batch}, weights: {self.weights}"


def parse_stuff_classes(value: str | list | tuple, class_names: tuple[str, ...]) -> tuple[int, ...]:
    """The stuff labels from "80-132", "0,3,5-9", class names ("sky,grass"), a list of ints/names, or "none" (no
    class is stuff); ValueError naming the item that is neither a label of the model nor one of its class names."""
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("none", ""):
            return ()
        items: list = [t.strip() for t in text.split(",") if t.strip()]
    else:
        items = list(value)
    index = {name: i for i, name in enumerate(class_names)}
    n = len(class_names)
    out: set[int] = set()
    for item in items:
        if isinstance(item, str) and item in index:
            out.add(index[item])
            continue
        text = str(item).strip()
        first, dash, last = text.partition("-")
        try:
            lo, hi = (int(first), int(last)) if dash and first else (int(text), int(text))
        except ValueError:
            raise ValueError(f"stuff class {text!r} is neither a label 0..{n - 1} (or a range LOW-HIGH) nor one of "
                             f"the model's class names ({', '.join(class_names[:3])}{', ...' if n > 3 else ''})") \
                from None
        if not 0 <= lo <= hi < n:
            raise ValueError(f"stuff classes {text!r} lie outside this model's labels 0..{n - 1}")
        out.update(range(lo, hi + 1))
    return tuple(sorted(out))
