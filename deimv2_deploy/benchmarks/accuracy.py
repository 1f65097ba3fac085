"""deimv2-bench --accuracy: COCO AP of every row's own runtime on one COCO-format dataset, beside its latency.

The evaluation is deimv2-val's (`deimv2_deploy.evaluation.evaluate_dataset`: the official protocol, top-300
detections per image, no threshold, faster-coco-eval), run on the row's runtime after its timing, on the same
images for every row (the first `max_images` of the dataset). It is not timed. A row whose evaluation fails (e.g. a
COCO-80 model on a dataset of other classes) keeps its latency and says why its AP is missing.
"""
from __future__ import annotations

import time
from typing import Any

from deimv2_deploy.benchmarks.config import BenchConfig
from deimv2_deploy.runtimes.base import Runtime

__all__ = ["AccuracyProbe", "ACCURACY_KEYS"]

ACCURACY_KEYS = ("AP", "AP50", "AP75")  # kept per row (the table and CSV show AP and AP50)


class AccuracyProbe:
    """The dataset of a --accuracy run, loaded and checked once before any row (a bad dataset stops the run)."""

    def __init__(self, config: BenchConfig) -> None:
        from deimv2_deploy.data.coco import load_coco
        from deimv2_deploy.evaluation import evaluation_subset, evaluator_info

        if config.accuracy_annotations is None or config.accuracy_images is None:
            raise ValueError("accuracy needs a dataset: accuracy_images and accuracy_annotations")
        self.evaluator = evaluator_info()  # fails now when the evaluator is not installed
        self.dataset = load_coco(config.accuracy_images, config.accuracy_annotations)
        self.max_images = config.max_images
        self.images = len(evaluation_subset(self.dataset, self.max_images))  # DatasetError: nothing to measure
        self.progress = config.progress

    def describe(self) -> dict[str, Any]:
        """What every row's AP was measured on (the report's header)."""
        return {"annotations": str(self.dataset.annotation_file), "images_dir": str(self.dataset.images_dir),
                "images": self.images, "images_total": len(self.dataset), "categories": len(self.dataset.categories),
                "evaluator": self.evaluator}

    def measure(self, runtime: Runtime, batch: int) -> dict[str, Any]:
        """AP, AP50, AP75 of `runtime` on the dataset, with what a reader needs beside them; an `error` instead
        where it cannot be measured."""
        from deimv2_deploy.evaluation import evaluate_dataset

        random = bool(runtime.spec.random_weights)
        t0 = time.perf_counter()
        try:
            result = evaluate_dataset(runtime, self.dataset, batch=batch, max_images=self.max_images,
                                      progress=self.progress)
        except (ValueError, RuntimeError, OSError) as e:  # CategoryMismatchError is a ValueError
            return {**dict.fromkeys(ACCURACY_KEYS), "images": None, "random_weights": random,
                    "error": " ".join(str(e).split())}
        return {**{k: result[k] for k in ACCURACY_KEYS}, "images": result["images"],
                "detections": result["detections"], "classes": result["artifact"]["classes"],
                "random_weights": random, "seconds": round(time.perf_counter() - t0, 3),
                "notes": result.get("notes", [])}
