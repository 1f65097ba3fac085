"""The reference model every exporter, runtime and benchmark starts from: a checkpoint (or deterministic random
weights) in deploy mode, with a description of its weights."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deimv2_deploy.files import file_sha256
from deimv2_deploy.variants import get_variant_info

__all__ = ["load_reference", "weights_description"]


def weights_description(path: str | os.PathLike) -> str:
    """`<file name> sha256:<first 16 hex digits>`: which checkpoint an artifact was made from."""
    p = Path(path)
    return f"{p.name} sha256:{file_sha256(p)[:16]}"


def load_reference(variant: str, checkpoint: str | os.PathLike | None = None, random_weights: bool = False,
                   store: str | os.PathLike | None = None, seed: int = 0) -> tuple[Any, str]:
    """(deploy-mode DEIMv2 in eval mode, description of its weights).

    With no checkpoint and no random_weights, the official checkpoint is looked up in the model store; the
    FileNotFoundError says where.
    """
    from deimv2_deploy.models.checkpoint import find_checkpoint, load_model
    from deimv2_deploy.models.random_weights import apply_deterministic_weights
    from deimv2_deploy.models.zoo import build_model

    info = get_variant_info(variant)
    if checkpoint is not None and random_weights:
        raise ValueError("pass either a checkpoint or random_weights, not both")
    if random_weights:
        model = apply_deterministic_weights(build_model(info.name), seed=seed)
        weights = f"random (deterministic, seed {seed}): NOT a trained model"
    else:
        path = Path(checkpoint) if checkpoint is not None else find_checkpoint(info.name, store)
        model = load_model(path, variant=info.name)
        weights = weights_description(path)
    return model.eval().deploy().eval(), weights
