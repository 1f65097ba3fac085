"""The official optimiser and learning-rate schedule: AdamW parameter groups by name, warm-up + flat-cosine.

    recipe = get_recipe("n").scaled(epochs=50, iters_per_epoch=len(loader))
    optimizer = build_optimizer(model, recipe)                 # or build_optimizer(model, "n", lr=4e-4)
    schedule = build_scheduler(optimizer, recipe, iters_per_epoch=len(loader))
    for images, targets in loader:
        ...; optimizer.step(); schedule.step()                 # once per iteration, after the step
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from deimv2_deploy.training.ema import ModelEMA  # re-exported: the loop takes its optimisation pieces from here
from deimv2_deploy.training.recipe import TrainRecipe, get_recipe

__all__ = ["param_groups", "build_optimizer", "FlatCosineSchedule", "build_scheduler", "flat_cosine_lr",
           "FIRST_ITER_FACTOR", "ModelEMA"]

# The official base config also builds a LinearWarmup(500) scheduler; its constructor sets every group's lr to
# lr / 500 before the first iteration, and the flat-cosine schedule only takes over after that iteration.
FIRST_ITER_FACTOR = 1.0 / 500


def _recipe(size_or_recipe: str | TrainRecipe) -> TrainRecipe:
    return size_or_recipe if isinstance(size_or_recipe, TrainRecipe) else get_recipe(size_or_recipe)


def param_groups(model: nn.Module, recipe: str | TrainRecipe, lr: float | None = None,
                 weight_decay: float | None = None) -> list[dict]:
    """AdamW parameter groups of the recipe: one per rule (in order), then the unmatched rest.

    Trainable parameters only (requires_grad), matched by name with `re.search` as the official
    `get_optim_params`. `lr` replaces the recipe's base lr and scales every group's lr by the same factor
    (the backbone keeps its ratio to the head); `weight_decay` replaces the base weight decay of the groups
    that do not set their own (the no-decay groups stay at 0). Each group carries its rule's `name`.
    """
    r = _recipe(recipe)
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if weight_decay is not None and not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    scale = 1.0 if lr is None else lr / r.lr
    base_wd = r.weight_decay if weight_decay is None else float(weight_decay)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (every requires_grad is False)")
    owner: dict[str, str] = {}
    groups = []
    for rule in r.param_groups:
        pattern = re.compile(rule.pattern)
        members = [(n, p) for n, p in named if pattern.search(n)]
        for n, _ in members:
            if n in owner:
                raise ValueError(f"parameter {n!r} matches both param group {owner[n]!r} and {rule.name!r} of "
                                 f"recipe {r.size!r}; make the patterns exclusive")
            owner[n] = rule.name
        groups.append({
            "name": rule.name,
            "params": [p for _, p in members],
            "lr": (r.lr if rule.lr is None else rule.lr) * scale,
            "weight_decay": base_wd if rule.weight_decay is None else rule.weight_decay,
        })
    rest = [p for n, p in named if n not in owner]
    if rest:
        groups.append({"name": "rest", "params": rest, "lr": r.lr * scale, "weight_decay": base_wd})
    return groups


def build_optimizer(model: nn.Module, recipe: str | TrainRecipe, lr: float | None = None,
                    weight_decay: float | None = None, betas: tuple[float, float] | None = None) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, recipe, lr, weight_decay)` with the recipe's betas (or `betas`)."""
    r = _recipe(recipe)
    groups = param_groups(model, r, lr=lr, weight_decay=weight_decay)
    base_lr = r.lr if lr is None else float(lr)
    base_wd = r.weight_decay if weight_decay is None else float(weight_decay)
    return torch.optim.AdamW(groups, lr=base_lr, betas=tuple(betas or r.betas), weight_decay=base_wd)


def build_scheduler(optimizer: torch.optim.Optimizer, recipe: str | TrainRecipe,
                    iters_per_epoch: int) -> FlatCosineSchedule:
    """The recipe's per-iteration schedule for a loader of `iters_per_epoch` batches."""
    return FlatCosineSchedule.from_recipe(optimizer, recipe, iters_per_epoch)


