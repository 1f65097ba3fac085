"""Official DEIMv2 checkpoints in, our reference model out.

Pure functions do the work (unwrap the container, strip prefixes, compare with the model, recognise the size);
`read_checkpoint` is the only one that touches disk and uses `torch.load(weights_only=True)`, which refuses
pickles that carry code. Formats:
- official `.pth`: `{"model": sd}`, `{"ema": {"module": sd}}`, a bare state dict, keys with `module.`;
- a Hugging Face folder (`config.json` + `model.safetensors`, keys as official), or a `.safetensors` file.
Hugging Face saves each shared tensor once (e.g. the shared bbox head, `decoder.decoder.up`), so keys that
alias another tensor of the model may be absent there and are filled from their partner.
"""
from __future__ import annotations

import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "KeyReport", "read_checkpoint", "unwrap_state_dict", "compare_state_dict",
           "guess_variant", "load_model", "find_checkpoint", "MODELS_ENV"]

MODELS_ENV = "DEIMV2_MODELS"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what and what to do."""


# --- reading -------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, Hugging Face config or None) from a .pth/.pt, a .safetensors file or a HF folder."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        weights, config_file = p / "model.safetensors", p / "config.json"
        if not weights.exists():
            raise CheckpointError(f"{p} is a folder without model.safetensors: expected a Hugging Face DEIMv2 "
                                  "folder (config.json + model.safetensors)")
        config = json.loads(config_file.read_text()) if config_file.exists() else None
        return _read_safetensors(weights), config
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file is empty: {p}")
    if p.suffix.lower() == ".safetensors":
        return _read_safetensors(p), None
    with open(p, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip archive, or a pickle
        raise CheckpointError(f"{p} is not a PyTorch checkpoint (neither a zip archive nor a pickle): pass the "
                              "official .pth, a .safetensors file or a Hugging Face folder")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{p} holds Python objects beyond tensors (code or custom classes), which we refuse "
                              f"to load for safety (torch.load weights_only=True): {str(e).splitlines()[0]}. "
                              "Re-save only the state dict: torch.save({'model': model.state_dict()}, path)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"cannot read {p}: the file is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                              "Download it again") from None
    return unwrap_state_dict(obj, source=str(p)), None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError("reading .safetensors needs the safetensors package: pip install safetensors") from e
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError for damaged files
        raise CheckpointError(f"cannot read {path}: truncated or not a safetensors file ({e})") from None


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict inside an official checkpoint object, with `module.` prefixes removed."""
    if isinstance(obj, Mapping):
        if "ema" in obj and isinstance(obj["ema"], Mapping):  # EMA weights are what the official evaluates
            inner = obj["ema"]
            obj = inner.get("module", inner)
        elif "model" in obj and isinstance(obj["model"], Mapping):
            obj = obj["model"]
        elif "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds no state dict (expected {{'model': ...}}, {{'ema': {{'module': ...}}}} "
                              f"or a dict of tensors), got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{source} holds no tensors; its keys start {list(obj)[:5]}")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


