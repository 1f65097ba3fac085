"""Which graph deploys a checkpoint: the official DEIMv2, or transformers' own `Deimv2ForObjectDetection`.

A transformers-format folder converted from official weights holds, in the tensors only transformers has,
the converter's neutral values: the official graph then is the model the weights were trained as, and is
what we deploy (docs/transformers.md lists where transformers' graph differs). A folder fine-tuned inside
transformers has trained values there, which the official graph cannot represent: only transformers' graph
computes what those weights were trained for, so that one is deployed, wrapped to our I/O contract by
`TransformersDeployGraph`. `load_deploy_graph` makes the choice (or follows the user's), says why, and warns
when a forced choice changes the outputs.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from deimv2_deploy.models.postprocess import PostProcessor

__all__ = ["GRAPH_CHOICES", "GraphChoice", "TransformersDeployGraph", "build_transformers_model", "load_deploy_graph",
           "transformers_version"]

GRAPH_CHOICES = ("auto", "official", "transformers")
GraphName = Literal["auto", "official", "transformers"]


class TransformersDeployGraph(nn.Module):
    """transformers' `Deimv2ForObjectDetection` with the official postprocessor and the official export's I/O:
    images float32 (N, 3, H, W), orig_target_sizes int64 (N, 2) as (width, height) -> labels, boxes, scores."""

    def __init__(self, hf_model: nn.Module, top_k: int = 300) -> None:
        super().__init__()
        self.model = hf_model
        self.postprocessor = PostProcessor(top_k)

    def forward(self, images: torch.Tensor, orig_target_sizes: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=images)
        return self.postprocessor({"pred_logits": out.logits, "pred_boxes": out.pred_boxes}, orig_target_sizes)


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:
        return "not installed"
    return str(transformers.__version__)


def build_transformers_model(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], variant: str) -> nn.Module:
    """`Deimv2ForObjectDetection` of `config` holding `state` (transformers names, saved or in-memory layout).

    The state is loaded directly rather than through `from_pretrained`, which in transformers 5.24 re-initialises
    the shared box head of atto/femto/pico when it was saved under another layer's name (docs/transformers.md).
    """
    try:
        from transformers import Deimv2Config, Deimv2ForObjectDetection
    except ImportError as e:
        raise RuntimeError("running transformers' DEIMv2 graph needs transformers >= 5.24: "
                           "pip install 'transformers>=5.24'") from e
    from deimv2_deploy.models.hf_format import to_memory_layout

    model = Deimv2ForObjectDetection(Deimv2Config.from_dict(dict(config))).eval()
    full = to_memory_layout(state, variant)
    expected = model.state_dict()
    missing = [k for k in expected if k not in full]
    unexpected = [k for k in full if k not in expected]
    shapes = [k for k in expected if k in full and tuple(full[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {v[0]})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("keys with other shapes", shapes)) if v]
        raise ValueError(f"the weights do not fit transformers' Deimv2ForObjectDetection of this config.json: "
                         f"{'; '.join(parts)}")
    model.load_state_dict(full, strict=True)
    return model.eval()


@dataclass
class GraphChoice:
    """The graph that deploys a checkpoint, and why."""

    kind: str  # "official" or "transformers"
    reason: str
    variant: str
    graph: nn.Module  # DeployGraph or TransformersDeployGraph, eval mode
    spec_overrides: dict[str, Any] = field(default_factory=dict)  # ArtifactSpec fields (class names, input, build)
    warning: str | None = None  # set when a forced choice changes the outputs


def _preprocessing(folder: Path | None, variant: str) -> tuple[dict[str, Any], str]:
    """Input size and normalisation for transformers' graph: the folder's preprocessor_config.json, else the
    size's official ones."""
    from deimv2_deploy.models.zoo import get_variant

    cfg = get_variant(variant)
    official = {"input_size": cfg.input_size, "mean": cfg.mean, "std": cfg.std}
    path = folder / "preprocessor_config.json" if folder is not None else None
    if path is None or not path.exists():
        return official, "no preprocessor_config.json: the size's official input size and normalisation"
    try:
        pre = json.loads(path.read_text())
        size = pre.get("size") or {}
        hw = (int(size["height"]), int(size["width"]))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return official, f"{path.name} gives no fixed height/width: the size's official input size"
    if hw[0] % 32 or hw[1] % 32:
        raise ValueError(f"{path} resizes to {hw[0]}x{hw[1]}; DEIMv2 needs sides that are multiples of 32")
    normalize = bool(pre.get("do_normalize", False))
    mean = tuple(float(v) for v in pre.get("image_mean", (0.485, 0.456, 0.406))) if normalize else None
    std = tuple(float(v) for v in pre.get("image_std", (0.229, 0.224, 0.225))) if normalize else None
    rescale = float(pre.get("rescale_factor", 1 / 255))
    if pre.get("do_rescale", True) is False or abs(rescale - 1 / 255) > 1e-9:
        raise ValueError(f"{path} does not rescale pixels by 1/255; deimv2-deploy feeds [0, 1] RGB")
    return {"input_size": hw, "mean": mean, "std": std}, f"{path.name}: {hw[0]}x{hw[1]}, normalise {normalize}"


