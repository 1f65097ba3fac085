"""EoMT-DINOv3 segmentation and DINOv3 features on videos and cameras, through the detector's video pipeline.

    summary = run_vit_video(runtime, "street.mp4", output="street_seg.mp4", json_path="street.jsonl",
                            tasks=("semantic", "instance"), score_threshold=0.5)

`runtime` is an EomtRuntime or a Dinov3Runtime (duck-typed on `runtime.spec.family`: this module sits below the
runtimes). The pipeline is video.py's `run_frames`: the same source opening (file, camera index, RTSP/HTTP URL),
reader thread, verified atomic writer (`<name>.partial.<ext>` kept on an error, Ctrl-C or SIGTERM), progress bar
and summary. Per frame:
- EoMT: the output frame is `draw_segmentation` of the tasks asked for, side by side (semantic | instance |
  panoptic), each panel at the source's size; the JSON line is `frame`, `timestamp` and
  `vit_records.segmentation_record` with the semantic map as one COCO RLE mask per class present (no PNG per
  frame). Instances below `score_threshold`, and past `max_instances`, are dropped in the inference thread, so the
  frames queued for the writer hold only the masks that are drawn and written.
- DINOv3: the output frame is the frame beside the PCA colours of its patch embeddings (twice the source's width);
  the JSON line carries `vit_records.embeddings_record`: `cls`, `pooled` and `registers` as base64 float32, the
  patch grid's shape (`grid`, `dim`) but not the grid itself (rows x cols x D floats a frame: use
  `Dinov3Runtime.predict` on the frames, or `video.stream`-style code, where the patches are wanted).
Pre- and post-processing run inside `runtime.predict`, in the pipeline's inference thread (its "infer" stage).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from deimv2_deploy.drawing import draw_segmentation, embeddings_pca_image
from deimv2_deploy.segmentation import InstanceSegments, Segmentation
from deimv2_deploy.video import FrameModel, VideoSummary, run_frames
from deimv2_deploy.vit_records import embeddings_record, segmentation_record

__all__ = ["run_vit_video", "eomt_frame_model", "dinov3_frame_model"]


def _kept(seg: Segmentation, score_threshold: float, max_instances: int | None) -> Segmentation:
    """`seg` with only the instances at or above the threshold, at most `max_instances` (they come best first)."""
    if seg.instances is None:
        return seg
    kept = seg.instances.filter(score_threshold)
    count = len(kept) if max_instances is None else min(len(kept), max_instances)
    return dataclasses.replace(seg, instances=InstanceSegments(kept.masks[:count], kept.scores[:count],
                                                               kept.labels[:count], kept.queries[:count],
                                                               kept.class_names))


def eomt_frame_model(runtime: Any, tasks: Sequence[str], score_threshold: float = 0.5,
                     max_instances: int | None = None, stuff_classes: Any = None) -> FrameModel:
    """An EomtRuntime as a FrameModel: the overlays of `tasks` side by side, segmentation records with RLE masks."""
    tasks = tuple(tasks)
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ValueError(f"score_threshold must lie in [0, 1], got {score_threshold}")
    if max_instances is not None and max_instances < 0:
        raise ValueError(f"max_instances must be >= 0 or None (no limit), got {max_instances}")
    if "panoptic" in tasks:
        runtime.stuff_classes(stuff_classes)  # an unknown split fails here, before the source is opened

    def predict(frames: list[np.ndarray], _prepared: Any) -> list[Segmentation]:
        segs = runtime.predict(frames, tasks=tasks, stuff_classes=stuff_classes)
        return [_kept(s, score_threshold, max_instances) for s in segs]

    def draw(frame: np.ndarray, seg: Segmentation) -> np.ndarray:
        return draw_segmentation(frame, seg, score_threshold)

    def record(seg: Segmentation) -> dict[str, Any]:
        return segmentation_record(seg, score_threshold, max_instances, semantic_masks=True)

    return FrameModel(predict, draw, record, describe=lambda: {**runtime.describe(), "tasks": list(tasks)})


def dinov3_frame_model(runtime: Any) -> FrameModel:
    """A Dinov3Runtime as a FrameModel: each frame beside its PCA colours; CLS, pooled and registers per line."""

    def predict(frames: list[np.ndarray], _prepared: Any) -> list[Any]:
        return runtime.predict(frames)

    def draw(frame: np.ndarray, emb: Any) -> np.ndarray:
        return np.concatenate([frame, embeddings_pca_image(emb, frame.shape[:2])], axis=1)

    return FrameModel(predict, draw, embeddings_record, describe=runtime.describe)


def run_vit_video(runtime: Any, source: str | int | os.PathLike, *, output: str | os.PathLike | None = None,
                  json_path: str | os.PathLike | None = None, tasks: Sequence[str] | None = None,
                  score_threshold: float = 0.5, max_instances: int | None = None, stuff_classes: Any = None,
                  batch: int = 1, max_frames: int | None = None, draw: bool = True, progress: bool = True,
                  preview: bool = False, queue_size: int = 8) -> VideoSummary:
    """Run an EoMT or DINOv3 runtime on every frame of `source` (file, camera index, URL); write the drawn video
    and/or JSON lines as the module docstring says. `tasks` (EoMT; default semantic and instance, as
    `EomtRuntime.predict`), `score_threshold`, `max_instances` and `stuff_classes` mean what they mean for
    deimv2-infer's images; a DINOv3 runtime takes none of them. Everything else as `video.run_video`."""
    family = runtime.spec.family
    if family == "eomt":
        tasks = ("semantic", "instance") if tasks is None else (tasks,) if isinstance(tasks, str) else tasks
        model = eomt_frame_model(runtime, tasks, score_threshold, max_instances, stuff_classes)
    elif family == "dinov3":
        given = [name for name, value in (("tasks", tasks), ("max_instances", max_instances),
                                          ("stuff_classes", stuff_classes)) if value is not None]
        if given:
            raise ValueError(f"{given[0]} is for EoMT segmentation; this is a DINOv3 feature extractor: leave it out")
        model = dinov3_frame_model(runtime)
    else:
        raise ValueError(f"run_vit_video takes EoMT or DINOv3 runtimes, not a {family!r} one: use video.run_video "
                         "for DEIMv2 detectors")
    return run_frames(model, source, output=output, json_path=json_path, batch=batch, max_frames=max_frames,
                      draw=draw, progress=progress, preview=preview, queue_size=queue_size)
