"""deimv2-export --checkpoint <transformers folder>: ONNX through the graph the weights belong to.

A transformers-format folder converted from official weights is exported through the official graph (the
detections equal the official model's). One fine-tuned inside transformers holds trained tensors the official
graph does not have, so it is exported through transformers' own `Deimv2ForObjectDetection`, traced inside
`TransformersDeployGraph` (our I/O contract and postprocessor) and checked against transformers' own forward.
`--graph official|transformers` forces the choice (a warning says when that changes the outputs). Either way
the artifact's metadata records the graph and why (`spec.build["graph"]`, `["graph_reason"]`), and the class
names of the folder's `id2label`.
"""
from __future__ import annotations

import os
import warnings

from deimv2_deploy.exporters.common import ExportResult
from deimv2_deploy.files import file_sha256
from deimv2_deploy.variants import get_variant_info

__all__ = ["export_checkpoint_onnx"]


def export_checkpoint_onnx(variant: str, checkpoint: str | os.PathLike, *, graph: str = "auto",
                           output_dir: str | os.PathLike | None = None, opset: int = 17, batch: int | None = None,
                           simplify: bool = True, fp16: bool = False, quiet: bool = False) -> ExportResult:
    """Export the checkpoint to ONNX through the official graph or transformers' (see the module docstring)."""
    from pathlib import Path

    from deimv2_deploy.exporters.onnx_export import export_onnx
    from deimv2_deploy.models.hf_graph import load_deploy_graph

    info = get_variant_info(variant)
    path = Path(checkpoint)
    choice = load_deploy_graph(path, info.name, graph)  # type: ignore[arg-type]
    if choice.warning:
        warnings.warn(choice.warning, UserWarning, stacklevel=2)
    if not quiet:
        print(f"graph: {choice.kind} ({choice.reason})", flush=True)
    weights = f"{path.name} sha256:{file_sha256(path)[:16]}"
    return export_onnx(info.name, output_dir=output_dir, opset=opset, batch=batch, simplify=simplify, fp16=fp16,
                       quiet=quiet, graph=choice.graph, weights=weights, spec_overrides=choice.spec_overrides)