def load_deploy_graph(checkpoint: str | os.PathLike, variant: str | None = None, graph: GraphName = "auto",
                      top_k: int = 300) -> GraphChoice:
    """The deploy graph of any checkpoint: official unless transformers' graph is needed or asked for.

    graph="auto": transformers' graph only for a transformers folder fine-tuned inside transformers;
    "official"/"transformers" force the choice, with a `warning` when it changes the outputs.
    """
    from deimv2_deploy.models.checkpoint import _load, read_checkpoint
    from deimv2_deploy.models.graph import DeployGraph

    if graph not in GRAPH_CHOICES:
        raise ValueError(f"graph must be one of {', '.join(GRAPH_CHOICES)}, got {graph!r}")
    path = Path(checkpoint)
    where = str(path)
    model, loaded = _load(path, variant, None, drop_transformers_only=True)  # load_checkpoint, keeping the model
    reason = "official checkpoint"
    if loaded.format != "transformers" and graph == "transformers":
        raise ValueError(f"--graph transformers needs a transformers-format checkpoint (config.json with "
                         f"model_type 'deimv2'); {where} has the official names: write one with "
                         "deimv2-export SIZE --format hf, or use the official graph")
    overrides: dict[str, Any] = {}
    if loaded.class_names is not None:
        overrides["class_names"] = loaded.class_names
    trained = loaded.dropped
    warning = None
    if loaded.format == "transformers":
        if graph == "auto":
            graph = "transformers" if trained else "official"
        if graph == "official":
            reason = ("transformers-format checkpoint whose transformers-only tensors hold the converter's values: "
                      "the official graph computes the official model")
            if trained:
                reason = f"forced (--graph official); {len(trained)} trained transformers-only tensors left out"
                warning = (f"--graph official leaves out {len(trained)} tensors that {where} trained inside "
                           f"transformers (e.g. {next(iter(trained))}): the detections will differ from what "
                           "transformers computes with these weights")
        else:
            if trained:
                first = next(iter(trained))
                reason = (f"fine-tuned inside transformers: {len(trained)} transformers-only tensors hold trained "
                          f"values (e.g. {first} {trained[first]}), which only transformers' graph computes")
            else:
                reason = "forced (--graph transformers)"
                warning = (f"--graph transformers deploys transformers' DEIMv2, which computes something else than "
                           f"the official DEIMv2 for {where} (docs/transformers.md): the detections will differ "
                           "from the official model's")
    if graph == "transformers":
        prep, prep_reason = _preprocessing(path if path.is_dir() else None, loaded.variant)
        state, config = read_checkpoint(path)
        hf_config = dict(config) if config else _config_for(loaded)
        deploy: nn.Module = TransformersDeployGraph(build_transformers_model(state, hf_config, loaded.variant),
                                                    top_k).eval()
        overrides.update(prep)
        overrides["build"] = {"graph": "transformers", "graph_reason": f"{reason}; input {prep_reason}",
                              "reference": f"transformers {transformers_version()} Deimv2ForObjectDetection "
                                           "(CPU, FP32)"}
        return GraphChoice("transformers", reason, loaded.variant, deploy, overrides, warning)
    deploy = DeployGraph(model.eval().deploy(), top_k).eval()
    overrides["build"] = {"graph": "official", "graph_reason": reason}
    return GraphChoice("official", reason, loaded.variant, deploy, overrides, warning)


def _config_for(loaded: Any) -> dict[str, Any]:
    """A transformers config for a checkpoint without config.json: the converter's settings of its size."""
    from deimv2_deploy.models.hf_format import transformers_config

    names = loaded.class_names
    if names is None and loaded.num_classes != 80:
        names = tuple(f"class_{i}" for i in range(loaded.num_classes))
    return transformers_config(loaded.variant, names, official_behaviour=False)
