"""Official DEIMv2 checkpoints in, our reference model out.

Pure functions do the work (unwrap the container, strip prefixes, compare with the model, recognise the size);
`read_checkpoint` is the only one that touches disk and uses `torch.load(weights_only=True)`, which refuses
pickles that carry code. Formats:
- official `.pth`: `{"model": sd}`, `{"ema": {"module": sd}}`, a bare state dict, keys with `module.`;
- a Hugging Face folder (`config.json` + `model.safetensors`, keys as official), or a `.safetensors` file;
- a Hugging Face transformers folder (`config.json` with `"model_type": "deimv2"` + `model.safetensors`, or
  shards listed in `model.safetensors.index.json`): transformers' own names, renamed back by
  `hf_format.transformers_to_official` (docs/transformers.md).
Hugging Face saves each shared tensor once (e.g. the shared bbox head, `decoder.decoder.up`), so keys that
alias another tensor of the model may be absent there and are filled from their partner.

`load_model` gives the model; `load_checkpoint` gives the official-named state dict and what was learnt
on the way (size, classes, format, notes), for callers that build the model themselves (training).
"""
from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "KeyReport", "LoadedCheckpoint", "read_checkpoint", "unwrap_state_dict",
           "compare_state_dict", "guess_variant", "detect_variant", "is_transformers_checkpoint", "checkpoint_format",
           "load_checkpoint",
           "load_model", "find_checkpoint", "MODELS_ENV"]

MODELS_ENV = "DEIMV2_MODELS"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message says what and what to do."""


# --- reading -------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, Hugging Face config or None) from a .pth/.pt, a .safetensors file or a HF folder.

    The state dict keeps the names it was stored with (official, or transformers' for a transformers folder).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        config = _read_config(p)
        return _read_folder_weights(p), config
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file is empty: {p}")
    if p.suffix.lower() == ".safetensors":
        return _read_safetensors(p), None
    return unwrap_state_dict(_torch_load(p), source=str(p)), None


def _torch_load(p: Path) -> Any:
    with open(p, "rb") as fh:
        head = fh.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # torch.save: a zip archive, or a pickle
        raise CheckpointError(f"{p} is not a PyTorch checkpoint (neither a zip archive nor a pickle): pass the "
                              "official .pth, a .safetensors file or a Hugging Face folder")
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{p} holds Python objects beyond tensors (code or custom classes), which we refuse "
                              f"to load for safety (torch.load weights_only=True): {str(e).splitlines()[0]}. "
                              "Re-save only the state dict: torch.save({'model': model.state_dict()}, path)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"cannot read {p}: the file is truncated or not a PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
                              "Download it again") from None


def _read_config(folder: Path) -> dict[str, Any] | None:
    """config.json of a Hugging Face folder (None when absent); refuses other transformers model types."""
    from deimv2_deploy.models.hf_format import TRANSFORMERS_MODEL_TYPE, variant_from_transformers_config

    path = folder / "config.json"
    if not path.exists():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): download the folder again") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a {type(config).__name__}, not a JSON object: download the folder again")
    if "model_type" in config and config["model_type"] != TRANSFORMERS_MODEL_TYPE:
        try:
            variant_from_transformers_config(config)  # raises the message naming the other model type
        except ValueError as e:
            raise CheckpointError(f"{folder}: {e}") from None
    return config


def _read_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, its shards (model.safetensors.index.json), or pytorch_model.bin of a HF folder."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.exists():
        return _read_safetensors(single)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index (no valid weight_map: {e}): "
                                  "download the folder again") from None
        shards = sorted(set(weight_map.values()))
        absent = [name for name in shards if not (folder / name).exists()]
        if absent:
            raise CheckpointError(f"{index} lists shard {absent[0]}, which is missing from {folder} "
                                  f"({len(absent)} of {len(shards)} shards missing): download the whole folder again")
        state: dict[str, torch.Tensor] = {}
        for name in shards:
            state.update(_read_safetensors(folder / name))
        lost = [k for k in weight_map if k not in state]
        if lost:
            raise CheckpointError(f"{index} lists {len(lost)} tensors its shards do not hold (e.g. {lost[0]} in "
                                  f"{weight_map[lost[0]]}): the shards do not belong to this index; download again")
        return state
    legacy = folder / "pytorch_model.bin"
    if legacy.exists():
        return unwrap_state_dict(_torch_load(legacy), source=str(legacy))
    raise CheckpointError(f"{folder} is a folder without model.safetensors (nor model.safetensors.index.json): "
                          "expected a Hugging Face DEIMv2 folder (config.json + model.safetensors)")


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
    """The size named in an official Hugging Face copy's config.json ({"config": {"HGNetv2": {"name": ...}}})."""
    if not config:
        return None
    config = config.get("config", config)
    names = {"atto": "atto", "femto": "femto", "pico": "pico", "b0": "n", "vit_tiny": "s", "vit_tinyplus": "m",
             "dinov3_vits16": "l", "dinov3_vits16plus": "x"}
    for section in ("HGNetv2", "DINOv3STAs"):
        if section in config and "name" in config[section]:
            return names.get(str(config[section]["name"]).lower())
    return None


