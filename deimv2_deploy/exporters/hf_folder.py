"""deimv2-export --format hf: a checkpoint -> a Hugging Face transformers DEIMv2 folder.

The folder holds `config.json` (`"model_type": "deimv2"`, class names as `id2label`), `model.safetensors` in
transformers' names and layout (what `save_pretrained` writes, except that the shared box head of
atto/femto/pico is stored under layer 0, the only name `from_pretrained` restores it from), and
`preprocessor_config.json` with the size's official input size and normalisation. It is checked before the
export returns: read back by our loader it gives the same official state dict (s/m: except the ViT-Tiny key
bias, which the format has no place for), and where transformers is installed, `from_pretrained` loads it
with no missing, unexpected or mismatched key and exactly these values.

Where transformers' graph differs from the official model (docs/transformers.md), `config.json` says what a
config can: no `eval_size` (AIFI keeps its position embedding), SiLU in the x SwiGLU, LayerNorm eps 1e-6 for
s/m (`official_behaviour=False` writes transformers' converter settings instead).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from deimv2_deploy.exporters.common import EXPORTER, ExportResult, Steps, library_versions, resolve_store
from deimv2_deploy.files import atomic_write, file_sha256
from deimv2_deploy.spec import ArtifactSpec
from deimv2_deploy.variants import get_variant_info

__all__ = ["export_hf_folder", "hf_folder_name", "HF_FILES"]

HF_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")


def hf_folder_name(variant: str, random_weights: bool = False) -> str:
    """deimv2_<size>[_random]_hf: the folder's name in the model store."""
    return f"deimv2_{get_variant_info(variant).name}{'_random' if random_weights else ''}_hf"


def _official_weights(variant: str, checkpoint: str | os.PathLike | None, random_weights: bool,
                      store: Path) -> tuple[dict[str, Any], tuple[str, ...] | None, str]:
    """(official state dict, class names or None, description of the weights)."""
    from deimv2_deploy.models import build_model
    from deimv2_deploy.models.checkpoint import find_checkpoint, load_checkpoint
    from deimv2_deploy.models.random_weights import apply_deterministic_weights

    if checkpoint is not None and random_weights:
        raise ValueError("pass either a checkpoint or random_weights, not both")
    if random_weights:
        model = apply_deterministic_weights(build_model(variant), seed=0)
        return model.state_dict(), None, "random (deterministic, seed 0): NOT a trained model"
    path = Path(checkpoint) if checkpoint is not None else find_checkpoint(variant, store)
    loaded = load_checkpoint(path, variant)
    return loaded.state, loaded.class_names, f"{path.name} sha256:{file_sha256(path)[:16]}"


def _key_bias_note(variant: str, state: dict[str, Any]) -> str | None:
    """s/m: how much ViT-Tiny key bias the folder cannot carry (None when there is none to lose)."""
    import torch

    biases = [t.chunk(3)[1] for k, t in state.items() if k.startswith("backbone.dinov3._model.") and
              k.endswith(".attn.qkv.bias")]
    if not biases:
        return None
    largest = float(torch.stack([b.abs().max() for b in biases]).max())
    if largest == 0.0:
        return None
    return (f"DEIMv2-{variant}: the transformers format has no key bias in the ViT-Tiny attention, so the folder "
            f"takes it as zero (these weights have key biases up to {largest:.3g}; transformers' converter drops "
            "them the same way): outputs read back from the folder differ from this checkpoint's")


