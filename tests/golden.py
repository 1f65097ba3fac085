"""The golden cases of the official model (../shared/golden, or $DEIMV2_GOLDEN), for the tests.

Every helper skips the calling test, saying where it looked, when the golden folder or file is absent.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    return Path(os.environ.get("DEIMV2_SHARED", REPO.parent / "shared"))


def golden_dir() -> Path:
    return Path(os.environ.get("DEIMV2_GOLDEN", shared_dir() / "golden"))


def golden_file(name: str) -> Path:
    path = golden_dir() / name
    if not path.exists():
        pytest.skip(f"golden file {path} not found (set DEIMV2_GOLDEN to the shared/golden folder)")
    return path


def load_golden_module(name: str):
    """fill.py / compare.py of the golden folder, imported once."""
    module_name = f"deimv2_golden_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, golden_file(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses in compare.py look their module up while it executes
    spec.loader.exec_module(module)
    return module


def load_manifest(variant: str) -> dict:
    return json.loads(golden_file(f"{variant}.manifest.json").read_text())
