"""What every exporter shares: the model store, artifact names, library versions and progress lines.

The reference model they all start from is `deimv2_deploy.models.reference.load_reference`."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deimv2_deploy import __version__
from deimv2_deploy.classes import ModelClasses, resolve_classes
from deimv2_deploy.spec import EXPORTER, ArtifactSpec
from deimv2_deploy.variants import get_variant_info

__all__ = ["ExportResult", "artifact_name", "resolve_store", "library_versions", "Steps", "EXPORTER", "deploy_graph",
           "spec_with_classes"]


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


def deploy_graph(variant: str, checkpoint: str | os.PathLike | None, random_weights: bool, store: Path,
                 graph: Any, weights: str | None, steps: Steps, class_names: Sequence[str] | None = None,
                 category_ids: Sequence[int] | None = None) -> tuple[Any, str, ModelClasses]:
    """(the DeployGraph to export, a description of its weights, its classes): `graph` as given (a caller that holds
    one), else the reference model loaded from the checkpoint, the model store or deterministic random weights.

    Classes: `class_names`/`category_ids` when given (the user's, or those of the caller's graph), else those the
    checkpoint carries, else COCO-80 for an 80-class model, else class_0.. with a warning."""
    if graph is not None:
        steps(f"using the given DEIMv2-{variant} deploy graph")
        from deimv2_deploy.models.reference import model_num_classes

        classes = resolve_classes(model_num_classes(graph), None, class_names, category_ids,
                                  model=f"the given DEIMv2-{variant} graph")
        return graph, weights or "unknown", classes
    from deimv2_deploy.models.graph import DeployGraph
    from deimv2_deploy.models.reference import load_reference

    steps(f"loading DEIMv2-{variant} ({'random weights' if random_weights else checkpoint or 'model store'})")
    ref = load_reference(variant, checkpoint, random_weights, store, class_names=class_names,
                         category_ids=category_ids)
    return DeployGraph(ref.model).eval(), ref.weights, ref.classes


def spec_with_classes(spec: ArtifactSpec, known: bool, class_names: Sequence[str] | None,
                      category_ids: Sequence[int] | None, model: str) -> ArtifactSpec:
    """`spec` given the user's classes, for an export that starts from an artifact: checked against the classes it
    carries when it has metadata (`known`); one without (an official export) takes them as given."""
    if class_names is None and category_ids is None:
        return spec
    stored = ModelClasses(spec.class_names, spec.category_ids, "its metadata") if known else None
    classes = resolve_classes(len(spec.class_names) if known else None, stored, class_names, category_ids, model)
    return spec.with_(**classes.spec_fields())


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
