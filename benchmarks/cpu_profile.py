"""Where the CPU time goes in our OpenVINO graphs, and how close to the machine's peak they run.

    .venv/bin/python benchmarks/cpu_profile.py --sizes all --store /tmp/deimv2_cpu_speed_store \
        --out benchmarks/cpu_profile.md

Per size, on one thread (so that time is work, not waiting: this machine is shared, and a single-threaded
process's CPU time is barely affected by its neighbours):
- the model's FLOPs (convolutions and linear layers counted by torch's FlopCounterMode, plus the ViT attention
  4 * heads * N^2 * head_dim per block, which the counter leaves out);
- CPU time per call of PyTorch eager and of our OpenVINO IR (median of --iters calls, taking turns; single images
  run on the batch-1 compilation, as OpenVinoRuntime does), and the
  GFLOP/s each reaches, against a large FP32 matrix product on the same thread (the practical peak);
- OpenVINO's per-layer profile (PERF_COUNT) grouped by model part and by layer type.
- with --footprint: what loading atto costs in a fresh interpreter (import time of the inference path, which must
  not import torch, and peak RSS after five predicts) through ONNX Runtime and OpenVINO.
The IRs are `export_openvino`'s defaults in the model store of the deimv2-bench run (benchmarks/cpu_speed.md:
`--checkpoint-dir`); random deterministic weights.
"""
from __future__ import annotations

import argparse
import collections
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = ("atto", "femto", "pico", "n", "s", "m", "l", "x")
ROOT = Path(__file__).resolve().parents[1]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def model_gflops(model: Any, size: str) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from deimv2_deploy.variants import get_variant_info

    h, w = get_variant_info(size).input_size
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.rand(1, 3, h, w))
    counted = counter.get_total_flops() / 1e9
    attention = 0.0
    backbone = model.backbone
    vit = getattr(backbone, "dinov3", None)
    if vit is not None:  # s, m, l, x: 12 blocks of full self-attention over the prefix + patch tokens
        blocks = vit._model.blocks if hasattr(vit, "_model") else vit.blocks
        prefix = 1 if hasattr(vit, "_model") else vit.num_prefix_tokens
        tokens = prefix + (h // 16) * (w // 16)
        attn = blocks[0].attn
        dim = attn.proj.in_features
        attention = len(blocks) * 4 * tokens * tokens * dim / 1e9  # QK^T and (softmax)V, all heads
    return {"counted": counted, "vit_attention": attention, "total": counted + attention}


def peak_gflops(sizes: tuple[int, ...] = (1024, 2048), calls: int = 6) -> float:
    """The best FP32 matrix-product rate of this thread (CPU time), over a few sizes and calls."""
    import torch

    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        seconds = min(_cpu_time(lambda a=a, b=b: a @ b) for _ in range(calls))
        best = max(best, 2 * n**3 / seconds / 1e9)
    return best


def _cpu_time(fn) -> float:
    c0 = cpu_seconds()
    fn()
    return cpu_seconds() - c0


def _section(name: str, node_type: str) -> str:
    if "postprocessor" in name:
        return "postprocess"
    m = re.search(r"model[./](backbone|encoder|decoder)(?:[./]([a-z_]+))?", name)
    if not m:  # the ONNX route names linear layers Gemm_<n>, without the module path
        return "unnamed linear layers" if node_type == "FullyConnected" else "unnamed"
    part, sub = m.groups()
    if part == "backbone" and sub in ("dinov3", "sta", "stem", "stages"):
        return f"backbone.{sub}"
    return part


def ov_profile(compiled: Any, request: Any, inputs: dict[str, np.ndarray], seconds: float = 3.0) -> dict[str, Any]:
    """Per-layer times summed over calls for `seconds` (at least 3 calls): many calls of a small model average
    out the moments another process had the CPU."""
    runtime = compiled.get_runtime_model()
    original = {}
    for op in runtime.get_ordered_ops():
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        original[op.get_friendly_name()] = names
    parts: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    calls, start = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - start < seconds:
        request.infer(inputs)
        calls += 1
        for p in request.get_profiling_info():
            us = p.real_time.total_seconds() * 1e6
            parts[_section(original.get(p.node_name) or p.node_name, p.node_type)] += us
            kinds[p.node_type] += us
    total = sum(parts.values())
    return {"parts": {k: round(100 * v / total, 1) for k, v in parts.most_common()},
            "kinds": {k: round(100 * v / total, 1) for k, v in kinds.most_common(8)}}


FRESH_PROCESS = r"""
import json, sys, time
t0 = time.perf_counter()
from deimv2_deploy.runtimes import load_runtime
t1 = time.perf_counter()
runtime = load_runtime(sys.argv[1], backend=sys.argv[2], threads=2)
t2 = time.perf_counter()
from deimv2_deploy.exporters.parity import parity_images
image = parity_images(1)[0]
for _ in range(5):
    runtime.predict(image)
# VmHWM, not getrusage: ru_maxrss survives exec, so it would report the (forked) parent's peak
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "torch_imported": "torch" in sys.modules,
                  "peak_rss_mb": int(hwm.split()[1]) / 1024}))
"""


def fresh_process_footprint(store: Path, size: str = "atto") -> dict[str, dict[str, Any]]:
    """Import time and peak RSS of load + 5 predicts of `size`, each backend in a new interpreter."""
    import json
    import subprocess
    import sys

    from deimv2_deploy.exporters.common import artifact_name

    out = {}
    for backend, ext in (("onnxruntime", ".onnx"), ("openvino", ".xml")):
        path = store / artifact_name(size, "fp32", True, None, ext)
        run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(path), backend], capture_output=True,
                             text=True, cwd=ROOT, check=True)
        out[backend] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


