"""PyTorch backend: the reference model in deploy mode (checkpoints, or a model already in memory).

CPU or CUDA; on CUDA, FP16 through autocast and optional CUDA graphs (one captured graph per input shape),
so `deimv2-bench` can compare GPU tiers wherever a GPU exists.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.runtimes.base import Backend, BackendUnavailableError, Runtime
from deimv2_deploy.spec import EXPORTER, ArtifactSpec

__all__ = ["TorchRuntime"]


def _import_torch():
    try:
        import torch
    except ImportError as e:
        raise BackendUnavailableError("the torch backend needs PyTorch: pip install 'deimv2-deploy[export]' "
                                      "(exported ONNX/OpenVINO/TensorRT models run without it)") from e
    return torch


class TorchRuntime(Runtime):
    backend = Backend.TORCH

    def __init__(self, path: str | os.PathLike | None = None, device: str = "cpu", variant: str | None = None,
                 precision: str = "fp32", threads: int | None = None, cuda_graphs: bool = False,
                 graph: Any = None, spec: ArtifactSpec | None = None) -> None:
        """Load a checkpoint (`path`), or wrap a DeployGraph already in memory (`graph` + `spec`)."""
        torch = _import_torch()
        from deimv2_deploy.models.graph import DeployGraph

        if threads:
            torch.set_num_threads(int(threads))
        self.threads = threads
        if graph is None:
            if path is None:
                raise ValueError("TorchRuntime needs a checkpoint path, or graph= and spec=")
            from deimv2_deploy.models.checkpoint import checkpoint_format

            if checkpoint_format(path) == "transformers":  # official or transformers' graph, as the export picks
                from deimv2_deploy.models.hf_graph import load_deploy_graph

                choice = load_deploy_graph(path, variant)
                graph = choice.graph
                spec = ArtifactSpec.for_variant(choice.variant, weights=Path(path).name,
                                                exporter=f"{EXPORTER} (PyTorch eager)", **choice.spec_overrides)
            else:
                from deimv2_deploy.models.reference import load_reference

                ref = load_reference(variant or _variant_of(path), checkpoint=path)
                graph = DeployGraph(ref.model)
                spec = ArtifactSpec.for_variant(model_variant(ref.model, variant, path), weights=ref.weights,
                                                exporter=f"{EXPORTER} (PyTorch eager)", **ref.classes.spec_fields())
        elif spec is None:
            raise ValueError("graph= needs spec= (the variant's ArtifactSpec)")
        else:
            from deimv2_deploy.models.reference import model_num_classes

            k = model_num_classes(graph)
            if k is not None and k != len(spec.class_names):
                raise ValueError(f"the graph predicts {k} classes but spec names {len(spec.class_names)} "
                                 f"({', '.join(spec.class_names[:3])}, ...): give one class name per class")
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"torch backend precision must be fp32 or fp16, got {precision!r}")
        device = str(device).lower()
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise BackendUnavailableError(f"device {device!r} requested but PyTorch sees no CUDA GPU here "
                                              "(CPU-only build or no driver); use device='cpu'")
        elif device != "cpu":
            raise ValueError(f"torch device must be 'cpu' or 'cuda[:N]', got {device!r}")
        if precision == "fp16" and device == "cpu":
            raise ValueError("fp16 on the torch backend needs a CUDA device (CPU half kernels are slower than fp32)")
        if cuda_graphs and not device.startswith("cuda"):
            raise ValueError("cuda_graphs=True needs a CUDA device")
        super().__init__(spec.with_(precision=precision), device)
        self.torch = torch
        self.graph = graph.eval().to(device)
        self.precision = precision
        self.cuda_graphs = cuda_graphs
        self._captured: dict[tuple, tuple] = {}  # input shapes -> (cuda graph, static inputs, static outputs)

    @classmethod
    def for_variant(cls, variant: str, checkpoint: str | os.PathLike | None = None, random_weights: bool = False,
                    store: str | os.PathLike | None = None, **options: Any) -> TorchRuntime:
        """The reference of `variant` from a checkpoint, the model store, or deterministic random weights."""
        from deimv2_deploy.models.graph import DeployGraph
        from deimv2_deploy.models.reference import load_reference

        ref = load_reference(variant, checkpoint, random_weights, store)
        spec = ArtifactSpec.for_variant(variant, weights=ref.weights, random_weights=random_weights,
                                        exporter=f"{EXPORTER} (PyTorch eager)", **ref.classes.spec_fields())
        return cls(graph=DeployGraph(ref.model), spec=spec, **options)

    @classmethod
    def import_library(cls):
        return _import_torch()

    def inference_precision(self) -> str | None:
        """PyTorch eager runs the float32 module as it is (f32); fp16 is CUDA autocast (mixed, mostly f16)."""
        return "f16" if self.precision == "fp16" else "f32"

    def describe(self) -> dict[str, Any]:
        extra = {"threads": self.threads or self.torch.get_num_threads(), "cuda_graphs": self.cuda_graphs}
        if self.device.startswith("cuda"):
            extra["gpu"] = self.torch.cuda.get_device_name(self.device)
        return {**super().describe(), **extra}

    def _run(self, images, sizes):
        torch = self.torch
        if self.precision == "fp16":
            with torch.autocast("cuda", dtype=torch.float16):
                return self.graph(images, sizes)
        return self.graph(images, sizes)

    def _infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            images = torch.from_numpy(inputs["images"]).to(self.device, non_blocking=True)
            sizes = torch.from_numpy(inputs["orig_target_sizes"]).to(self.device, non_blocking=True)
            if self.cuda_graphs:
                outputs = self._replay(images, sizes)
            else:
                outputs = self._run(images, sizes)
            labels, boxes, scores = (t.detach() for t in outputs)
            if self.device.startswith("cuda"):
                torch.cuda.synchronize(self.device)
            # .cpu() copies device tensors; .clone() for CPU so results never alias a reused buffer
            return {"labels": labels.to("cpu", torch.int64).clone().numpy(),
                    "boxes": boxes.float().cpu().clone().numpy(),
                    "scores": scores.float().cpu().clone().numpy()}

    def _replay(self, images, sizes):
        """CUDA graphs: capture once per input shape (after warm-up on a side stream), then replay."""
        torch = self.torch
        key = (tuple(images.shape), tuple(sizes.shape))
        if key not in self._captured:
            static_images, static_sizes = images.clone(), sizes.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._run(static_images, static_sizes)
            torch.cuda.current_stream().wait_stream(stream)
            cuda_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cuda_graph):
                static_outputs = self._run(static_images, static_sizes)
            self._captured[key] = (cuda_graph, static_images, static_sizes, static_outputs)
        cuda_graph, static_images, static_sizes, static_outputs = self._captured[key]
        static_images.copy_(images)
        static_sizes.copy_(sizes)
        cuda_graph.replay()
        return tuple(t.clone() for t in static_outputs)  # never hand out the graph's own buffers


def _variant_of(path: str | os.PathLike) -> str:
    """The size a checkpoint holds (from its Hugging Face config or its shapes)."""
    from deimv2_deploy.models.checkpoint import detect_variant, read_checkpoint

    variant = detect_variant(*read_checkpoint(path))
    if variant is None:
        raise ValueError(f"cannot tell which DEIMv2 size {Path(path).name} is: pass variant=")
    return variant


def model_variant(model: Any, variant: str | None, path: Any) -> str:
    return variant or getattr(model, "variant", None) or _variant_of(path)
