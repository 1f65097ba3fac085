"""The wire format of deimv2-serve: request bodies -> images, Detections -> JSON, problems -> 4xx JSON.

Nothing here imports Ray or a web framework, so every rule a request is checked against is tested directly.
Only JPEG and PNG are accepted: their headers give the image size before anything is decoded, so a small file
that would decode to gigabytes (a "decompression bomb") is refused without allocating it.
"""
from __future__ import annotations

from collections.abc import Mapping
from email import policy
from email.parser import BytesParser
from typing import Any

import cv2
import numpy as np

from deimv2_deploy.detections import Detections
from deimv2_deploy.spec import ArtifactSpec

__all__ = ["RequestError", "image_format", "image_dimensions", "extract_upload", "decode_image", "parse_score",
           "detections_payload", "model_identity", "error_payload", "UPLOAD_FIELDS"]

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


# --- responses --------------------------------------------------------------------------------------------
def model_identity(spec: ArtifactSpec, backend: str) -> dict[str, Any]:
    """Which model answered: enough to tell two deployments apart in a log."""
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


def error_payload(status: int, message: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {"error": message, "status": int(status), **(extra or {})}
