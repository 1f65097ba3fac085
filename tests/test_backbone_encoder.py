"""HGNetv2 backbone, LiteEncoder and HybridEncoder: official state-dict layout, golden parity, deploy fusion."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from golden import golden_file, load_golden_module, load_manifest
from torch import nn

from deimv2_deploy.models.common import FusableConvNorm, RepConv3x3, get_activation
from deimv2_deploy.models.hgnetv2 import HGNetv2
from deimv2_deploy.models.hybrid_encoder import HybridEncoder, TransformerEncoderLayer, sincos_position_embedding_2d
from deimv2_deploy.models.lite_encoder import LiteEncoder

VARIANTS = ("atto", "femto", "pico", "n", "s", "m", "l", "x")

# Constructor arguments per variant, from the official YAML configs (configs/deimv2/*.yml over base/deimv2.yml).
BACKBONES = {
    "atto": lambda: HGNetv2("Atto", return_idx=[2], use_lab=True),
    "femto": lambda: HGNetv2("Femto", return_idx=[2], use_lab=True),
    "pico": lambda: HGNetv2("Pico", return_idx=[2], use_lab=True),
    "n": lambda: HGNetv2("B0", return_idx=[2, 3], use_lab=True),
}
ENCODERS = {
    "atto": lambda: LiteEncoder([256], [16], hidden_dim=64, expansion=0.34, depth_mult=0.5, act="silu"),
    "femto": lambda: LiteEncoder([512], [16], hidden_dim=96, expansion=0.34, depth_mult=0.5, act="silu"),
    "pico": lambda: LiteEncoder([512], [16], hidden_dim=112, expansion=0.34, depth_mult=0.5, act="silu"),
    "n": lambda: HybridEncoder(
        [512, 1024], [16, 32], hidden_dim=128, use_encoder_idx=[1], dim_feedforward=512,
        expansion=0.34, depth_mult=0.5, version="dfine",
    ),
    "s": lambda: HybridEncoder(
        [192] * 3, [8, 16, 32], hidden_dim=192, dim_feedforward=512, expansion=0.34, depth_mult=0.67
    ),
    "m": lambda: HybridEncoder(
        [256] * 3, [8, 16, 32], hidden_dim=256, dim_feedforward=512, expansion=0.67, depth_mult=1.0
    ),
    "l": lambda: HybridEncoder([224] * 3, [8, 16, 32], hidden_dim=224, dim_feedforward=896),
    "x": lambda: HybridEncoder(
        [256] * 3, [8, 16, 32], hidden_dim=256, dim_feedforward=1024, expansion=1.25, depth_mult=1.37
    ),
}


@pytest.fixture(autouse=True)
def _few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


def _fill_module():
    return load_golden_module("fill")


def _manifest(variant: str) -> dict:
    return load_manifest(variant)


class _Parts(nn.Module):
    """Holds the parts under the official attribute names so state-dict keys carry their prefixes."""

    def __init__(self, backbone: nn.Module | None, encoder: nn.Module) -> None:
        super().__init__()
        if backbone is not None:
            self.backbone = backbone
        self.encoder = encoder


def _build(variant: str) -> _Parts:
    backbone = BACKBONES[variant]() if variant in BACKBONES else None
    return _Parts(backbone, ENCODERS[variant]())


def _prefixes(variant: str) -> tuple[str, ...]:
    return ("backbone.", "encoder.") if variant in BACKBONES else ("encoder.",)


def _fuse(module: nn.Module) -> None:
    for m in list(module.modules()):
        if hasattr(m, "fuse_for_deploy"):
            m.fuse_for_deploy()


def _filled(variant: str) -> _Parts:
    parts = _build(variant)
    parts.load_state_dict(_fill_module().fill_state_dict(parts.state_dict()), strict=True)
    return parts.eval()


# ------------------------------------------------------------------------------ state-dict layout


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_matches_manifest(variant):
    manifest = _manifest(variant)
    prefixes = _prefixes(variant)
    parts = _build(variant)
    expected = [
        (e["name"], tuple(e["shape"]), e["dtype"]) for e in manifest["state_dict"] if e["name"].startswith(prefixes)
    ]
    ours = [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in parts.state_dict().items()]
    assert sorted(ours) == sorted(expected)

    parts.eval()
    _fuse(parts)
    expected_deploy = sorted((n, tuple(s)) for n, s in manifest["deploy_state_dict"] if n.startswith(prefixes))
    ours_deploy = sorted((k, tuple(v.shape)) for k, v in parts.state_dict().items())
    assert ours_deploy == expected_deploy


@pytest.mark.parametrize("variant", ["atto", "femto", "pico", "n"])
def test_backbone_is_untouched_by_deploy(variant):
    backbone = BACKBONES[variant]()
    assert not any(hasattr(m, "fuse_for_deploy") for m in backbone.modules())


def test_channel_and_stride_attributes():
    b0 = HGNetv2("B0", return_idx=[1, 2, 3])
    assert b0.out_channels == [256, 512, 1024] and b0.out_strides == [8, 16, 32]
    atto = ENCODERS["atto"]()
    assert atto.out_channels == [64, 64] and atto.out_strides == [16, 32]
    n = ENCODERS["n"]()
    assert n.out_channels == [128, 128] and n.out_strides == [16, 32]


# ---------------------------------------------------------------------------------- golden parity


def _check_samples(golden, name: str, outputs: list[torch.Tensor]) -> None:
    assert len(outputs) == int(golden[f"num_{name}_outputs"])
    for i, out in enumerate(outputs):
        arr = out.detach().double().numpy()
        assert arr.shape == tuple(golden[f"{name}_{i}_shape"])
        values = arr.reshape(-1)[golden[f"{name}_{i}_idx"]]
        ref = golden[f"{name}_{i}_values"]
        np.testing.assert_allclose(values, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=f"{name}_{i}")
        assert arr.mean() == pytest.approx(float(golden[f"{name}_{i}_mean"]), abs=1e-5)
        assert arr.std() == pytest.approx(float(golden[f"{name}_{i}_std"]), rel=1e-4)


@pytest.mark.parametrize("variant", ["atto", "pico"])
def test_golden_backbone_and_encoder(variant):
    golden = np.load(golden_file(f"{variant}.golden.npz"))
    size = _manifest(variant)["eval_size"]
    parts = _filled(variant)
    images = _fill_module().golden_input(size[0], size[1])
    with torch.no_grad():
        feats = parts.backbone(images)
        enc = parts.encoder(feats)
    _check_samples(golden, "backbone", feats)
    _check_samples(golden, "encoder", enc)

    _fuse(parts)  # deploy-mode numbers of the encoder stay those of train-format eval
    with torch.no_grad():
        fused = parts.encoder(feats)
    for a, b in zip(enc, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    _check_samples(golden, "encoder", fused)


# ------------------------------------------------------------------------------- HybridEncoder math


def test_position_embedding_rows_then_columns():
    h, w, d = 3, 5, 16
    pos = sincos_position_embedding_2d(h, w, d)[0]  # (HW, D)
    assert pos.shape == (h * w, d)
    freqs = 1.0 / 10000.0 ** (torch.arange(d // 4, dtype=torch.float32) / (d // 4))
    for y, x in [(0, 0), (2, 1), (1, 4)]:
        token = pos[y * w + x]
        expected = torch.cat([(y * freqs).sin(), (y * freqs).cos(), (x * freqs).sin(), (x * freqs).cos()])
        torch.testing.assert_close(token, expected)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding_2d(2, 2, 6)


def test_position_embedding_equals_official_on_square_maps():
    # The official builds the grid with meshgrid(arange(W), arange(H), indexing="ij") and flattens it;
    # on square maps that is row-major with the first half on the row index.
    side, d = 7, 32
    grid = torch.arange(side, dtype=torch.float32)
    gi, gj = torch.meshgrid(grid, grid, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float32) / (d // 4))
    a, b = gi.flatten()[:, None] * omega, gj.flatten()[:, None] * omega
    official = torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1)[None]
    assert torch.equal(sincos_position_embedding_2d(side, side, d), official)


def test_transformer_layer_against_plain_math():
    torch.manual_seed(0)
    dim, heads, ff = 32, 8, 64
    layer = TransformerEncoderLayer(dim, heads, ff, dropout=0.0, activation="gelu").eval()
    for p in layer.parameters():
        nn.init.normal_(p, std=0.2)
    x, pos = torch.randn(2, 12, dim), torch.randn(1, 12, dim)
    with torch.no_grad():
        got = layer(x, pos)
        wq, wk, wv = layer.self_attn.in_proj_weight.chunk(3)
        bq, bk, bv = layer.self_attn.in_proj_bias.chunk(3)
        split = lambda t: t.reshape(2, 12, heads, dim // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split((x + pos) @ wq.T + bq), split((x + pos) @ wk.T + bk), split(x @ wv.T + bv)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1) @ v
        attn = layer.self_attn.out_proj(attn.transpose(1, 2).reshape(2, 12, dim))
        y = nn.functional.layer_norm(x + attn, (dim,), layer.norm1.weight, layer.norm1.bias)
        ffn = layer.linear2(nn.functional.gelu(layer.linear1(y)))
        expected = nn.functional.layer_norm(y + ffn, (dim,), layer.norm2.weight, layer.norm2.bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["n", "s"])
def test_hybrid_encoder_fusion_preserves_output(variant):
    parts = _filled(variant)
    enc = parts.encoder
    torch.manual_seed(0)
    if variant == "n":
        feats = [torch.randn(1, 512, 8, 6), torch.randn(1, 1024, 4, 3)]
    else:
        feats = [torch.randn(1, 192, 16, 12), torch.randn(1, 192, 8, 6), torch.randn(1, 192, 4, 3)]
    with torch.no_grad():
        before = enc(feats)
        _fuse(enc)
        after = enc(feats)
    assert [tuple(o.shape) for o in after] == [(1, enc.hidden_dim, *f.shape[2:]) for f in feats]
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


# -------------------------------------------------------------------------------- other input sizes


@pytest.mark.parametrize(("variant", "height", "width"), [("n", 640, 480), ("atto", 320, 256), ("femto", 416, 416)])
def test_hgnet_variants_run_at_other_sizes(variant, height, width):
    parts = _build(variant).eval()
    with torch.no_grad():
        feats = parts.backbone(torch.rand(1, 3, height, width))
        outs = parts.encoder(feats)
    assert [tuple(f.shape[2:]) for f in feats] == [(height // s, width // s) for s in parts.backbone.out_strides]
    expected = [(1, parts.encoder.hidden_dim, height // s, width // s) for s in parts.encoder.out_strides]
    assert [tuple(o.shape) for o in outs] == expected
    assert all(torch.isfinite(o).all() for o in outs)


def test_deim_form_runs_on_non_square_maps():
    enc = ENCODERS["s"]().eval()
    feats = [torch.randn(2, 192, 80, 60), torch.randn(2, 192, 40, 30), torch.randn(2, 192, 20, 15)]
    with torch.no_grad():
        outs = enc(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 192, 80, 60), (2, 192, 40, 30), (2, 192, 20, 15)]


# --------------------------------------------------------------------------------------- small parts


def test_rep_blocks_fuse_to_official_names_and_keep_numbers():
    torch.manual_seed(0)
    conv_norm, rep = FusableConvNorm(6, 8, 3, stride=2, groups=2, act="silu"), RepConv3x3(6, 6, act="silu")
    for block in (conv_norm, rep):
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.normal_(m.bias)
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
        block.eval()
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        ref_cn, ref_rep = conv_norm(x), rep(x)
        conv_norm.fuse_for_deploy()
        rep.fuse_for_deploy()
        rep.fuse_for_deploy()  # a second call is a no-op
        torch.testing.assert_close(conv_norm(x), ref_cn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rep(x), ref_rep, rtol=1e-5, atol=1e-5)
    assert sorted(conv_norm.state_dict()) == ["conv_bn_fused.bias", "conv_bn_fused.weight"]
    assert sorted(rep.state_dict()) == ["conv.bias", "conv.weight"]


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="'B9'"):
        HGNetv2("B9", return_idx=[2])
    with pytest.raises(ValueError, match=r"return_idx \[3\]"):
        HGNetv2("Atto", return_idx=[3])
    with pytest.raises(ValueError, match="one input level"):
        LiteEncoder([256, 512], [16, 32], hidden_dim=64)
    with pytest.raises(ValueError, match="'rt-detr'"):
        HybridEncoder([64, 64], [16, 32], hidden_dim=64, version="rt-detr")
    with pytest.raises(ValueError, match="'mish'"):
        get_activation("mish")
