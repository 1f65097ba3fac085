"""ViT + STA backbones of DEIMv2 s, m, l, x: state-dict layout, golden parity, any-size inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from golden import golden_file, load_golden_module, load_manifest
from torch import nn

from deimv2_deploy.models.dinov3 import DINOv3ViT, MaskedKBiasLinear, RopeEmbedding
from deimv2_deploy.models.sta import ViTSTABackbone
from deimv2_deploy.models.zoo import VARIANTS


def build_vit_sta_backbone(variant: str) -> ViTSTABackbone:
    """The backbone of a ViT size, with its settings from the zoo (the one table of sizes)."""
    return ViTSTABackbone(VARIANTS[variant].backbone)

VIT_VARIANTS = ("s", "m", "l", "x")


def _import_golden_module(name: str):
    return load_golden_module(name)


class _Wrapper(nn.Module):
    """Gives the backbone's keys the `backbone.` prefix they have in the full model."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone


def _manifest_backbone(variant: str) -> list[dict]:
    manifest = load_manifest(variant)
    return [e for e in manifest["state_dict"] if e["name"].startswith("backbone.")]


@pytest.mark.parametrize("variant", VIT_VARIANTS)
def test_state_dict_matches_manifest(variant):
    entries = _manifest_backbone(variant)
    sd = _Wrapper(build_vit_sta_backbone(variant)).state_dict()
    assert list(sd) == [e["name"] for e in entries]
    for e in entries:
        t = sd[e["name"]]
        assert list(t.shape) == e["shape"], e["name"]
        assert str(t.dtype).removeprefix("torch.") == e["dtype"], e["name"]
        if e.get("values") is not None:
            expected = np.asarray(e["values"], dtype=np.float64).reshape(e["shape"])
            np.testing.assert_allclose(t.double().numpy(), expected, rtol=0, atol=0, err_msg=e["name"])
        if t.is_floating_point():
            assert torch.isfinite(t).all(), f"{e['name']} is not finite after construction"


def test_k_bias_mask_and_layer_layout():
    assert VARIANTS["l"].backbone.return_layers == (5, 8, 11) and VARIANTS["s"].backbone.return_layers == (3, 7, 11)
    vit = DINOv3ViT(embed_dim=64, num_heads=2, depth=2, return_layers=(0, 1))
    qkv = vit.blocks[0].attn.qkv
    assert isinstance(qkv, MaskedKBiasLinear)
    assert qkv.bias_mask.tolist() == [1.0] * 64 + [0.0] * 64 + [1.0] * 64
    # The key bias must have no effect on the projection output.
    with torch.no_grad():
        qkv.bias.normal_()
        x = torch.randn(3, 64)
        out = qkv(x)
        plain = nn.functional.linear(x, qkv.weight)
    torch.testing.assert_close(out[:, 64:128], plain[:, 64:128])
    assert not torch.allclose(out[:, :64], plain[:, :64])


def test_rope_tables_against_direct_formula():
    head_dim, h, w = 16, 3, 5
    rope = RopeEmbedding(head_dim)
    sin, cos = rope(h, w)
    assert sin.shape == (h * w, head_dim)
    periods = 100.0 ** (torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 4))
    for r in range(h):
        for c in range(w):
            y, x = 2 * (r + 0.5) / h - 1, 2 * (c + 0.5) / w - 1  # patch centre in (-1, 1), row first
            half = torch.cat((2 * math.pi * y / periods, 2 * math.pi * x / periods))
            angles = torch.cat((half, half)).float()
            torch.testing.assert_close(sin[r * w + c], angles.sin(), atol=1e-6, rtol=0)
            torch.testing.assert_close(cos[r * w + c], angles.cos(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["s", "l"])
def test_golden_backbone_outputs(variant):
    """Filled weights, golden input -> the official per-stage samples.

    The golden samples were computed with `golden_input` as the model input itself (no ImageNet
    normalisation inside the model or before it): normalising first gives errors of ~5.
    """
    golden = np.load(golden_file(f"{variant}.golden.npz"))
    fill = _import_golden_module("fill")
    model = _Wrapper(build_vit_sta_backbone(variant))
    model.load_state_dict(fill.fill_state_dict(model.state_dict()), strict=True)
    model.eval()
    with torch.no_grad():
        outs = model.backbone(fill.golden_input(640, 640))
    assert len(outs) == int(golden["num_backbone_outputs"]) == 3
    for i, out in enumerate(outs):
        assert list(out.shape) == golden[f"backbone_{i}_shape"].tolist()
        ref = golden[f"backbone_{i}_values"]
        got = out.numpy().ravel()[golden[f"backbone_{i}_idx"]]
        scale = float(np.abs(ref).max())
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * scale, err_msg=f"stage {i}")
        values = out.double()
        assert values.mean().item() == pytest.approx(float(golden[f"backbone_{i}_mean"]), abs=1e-4 * scale)
        assert values.std(unbiased=False).item() == pytest.approx(float(golden[f"backbone_{i}_std"]), rel=1e-4)


def test_non_square_input_and_batch_vit_tiny():
    torch.manual_seed(0)
    backbone = build_vit_sta_backbone("s").eval()
    assert backbone.out_channels == (192, 192, 192) and backbone.out_strides == (8, 16, 32)
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 640, 480))
    assert [tuple(o.shape) for o in outs] == [(1, 192, 80, 60), (1, 192, 40, 30), (1, 192, 20, 15)]
    images = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        both = backbone(images)
        second = backbone(images[1:])
    for b, s in zip(both, second, strict=True):
        assert b.shape[0] == 2
        torch.testing.assert_close(b[1:], s, atol=1e-5, rtol=1e-5)  # samples do not mix


@pytest.mark.parametrize("variant", ["m", "x"])  # l runs in the golden test
def test_small_non_square_batch(variant):
    torch.manual_seed(0)
    backbone = build_vit_sta_backbone(variant).eval()
    hidden = VARIANTS[variant].backbone.hidden_dim
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, hidden, 8, 12), (2, hidden, 4, 6), (2, hidden, 2, 3)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_rejects_sides_not_multiple_of_32():
    backbone = ViTSTABackbone(VARIANTS["s"].backbone).eval()
    with pytest.raises(ValueError, match="multiples of 32"):
        backbone(torch.randn(1, 3, 64, 80))
