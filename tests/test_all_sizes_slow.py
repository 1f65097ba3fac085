"""The slow check (`make test-slow`): every size through ONNX Runtime and OpenVINO against PyTorch.

About 15-25 minutes on 2 cores (l and x take minutes each to export and check). `make test` runs atto and s
through every backend; this runs all eight with the same tolerances.
"""
from __future__ import annotations

import pytest

from deimv2_deploy.exporters.parity import (
    FP32_BOX_TOL,
    FP32_SCORE_TOL,
    MIN_MATCHED,
    match_detections,
    parity_batch,
    reference_outputs,
)
from deimv2_deploy.models.graph import DeployGraph
from deimv2_deploy.models.reference import load_reference
from deimv2_deploy.runtimes import load_runtime
from deimv2_deploy.variants import VARIANT_NAMES

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("size", VARIANT_NAMES)
def test_every_size_on_every_cpu_backend_matches_pytorch(size, tmp_path):
    from deimv2_deploy.exporters.onnx_export import export_onnx
    from deimv2_deploy.exporters.openvino_export import export_openvino

    model, weights, _ = load_reference(size, random_weights=True)
    graph = DeployGraph(model).eval()
    onnx = export_onnx(size, random_weights=True, output_dir=tmp_path, graph=graph, weights=weights, quiet=True)
    ir = export_openvino(size, random_weights=True, output_dir=tmp_path, graph=graph, weights=weights, quiet=True)
    batch = parity_batch(onnx.spec, count=2)
    reference = reference_outputs(graph, batch)
    for path, backend in ((onnx.path, "onnxruntime"), (onnx.path, "openvino"), (ir.path, "openvino")):
        runtime = load_runtime(path, backend=backend, threads=2)
        report = match_detections(runtime.infer(batch.as_inputs()), reference)
        assert report["ok"], (size, backend, path.suffix, report)
        assert report["fraction"] >= MIN_MATCHED
        assert report["max_box_diff"] <= FP32_BOX_TOL and report["max_score_diff"] <= FP32_SCORE_TOL
