"""Does transformers' EoMT-DINOv3 compute what the official EoMT code computes? (issue 21)

Runs the official `models/eomt.py` + `models/vit.py` from a checkout the user gives (never vendored) on tiny DINOv3
backbones with deterministic weights, converts the official state dict to transformers' names with our own mapping,
loads it into `EomtDinov3ForUniversalSegmentation` (every key accounted for), and compares `class_queries_logits` and
`masks_queries_logits` (last block, and every intermediate block both compute) at eval for several masked-attention
patterns and configs. Our ONNX export (`deimv2_deploy.exporters.vit_export`, run by ONNX Runtime) of the converted
folder is compared with the official outputs too: official -> transformers -> our ONNX, end to end.

    git -C /work/.mirror/tue-mps+eomt/repo archive HEAD | tar -x -C /tmp/eomt_official     # any official checkout
    # the official code pins transformers 4.56.1 (requirements.txt); 5.x moved DINOv3ViTModel's layers (see below):
    .venv/bin/pip install --no-deps --target /tmp/eomt_site transformers==4.56.1 'huggingface-hub>=0.34,<1.0' \\
        'tokenizers>=0.22,<0.23' [timm==1.0.15]
    .venv/bin/python benchmarks/eomt_official_vs_transformers.py --official /tmp/eomt_official \\
        --official-site /tmp/eomt_site --json benchmarks/results/eomt_official_vs_transformers.json \\
        --markdown benchmarks/results/eomt_official_vs_transformers.md

The official model runs in a child process (this file with `--worker`) whose `sys.path` starts with
`--official-site`, so it gets the transformers it pins while this process uses ours (5.24): two transformers cannot
share one process. Without `--official-site` the child uses the installed transformers; with 5.x the official
`ViT.transformers_to_timm` fails (`backbone.layer`: 5.x keeps the layers at `backbone.model.layer`) and the script
says so. The official code imports `timm`: when the real timm does not import (timm needs torchvision, which cannot
be installed beside our torch), the child registers a minimal `timm` module of its own providing `LayerNorm2d`
(layer norm over the channel axis of NCHW, per-channel weight and bias, eps 1e-6), and the report says which one ran.

Inputs: the official forward takes images on [0, 1] and normalises them itself (ImageNet mean/std); transformers
and our ONNX take normalised pixels, computed here with the same torch expression, so all three see the same
numbers. Equal means max |diff| <= 1e-4 + 1e-4 * max |official| (our exporter's FP32 bound) for each output.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ATOL, RTOL = 1e-4, 1e-4
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what the official ViT registers as pixel_mean / pixel_std
IMAGENET_STD = (0.229, 0.224, 0.225)
BATCH = 2

# Tiny backbones: DINOv3ViTConfig fields + the EoMT head (queries, classes, masked blocks) + the square input side.
CONFIGS: dict[str, dict[str, Any]] = {
    "p16_reg2": dict(backbone=dict(patch_size=16, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                   num_hidden_layers=4, num_register_tokens=2),
                     image=64, queries=5, classes=3, blocks=2),
    "p16_noreg_deep": dict(backbone=dict(patch_size=16, hidden_size=48, num_attention_heads=4, intermediate_size=96,
                                         num_hidden_layers=6, num_register_tokens=0, key_bias=True),
                           image=48, queries=4, classes=3, blocks=3),
    "p8_gated_reg4": dict(backbone=dict(patch_size=8, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                                        num_hidden_layers=3, num_register_tokens=4, use_gated_mlp=True),
                          image=32, queries=6, classes=4, blocks=2),
    # a gated MLP with SiLU (the SwiGLU kind of DINOv3 backbone): the official EoMT head always uses GELU
    "p8_gated_silu": dict(backbone=dict(patch_size=8, hidden_size=32, num_attention_heads=2, intermediate_size=48,
                                        num_hidden_layers=3, num_register_tokens=4, use_gated_mlp=True,
                                        hidden_act="silu"),
                          image=32, queries=6, classes=4, blocks=2),
}
# (config, case name, attn_mask_probs, official masked_attn_enabled)
CASES: list[tuple[str, str, tuple[float, ...], bool]] = [
    ("p16_reg2", "on", (1, 1), True),
    ("p16_reg2", "off", (0, 0), True),
    ("p16_reg2", "1-then-0", (1, 0), True),
    ("p16_reg2", "0-then-1", (0, 1), True),
    ("p16_reg2", "masked_attn_enabled=False", (0, 0), False),
    ("p16_noreg_deep", "on", (1, 1, 1), True),
    ("p16_noreg_deep", "off", (0, 0, 0), True),
    ("p16_noreg_deep", "1-then-0-0", (1, 0, 0), True),
    ("p16_noreg_deep", "1-1-then-0", (1, 1, 0), True),
    ("p16_noreg_deep", "0-then-1-1", (0, 1, 1), True),
    ("p8_gated_reg4", "on", (1, 1), True),
    ("p8_gated_reg4", "off", (0, 0), True),
    ("p8_gated_reg4", "1-then-0", (1, 0), True),
    ("p8_gated_silu", "on", (1, 1), True),
    ("p8_gated_silu", "off", (0, 0), True),
]
EAGER_PROBE = ("p16_reg2", "on")  # the official backbone switched to eager attention (not its default), once


def zero_after_nonzero(probs: tuple[float, ...]) -> bool:
    """A block with probability 0 after one with probability > 0 (where transformers reuses the earlier mask)."""
    return any(p == 0 and any(q > 0 for q in probs[:i]) for i, p in enumerate(probs))


# ---------------------------------------------------------------------------------------------------------------
# deterministic weights (by parameter name and shape; same values whatever process or library version makes them)


def deterministic_tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "lambda1":  # layer scale
        return (0.5 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) == 1 and "norm" in name and leaf == "weight":
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32)
    if leaf == "bias":
        return (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if len(shape) >= 2 and leaf == "weight":  # linear / conv / query embedding: unit-variance outputs
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return rng.standard_normal(shape).astype(np.float32)  # tokens, query embedding


def fill_module(module: Any, names: list[str] | None = None) -> None:
    import torch

    state = module.state_dict()
    with torch.no_grad():
        for name, tensor in state.items():
            if (names is None or name in names) and tensor.is_floating_point():
                tensor.copy_(torch.from_numpy(deterministic_tensor(name, tuple(tensor.shape))))


def raw_images(config_name: str, side: int) -> np.ndarray:
    """(BATCH, 3, side, side) float32 on [0, 1], 8-bit levels, as the official forward takes them."""
    rng = np.random.default_rng(zlib.crc32(config_name.encode()) + 7)
    return (rng.integers(0, 256, size=(BATCH, 3, side, side)).astype(np.float32) / 255.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# the official side (child process)


def _timm_for_official() -> str:
    """Make `import timm` / `from timm.layers import LayerNorm2d` work for the official code; says which timm."""
    import importlib
    import importlib.machinery
    import types

    try:
        timm = importlib.import_module("timm")
        importlib.import_module("timm.layers").LayerNorm2d  # noqa: B018 - the one thing used on the DINOv3 path
        return f"real timm {timm.__version__}"
    except Exception as e:  # noqa: BLE001 - any failure: use our own stand-in
        reason = f"{type(e).__name__}: {e}"
        for name in [n for n in sys.modules if n == "timm" or n.startswith("timm.")]:
            del sys.modules[name]
    import torch
    import torch.nn.functional as F

    class LayerNorm2d(torch.nn.LayerNorm):
        """Layer norm over the channel axis of an (N, C, H, W) tensor: each pixel's C values are normalised
        (biased variance, eps 1e-6), then scaled and shifted by the per-channel weight and bias."""

        def __init__(self, num_channels: int, eps: float = 1e-6, affine: bool = True) -> None:
            super().__init__(num_channels, eps=eps, elementwise_affine=affine)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)

    def create_model(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("timm stand-in: create_model is not available (only transformers backbones are measured)")

    shim = types.ModuleType("timm")
    layers = types.ModuleType("timm.layers")
    shim.__spec__ = importlib.machinery.ModuleSpec("timm", None, is_package=True)
    layers.__spec__ = importlib.machinery.ModuleSpec("timm.layers", None)
    layers.LayerNorm2d = LayerNorm2d
    shim.layers = layers
    shim.create_model = create_model
    shim.__version__ = "stand-in (deimv2-deploy benchmark)"
    sys.modules["timm"], sys.modules["timm.layers"] = shim, layers
    return f"stand-in timm module with an own LayerNorm2d (real timm did not import: {reason})"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class OfficialRunner:
    """One official EoMT, run case by case; records the blocked share of query->patch attention per masked block
    (an instance attribute wraps `_attn_mask`: the class is untouched) and can emulate transformers' reuse of the
    previous block's mask for probability-0 blocks (the control that names the cause of that difference)."""

    def __init__(self, model: Any, images: Any) -> None:
        self.model, self.images = model, images
        self.outputs: dict[str, np.ndarray] = {}
        self.blocked: list[float] = []
        self.reuse_mask = False
        self.last_mask = None
        self.original_attn_mask = model._attn_mask
        model._attn_mask = self.attn_mask

    def attn_mask(self, x: Any, mask_logits: Any, i: int) -> Any:
        m = self.model
        prob = float(m.attn_mask_probs[i - len(m.encoder.backbone.blocks) + m.num_blocks])
        if self.reuse_mask and prob == 0 and self.last_mask is not None:
            mask = self.last_mask
        else:
            mask = self.original_attn_mask(x, mask_logits, i)
        self.last_mask = mask
        start = m.num_q + m.encoder.backbone.num_prefix_tokens
        self.blocked.append(float((~mask[:, : m.num_q, start:]).float().mean()))
        return mask

    def run(self, tag: str, probs: list[float], enabled: bool, reuse_mask: bool = False) -> list[float]:
        import torch

        m = self.model
        m.attn_mask_probs.copy_(torch.tensor(probs, dtype=m.attn_mask_probs.dtype))
        m.masked_attn_enabled = enabled
        self.blocked, self.reuse_mask, self.last_mask = [], reuse_mask, None
        torch.manual_seed(0)
        with torch.no_grad():
            masks, classes = m(self.images)
        for i, (mask, cls) in enumerate(zip(masks, classes, strict=True)):
            self.outputs[f"{tag}|mask|{i}"] = mask.numpy()
            self.outputs[f"{tag}|class|{i}"] = cls.numpy()
        return self.blocked


