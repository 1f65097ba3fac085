"""The shipped tiny EoMT (reference/eomt_synth, made by reference/eomt_synth/train.py; see its README): it is what its
training command writes, its export segments scenes generated with a seed its training never saw better than a
model that only finds the background, and what FP16 costs in mIoU is measured on it."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from deimv2_deploy.data.synth import write_dataset

transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers (pinned 5.24)")

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "eomt_synth"
MODEL = REFERENCE / "shapes_eomt_tiny"
HOLDOUT_SEED, IMAGES = 7, 24  # training rendered seed 1's train split


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    from deimv2_deploy.data.panoptic import load_panoptic, resolve_panoptic_dataset

    root = tmp_path_factory.mktemp("seg_holdout")
    write_dataset(root, {"val": IMAGES}, image_size=192, seed=HOLDOUT_SEED)
    paths = resolve_panoptic_dataset(root, split="val")
    return load_panoptic(paths.images_dir, paths.annotation_file, paths.masks_dir)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from deimv2_deploy.exporters.vit_export import export_vit

    store = tmp_path_factory.mktemp("store")
    return {p: export_vit("eomt", MODEL, output_dir=store, stuff_classes="background", precision=p, quiet=True).path
            for p in ("fp32", "fp16")}


def test_the_shipped_weights_are_the_training_commands_output():
    spec = importlib.util.spec_from_file_location("eomt_synth_train", REFERENCE / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    config = json.loads((MODEL / "config.json").read_text())
    expected = train.model_config(192)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                "num_register_tokens", "num_blocks", "num_queries", "image_size"):
        assert config[key] == expected[key], key
    assert [config["id2label"][str(i)] for i in range(len(train.LABELS))] == list(train.LABELS)
    # the logs beside it are the runs that made it: both stages ran to their last step
    for log, steps in (("log_stage1.jsonl", 1500), ("log_stage2.jsonl", 1000)):
        records = [json.loads(line) for line in (REFERENCE / log).read_text().splitlines()]
        assert records[-1]["step"] == steps and "val_miou" in records[-1]


def test_exported_reference_segments_unseen_scenes_and_fp16_costs_little(holdout, exported):
    from deimv2_deploy.runtimes import load_runtime
    from deimv2_deploy.segmentation_evaluation import evaluate_segmentation

    results = {}
    for precision, path in exported.items():
        runtime = load_runtime(path, threads=2)
        try:
            results[precision] = evaluate_segmentation(runtime, holdout, tasks=("semantic", "panoptic"),
                                                       progress=False)
        finally:
            runtime.close()
    fp32 = results["fp32"]
    iou = {c["name"]: c["IoU"] for c in fp32["semantic"]["per_class"]}
    # a model that only found the background would score 0 on every shape (500 held-out images: mean shape IoU
    # 0.056, circle 0.138, rectangle 0.121; the model is weak, see its README)
    shapes = [v or 0.0 for k, v in iou.items() if k != "background"]
    assert iou["background"] > 0.8
    assert sum(shapes) / len(shapes) > 0.03 and sum(v > 0.05 for v in shapes) >= 2, iou
    assert fp32["panoptic"]["stuff"]["PQ"] > 0.7
    assert abs(results["fp16"]["mIoU"] - fp32["mIoU"]) < 0.01
