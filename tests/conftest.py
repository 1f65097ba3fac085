"""Shared fixtures: where ../shared is, and artifacts exported once per test session."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("DEIMV2_SHARED", REPO.parent / "shared"))


def golden_dir() -> Path:
    return Path(os.environ.get("DEIMV2_GOLDEN", shared_dir() / "golden"))


def load_golden_module(name: str):
    """fill.py / compare.py from the golden folder, or skip (with why) where it is absent."""
    path = golden_dir() / f"{name}.py"
    if not path.exists():
        pytest.skip(f"golden cases not found at {golden_dir()} (set DEIMV2_GOLDEN)")
    module_name = f"deimv2_golden_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses in compare.py look their module up while it executes
    spec.loader.exec_module(module)
    return module


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
    from deimv2_deploy.models import build_model

    try:
        build_model("s")
    except NotImplementedError as e:
        pytest.skip(f"DEIMv2-s reference model not available yet: {e}")
    return _export(model_store, "s")
