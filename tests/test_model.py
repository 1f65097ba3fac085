"""Whole-model checks for all eight sizes: official state-dict layout, golden parity, deploy mode,
other input sizes; plus the decoder's fixed functions, the postprocessor and the variant zoo."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from golden import golden_dir, load_golden_module, load_manifest

from deimv2_deploy import variants as variant_facts
from deimv2_deploy.models import VARIANT_NAMES, VARIANTS, PostProcessor, build_model, get_variant, postprocess
from deimv2_deploy.models.decoder import bin_weights, make_anchors

HGNET_FAMILY = ("atto", "femto", "pico", "n")
ALL_SIZES = HGNET_FAMILY + ("s", "m", "l", "x")
ORIG_SIZES = torch.tensor([[640, 480]])  # (width, height), as the golden postprocessed outputs use


# ------------------------------------------------------------------------------------------ golden files


def _golden_module(name: str):
    return load_golden_module(name)


def _manifest(variant: str) -> dict:
    return load_manifest(variant)


def _filled_model(variant: str) -> torch.nn.Module:
    """Train-format model holding the golden cases' deterministic weights, in eval mode."""
    model = build_model(variant)
    model.load_state_dict(_golden_module("fill").fill_state_dict(model.state_dict()), strict=True)
    return model.eval()


