"""deimv2-infer ARTIFACT INPUT...: detections on images, folders and videos (any backend); EoMT-DINOv3 segmentation
and DINOv3 features on images, folders and videos (cli/infer_vit.py).

Options go anywhere on the line (`deimv2-infer model.onnx --score 0.5 photo.jpg`). Images: one annotated image
(and with --json one `<name>.json`) per input in --output-dir, each under a name no other input shares; `--json
PATH.json` collects every image's detections in one file instead. The exit status is 1 when any input failed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deimv2_deploy.cli import run_cli, user_message
from deimv2_deploy.files import write_text
from deimv2_deploy.media import expand_image_paths, read_image, write_image
from deimv2_deploy.precision import PRECISION_REQUESTS

__all__ = ["main", "build_parser", "output_names"]

_JSON_SUFFIXES = (".json", ".jsonl")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deimv2-infer",
        description="Run a DEIMv2 artifact (.onnx, .xml, .engine, or a checkpoint) on images, folders or a video.",
        epilog="Examples:\n  deimv2-infer models/deimv2_atto_fp32.onnx photo.jpg --json\n"
               "  deimv2-infer models/deimv2_s_fp32.xml clip.mp4 --output out.mp4 --json out.jsonl\n"
               "  deimv2-infer models/deimv2_atto_fp32.onnx --source 0   # webcam\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="exported model or checkpoint")
    p.add_argument("inputs", nargs="*", help="image files, folders of images, or one video file")
    p.add_argument("--output-dir", default="out", help="where annotated images (and --json files) go (default: out)")
    p.add_argument("--score", type=float, default=0.4, help="score threshold (default 0.4)")
    p.add_argument("--max-detections", type=int, default=None, metavar="N",
                   help="keep at most the N best detections per image/frame")
    p.add_argument("--json", nargs="?", const=True, default=None, metavar="PATH.json",
                   help="alone: <name>.json beside each annotated image (video: <name>.jsonl); with a PATH ending in "
                        ".json or .jsonl: images: every image's detections in that one file; video: JSON lines")
    p.add_argument("--backend", help="onnxruntime, openvino, tensorrt or torch (default: from the file type)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, GPU/NPU/AUTO for OpenVINO")
    p.add_argument("--variant", help="model size, for files without deimv2 metadata (official-exporter ONNX)")
    p.add_argument("--threads", type=int, help="inference threads")
    p.add_argument("--precision", choices=PRECISION_REQUESTS,
                   help="arithmetic to run: auto (bf16 on CPUs that run it natively, else fp32; INT8 artifacts stay "
                        "INT8), fp32 (exact on every CPU), bf16, fp16, int8 (default: the backend's, FP32 for FP32 "
                        "artifacts); the precision that really ran is printed and in --json")
    p.add_argument("--letterbox", action="store_true", help="keep aspect ratio (pad) instead of stretching")
    p.add_argument("--no-draw", action="store_true", help="do not write annotated images/video")
    seg = p.add_argument_group("EoMT-DINOv3 / DINOv3 artifacts (deimv2-export eomt|dinov3)")
    seg.add_argument("--task", action="append", metavar="semantic|instance|panoptic",
                     help="EoMT: the tasks to run (repeat, or comma-separate); default semantic and instance, plus "
                          "panoptic when the artifact records its stuff classes. --score filters instances in the "
                          "drawing and the JSON, --max-detections caps them")
    seg.add_argument("--stuff-classes", metavar="LABELS",
                     help="EoMT panoptic: the stuff classes (80-132, names, or none), overriding the artifact's")
    try:
        from deimv2_deploy.cli.video_cli import add_video_arguments
    except ImportError:
        add_video_arguments = None
    if add_video_arguments is not None:
        add_video_arguments(p)
    return p


def _is_video(args: argparse.Namespace) -> bool:
    """A video file, a camera index or a stream URL (one input), or --source."""
    if getattr(args, "source", None) is not None:
        return True
    from deimv2_deploy.cli.video_cli import looks_like_video

    return len(args.inputs) == 1 and looks_like_video(args.inputs[0])


def _json_flag_alone(argv: list[str]) -> list[str]:
    """`--json` followed by something that is not a .json/.jsonl name takes no value (`--json photo.jpg` means
    JSON output for photo.jpg, not JSON written over it)."""
    out = list(argv)
    for i, token in enumerate(out):
        following = out[i + 1] if i + 1 < len(out) else None
        if token == "--json" and (following is None or not following.lower().endswith(_JSON_SUFFIXES)):
            out[i] = "--json="
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(_json_flag_alone(sys.argv[1:] if argv is None else argv))
    if args.json == "":
        args.json = True
    if not args.inputs and getattr(args, "source", None) is None:
        parser.error("give at least one image, folder or video (or --source for a camera/stream)")
    if not 0.0 <= args.score <= 1.0:
        parser.error(f"--score must lie in [0, 1], got {args.score}")
    if args.max_detections is not None and args.max_detections < 0:
        parser.error(f"--max-detections must be >= 0, got {args.max_detections}")

    def body() -> int:
        import cv2

        from deimv2_deploy.runtimes import load_runtime

        # OpenCV's own warnings (an FFmpeg frame it could not write...) would only repeat, less clearly, the one
        # line this command prints about the problem
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

        options = {"threads": args.threads} if args.threads else {}
        video = _is_video(args)
        if video:
            from deimv2_deploy.runtimes.vit_runtime import read_vit_spec
            from deimv2_deploy.video import video_runtime_options

            vit = read_vit_spec(args.artifact) if Path(args.artifact).suffix.lower() in (".onnx", ".xml") else None
            tuned = video_runtime_options(args.artifact, args.backend)
            if vit is not None:  # ViT runtimes take threads and spinning only (OpenVINO: its default mode)
                tuned = {k: v for k, v in tuned.items() if k == "spinning"}
            options.update(tuned)
        t0 = time.perf_counter()
        runtime = load_runtime(args.artifact, backend=args.backend, device=args.device, variant=args.variant,
                               precision=args.precision, **options)
        from deimv2_deploy.runtimes.vit_runtime import VitRuntime

        if isinstance(runtime, VitRuntime):
            from deimv2_deploy.cli.infer_vit import run_vit_images

            print(f"loaded {args.artifact} on {runtime.backend}/cpu in {time.perf_counter() - t0:.2f} s: "
                  f"{runtime.spec.describe()}; runs {_ran(runtime)}", file=sys.stderr)
            if video:
                from deimv2_deploy.cli.infer_vit import run_vit_video_cli

                return run_vit_video_cli(args, runtime)
            return run_vit_images(args, runtime)
        if args.task or args.stuff_classes is not None:
            raise ValueError(f"--task and --stuff-classes are for EoMT segmentation artifacts; {args.artifact} is a "
                             "DEIMv2 detector: leave them out")
        if args.letterbox:
            from deimv2_deploy.preprocess import Preprocessor

            runtime.preprocessor = Preprocessor(runtime.spec, resize="letterbox")
        print(f"loaded {args.artifact} on {runtime.backend.value}/{runtime.device} in "
              f"{time.perf_counter() - t0:.2f} s: {runtime.spec.describe()}; runs {_ran(runtime)}", file=sys.stderr)
        if runtime.spec.random_weights:
            print("NOTE: this artifact has random weights: its detections are meaningless", file=sys.stderr)
        if video:
            from deimv2_deploy.cli.video_cli import run_video

            return run_video(args, runtime)
        return _run_images(args, runtime)

    return run_cli(body, "deimv2-infer")


def _ran(runtime) -> str:
    """The precision that really runs, and why, for the log line."""
    info = runtime.describe()
    choice = info.get("precision_choice")
    return (info.get("executed_precision") or info.get("precision") or "?") + (f" ({choice['reason']})" if choice
                                                                            else "")


def output_names(paths: list[Path]) -> list[str]:
    """An output name (no extension) per input, all different: the file's stem; where inputs share it, the stem
    with the input's extension (photo_jpg, photo_png), then with its folders (a_photo_jpg, b_photo_jpg)."""
    def name(path: Path, level: int) -> str:
        base = path.stem if level == 0 else f"{path.stem}_{path.suffix.lstrip('.').lower()}".rstrip("_")
        folders = [q.name for q in path.resolve().parents][:max(0, level - 1)]
        return "_".join([*reversed([f for f in folders if f]), base])

    levels = [0] * len(paths)
    names = [name(p, 0) for p in paths]
    for _ in range(8):
        shared = {n for n, count in Counter(names).items() if count > 1}
        if not shared:
            return names
        for i, n in enumerate(names):
            if n in shared:
                levels[i] += 1
                names[i] = name(paths[i], levels[i])
    seen: Counter[str] = Counter()  # names that still clash (folder names with '_' in them): number them
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