def flat_cosine_lr(it: int, base_lr: float, min_lr: float, total: int, warmup: int, flat: int, no_aug: int) -> float:
    """The official schedule at iteration `it`: quadratic warm-up to base_lr over `warmup` iterations, flat
    until `flat`, cosine down to min_lr, and min_lr for the last `no_aug` iterations."""
    if it <= warmup:
        return base_lr * (it / float(warmup)) ** 2 if warmup > 0 else base_lr
    if it <= flat:
        return base_lr
    if it >= total - no_aug:
        return min_lr
    progress = (it - flat) / (total - flat - no_aug)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


class FlatCosineSchedule:
    """Per-iteration learning rates of the official DEIM loop, state-dict-able.

    Call `step()` once after every optimiser step. As in the official loop, the first iteration runs at
    base_lr * FIRST_ITER_FACTOR and iteration g >= 1 at `flat_cosine_lr(g - 1)` (the schedule is evaluated
    after each step for the next one). Every group keeps its own base lr (its `initial_lr`, recorded at
    construction) and decays to base * lr_gamma.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_iters: int, warmup_iters: int, flat_iters: int,
                 no_aug_iters: int, lr_gamma: float) -> None:
        for name, v in (("total_iters", total_iters), ("warmup_iters", warmup_iters), ("flat_iters", flat_iters),
                        ("no_aug_iters", no_aug_iters)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"FlatCosineSchedule: {name} must be an integer >= 0, got {v!r}")
        if total_iters < 1:
            raise ValueError(f"FlatCosineSchedule: total_iters must be >= 1, got {total_iters}")
        self.optimizer = optimizer
        self.total_iters, self.warmup_iters = total_iters, warmup_iters
        self.flat_iters, self.no_aug_iters = flat_iters, no_aug_iters
        self.lr_gamma = float(lr_gamma)
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.last_iter = -1  # iterations finished
        self._apply()

    @classmethod
    def from_recipe(cls, optimizer: torch.optim.Optimizer, recipe: str | TrainRecipe,
                    iters_per_epoch: int) -> FlatCosineSchedule:
        """The recipe's schedule for a loader of `iters_per_epoch` batches (epoch constants x iters, truncated)."""
        r = _recipe(recipe)
        if isinstance(iters_per_epoch, bool) or not isinstance(iters_per_epoch, int) or iters_per_epoch < 1:
            raise ValueError(f"iters_per_epoch must be a positive integer, got {iters_per_epoch!r}")
        return cls(optimizer, total_iters=int(iters_per_epoch * r.epochs), warmup_iters=r.warmup_iter,
                   flat_iters=int(iters_per_epoch * r.flat_epoch), no_aug_iters=int(iters_per_epoch * r.no_aug_epoch),
                   lr_gamma=r.lr_gamma)

    def lr_at(self, it: int, base_lr: float) -> float:
        """Learning rate that `step()` sets after iteration `it` (0-based) for a group of base `base_lr`."""
        return flat_cosine_lr(it, base_lr, base_lr * self.lr_gamma, self.total_iters, self.warmup_iters,
                              self.flat_iters, self.no_aug_iters)

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * FIRST_ITER_FACTOR if self.last_iter < 0 else self.lr_at(self.last_iter, base)

    def step(self, next_iter: int | None = None) -> None:
        """After an optimiser step: set the learning rates of the next iteration (0-based index `next_iter`,
        by default the one after the previous call's). Iteration g >= 1 gets `flat_cosine_lr(g - 1)`."""
        if next_iter is None:
            self.last_iter += 1
        else:
            if isinstance(next_iter, bool) or not isinstance(next_iter, int) or next_iter < 0:
                raise ValueError(f"FlatCosineSchedule.step: next_iter must be an integer >= 0, got {next_iter!r}")
            self.last_iter = next_iter - 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_iter": self.last_iter, "total_iters": self.total_iters, "warmup_iters": self.warmup_iters,
                "flat_iters": self.flat_iters, "no_aug_iters": self.no_aug_iters, "lr_gamma": self.lr_gamma,
                "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a schedule (and re-apply its learning rates to the optimiser)."""
        if len(state["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"schedule state has {len(state['base_lrs'])} parameter groups, the optimiser "
                             f"{len(self.optimizer.param_groups)}; resume with the same size and recipe")
        for key in ("last_iter", "total_iters", "warmup_iters", "flat_iters", "no_aug_iters"):
            setattr(self, key, int(state[key]))
        self.lr_gamma = float(state["lr_gamma"])
        self.base_lrs = [float(v) for v in state["base_lrs"]]
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["initial_lr"] = base
        self._apply()
