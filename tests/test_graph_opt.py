"""CPU speed work: export-friendly model forms equal the plain formulation, the official-style baseline export is
the same model, and OpenVINO's batch-1 specialisation of dynamic-batch graphs gives the same detections."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deimv2_deploy.models.dinov3 import RopeEmbedding, SelfAttention


def _reference_attention(attn: SelfAttention, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                         prefix: int) -> torch.Tensor:
    """The textbook form: heads first, prefix tokens sliced off, rotated and put back."""
    b, n, c = x.shape
    q, k, v = attn.qkv(x).view(b, n, 3, attn.num_heads, c // attn.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def rotate(t):
        head, tail = t[:, :, :prefix], t[:, :, prefix:]
        first, second = tail.chunk(2, dim=-1)
        return torch.cat((head, tail * cos + torch.cat((-second, first), dim=-1) * sin), dim=2)

    out = F.scaled_dot_product_attention(rotate(q), rotate(k), v)
    return attn.proj(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("prefix,dim,heads,mask", [(1, 192, 3, False), (5, 384, 6, True)])
def test_token_major_attention_equals_the_reference(prefix, dim, heads, mask):
    torch.manual_seed(0)
    attn = SelfAttention(dim, heads, mask_k_bias=mask).eval()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.05)
    rope = RopeEmbedding(dim // heads)
    h, w = 4, 6
    x = torch.randn(2, prefix + h * w, dim)
    sin_all, cos_all = rope(h, w, prefix=prefix)
    sin, cos = rope(h, w)
    with torch.no_grad():
        ours = attn(x, sin_all, cos_all)
        ref = _reference_attention(attn, x, sin, cos, prefix)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)


def test_rope_prefix_rows_are_the_identity_rotation():
    rope = RopeEmbedding(64)
    sin, cos = rope(3, 5)
    sin_p, cos_p = rope(3, 5, prefix=5)
    assert sin_p.shape == (5 + 15, 64)
    assert torch.equal(sin_p[:5], torch.zeros(5, 64)) and torch.equal(cos_p[:5], torch.ones(5, 64))
    assert torch.equal(sin_p[5:], sin) and torch.equal(cos_p[5:], cos)
    x = torch.randn(5, 64) * 1e3
    first, second = x.chunk(2, dim=-1)
    assert torch.equal(x * cos_p[:5] + torch.cat((-second, first), -1) * sin_p[:5], x)  # exactly unrotated
    assert not math.isclose(float(sin_p[5:].abs().sum()), 0.0)


# --- the official-style baseline ---------------------------------------------------------------------------
def test_official_style_onnx_is_the_plain_dynamic_trace(tmp_path):
    import onnx

    from deimv2_deploy.exporters.onnx_export import export_official_style_onnx
    from deimv2_deploy.exporters.parity import match_detections, parity_batch, reference_outputs
    from deimv2_deploy.models.graph import DeployGraph
    from deimv2_deploy.models.reference import load_reference
    from deimv2_deploy.runtimes import load_runtime

    path = export_official_style_onnx("atto", random_weights=True, output_dir=tmp_path)
    assert path.name == "deimv2_atto_random_fp32_official.onnx" and path.parent == tmp_path
    model = onnx.load(str(path))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # dynamic batch
    assert not model.metadata_props  # as the official exporter writes it: no spec
    assert any(n.op_type == "Shape" for n in model.graph.node)  # not simplified: shape arithmetic left in
    with pytest.raises(ValueError, match="variant"):
        load_runtime(path)  # no metadata: the size must be named, as for an official file
    runtime = load_runtime(path, variant="atto", threads=1)
    model, _, _ = load_reference("atto", random_weights=True)
    batch = parity_batch(runtime.spec, count=2)
    report = match_detections(runtime.infer(batch.as_inputs()), reference_outputs(DeployGraph(model), batch))
    assert report["ok"], report  # the same model: the baseline differs from ours in speed only


# --- OpenVINO: dynamic-batch graphs run single images on a batch-1 compilation ---------------------------------
def test_openvino_compiles_single_images_with_a_fixed_batch(tmp_path):
    pytest.importorskip("openvino", reason="openvino is not installed")
    from deimv2_deploy.exporters.onnx_export import export_official_style_onnx
    from deimv2_deploy.exporters.parity import match_detections, parity_batch
    from deimv2_deploy.runtimes.openvino_backend import OpenVinoRuntime

    path = export_official_style_onnx("atto", random_weights=True, output_dir=tmp_path)  # dynamic batch axis
    runtime = OpenVinoRuntime(path, variant="atto", threads=1)
    assert runtime.describe()["compiled_batches"] == [1]  # loading compiles the batch-1 graph only
    assert [d.get_length() for d in runtime.compiled.inputs[0].get_partial_shape()] == [1, 3, 320, 320]
    batch = parity_batch(runtime.spec, count=3)
    whole = runtime.infer(batch.as_inputs())  # a larger batch compiles the graph as exported, once
    assert runtime.describe()["compiled_batches"] == [1, "any"] and whole["boxes"].shape == (3, 300, 4)
    for i in range(3):
        one = runtime.infer({k: v[i:i + 1] for k, v in batch.as_inputs().items()})
        assert match_detections(one, {k: v[i:i + 1] for k, v in whole.items()}, box_tol=1e-3, score_tol=1e-5)["ok"]
    runtime.submit({k: v[:1] for k, v in batch.as_inputs().items()}, "one")
    runtime.submit(batch.as_inputs(), "three")  # each size goes to its own graph; order is kept
    done = runtime.results(wait=True)
    assert [u for u, _ in done] == ["one", "three"] and done[1][1]["scores"].shape == (3, 300)
    assert runtime.describe()["compiled_batches"] == [1, "any"]
    runtime.close()