# --- checking ------------------------------------------------------------------------------------------
@dataclass
class KeyReport:
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint shape, model shape)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, few: int = 5) -> str:
        parts = []
        for title, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                parts.append(f"{len(items)} {title} keys (e.g. {', '.join(items[:few])})")
        if self.mismatched:
            shown = "; ".join(f"{k}: checkpoint {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched[:few])
            parts.append(f"{len(self.mismatched)} keys with other shapes ({shown})")
        return "; ".join(parts) if parts else "all keys match"


def _alias_groups(state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """key -> the other keys of the model's state dict that share its storage."""
    by_ptr: dict[tuple, list[str]] = {}
    for k, t in state.items():
        if t.numel() and t.device.type != "meta":
            by_ptr.setdefault((t.data_ptr(), tuple(t.shape), t.dtype), []).append(k)
    return {k: [o for o in ks if o != k] for ks in by_ptr.values() for k in ks if len(ks) > 1}


def compare_state_dict(checkpoint: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
                       ) -> KeyReport:
    """Missing/unexpected/mis-shaped keys of a checkpoint against a model's state dict (aliases forgiven)."""
    aliases = _alias_groups(model_state)
    report = KeyReport()
    for k, t in model_state.items():
        if k not in checkpoint:
            if not any(a in checkpoint for a in aliases.get(k, ())):
                report.missing.append(k)
        elif tuple(checkpoint[k].shape) != tuple(t.shape):
            report.mismatched.append((k, tuple(checkpoint[k].shape), tuple(t.shape)))
    report.unexpected = [k for k in checkpoint if k not in model_state]
    return report


def _shape_signature(variant: str, num_classes: int) -> dict[str, tuple]:
    from deimv2_deploy.models.zoo import build_model

    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(variant, num_classes=num_classes)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def guess_variant(checkpoint: Mapping[str, torch.Tensor]) -> tuple[str | None, int]:
    """(the size whose keys and shapes the checkpoint matches best, its number of classes), or (None, ...)."""
    from deimv2_deploy.models.zoo import VARIANTS

    num_classes = 80
    head = checkpoint.get("decoder.enc_score_head.weight")
    if head is not None:
        num_classes = int(head.shape[0])
    best, best_score = None, 0.0
    for name in VARIANTS:
        try:
            sig = _shape_signature(name, num_classes)
        except NotImplementedError:
            continue
        same = sum(1 for k, s in sig.items() if k in checkpoint and tuple(checkpoint[k].shape) == s)
        score = same / max(len(sig), len(checkpoint))
        if score > best_score:
            best, best_score = name, score
    return (best if best_score > 0.9 else None), num_classes


def _variant_from_hf_config(config: Mapping[str, Any] | None) -> str | None:
    if not config:
        return None
    config = config.get("config", config)
    names = {"atto": "atto", "femto": "femto", "pico": "pico", "b0": "n", "vit_tiny": "s", "vit_tinyplus": "m",
             "dinov3_vits16": "l", "dinov3_vits16plus": "x"}
    for section in ("HGNetv2", "DINOv3STAs"):
        if section in config and "name" in config[section]:
            return names.get(str(config[section]["name"]).lower())
    return None


# --- loading -------------------------------------------------------------------------------------------
def load_model(source: str | os.PathLike | Mapping[str, torch.Tensor], variant: str | None = None,
               num_classes: int | None = None) -> nn.Module:
    """Our train-format DEIMv2 with the checkpoint's weights, loaded strictly.

    `source`: a checkpoint path, a Hugging Face folder or a state dict. `variant` is recognised from the
    Hugging Face config or from the shapes when not given. Errors list missing, unexpected and mis-shaped
    keys, and name the size the checkpoint looks like when it is another.
    """
    from deimv2_deploy.models.zoo import build_model, get_variant

    config = None
    if isinstance(source, Mapping):
        state, where = unwrap_state_dict(source), "state dict"
    else:
        state, config = read_checkpoint(source)
        where = str(source)
    detected, detected_classes = guess_variant(state)
    if variant is None:
        variant = _variant_from_hf_config(config) or detected
        if variant is None:
            raise CheckpointError(f"cannot tell which DEIMv2 size {where} is (its keys/shapes match none of "
                                  "atto femto pico n s m l x): pass the size explicitly")
    variant = get_variant(variant).name
    num_classes = num_classes or detected_classes
    model = build_model(variant, num_classes=num_classes)
    model_state = model.state_dict()
    report = compare_state_dict(state, model_state)
    if not report.ok:
        hint = (f" It looks like a DEIMv2-{detected} checkpoint: use size {detected!r}."
                if detected and detected != variant else "")
        raise CheckpointError(f"{where} does not fit DEIMv2-{variant}: {report.describe()}.{hint}")
    # fill keys that Hugging Face stored once for several aliases
    aliases = _alias_groups(model_state)
    full = dict(state)
    for k in model_state:
        if k not in full:
            full[k] = next(state[a] for a in aliases[k] if a in state)
    for k, t in model_state.items():
        if full[k].dtype != t.dtype:
            full[k] = full[k].to(t.dtype)
    model.load_state_dict(full, strict=True)
    return model.eval()


def find_checkpoint(variant: str, store: str | os.PathLike | None = None) -> Path:
    """The official checkpoint (or HF folder) of `variant` in the store; the FileNotFoundError says where we looked."""
    from deimv2_deploy.variants import get_variant_info

    info = get_variant_info(variant)
    root = Path(store or os.environ.get(MODELS_ENV) or "models")
    candidates = [root / info.checkpoint_name, root / info.checkpoint_name.replace(".pth", ""),
                  root / info.hf_repo.split("/")[-1]]
    for c in candidates:
        if c.exists():
            return c
    raise FileNotFoundError(
        f"no DEIMv2-{info.name} checkpoint in the model store {root.resolve()}: looked for "
        f"{', '.join(str(c.name) for c in candidates)}. Put the official {info.checkpoint_name} there "
        f"(or set ${MODELS_ENV}), pass --checkpoint PATH, or use --random-weights for plumbing/benchmarks")
