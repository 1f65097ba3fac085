"""The DEIM criterion: parity with the official one on the golden cases, and the properties training needs.

Golden cases: ../shared/golden/criterion/<stem>.npz + .json (every case found there, both loss sets: epoch 0
and the matcher change epoch); the stored matchings are compared too, so a wrong term points at its stage.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch
from golden import golden_dir

from deimv2_deploy.training import HungarianMatcher, build_criterion, get_recipe
from deimv2_deploy.training.criterion import edge_bin_targets, union_matching
from deimv2_deploy.training.fake_outputs import random_targets, random_training_outputs

RTOL, ATOL = 1e-5, 1e-6  # the golden README's tolerance per term


def _case_stems() -> list:
    folder = golden_dir() / "criterion"
    stems = sorted(p.stem for p in folder.glob("*.npz") if p.with_suffix(".json").exists()) if folder.is_dir() else []
    if not stems:
        reason = f"no criterion golden cases in {folder} (set DEIMV2_GOLDEN to the shared/golden folder)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason))]
    return stems


def _load_case(stem: str):
    module_name = "deimv2_golden_load_case"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, golden_dir() / "criterion" / "load_case.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name].load_case(str(golden_dir() / "criterion" / stem))


@pytest.fixture(scope="module", params=_case_stems())
def case(request):
    outputs, targets, losses, epochs, meta = _load_case(request.param)
    with np.load(golden_dir() / "criterion" / f"{request.param}.npz") as z:
        matches = {k: z[k] for k in z.files if k.startswith("match/")}
    return request.param, outputs, targets, losses, epochs, meta, matches


def _criterion_for(meta: dict):
    return build_criterion(meta["case"]["variant"], num_classes=meta["criterion"]["num_classes"])


def test_golden_config_matches_recipe(case):
    """The recipe table gives the case's criterion config (losses, uni set, weights, change epoch)."""
    _, _, _, _, epochs, meta, _ = case
    crit, cfg = _criterion_for(meta), meta["criterion"]
    assert list(crit.losses) == cfg["losses"]
    assert crit.use_uni_set == cfg["use_uni_set"]
    assert crit.weight_dict == {k: float(v) for k, v in cfg["weight_dict"].items()}
    assert crit.gamma == cfg["gamma"] and crit.reg_max == cfg["reg_max"] and crit.mal_alpha == cfg["mal_alpha"]
    m = cfg["matcher"]
    assert crit.matcher.matcher_change_epoch == m["matcher_change_epoch"]
    assert (crit.matcher.cost_class, crit.matcher.cost_bbox, crit.matcher.cost_giou) == (
        m["cost_class"], m["cost_bbox"], m["cost_giou"])
    assert (crit.matcher.alpha, crit.matcher.gamma, crit.matcher.iou_order_alpha) == (
        m["alpha"], m["gamma"], m["iou_order_alpha"])
    assert max(epochs.values()) == m["matcher_change_epoch"]


def test_golden_losses(case):
    stem, outputs, targets, losses, epochs, meta, _ = case
    crit = _criterion_for(meta)
    for name, epoch in epochs.items():
        mine = crit(outputs, targets, epoch=epoch)
        assert set(mine) == set(losses[name]), (stem, name, set(mine) ^ set(losses[name]))
        bad = {k: (float(mine[k]), v) for k, v in losses[name].items()
               if not abs(float(mine[k]) - v) <= ATOL + RTOL * abs(v)}
        assert not bad, f"{stem} {name} (epoch {epoch}): mine vs official {bad}"


def test_golden_matchings(case):
    """Debug aid: every stage's (query, target) pairs equal the official ones, in the same order."""
    stem, outputs, targets, _, epochs, meta, matches = case
    crit = _criterion_for(meta)
    for name, epoch in epochs.items():
        stages = crit.matchings(outputs, targets, epoch=epoch)
        stored = {k.split("/")[2] for k in matches if k.startswith(f"match/{name}/")}
        assert stored <= set(stages), (stem, name, stored - set(stages))
        for stage in sorted(stored):
            for b, (src, tgt) in enumerate(stages[stage]):
                want_src = matches[f"match/{name}/{stage}/{b}/src"]
                want_tgt = matches[f"match/{name}/{stage}/{b}/tgt"]
                mine = list(zip(src.tolist(), tgt.tolist(), strict=True))
                official = list(zip(want_src.tolist(), want_tgt.tolist(), strict=True))
                assert mine == official, f"{stem} {name} stage {stage} image {b}: {mine} vs official {official}"


# ------------------------------------------------------------------------------------------------- term names