def unique_image_paths(inputs: list[str]) -> list[Path]:
    """The image files the inputs name (folders expanded), each file once, in the order given."""
    return list({p.resolve(): p for p in expand_image_paths(inputs)}.values())


def read_inputs(paths: list[Path], failed: list[Path]) -> Iterator[tuple[Path, str, Any]]:
    """(path, output name, BGR image) per input; an unreadable one is named on stderr, added to `failed` and
    skipped, so one bad file does not stop a folder run (the run then exits 1)."""
    for path, name in zip(paths, output_names(paths), strict=True):
        try:
            image = read_image(path)
        except (ValueError, OSError) as e:
            print(f"skipped {path}: {user_message(e)}", file=sys.stderr)
            failed.append(path)
            continue
        yield path, name, image


def _run_images(args: argparse.Namespace, runtime) -> int:
    from deimv2_deploy.drawing import annotate

    paths = unique_image_paths(args.inputs)
    out_dir = Path(args.output_dir)
    one_file = Path(args.json) if isinstance(args.json, str) else None  # --json PATH: all images in one file
    if one_file is not None and one_file.resolve() in {p.resolve() for p in paths}:
        raise ValueError(f"--json {one_file} is one of the inputs: choose another file name")
    records, failed = [], []
    executed = runtime.describe().get("executed_precision")  # what really runs, read from the backend
    for path, name, image in read_inputs(paths, failed):
        t = time.perf_counter()
        detections = runtime.predict(image, score_threshold=args.score)
        if args.max_detections is not None:
            detections = detections[:args.max_detections]  # predict() returns them best first
        ms = 1e3 * (time.perf_counter() - t)
        counts = Counter(detections.names)
        summary = ", ".join(f"{n} {k}" for k, n in counts.most_common()) or "nothing"
        written = []
        if not args.no_draw:
            written.append(write_image(out_dir / f"{name}.jpg", annotate(image, detections)))
        if args.json:
            record = {"image": str(path), "artifact": str(args.artifact), "precision": executed,
                      **detections.to_dict()}
            if one_file is None:
                written.append(write_text(out_dir / f"{name}.json", json.dumps(record, indent=1) + "\n"))
            else:
                records.append(record)
        print(f"{path}: {len(detections)} detections ({summary}) in {ms:.1f} ms"
              + (f" -> {', '.join(map(str, written))}" if written else ""))
    if one_file is not None and records:
        lines = one_file.suffix.lower() == ".jsonl"
        text = ("".join(json.dumps(r) + "\n" for r in records) if lines
                else json.dumps({"artifact": str(args.artifact), "precision": executed, "images": records},
                                indent=1) + "\n")
        print(f"detections of {len(records)} images -> {write_text(one_file, text)}")
    if failed:
        print(f"deimv2-infer: {len(failed)} of {len(paths)} inputs failed (named above); the others were written",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
