"""The wire format of deimv2-serve: request bodies -> images, results -> JSON, problems -> 4xx JSON.

Nothing here imports Ray or a web framework, so every rule a request is checked against is tested directly.
Only JPEG and PNG are accepted: their headers give the image size before anything is decoded, so a small file
that would decode to gigabytes (a "decompression bomb") is refused without allocating it.

Which endpoint answers depends on the artifact (`model_kind`): a DEIMv2 detector `POST /detect` (Detections), an
EoMT-DINOv3 artifact `POST /segment` (the Segmentation as deimv2_deploy.vit_records' JSON, COCO RLE masks), a
DINOv3 artifact `POST /embed` (Embeddings, arrays as base64 float32 with their shape).
"""
from __future__ import annotations

from collections.abc import Mapping
from email import policy
from email.parser import BytesParser
from typing import Any

import cv2
import numpy as np

from deimv2_deploy.detections import Detections
from deimv2_deploy.embeddings import Embeddings
from deimv2_deploy.runtimes.vit_runtime import parse_eomt_tasks
from deimv2_deploy.segmentation import Segmentation
from deimv2_deploy.spec import ArtifactSpec
from deimv2_deploy.vit_records import embeddings_record, segmentation_record
from deimv2_deploy.vit_spec import VitSpec

__all__ = ["RequestError", "image_format", "image_dimensions", "extract_upload", "decode_image", "parse_score",
           "parse_tasks", "parse_flag", "check_query", "detections_payload", "segmentation_payload",
           "embeddings_payload", "model_identity", "model_kind", "model_title", "endpoints", "wrong_endpoint",
           "error_payload",
           "UPLOAD_FIELDS", "PREDICT_PATHS", "QUERY_PARAMS"]

# what each kind of artifact answers on: detector (ArtifactSpec), eomt and dinov3 (VitSpec families)
PREDICT_PATHS = {"detector": "/detect", "eomt": "/segment", "dinov3": "/embed"}
# the query parameters each predict endpoint takes (/segment and /embed refuse others; /detect ignores them)
QUERY_PARAMS = {"detector": ("score",), "eomt": ("task", "score"), "dinov3": ("patches",)}
_WHAT = {"detector": "a DEIMv2 detector", "eomt": "an EoMT-DINOv3 segmentation model",
         "dinov3": "a DINOv3 feature extractor"}

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the image size
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
# markers without a length field
_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
UPLOAD_FIELDS = ("image", "file")  # multipart field names taken as the image, in this order


