"""The reference model every exporter, runtime and benchmark starts from: a checkpoint (or deterministic random
weights) in deploy mode, with a description of its weights and the classes it predicts."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from deimv2_deploy.classes import ModelClasses, resolve_classes
from deimv2_deploy.files import file_sha256
from deimv2_deploy.variants import get_variant_info

__all__ = ["Reference", "load_reference", "weights_description", "checkpoint_classes", "model_num_classes"]


class Reference(NamedTuple):
    model: Any  # deploy-mode DEIMv2 in eval mode
    weights: str  # where the weights came from (checkpoint name + sha256, or "random ...")
    classes: ModelClasses  # the name (and dataset category id) of each label


def weights_description(path: str | os.PathLike) -> str:
    """`<file name> sha256:<first 16 hex digits>`: which checkpoint an artifact was made from."""
    p = Path(path)
    return f"{p.name} sha256:{file_sha256(p)[:16]}"


def model_num_classes(model: Any) -> int | None:
    """How many classes a DEIMv2 module (or a DeployGraph around one) predicts; None when it does not say."""
    decoder = getattr(getattr(model, "model", model), "decoder", None)
    k = getattr(decoder, "num_classes", None)
    return int(k) if isinstance(k, int) else None


def checkpoint_classes(path: str | os.PathLike) -> ModelClasses | None:
    """The class names (and dataset category ids) a checkpoint carries, None where it carries none.

    - a deimv2-train checkpoint: `state["deimv2"]["class_names"]` and `["category_ids"]`;
    - a Hugging Face / transformers folder: `config.json`'s `id2label` (names only);
    - official checkpoints and bare state dicts carry none.
    Unreadable files give None here: the weights loader reports them.
    """
    p = Path(path)
    if p.is_dir():
        try:
            config = json.loads((p / "config.json").read_text())
        except (OSError, ValueError):
            return None
        id2label = config.get("id2label") if isinstance(config, dict) else None
        if not isinstance(id2label, dict) or not id2label:
            return None
        try:
            by_label = {int(k): v for k, v in id2label.items()}
        except ValueError:
            raise ValueError(f"{p / 'config.json'}: id2label keys must be label numbers, got "
                             f"{list(id2label)[:5]}") from None
        if sorted(by_label) != list(range(len(by_label))):
            raise ValueError(f"{p / 'config.json'}: id2label must number the labels 0..{len(by_label) - 1}, got "
                             f"{sorted(by_label)[:5]}...")
        return ModelClasses(tuple(by_label[i] for i in range(len(by_label))), None, "config.json id2label")
    if p.suffix.lower() not in (".pth", ".pt"):
        return None
    import torch

    try:  # mmap: the tensors stay on disk, only the small metadata is read
        state = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not readable this way: the weights loader says why
        return None
    meta = state.get("deimv2") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or not meta.get("class_names"):
        return None
    return ModelClasses(tuple(meta["class_names"]), meta.get("category_ids"), "the checkpoint (deimv2-train)")


def load_reference(variant: str, checkpoint: str | os.PathLike | None = None, random_weights: bool = False,
                   store: str | os.PathLike | None = None, seed: int = 0, class_names: Sequence[str] | None = None,
                   category_ids: Sequence[int] | None = None) -> Reference:
    """(deploy-mode DEIMv2 in eval mode, description of its weights, its classes).

    With no checkpoint and no random_weights, the official checkpoint is looked up in the model store; the
    FileNotFoundError says where. Classes: `class_names`/`category_ids` when given (one per class, else a
    ValueError), else those the checkpoint carries, else COCO-80 for an 80-class model, else class_0.. with a
    warning (`deimv2_deploy.classes.resolve_classes`).
    """
    from deimv2_deploy.models.checkpoint import find_checkpoint, load_model
    from deimv2_deploy.models.random_weights import apply_deterministic_weights
    from deimv2_deploy.models.zoo import build_model

    info = get_variant_info(variant)
    if checkpoint is not None and random_weights:
        raise ValueError("pass either a checkpoint or random_weights, not both")
    stored = None
    if random_weights:
        model = apply_deterministic_weights(build_model(info.name), seed=seed)
        weights = f"random (deterministic, seed {seed}): NOT a trained model"
        name = f"DEIMv2-{info.name} (random weights)"
    else:
        path = Path(checkpoint) if checkpoint is not None else find_checkpoint(info.name, store)
        model = load_model(path, variant=info.name)
        weights = weights_description(path)
        stored = checkpoint_classes(path)
        name = str(path.name)
    classes = resolve_classes(model_num_classes(model), stored, class_names, category_ids, model=name)
    return Reference(model.eval().deploy().eval(), weights, classes)