def run_official(job_path: Path) -> None:
    """Child process: build the official EoMT for every config, run every case, save state dicts and outputs."""
    job = json.loads(job_path.read_text())
    out = Path(job["out"])
    official = Path(job["official"]).resolve()
    import torch
    import transformers  # before the timm stand-in, so transformers' own look for timm sees the real state

    timm_used = _timm_for_official()
    from safetensors.torch import save_file
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.set_num_threads(1)
    sys.path.insert(0, str(official))
    from models.eomt import EoMT
    from models.vit import ViT

    info: dict[str, Any] = {"transformers": transformers.__version__, "torch": torch.__version__, "timm": timm_used,
                            "configs": {}, "files": {f: _file_digest(official / f) for f in
                                                     ("models/eomt.py", "models/vit.py", "models/scale_block.py")}}
    for name, cfg in job["configs"].items():
        folder = out / name / "dinov3_backbone"
        backbone = DINOv3ViTModel(DINOv3ViTConfig(image_size=cfg["image"], **cfg["backbone"]))
        fill_module(backbone)
        backbone.save_pretrained(folder)  # the folder the official ViT loads with AutoModel.from_pretrained
        side = cfg["image"]
        try:
            encoder = ViT((side, side), patch_size=cfg["backbone"]["patch_size"], backbone_name=str(folder))
        except AttributeError as e:
            raise SystemExit(f"the official ViT cannot wrap transformers {transformers.__version__}'s DINOv3ViTModel "
                             f"({e}): run it with the transformers it pins (4.56.1) through --official-site") from None
        model = EoMT(encoder, num_classes=cfg["classes"], num_q=cfg["queries"], num_blocks=cfg["blocks"]).eval()
        backbone_keys = {f"encoder.backbone.{k}" for k in encoder.backbone.state_dict()}
        fill_module(model, [k for k in model.state_dict() if k not in backbone_keys
                            and not k.startswith("encoder.pixel_") and k != "attn_mask_probs"])  # the head
        runner = OfficialRunner(model, torch.from_numpy(np.load(out / name / "images.npy")))
        cases: dict[str, Any] = {}
        for cfg_name, case, probs, enabled in job["cases"]:
            if cfg_name != name:
                continue
            record: dict[str, Any] = {"blocked_fraction": runner.run(case, probs, enabled)}
            if zero_after_nonzero(tuple(probs)):
                record["reuse_control_blocked_fraction"] = runner.run(f"{case}|reuse", probs, enabled, True)
            if (cfg_name, case) == EAGER_PROBE:
                config = model.encoder.backbone.config
                default = config._attn_implementation
                config._attn_implementation = "eager"
                try:
                    record["eager_probe_blocked_fraction"] = runner.run(f"{case}|eager", probs, enabled)
                finally:
                    config._attn_implementation = default
            cases[case] = record
        model.attn_mask_probs.fill_(1.0)
        model.masked_attn_enabled = True
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / name / "official.safetensors"))
        np.savez(out / name / "official_outputs.npz", **runner.outputs)
        info["configs"][name] = {
            "cases": cases,
            "attn_implementation": model.encoder.backbone.config._attn_implementation,
            "grid_size": list(model.encoder.backbone.patch_embed.grid_size),
            "num_prefix_tokens": int(model.encoder.backbone.num_prefix_tokens),
            "num_upscale": len(model.upscale),
            "pixel_mean": model.encoder.pixel_mean.flatten().tolist(),
            "pixel_std": model.encoder.pixel_std.flatten().tolist(),
            "backbone_config": json.loads((folder / "config.json").read_text()),
        }
    (out / "official_info.json").write_text(json.dumps(info, indent=1))