def _check_with_transformers(folder: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """Load the folder with transformers' from_pretrained: no key complaints, exactly the written values."""
    import torch

    try:
        from transformers import Deimv2ForObjectDetection
        from transformers.utils import logging as hf_logging
    except ImportError:
        return {"checked": False, "why": "transformers is not installed (pip install 'transformers>=5.24')"}
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # its progress bars and notes; the loading info is checked below
    hf_logging.disable_progress_bar()
    try:
        model, info = Deimv2ForObjectDetection.from_pretrained(str(folder), output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    complaints = {k: list(v) for k, v in info.items() if v}
    state = model.state_dict()
    differ = [k for k, v in expected.items() if k not in state or not torch.equal(state[k], v)]
    return {"checked": True, "transformers": _version("transformers"), "loading_info": complaints,
            "values_differ": len(differ), "example": differ[:3]}


def _version(name: str) -> str:
    import importlib

    return str(importlib.import_module(name).__version__)


def export_hf_folder(variant: str, *, checkpoint: str | os.PathLike | None = None, random_weights: bool = False,
                     output_dir: str | os.PathLike | None = None, folder: str | os.PathLike | None = None,
                     official_behaviour: bool = True, quiet: bool = False) -> ExportResult:
    """Write DEIMv2-`variant` as a transformers folder; `folder` (default `<store>/deimv2_<size>_hf`) is it.

    Fails (nothing half-written under the final names) when the written folder does not read back to the same
    weights, or when transformers loads it with key complaints or other values.
    """
    import torch
    from safetensors.torch import save_file

    from deimv2_deploy.models.checkpoint import load_checkpoint
    from deimv2_deploy.models.hf_format import (
        official_to_transformers,
        preprocessor_config,
        to_memory_layout,
        to_saved_layout,
        transformers_config,
    )

    info = get_variant_info(variant)
    store = resolve_store(output_dir)
    dest = Path(folder) if folder is not None else store / hf_folder_name(info.name, random_weights)
    if dest.exists() and not dest.is_dir():
        raise ValueError(f"{dest} exists and is not a folder: choose another --output-dir")
    if (dest / "model.safetensors.index.json").exists():
        raise ValueError(f"{dest} holds a sharded checkpoint (model.safetensors.index.json), which would shadow the "
                         "folder written here for some readers: remove it or choose another --output-dir")
    steps = Steps(f"hf {info.name}", 4, quiet)
    steps(f"loading DEIMv2-{info.name} ({'random weights' if random_weights else checkpoint or 'model store'})")
    state, class_names, weights = _official_weights(info.name, checkpoint, random_weights, store)
    num_classes = int(state["decoder.enc_score_head.weight"].shape[0])
    if class_names is None and num_classes != 80:
        class_names = tuple(f"class_{i}" for i in range(num_classes))  # no names known: id2label needs some
    note = _key_bias_note(info.name, state)
    if note:
        warnings.warn(note, UserWarning, stacklevel=2)

    steps(f"writing {dest}")
    memory = official_to_transformers(state, info.name)
    saved = to_saved_layout(memory, info.name)
    config = transformers_config(info.name, class_names, official_behaviour=official_behaviour)
    config["dtype"] = "float32"
    dest.mkdir(parents=True, exist_ok=True)
    with atomic_write(dest / "model.safetensors") as tmp:
        save_file(saved, str(tmp), metadata={"format": "pt"})
    for name, content in (("config.json", config), ("preprocessor_config.json", preprocessor_config(info.name))):
        with atomic_write(dest / name) as tmp:
            tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")

    steps("reading it back (deimv2-deploy loader)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the key-bias note was given above
        back = load_checkpoint(dest, info.name).state
    lost = [k for k in state if k.endswith(".attn.qkv.bias") and k.startswith("backbone.dinov3._model.")] \
        if note else []
    differ = [k for k in state if k not in lost and not torch.equal(back[k].to(state[k].dtype), state[k])]
    if differ:
        raise RuntimeError(f"the folder written to {dest} reads back with other values for {len(differ)} tensors "
                           f"(e.g. {differ[0]}); please report this with the command you ran")
    parity: dict[str, Any] = {"roundtrip": "exact" if note is None else
                              "exact except the ViT-Tiny key bias (taken as zero)"}

    steps("loading it with transformers' from_pretrained")
    check = _check_with_transformers(dest, to_memory_layout(saved, info.name))
    parity["transformers"] = check
    if check.get("checked") and (check["loading_info"] or check["values_differ"]):
        raise RuntimeError(f"transformers loads {dest} with {check['loading_info'] or 'other values'} "
                           f"(e.g. {check['example']}); please report this with the command you ran")
    parity["ok"] = True
    spec = ArtifactSpec.for_variant(
        info.name, weights=weights, random_weights=random_weights, exporter=EXPORTER,
        class_names=class_names or ArtifactSpec.for_variant(info.name).class_names,
        versions=library_versions("torch", "safetensors", "transformers"), parity=parity,
        build={"format": "hf", "files": list(HF_FILES), "official_behaviour": official_behaviour})
    if not quiet:
        print(f"transformers folder: {parity['roundtrip']} round trip; from_pretrained: "
              f"{'no key complaints, same values' if check.get('checked') else check.get('why')}", flush=True)
    return ExportResult(dest, spec, parity, steps.elapsed)
