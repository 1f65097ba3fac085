"""deimv2-bench: latency and FPS of DEIMv2 sizes on each backend, one device tier per run.

    deimv2-bench --sizes atto,femto --backends torch,onnxruntime,openvino --iters 100 --random-weights
    deimv2-bench --sizes all --seconds 20 --threads 2 --random-weights --output cpu.json --plot cpu.png
    deimv2-bench --vit eomt_folder/ --mode predict --task semantic --seconds 10   # an EoMT-DINOv3 / DINOv3 model
"""
from __future__ import annotations

import argparse
import shlex
import sys

from deimv2_deploy.cli import run_cli

__all__ = ["main", "build_parser", "parse_sizes", "parse_backends"]

EPILOG = """\
Each row: artifact found in (or exported to) the model store, loaded (load time), run once (first-inference
latency), warmed up, then every call timed (no trimming). Rows that cannot run here are listed with the reason.
Examples:
  deimv2-bench --sizes atto --iters 30 --random-weights
  deimv2-bench --sizes all --backends onnxruntime,openvino --precision fp32,int8 --seconds 10 --threads 2
  deimv2-bench --device cuda --backends torch,onnxruntime,tensorrt --precision fp16 --batch 1,8
  deimv2-bench --mode end-to-end --sizes pico --iters 50 --random-weights
  deimv2-bench --mode video --video street.mp4 --sizes n --iters 200
  deimv2-bench --sizes all --backends torch,onnxruntime-official,openvino-official,onnxruntime,openvino \
               --mode predict --interleave --threads 2 --seconds 8 --random-weights
  deimv2-bench --sizes atto,s --backends torch,onnxruntime,openvino --precision fp32,fp16,int8 \
               --accuracy --data coco --max-images 500     # AP and AP50 beside every row's latency
  deimv2-bench --sizes atto --checkpoint my.pth --backends onnxruntime,openvino --precision fp32,fp16,int8,auto \
               --accuracy --data my_dataset --max-ap-drop 0.5    # + the fastest row within 0.5 AP points of FP32
  deimv2-bench --vit coco_panoptic_eomt_large_640_dinov3/ --threads 2 --seconds 10   # torch (transformers),
               # onnxruntime, openvino rows of that EoMT folder (exported to the store first), graph only
  deimv2-bench --vit models/eomt_dinov3_x_640x640_fp32.onnx --backends onnxruntime,openvino --mode predict \
               --task panoptic --interleave --seconds 10     # an exported artifact, Runtime.predict end to end
  deimv2-bench --vit dinov3_folder/ --backends torch,onnxruntime,openvino --precision fp32,fp16,int8 \
               --calibration images/ --seconds 10     # a row per backend x precision, agreement vs transformers FP32
"""


def _split(text: str) -> list[str]:
    return [t.strip().lower() for t in text.split(",") if t.strip()]


def parse_sizes(text: str) -> tuple[str, ...]:
    from deimv2_deploy.variants import VARIANT_NAMES, get_variant_info

    items = _split(text)
    if items == ["all"]:
        return VARIANT_NAMES
    return tuple(dict.fromkeys(get_variant_info(s).name for s in items))  # ValueError names the bad size


def parse_backends(text: str) -> tuple[str, ...]:
    from deimv2_deploy.benchmarks.config import OFFICIAL_BACKENDS
    from deimv2_deploy.runtimes.base import Backend

    items = _split(text)
    if items == ["all"]:
        return tuple(b.value for b in Backend)
    # the official-style baselines keep their names; the rest are parsed (ValueError names a bad backend)
    return tuple(dict.fromkeys(b if b in OFFICIAL_BACKENDS else Backend.parse(b).value for b in items))