def is_transformers_checkpoint(state: Mapping[str, Any], config: Mapping[str, Any] | None = None) -> bool:
    """True for transformers' DEIMv2 format (config.json model_type 'deimv2', or transformers' key names)."""
    from deimv2_deploy.models.hf_format import TRANSFORMERS_MODEL_TYPE, is_transformers_state_dict

    if config and config.get("model_type") == TRANSFORMERS_MODEL_TYPE:
        return True
    return is_transformers_state_dict(state)


def checkpoint_format(path: str | os.PathLike) -> str:
    """'transformers' or 'official' for a checkpoint path, from config.json or the stored key names (reads no
    tensor data; a .pth counts as official, its names are checked when it is loaded)."""
    p = Path(path)
    names: list[str] = []
    if p.is_dir():
        config = _read_config(p)
        if config and is_transformers_checkpoint({}, config):
            return "transformers"
        index = p / "model.safetensors.index.json"
        if (p / "model.safetensors").exists():
            names = _safetensors_names(p / "model.safetensors")
        elif index.exists():
            try:
                names = list(json.loads(index.read_text()).get("weight_map", {}))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                names = []
    elif p.suffix.lower() == ".safetensors" and p.exists():
        names = _safetensors_names(p)
    return "transformers" if is_transformers_checkpoint(dict.fromkeys(names)) else "official"


def _safetensors_names(path: Path) -> list[str]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception:  # noqa: BLE001 - unreadable here; loading it later says why
        return []


def _transformers_num_classes(state: Mapping[str, torch.Tensor]) -> int | None:
    head = state.get("model.enc_score_head.weight")
    return int(head.shape[0]) if head is not None else None


def _guess_transformers_variant(state: Mapping[str, torch.Tensor], num_classes: int) -> str | None:
    """The size whose shapes a transformers-format state dict matches best (None when none fits well)."""
    from deimv2_deploy.models.hf_format import transformers_to_official
    from deimv2_deploy.models.zoo import VARIANTS, build_model

    best, best_score = None, 0.0
    for name in VARIANTS:
        with torch.device("meta"):
            template = build_model(name, num_classes=num_classes).state_dict()
        converted = transformers_to_official(state, name, template).state
        same = sum(1 for k, t in template.items() if k in converted and tuple(converted[k].shape) == tuple(t.shape))
        score = same / max(len(template), len(converted))
        if score > best_score:
            best, best_score = name, score
    return best if best_score > 0.9 else None


def detect_variant(state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None) -> str | None:
    """The DEIMv2 size of a checkpoint (read with `read_checkpoint`): from its config.json, else its shapes."""
    if is_transformers_checkpoint(state, config):
        from deimv2_deploy.models.hf_format import variant_from_transformers_config

        if config:
            try:
                return variant_from_transformers_config(config)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        return _guess_transformers_variant(state, _transformers_num_classes(state) or 80)
    return _variant_from_hf_config(config) or guess_variant(state)[0]


# --- loading -------------------------------------------------------------------------------------------
@dataclass
class LoadedCheckpoint:
    """A checkpoint as the official model's state dict, and what was learnt reading it."""

    state: dict[str, torch.Tensor]  # official names; loads strictly into build_model(variant, num_classes)
    variant: str
    num_classes: int
    source: str  # the path, or "state dict"
    format: str  # "official" or "transformers"
    class_names: tuple[str, ...] | None = None  # from a transformers config.json's id2label
    notes: tuple[str, ...] = ()  # what the format could not carry (also emitted as warnings)
    dropped: dict[str, str] = field(default_factory=dict)  # trained transformers-only tensors left out: name -> why
    config: dict[str, Any] | None = None


def load_checkpoint(source: str | os.PathLike | Mapping[str, torch.Tensor], variant: str | None = None,
                    num_classes: int | None = None, *, drop_transformers_only: bool = False) -> LoadedCheckpoint:
    """Any supported checkpoint (official .pth/.safetensors/HF folder, transformers folder, state dict) as the
    official state dict of its size, checked strictly against the model.

    A transformers checkpoint fine-tuned inside transformers holds trained tensors the official graph does not
    have (docs/transformers.md); that is a `CheckpointError` unless `drop_transformers_only` (then they are left
    out, listed in `dropped`, and the model computes something else than transformers did: fine as a training
    start, not for deployment).
    """
    return _load(source, variant, num_classes, drop_transformers_only)[1]


def load_model(source: str | os.PathLike | Mapping[str, torch.Tensor], variant: str | None = None,
               num_classes: int | None = None) -> nn.Module:
    """Our train-format DEIMv2 with the checkpoint's weights, loaded strictly.

    `source`: a checkpoint path, a Hugging Face folder (official or transformers names) or a state dict.
    `variant` is recognised from the Hugging Face config or from the shapes when not given. Errors list
    missing, unexpected and mis-shaped keys, and name the size the checkpoint looks like when it is another.
    """
    return _load(source, variant, num_classes, False)[0]


