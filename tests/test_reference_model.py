"""The shipped reference model (reference/atto_synth, made by deimv2-train; see reference/atto_synth/README.md):
its classes travel into the export, it detects the shapes it was trained on in scenes generated with a seed its
training never saw, and what an FP16 ONNX costs in AP is measured on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deimv2_deploy.data.synth import SYNTH_CATEGORY_IDS, SYNTH_CLASSES, write_dataset

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "atto_synth"
HOLDOUT_SEED = 7  # training used seed 1
IMAGES = 40


@pytest.fixture(scope="module")
def holdout(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    write_dataset(root, {"val": IMAGES}, seed=HOLDOUT_SEED)
    return root / "val", root / "annotations" / "instances_val.json"


def test_the_shipped_weights_are_a_release_of_a_deimv2_train_run():
    state = torch.load(REFERENCE / "model.pth", map_location="cpu", weights_only=True)
    meta = state["deimv2"]
    assert set(state) == {"ema", "deimv2"} and meta["size"] == "atto"
    assert meta["class_names"] == list(SYNTH_CLASSES) and meta["category_ids"] == list(SYNTH_CATEGORY_IDS)
    # the log committed beside it is the run the weights come from
    epochs = [r for r in map(json.loads, (REFERENCE / "log.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    best = max(epochs, key=lambda r: r["val"]["AP"])
    assert meta["progress"]["best_epoch"] + 1 == best["epoch"]  # stored 0-based, logged 1-based
    assert abs(meta["progress"]["best_ap"] - best["val"]["AP"]) < 1e-9


def test_exported_reference_model_detects_unseen_scenes_and_fp16_costs_little(holdout, tmp_path):
    from deimv2_deploy.evaluation import evaluate
    from deimv2_deploy.exporters.onnx_export import export_onnx
    from deimv2_deploy.runtimes import load_runtime

    recorded = json.loads((REFERENCE / "holdout_onnx_fp32.json").read_text())  # 500 images, seed 7
    aps = {}
    for precision in ("fp32", "fp16"):
        result = export_onnx("atto", checkpoint=REFERENCE / "model.pth", output_dir=tmp_path, precision=precision,
                             quiet=True)
        assert list(result.spec.class_names) == list(SYNTH_CLASSES)
        runtime = load_runtime(result.path)
        aps[precision] = evaluate(runtime, *holdout, progress=False)
    # 40 images are a noisy sample of the 500 the recorded numbers come from: a wide but real floor
    assert aps["fp32"]["AP50"] >= recorded["AP50"] - 0.15, (aps["fp32"], recorded)
    assert aps["fp32"]["AP"] >= recorded["AP"] - 0.15
    assert abs(aps["fp16"]["AP"] - aps["fp32"]["AP"]) <= 0.02, (aps["fp16"]["AP"], aps["fp32"]["AP"])
