"""Shared fixtures: where ../shared is, and artifacts exported once per test session."""
from __future__ import annotations

from pathlib import Path

import pytest
from golden import load_golden_module, shared_dir  # noqa: F401 - re-exported for tests


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
