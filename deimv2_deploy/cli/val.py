"""deimv2-val ARTIFACT: COCO mAP of any artifact on a COCO-format dataset (the official evaluation protocol);
for an EoMT-DINOv3 artifact (`deimv2-export eomt`), mIoU, PQ and mask AP on a COCO panoptic dataset
(deimv2_deploy.segmentation_evaluation)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deimv2-val",
        description="COCO bbox mAP of a DEIMv2 artifact (.onnx, .xml, .engine, checkpoint) on a COCO-format dataset: "
                    "top-300 detections per image, no score threshold, boxes in original pixels. For an EoMT-DINOv3 "
                    "artifact (deimv2-export eomt): mIoU, PQ/SQ/RQ and mask AP on a COCO panoptic dataset, the "
                    "official EoMT post-processing of each task, classes matched to categories by name.",
        epilog="Examples:\n  deimv2-val models/deimv2_atto_fp32.onnx --images coco/val2017 "
               "--annotations coco/annotations/instances_val2017.json\n"
               "  deimv2-val models/deimv2_atto_fp32.xml --data data/shapes_val --json val.json --per-class\n"
               "  deimv2-val models/eomt_dinov3_synth_320x320_fp32.onnx --data data/shapes_val --json seg.json\n"
               "  deimv2-val eomt.xml --images coco/val2017 --panoptic coco/annotations/panoptic_val2017.json\n",
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
    seg = p.add_argument_group("EoMT-DINOv3 artifacts", "segmentation metrics on a COCO panoptic dataset: --data DIR "
                                                          "(DIR/annotations/panoptic_<split>.json, its PNG folder, "
                                                          "DIR/<split>/) or --images + --panoptic")
    seg.add_argument("--panoptic", metavar="JSON", help="COCO panoptic JSON (instead of --annotations)")
    seg.add_argument("--panoptic-masks", metavar="DIR",
                     help="folder of its PNGs (default: the JSON's path without .json, the COCO layout)")
    seg.add_argument("--task", action="append",
                     help="semantic, panoptic, instance (repeatable or comma-separated; default: all three)")
    seg.add_argument("--stuff-classes", metavar="LIST",
                     help="the model's stuff classes for panoptic, by label or name ('80-132', 'background'; "
                          "'none': all things), when the artifact does not record them or to override it")
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


def _vit_spec(args: argparse.Namespace) -> Any:
    """The VitSpec of an EoMT / DINOv3 artifact (ours), or None for anything else."""
    artifact = Path(args.artifact)
    if artifact.suffix.lower() not in (".onnx", ".xml") or not artifact.is_file():
        return None
    from deimv2_deploy.runtimes.vit_runtime import read_vit_spec

    return read_vit_spec(artifact)


def _eomt_body(args: argparse.Namespace, spec: Any) -> int:
    from deimv2_deploy.data.panoptic import load_panoptic, resolve_panoptic_dataset
    from deimv2_deploy.runtimes.vit_runtime import load_vit_runtime
    from deimv2_deploy.segmentation_evaluation import (
        SEGMENTATION_TASKS,
        evaluate_segmentation,
        format_segmentation_metrics,
        match_classes_by_name,
    )
    from deimv2_deploy.vit_spec import parse_stuff_classes

    artifact = Path(args.artifact)
    if spec.family != "eomt":
        raise ValueError(f"{artifact.name} is a DINOv3 feature extractor: deimv2-val measures detection (COCO mAP) "
                         "and segmentation (mIoU, PQ), and features have no such metric: write its embeddings with "
                         "deimv2-infer and score them on your downstream task")
    for flag, given in (("--annotations", args.annotations), ("--variant", args.variant),
                        ("--precision", args.precision)):
        if given is not None:
            raise ValueError(f"{flag} is for DEIMv2 detector artifacts; {artifact.name} is an EoMT artifact: "
                             + ("pass its COCO panoptic JSON with --panoptic (or --data DIR)"
                                if flag == "--annotations" else "leave it out"))
    if args.device.lower() != "cpu":
        raise ValueError(f"EoMT artifacts run on the CPU (ONNX Runtime or OpenVINO), not --device {args.device}")
    tasks: list[str] = []
    for value in args.task or ():
        for task in (t.strip().lower() for t in value.split(",") if t.strip()):
            if task not in SEGMENTATION_TASKS:
                raise ValueError(f"--task {task!r} is not a segmentation task: choose from "
                                 f"{', '.join(SEGMENTATION_TASKS)}")
            tasks.append(task)
    paths = resolve_panoptic_dataset(args.data, images=args.images, panoptic=args.panoptic, masks=args.panoptic_masks,
                                     split=args.split)
    dataset = load_panoptic(paths.images_dir, paths.annotation_file, paths.masks_dir)
    # every dataset, class and option error before the model loads
    match_classes_by_name(spec.class_names, dataset.categories, model=f"the model ({artifact.name})",
                          dataset=f"the dataset ({paths.annotation_file.name})")
    if args.stuff_classes is not None:
        parse_stuff_classes(args.stuff_classes, spec.class_names)
    backend = args.backend.lower() if args.backend else None
    t0 = time.perf_counter()
    runtime = load_vit_runtime(artifact, backend=backend, threads=args.threads, spec=spec)
    print(f"loaded {artifact} on {runtime.backend} in {time.perf_counter() - t0:.2f} s: {runtime.spec.describe()}",
          file=sys.stderr)
    count = len(dataset) if args.max_images is None else min(args.max_images, len(dataset))
    print(f"dataset: {paths.annotation_file} ({count} of {len(dataset)} images, {len(dataset.categories)} "
          f"categories, {sum(c.isthing for c in dataset.categories)} things)", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        result = evaluate_segmentation(runtime, dataset, tasks=tasks or SEGMENTATION_TASKS, batch=args.batch,
                                       max_images=args.max_images, progress=not args.quiet,
                                       stuff_classes=args.stuff_classes)
    finally:
        runtime.close()
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return _report(result, f"{runtime.backend} {runtime.spec.precision} EoMT-DINOv3: {result['images']} images, "
                           f"tasks {', '.join(result['tasks'])}",
                   format_segmentation_metrics(result, per_class=args.per_class), args.json)


def _body(args: argparse.Namespace) -> int:
    vit = _vit_spec(args)
    if vit is not None:
        return _eomt_body(args, vit)
    for flag, given in (("--panoptic", args.panoptic), ("--panoptic-masks", args.panoptic_masks),
                        ("--task", args.task), ("--stuff-classes", args.stuff_classes)):
        if given:
            raise ValueError(f"{flag} is for EoMT-DINOv3 artifacts (deimv2-export eomt); {args.artifact} is not one")
    if args.annotations is None and args.data is None:
        raise ValueError("give the dataset: --images DIR --annotations FILE, or --data DIR")
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
    return _report(result, f"{runtime.backend.value} {runtime.spec.precision} DEIMv2-{runtime.spec.variant}: "
                           f"{result['images']} images, {result['detections']} detections, "
                           f"{result['evaluator']['name']} {result['evaluator']['version']}",
                   format_metrics(result, per_class=args.per_class), args.json)


def _report(result: dict, headline: str, table: str, json_out: str | None) -> int:
    """Notes to stderr, the headline and metrics table to stdout, and the result as JSON (written atomically)."""
    for note in result.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    print(headline)
    print(table)
    if json_out:
        from deimv2_deploy.media import atomic_path

        with atomic_path(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=2))
        print(f"wrote {json_out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images must be >= 1, got {args.max_images}")
    if args.data is None and args.annotations is None and args.panoptic is None:
        parser.error("give the dataset: --images DIR --annotations FILE, or --data DIR (EoMT: --images DIR "
                     "--panoptic FILE, or --data DIR)")
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
