"""What every exporter shares: the model store, artifact names, the reference model and library versions."""
from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deimv2_deploy import __version__
from deimv2_deploy.spec import ArtifactSpec
from deimv2_deploy.variants import get_variant_info

__all__ = ["ExportResult", "artifact_name", "resolve_store", "load_reference", "library_versions", "Steps",
           "EXPORTER"]

EXPORTER = f"deimv2-deploy {__version__}"


@dataclass
class ExportResult:
    path: Path  # the artifact (.onnx, .xml, .engine)
    spec: ArtifactSpec
    parity: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def resolve_store(output_dir: str | os.PathLike | None = None) -> Path:
    """The model store: `output_dir`, else $DEIMV2_MODELS, else ./models."""
    return Path(output_dir or os.environ.get("DEIMV2_MODELS") or "models")


def artifact_name(variant: str, precision: str = "fp32", random_weights: bool = False, batch: int | None = None,
                  ext: str = ".onnx") -> str:
    """deimv2_<size>[_random]_<precision>[_b<N>]<ext>: random weights are in the name so nobody mistakes them."""
    name = f"deimv2_{get_variant_info(variant).name}{'_random' if random_weights else ''}_{precision}"
    return f"{name}{f'_b{batch}' if batch else ''}{ext}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        files = sorted(q for q in path.iterdir() if q.is_file())
    else:
        files = [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_reference(variant: str, checkpoint: str | os.PathLike | None = None, random_weights: bool = False,
                   store: str | os.PathLike | None = None, seed: int = 0) -> tuple[Any, str]:
    """(deploy-mode DEIMv2 in eval mode, description of its weights).

    With no checkpoint and no random_weights, the official checkpoint is looked up in the model store; the
    FileNotFoundError says where.
    """
    from deimv2_deploy.models import build_model
    from deimv2_deploy.models.checkpoint import find_checkpoint, load_model
    from deimv2_deploy.models.random_weights import apply_deterministic_weights

    info = get_variant_info(variant)
    if checkpoint is not None and random_weights:
        raise ValueError("pass either a checkpoint or random_weights, not both")
    if random_weights:
        model = apply_deterministic_weights(build_model(info.name), seed=seed)
        weights = f"random (deterministic, seed {seed}): NOT a trained model"
    else:
        path = Path(checkpoint) if checkpoint is not None else find_checkpoint(info.name, store)
        model = load_model(path, variant=info.name)
        weights = f"{path.name} sha256:{_sha256(path)[:16]}"
    return model.eval().deploy().eval(), weights


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of the given import names (those that import)."""
    import importlib

    out = {"deimv2-deploy": __version__, "python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = str(importlib.import_module(name).__version__)
        except Exception:  # noqa: BLE001 - a missing or broken library is simply not listed
            pass
    return out


class Steps:
    """Prints numbered steps with their duration to stderr: progress for exports that take a while."""

    def __init__(self, title: str, total: int, quiet: bool = False) -> None:
        self.title, self.total, self.quiet, self.n = title, total, quiet, 0
        self.t0 = self.last = time.perf_counter()

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        self.n += 1
        if not self.quiet:
            print(f"[{self.title} {self.n}/{self.total}] {message}", file=sys.stderr, flush=True)
        self.last = now

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0
