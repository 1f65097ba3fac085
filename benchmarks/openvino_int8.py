"""OpenVINO INT8 vs FP32 on CPU: latency side by side in one run, and how far INT8 detections drift.

    .venv/bin/python benchmarks/openvino_int8.py --sizes atto s --threads 2 --out benchmarks/openvino_int8.md

Random (deterministic) weights: no checkpoint can be downloaded here, so drift is measured against the FP32
graph of the same weights on held-out images, not as COCO AP. Calibration images are real-ish: crops, flips and
rescales of shared/media/example.jpg plus synthetic scenes; the held-out images are other crops and scenes.
For each size the script exports FP32, INT8 (decoder + postprocessing kept in float: the default) and INT8 with
the decoder and postprocessing quantized too (to show why the default keeps them in float; attention stays float
in both), then times the three IRs
round-robin in one process (2 threads, batch 1, latency mode) and reports medians.
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from deimv2_deploy.cpu import INT8_DOT_PRODUCT, cpu_info, has_int8_dot_product
from deimv2_deploy.exporters.openvino_export import drift_summary, export_openvino
from deimv2_deploy.exporters.parity import match_detections, parity_images
from deimv2_deploy.files import write_text
from deimv2_deploy.runtimes.openvino_backend import OpenVinoRuntime

EXAMPLE = Path(__file__).resolve().parents[1].parent / "shared" / "media" / "example.jpg"


def realish_images(count: int, seed: int, example: Path = EXAMPLE) -> list[np.ndarray]:
    """Crops / flips / rescales of the example photo, alternating with synthetic scenes (BGR uint8)."""
    rng = np.random.default_rng(seed)
    photo = cv2.imread(str(example)) if example.exists() else None
    scenes = parity_images(count, seed=seed + 1000)
    out = []
    for i in range(count):
        if photo is None or i % 3 == 2:
            out.append(scenes[i])
            continue
        h, w = photo.shape[:2]
        ch, cw = int(h * rng.uniform(0.45, 1.0)), int(w * rng.uniform(0.45, 1.0))
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        img = photo[y:y + ch, x:x + cw]
        if rng.random() < 0.5:
            img = img[:, ::-1]
        scale = rng.uniform(0.6, 1.4)
        img = cv2.resize(img, (max(32, int(cw * scale)), max(32, int(ch * scale))), interpolation=cv2.INTER_AREA)
        img = np.clip(img.astype(np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20), 0, 255)
        out.append(np.ascontiguousarray(img.astype(np.uint8)))
    return out


def time_round_robin(runtimes: dict[str, OpenVinoRuntime], inputs: dict[str, dict], rounds: int, per_round: int
                     ) -> dict[str, list[float]]:
    """Per-call latencies (ms), the models taking turns so machine noise hits them alike."""
    for name, rt in runtimes.items():
        for _ in range(3):
            rt.infer(inputs[name])
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, rt in runtimes.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                rt.infer(inputs[name])
                times[name].append(1000 * (time.perf_counter() - t0))
    return times


def main(argv: list[str] | None = None) -> int:
    import torch

    from deimv2_deploy.models.graph import DeployGraph
    from deimv2_deploy.models.reference import load_reference

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["atto", "s"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibration-size", type=int, default=64)
    p.add_argument("--holdout", type=int, default=8, help="held-out images for the drift measurement")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--per-round", type=int, nargs="+", default=[10, 2], help="calls per round, per size")
    p.add_argument("--out", default="benchmarks/openvino_int8.md")
    p.add_argument("--workdir", help="where the IRs and calibration images go (default: a temporary folder)")
    p.add_argument("--reuse", action="store_true", help="time the IRs already in --workdir instead of exporting")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="deimv2_ov_int8_"))
    calib = work / "calibration"
    calib.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(realish_images(args.calibration_size, seed=1)):
        cv2.imwrite(str(calib / f"{i:04d}.jpg"), img)
    holdout = realish_images(args.holdout, seed=2)
    if EXAMPLE.exists():
        holdout[0] = cv2.imread(str(EXAMPLE))

    rows, drift_rows = [], []
    for k, size in enumerate(args.sizes):
        model, weights, _ = load_reference(size, random_weights=True)
        graph = DeployGraph(model).eval()
        variants = {"fp32": dict(precision="fp32"),
                    "int8": dict(precision="int8", calibration=calib, calibration_size=args.calibration_size),
                    "int8 (decoder quantized too)": dict(precision="int8", calibration=calib,
                                                 calibration_size=args.calibration_size, float_patterns=())}
        runtimes, build_s = {}, {}
        for name, options in variants.items():
            store = work / size / name.replace(" ", "_").replace("(", "").replace(")", "")
            path = store / f"deimv2_{size}_random_{options['precision']}.xml"
            build_s[name] = None
            if not (args.reuse and path.exists()):
                t0 = time.perf_counter()
                path = export_openvino(size, random_weights=True, output_dir=store, graph=graph, weights=weights,
                                       quiet=True, **options).path
                build_s[name] = time.perf_counter() - t0
            runtimes[name] = OpenVinoRuntime(path, threads=args.threads, mode="latency")
        outputs = {name: rt.infer(rt.prepare(holdout).as_inputs()) for name, rt in runtimes.items()}
        for name in list(variants)[1:]:
            m = match_detections(outputs[name], outputs["fp32"], box_tol=8.0, score_tol=5e-2)
            drift_rows.append((size, name, m, drift_summary(outputs[name], outputs["fp32"])))
        one = runtimes["fp32"].prepare(holdout[:1]).as_inputs()
        per_round = args.per_round[min(k, len(args.per_round) - 1)]
        times = time_round_robin(runtimes, {n: one for n in runtimes}, args.rounds, per_round)
        base = float(np.median(times["fp32"]))
        for name, ts in times.items():
            rows.append((size, name, float(np.median(ts)), float(np.percentile(ts, 10)), float(np.percentile(ts, 90)),
                         len(ts), base / float(np.median(ts)), build_s[name], runtimes[name].describe()))
        for rt in runtimes.values():
            rt.close()
        print(f"{size} done", file=sys.stderr, flush=True)

    import nncf
    import openvino

    cpu = cpu_info()
    lines = [
        "# OpenVINO INT8 vs FP32 (CPU)",
        "",
        f"Made by `{' '.join(['.venv/bin/python', 'benchmarks/openvino_int8.py', *(argv or sys.argv[1:])])}` on "
        f"{dt.date.today().isoformat()}.",
        f"Machine: {platform.machine()}, {cpu['model']} ({_int8_isa(cpu['isa'])}), shared with other jobs (noisy: "
        "compare rows of one size, which were timed round-robin in one process, not across runs). "
        f"OpenVINO {openvino.get_version().split('-')[0]}, NNCF {nncf.__version__}.",
        f"Deterministic random weights; {args.threads} threads, batch 1, latency mode, median of per-call times; "
        f"INT8 calibrated on {args.calibration_size} real-ish images (crops/flips of example.jpg + synthetic scenes).",
        "",
        "## Latency",
        "",
        "| size | IR | median ms | p10 | p90 | calls | speed-up vs FP32 | export s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, name, med, p10, p90, n, speedup, secs, _ in rows:
        built = "reused" if secs is None else f"{secs:.0f}"
        lines.append(f"| {size} | {name} | {med:.1f} | {p10:.1f} | {p90:.1f} | {n} | {speedup:.2f}x | {built} |")
    lines += [
        "",
        f"## Drift against the FP32 IR ({args.holdout} held-out images, example.jpg among them)",
        "",
        "Matched: detections paired one-to-one with FP32's (same class, box within 8 px, score within 0.05). "
        "Top-100: for each of FP32's 100 best detections per image, the best-overlapping same-class INT8 detection.",
        "",
        "| size | IR | matched | top-100 mean IoU | IoU > 0.5 | IoU > 0.9 | median score diff | max score diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for size, name, m, d in drift_rows:
        lines.append(f"| {size} | {name} | {100 * m['fraction']:.1f}% | {d['mean_iou']:.3f} | "
                     f"{100 * d['iou_over_0.5']:.1f}% | {100 * d['iou_over_0.9']:.1f}% | "
                     f"{d['median_score_diff']:.4f} | {d['max_score_diff']:.4f} |")
    lines += ["", "Runtime settings as compiled (`describe()`):", ""]
    for size, name, *_, desc in rows:
        keys = ("precision", "inference_precision", "performance_mode", "streams", "threads")
        lines.append(f"- {size} {name}: " + ", ".join(f"{key} {desc.get(key)}" for key in keys))
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _int8_isa(isa: dict[str, bool]) -> str:
    """The CPU features INT8 speed depends on: VNNI (or AMX) gives 8-bit dot products; plain AVX2 does not."""
    found = [label for label in ("AVX2", "AVX-512F", *INT8_DOT_PRODUCT) if isa.get(label)]
    dot = has_int8_dot_product(isa)
    if dot is None:
        return "ISA unknown"
    return f"{' '.join(found)}; {'has' if dot else 'NO'} INT8 dot-product instructions (VNNI/AMX)"


if __name__ == "__main__":
    sys.exit(main())
