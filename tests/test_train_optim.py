"""The official optimisation recipe: AdamW parameter groups, the warm-up + flat-cosine schedule, EMA, the
per-size recipe table and its scaling to shorter runs."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from deimv2_deploy.models import build_model
from deimv2_deploy.training import (
    RECIPE_NAMES,
    FlatCosineSchedule,
    ModelEMA,
    build_optimizer,
    flat_cosine_lr,
    get_recipe,
    param_groups,
)
from deimv2_deploy.training.optim import FIRST_ITER_FACTOR

# ------------------------------------------------------------------------------------------------- schedule


def _optimizer(*lrs: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs], lr=lrs[0])


def test_schedule_phases_against_the_formula():
    base, gamma = 1e-3, 0.5
    total, warmup, flat, no_aug = 100, 10, 40, 20
    lr = lambda it: flat_cosine_lr(it, base, base * gamma, total, warmup, flat, no_aug)  # noqa: E731
    assert lr(0) == 0.0
    assert math.isclose(lr(5), base * 0.25)  # quadratic warm-up
    assert math.isclose(lr(10), base) and lr(25) == base and lr(40) == base  # flat
    assert math.isclose(lr(60), base * gamma + base * (1 - gamma) * 0.5)  # cosine half way (40 .. 80)
    assert base * gamma < lr(79) < lr(50) < base  # decreasing
    assert lr(80) == base * gamma and lr(99) == base * gamma  # no-aug epochs: constant at the minimum
    assert math.isclose(flat_cosine_lr(7, base, base, 100, 10, 10_000, 5), base * 0.49)
    assert flat_cosine_lr(95, base, base, 100, 10, 10_000, 5) == base  # n's recipe: flat past the end


def test_schedule_drives_every_group_per_iteration_as_the_official_loop():
    opt = _optimizer(1e-3, 5e-4)
    sched = FlatCosineSchedule(opt, total_iters=100, warmup_iters=10, flat_iters=40, no_aug_iters=20, lr_gamma=0.5)
    # first iteration: lr / 500 (the official LinearWarmup constructor), then f(g - 1) for iteration g
    assert [g["lr"] for g in opt.param_groups] == [1e-3 * FIRST_ITER_FACTOR, 5e-4 * FIRST_ITER_FACTOR]
    seen = []
    for _ in range(100):
        opt.step()
        sched.step()
        seen.append([g["lr"] for g in opt.param_groups])
    for it, (a, b) in enumerate(seen):
        assert math.isclose(a, flat_cosine_lr(it, 1e-3, 5e-4, 100, 10, 40, 20), rel_tol=1e-12)
        assert math.isclose(b, flat_cosine_lr(it, 5e-4, 2.5e-4, 100, 10, 40, 20), rel_tol=1e-12)
    assert sched.get_last_lr() == seen[-1]


def test_schedule_state_dict_round_trip_resumes_the_same_rates():
    opt = _optimizer(2e-3, 1e-3)
    sched = FlatCosineSchedule(opt, total_iters=50, warmup_iters=5, flat_iters=20, no_aug_iters=5, lr_gamma=0.5)
    for _ in range(23):
        sched.step()
    state = sched.state_dict()
    expected = []
    for _ in range(10):
        sched.step()
        expected.append(sched.get_last_lr())

    opt2 = _optimizer(7.0, 7.0)  # a fresh optimiser with other lrs: the state carries the base lrs
    resumed = FlatCosineSchedule(opt2, total_iters=1, warmup_iters=0, flat_iters=0, no_aug_iters=0, lr_gamma=1.0)
    resumed.load_state_dict(state)
    assert resumed.last_iter == 22 and resumed.base_lrs == [2e-3, 1e-3]
    assert [g["lr"] for g in opt2.param_groups] == [resumed.lr_at(22, 2e-3), resumed.lr_at(22, 1e-3)]
    got = []
    for _ in range(10):
        resumed.step()
        got.append(resumed.get_last_lr())
    assert got == expected
    with pytest.raises(ValueError, match="parameter groups"):
        FlatCosineSchedule(_optimizer(1.0), 10, 1, 1, 1, 0.5).load_state_dict(state)


def test_schedule_from_recipe_converts_epochs_to_iterations():
    opt = _optimizer(1e-3)
    r = get_recipe("atto").scaled(epochs=50, iters_per_epoch=7)
    sched = FlatCosineSchedule.from_recipe(opt, r, iters_per_epoch=7)
    assert (sched.total_iters, sched.flat_iters, sched.no_aug_iters) == (350, 7 * r.flat_epoch, 7 * r.no_aug_epoch)
    assert sched.warmup_iters == r.warmup_iter and sched.lr_gamma == 0.5
    with pytest.raises(ValueError, match="iters_per_epoch"):
        FlatCosineSchedule.from_recipe(opt, r, iters_per_epoch=0)


# ------------------------------------------------------------------------------------------------- param groups


@pytest.fixture(scope="module", params=["atto", "n"])
def sized_model(request):
    return request.param, build_model(request.param)


def test_param_groups_partition_the_trainable_parameters(sized_model):
    size, model = sized_model
    r = get_recipe(size)
    groups = param_groups(model, size)
    assert [g["name"] for g in groups] == ["backbone", "backbone_norm", "head_norm", "rest"]
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable  # every trainable parameter exactly once
    assert id(model.decoder.up) not in trainable and id(model.decoder.reg_scale) not in trainable
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == r.backbone_lr and by_name["backbone"]["weight_decay"] == r.weight_decay
    assert by_name["head_norm"]["weight_decay"] == 0.0 and by_name["head_norm"]["lr"] == r.lr
    assert by_name["rest"]["lr"] == r.lr and by_name["rest"]["weight_decay"] == r.weight_decay

    names = {id(p): n for n, p in model.named_parameters()}
    members = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert all(n.startswith("backbone.") for n in members["backbone"])
    # the official regex quirk: `(?!.*norm|bn)` keeps HGNetv2 batch-norm weights in the decayed backbone group
    assert "backbone.stem.stem1.bn.weight" in members["backbone"]
    assert members["backbone_norm"] == set()
    assert all(("encoder" in n or "decoder" in n) and ("norm" in n or "bn" in n or "bias" in n)
               for n in members["head_norm"])
    assert "decoder.decoder.layers.0.norm1.scale" in members["head_norm"]
    bias = "decoder.decoder.layers.0.self_attn.in_proj_bias"
    # atto's config leaves head biases decayed; femto .. n move them to the no-decay group
    assert bias in (members["rest"] if size == "atto" else members["head_norm"])
    assert not any(n.startswith("backbone.") for n in members["rest"])


def test_lr_override_scales_every_group_consistently(sized_model):
    size, model = sized_model
    r = get_recipe(size)
    default = param_groups(model, size)
    doubled = param_groups(model, size, lr=2 * r.lr, weight_decay=0.05)
    for a, b in zip(default, doubled, strict=True):
        assert math.isclose(b["lr"], 2 * a["lr"])
        assert b["weight_decay"] == (0.0 if a["weight_decay"] == 0.0 else 0.05)
    opt = build_optimizer(model, size, lr=2 * r.lr)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in doubled]
    with pytest.raises(ValueError, match="lr must be a positive number"):
        build_optimizer(model, size, lr=-1.0)


def test_frozen_parameters_stay_out_and_overlapping_rules_are_refused():
    from dataclasses import replace

    from deimv2_deploy.training import ParamGroupRule

    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    model[0].weight.requires_grad_(False)
    r = replace(get_recipe("atto"), param_groups=(ParamGroupRule("norm", r"^1\."),))
    groups = param_groups(model, r)
    assert [len(g["params"]) for g in groups] == [2, 1]  # LayerNorm weight + bias; Linear bias
    r = replace(r, param_groups=(ParamGroupRule("a", r"weight"), ParamGroupRule("b", r"^1\.")))
    with pytest.raises(ValueError, match="matches both"):
        param_groups(model, r)


# ------------------------------------------------------------------------------------------------- EMA


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.bn = nn.BatchNorm1d(2)


def test_ema_update_math_and_integer_buffers():
    torch.manual_seed(0)
    model = _Tiny()
    ema = ModelEMA(model, decay=0.9999, warmups=1000)
    start = {k: v.clone() for k, v in ema.module.state_dict().items()}
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.bn.running_mean.add_(3.0)
        model.bn.num_batches_tracked += 5
    ema.update(model)
    d1 = 0.9999 * (1 - math.exp(-1 / 1000))
    assert math.isclose(ema.decay_at(1), d1)
    now, src = ema.module.state_dict(), model.state_dict()
    for k, v in now.items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v, d1 * start[k] + (1 - d1) * src[k], rtol=1e-6, atol=1e-7), k
    assert int(now["bn.num_batches_tracked"]) == int(start["bn.num_batches_tracked"])
    ema.update(model)
    assert ema.updates == 2 and math.isclose(ema.decay_at(2), 0.9999 * (1 - math.exp(-2 / 1000)))
    assert ModelEMA(model, decay=0.9, warmups=0).decay_at(1) == 0.9


def test_ema_start_skips_updates_and_state_dict_round_trip():
    model = _Tiny()
    ema = ModelEMA(model, decay=0.99, warmups=10, start=2)
    with torch.no_grad():
        model.lin.weight.mul_(3.0)
    before = ema.module.lin.weight.clone()
    ema.update(model)
    ema.update(model)
    assert ema.updates == 0 and torch.equal(ema.module.lin.weight, before)
    ema.update(model)
    assert ema.updates == 1 and not torch.equal(ema.module.lin.weight, before)

    state = ema.state_dict()
    assert set(state) >= {"module", "updates"}  # the official checkpoint's `ema` entry
    other = ModelEMA(_Tiny(), decay=0.5, warmups=1)
    other.load_state_dict(state)
    assert other.updates == 1 and other.decay == 0.99 and other.warmups == 10
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, other.module.state_dict()[k])
    ema.update(model)  # the restored copy continues exactly like the original
    other.update(model)
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, other.module.state_dict()[k]), k
    other.load_state_dict({"module": state["module"], "updates": 7})  # an official {module, updates} entry
    assert other.updates == 7 and other.decay == 0.99
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(model, decay=1.0)


def test_ema_of_a_real_model():
    model = build_model("atto")
    ema = ModelEMA(model)
    ema.update(model)
    assert ema.updates == 1
    assert set(ema.module.state_dict()) == set(model.state_dict())


# ------------------------------------------------------------------------------------------------- recipe


def test_recipe_table_official_values():
    assert RECIPE_NAMES == ("atto", "femto", "pico", "n", "s", "m", "l", "x")
    atto, n, x = get_recipe("atto"), get_recipe("N"), get_recipe("x")
    assert (atto.epochs, atto.flat_epoch, atto.no_aug_epoch, atto.warmup_iter) == (500, 250, 32, 4000)
    assert atto.batch_size == 128 and n.batch_size == 32
    assert (atto.lr, atto.backbone_lr, atto.weight_decay) == (0.002, 0.001, 0.0001)
    assert (n.epochs, n.flat_epoch, n.lr_gamma, n.lr, n.backbone_lr) == (160, 7800, 1.0, 0.0008, 0.0004)
    assert (x.epochs, x.lr, x.backbone_lr, x.weight_decay, x.matcher_change_epoch) == (58, 0.0005, 1e-5, 0.000125, 45)
    for r in map(get_recipe, RECIPE_NAMES):
        assert r.clip_max_norm == 0.1 and r.ema_decay == 0.9999 and r.ema_warmups == 1000 and r.betas == (0.9, 0.999)
        assert r.stop_epoch == r.epochs - r.no_aug_epoch
        assert dict(r.weight_dict) == {"loss_mal": 1, "loss_bbox": 5, "loss_giou": 2, "loss_fgl": 0.15, "loss_ddf": 1.5}
    with pytest.raises(ValueError, match="unknown DEIMv2 size"):
        get_recipe("xl")


def test_recipe_scaled_keeps_proportions():
    s = get_recipe("s")
    short = s.scaled(epochs=33)  # a quarter
    assert short.epochs == 33 and short.flat_epoch == 16 and short.no_aug_epoch == 3 and short.stop_epoch == 30
    assert short.matcher_change_epoch == 25
    assert short.warmup_iter == s.warmup_iter and short.ema_decay == s.ema_decay  # no iters_per_epoch: unchanged
    n = get_recipe("n").scaled(epochs=16)
    assert n.flat_epoch > n.epochs  # "never decay" stays past the end
    atto = get_recipe("atto").scaled(epochs=50)
    assert atto.stop_epoch == 47 and atto.no_aug_epoch == 3 and atto.matcher_change_epoch == 45
    odd = get_recipe("n").scaled(epochs=21)  # stop_epoch rounds like the data pipeline's; no_aug follows it
    assert odd.stop_epoch == round(148 * 21 / 160) and odd.no_aug_epoch == 21 - odd.stop_epoch

    # iteration constants follow the total length relative to the official COCO run
    r = get_recipe("atto")
    g = 50 * 20 / (500 * r.iters_per_epoch_coco)
    it = r.scaled(epochs=50, iters_per_epoch=20)
    assert it.warmup_iter == max(1, round(4000 * g)) and it.ema_warmups == max(1, round(1000 * g))
    assert math.isclose(1 / (1 - it.ema_decay), max(1.0, 10000 * g), rel_tol=1e-9)
    full = r.scaled(epochs=500, iters_per_epoch=r.iters_per_epoch_coco)
    assert full.warmup_iter == 4000 and math.isclose(full.ema_decay, 0.9999) and full.ema_warmups == 1000
    assert r.scaled() == r
    with pytest.raises(ValueError, match="epochs"):
        r.scaled(epochs=0)


# ------------------------------------------------------------------------------------------------- together


def test_two_training_steps_on_a_real_model_with_other_classes():
    """Criterion, optimiser, schedule, clipping and EMA as the training loop will use them (atto, 3 classes)."""
    from deimv2_deploy.training import build_criterion
    from deimv2_deploy.training.fake_outputs import random_targets

    torch.manual_seed(0)
    model = build_model("atto", num_classes=3).train()
    recipe = get_recipe("atto").scaled(epochs=2, iters_per_epoch=2)
    criterion = build_criterion("atto", num_classes=3, recipe=recipe)
    optimizer = build_optimizer(model, recipe)
    schedule = FlatCosineSchedule.from_recipe(optimizer, recipe, iters_per_epoch=2)
    ema = ModelEMA(model, decay=recipe.ema_decay, warmups=recipe.ema_warmups)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    targets = random_targets([2, 0], num_classes=3, seed=1)
    images = torch.rand(2, 3, 320, 320)
    for step in range(2):
        losses = criterion(model(images, targets=targets), targets, epoch=step)
        loss = sum(losses.values())
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_max_norm)
        optimizer.step()
        schedule.step()
        ema.update(model)
    assert schedule.last_iter == 1 and ema.updates == 2
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), start[n])]
    assert len(moved) > 0.9 * sum(p.requires_grad for p in model.parameters())
    assert torch.equal(model.decoder.up.detach(), start["decoder.up"])  # constants stay put
    ema_w = ema.module.state_dict()["decoder.dec_score_head.0.weight"]
    assert not torch.equal(ema_w, start["decoder.dec_score_head.0.weight"])


def test_recipe_agrees_with_the_data_pipeline_table():
    """The schedule's epochs and stop epoch equal the data pipeline's, official and scaled alike."""
    from deimv2_deploy.training.augment_recipe import get_augment_recipe

    for size in RECIPE_NAMES:
        for epochs in (None, 7, 21, 60, 333):
            r = get_recipe(size) if epochs is None else get_recipe(size).scaled(epochs=epochs)
            a = get_augment_recipe(size, epochs=epochs)
            assert (r.epochs, r.stop_epoch) == (a.epochs, a.stop_epoch), (size, epochs)
            assert r.input_size == a.input_size[0] and r.epochs - r.no_aug_epoch == r.stop_epoch


def test_step_with_an_explicit_iteration_and_build_scheduler():
    from deimv2_deploy.training.optim import ModelEMA as ReExported
    from deimv2_deploy.training.optim import build_scheduler

    assert ReExported is ModelEMA
    a, b = _optimizer(1e-3), _optimizer(1e-3)
    r = get_recipe("n").scaled(epochs=4, iters_per_epoch=5)
    counted, indexed = build_scheduler(a, r, 5), build_scheduler(b, r, 5)
    for g in range(20):
        counted.step()
        indexed.step(g + 1)  # the index of the iteration about to run
        assert a.param_groups[0]["lr"] == b.param_groups[0]["lr"]
    indexed.step(0)
    assert b.param_groups[0]["lr"] == 1e-3 * FIRST_ITER_FACTOR
    with pytest.raises(ValueError, match="next_iter"):
        indexed.step(-1)


def test_for_batch_scales_every_learning_rate_once():
    atto = get_recipe("atto")
    sqrt = atto.for_batch(32)
    assert math.isclose(sqrt.lr, 0.002 * 0.5) and math.isclose(sqrt.backbone_lr, 0.001 * 0.5)
    assert [g.lr for g in sqrt.param_groups] == [0.0005, 0.0005, None] and sqrt.run_batch_size == 32
    assert sqrt.batch_size == 128 and sqrt.iters_per_epoch_coco == atto.iters_per_epoch_coco  # official kept
    linear = atto.for_batch(32, rule="linear")
    assert math.isclose(linear.lr, 0.0005) and math.isclose(linear.backbone_lr, 0.00025)
    given = atto.for_batch(8, lr=0.004)
    assert math.isclose(given.lr, 0.004) and math.isclose(given.backbone_lr, 0.002)
    model = build_model("atto")
    groups = {g["name"]: g["lr"] for g in param_groups(model, sqrt)}
    assert math.isclose(groups["backbone"], 0.0005) and math.isclose(groups["rest"], 0.001)
    assert [g["lr"] for g in param_groups(model, "atto", lr=sqrt.lr)] == [g["lr"] for g in param_groups(model, sqrt)]
    with pytest.raises(ValueError, match="rule"):
        atto.for_batch(8, rule="cubic")
    with pytest.raises(ValueError, match="batch"):
        atto.for_batch(0)
