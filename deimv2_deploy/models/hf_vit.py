"""Transformers-format DINOv3 ViT and EoMT-DINOv3 folders -> transformers' own model (eval mode, CPU, FP32).

A folder is `config.json` (its `model_type` says which model) plus weights (`model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin`). Sizes come from the config, so any size loads. We use
transformers' modelling code as it is: for EoMT-DINOv3 it equals the official EoMT code, for DINOv3 ViT Meta's
(measurements in docs/segmentation.md), so there is nothing to re-implement. `inspect_vit_folder` only reads
config.json (no torch, no transformers); `load_vit_model` builds the model and refuses any weight the folder does
not provide (transformers would otherwise initialise it randomly and only log it).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["VIT_FAMILIES", "VitFolder", "inspect_vit_folder", "load_vit_model", "check_masked_attention"]

# family (the CLI's first argument) -> (transformers model_type, transformers class)
VIT_FAMILIES: dict[str, tuple[str, str]] = {
    "dinov3": ("dinov3_vit", "DINOv3ViTModel"),
    "eomt": ("eomt_dinov3", "EomtDinov3ForUniversalSegmentation"),
}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_DEFAULT_NUM_LABELS = 2  # transformers' PretrainedConfig default, not written to config.json


@dataclass(frozen=True)
class VitFolder:
    """What a transformers folder holds, read from its config.json."""

    path: Path
    family: str  # "dinov3" | "eomt"
    model_type: str
    config: dict[str, Any] = field(repr=False)
    weights: tuple[Path, ...] = ()

    @property
    def class_names(self) -> tuple[str, ...]:
        """EoMT's class names in label order (config id2label; "class_<i>" where it has none). transformers leaves
        id2label and num_labels out of config.json when they are its default, two labels, so a folder that says
        nothing has two classes."""
        id2label = self.config.get("id2label") or {}
        n = len(id2label) or int(self.config.get("num_labels", _DEFAULT_NUM_LABELS))
        return tuple(str(id2label.get(str(i), id2label.get(i, f"class_{i}"))) for i in range(n))


def _family_of(model_type: str) -> str | None:
    return next((f for f, (t, _) in VIT_FAMILIES.items() if t == model_type), None)


def inspect_vit_folder(path: str | os.PathLike, family: str | None = None) -> VitFolder:
    """Read and check a transformers folder: ValueError/FileNotFoundError (one line) for another model type,
    a missing config or missing weights. `family` ("dinov3"/"eomt"), when given, must be what the folder holds."""
    if family is not None and family not in VIT_FAMILIES:
        raise ValueError(f"unknown model family {family!r}: choose one of {', '.join(VIT_FAMILIES)}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {p}")
    if not p.is_dir():
        raise ValueError(f"{p} is a file: pass the transformers folder holding config.json and model.safetensors")
    config_path = p / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{p} has no config.json: pass a transformers folder (save_pretrained's output)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}): copy the folder again") from None
    model_type = str(config.get("model_type", "")) if isinstance(config, dict) else ""
    found = _family_of(model_type)
    wanted = [VIT_FAMILIES[family][0]] if family else [t for t, _ in VIT_FAMILIES.values()]
    if found is None or (family is not None and found != family):
        hint = f"; for model_type {model_type!r} use `deimv2-export {found}`" if found else ""
        raise ValueError(f"{p} holds a model of type {model_type or '(none)'!r}, expected {' or '.join(wanted)}{hint}")
    weights = _weight_files(p)
    return VitFolder(p, found, model_type, config, weights)


def _weight_files(folder: Path) -> tuple[Path, ...]:
    """The folder's weight files, or FileNotFoundError naming what is missing."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index} is not a valid safetensors index (no weight_map): copy the folder again") \
                from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} lacks {len(missing)} weight shard(s) listed in {index.name}, e.g. "
                                    f"{missing[0]}: download the whole folder")
        return tuple(folder / s for s in shards)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            if (folder / name).stat().st_size == 0:
                raise ValueError(f"{folder / name} is empty (0 bytes): copy it again")
            return (folder / name,)
    raise FileNotFoundError(f"{folder} has a config.json but no weights ({', '.join(_WEIGHT_FILES)}): "
                            "download the whole folder")


def load_vit_model(path: str | os.PathLike, family: str | None = None) -> tuple[Any, VitFolder]:
    """(transformers model in eval mode, FP32, eager attention; the folder) for a DINOv3 ViT or EoMT-DINOv3 folder.

    Every weight of the model must come from the folder: a missing, unexpected or mis-shaped tensor is a ValueError
    naming it (transformers itself would initialise it randomly and carry on)."""
    folder = inspect_vit_folder(path, family)
    try:
        import transformers
    except ImportError as e:
        raise RuntimeError("exporting DINOv3 / EoMT-DINOv3 needs transformers (and scipy for EoMT): "
                           "pip install 'transformers>=5.24,<6' scipy") from e
    from transformers.utils import logging as hf_logging

    cls = getattr(transformers, VIT_FAMILIES[folder.family][1])
    bar, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would break our one-line errors and progress lines
    hf_logging.set_verbosity_error()  # missing/unexpected keys are reported below, as errors
    try:
        model, info = cls.from_pretrained(str(folder.path), local_files_only=True, output_loading_info=True,
                                          attn_implementation="eager", dtype="float32")
    except ImportError as e:  # EoMT's loss imports scipy even for inference
        raise RuntimeError(f"building {cls.__name__} needs a library that is missing ({e}): pip install scipy") \
            from e
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    problems = {k: list(info.get(k) or []) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        kind, keys = next(iter(problems.items()))
        raise ValueError(f"{folder.path} does not match its config.json: {len(keys)} {kind.replace('_', ' ')} "
                         f"(e.g. {keys[0]}); is the folder complete and unmodified?")
    return model.eval(), folder


def check_masked_attention(model: Any) -> tuple[float, ...]:
    """EoMT's masked-attention probabilities per masked block; ValueError when one lies strictly between 0 and 1
    (each query then drops its mask at random: inference is not deterministic, in transformers and the official
    code alike, so no export can reproduce it). 1: masked attention on, 0: off (released checkpoints)."""
    probs = tuple(float(p) for p in model.attn_mask_probs.detach().cpu().tolist())
    bad = [(i, p) for i, p in enumerate(probs) if 0.0 < p < 1.0]
    if bad:
        i, p = bad[0]
        raise ValueError(f"masked-attention probability {p:g} in block {i} (of {list(probs)}) is strictly between 0 "
                         "and 1: inference would be random (a checkpoint saved mid-annealing); set attn_mask_probs to "
                         "0 (off, as released checkpoints) or 1 (on) before exporting")
    # transformers reuses the previous block's mask in a block whose probability is 0 once an earlier one masked;
    # the official EoMT attends fully there (benchmarks/results/eomt_official_vs_transformers.md). The official
    # schedule turns blocks off first to last, so it never leaves a later block off while an earlier one is on.
    on = next((i for i, p in enumerate(probs) if p == 1.0), None)
    off_after = next((i for i, p in enumerate(probs) if p == 0.0 and on is not None and i > on), None)
    if off_after is not None:
        raise ValueError(f"masked attention is on in block {on} but off in the later block {off_after} (of "
                         f"{list(probs)}): transformers applies block {on}'s mask again there while the official EoMT "
                         "attends fully, so no export would be the official model. Official training never leaves "
                         "this (blocks are turned off first to last): set attn_mask_probs to all 0 (as released "
                         "checkpoints) or turn the earlier blocks off as well")
    return probs
