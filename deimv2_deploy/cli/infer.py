"""deimv2-infer ARTIFACT INPUT...: detections on images, folders and videos (any backend)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from deimv2_deploy.cli import run_cli
from deimv2_deploy.media import expand_image_paths, read_image, write_image

__all__ = ["main", "build_parser"]


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
    p.add_argument("--json", nargs="?", const=True, default=None, metavar="PATH",
                   help="images: write <name>.json beside each annotated image; video: detections as JSON lines "
                        "to PATH")
    p.add_argument("--backend", help="onnxruntime, openvino, tensorrt or torch (default: from the file type)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, GPU/NPU/AUTO for OpenVINO")
    p.add_argument("--variant", help="model size, for files without deimv2 metadata (official-exporter ONNX)")
    p.add_argument("--threads", type=int, help="inference threads")
    p.add_argument("--letterbox", action="store_true", help="keep aspect ratio (pad) instead of stretching")
    p.add_argument("--no-draw", action="store_true", help="do not write annotated images/video")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.inputs and getattr(args, "source", None) is None:
        parser.error("give at least one image, folder or video (or --source for a camera/stream)")
    if not 0.0 <= args.score <= 1.0:
        parser.error(f"--score must lie in [0, 1], got {args.score}")
    if args.max_detections is not None and args.max_detections < 0:
        parser.error(f"--max-detections must be >= 0, got {args.max_detections}")

    def body() -> int:
        from deimv2_deploy.runtimes import load_runtime

        options = {"threads": args.threads} if args.threads else {}
        video = _is_video(args)
        if video:
            from deimv2_deploy.video import video_runtime_options

            options.update(video_runtime_options(args.artifact, args.backend))
        t0 = time.perf_counter()
        runtime = load_runtime(args.artifact, backend=args.backend, device=args.device, variant=args.variant,
                               **options)
        if args.letterbox:
            from deimv2_deploy.preprocess import Preprocessor

            runtime.preprocessor = Preprocessor(runtime.spec, resize="letterbox")
        print(f"loaded {args.artifact} on {runtime.backend.value}/{runtime.device} in "
              f"{time.perf_counter() - t0:.2f} s: {runtime.spec.describe()}", file=sys.stderr)
        if runtime.spec.random_weights:
            print("NOTE: this artifact has random weights: its detections are meaningless", file=sys.stderr)
        if video:
            from deimv2_deploy.cli.video_cli import run_video

            return run_video(args, runtime)
        return _run_images(args, runtime)

    return run_cli(body, "deimv2-infer")


def _run_images(args: argparse.Namespace, runtime) -> int:
    from deimv2_deploy.drawing import annotate

    paths = expand_image_paths(args.inputs)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in paths:
        try:
            image = read_image(path)
        except (ValueError, FileNotFoundError, IsADirectoryError) as e:
            print(f"skipped {path}: {e}", file=sys.stderr)
            failures += 1
            continue
        t = time.perf_counter()
        detections = runtime.predict(image, score_threshold=args.score)
        if args.max_detections is not None:
            detections = detections[:args.max_detections]  # predict() returns them best first
        ms = 1e3 * (time.perf_counter() - t)
        names = {}
        for name in detections.names:
            names[name] = names.get(name, 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(names.items(), key=lambda kv: -kv[1])) or "nothing"
        written = []
        if not args.no_draw:
            written.append(write_image(out_dir / f"{path.stem}.jpg", annotate(image, detections)))
        if args.json:
            record = {"image": str(path), "artifact": str(args.artifact), **detections.to_dict()}
            target = out_dir / f"{path.stem}.json"
            target.write_text(json.dumps(record, indent=1))
            written.append(target)
        print(f"{path}: {len(detections)} detections ({summary}) in {ms:.1f} ms"
              + (f" -> {', '.join(map(str, written))}" if written else ""))
    if failures:
        print(f"{failures} of {len(paths)} inputs could not be read", file=sys.stderr)
    return 1 if failures == len(paths) else 0


if __name__ == "__main__":
    sys.exit(main())