def profile_size(size: str, folder: Path, iters: int) -> dict[str, Any]:
    import openvino as ov
    import torch

    from deimv2_deploy.exporters.common import artifact_name
    from deimv2_deploy.exporters.parity import parity_batch
    from deimv2_deploy.models.reference import load_reference
    from deimv2_deploy.runtimes.openvino_backend import openvino_core
    from deimv2_deploy.spec import ArtifactSpec

    torch.set_num_threads(1)
    model, _, _ = load_reference(size, random_weights=True)
    flops = model_gflops(model, size)
    inputs = parity_batch(ArtifactSpec.for_variant(size), 1).as_inputs()
    images = torch.from_numpy(inputs["images"].copy())
    core = openvino_core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": 1, "INFERENCE_PRECISION_HINT": "f32"}
    xml = folder / artifact_name(size, "fp32", True, None, ".xml")  # export_openvino's default IR
    ir = core.read_model(str(xml))
    ir.reshape({ir.inputs[0]: list(inputs["images"].shape), ir.inputs[1]: [1, 2]})  # as OpenVinoRuntime does
    compiled = core.compile_model(ir, "CPU", config)
    request = compiled.create_infer_request()

    def eager() -> None:
        with torch.inference_mode():
            model(images)

    calls = {"eager": eager, "openvino": lambda: request.infer(inputs)}
    for fn in calls.values():
        fn()
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            cpu[name].append(_cpu_time(fn))
    ms = {name: 1000 * float(np.median(v)) for name, v in cpu.items()}
    profiled = core.compile_model(ir, "CPU", {**config, ov.properties.enable_profiling(): True})
    breakdown = ov_profile(profiled, profiled.create_infer_request(), inputs)
    return {"size": size, "gflops": flops, "cpu_ms": ms,
            "gflops_per_s": {k: flops["total"] / (v / 1000) for k, v in ms.items()}, **breakdown}


def write_report(lines: list[str], out: str | None) -> int:
    """Print the markdown report and, with --out, write it there."""
    from deimv2_deploy.files import write_text

    text = "\n".join(lines) + "\n"
    if out:
        write_text(out, text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["all"])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--store", required=True, help="the model store holding export_openvino's IRs (random weights)")
    p.add_argument("--footprint", action="store_true", help="also the fresh-process import time and peak RSS")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    folder = Path(args.store)
    sizes = SIZES if args.sizes == ["all"] else args.sizes
    peak = peak_gflops()
    rows = []
    for size in sizes:
        rows.append(profile_size(size, folder, args.iters))
        print(rows[-1], flush=True)
    command = argv if argv is not None else sys.argv[1:]
    lines = ["# Where the CPU time goes (one thread, CPU time per call)", "",
             f"Command: `.venv/bin/python benchmarks/cpu_profile.py {' '.join(command)}`. Practical FP32 peak on "
             f"this thread: {peak:.0f} GFLOP/s (best of 1024^3 and 2048^3 matrix products, torch).", "",
             "| size | GFLOP (of which ViT attention) | eager ms | eager GFLOP/s | OpenVINO ms | OpenVINO GFLOP/s "
             "| OpenVINO % of peak |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        f, ms, rate = r["gflops"], r["cpu_ms"], r["gflops_per_s"]
        lines.append(f"| {r['size']} | {f['total']:.1f} ({f['vit_attention']:.1f}) | {ms['eager']:.1f} | "
                     f"{rate['eager']:.0f} | {ms['openvino']:.1f} | {rate['openvino']:.0f} | "
                     f"{100 * rate['openvino'] / peak:.0f}% |")
    lines += ["", "OpenVINO time by model part and by layer type (% of the summed layer times):", ""]
    for r in rows:
        parts = ", ".join(f"{k} {v}%" for k, v in r["parts"].items() if v >= 1)
        kinds = ", ".join(f"{k} {v}%" for k, v in r["kinds"].items())
        lines.append(f"- {r['size']}: {parts}. Layer types: {kinds}.")
    if args.footprint:
        lines += ["", "Fresh interpreter, DEIMv2-atto, 2 threads (targets: import under 1 s, peak RSS under 250 MB):",
                  ""]
        for backend, f in fresh_process_footprint(folder).items():
            lines.append(f"- {backend}: import of the inference path {f['import_s']:.2f} s (torch imported: "
                         f"{f['torch_imported']}), load {f['load_s']:.2f} s, peak RSS after 5 predicts "
                         f"{f['peak_rss_mb']:.0f} MB")
    return write_report(lines, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