def _batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in _split(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers like 1,8, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deimv2-bench", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", help="comma list of atto femto pico n s m l x, or 'all' (default atto)")
    p.add_argument("--backends", default="torch,onnxruntime,openvino",
                   help="comma list of torch onnxruntime openvino tensorrt, or 'all' "
                        "(default torch,onnxruntime,openvino); onnxruntime-official and openvino-official run "
                        "the official-style export of the same model (the baselines)")
    p.add_argument("--precision", default="fp32",
                   help="comma list of fp32 fp16 int8 auto bf16 (default fp32); auto/bf16: OpenVINO on the FP32 IR "
                        "with the precision policy (bf16 where the CPU runs it natively); every row reports the "
                        "precision that really ran")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]: one tier per run (default cpu)")
    p.add_argument("--batch", type=_batches, default=(1,), help="comma list of batch sizes (default 1)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads per backend (default: all usable cores)")
    p.add_argument("--warmup", type=_positive_int, default=10,
                   help="untimed calls before timing; the first is reported as first-inference latency (default 10)")
    timed = p.add_mutually_exclusive_group()
    timed.add_argument("--iters", type=_positive_int, help="timed calls per row (default 100)")
    timed.add_argument("--seconds", type=_positive_float, help="time calls for this long per row (at least 3 calls)")
    p.add_argument("--mode", choices=["model", "end-to-end", "predict", "video"], default="model",
                   help="model: the graph only; end-to-end: read + preprocess + infer + postprocess, each timed; "
                        "predict: Runtime.predict on an in-memory 640x480 image, baselines (torch, *-official) "
                        "graph only; video: frames of --video through Runtime.stream")
    vit = p.add_argument_group("EoMT-DINOv3 / DINOv3", "--vit: rows of one such model instead of DEIMv2 sizes "
                                                      "(--precision fp32,fp16,int8,auto,bf16 as for DEIMv2, INT8 "
                                                      "with --calibration; --mode model or predict; its name in the "
                                                      "size column)")
    vit.add_argument("--vit", metavar="FOLDER_OR_ARTIFACT",
                     help="a transformers EoMT-DINOv3 / DINOv3 folder (exported to the store first; adds the torch "
                          "row: transformers' eager model, the parity reference) or an exported .onnx / .xml "
                          "(parity against the ONNX Runtime row)")
    vit.add_argument("--task", action="append",
                     help="EoMT, --mode predict: the tasks predict runs (semantic, instance, panoptic; repeat or "
                          "comma-separate; default semantic,instance, + panoptic when the artifact has its stuff "
                          "classes)")
    p.add_argument("--interleave", action="store_true",
                   help="the rows of one size take turns call by call (fair ratios on a shared machine)")
    p.add_argument("--video", help="video file for --mode video")
    p.add_argument("--random-weights", action="store_true",
                   help="deterministic untrained weights (latency is the same; detections are meaningless)")
    p.add_argument("--checkpoint-dir", help="model store with the official checkpoints; exported artifacts are "
                                            "written and reused here (default: $DEIMV2_MODELS or ./models)")
    p.add_argument("--checkpoint", help="the weights of the one size benchmarked (a .pth, e.g. deimv2-train "
                                        "--release, or a transformers folder); its artifacts are exported to "
                                        "a folder of their own in the store")
    p.add_argument("--calibration", help="INT8 calibration (OpenVINO/TensorRT): a folder of images or a COCO-format "
                                         "dataset (its folder or annotation .json); default: the --accuracy dataset's "
                                         "images, else with --random-weights synthetic scenes; --vit: no default "
                                         "(INT8 rows are skipped without it)")
    acc = p.add_argument_group("accuracy", "--accuracy: every row also gets COCO AP and AP50 of its own runtime on a "
                                           "COCO-format dataset (deimv2-val's evaluation, not timed)")
    acc.add_argument("--accuracy", action="store_true", help="measure AP/AP50 per row (needs the dataset below)")
    acc.add_argument("--images", help="image folder of the dataset")
    acc.add_argument("--annotations", help="COCO instances JSON of the dataset")
    acc.add_argument("--data", metavar="DIR",
                     help="dataset folder in a standard layout, instead of --images and --annotations "
                          "(DIR/annotations/instances_<split>.json + DIR/<split>/)")
    acc.add_argument("--split", default="val", help="split to look for with --data (default val)")
    acc.add_argument("--max-images", type=_positive_int, metavar="N", help="evaluate the first N images only")
    acc.add_argument("--max-ap-drop", type=float, metavar="POINTS",
                     help="choose, per size, the fastest row whose AP is at most POINTS AP points (x100) below the "
                          "FP32 row's (e.g. 0.5: AP 53.0 -> 52.5); list the precisions to choose from in --precision")
    p.add_argument("--no-parity", action="store_true", help="skip the detection parity check against PyTorch")
    p.add_argument("--output", help="write the results as JSON (schema_version 1; updated after every row)")
    p.add_argument("--markdown", help="write the markdown table to this file")
    p.add_argument("--csv", help="write one CSV line per row to this file")
    p.add_argument("--plot", help="write a latency plot (PNG) to this file")
    p.add_argument("--no-samples", action="store_true", help="leave the raw per-call latencies out of the JSON")
    p.add_argument("--title", help="title of the markdown report (default: DEIMv2 latency, or the --vit model)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-row log on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["deimv2-bench", *(sys.argv[1:] if argv is None else argv)])
    return run_cli(lambda: _run(args, command), "deimv2-bench")


def _run(args: argparse.Namespace, command: str) -> int:
    from deimv2_deploy.benchmarks.harness import BenchConfig, run_benchmark
    from deimv2_deploy.benchmarks.report import to_markdown, write_csv, write_json, write_markdown, write_plot

    if args.video and args.mode != "video":
        raise ValueError("--video is only used with --mode video")
    if args.vit is None and args.task:
        raise ValueError(f"--task {','.join(args.task)} chooses EoMT's tasks: it needs --vit EOMT_MODEL")
    if args.vit is not None and args.plot:
        raise ValueError("--plot compares DEIMv2 sizes; a --vit run has one model: use --markdown, --csv or --output")
    dataset = _accuracy_dataset(args)
    tasks = tuple(dict.fromkeys(t.strip().lower() for v in args.task or () for t in v.split(",") if t.strip()))
    config = BenchConfig(
        sizes=None if args.sizes is None else parse_sizes(args.sizes), vit=args.vit, tasks=tasks,
        backends=parse_backends(args.backends),
        precisions=tuple(dict.fromkeys(_split(args.precision))), device=args.device, batches=args.batch,
        threads=args.threads, warmup=args.warmup, iters=args.iters, seconds=args.seconds, mode=args.mode,
        video=args.video, random_weights=args.random_weights, checkpoint_dir=args.checkpoint_dir,
        checkpoint=args.checkpoint,
        calibration=args.calibration, parity=not args.no_parity, progress=not args.quiet,
        keep_samples=not args.no_samples, command=command, interleave=args.interleave,
        accuracy_images=None if dataset is None else str(dataset.images_dir),
        accuracy_annotations=None if dataset is None else str(dataset.annotation_file), max_images=args.max_images,
        max_ap_drop=args.max_ap_drop)
    on_row = (lambda partial: write_json(partial, args.output)) if args.output else None
    result = run_benchmark(config, on_row=on_row)
    title = args.title or (f"{args.vit} latency" if args.vit else "DEIMv2 latency")
    text = to_markdown(result, title)
    print(text)
    written = []
    if args.output:
        written.append(write_json(result, args.output))
    if args.markdown:
        written.append(write_markdown(result, args.markdown, title))
    if args.csv:
        written.append(write_csv(result, args.csv))
    if args.plot:
        if any(r.status == "ok" for r in result.rows):
            written.append(write_plot(result, args.plot))
        else:
            print("deimv2-bench: no row was timed, so no plot was written", file=sys.stderr)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    failed = [r for r in result.rows if r.status == "failed"]
    return 1 if failed else 0


def _accuracy_dataset(args: argparse.Namespace):
    """The --accuracy dataset's paths (None without --accuracy); the dataset flags alone are a mistake."""
    given = [flag for flag, value in (("--images", args.images), ("--annotations", args.annotations),
                                      ("--data", args.data), ("--max-images", args.max_images)) if value is not None]
    if not args.accuracy:
        if given:
            raise ValueError(f"{given[0]} gives the dataset of --accuracy: add --accuracy (or leave it out)")
        return None
    from deimv2_deploy.data.coco import resolve_dataset

    if args.data is None and args.annotations is None:
        raise ValueError("--accuracy needs a COCO-format dataset: --images DIR --annotations FILE, or --data DIR")
    if args.data is not None:
        return resolve_dataset(args.data, images=args.images, annotations=args.annotations, split=args.split)
    return resolve_dataset(images=args.images, annotations=args.annotations)


if __name__ == "__main__":
    raise SystemExit(main())
