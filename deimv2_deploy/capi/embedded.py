"""The Python side of libdeimv2.so: what runs when a C program calls deimv2_open, deimv2_detect, ...

cffi calls the `deimv2_py_*` functions defined by `install(ffi, lib)` (run once by the library's
embedding init code) on the C caller's thread with the GIL held. The C wrappers in deimv2_capi.c have
already checked NULL pointers and sizes; here every exception is caught and turned into a status code
plus a message for `deimv2_last_error` (no Python exception may cross into C).

Handles are `ffi.new_handle` pointers kept in a table: a pointer that is not in it (closed, or garbage)
is reported as an error instead of being dereferenced.
"""
from __future__ import annotations

import threading
from enum import IntEnum
from typing import Any

import numpy as np

from deimv2_deploy.runtimes import BackendUnavailableError, Runtime, load_runtime

__all__ = ["Status", "DETECTION_DTYPE", "install", "status_for_exception", "image_from_buffer"]


class Status(IntEnum):
    """The deimv2_status codes of deimv2.h (tests check the two agree)."""

    OK = 0
    ERR_INVALID_ARGUMENT = 1
    ERR_NOT_FOUND = 2
    ERR_CAPACITY = 3
    ERR_UNAVAILABLE = 4
    ERR_RUNTIME = 5
    ERR_PYTHON = 6


# deimv2_detection {float x1, y1, x2, y2; float score; int label;}: 24 bytes, no padding
DETECTION_DTYPE = np.dtype([("x1", "<f4"), ("y1", "<f4"), ("x2", "<f4"), ("y2", "<f4"), ("score", "<f4"),
                            ("label", "<i4")])


class _HandleError(ValueError):
    """A handle pointer that deimv2_open did not return, or one already closed."""


def status_for_exception(error: BaseException) -> Status:
    if isinstance(error, FileNotFoundError):
        return Status.ERR_NOT_FOUND
    if isinstance(error, (BackendUnavailableError, ImportError)):
        return Status.ERR_UNAVAILABLE
    if isinstance(error, (ValueError, TypeError, KeyError)):
        return Status.ERR_INVALID_ARGUMENT
    return Status.ERR_RUNTIME


def image_from_buffer(buffer: Any, width: int, height: int, stride: int) -> np.ndarray:
    """A (height, width, 3) uint8 copy of rows `stride` bytes apart (the caller's memory is only borrowed)."""
    rows = np.frombuffer(buffer, dtype=np.uint8, count=stride * (height - 1) + width * 3)
    view = np.lib.stride_tricks.as_strided(rows, shape=(height, width, 3), strides=(stride, 3, 1), writeable=False)
    return np.array(view)


class _Detector:
    """One open handle: the runtime, its lock, and the class names as C strings living as long as it."""

    def __init__(self, ffi: Any, runtime: Runtime) -> None:
        self.runtime = runtime
        self.lock = threading.Lock()  # calls on one handle run one at a time
        self.closed = False
        self.class_names = [ffi.new("char[]", name.encode("utf-8")) for name in runtime.spec.class_names]


