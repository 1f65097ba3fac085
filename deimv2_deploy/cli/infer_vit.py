"""The EoMT-DINOv3 / DINOv3 half of deimv2-infer: images and folders through an EomtRuntime or Dinov3Runtime.

deimv2-infer hands over with `run_vit_images(args, runtime)` when the artifact is one of ours (`deimv2-export eomt |
dinov3`). Per image, under the same collision-free name the detector path uses (`infer.output_names`):
- EoMT: `<name>.jpg`, the overlay of each task asked for side by side (semantic | instance | panoptic), and
  `<name>.json`: instances (score >= --score, best first) and panoptic segments, each with a COCO RLE mask
  (faster-coco-eval's mask API, counts as text; the record is deimv2_deploy.vit_records', which deimv2-serve
  answers too), and `<name>_semantic.png`, the semantic map as a PNG of class
  indices (8-bit, 16-bit past 255 classes);
- DINOv3: `<name>.jpg`, the image beside the PCA colouring of its patch embeddings, and `<name>.npz` with `cls`,
  `registers`, `patches` (rows, cols, D) and `pooled`.
Every file is written atomically (deimv2_deploy.files). Options that only a detector understands are refused in one
line.

A video file, camera index or stream URL goes through `run_vit_video_cli(args, runtime)`: the detector's video
pipeline (deimv2_deploy.vit_video), with deimv2-infer's video conventions (cli/video_cli.py: `<output-dir>/<name>.mp4`
or --output, `--json` for `<name>.jsonl` or --json PATH, --max-frames, --batch, the summary table, exit status 1 on
an error with `<name>.partial.<ext>` kept, 130 on Ctrl-C). EoMT: the overlays side by side per frame and one JSON
line per frame (the record above, the semantic map as one RLE mask per class); DINOv3: the frame beside its PCA
colours and one line per frame with `cls`, `pooled`, `registers` (base64 float32; not the patch grid).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from deimv2_deploy.files import write_bytes, write_text
from deimv2_deploy.media import write_image
from deimv2_deploy.vit_records import segmentation_record

__all__ = ["run_vit_images", "run_vit_video_cli", "check_vit_options", "parse_tasks"]


def parse_tasks(values: list[str] | None, spec: Any) -> tuple[str, ...]:
    """--task values (repeated or comma-separated) -> EoMT tasks; default: semantic and instance, plus panoptic when
    the artifact records its stuff classes."""
    from deimv2_deploy.runtimes.vit_runtime import parse_eomt_tasks

    return parse_eomt_tasks(values, spec, option="--task")


def check_vit_options(args: argparse.Namespace, runtime: Any, video: bool = False) -> None:
    """One line for an option this artifact cannot use (detector-only, or EoMT-only on a DINOv3 artifact).
    `video`: the input is a video (then --json PATH names the JSON lines file, as for detectors)."""
    family = runtime.spec.family
    detector_only = [("--letterbox", bool(getattr(args, "letterbox", False))),
                     ("--json PATH", not video and isinstance(getattr(args, "json", None), str))]
    for flag, given in detector_only:
        if given:
            raise ValueError(f"{flag} is for DEIMv2 detector artifacts; {runtime.path.name} is a {family} artifact "
                             "(its own official preprocessing, one JSON per image): leave it out")
    if family != "eomt":
        for flag, given in (("--task", bool(getattr(args, "task", None))),
                            ("--stuff-classes", getattr(args, "stuff_classes", None) is not None),
                            ("--max-detections", getattr(args, "max_detections", None) is not None)):
            if given:
                raise ValueError(f"{flag} is for EoMT segmentation artifacts; {runtime.path.name} is a DINOv3 "
                                 "feature extractor: leave it out")


def _semantic_png(semantic: np.ndarray) -> bytes:
    import cv2

    dtype = np.uint8 if semantic.max(initial=0) < 256 else np.uint16
    ok, buf = cv2.imencode(".png", semantic.astype(dtype))
    if not ok:
        raise ValueError("cannot encode the semantic map as PNG")
    return buf.tobytes()


def _npz(emb: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, cls=emb.cls, registers=emb.registers, patches=emb.patches, pooled=emb.pooled,
             image_size=np.asarray(emb.image_size, np.int64))
    return buffer.getvalue()


def _summary(seg: Any, score_threshold: float) -> str:
    parts = []
    if seg.semantic is not None:
        parts.append(f"semantic {len(np.unique(seg.semantic))} classes")
    if seg.instances is not None:
        parts.append(f"{len(seg.instances.filter(score_threshold))} instances >= {score_threshold:g}")
    if seg.panoptic is not None:
        things = sum(s.is_thing for s in seg.panoptic.segments)
        parts.append(f"panoptic {things} things + {len(seg.panoptic) - things} stuff")
    return ", ".join(parts)


def run_vit_images(args: argparse.Namespace, runtime: Any) -> int:
    """Run an EoMT or DINOv3 runtime on the image inputs; writes the files named in the module's docstring."""
    from deimv2_deploy.cli.infer import read_inputs, unique_image_paths
    from deimv2_deploy.drawing import draw_segmentation, embeddings_pca_image

    check_vit_options(args, runtime)
    eomt = runtime.spec.family == "eomt"
    tasks = parse_tasks(getattr(args, "task", None), runtime.spec) if eomt else ()
    stuff = getattr(args, "stuff_classes", None)
    if eomt and "panoptic" in tasks:
        runtime.stuff_classes(stuff)  # an unknown split fails here, once, before any image is read
    paths = unique_image_paths(args.inputs)
    out_dir = Path(args.output_dir)
    failed: list[Path] = []
    for path, name, image in read_inputs(paths, failed):
        t = time.perf_counter()
        result = runtime.predict(image, tasks=tasks, stuff_classes=stuff) if eomt else runtime.predict(image)
        ms = 1e3 * (time.perf_counter() - t)
        written = []
        if eomt:
            if not args.no_draw:
                written.append(write_image(out_dir / f"{name}.jpg", draw_segmentation(image, result, args.score)))
            record = {"image": str(path), "artifact": str(args.artifact), "tasks": list(tasks),
                      **segmentation_record(result, args.score, args.max_detections)}
            if result.semantic is not None:
                png = write_bytes(out_dir / f"{name}_semantic.png", _semantic_png(result.semantic))
                record["semantic"]["png"] = png.name
                written.append(png)
            written.append(write_text(out_dir / f"{name}.json", json.dumps(record, indent=1) + "\n"))
            summary = _summary(result, args.score)
        else:
            if not args.no_draw:
                panel = np.concatenate([image, embeddings_pca_image(result)], axis=1)
                written.append(write_image(out_dir / f"{name}.jpg", panel))
            written.append(write_bytes(out_dir / f"{name}.npz", _npz(result)))
            summary = f"embeddings: dim {result.dim}, {result.grid[0]}x{result.grid[1]} patches"
        print(f"{path}: {summary} in {ms:.1f} ms -> {', '.join(map(str, written))}")
    if failed:
        print(f"deimv2-infer: {len(failed)} of {len(paths)} inputs failed (named above); the others were written",
              file=sys.stderr)
        return 1
    return 0


def run_vit_video_cli(args: argparse.Namespace, runtime: Any) -> int:
    """Run an EoMT or DINOv3 runtime on a video file, camera or stream (see the module docstring)."""
    from deimv2_deploy.cli.video_cli import pipeline_options, preview_wanted, report, video_outputs
    from deimv2_deploy.vit_video import run_vit_video

    check_vit_options(args, runtime, video=True)
    source, video_out, jsonl, draw = video_outputs(args)
    eomt = runtime.spec.family == "eomt"
    options: dict[str, Any] = {}
    if eomt:
        options = {"tasks": parse_tasks(getattr(args, "task", None), runtime.spec), "score_threshold": args.score,
                   "max_instances": getattr(args, "max_detections", None),
                   "stuff_classes": getattr(args, "stuff_classes", None)}
    # errors carry a note saying where the partial output was kept; run_cli prints it with the error
    summary = run_vit_video(runtime, int(source) if source.isdigit() else source, output=video_out, json_path=jsonl,
                            draw=draw, preview=preview_wanted(args), **options, **pipeline_options(args))
    return report(summary, args)
