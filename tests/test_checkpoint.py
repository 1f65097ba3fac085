"""Official checkpoint formats in, strict loading out, and the errors a user will meet."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from deimv2_deploy.models import build_model
from deimv2_deploy.models.checkpoint import CheckpointError, find_checkpoint, load_model, read_checkpoint
from deimv2_deploy.models.random_weights import apply_deterministic_weights


@pytest.fixture(scope="module")
def atto_state():
    return apply_deterministic_weights(build_model("atto"), seed=3).state_dict()


def _assert_same_weights(model, state):
    ours = model.state_dict()
    assert set(ours) == set(state)
    for k, v in state.items():
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("wrap", ["model", "ema", "bare", "module_prefix"])
def test_official_pth_formats_round_trip(tmp_path, atto_state, wrap):
    state = dict(atto_state)
    obj = {
        "model": {"model": state, "optimizer": {}, "last_epoch": 3},
        "ema": {"ema": {"module": state, "updates": 10}, "model": {k: torch.zeros_like(v) for k, v in state.items()}},
        "bare": state,
        "module_prefix": {"model": {f"module.{k}": v for k, v in state.items()}},
    }[wrap]
    path = tmp_path / "deimv2_hgnetv2_atto_coco.pth"
    torch.save(obj, path)
    model = load_model(path)  # size recognised from the shapes
    _assert_same_weights(model, state)


def test_hugging_face_folder_round_trips_with_shared_tensors_stored_once(tmp_path, atto_state):
    from safetensors.torch import save_model

    model = build_model("atto")
    model.load_state_dict(atto_state)
    folder = tmp_path / "DEIMv2_HGNetv2_ATTO_COCO"
    folder.mkdir()
    save_model(model, str(folder / "model.safetensors"))  # drops aliases, as Hugging Face does
    (folder / "config.json").write_text(json.dumps({"config": {"HGNetv2": {"name": "Atto"}}}))
    stored, config = read_checkpoint(folder)
    assert len(stored) < len(atto_state)  # some aliases really were dropped
    _assert_same_weights(load_model(folder), atto_state)


def test_vit_size_checkpoint_round_trip(tmp_path):
    model = apply_deterministic_weights(build_model("s"), seed=1)
    path = tmp_path / "s.pth"
    torch.save({"ema": {"module": model.state_dict()}}, path)
    _assert_same_weights(load_model(path, variant="s"), model.state_dict())


def test_wrong_size_checkpoint_names_the_size_it_looks_like(tmp_path, atto_state):
    path = tmp_path / "ckpt.pth"
    torch.save({"model": atto_state}, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, variant="femto")
    msg = str(err.value)
    assert "does not fit DEIMv2-femto" in msg and "keys with other shapes" in msg
    assert "looks like a DEIMv2-atto checkpoint" in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path, atto_state):
    state = dict(atto_state)
    state.pop("decoder.enc_score_head.bias")
    state["decoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(e.g. decoder.enc_score_head.bias\).*"
                                              r"1 unexpected keys \(e.g. decoder.extra.weight\)"):
        load_model(state, variant="atto")


def test_truncated_file_is_reported(tmp_path, atto_state):
    path = tmp_path / "full.pth"
    torch.save({"model": atto_state}, path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        load_model(cut)


class _Payload:  # a pickle that would run code when unpickled
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_carrying_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(CheckpointError, match="refuse"):
        load_model(path)
    assert "this must never run" not in capsys.readouterr().out


def test_missing_checkpoint_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"deimv2_dinov3_s_coco.pth.*--random-weights"):
        find_checkpoint("s", store=tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(tmp_path / "nope.pth")