# ---------------------------------------------------------------------------------------------------------------
# official names -> transformers names (our mapping, from reading both models)


def transformers_name(key: str) -> str | None:
    """The transformers EomtDinov3ForUniversalSegmentation name of an official EoMT state-dict key; None for the
    normalisation constants (transformers takes normalised pixels); KeyError for a key we do not know."""
    if key in ("encoder.pixel_mean", "encoder.pixel_std"):
        return None
    if key == "attn_mask_probs":
        return key
    if key.startswith("encoder.backbone."):
        part, _, rest = key[len("encoder.backbone."):].partition(".")
        new = {"patch_embed": "embeddings", "blocks": "layers", "norm": "layernorm"}.get(part)
        if new is None or not rest:
            raise KeyError(f"official backbone key {key} has no transformers counterpart in our mapping")
        return f"{new}.{rest}"  # inside a block the names are transformers' own (the backbone is a DINOv3ViTModel)
    part, _, rest = key.partition(".")
    if part == "q":
        return f"query.{rest}"
    if part == "class_head":
        return f"class_predictor.{rest}"
    if part == "mask_head":  # nn.Sequential(Linear, GELU, Linear, GELU, Linear): Linears at 0, 2, 4
        index, _, leaf = rest.partition(".")
        return f"mask_head.fc{int(index) // 2 + 1}.{leaf}"
    if part == "upscale":  # ScaleBlock i: conv1, (act), conv2, norm
        index, sub, leaf = rest.split(".", 2)
        return f"upscale_block.block.{index}.{'layernorm2d' if sub == 'norm' else sub}.{leaf}"
    raise KeyError(f"official key {key} has no transformers counterpart in our mapping")


