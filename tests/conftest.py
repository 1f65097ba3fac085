"""Shared fixtures: where ../shared is, and artifacts exported once per test session."""
from __future__ import annotations

import ctypes
import os
import sys
import threading
from pathlib import Path

# OpenVINO's and NNCF's telemetry (openvino_telemetry, used by model conversion and NNCF quantization) forks a
# process from a worker thread to post to Google Analytics. Without network, that child can hang forever in
# getaddrinfo (a lock held by another thread at fork time), and the test session then hangs at exit joining it
# (seen once on CI: pytest had printed its summary and never exited). Both libraries turn telemetry off when CI=true.
os.environ["CI"] = "true"

import pytest
from golden import load_golden_module, shared_dir  # noqa: F401 - re-exported for tests


class _SignalStack(ctypes.Structure):  # glibc's stack_t on Linux
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]


def _dangling_signal_stack() -> str | None:
    """Where this thread's alternate signal stack points at unmapped memory, a description of it; else None.
    Python runs its signal handlers on that stack, so a dangling one turns the next signal (a test's SIGTERM, a
    DataLoader's SIGCHLD) into a SIGSEGV of the whole test session, far from the test that left it."""
    stack = _SignalStack()
    if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) != 0 or stack.flags & 2 or not stack.sp:
        return None  # SS_DISABLE (2): no alternate stack, nothing to check
    maps = [tuple(int(x, 16) for x in line.split()[0].split("-"))
            for line in Path("/proc/self/maps").read_text().splitlines()]
    ends = (stack.sp, stack.sp + stack.size - 1)
    if all(any(low <= address < high for low, high in maps) for address in ends):
        return None
    return f"{stack.size} bytes at {stack.sp:#x}, not mapped"


@pytest.fixture(autouse=True)
def _signal_stack_stays_valid():
    yield
    if sys.platform == "linux" and threading.current_thread() is threading.main_thread():
        dangling = _dangling_signal_stack()
        if dangling:
            pytest.fail(f"this test left the main thread's alternate signal stack dangling ({dangling}): the next "
                        "signal would kill the session with SIGSEGV (see openvino_backend.openvino_core)")


@pytest.fixture(scope="session")
def example_image_path() -> Path:
    path = shared_dir() / "media" / "example.jpg"
    if not path.exists():
        pytest.skip(f"example photo not found at {path} (set DEIMV2_SHARED)")
    return path


@pytest.fixture(scope="session")
def model_store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("model_store")


def _export(store: Path, size: str):
    from deimv2_deploy.exporters.onnx_export import export_onnx

    return export_onnx(size, random_weights=True, output_dir=store, quiet=True)


@pytest.fixture(scope="session")
def atto_onnx(model_store):
    """ExportResult of DEIMv2-atto with deterministic random weights (dynamic batch)."""
    return _export(model_store, "atto")


@pytest.fixture(scope="session")
def s_onnx(model_store):
    """ExportResult of DEIMv2-s with deterministic random weights (dynamic batch)."""
    return _export(model_store, "s")


@pytest.fixture(scope="session")
def coco80_from_detections(tmp_path_factory, atto_onnx):
    """(root, annotation file) of a COCO-80 dataset whose ground truth is part of the random-weight atto's own
    detections (images in root/images): a real runtime scores well above zero on it."""
    from detection_data import write_dataset_from_detections

    from deimv2_deploy.classes import COCO_CATEGORY_IDS, COCO_CLASSES
    from deimv2_deploy.runtimes import load_runtime

    root = tmp_path_factory.mktemp("coco80")
    runtime = load_runtime(atto_onnx.path)
    _, ann = write_dataset_from_detections(runtime, root, COCO_CATEGORY_IDS, COCO_CLASSES)
    runtime.close()
    return root, ann


@pytest.fixture(scope="session")
def three_class_model(tmp_path_factory):
    """A 3-class atto (deterministic random weights) through deimv2-export: `checkpoint` in deimv2-train's format
    (names and category ids inside), `plain` the same weights as the official training code saves them (no names),
    `onnx` exported from `checkpoint`, `xml` (OpenVINO IR) from `plain` + --class-names/--category-ids."""
    import types
    import warnings

    import torch
    from detection_data import THREE_CATEGORY_IDS, THREE_CLASSES

    from deimv2_deploy.cli.export import main as export_main
    from deimv2_deploy.models import build_model
    from deimv2_deploy.models.random_weights import apply_deterministic_weights

    folder = tmp_path_factory.mktemp("three_classes")
    store = folder / "store"
    state = apply_deterministic_weights(build_model("atto", num_classes=3), seed=3).state_dict()
    checkpoint, plain = folder / "finetuned.pth", folder / "official_format.pth"
    torch.save({"model": state, "deimv2": {"size": "atto", "class_names": list(THREE_CLASSES),
                                           "category_ids": list(THREE_CATEGORY_IDS)}}, checkpoint)
    torch.save({"model": state}, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings
        assert export_main(["atto", "--checkpoint", str(checkpoint), "--output-dir", str(store), "--quiet"]) == 0
        onnx_path = store / "deimv2_atto_fp32.onnx"
        assert export_main(["atto", "--format", "openvino", "--checkpoint", str(plain), "--onnx", str(onnx_path),
                            "--class-names", ",".join(THREE_CLASSES), "--category-ids",
                            ",".join(map(str, THREE_CATEGORY_IDS)), "--output-dir", str(store), "--quiet"]) == 0
    return types.SimpleNamespace(checkpoint=checkpoint, plain=plain, onnx=onnx_path,
                                 xml=store / "deimv2_atto_fp32.xml", names=THREE_CLASSES, ids=THREE_CATEGORY_IDS)


@pytest.fixture(scope="session")
def three_class_dataset(tmp_path_factory, three_class_model):
    """(images folder, annotation file): ground truth from the 3-class ONNX's own detections, labelled with the
    model's category ids 11, 37, 90."""
    from detection_data import write_dataset_from_detections

    from deimv2_deploy.runtimes import load_runtime

    runtime = load_runtime(three_class_model.onnx)
    found = write_dataset_from_detections(runtime, tmp_path_factory.mktemp("three_class_data"), three_class_model.ids,
                                          three_class_model.names, count=8)
    runtime.close()
    return found
