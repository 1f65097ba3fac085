"""deimv2-val ARTIFACT: COCO mAP of any artifact on a COCO-format dataset (the official evaluation protocol)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deimv2-val",
        description="COCO bbox mAP of a DEIMv2 artifact (.onnx, .xml, .engine, checkpoint) on a COCO-format dataset: "
                    "top-300 detections per image, no score threshold, boxes in original pixels.",
        epilog="Examples:\n  deimv2-val models/deimv2_atto_fp32.onnx --images coco/val2017 "
               "--annotations coco/annotations/instances_val2017.json\n"
               "  deimv2-val models/deimv2_atto_fp32.xml --data data/shapes_val --json val.json --per-class\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="exported model or checkpoint")
    p.add_argument("--images", help="image folder")
    p.add_argument("--annotations", help="COCO instances JSON")
    p.add_argument("--data", metavar="DIR",
                   help="dataset folder in a standard layout, instead of --images and --annotations "
                        "(DIR/annotations/instances_<split>.json + DIR/<split>/)")
    p.add_argument("--split", default="val", help="split to look for with --data (default val)")
    p.add_argument("--json", metavar="OUT", help="write the metrics (and per-class AP) as JSON to OUT")
    p.add_argument("--batch", type=int, default=8, help="images per inference call (default 8)")
    p.add_argument("--max-images", type=int, default=None, metavar="N", help="evaluate the first N images only")
    p.add_argument("--backend", help="onnxruntime, openvino, tensorrt or torch (default: from the file type)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, GPU/NPU/AUTO for OpenVINO")
    p.add_argument("--precision",
                   help="inference precision where the backend chooses one at load time: torch fp32|fp16, OpenVINO "
                        "auto|fp32|bf16|fp16|int8 (deimv2_deploy.precision); ONNX Runtime and TensorRT run the "
                        "precision the artifact was exported in")
    p.add_argument("--variant", help="model size, for files without deimv2 metadata (official-exporter ONNX)")
    p.add_argument("--threads", type=int, help="inference threads")
    p.add_argument("--per-class", action="store_true", help="also print AP per class")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _backend_options(args: argparse.Namespace, backend: str) -> dict:
    options: dict = {"threads": args.threads} if args.threads else {}
    if args.precision is None:
        return options
    precision = args.precision.lower()
    if backend == "torch":
        options["precision"] = {"f32": "fp32", "f16": "fp16"}.get(precision, precision)
    elif backend == "openvino":
        options["precision"] = precision  # the precision policy (auto, fp32, bf16, fp16, int8)
    else:
        raise ValueError(f"--precision does not apply to {backend}: it runs the precision the artifact was exported "
                         f"in; export the artifact with deimv2-export --precision {precision} instead")
    return options


def _body(args: argparse.Namespace) -> int:
    from deimv2_deploy.data.coco import load_coco, resolve_dataset
    from deimv2_deploy.evaluation import evaluate_dataset, evaluator_info, format_metrics
    from deimv2_deploy.runtimes import Backend, backend_for_path, load_runtime

    evaluator_info()  # fail before any work when the evaluator is missing
    if args.data is not None:
        paths = resolve_dataset(args.data, images=args.images, annotations=args.annotations, split=args.split)
    else:
        paths = resolve_dataset(images=args.images, annotations=args.annotations)
    dataset = load_coco(paths.images_dir, paths.annotation_file)  # every dataset error before loading the model

    artifact = Path(args.artifact)
    if not artifact.exists():
        raise FileNotFoundError(f"artifact not found: {artifact}")
    backend = Backend.parse(args.backend) if args.backend else backend_for_path(artifact)[0]
    options = _backend_options(args, backend.value)
    t0 = time.perf_counter()
    runtime = load_runtime(artifact, backend=backend, device=args.device, variant=args.variant, **options)
    print(f"loaded {artifact} on {runtime.backend.value}/{runtime.device} in {time.perf_counter() - t0:.2f} s: "
          f"{runtime.spec.describe()}", file=sys.stderr)
    if runtime.spec.random_weights:
        print("NOTE: this artifact has random weights: expect an AP near 0", file=sys.stderr)
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    print(f"dataset: {paths.annotation_file} ({count} of {len(dataset)} images, {len(dataset.categories)} "
          "categories)", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        result = evaluate_dataset(runtime, dataset, batch=args.batch, max_images=args.max_images,
                                  progress=not args.quiet)
    finally:
        runtime.close()
    result["seconds"] = round(time.perf_counter() - t0, 3)
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(f"{runtime.backend.value} {runtime.spec.precision} DEIMv2-{runtime.spec.variant}: {result['images']} images, "
          f"{result['detections']} detections, {result['evaluator']['name']} {result['evaluator']['version']}")
    print(format_metrics(result, per_class=args.per_class))
    if args.json:
        from deimv2_deploy.media import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images must be >= 1, got {args.max_images}")
    if args.data is None and args.annotations is None:
        parser.error("give the dataset: --images DIR --annotations FILE, or --data DIR")
    try:
        return _body(args)
    except KeyboardInterrupt:
        print("deimv2-val: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError, ImportError) as e:  # DatasetError/CategoryMismatchError: ValueError
        print(f"deimv2-val: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