def transformers_config(info: dict[str, Any], state: dict[str, Any], side: int) -> Any:
    from transformers import EomtDinov3Config

    bb = info["backbone_config"]
    return EomtDinov3Config(
        hidden_size=bb["hidden_size"], num_hidden_layers=bb["num_hidden_layers"],
        num_attention_heads=bb["num_attention_heads"], intermediate_size=bb["intermediate_size"],
        hidden_act=bb["hidden_act"], layer_norm_eps=bb["layer_norm_eps"], image_size=side,
        patch_size=bb["patch_size"], num_channels=bb.get("num_channels", 3),
        layerscale_value=bb.get("layerscale_value", 1.0), num_register_tokens=bb["num_register_tokens"],
        query_bias=bb["query_bias"], key_bias=bb["key_bias"], value_bias=bb["value_bias"],
        proj_bias=bb["proj_bias"], mlp_bias=bb["mlp_bias"], use_gated_mlp=bb["use_gated_mlp"],
        rope_parameters={"rope_type": "default", "rope_theta": float(bb["rope_theta"])},
        num_queries=int(state["q.weight"].shape[0]), num_labels=int(state["class_head.weight"].shape[0]) - 1,
        num_blocks=int(state["attn_mask_probs"].numel()), num_upscale_blocks=int(info["num_upscale"]))