def _expected_names(losses: tuple[str, ...], layers: int, dn: bool = True) -> set[str]:
    mal_boxes = ["loss_mal", "loss_bbox", "loss_giou"]
    local = "local" in losses
    names = set(mal_boxes + (["loss_fgl"] if local else []))
    for i in range(layers - 1):
        names |= {f"{k}_aux_{i}" for k in mal_boxes + (["loss_fgl", "loss_ddf"] if local else [])}
    names |= {f"{k}_pre" for k in mal_boxes} | {f"{k}_enc_0" for k in mal_boxes}
    if dn:
        for i in range(layers):
            extra = (["loss_fgl"] + (["loss_ddf"] if i < layers - 1 else [])) if local else []
            names |= {f"{k}_dn_{i}" for k in mal_boxes + extra}
        names |= {f"{k}_dn_pre" for k in mal_boxes}
    return names


@pytest.mark.parametrize("size,layers", [("atto", 3), ("n", 3), ("s", 4), ("x", 6)])
def test_term_names_per_size(size, layers):
    targets = random_targets([3, 0, 5], seed=1)
    out = random_training_outputs(targets, num_queries=60, num_layers=layers, seed=2)
    losses = build_criterion(size)(out, targets, epoch=0)
    assert set(losses) == _expected_names(get_recipe(size).losses, layers)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    if size == "atto":
        assert len(losses) == 27


# ------------------------------------------------------------------------------------------------- training use


def test_gradients_reach_predictions_not_teachers():
    targets = random_targets([4, 2], seed=3)
    out = random_training_outputs(targets, num_queries=50, num_layers=3, seed=4)
    # separate teacher leaves: the criterion must not send gradient into them
    for aux in out["aux_outputs"]:
        aux["teacher_corners"] = out["pred_corners"].detach().clone().requires_grad_(True)
        aux["teacher_logits"] = out["pred_logits"].detach().clone().requires_grad_(True)
    losses = build_criterion("n")(out, targets, epoch=0)
    sum(losses.values()).backward()
    stages = [out, *out["aux_outputs"], out["pre_outputs"], *out["enc_aux_outputs"], *out["dn_outputs"],
              out["dn_pre_outputs"]]
    for i, stage in enumerate(stages):
        for key in ("pred_logits", "pred_boxes", "pred_corners"):
            if key in stage:
                grad = stage[key].grad
                assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (i, key)
    for aux in out["aux_outputs"]:
        assert aux["teacher_corners"].grad is None and aux["teacher_logits"].grad is None
    assert not out["ref_points"].requires_grad


def test_ddf_sends_gradient_to_student_only():
    """Only DDF touches an aux layer's unmatched queries' corners: they get gradient, the teacher none."""
    targets = random_targets([2], seed=5)
    out = random_training_outputs(targets, num_queries=30, num_layers=3, seed=6)
    losses = build_criterion("n")(out, targets, epoch=0)
    losses["loss_ddf_aux_0"].backward()
    assert out["aux_outputs"][0]["pred_corners"].grad.abs().sum() > 0
    assert out["pred_corners"].grad is None  # the teacher of aux_0


def test_empty_images_and_empty_batch():
    crit = build_criterion("n")
    targets = random_targets([0, 3, 0], seed=7)
    out = random_training_outputs(targets, num_queries=40, seed=8)
    losses = crit(out, targets, epoch=0)
    assert set(losses) == _expected_names(("mal", "boxes", "local"), 3)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())

    empty = random_targets([0, 0], seed=9)
    out = random_training_outputs(empty, num_queries=40, seed=10)
    assert "dn_outputs" not in out  # the model builds no denoising groups without objects
    losses = crit(out, empty, epoch=200)
    assert set(losses) == _expected_names(("mal", "boxes", "local"), 3, dn=False)
    for k, v in losses.items():
        assert torch.isfinite(v), k
        if not k.startswith("loss_mal") and not k.startswith("loss_ddf"):
            assert float(v.detach()) == 0.0, k  # nothing matched: no box terms
    assert float(losses["loss_mal"].detach()) > 0  # every query is pushed towards background
    sum(losses.values()).backward()


def test_other_num_classes_and_clear_errors():
    targets = random_targets([3, 1], num_classes=3, seed=11)
    out = random_training_outputs(targets, num_queries=20, num_classes=3, seed=12)
    losses = build_criterion("atto", num_classes=3)(out, targets, epoch=0)
    assert len(losses) == 27 and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="num_classes=80"):
        build_criterion("atto")(out, targets)
    bad = [dict(t) for t in targets]
    bad[0]["labels"] = torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="label 3"):
        build_criterion("atto", num_classes=3)(out, bad)
    with pytest.raises(ValueError, match="2 images"):
        build_criterion("atto", num_classes=3)(out, targets[:1])
    with pytest.raises(ValueError, match="unknown DEIMv2 size"):
        build_criterion("huge")
    with pytest.raises(ValueError, match="num_classes"):
        build_criterion("n", num_classes=0)