def install(ffi: Any, lib: Any) -> None:
    """Define the `deimv2_py_*` functions of the compiled module (`_deimv2_capi`'s ffi and lib)."""
    if ffi.sizeof("deimv2_detection") != DETECTION_DTYPE.itemsize:
        raise RuntimeError(f"deimv2_detection is {ffi.sizeof('deimv2_detection')} bytes in C but "
                           f"{DETECTION_DTYPE.itemsize} in DETECTION_DTYPE: the header and embedded.py disagree")
    handles: dict[int, tuple[Any, _Detector]] = {}  # address -> (the new_handle cdata keeping it valid, detector)
    table_lock = threading.Lock()

    def fail(function: str, error: BaseException) -> int:
        status = status_for_exception(error)
        message = str(error) or type(error).__name__
        lib.deimv2_internal_set_error(f"{function}: {message}".encode("utf-8", "replace"))
        return int(status)

    def lookup(handle: Any) -> _Detector:
        address = int(ffi.cast("uintptr_t", handle))
        with table_lock:
            entry = handles.get(address)
        if entry is None:
            raise _HandleError(f"{address:#x} is not an open handle (already closed, or not from deimv2_open)")
        return entry[1]

    @ffi.def_extern(error=int(Status.ERR_RUNTIME))
    def deimv2_py_open(artifact, backend, device, out):
        try:
            path = ffi.string(artifact).decode("utf-8")
            backend_name = None if backend == ffi.NULL else ffi.string(backend).decode("utf-8")
            runtime = load_runtime(path, backend=backend_name or None, device=ffi.string(device).decode("utf-8"))
            detector = _Detector(ffi, runtime)
            keep = ffi.new_handle(detector)
            with table_lock:
                handles[int(ffi.cast("uintptr_t", keep))] = (keep, detector)
            out[0] = ffi.cast("deimv2_t *", keep)
            return int(Status.OK)
        except BaseException as e:  # noqa: B036 - nothing may escape into C
            return fail("deimv2_open", e)

    @ffi.def_extern(error=int(Status.ERR_RUNTIME))
    def deimv2_py_detect(handle, bgr, width, height, stride, score_threshold, out, capacity, count):
        try:
            detector = lookup(handle)
            image = image_from_buffer(ffi.buffer(bgr, stride * (height - 1) + width * 3), width, height, stride)
            with detector.lock:
                if detector.closed:
                    raise _HandleError("the handle was closed during the call")
                detections = detector.runtime.predict(image, score_threshold=float(score_threshold))
            needed = len(detections)
            written = min(needed, capacity)
            if written:
                rows = np.empty(written, DETECTION_DTYPE)
                for i, name in enumerate(("x1", "y1", "x2", "y2")):
                    rows[name] = detections.xyxy[:written, i]
                rows["score"] = detections.scores[:written]
                rows["label"] = detections.labels[:written]
                ffi.memmove(out, rows, rows.nbytes)
            count[0] = needed
            if needed > capacity:
                message = (f"deimv2_detect: {needed} detections but capacity is {capacity}; the best {written} "
                           "were written and *count holds the number needed")
                lib.deimv2_internal_set_error(message.encode())
                return int(Status.ERR_CAPACITY)
            return int(Status.OK)
        except BaseException as e:  # noqa: B036
            return fail("deimv2_detect", e)

    @ffi.def_extern()
    def deimv2_py_close(handle):
        try:
            address = int(ffi.cast("uintptr_t", handle))
            with table_lock:
                entry = handles.pop(address, None)
            if entry is None:
                raise _HandleError(f"{address:#x} is not an open handle (already closed, or not from deimv2_open)")
            detector = entry[1]
            with detector.lock:  # waits for a detect running on another thread
                detector.closed = True
                detector.runtime.close()
        except BaseException as e:  # noqa: B036
            fail("deimv2_close", e)

    @ffi.def_extern()
    def deimv2_py_class_name(handle, label):
        try:
            names = lookup(handle).class_names
            if not 0 <= label < len(names):
                raise ValueError(f"label {label} is out of range 0..{len(names) - 1}")
            return names[label]
        except BaseException as e:  # noqa: B036
            fail("deimv2_class_name", e)
            return ffi.NULL

    @ffi.def_extern(error=-1)
    def deimv2_py_num_classes(handle):
        try:
            return len(lookup(handle).class_names)
        except BaseException as e:  # noqa: B036
            fail("deimv2_num_classes", e)
            return -1

    @ffi.def_extern(error=-1)
    def deimv2_py_max_detections(handle):
        try:
            return int(lookup(handle).runtime.spec.top_k)
        except BaseException as e:  # noqa: B036
            fail("deimv2_max_detections", e)
            return -1
