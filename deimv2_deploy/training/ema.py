"""Exponential moving average of the model weights, as the official DEIM loop keeps it.

After update n (n = 1, 2, ...), every floating-point entry of the state dict (parameters and buffers) is
    ema = d_n * ema + (1 - d_n) * model,    d_n = decay * (1 - exp(-n / warmups))
so early updates follow the model closely and the average settles at `decay` after a few `warmups`.
Integer buffers keep the value they had when the EMA was created. `state_dict()` holds `module` and
`updates` (the official checkpoint's `ema` entry), which is what exporters read.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["ModelEMA"]


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


class ModelEMA:
    """EMA copy of a model (`.module`, eval mode, no gradients). `decay` may be changed between updates
    (the official loop assigns its restart decay at the end of the augmented stage)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmups: int = 1000, start: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        if warmups < 0 or start < 0:
            raise ValueError(f"EMA warmups and start must be >= 0, got warmups={warmups!r}, start={start!r}")
        self.module = copy.deepcopy(_unwrap(model)).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)
        self.warmups = int(warmups)
        self.start = int(start)  # model updates to skip before averaging begins
        self.before_start = 0
        self.updates = 0
        self._pairs: list[tuple[str, torch.Tensor]] | None = None

    def decay_at(self, updates: int) -> float:
        """The decay used by update number `updates` (1-based)."""
        if self.warmups == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-updates / self.warmups))

    def _floating(self) -> list[tuple[str, torch.Tensor]]:
        if self._pairs is None:
            self._pairs = [(k, v) for k, v in self.module.state_dict().items() if v.dtype.is_floating_point]
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of `model` (same architecture) into the average."""
        if self.before_start < self.start:
            self.before_start += 1
            return
        self.updates += 1
        d = self.decay_at(self.updates)
        source = _unwrap(model).state_dict()
        pairs = self._floating()
        try:
            new = [source[k].detach() for k, _ in pairs]
        except KeyError as e:
            raise ValueError(f"EMA update: the model has no entry {e.args[0]!r}; update with the model the EMA "
                             f"was built from") from e
        mine = [v for _, v in pairs]
        torch._foreach_mul_(mine, d)
        new = [t.to(device=v.device, dtype=v.dtype) for t, v in zip(new, mine, strict=True)]
        torch._foreach_add_(mine, new, alpha=1.0 - d)

    def to(self, *args, **kwargs) -> ModelEMA:
        self.module = self.module.to(*args, **kwargs)
        self._pairs = None
        return self

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmups": self.warmups}

    def load_state_dict(self, state: Mapping, strict: bool = True) -> None:
        """Restore from `state_dict()` or an official checkpoint's `ema` entry ({module, updates})."""
        self.module.load_state_dict(state["module"], strict=strict)
        self.updates = int(state.get("updates", self.updates))
        self.decay = float(state.get("decay", self.decay))
        self.warmups = int(state.get("warmups", self.warmups))
        self._pairs = None

    def __repr__(self) -> str:
        return f"ModelEMA(decay={self.decay}, warmups={self.warmups}, updates={self.updates})"