def build_transformers(info: dict[str, Any], official_state: dict[str, Any], side: int) -> tuple[Any, dict[str, Any]]:
    """(EomtDinov3ForUniversalSegmentation with the converted weights, what the conversion did)."""
    import torch
    from transformers import EomtDinov3ForUniversalSegmentation

    config = transformers_config(info, official_state, side)
    converted, dropped = {}, {}
    for key, value in official_state.items():
        new = transformers_name(key)
        if new is None:
            dropped[key] = value.flatten().tolist()
        else:
            converted[new] = value
    supplied = {}
    model = EomtDinov3ForUniversalSegmentation(config)
    if "criterion.empty_weight" in model.state_dict():  # transformers' loss buffer; the official loss lives elsewhere
        weight = torch.ones(config.num_labels + 1)
        weight[-1] = config.no_object_weight
        converted["criterion.empty_weight"] = weight
        supplied["criterion.empty_weight"] = weight.tolist()
    missing, unexpected = model.load_state_dict(converted, strict=False)
    report = {"official_keys": len(official_state), "mapped": len(converted) - len(supplied),
              "dropped": {k: f"normalisation constant {v} (transformers takes normalised pixels)"
                          for k, v in dropped.items()},
              "supplied": {k: f"{v}: transformers' loss buffer (no_object_weight), unused at inference"
                           for k, v in supplied.items()},
              "missing": list(missing), "unexpected": list(unexpected)}
    if missing or unexpected:
        raise SystemExit(f"converted weights do not fit EomtDinov3ForUniversalSegmentation: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.eval(), report


# ---------------------------------------------------------------------------------------------------------------
# comparison


def compare(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
    if got.shape != want.shape:
        return {"ok": False, "shape": list(got.shape), "expected_shape": list(want.shape)}
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    scale = float(np.max(np.abs(want)))
    return {"max_abs_diff": diff, "max_abs_ref": scale, "ok": diff <= ATOL + RTOL * scale}


def compare_pair(cls: np.ndarray, mask: np.ndarray, ref_cls: np.ndarray, ref_mask: np.ndarray) -> dict[str, Any]:
    """Both outputs, plus what a difference would change downstream: mask pixels whose sign (logit > 0) flips, and
    queries whose arg-max class changes."""
    out = {"class_queries_logits": compare(cls, ref_cls), "masks_queries_logits": compare(mask, ref_mask)}
    if mask.shape == ref_mask.shape and cls.shape == ref_cls.shape:
        out["mask_sign_flips"] = float(np.mean((mask > 0) != (ref_mask > 0)))
        out["argmax_class_changes"] = float(np.mean(cls.argmax(-1) != ref_cls.argmax(-1)))
    out["ok"] = out["class_queries_logits"]["ok"] and out["masks_queries_logits"]["ok"]
    return out


def run_transformers(model: Any, pixels: Any, probs: tuple[float, ...], impl: str) -> tuple[Any, list[Any]]:
    """Final (class, mask) logits and every `predict` call in block order (instance wrapper, class untouched)."""
    import torch

    model.attn_mask_probs.copy_(torch.tensor(probs, dtype=model.attn_mask_probs.dtype))
    model.set_attn_implementation(impl)
    calls: list[tuple[np.ndarray, np.ndarray]] = []
    original = type(model).predict

    def recorded(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask, cls = original(model, hidden)
        calls.append((cls.numpy().copy(), mask.numpy().copy()))
        return mask, cls

    model.predict = recorded
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model(pixel_values=pixels)
    finally:
        del model.predict
    return (out.class_queries_logits.numpy(), out.masks_queries_logits.numpy()), calls


def gelu_head(model: Any) -> list[tuple[Any, str, Any]]:
    """Control for hidden_act != gelu: the EoMT head's activations set to GELU as the official code has them;
    returns what to restore."""
    import torch

    saved = [(model.mask_head, "activation", model.mask_head.activation)]
    saved += [(layer, "activation", layer.activation) for layer in model.upscale_block.block]
    for module, attr, _ in saved:
        setattr(module, attr, torch.nn.GELU())
    return saved


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from deimv2_deploy.benchmarks.sysinfo import cpu_info
    from deimv2_deploy.exporters.vit_export import export_vit

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    configs = {k: v for k, v in CONFIGS.items() if not args.configs or k in args.configs}
    cases = [c for c in CASES if c[0] in configs]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eomt-official-") as tmp:
        work = Path(tmp)
        for name, cfg in configs.items():
            (work / name).mkdir()
            np.save(work / name / "images.npy", raw_images(name, cfg["image"]))
        job = {"official": str(Path(args.official).resolve()), "out": str(work), "configs": configs,
               "cases": [[c, n, list(p), e] for c, n, p, e in cases]}
        (work / "job.json").write_text(json.dumps(job))
        env = dict(os.environ)
        if args.official_site:
            env["PYTHONPATH"] = os.pathsep.join([str(Path(args.official_site).resolve()),
                                                 *filter(None, [env.get("PYTHONPATH")])])
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(work / "job.json")],
                               env=env, cwd=str(work), capture_output=True, text=True)
        if child.returncode:
            tail = "\n".join((child.stderr or child.stdout).strip().splitlines()[-12:])
            raise SystemExit(f"the official model failed to run (exit {child.returncode}):\n{tail}")
        info = json.loads((work / "official_info.json").read_text())
        results: list[dict[str, Any]] = []
        conversions: dict[str, Any] = {}
        mean = torch.tensor(IMAGENET_MEAN).reshape(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD).reshape(1, -1, 1, 1)
        for name, cfg in configs.items():
            oinfo = info["configs"][name]
            if (oinfo["pixel_mean"], oinfo["pixel_std"]) != (list(map(float, mean.flatten().tolist())),
                                                              list(map(float, std.flatten().tolist()))):
                raise SystemExit(f"official pixel_mean/std {oinfo['pixel_mean']} / {oinfo['pixel_std']} are not the "
                                 "ImageNet values transformers' inputs are normalised with")
            official_state = load_file(str(work / name / "official.safetensors"))
            official_out = dict(np.load(work / name / "official_outputs.npz"))
            model, conversion = build_transformers(oinfo, official_state, cfg["image"])
            conversions[name] = conversion
            raw = torch.from_numpy(np.load(work / name / "images.npy"))
            pixels = (raw - mean) / std  # the official forward's own first line, here outside the model
            for cfg_name, case, probs, enabled in cases:
                if cfg_name != name:
                    continue
                print(f"[{time.perf_counter() - started:5.1f}s] {name} {case}", file=sys.stderr, flush=True)
                n_official = cfg["blocks"] + 1 if enabled else 1
                ref = [(official_out[f"{case}|class|{i}"], official_out[f"{case}|mask|{i}"]) for i in range(n_official)]
                row: dict[str, Any] = {"config": name, "case": case, "attn_mask_probs": list(probs),
                                       "official_masked_attn_enabled": enabled,
                                       "official_blocked_fraction": oinfo["cases"][case]["blocked_fraction"]}
                for impl in ("eager", "sdpa"):
                    final, calls = run_transformers(model, pixels, probs, impl)
                    row[f"transformers_{impl}"] = compare_pair(*final, *ref[-1])
                    if impl == "eager":  # per block: the blocks both compute (transformers skips probability 0)
                        computed = [i for i, p in enumerate(probs) if p > 0] if enabled else []
                        per_block = []
                        for (cls, mask), block in zip(calls[:-1], computed, strict=True):
                            per_block.append({"block": block, **compare_pair(cls, mask, *ref[block])})
                        row["per_block"] = per_block
                        row["blocks_only_official"] = [i for i in range(cfg["blocks"]) if enabled and i not in computed]
                if f"{case}|reuse|class|0" in official_out:  # official with transformers' mask reuse emulated
                    reused = [(official_out[f"{case}|reuse|class|{i}"], official_out[f"{case}|reuse|mask|{i}"])
                             for i in range(n_official)]
                    final, _ = run_transformers(model, pixels, probs, "eager")
                    row["control_official_reusing_mask"] = compare_pair(*final, *reused[-1])
                if f"{case}|eager|class|0" in official_out:
                    probe = [(official_out[f"{case}|eager|class|{i}"], official_out[f"{case}|eager|mask|{i}"])
                             for i in range(n_official)]
                    row["probe_official_eager_vs_official_sdpa"] = compare_pair(*probe[-1], *ref[-1])
                if cfg["backbone"].get("hidden_act", "gelu") != "gelu":
                    saved = gelu_head(model)
                    try:
                        final, _ = run_transformers(model, pixels, probs, "eager")
                    finally:
                        for module, attr, value in saved:
                            setattr(module, attr, value)
                    row["control_transformers_head_gelu"] = compare_pair(*final, *ref[-1])
                if not args.no_onnx:
                    row["onnx"] = onnx_vs_official(model, probs, work / name / case.replace("=", "_"), pixels,
                                                   ref[-1], export_vit)
                row["equal"] = all(row[k]["ok"] for k in ("transformers_eager", "transformers_sdpa"))
                results.append(row)
        env_info = {
            "python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_info(),
            "torch": torch.__version__, "torch_threads": 1, "numpy": np.__version__,
            "transformers": _version("transformers"), "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
            "official_side": {k: info[k] for k in ("transformers", "torch", "timm", "files")},
            "official_checkout": {"path": str(Path(args.official).resolve()), "git": _git_head(Path(args.official)),
                                  "label": args.official_label},
            "official_backbone_attention": sorted({c["attn_implementation"] for c in info["configs"].values()}),
        }
        return {"tolerance": {"atol": ATOL, "rtol": RTOL, "bound": "max|diff| <= atol + rtol * max|official|"},
                "batch": BATCH, "environment": env_info, "configs": {
                    k: {**v, "official_num_upscale": info["configs"][k]["num_upscale"],
                        "official_grid_size": info["configs"][k]["grid_size"],
                        "conversion": conversions[k]} for k, v in configs.items()},
                "cases": results, "harness": harness_notes(info, bool(args.official_site)),
                "seconds": round(time.perf_counter() - started, 1)}


def onnx_vs_official(model: Any, probs: tuple[float, ...], folder: Path, pixels: Any, ref: tuple[np.ndarray, ...],
                     export_vit: Any) -> dict[str, Any]:
    """save_pretrained (with these probabilities) -> our export (load_vit_model, trace, parity) -> ONNX Runtime."""
    import onnxruntime as ort
    import torch

    model.attn_mask_probs.copy_(torch.tensor(probs, dtype=model.attn_mask_probs.dtype))
    model.set_attn_implementation("eager")
    model.save_pretrained(folder / "hf")
    result = export_vit("eomt", folder / "hf", output_dir=folder / "store", quiet=True)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    cls, mask = session.run(["class_queries_logits", "masks_queries_logits"], {"pixel_values": pixels.numpy()})
    out = compare_pair(cls, mask, *ref)
    out["export_parity_vs_transformers"] = result.parity["max_abs_diff"]
    return out


def _version(name: str) -> str:
    try:
        return str(__import__(name).__version__)
    except Exception:  # noqa: BLE001
        return "not installed"


def _git_head(path: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout (files identified by sha256 prefix below)"


# ---------------------------------------------------------------------------------------------------------------
# report


def harness_notes(info: dict[str, Any], site: bool) -> list[str]:
    """What this script supplies around the two models (nothing of either model's code is changed)."""
    return [
        f"official side runs in a child process with transformers {info['transformers']}"
        + (" from --official-site (the version its requirements.txt pins; its ViT.transformers_to_timm reads "
           "`backbone.layer`, which transformers 5.x moved to `backbone.model.layer`)" if site else ""),
        f"timm for the official code: {info['timm']}",
        "the official backbone folder (config.json + model.safetensors) is written by that transformers' "
        "DINOv3ViTModel.save_pretrained with deterministic weights; the official ViT loads it with "
        "AutoModel.from_pretrained as it does a hub backbone; the EoMT head gets deterministic weights too",
        "official -> transformers names: our own mapping (transformers_name in this script); the normalisation "
        "constants encoder.pixel_mean/std are dropped (checked equal to ImageNet's, which the transformers and ONNX "
        "inputs are normalised with, by the official forward's own expression); transformers' loss buffer "
        "criterion.empty_weight is supplied from the config (unused at inference); loaded with every key accounted "
        "for (missing and unexpected keys reported, none allowed)",
        "instrumentation by instance attributes only: the official model's _attn_mask is wrapped to record the "
        "blocked share of query->patch attention (and, as a control, to reuse the previous block's mask for "
        "probability-0 blocks, as transformers does); transformers' predict is wrapped to collect per-block outputs",
        "controls: transformers' EoMT head activations swapped for nn.GELU (for hidden_act != gelu); a probe runs the "
        "official backbone with eager attention instead of its default",
        "our ONNX leg: the converted model is saved with save_pretrained (probabilities of the case), exported with "
        "deimv2_deploy.exporters.vit_export.export_vit (which loads it with load_vit_model and checks parity against "
        "transformers) and run by ONNX Runtime on the same normalised pixels",
    ]


def findings(result: dict[str, Any]) -> list[str]:
    """The verdict in sentences, each difference with its cause (stated only where this run's control confirms it)."""
    rows = result["cases"]
    equal = [r for r in rows if r["equal"]]
    out = []
    if equal:
        shapes = sorted({tuple(r["attn_mask_probs"]) for r in equal}, key=lambda p: (len(p), p))
        worst = {leg: max(max(r[leg]["class_queries_logits"]["max_abs_diff"],
                              r[leg]["masks_queries_logits"]["max_abs_diff"]) for r in equal if leg in r)
                 for leg in ("transformers_eager", "transformers_sdpa", "onnx") if any(leg in r for r in equal)}
        blocks = max((max(b["class_queries_logits"]["max_abs_diff"], b["masks_queries_logits"]["max_abs_diff"])
                      for r in equal for b in r["per_block"]), default=0.0)
        out.append(f"Equal in {len(equal)} of {len(rows)} cases (masked-attention probabilities "
                   + ", ".join("[" + ",".join(f"{v:g}" for v in p) + "]" for p in shapes)
                   + f"; configs {', '.join(sorted({r['config'] for r in equal}))}): largest max |diff| "
                   "(either output) transformers eager "
                   f"{worst.get('transformers_eager', 0):.1e}, sdpa {worst.get('transformers_sdpa', 0):.1e}, "
                   + (f"our ONNX {worst['onnx']:.1e}, " if "onnx" in worst else "")
                   + f"intermediate blocks {blocks:.1e}.")
    reuse = [r for r in rows if not r["equal"] and zero_after_nonzero(tuple(r["attn_mask_probs"]))]
    if reuse and all(r.get("control_official_reusing_mask", {}).get("ok") for r in reuse):
        out.append(
            "DIFFERS when a masked block has probability 0 after one with probability > 0 ("
            + ", ".join(f"{r['config']} {r['case']}" for r in reuse) + "). Cause: transformers "
            "(modeling_eomt_dinov3.py, EomtDinov3ForUniversalSegmentation.forward) only rebuilds `attention_mask` "
            "for a masked block when `self.training or self.attn_mask_probs[...] > 0`; otherwise the variable keeps "
            "the previous block's mask, which is applied again. The official EoMT.forward (models/eomt.py) rebuilds "
            "it in every masked block, and `_disable_attn_mask` with probability 0 unblocks every query "
            "(`torch.rand(...) > 0`), i.e. full attention. Control: the official model with its `_attn_mask` made to "
            "reuse the previous mask for probability-0 blocks equals transformers (table below). The pattern cannot "
            "come from the official training schedule: every config in the official repository anneals "
            "block i before block i+1 (start/end steps increase with the block index), so probabilities never rise "
            "again after a 0; a finished schedule leaves all at 0 (the `off` rows, equal), and mid-schedule values "
            "strictly between 0 and 1 are random per query in both codes (our exporter refuses them). Only "
            "probabilities a user sets by hand reach this difference. Transformers also skips the intermediate "
            "predictions of probability-0 blocks, which only training uses.")
    act = [r for r in rows if "control_transformers_head_gelu" in r and not r["equal"]]
    if act and all(r["control_transformers_head_gelu"]["ok"] for r in act):
        out.append(
            "DIFFERS when the backbone config's hidden_act is not gelu (" + ", ".join(
                f"{r['config']} {r['case']}" for r in act) + "). Cause: transformers' EoMT head takes the "
            "backbone's activation, `ACT2FN[config.hidden_act]`, in EomtDinov3MaskHead and EomtDinov3ScaleLayer, "
            "while the official head hard-codes `nn.GELU()` (models/eomt.py mask_head, models/scale_block.py "
            "ScaleBlock.act). Control: the same transformers model with those activations set to nn.GELU equals the "
            "official one. Class logits of the last block do not change when no block is masked (the class head is "
            "linear); masks do. Affects only backbone configs whose hidden_act is not gelu; the official "
            "EoMT-DINOv3 checkpoints that transformers' converter lists are built on dinov3-vits16/vitb16/vitl16 "
            "(plain GELU MLPs), the kind measured equal here.")
    probe = [r["probe_official_eager_vs_official_sdpa"] for r in rows if "probe_official_eager_vs_official_sdpa" in r]
    if probe and not probe[0]["ok"]:
        out.append(
            "Probe, official code only: its masked attention relies on the backbone attention being SDPA (what "
            "AutoModel.from_pretrained chooses by default, and what every row above ran). With the backbone switched "
            f"to eager attention the official output moves by {_pair(probe[0])}: the official code passes a boolean "
            "mask straight to transformers' DINOv3ViTAttention, and the eager DINOv3 attention of transformers "
            f"{result['environment']['official_side']['transformers']} multiplies the softmax weights by that mask "
            "(head-mask semantics: blocked weights are zeroed, rows are not renormalised) instead of excluding them "
            "before the softmax (read in the code; not isolated by a "
            "control).")
    others = [r for r in rows if not r["equal"] and r not in reuse and r not in act]
    if others:
        out.append("UNEXPLAINED differences: " + ", ".join(f"{r['config']} {r['case']}" for r in others)
                   + " (no control in this run names their cause).")
    out.append("Not covered: non-square inputs (transformers' EoMT-DINOv3 derives a square patch grid from an integer "
               "image_size; every official config is square), probabilities strictly between 0 and 1 (random per "
               "query in both codes; our exporter refuses them), training mode, trained weights.")
    return out


CHECKS = {
    "control_official_reusing_mask": "official with transformers' mask reuse emulated, vs transformers eager",
    "control_transformers_head_gelu": "transformers with nn.GELU in its EoMT head, vs official",
    "probe_official_eager_vs_official_sdpa": "official with eager backbone attention, vs official (SDPA, default)",
}


def _d(c: dict[str, Any]) -> str:
    if "max_abs_diff" not in c:
        return f"shape {c.get('shape')} != {c.get('expected_shape')}"
    return f"{c['max_abs_diff']:.1e}"


def _pair(c: dict[str, Any]) -> str:
    return f"{_d(c['class_queries_logits'])} / {_d(c['masks_queries_logits'])}"


def to_markdown(result: dict[str, Any], command: str) -> str:
    env = result["environment"]
    cpu = env["cpu"]
    lines = [
        "# transformers' EoMT-DINOv3 against the official EoMT code (issue 21)", "",
        f"Made by `{command}` ({result['seconds']} s). Tiny DINOv3 backbones with deterministic weights (not trained),"
        f" batch {result['batch']}, CPU FP32, eval mode. Each cell is max |diff| of `class_queries_logits` / "
        "`masks_queries_logits` against the official output; equal = within "
        f"{result['tolerance']['atol']:g} + {result['tolerance']['rtol']:g} x max|official| for both.", "",
    ]
    lines += ["## Verdict", ""] + [f"- {f}" for f in result["findings"]] + [""]
    lines += [
        "## Per case", "",
        "`probs`: attn_mask_probs per masked block; `official blocked`: share of query->patch attention pairs the "
        "official mask blocks, per masked block; `per block`: the intermediate predictions both compute "
        "(transformers computes none for probability-0 blocks: `only official`); the verdict's percentages are "
        "mask pixels whose sign (logit > 0) differs and queries whose arg-max class differs, transformers eager "
        "against official.", "",
        "| config | case | probs | official blocked | transformers eager | transformers sdpa | our ONNX (ORT) | "
        "per block (eager) | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["cases"]:
        blocked = ", ".join(f"{b:.2f}" for b in r["official_blocked_fraction"]) or "-"
        blocks = "; ".join(f"{b['block']}: {_pair(b)}" for b in r["per_block"])
        if r["blocks_only_official"]:
            blocks += ("; " if blocks else "") + "only official: " + ",".join(map(str, r["blocks_only_official"]))
        onnx = _pair(r["onnx"]) if "onnx" in r else "-"
        verdict = "equal" if r["equal"] else "**DIFFERS**"
        if not r["equal"] and "mask_sign_flips" in r["transformers_eager"]:
            verdict += (f" ({100 * r['transformers_eager']['mask_sign_flips']:.1f} % mask signs, "
                        f"{100 * r['transformers_eager']['argmax_class_changes']:.0f} % arg-max classes)")
        probs = ",".join(f"{p:g}" for p in r["attn_mask_probs"])
        lines.append(f"| {r['config']} | {r['case']} | {probs} | {blocked} | {_pair(r['transformers_eager'])} | "
                     f"{_pair(r['transformers_sdpa'])} | {onnx} | {blocks or '-'} | {verdict} |")
    controls = [(r, k) for r in result["cases"] for k in r if k.startswith(("control_", "probe_"))]
    if controls:
        lines += ["", "Controls (each should be equal if the named cause is the whole difference) and the probe:", "",
                  "| config | case | what | max |diff| | equal |",
                  "|---|---|---|---|---|"]
        for r, k in controls:
            ok = "yes" if r[k]["ok"] else "no"
            lines.append(f"| {r['config']} | {r['case']} | {CHECKS[k]} | {_pair(r[k])} | {ok} |")
    lines += ["", "## Configs", "", "DINOv3ViTConfig fields (others at their defaults); EoMT queries / classes / "
              "masked blocks; square input side:", ""]
    for name, c in result["configs"].items():
        conv = c["conversion"]
        lines.append(f"- `{name}`: {json.dumps(c['backbone'])}, image {c['image']}, queries {c['queries']}, classes "
                     f"{c['classes']}, blocks {c['blocks']}; official upscale blocks {c['official_num_upscale']}; "
                     f"conversion: {conv['mapped']} of {conv['official_keys']} official keys mapped, dropped "
                     f"{sorted(conv['dropped'])}, supplied {sorted(conv['supplied'])}, missing {conv['missing']}, "
                     f"unexpected {conv['unexpected']}")
    side = env["official_side"]
    lines += [
        "", "## What the harness provides", ""] + [f"- {h}" for h in result["harness"]] + [
        "", "## Environment", "",
        f"- CPU: {cpu.get('model')} ({cpu.get('logical_cores')} logical cores), {env['platform']}, Python "
        f"{env['python']}, numpy {env['numpy']}, torch {env['torch']} ({env['torch_threads']} thread)",
        f"- transformers side: transformers {env['transformers']}; our ONNX: onnx {env['onnx']}, onnxruntime "
        f"{env['onnxruntime']}",
        f"- official side (child process): transformers {side['transformers']}, torch {side['torch']}, "
        f"backbone attention {', '.join(env['official_backbone_attention'])}; timm: {side['timm']}",
        f"- official checkout: {env['official_checkout']['label'] or env['official_checkout']['git']}; files "
        "(sha256[:16]): "
        + ", ".join(f"`{f}` {h}" for f, h in side["files"].items()),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", help="an official EoMT checkout (holding models/eomt.py, models/vit.py)")
    parser.add_argument("--official-site", help="a folder put first on the official side's sys.path (pip --target) "
                                                "holding the transformers the official code pins (4.56.1)")
    parser.add_argument("--official-label", help="what the checkout is (e.g. its commit), for the report")
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), help="only these configs (default all)")
    parser.add_argument("--no-onnx", action="store_true", help="skip our ONNX export leg")
    parser.add_argument("--json", help="write the full result here")
    parser.add_argument("--markdown", help="write the report table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_official(Path(args.worker))
        return 0
    if not args.official:
        parser.error("--official is required: the path of an official EoMT checkout")
    official = Path(args.official)
    if not (official / "models" / "eomt.py").is_file() or not (official / "models" / "vit.py").is_file():
        parser.error(f"{official} is not an official EoMT checkout (models/eomt.py and models/vit.py missing)")
    result = measure(args)
    result["findings"] = findings(result)
    command = shlex.join(["python", "benchmarks/eomt_official_vs_transformers.py",
                          *(argv if argv is not None else sys.argv[1:])])
    report = to_markdown(result, command)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(report)
    print(report)
    return 0  # a measurement: differences are results, reported above, not failures


if __name__ == "__main__":
    sys.exit(main())
