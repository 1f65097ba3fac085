"""deimv2-train: a short run learns, writes checkpoints deimv2-export takes, resumes exactly, stops cleanly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deimv2_deploy.data.synth import write_dataset
from deimv2_deploy.training.trainer import Trainer, TrainingError, TrainingInterrupted, TrainSettings


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    write_dataset(root, {"train": 8, "val": 4}, image_size=160, seed=11)
    return root


def _settings(root: Path, out: Path, **changes) -> TrainSettings:
    base = dict(size="atto", train_images=str(root / "train"),
                train_annotations=str(root / "annotations" / "instances_train.json"),
                val_images=str(root / "val"), val_annotations=str(root / "annotations" / "instances_val.json"),
                output_dir=str(out), epochs=2, batch=4, lr=5e-4, workers=0, threads=2, seed=3, val_every=1)
    base.update(changes)
    return TrainSettings(**base)


def _quiet(*_: object) -> None:
    pass


def test_training_steps_lower_the_loss_on_a_fixed_batch(tiny_dataset, tmp_path):
    torch.manual_seed(0)
    trainer = Trainer(_settings(tiny_dataset, tmp_path), printer=_quiet)
    images, targets = next(trainer.data.batches(0))
    for group in trainer.optimizer.param_groups:  # a constant rate: the schedule's warm-up is not under test
        group["lr"] = 1e-3
    trainer.scheduler.step = lambda: None
    trainer.model.train()
    losses = [sum(trainer._step(images, targets, epoch=0).values()) for _ in range(12)]
    # 32 -> 27 measured; the denoising noise differs per step, so compare the ends of the run
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert trainer.ema.updates == 12


def test_fit_writes_official_checkpoints_log_and_curves_and_export_takes_them(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    summary = Trainer(_settings(tiny_dataset, out), printer=_quiet).fit()
    assert {p.name for p in out.iterdir()} >= {"best.pth", "last.pth", "log.jsonl", "curves.png"}
    state = torch.load(out / "last.pth", map_location="cpu", weights_only=True)  # no pickled code
    assert {"model", "ema", "optimizer", "lr_scheduler", "last_epoch"} <= set(state)
    assert state["last_epoch"] == 1 and state["deimv2"]["size"] == "atto"
    assert state["deimv2"]["class_names"][0] == "circle" and state["deimv2"]["category_ids"] == list(range(1, 9))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records][0] == "start" and records[-1]["kind"] == "end"
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(epochs) == 2 and all(0.0 <= r["val"]["AP"] <= 1.0 for r in epochs)
    assert summary["best_epoch"] in (1, 2)

    from deimv2_deploy.exporters.onnx_export import export_onnx
    from deimv2_deploy.models.checkpoint import read_checkpoint
    from deimv2_deploy.runtimes import load_runtime
    from deimv2_deploy.training.trainer import release_weights

    # the released weights (deimv2-train --release) are the EMA weights and classes, without the training state

    released = torch.load(release_weights(out / "best.pth", tmp_path / "model.pth"), map_location="cpu",
                          weights_only=True)
    assert set(released) == {"ema", "deimv2"} and "torch_rng" not in released["deimv2"]
    assert released["deimv2"]["class_names"] == state["deimv2"]["class_names"]
    weights, _ = read_checkpoint(tmp_path / "model.pth")
    best_ema = torch.load(out / "best.pth", map_location="cpu", weights_only=True)["ema"]["module"]
    assert weights.keys() == best_ema.keys() and all(torch.equal(weights[k], best_ema[k]) for k in weights)
    with pytest.raises(TrainingError, match="--release .*not a deimv2-train checkpoint"):
        release_weights(tmp_path / "model.pth", tmp_path / "again.pth")

    # the checkpoint goes through deimv2-export unchanged, and the ONNX runs with the dataset's 8 classes
    result = export_onnx("atto", checkpoint=out / "best.pth", output_dir=tmp_path / "store", quiet=True)
    runtime = load_runtime(result.path)
    detections = runtime.predict((torch.rand(200, 240, 3) * 255).to(torch.uint8).numpy())
    assert len(detections) == 300 and int(detections.labels.max()) < 8
    # ... with the dataset's class names and category ids in its metadata (ONNX and OpenVINO), which deimv2-val maps
    # the labels through
    names, ids = tuple(state["deimv2"]["class_names"]), tuple(state["deimv2"]["category_ids"])
    assert runtime.spec.class_names == names and runtime.spec.category_ids == ids
    assert detections.names[0] in names and detections.to_dict()["detections"][0]["category_id"] in ids
    from deimv2_deploy.evaluation import evaluate
    from deimv2_deploy.exporters.openvino_export import export_openvino

    ir = export_openvino("atto", checkpoint=out / "best.pth", output_dir=tmp_path / "store", quiet=True)
    with load_runtime(ir.path) as ir_runtime:
        assert ir_runtime.spec.class_names == names and ir_runtime.spec.category_ids == ids
        val = evaluate(ir_runtime, tiny_dataset / "val", tiny_dataset / "annotations" / "instances_val.json")
    assert val["images"] == 4 and 0.0 <= val["AP"] <= 1.0 and val["artifact"]["classes"] == 8


def test_resume_continues_the_same_run_exactly(tiny_dataset, tmp_path):
    """A run stopped by SIGTERM after 3 of its 4 iterations and resumed ends with the same weights as one that
    was never stopped (same data order, augmentations, denoising noise, optimiser and EMA state)."""
    settings = dict(epochs=2, val_every=5)
    straight = Trainer(_settings(tiny_dataset, tmp_path / "a", **settings), printer=_quiet)
    straight.fit()

    stopped = Trainer(_settings(tiny_dataset, tmp_path / "b", **settings), printer=_quiet)
    step, calls = stopped._step, []

    def step_then_signal(*args, **kwargs):
        result = step(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            # a real SIGTERM to this process (as `docker stop` sends): the handler finishes the iteration, saves,
            # stops. (This once crashed the test session: OpenVINO Cores released out of order had left the main
            # thread's signal stack unmapped; see openvino_backend.openvino_core and conftest.py's check.)
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    stopped._step = step_then_signal
    with pytest.raises(TrainingInterrupted) as stop:
        stopped.fit()
    assert stop.value.signum == signal.SIGTERM and stop.value.checkpoint.name == "last.pth"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    saved = torch.load(stop.value.checkpoint, map_location="cpu", weights_only=True)
    assert saved["deimv2"]["progress"] == {**saved["deimv2"]["progress"], "epoch": 1, "iteration": 1}

    resumed = Trainer(_settings(tiny_dataset, tmp_path / "b", **settings), resume=stop.value.checkpoint,
                      printer=_quiet)
    resumed.fit()
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    ema_a, ema_b = straight.ema.module.state_dict(), resumed.ema.module.state_dict()
    assert all(torch.allclose(ema_a[k].float(), ema_b[k].float(), atol=1e-6, rtol=1e-5) for k in ema_a)


def test_fine_tuning_reinitialises_the_class_heads_only(tiny_dataset, tmp_path):
    from deimv2_deploy.models import build_model

    coco = build_model("atto")  # an 80-class model stands in for an official COCO checkpoint
    torch.save({"model": coco.state_dict()}, tmp_path / "coco.pth")
    lines = []
    trainer = Trainer(_settings(tiny_dataset, tmp_path / "ft", checkpoint=str(tmp_path / "coco.pth")),
                      printer=lines.append)
    assert any("re-initialised for 8 classes" in line for line in lines)
    ours = trainer.model.state_dict()
    key = "backbone.stem.stem1.conv.weight" if "backbone.stem.stem1.conv.weight" in ours else next(iter(ours))
    assert torch.equal(ours[key], coco.state_dict()[key])
    assert ours["decoder.enc_score_head.weight"].shape[0] == 8


def test_bad_inputs_are_clear(tiny_dataset, tmp_path):
    from deimv2_deploy.models import build_model
    from deimv2_deploy.models.checkpoint import CheckpointError

    torch.save({"model": build_model("n").state_dict()}, tmp_path / "n.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        Trainer(_settings(tiny_dataset, tmp_path / "x", checkpoint=str(tmp_path / "n.pth")), printer=_quiet)
    with pytest.raises(TrainingError, match="not a deimv2-train checkpoint"):
        Trainer(_settings(tiny_dataset, tmp_path / "x"), resume=tmp_path / "n.pth", printer=_quiet)
    with pytest.raises(TrainingError, match="no such checkpoint"):
        Trainer(_settings(tiny_dataset, tmp_path / "x"), resume=tmp_path / "missing.pth", printer=_quiet)
    with pytest.raises(ValueError, match="fewer than one batch"):
        Trainer(_settings(tiny_dataset, tmp_path / "x", batch=64), printer=_quiet)
    with pytest.raises(TrainingError, match="--device"):
        Trainer(_settings(tiny_dataset, tmp_path / "x", device="tpu"), printer=_quiet)
    with pytest.raises(TrainingError, match="both --val-images and --val-annotations"):
        _settings(tiny_dataset, tmp_path, val_annotations=None)


def test_cli_sigterm_saves_last_checkpoint_and_exits_143(tiny_dataset, tmp_path):
    """As `docker stop` or systemd would: SIGTERM to the process group (data-loading worker included)."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "deimv2_deploy.cli.train", "atto", "--images", str(tiny_dataset / "train"),
           "--annotations", str(tiny_dataset / "annotations" / "instances_train.json"), "--epochs", "50",
           "--batch", "2", "--workers", "1", "--threads", "1", "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "log.jsonl").exists():
            time.sleep(0.5)
        time.sleep(3)  # a few iterations in
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "--resume" in err and (out / "last.pth").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_a_resumed_run_may_move_its_data_and_output_but_keeps_its_recipe(tiny_dataset, tmp_path):
    """--resume on another machine or folder: paths given again replace the stored ones; the recipe settings
    (epochs, batch, lr, seed...) stay the run's own whatever is given."""
    from deimv2_deploy.training.trainer import _merge_resume_settings

    stored = _settings(tiny_dataset, tmp_path / "old")
    given = TrainSettings(size="atto", train_images="/new/train", train_annotations="", output_dir="/new/run",
                          epochs=99, batch=1, lr=0.01, seed=42, device="cpu", workers=3, threads=1)
    merged = _merge_resume_settings(stored, given)
    assert merged.train_images == "/new/train" and merged.output_dir == "/new/run"
    assert merged.train_annotations == stored.train_annotations and merged.val_images == stored.val_images
    assert (merged.epochs, merged.batch, merged.lr, merged.seed) == (stored.epochs, stored.batch, stored.lr, 3)
    assert (merged.workers, merged.threads) == (3, 1)
