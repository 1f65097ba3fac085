"""How many training samples per second does the data pipeline make on one CPU core?

For 320x320 and 640x640 source JPEGs (synthetic scenes: textured background, a few filled shapes), times
`TrainDataset[i]` (JPEG decode, augmentation, conversion to a normalised CHW tensor) in each stage of the
epoch policy, and `BatchCollator` (mixup / copy-blend / multi-scale) per image for the sizes that use it:

- no_aug: flip + resize only (the first and last epochs)
- mosaic: the mosaic stage (a sample is a mosaic with the recipe's probability, else zoom-out + IoU crop)
- aug:    photometric distortion, zoom-out, IoU crop, flip, resize

The process is pinned to one core with OpenCV and torch on one thread. Stages alternate for `--repeats`
rounds and the median round is reported, because the machine is shared.

    PYTHONPATH=. .venv/bin/python benchmarks/train_pipeline.py --markdown benchmarks/train_pipeline.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from deimv2_deploy.benchmarks.sysinfo import command_line, cpu_info, load_average
from deimv2_deploy.training.augment_recipe import get_augment_recipe
from deimv2_deploy.training.collate import BatchCollator
from deimv2_deploy.training.dataset import DetectionRecord, TrainDataset


def write_scenes(folder: Path, count: int, side: int, seed: int = 0) -> list[DetectionRecord]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        image = cv2.GaussianBlur(rng.integers(0, 256, (side, side, 3), dtype=np.uint8), (0, 0), 3)
        boxes, labels = [], []
        for _ in range(int(rng.integers(2, 9))):
            w, h = (int(v) for v in rng.integers(side // 16, side // 3, 2))
            x, y = int(rng.integers(0, side - w)), int(rng.integers(0, side - h))
            cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), tuple(int(c) for c in rng.integers(0, 256, 3)), -1)
            boxes.append([x, y, x + w, y + h])
            labels.append(int(rng.integers(0, 10)))
        path = folder / f"{side}_{i:03d}.jpg"
        cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        records.append(DetectionRecord(path, np.array(boxes, np.float32), np.array(labels)))
    return records


def time_samples(dataset: TrainDataset, epoch: int, samples: int) -> float:
    dataset.set_epoch(epoch)
    start = time.perf_counter()
    for i in range(samples):
        dataset[i % len(dataset)]
    return samples / (time.perf_counter() - start)


def time_collation(dataset: TrainDataset, collator: BatchCollator, epoch: int, batches: int, batch: int) -> float:
    dataset.set_epoch(epoch)
    collator.set_epoch(epoch)
    items = [dataset[i % len(dataset)] for i in range(batch)]
    start = time.perf_counter()
    for k in range(batches):
        for i, (_, target) in enumerate(items):
            target["idx"] = torch.tensor(k * batch + i)  # a new draw per batch
        collator(items)
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=60, help="samples per stage per round")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", type=Path, help="write the table here")
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    load_before = load_average()

    # (source side, size): atto trains at 320 from 320 sources; pico (no normalisation) and s (normalised,
    # mixup / copy-blend / multi-scale) at 640 from 640 sources
    configs = [(320, "atto"), (640, "pico"), (640, "s")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {side: write_scenes(Path(tmp), 32, side, seed=side) for side in {s for s, _ in configs}}
        plans = []
        for side, size in configs:
            recipe = get_augment_recipe(size)
            dataset = TrainDataset(sources[side], recipe, seed=0)
            e0, e1, _ = recipe.policy_epochs
            stages = {"no_aug": 0, "mosaic": e0, "aug": e1}
            plans.append((side, size, recipe, dataset, stages))
            if size == "pico":  # the official per-worker cache as the mosaic's partner source
                cached = TrainDataset(sources[side], recipe, seed=0, mosaic_source="cache")
                plans.append((side, size, recipe, cached, {"mosaic (cache source)": e0}))
        results: dict[tuple[int, str, str], list[float]] = {}
        for _ in range(args.repeats):
            for side, size, recipe, dataset, stages in plans:
                for stage, epoch in stages.items():
                    results.setdefault((side, size, stage), []).append(time_samples(dataset, epoch, args.samples))
                if (recipe.mixup_prob > 0 or recipe.scales is not None) and "mosaic" in stages:
                    collator = BatchCollator(recipe, seed=0)
                    results.setdefault((side, size, "collate"), []).append(
                        time_collation(dataset, collator, stages["mosaic"], 8, 8))
        for (side, size, stage), values in results.items():
            rows.append((side, size, stage, statistics.median(values), values))

    cpu = cpu_info()
    lines = [
        "# Training data pipeline throughput, one CPU core",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {cpu['model']}, pinned to one core; OpenCV {cv2.__version__} and torch {torch.__version__} "
        f"on one thread; load average {load_before} before, {load_average()} after (a shared machine)",
        f"- command: `{command_line()}`",
        f"- {args.samples} samples per stage per round, median of {args.repeats} alternating rounds; sources are "
        "JPEG (quality 90) synthetic scenes, decoded in every sample as in training",
        "- sample stages: `TrainDataset[i]` (decode, augment, normalise, tensors) in the epochs of each policy stage; "
        "`collate`: `BatchCollator` alone on batches of 8 in the mosaic stage (mixup or copy-blend, multi-scale), "
        "images per second",
        "",
        "| source | size (input) | stage | images/s | rounds |",
        "|---|---|---|---:|---|",
    ]
    for side, size, stage, median, values in rows:
        recipe = get_augment_recipe(size)
        lines.append(f"| {side}x{side} | {size} ({recipe.input_size[0]}) | {stage} | {median:.1f} | "
                     f"{', '.join(f'{v:.1f}' for v in values)} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