def _load(source: str | os.PathLike | Mapping[str, torch.Tensor], variant: str | None, num_classes: int | None,
          drop_transformers_only: bool) -> tuple[nn.Module, LoadedCheckpoint]:
    from deimv2_deploy.models.zoo import build_model, get_variant

    config = None
    if isinstance(source, Mapping):
        state, where = unwrap_state_dict(source), "state dict"
    else:
        state, config = read_checkpoint(source)
        where = str(source)
    if is_transformers_checkpoint(state, config):
        return _load_transformers(state, config, where, variant, num_classes, drop_transformers_only)
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
    full = _fill_aliases(state, model_state)
    model.load_state_dict(full, strict=True)
    return model.eval(), LoadedCheckpoint(full, variant, num_classes, where, "official", config=config)


def _fill_aliases(state: Mapping[str, torch.Tensor], model_state: Mapping[str, torch.Tensor]
                  ) -> dict[str, torch.Tensor]:
    """Every key of the model: those Hugging Face stored once for several aliases filled, dtypes matched."""
    aliases = _alias_groups(model_state)
    full = dict(state)
    for k in model_state:
        if k not in full:
            full[k] = next(state[a] for a in aliases[k] if a in state)
    for k, t in model_state.items():
        if full[k].dtype != t.dtype:
            full[k] = full[k].to(t.dtype)
    return full


def _load_transformers(state: dict[str, torch.Tensor], config: dict[str, Any] | None, where: str,
                       variant: str | None, num_classes: int | None, drop_transformers_only: bool
                       ) -> tuple[nn.Module, LoadedCheckpoint]:
    """A transformers-format checkpoint: size from config.json (else shapes), renamed to the official names."""
    from deimv2_deploy.models import hf_format as hf
    from deimv2_deploy.models.zoo import build_model, get_variant

    try:
        names = hf.class_names_from_config(config) if config else None
        configured = hf.variant_from_transformers_config(config) if config else None
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    weight_classes = _transformers_num_classes(state)
    if names is not None and weight_classes is not None and len(names) != weight_classes:
        raise CheckpointError(f"{where}: config.json id2label names {len(names)} classes but the weights have "
                              f"{weight_classes}: config.json does not belong to these weights")
    num_classes = num_classes or weight_classes or (len(names) if names else 80)
    chosen = variant or configured or _guess_transformers_variant(state, num_classes)
    if chosen is None:
        raise CheckpointError(f"cannot tell which DEIMv2 size {where} is (no config.json, and its transformers "
                              "tensors match none of atto femto pico n s m l x): pass the size explicitly")
    chosen = get_variant(chosen).name
    model = build_model(chosen, num_classes=num_classes)
    model_state = model.state_dict()
    converted = hf.transformers_to_official(state, chosen, model_state)
    report = compare_state_dict(converted.state, model_state)
    report.unexpected = sorted(set(report.unexpected) | set(converted.unexpected))
    report.missing = sorted(set(report.missing) | set(converted.missing))
    if not report.ok:
        looks = _guess_transformers_variant(state, num_classes)
        if configured == chosen and looks and looks != chosen:
            raise CheckpointError(f"{where}: config.json describes DEIMv2-{chosen} but the weights are "
                                  f"DEIMv2-{looks}'s ({report.describe(3)}): config.json does not belong to them")
        hint = f" It looks like a DEIMv2-{looks} checkpoint: use size {looks!r}." if looks and looks != chosen else ""
        raise CheckpointError(f"{where} does not fit DEIMv2-{chosen} (transformers names): {report.describe()}.{hint}")
    if converted.trained and not drop_transformers_only:
        raise CheckpointError(_trained_message(where, chosen, converted.trained))
    notes = list(converted.notes)
    if config and config.get("num_queries") not in (None, get_variant(chosen).num_queries):
        notes.append(f"{where}: config.json sets num_queries={config['num_queries']}; the official DEIMv2-{chosen} "
                     f"graph keeps {get_variant(chosen).num_queries} queries")
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=4)
    full = _fill_aliases(converted.state, model_state)
    model.load_state_dict(full, strict=True)
    loaded = LoadedCheckpoint(full, chosen, num_classes, where, "transformers", names, tuple(notes),
                              dict(converted.trained), config)
    return model.eval(), loaded


def _trained_message(where: str, variant: str, trained: Mapping[str, str]) -> str:
    """Why a fine-tuned transformers checkpoint does not fit the official graph, and what to do."""
    first = next(iter(trained))
    return (f"{where} was fine-tuned inside transformers: {len(trained)} tensors that only transformers' DEIMv2 has "
            f"hold trained values ({first} {trained[first]}), which the official DEIMv2 graph cannot represent. "
            f"Export it through transformers' own graph (deimv2-export {variant} --checkpoint {where}, which picks it "
            "for such folders; needs pip install transformers), or force the official graph with --graph official "
            "(leaves them out: the detections change)")


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
