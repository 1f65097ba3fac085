"""reference/eomt_synth/train.py, the command that trained the shipped tiny EoMT: its targets are the generator's
panoptic truth, its schedule ends without masked attention, and a short run writes a transformers folder that
`deimv2-export eomt` takes (and a second run resumes instead of starting over)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from deimv2_deploy.data.synth import SYNTH_CLASSES, render_scene

pytest.importorskip("transformers")
SCRIPT = Path(__file__).resolve().parents[1] / "reference" / "eomt_synth" / "train.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("eomt_synth_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_targets_are_the_scenes_panoptic_truth(train):
    for index in range(3):
        scene = render_scene(1, "train", index, 96)
        for flip in (False, True):
            pixels, masks, labels = train.scene_targets(1, "train", index, 96, flip)
            owner = scene.owner[:, ::-1] if flip else scene.owner
            assert pixels.shape == (3, 96, 96) and masks.shape[1:] == (96, 96)
            # every pixel belongs to exactly one segment, background is the stuff class
            assert np.array_equal(masks.numpy().sum(0), np.ones((96, 96)))
            assert labels[-1] == train.BACKGROUND and train.LABELS[train.BACKGROUND] == "background"
            visible = [i for i in range(len(scene.objects)) if (owner == i).any()]
            assert [int(v) for v in labels[:-1]] == [scene.objects[i].category_id - 1 for i in visible]
            for m, i in zip(masks[:-1].numpy(), visible, strict=True):
                assert np.array_equal(m.astype(bool), owner == i)
        assert train.LABELS[:8] == SYNTH_CLASSES


def test_mask_annealing_goes_block_by_block_from_masked_to_plain(train):
    total, blocks = 1000, 2
    probs = np.array([train.annealing(s, total, blocks) for s in range(total + 1)])
    assert (probs[: int(0.2 * total)] == 1).all() and (probs[int(0.8 * total):] == 0).all()
    assert (np.diff(probs, axis=0) <= 0).all()  # never back on
    assert probs[int(0.5 * total), 0] == 0 and probs[int(0.5 * total), 1] == 1  # block 0 first, then block 1


def test_a_short_run_writes_an_exportable_folder_and_resumes(train, tmp_path, capsys):
    from deimv2_deploy.exporters.vit_export import export_vit

    args = ["--output", str(tmp_path / "run"), "--steps", "2", "--batch", "2", "--image-size", "64",
            "--val-every", "2", "--val-images", "2", "--workers", "0", "--warmup", "1", "--threads", "1"]
    assert train.main(args) == 0
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["model_type"] == "eomt_dinov3" and config["id2label"]["8"] == "background"
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and np.isfinite(log[-1]["loss"]) and 0 <= log[-1]["val_miou"] <= 1
    result = export_vit("eomt", tmp_path / "run" / "model", output_dir=tmp_path / "store",
                        stuff_classes="background", quiet=True)
    assert result.spec.masked_attention == (0.0, 0.0) and result.spec.stuff_classes == (8,)
    # the same command again continues from last.pt (already at its last step: nothing left to train)
    capsys.readouterr()
    assert train.main(args) == 0
    assert "resuming at step 2 of 2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="give the same --steps"):
        train.main([*args[:3], "5", *args[4:]])
    # a second stage starts from the first one's model, with masked attention off and fresh images
    second = ["--output", str(tmp_path / "stage2"), "--init", str(tmp_path / "run" / "model"), "--no-mask-annealing",
              "--first-image", "4", *args[2:]]
    assert train.main(second) == 0
    log = [json.loads(line) for line in (tmp_path / "stage2" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["mask_probs"] == [0.0, 0.0]
