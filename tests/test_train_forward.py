"""The training-mode forward against what the official model computed for the criterion golden cases.

The cases (../shared/golden/criterion) store the official training outputs of fill.py weights on the golden input
with `torch.manual_seed(seed)` before the forward: with the same seed our denoising queries draw the same noise, so
every output, denoising included, can be compared.
"""
from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from golden import golden_dir, load_golden_module

from deimv2_deploy.models import build_model
from deimv2_deploy.models.denoising import denoising_attention_mask, make_denoising_groups


def _load_case(stem: str):
    folder = golden_dir() / "criterion"
    if not (folder / f"{stem}.npz").exists():
        pytest.skip(f"criterion golden case {folder / stem}.npz not found (set DEIMV2_GOLDEN)")
    name = "deimv2_golden_load_case"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "load_case.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].load_case(str(folder / stem))


def _flatten(node, prefix=""):
    if isinstance(node, torch.Tensor):
        yield prefix, node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _flatten(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _flatten(v, f"{prefix}/{i}" if prefix else str(i))


def _train_forward(size: str, stem: str):
    outputs, targets, _, _, meta = _load_case(stem)
    fill = load_golden_module("fill")
    model = build_model(size)
    model.load_state_dict(fill.fill_state_dict(model.state_dict()))
    model.train()
    h, w = meta["case"]["image_size_hw"]
    images = fill.golden_input(h, w, batch=meta["case"]["batch"])
    torch.manual_seed(meta["case"]["seed"])
    return model(images, targets=targets), outputs, targets


def test_atto_training_outputs_equal_the_official():
    ours, golden, _ = _train_forward("atto", "atto_seed0")
    mine, theirs = dict(_flatten(ours)), dict(_flatten(golden))
    assert set(mine) == set(theirs)  # the official structure, key for key
    assert ours["dn_meta"]["dn_num_split"] == golden["dn_meta"]["dn_num_split"]
    assert ours["dn_meta"]["dn_num_group"] == golden["dn_meta"]["dn_num_group"]
    for key, value in theirs.items():
        got = mine[key].detach()
        assert got.shape == value.shape, key
        if value.dtype.is_floating_point:
            scale = 1.0 + value.abs().max().item()
            assert (got - value).abs().max().item() <= 5e-5 * scale, key  # float rounding, 1e-4 at most
        else:
            assert torch.equal(got, value), key


def test_n_training_outputs_equal_the_official_up_to_query_order():
    """n adds the gateway, two 6-point levels and the AIFI encoder. Its top-300 selection has near-ties whose
    order float rounding may swap, so matching queries are compared order-free; denoising queries by index."""
    ours, golden, _ = _train_forward("n", "n_seed2")
    compare = load_golden_module("compare")
    for b in range(golden["pred_logits"].shape[0]):
        report = compare.compare_queries(
            ours["pred_logits"][b].detach().numpy(), ours["pred_boxes"][b].detach().numpy(),
            golden["pred_logits"][b].numpy(), golden["pred_boxes"][b].numpy(), tol=1e-3,
        )
        assert report.ok, report
    for i, layer in enumerate(golden["dn_outputs"]):
        for key in ("pred_logits", "pred_boxes", "pred_corners", "ref_points"):
            got, want = ours["dn_outputs"][i][key].detach(), layer[key]
            assert (got - want).abs().max().item() <= 2e-5 * (1.0 + want.abs().max().item()), (i, key)


def test_training_forward_backpropagates_and_runs_without_targets():
    torch.manual_seed(0)
    model = build_model("atto", num_classes=3).train()
    images = torch.rand(2, 3, 320, 320)
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    out = model(images, targets=targets)
    assert out["pred_logits"].shape == (2, 100, 3)
    assert out["dn_outputs"][0]["pred_logits"].shape[1] == out["dn_meta"]["dn_num_split"][0]
    loss = sum(o["pred_boxes"].sum() + o["pred_logits"].sum() for o in [out, *out["aux_outputs"], *out["dn_outputs"]])
    loss.backward()
    backbone_grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in backbone_grads)
    assert model.decoder.denoising_class_embed.weight.grad.abs().sum() > 0
    # the decoder starts from detached proposals: the proposal score head learns only from its own outputs
    assert model.decoder.enc_score_head.weight.grad is None

    # no objects in the batch (or no targets at all): no denoising queries
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    for t in (empty, None):
        out = model(images, targets=t)
        assert "dn_outputs" not in out and len(out["aux_outputs"]) == 2


def test_training_uses_anchors_of_the_batch_size_and_deployed_models_refuse():
    model = build_model("atto").train()
    out = model(torch.rand(1, 3, 256, 384), targets=None)  # a multi-scale size other than the eval size
    assert out["pred_boxes"].shape == (1, 100, 4)
    deployed = build_model("atto").deploy()
    deployed.train()
    with pytest.raises(RuntimeError, match="deployed"):
        deployed(torch.rand(1, 3, 320, 320), targets=None)


def test_denoising_groups_are_blind_to_each_other():
    mask = denoising_attention_mask(group_size=4, num_groups=3, num_queries=5)
    assert mask.shape == (17, 17)
    assert not mask[:4, :4].any() and mask[:4, 4:12].all()  # group 0 sees itself only (among the groups)
    assert mask[12:, :12].all() and not mask[12:, 12:].any()  # matching queries see no group
    assert not mask[:12, 12:].any()  # groups see the matching queries

    torch.manual_seed(0)
    embed = torch.nn.Embedding(4, 8, padding_idx=3)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
               {"labels": torch.tensor([0, 2, 1]), "boxes": torch.rand(3, 4) * 0.5 + 0.25}]
    dn = make_denoising_groups(targets, num_classes=3, num_queries=10, class_embed=embed, num_denoising=10)
    assert dn.meta["dn_num_group"] == 3 and dn.meta["dn_num_split"] == [18, 10]
    assert [len(i) for i in dn.meta["dn_positive_idx"]] == [3, 9]
    boxes = torch.sigmoid(dn.ref_logits)
    # positives stay within half a box size of the truth; negatives are pushed further out
    truth = targets[1]["boxes"]
    pos = boxes[1, dn.meta["dn_positive_idx"][1]].view(3, 3, 4)
    assert ((pos[..., :2] - truth[None, :, :2]).abs() <= truth[None, :, 2:] * 0.5 + 1e-5).all()
