"""`make demo`: the whole toolkit on this machine, from a fresh clone, in a few minutes.

1. the reference model of all eight sizes on the example photo (parameters, output shapes, time);
2. `deimv2-export` of atto and s (`--sizes`; the official checkpoint from the model store when present, else
   deterministic random weights, said loudly) with the parity report;
3. `deimv2-infer` on the example photo (annotated image written to out/demo/);
4. the video pipeline on a generated clip, with its summary;
5. a short CPU-tier benchmark of atto on every available backend;
6. the trained reference model (reference/atto_synth, made by this repository's deimv2-train): exported, real
   detections drawn on generated scenes it never saw and on a generated video, and its accuracy beside its
   latency per backend and precision (deimv2-bench --accuracy).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "PARTS", "quick_atto_table"]

PARTS = ("table", "export", "video", "bench", "trained")
REFERENCE_MODEL = Path(__file__).resolve().parents[1] / "reference" / "atto_synth" / "model.pth"
HOLDOUT_SEED = 7  # the generated split the reference model never saw in training (seed 1)


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def _example_image(shared: Path, out_dir: Path) -> Path:
    photo = shared / "media" / "example.jpg"
    if photo.exists():
        return photo
    from deimv2_deploy.exporters.parity import parity_images
    from deimv2_deploy.media import write_image

    print(f"(no {photo}: using a generated scene instead)")
    return write_image(out_dir / "generated_scene.jpg", parity_images(1)[0])


def model_table(image_path: Path) -> None:
    import torch

    from deimv2_deploy.media import read_image
    from deimv2_deploy.models import build_model
    from deimv2_deploy.models.graph import DeployGraph
    from deimv2_deploy.models.random_weights import apply_deterministic_weights
    from deimv2_deploy.preprocess import Preprocessor
    from deimv2_deploy.spec import ArtifactSpec
    from deimv2_deploy.variants import VARIANT_NAMES, get_variant_info

    image = read_image(image_path)
    rows = []
    for name in VARIANT_NAMES:
        info = get_variant_info(name)
        model = apply_deterministic_weights(build_model(name))
        train_params = sum(p.numel() for p in model.parameters())
        model.deploy()
        deploy_params = sum(p.numel() for p in model.parameters())
        batch = Preprocessor(ArtifactSpec.for_variant(name))(image)
        t = time.perf_counter()
        with torch.inference_mode():
            raw = model(torch.from_numpy(batch.images))
            labels, boxes, scores = DeployGraph(model).postprocessor(raw, torch.from_numpy(batch.orig_target_sizes))
        ms = 1e3 * (time.perf_counter() - t)
        rows.append((name, f"{info.input_size[0]}x{info.input_size[1]}", "ImageNet" if info.normalize else "none",
                     f"{train_params / 1e6:.2f}M", f"{deploy_params / 1e6:.2f}M ({info.published_params_m}M)",
                     str(tuple(raw["pred_logits"].shape)), str(tuple(raw["pred_boxes"].shape)),
                     str(tuple(boxes.shape)), f"{ms:.0f}"))
        del model
    head = ("size", "input", "normalise", "params", "deploy params (published)", "pred_logits", "pred_boxes",
            "boxes", "ms (1st run)")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))


def export_and_infer(sizes: list[str], store: Path, image_path: Path, out_dir: Path) -> dict[str, Path]:
    from deimv2_deploy.cli.infer import main as infer_main
    from deimv2_deploy.exporters.onnx_export import export_onnx
    from deimv2_deploy.models.checkpoint import find_checkpoint

    artifacts = {}
    for size in sizes:
        try:
            checkpoint = find_checkpoint(size, store)
            print(f"DEIMv2-{size}: official checkpoint {checkpoint}")
            result = export_onnx(size, checkpoint=checkpoint, output_dir=store)
        except FileNotFoundError:
            print(f"DEIMv2-{size}: NO official checkpoint in {store.resolve()} -> DETERMINISTIC RANDOM WEIGHTS "
                  "(the plumbing is real, the detections are meaningless)")
            result = export_onnx(size, random_weights=True, output_dir=store)
        print(f"  wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB) in {result.seconds:.0f} s")
        artifacts[size] = result.path
        target = out_dir / size
        args = [str(result.path), str(image_path), "--output-dir", str(target), "--json"]
        if result.spec.random_weights:  # every random-weight score is high: draw only the ten best
            args += ["--max-detections", "10"]
        print(f"  $ deimv2-infer {' '.join(args)}")
        code = infer_main(args)
        if code != 0:
            raise RuntimeError(f"deimv2-infer failed for {size}")
        print(f"  annotated image: {target / (image_path.stem + '.jpg')}")
    return artifacts


def video_demo(artifact: Path, out_dir: Path, frames: int = 120) -> Path:
    from deimv2_deploy.runtimes import load_runtime
    from deimv2_deploy.video import run_video, video_runtime_options, write_synthetic_video

    clip = write_synthetic_video(out_dir / "clip.mp4", frames=frames, size=(854, 480), fps=25)
    print(f"generated {clip} ({frames} frames, 854x480, 25 fps)")
    runtime = load_runtime(artifact, threads=2, **video_runtime_options(artifact))
    # random weights score almost every query high: draw the ten best, as deimv2-infer does in the demo
    cap = 10 if runtime.spec.random_weights else None
    output = out_dir / "clip_annotated.mp4"
    summary = run_video(runtime, clip, output=output, json_path=out_dir / "clip.jsonl", score_threshold=0.4,
                        max_detections=cap, progress=True)
    print(summary.table())
    print(f"annotated video: {output}; detections: {out_dir / 'clip.jsonl'}")
    return output


def quick_atto_table(store_dir: str | os.PathLike | None = None, iters: int = 30, threads: int | None = None) -> str:
    """The CPU-tier table of DEIMv2-atto on every backend (random weights, batch 1), as markdown.

    Exports the ONNX/OpenVINO artifacts into `store_dir` when they are not there yet.
    """
    from deimv2_deploy.benchmarks import BenchConfig, run_benchmark, to_markdown
    from deimv2_deploy.runtimes.base import Backend

    command = (f"deimv2-bench --sizes atto --backends all --iters {iters} --warmup 5 --random-weights"
               + (f" --checkpoint-dir {store_dir}" if store_dir is not None else "")
               + (f" --threads {threads}" if threads else ""))
    config = BenchConfig(sizes=("atto",), backends=tuple(b.value for b in Backend), precisions=("fp32",), device="cpu",
                         threads=threads, warmup=5, iters=iters, random_weights=True,
                         checkpoint_dir=None if store_dir is None else str(store_dir), progress=False,
                         keep_samples=False, command=command)
    return to_markdown(run_benchmark(config))


def bench_demo(store: Path) -> None:
    print(quick_atto_table(store, iters=30, threads=2))


def trained_demo(model: Path, store: Path, out_dir: Path, scenes: int = 4, eval_images: int = 100) -> None:
    """The shipped trained atto on generated scenes (seed 7, never seen in training) and video, then AP beside ms
    per backend and precision."""
    from deimv2_deploy.benchmarks import BenchConfig, run_benchmark, to_markdown
    from deimv2_deploy.cli.infer import main as infer_main
    from deimv2_deploy.data.synth import write_dataset
    from deimv2_deploy.exporters.onnx_export import export_onnx

    data = out_dir / "synth_holdout"
    if not (data / "annotations" / "instances_val.json").exists():
        print(f"generating {eval_images} held-out scenes (deimv2-data synth --val {eval_images} --seed {HOLDOUT_SEED})")
        write_dataset(data, {"val": eval_images}, seed=HOLDOUT_SEED)
    result = export_onnx("atto", checkpoint=model, output_dir=store / "reference_atto_synth")
    print(f"  wrote {result.path}: classes {', '.join(result.spec.class_names)}")
    images = sorted((data / "val").iterdir())[:scenes]
    target = out_dir / "trained"
    args = [str(result.path), *map(str, images), "--output-dir", str(target), "--score", "0.5"]
    print(f"  $ deimv2-infer {' '.join(args)}")
    if infer_main(args) != 0:
        raise RuntimeError("deimv2-infer failed on the reference model")
    print(f"  annotated scenes: {target}")
    video_demo(result.path, target, frames=90)
    command = (f"deimv2-bench --sizes atto --checkpoint {model} --backends onnxruntime,openvino --precision fp32,int8 "
               f"--accuracy --data {data} --iters 30 --threads 2")
    print(f"  $ {command}")
    config = BenchConfig(sizes=("atto",), backends=("onnxruntime", "openvino"), precisions=("fp32", "int8"),
                         checkpoint=str(model), checkpoint_dir=str(store), threads=2, warmup=5, iters=30,
                         accuracy_images=str(data / "val"),
                         accuracy_annotations=str(data / "annotations" / "instances_val.json"), progress=False,
                         keep_samples=False, command=command)
    print(to_markdown(run_benchmark(config), "DEIMv2-atto trained on synthetic shapes: latency and AP"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deimv2-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"),
                   help="the shared folder with media/example.jpg (default: ../shared)")
    p.add_argument("--store", default=None, help="model store (default: $DEIMV2_MODELS or ./models)")
    p.add_argument("--out", default="out/demo", help="where images, video and reports go")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip: {','.join(PARTS)}")
    p.add_argument("--sizes", default="atto,s", help="sizes to export and run (default: atto,s; the video uses "
                   "the first)")
    args = p.parse_args(argv)
    from deimv2_deploy.exporters.common import resolve_store
    from deimv2_deploy.variants import VARIANT_NAMES

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        p.error(f"--skip: unknown part(s) {sorted(skip - set(PARTS))}; choose among {','.join(PARTS)}")
    sizes = [s.strip().lower() for s in args.sizes.split(",") if s.strip()]
    if not sizes or set(sizes) - set(VARIANT_NAMES):
        p.error(f"--sizes: {args.sizes!r} is not a comma-separated list of {','.join(VARIANT_NAMES)}")
    store, out_dir = resolve_store(args.store), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    np.set_printoptions(precision=3, suppress=True)
    image_path = _example_image(Path(args.shared), out_dir)
    if "table" not in skip:
        _banner("1. the reference model, all eight sizes (deterministic weights), on " + image_path.name)
        model_table(image_path)
    artifacts = {}
    if "export" not in skip:
        _banner(f"2-3. deimv2-export {' and '.join(sizes)}, then deimv2-infer on the photo")
        artifacts = export_and_infer(sizes, store, image_path, out_dir)
    if "video" not in skip and artifacts:
        _banner(f"4. video pipeline (decode -> infer -> draw -> encode) on a generated clip, {sizes[0]}")
        video_demo(artifacts[sizes[0]], out_dir)
    if "bench" not in skip:
        _banner("5. CPU tier, atto, every available backend (2 threads, batch 1)")
        bench_demo(store)
    if "trained" not in skip:
        _banner("6. the trained reference model (reference/atto_synth) on scenes and video it never saw")
        if REFERENCE_MODEL.exists():
            trained_demo(REFERENCE_MODEL, store, out_dir)
        else:
            print(f"(no {REFERENCE_MODEL}: this checkout has no trained reference model)")
    print(f"\ndemo done in {time.perf_counter() - t0:.0f} s; outputs in {out_dir.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