def test_loss_decreases_when_predictions_move_to_targets():
    """Sanity of the whole objective: predictions equal to the targets cost less than random ones."""
    targets = random_targets([3, 2], seed=13)
    crit = build_criterion("n")
    out = random_training_outputs(targets, num_queries=30, seed=14, requires_grad=False)
    before = sum(crit(out, targets, epoch=0).values())
    for stage in [out, *out["aux_outputs"], out["pre_outputs"], *out["enc_aux_outputs"]]:
        for b, t in enumerate(targets):
            n = len(t["labels"])
            stage["pred_boxes"][b, :n] = t["boxes"]
            stage["pred_logits"][b, torch.arange(n), t["labels"]] = 8.0
    after = sum(crit(out, targets, epoch=0).values())
    assert after < before


# ------------------------------------------------------------------------------------------------- pieces


def test_matcher_finds_the_obvious_assignment_in_both_cost_modes():
    targets = random_targets([4, 0, 2], seed=15)
    logits = torch.full((3, 10, 80), -6.0)
    boxes = torch.tensor([0.5, 0.5, 0.05, 0.05]).repeat(3, 10, 1)
    want = {0: [7, 2, 9, 4], 2: [5, 1]}  # query of target j
    for b, queries in want.items():
        for j, q in enumerate(queries):
            boxes[b, q] = targets[b]["boxes"][j]
            logits[b, q, targets[b]["labels"][j]] = 4.0
    matcher = HungarianMatcher(matcher_change_epoch=5)
    for epoch in (0, 5):
        result = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets, epoch=epoch)
        assert result[1][0].numel() == 0 and result[1][1].numel() == 0
        for b, queries in want.items():
            q, t = result[b]
            assert dict(zip(t.tolist(), q.tolist(), strict=True)) == dict(enumerate(queries)), (epoch, b)
            assert q.tolist() == sorted(q.tolist())


def test_union_matching_counts_and_ties():
    m = lambda q, t: (torch.tensor(q), torch.tensor(t))  # noqa: E731
    stages = [[m([1, 4], [0, 1])], [m([1, 4], [0, 2])], [m([1, 4], [0, 2])], [m([3, 5], [2, 1])]]
    (q, t), = union_matching(stages)
    # (1,0) x3; (4,2) x2 beats (4,1) x1; (3,2) x1; (5,1) x1; ties ordered by (query, target)
    assert list(zip(q.tolist(), t.tolist(), strict=True)) == [(1, 0), (4, 2), (3, 2), (5, 1)]
    (q, t), = union_matching([[m([2], [1])], [m([2], [0])]])  # equal counts: the smaller target wins
    assert list(zip(q.tolist(), t.tolist(), strict=True)) == [(2, 0)]


def test_edge_bin_targets_interpolate_between_bin_values():
    from deimv2_deploy.models.decoder import bin_weights

    up, reg_scale, reg_max = torch.tensor([0.5]), torch.tensor([4]), 32
    values = bin_weights(up, reg_scale, reg_max)
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    unit = 0.2 / 4

    def box_for(offset: float) -> torch.Tensor:  # every edge at `offset` bins-units outside the reference edge
        d = (offset + 2.0) * unit
        return torch.tensor([[0.5 - d, 0.5 - d, 0.5 + d, 0.5 + d]])

    for lo, frac in ((20, 0.75), (20, 0.25), (5, 0.5), (0, 0.3), (31, 0.6)):
        offset = float(values[lo] * (1 - frac) + values[lo + 1] * frac)
        left, w_right, w_left = edge_bin_targets(ref, box_for(offset), reg_max, reg_scale, up)
        assert torch.equal(left, torch.full((4,), float(lo))), (lo, frac, left)
        assert torch.allclose(w_right, torch.full((4,), frac), atol=1e-4), (lo, frac, w_right)
        assert torch.allclose(w_left + w_right, torch.ones(4))
    left, w_right, w_left = edge_bin_targets(ref, box_for(-100.0), reg_max, reg_scale, up)  # far inside
    assert torch.equal(left, torch.zeros(4)) and torch.equal(w_left, torch.ones(4))
    left, w_right, w_left = edge_bin_targets(ref, box_for(100.0), reg_max, reg_scale, up)  # far outside
    assert torch.allclose(left, torch.full((4,), reg_max - 0.1)) and torch.equal(w_right, torch.ones(4))
    assert math.isclose(float(values[0]), -2 * 0.5 * 4) and math.isclose(float(values[-1]), 2 * 0.5 * 4)