class RequestError(ValueError):
    """A request the service refuses: `status` is the HTTP status (4xx), the message says what to send instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message


# --- images -----------------------------------------------------------------------------------------------
def image_format(data: bytes) -> str | None:
    """'jpeg', 'png' or None, from the first bytes."""
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if data.startswith(PNG_MAGIC):
        return "png"
    return None


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i, n = 2, len(data)  # after the start-of-image marker
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise RequestError(400, f"corrupt JPEG: expected a marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            break
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            raise RequestError(400, f"corrupt JPEG: segment length {length} at byte {i}")
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                break
            height = int.from_bytes(data[i + 5:i + 7], "big")
            width = int.from_bytes(data[i + 7:i + 9], "big")
            return width, height
        i += 2 + length
    raise RequestError(400, "corrupt or truncated JPEG: no frame header (SOF) with the image size")


def image_dimensions(data: bytes) -> tuple[int, int]:
    """(width, height) read from a JPEG or PNG header, without decoding the image."""
    kind = image_format(data)
    if kind == "png":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise RequestError(400, "corrupt or truncated PNG: no IHDR header with the image size")
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if kind == "jpeg":
        return _jpeg_size(data)
    raise RequestError(415, f"the body is not a JPEG or PNG image (it starts with {data[:8]!r}); send the image "
                            "file's bytes, or a multipart form with the file in a field named 'image'")


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """BGR uint8 (H, W, 3) from JPEG/PNG bytes, refusing images over `max_pixels` before decoding them."""
    if not data:
        raise RequestError(400, "empty request body: send a JPEG or PNG image")
    width, height = image_dimensions(data)
    if width < 1 or height < 1:
        raise RequestError(400, f"the image header gives a size of {width}x{height} pixels; send a valid image")
    if width * height > max_pixels:
        raise RequestError(413, f"image of {width}x{height} = {width * height} pixels is over this service's limit "
                                f"of {max_pixels} pixels; send a smaller image")
    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise RequestError(400, f"cannot decode the {image_format(data).upper()} image (corrupt or truncated)")
    return image


def _multipart_upload(body: bytes, content_type: str) -> bytes:
    # the stdlib MIME parser reads the form; the header line gives it the boundary
    message = BytesParser(policy=policy.HTTP).parsebytes(b"Content-Type: " + content_type.encode("latin-1")
                                                         + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise RequestError(400, "malformed multipart form (no boundary or no parts); send the image in a field "
                                "named 'image'")
    parts = list(message.iter_parts())
    by_name = {part.get_param("name", header="content-disposition"): part for part in parts}
    chosen = next((by_name[name] for name in UPLOAD_FIELDS if name in by_name), None)
    if chosen is None:  # else the first uploaded file, whatever its field is called
        chosen = next((part for part in parts if part.get_filename()), None)
    if chosen is None:
        names = sorted(str(n) for n in by_name)
        raise RequestError(400, f"the multipart form has no image: fields {names}; put the file in a field named "
                                "'image'")
    payload = chosen.get_payload(decode=True)
    return payload or b""


def extract_upload(body: bytes, content_type: str | None) -> bytes:
    """The image bytes of a request: the body itself, or the image field of a multipart/form-data body."""
    if content_type and content_type.lower().startswith("multipart/form-data"):
        return _multipart_upload(body, content_type)
    return body


def parse_score(value: str | None, default: float) -> float:
    """The `?score=` query parameter: a number in [0, 1]."""
    if value is None or value == "":
        return default
    try:
        score = float(value)
    except ValueError:
        raise RequestError(400, f"score must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= score <= 1.0:  # also refuses nan
        raise RequestError(400, f"score must lie in [0, 1], got {value!r}")
    return score


def parse_tasks(values: list[str], spec: VitSpec) -> tuple[str, ...]:
    """`?task=` (repeated or comma-separated) of POST /segment -> EoMT tasks; none: semantic and instance, plus
    panoptic when the artifact records its stuff classes. 400 for an unknown task, and for panoptic on an artifact
    that does not say which classes are stuff."""
    try:
        tasks = parse_eomt_tasks(values, spec, option="task")
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    if "panoptic" in tasks and spec.stuff_classes is None:
        raise RequestError(400, "task 'panoptic' needs to know which classes are stuff, and this artifact does not "
                                "record it: ask for task=semantic,instance, or serve an artifact exported with "
                                "`deimv2-export eomt --stuff-classes ...` ('none' if every class is a thing)")
    return tasks


def parse_flag(value: str | None, name: str) -> bool:
    """A yes/no query parameter: 1/true/yes or 0/false/no (absent or empty: no)."""
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no"):
        return False
    if text in ("1", "true", "yes"):
        return True
    raise RequestError(400, f"{name} must be 1 or 0 (true/false), got {value!r}")


def check_query(names: list[str], kind: str) -> None:
    """400 for a query parameter the endpoint does not take (a misspelt `tasks=` would otherwise pass unseen)."""
    known = QUERY_PARAMS[kind]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise RequestError(400, f"unknown query parameter {unknown[0]!r} for POST {PREDICT_PATHS[kind]}: it takes "
                                f"{', '.join(known)}")


# --- what is served ---------------------------------------------------------------------------------------
def model_kind(spec: ArtifactSpec | VitSpec) -> str:
    """"detector", "eomt" or "dinov3": which predict endpoint the artifact answers on (PREDICT_PATHS)."""
    return spec.family if isinstance(spec, VitSpec) else "detector"


def model_title(spec: ArtifactSpec | VitSpec) -> str:
    """A short name for logs: DEIMv2-atto, EoMT-DINOv3, DINOv3."""
    kind = model_kind(spec)
    return {"eomt": "EoMT-DINOv3", "dinov3": "DINOv3"}.get(kind) or f"DEIMv2-{spec.variant}"


def endpoints(kind: str) -> str:
    """The endpoints of a service for this kind of artifact, as one line."""
    query = "&".join(f"{name}=" for name in QUERY_PARAMS[kind])
    return f"POST {PREDICT_PATHS[kind]}?{query} (a JPEG or PNG image), GET /health, GET /metadata"


def wrong_endpoint(path: str, kind: str) -> RequestError:
    """404 for another kind's predict endpoint: it names what this service runs and where to send the image."""
    other = next(k for k, p in PREDICT_PATHS.items() if p == path)
    return RequestError(404, f"POST {path} is for {_WHAT[other]}, but this service runs {_WHAT[kind]}: send the "
                             f"image to POST {PREDICT_PATHS[kind]}")


# --- responses --------------------------------------------------------------------------------------------
def model_identity(spec: ArtifactSpec | VitSpec, backend: str) -> dict[str, Any]:
    """Which model answered: enough to tell two deployments apart in a log."""
    if isinstance(spec, VitSpec):
        return {"family": spec.family, "model_type": spec.model_type, "input_size": list(spec.input_size),
                "patch_size": spec.patch_size, "hidden_size": spec.hidden_size, "precision": spec.precision,
                "backend": backend, "weights": spec.weights, "exporter": spec.exporter}
    return {"variant": spec.variant, "input_size": list(spec.input_size), "precision": spec.precision,
            "backend": backend, "weights": spec.weights, "random_weights": spec.random_weights,
            "exporter": spec.exporter}


def detections_payload(detections: Detections, spec: ArtifactSpec) -> dict[str, Any]:
    """Detections as JSON: boxes [x1, y1, x2, y2] in the image's pixels, score, label, class name, and the
    dataset's category id where the artifact carries custom category ids."""
    payload = detections.to_dict()
    category_ids = getattr(spec, "category_ids", None)  # optional ArtifactSpec field (custom datasets)
    if category_ids is not None:
        for item in payload["detections"]:
            item["category_id"] = int(category_ids[item["label"]])
    payload["count"] = len(payload["detections"])
    return payload


def segmentation_payload(segmentation: Segmentation, tasks: tuple[str, ...], score: float) -> dict[str, Any]:
    """A Segmentation as JSON: deimv2-infer's record (vit_records.segmentation_record) with the semantic map as one
    COCO RLE mask per class present (`semantic.classes[i].segmentation`), so every mask in the answer decodes the
    same way; instances at score >= `score`."""
    return {"tasks": list(tasks), **segmentation_record(segmentation, score, semantic_masks=True)}


def embeddings_payload(embeddings: Embeddings, patches: bool) -> dict[str, Any]:
    """Embeddings as JSON: cls, pooled, registers (and the patch grid when asked) as base64 float32 arrays with
    their shape (vit_records.embeddings_record)."""
    return embeddings_record(embeddings, patches=patches)


def error_payload(status: int, message: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"error": message, "status": int(status), **(extra or {})}