def _unique_param_count(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():  # parameters() lists a shared tensor once; dedupe storage to be sure
        key = (p.data_ptr(), p.numel())
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


# ------------------------------------------------------------------------------------ state-dict layout


@pytest.mark.parametrize("variant", ALL_SIZES)
def test_state_dict_equals_manifest(variant):
    manifest = _manifest(variant)
    model = build_model(variant)
    state = model.state_dict()
    expected = [e["name"] for e in manifest["state_dict"]]
    assert list(state) == expected  # same keys in the official order
    for entry in manifest["state_dict"]:
        t = state[entry["name"]]
        assert list(t.shape) == entry["shape"], entry["name"]
        assert str(t.dtype).removeprefix("torch.") == entry["dtype"], entry["name"]
    assert _unique_param_count(model) == manifest["param_count"]


@pytest.mark.parametrize("variant", ALL_SIZES)
def test_constructor_constants_equal_manifest(variant):
    """Entries that are the same for every seed (BN statistics, num_points_scale, up, zeroed heads) and the anchors."""
    manifest = _manifest(variant)
    model = build_model(variant)
    state = model.state_dict()
    checked = 0
    for entry in manifest["state_dict"]:
        if "values" in entry:
            ours = state[entry["name"]].double().flatten()
            ref = torch.tensor(entry["values"], dtype=torch.float64).flatten()
            assert torch.allclose(ours, ref, atol=1e-6), entry["name"]
            checked += 1
    assert checked > 10
    dec = model.decoder
    assert dec.reg_scale.dtype == torch.int64 and int(dec.reg_scale) == 4
    assert dec.up is dec.decoder.up and dec.reg_scale is dec.decoder.reg_scale  # one tensor, two names
    assert list(dec.anchors.shape) == manifest["anchors"]["shape"]
    assert int((~dec.valid_mask).sum()) == manifest["anchors"].get("num_invalid_tokens", 0)
    assert torch.equal(torch.isinf(dec.anchors).any(-1, keepdim=True), ~dec.valid_mask)


def test_shared_bbox_head_is_one_module():
    dec = build_model("atto").decoder
    assert dec.dec_bbox_head[0] is dec.dec_bbox_head[1] is dec.dec_bbox_head[2]
    n = build_model("n").decoder
    assert n.dec_bbox_head[0] is not n.dec_bbox_head[1]
    assert hasattr(n.decoder.layers[0], "gateway") and not hasattr(dec.decoder.layers[0], "gateway")


# ------------------------------------------------------------------------------------ golden parity + deploy


@pytest.mark.parametrize("variant", ALL_SIZES)
def test_golden_parity_and_deploy(variant):
    manifest = _manifest(variant)
    compare = _golden_module("compare")
    fill = _golden_module("fill")
    model = _filled_model(variant)
    h, w = manifest["eval_size"]
    images = fill.golden_input(h, w)
    with torch.no_grad():
        before = model(images)
        assert model.deploy() is model
        after = model(images)
    assert not model.training
    assert [[k, list(t.shape)] for k, t in model.state_dict().items()] == manifest["deploy_state_dict"]
    # the README's parameter counts are deploy-mode counts (0.5M ... 50.3M)
    assert round(_unique_param_count(model) / 1e6, 1) == get_variant(variant).published_params_m

    # deploy mode computes what the train-format model computes (rows matched, not indexed)
    same = compare.compare_queries(after["pred_logits"][0].numpy(), after["pred_boxes"][0].numpy(),
                                   before["pred_logits"][0].numpy(), before["pred_boxes"][0].numpy())
    assert same.ok, same
    assert same.max_error < 1e-4

    golden_path = golden_dir() / f"{variant}.golden.npz"
    if not golden_path.exists():
        pytest.skip(f"golden outputs {golden_path.name} not provided for {variant} (layout and deploy checked)")
    golden = np.load(golden_path)
    queries = compare.compare_queries(after["pred_logits"][0].numpy(), after["pred_boxes"][0].numpy(),
                                      golden["pred_logits"], golden["pred_boxes"], tol=1e-4)
    assert queries.ok, queries
    labels, boxes, scores = postprocess(after, ORIG_SIZES)
    detections = compare.compare_detections(labels[0].numpy(), boxes[0].numpy(), scores[0].numpy(),
                                            golden["labels"], golden["boxes"], golden["scores"])
    assert detections.ok, detections


def test_deploy_is_idempotent():
    model = _filled_model("atto").deploy()
    images = _golden_module("fill").golden_input(320, 320)
    keys = list(model.state_dict())
    with torch.no_grad():
        first = model(images)
        model.deploy()
        second = model(images)
    assert list(model.state_dict()) == keys
    assert torch.equal(first["pred_logits"], second["pred_logits"])
    assert torch.equal(first["pred_boxes"], second["pred_boxes"])


# ------------------------------------------------------------------------------ other input sizes, batches


def test_batch_of_two_non_square():
    h, w = 256, 320
    model = _filled_model("atto").deploy()
    images = _golden_module("fill").golden_input(h, w, batch=2)
    with torch.no_grad():
        out = model(images)
        single = model(images[1:])
    assert out["pred_logits"].shape == (2, 100, 80)
    assert out["pred_boxes"].shape == (2, 100, 4)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
    assert (out["pred_boxes"] >= 0).all() and (out["pred_boxes"][..., 2:] > 0).all()
    # an image's result does not depend on its batch neighbours
    torch.testing.assert_close(out["pred_logits"][1], single["pred_logits"][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out["pred_boxes"][1], single["pred_boxes"][0], atol=1e-4, rtol=0)
    labels, boxes, scores = postprocess(out, torch.tensor([[w, h], [w, h]]))
    assert labels.shape == (2, 300) and boxes.shape == (2, 300, 4) and scores.shape == (2, 300)
    assert labels.dtype == torch.int64
    assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()


def test_vit_size_batch_of_two_at_640x480():
    """s: the ViT grid, RoPE-free position embeddings, STA and anchors all follow a 40x30 patch grid."""
    model = _filled_model("s").deploy()
    images = _golden_module("fill").golden_input(480, 640, batch=2)
    with torch.no_grad():
        out = model(images)
        single = model(images[:1])
    assert out["pred_logits"].shape == (2, 300, 80) and out["pred_boxes"].shape == (2, 300, 4)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()
    torch.testing.assert_close(out["pred_logits"][0], single["pred_logits"][0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["pico", "n"])
def test_landscape_input(variant):
    """640 wide, 480 high: anchors and (for n) position embeddings are built for the 30x40 / 15x20 maps."""
    model = _filled_model(variant).deploy()
    with torch.no_grad():
        out = model(_golden_module("fill").golden_input(480, 640))
    q = get_variant(variant).num_queries
    assert out["pred_logits"].shape == (1, q, 80) and out["pred_boxes"].shape == (1, q, 4)
    assert torch.isfinite(out["pred_logits"]).all() and torch.isfinite(out["pred_boxes"]).all()


def test_anchors_built_for_the_actual_maps():
    dec = build_model("pico").decoder
    anchors, valid = dec._anchors_for([(40, 40), (20, 20)], torch.device("cpu"))
    assert anchors is dec.anchors and valid is dec.valid_mask  # eval size: the (loadable) buffer
    anchors, valid = dec._anchors_for([(30, 40), (15, 20)], torch.device("cpu"))
    assert anchors.shape == (1, 30 * 40 + 15 * 20, 4) and valid.all()
    centres = torch.sigmoid(anchors[0, :2, :2])  # first two cells of level 0: x steps by 1/40, y fixed
    torch.testing.assert_close(centres, torch.tensor([[0.5 / 40, 0.5 / 30], [1.5 / 40, 0.5 / 30]]))
    # the generator reproduces the constructor's buffer exactly
    rebuilt, rebuilt_valid = make_anchors([(40, 40), (20, 20)])
    assert torch.equal(rebuilt, dec.anchors) and torch.equal(rebuilt_valid, dec.valid_mask)
    # stride-8 maps at 640: the outermost ring of the 80x80 grid is invalid (316 tokens)
    _, valid8 = make_anchors([(80, 80), (40, 40), (20, 20)])
    assert int((~valid8).sum()) == 316


def test_too_small_input_is_refused():
    model = build_model("atto").eval()
    with pytest.raises(ValueError, match="fewer than the 100 queries"), torch.no_grad():
        model(torch.rand(1, 3, 64, 64))


def test_bin_weights():
    up, reg_scale = torch.tensor([0.5]), torch.tensor([4])
    table = bin_weights(up, reg_scale, 32, exact=True)
    live = bin_weights(up, reg_scale, 32)
    assert table.shape == (33,) and table.dtype == torch.float32
    assert table[0] == -4 and table[-1] == 4 and table[16] == 0 and table[15] < 0 < table[17]
    assert torch.equal(table, -table.flip(0))
    assert (table.diff() > 0).all()
    assert (table[17:32].diff() > 0).all() and (table[18:32] / table[17:31]).min() > 1  # geometric growth
    torch.testing.assert_close(table[31], torch.tensor(2.0))  # inner bins reach up * reg_scale
    torch.testing.assert_close(live, table, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------ postprocess


def test_postprocess_matches_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 5, generator=g)
    boxes = torch.rand(2, 7, 4, generator=g) * 0.5 + 0.25
    sizes = torch.tensor([[640, 480], [100, 200]])
    labels, out_boxes, scores = postprocess({"pred_logits": logits, "pred_boxes": boxes}, sizes, top_k=10)
    assert labels.shape == (2, 10) and out_boxes.shape == (2, 10, 4) and scores.shape == (2, 10)
    for b in range(2):
        probs = torch.sigmoid(logits[b])
        pairs = sorted(((probs[q, c].item(), q, c) for q in range(7) for c in range(5)), reverse=True)
        for k, (score, q, c) in enumerate(pairs[:10]):
            assert labels[b, k].item() == c
            assert scores[b, k].item() == pytest.approx(score, abs=1e-7)
            cx, cy, w, h = boxes[b, q].tolist()
            sw, sh = sizes[b].tolist()
            expected = [(cx - w / 2) * sw, (cy - h / 2) * sh, (cx + w / 2) * sw, (cy + h / 2) * sh]
            assert out_boxes[b, k].tolist() == pytest.approx(expected, abs=1e-3)
    module_out = PostProcessor(top_k=10)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    for a, b in zip(module_out, (labels, out_boxes, scores), strict=True):
        assert torch.equal(a, b)


def test_postprocess_top_k_is_capped_by_the_candidates():
    outputs = {"pred_logits": torch.zeros(1, 4, 2), "pred_boxes": torch.full((1, 4, 4), 0.5)}
    labels, boxes, scores = postprocess(outputs, torch.tensor([[10, 10]]), top_k=300)
    assert labels.shape == (1, 8) and boxes.shape == (1, 8, 4)
    assert sorted(labels[0].tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="top_k"):
        PostProcessor(top_k=0)


# ------------------------------------------------------------------------------------------------- zoo


def test_zoo_lists_all_sizes_and_agrees_with_the_runtime_facts():
    assert VARIANT_NAMES == ("atto", "femto", "pico", "n", "s", "m", "l", "x")
    assert tuple(VARIANTS) == VARIANT_NAMES == variant_facts.VARIANT_NAMES
    for name, cfg in VARIANTS.items():
        info = variant_facts.get_variant_info(name)
        assert (cfg.input_size, cfg.mean, cfg.std, cfg.num_queries) == (info.input_size, info.mean, info.std,
                                                                           info.num_queries)
        assert cfg.checkpoint_name == f"deimv2_{'hgnetv2' if name in HGNET_FAMILY else 'dinov3'}_{name}_coco.pth"
        assert cfg.decoder.feat_channels == (cfg.decoder.hidden_dim,) * len(cfg.decoder.feat_strides)
        assert cfg.encoder.feat_strides[0] == cfg.decoder.feat_strides[0]
        assert cfg.published_ap > 20 and cfg.published_params_m > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        VARIANTS["atto"].num_queries = 1  # type: ignore[misc]


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_zoo_matches_manifest_facts(variant):
    manifest = _manifest(variant)
    cfg = get_variant(variant)
    assert list(cfg.input_size) == manifest["eval_size"]
    assert cfg.num_queries == manifest["num_queries"]
    assert cfg.normalize == manifest["normalize"]
    assert manifest["config"] == cfg.checkpoint_name.replace(".pth", ".yml")
    decoder_keys = {e["name"] for e in manifest["state_dict"]}
    layers = {k.split(".")[3] for k in decoder_keys if k.startswith("decoder.decoder.layers.")}
    assert len(layers) == cfg.decoder.num_layers
    assert any(".gateway." in k for k in decoder_keys) == cfg.decoder.use_gateway


def test_get_variant_and_build_model_errors():
    assert get_variant(" Pico ").name == "pico"
    with pytest.raises(ValueError, match="atto, femto, pico, n, s, m, l, x"):
        get_variant("tiny")
    with pytest.raises(ValueError, match="atto"):
        build_model("b4")
    with pytest.raises(ValueError, match="num_classes"):
        build_model("atto", num_classes=0)


def test_custom_class_count():
    model = build_model("atto", num_classes=3).eval()
    assert model.decoder.enc_score_head.out_features == 3
    assert model.decoder.denoising_class_embed.weight.shape == (4, 64)
    with torch.no_grad():
        out = model.deploy()(torch.rand(1, 3, 320, 320))
    assert out["pred_logits"].shape == (1, 100, 3)
    labels, _, _ = postprocess(out, ORIG_SIZES)
    assert labels.shape == (1, 300) and int(labels.max()) <= 2