def test_golden_readme_table_matches_recipes():
    """The per-size config table of the golden README (losses, uni set, change epoch)."""
    table = {"atto": 450, "femto": 450, "pico": 450, "n": 136, "s": 100, "m": 80, "l": 50, "x": 45}
    for size, epoch in table.items():
        crit = build_criterion(size)
        lite = size in ("atto", "femto", "pico")
        assert crit.matcher.matcher_change_epoch == epoch
        assert crit.losses == (("mal", "boxes") if lite else ("mal", "boxes", "local"))
        assert crit.use_uni_set == (not lite)
    scaled = get_recipe("n").scaled(epochs=16)
    assert build_criterion("n", recipe=scaled).matcher.matcher_change_epoch == round(136 / 10)
    with pytest.raises(ValueError, match="size 'n'"):
        build_criterion("atto", recipe=scaled)
    assert json.dumps(get_recipe("x").as_dict())  # JSON-friendly for logs


def test_class_agnostic_encoder_proposals():
    """enc_meta.class_agnostic: the encoder head has one class; its matching and MAL use label 0."""
    targets = random_targets([2, 3], seed=16)
    out = random_training_outputs(targets, num_queries=20, seed=17)
    enc = out["enc_aux_outputs"][0]
    enc["pred_logits"] = torch.randn(2, 20, 1, requires_grad=True)
    out["enc_meta"] = {"class_agnostic": True}
    losses = build_criterion("n")(out, targets, epoch=0)
    assert {"loss_mal_enc_0", "loss_bbox_enc_0", "loss_giou_enc_0"} <= set(losses)
    losses["loss_mal_enc_0"].backward()
    assert enc["pred_logits"].grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------- real model


def _real_chain(size: str, stem: str):
    """Our training forward on the case's weights, input and seed, then our criterion on its outputs."""
    from golden import load_golden_module

    from deimv2_deploy.models import build_model

    _, targets, losses, epochs, meta = _load_case(stem)
    fill = load_golden_module("fill")
    model = build_model(size)
    model.load_state_dict(fill.fill_state_dict(model.state_dict()))
    model.train()
    h, w = meta["case"]["image_size_hw"]
    images = fill.golden_input(h, w, batch=meta["case"]["batch"])
    torch.manual_seed(meta["case"]["seed"])
    return model, model(images, targets=targets), targets, losses, epochs


def _check_chain(size: str, stem: str) -> None:
    if not (golden_dir() / "criterion" / f"{stem}.npz").exists():
        pytest.skip(f"criterion golden case {stem} not found in {golden_dir() / 'criterion'}")
    model, outputs, targets, losses, epochs = _real_chain(size, stem)
    crit = build_criterion(size)
    for name, epoch in epochs.items():
        mine = crit(outputs, targets, epoch=epoch)
        assert set(mine) == set(losses[name])
        # the forward itself matches the official outputs to ~1e-5, so the terms agree a little less tightly
        bad = {k: (float(mine[k].detach()), v) for k, v in losses[name].items()
               if not abs(float(mine[k].detach()) - v) <= 1e-5 + 1e-3 * abs(v)}
        assert not bad, (stem, name, bad)
    sum(crit(outputs, targets, epoch=0).values()).backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))]
    assert not [n for n in no_grad if not n.startswith("backbone.")], no_grad  # every head and encoder weight
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(no_grad) <= 0.01 * trainable, no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_real_model_chain_atto():
    """Our training forward + our criterion reproduce the official loss terms; gradients reach the model."""
    _check_chain("atto", "atto_seed0")


@pytest.mark.slow
def test_real_model_chain_n():
    _check_chain("n", "n_seed2")


def test_union_matching_equals_a_plain_reference_on_random_matchings():
    """The vectorised union against the same rule spelled out pair by pair (counts sorted as torch sorts them)."""
    g = torch.Generator().manual_seed(18)
    for trial in range(20):
        n_targets = int(torch.randint(1, 15, (1,), generator=g))
        stages = [[(torch.randperm(40, generator=g)[:n_targets], torch.randperm(n_targets, generator=g))]
                  for _ in range(int(torch.randint(1, 7, (1,), generator=g)))]
        pairs = torch.cat([torch.stack(m[0], dim=1) for m in stages])
        unique, counts = torch.unique(pairs, return_counts=True, dim=0)
        best: dict[int, int] = {}
        for q, t in unique[torch.argsort(counts, descending=True)].tolist():
            best.setdefault(q, t)
        (q, t), = union_matching(stages)
        assert list(zip(q.tolist(), t.tolist(), strict=True)) == list(best.items()), trial
