"""Hugging Face transformers' DEIMv2 format: reading it, writing it, which graph deploys it, and where
transformers' `Deimv2ForObjectDetection` departs from the official model (the list proven complete).

Folders "written by transformers" are made here the way transformers' converter makes them: official weights
(the golden cases' deterministic ones) renamed, loaded strictly into `Deimv2ForObjectDetection` with the
converter's config, then `save_pretrained`. `make test` runs atto and s; `make test-slow` the other six sizes.
"""
from __future__ import annotations

import copy
import functools
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.24",
                                   reason="transformers >= 5.24 is a dev dependency (constraints.txt)")

from golden import golden_dir, load_golden_module, load_manifest  # noqa: E402

from deimv2_deploy.cli.export import main as export_main  # noqa: E402
from deimv2_deploy.models import build_model  # noqa: E402
from deimv2_deploy.models import hf_format as hf  # noqa: E402
from deimv2_deploy.models.checkpoint import CheckpointError, load_checkpoint, load_model  # noqa: E402
from deimv2_deploy.models.graph import DeployGraph  # noqa: E402
from deimv2_deploy.models.hf_differences import differences_for, switch_off  # noqa: E402
from deimv2_deploy.models.zoo import get_variant  # noqa: E402
from deimv2_deploy.variants import VARIANT_NAMES  # noqa: E402

FAST = ("atto", "s")
OTHERS = tuple(v for v in VARIANT_NAMES if v not in FAST)  # the rest of the eight: make test-slow
ORIG_SIZES = torch.tensor([[640, 480]])  # (width, height), as the golden postprocessed outputs use
VIT_TINY = ("s", "m")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------ helpers


@functools.lru_cache(maxsize=4)
def official_state(variant: str, zero_key_bias: bool = False) -> dict[str, torch.Tensor]:
    """The golden cases' deterministic official weights; s/m optionally with the ViT-Tiny key bias zeroed (the
    transformers format cannot hold it, item 6)."""
    state = load_golden_module("fill").fill_state_dict(build_model(variant).state_dict())
    if zero_key_bias:
        state = dict(state)
        for key in [k for k in state if k.startswith("backbone.dinov3._model.") and k.endswith(".attn.qkv.bias")]:
            q, _, v = state[key].chunk(3)
            state[key] = torch.cat([q, torch.zeros_like(q), v])
    return state


def transformers_model(variant: str, state, official_behaviour: bool = False, class_names=None):
    """transformers' Deimv2ForObjectDetection holding official weights, as its converter builds it."""
    from transformers import Deimv2Config, Deimv2ForObjectDetection

    config = hf.transformers_config(variant, class_names, official_behaviour=official_behaviour)
    model = Deimv2ForObjectDetection(Deimv2Config.from_dict(config)).eval()
    model.load_state_dict(hf.official_to_transformers(state, variant), strict=True)
    return model


def written_by_transformers(variant: str, folder: Path, state, **save_kwargs) -> Path:
    transformers_model(variant, state).save_pretrained(str(folder), **save_kwargs)
    return folder


def golden_images(variant: str) -> torch.Tensor:
    """The golden input at the size's input size, fed to the graphs as it is (as the golden cases do)."""
    return load_golden_module("fill").golden_input(*get_variant(variant).input_size)


def official_outputs(variant: str, state) -> dict[str, torch.Tensor]:
    model = build_model(variant)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(golden_images(variant))


def compare_rows(outputs, reference, tol: float = 1e-4):
    logits = outputs.logits if hasattr(outputs, "logits") else outputs["pred_logits"]
    boxes = outputs.pred_boxes if hasattr(outputs, "pred_boxes") else outputs["pred_boxes"]
    return load_golden_module("compare").compare_queries(
        logits[0].numpy(), boxes[0].numpy(), reference["pred_logits"][0].numpy(), reference["pred_boxes"][0].numpy(),
        tol=tol)


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = export_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def onnx_detections(path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sizes = np.repeat(ORIG_SIZES.numpy(), images.shape[0], axis=0)
    labels, boxes, scores = session.run(["labels", "boxes", "scores"],
                                        {"images": images.numpy(), "orig_target_sizes": sizes})
    return {"labels": labels, "boxes": boxes, "scores": scores}


def compare_detections(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]):
    return load_golden_module("compare").compare_detections(
        ours["labels"][0], ours["boxes"][0], ours["scores"][0], ref["labels"][0], ref["boxes"][0], ref["scores"][0])


def reference_detections(variant: str, state) -> dict[str, np.ndarray]:
    model = build_model(variant)
    model.load_state_dict(state, strict=True)
    graph = DeployGraph(model.eval().deploy()).eval()
    with torch.no_grad():
        labels, boxes, scores = graph(golden_images(variant), ORIG_SIZES)
    return {"labels": labels.numpy(), "boxes": boxes.numpy(), "scores": scores.numpy()}


def manifest_state(variant: str) -> dict[str, torch.Tensor]:
    """Random values of the official layout (names, shapes, dtypes from the golden manifest): no model built."""
    manifest = load_manifest(variant)
    g = torch.Generator().manual_seed(0)
    out = {}
    for entry in manifest["state_dict"]:
        dtype = getattr(torch, entry["dtype"])
        shape = tuple(entry["shape"])
        out[entry["name"]] = (torch.randn(shape, generator=g).to(dtype) if dtype.is_floating_point
                              else torch.zeros(shape, dtype=dtype))
    for group in manifest["aliases"]:  # one tensor under several names (shared heads, up, reg_scale)
        for key in group["keys"][1:]:
            out[key] = out[group["keys"][0]]
    return out


# ------------------------------------------------------------------------------------- the pure renaming


@pytest.mark.parametrize("variant", VARIANT_NAMES)
def test_renaming_round_trips_and_gives_exactly_transformers_keys(variant):
    from transformers import Deimv2Config, Deimv2ForObjectDetection

    official = manifest_state(variant)
    ours = hf.official_to_transformers(official, variant)
    with torch.device("meta"):
        theirs = Deimv2ForObjectDetection(Deimv2Config.from_dict(hf.transformers_config(variant))).state_dict()
    assert set(ours) == set(theirs)
    assert all(tuple(ours[k].shape) == tuple(theirs[k].shape) for k in theirs)
    # back again, from the in-memory layout and from the layout save_pretrained writes
    for layout in (ours, hf.to_saved_layout(ours, variant)):
        back = hf.transformers_to_official(layout, variant, template=official)
        assert not back.missing and not back.unexpected and not back.trained
        lost = {k for k in official if variant in VIT_TINY and k.endswith(".attn.qkv.bias")}
        for key, value in official.items():
            if key in lost:  # the key third is gone (zeros), q and v survive
                q, k, v = back.state[key].chunk(3)
                assert torch.equal(torch.cat([q, v]), torch.cat([value.chunk(3)[0], value.chunk(3)[2]]))
                assert not k.any()
            elif key.startswith("decoder.dec_bbox_head.") and get_variant(variant).decoder.share_bbox_head:
                continue  # stored once, filled from its partner by the loader (checked below, end to end)
            else:
                assert torch.equal(back.state[key].to(value.dtype), value), key
        assert bool(back.notes) == (variant in VIT_TINY)


def test_q_k_v_and_gate_up_are_refused_in_the_right_order():
    state = manifest_state("atto")
    fused = state["decoder.decoder.layers.0.self_attn.in_proj_weight"]
    w12 = state["decoder.decoder.layers.0.swish_ffn.w12.weight"]
    out = hf.official_to_transformers(state, "atto")
    q, k, v = (out[f"model.decoder.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(torch.cat([q, k, v]), fused) and not torch.equal(q, k)
    gate, up = out["model.decoder.layers.0.mlp.gate_proj.weight"], out["model.decoder.layers.0.mlp.up_proj.weight"]
    assert torch.equal(torch.cat([gate, up]), w12)
    assert torch.equal(out["model.enc_output.0.weight"], torch.eye(64))  # the converter's inserted identity


def test_config_json_names_each_size_and_refuses_other_models():
    for name in VARIANT_NAMES:
        assert hf.variant_from_transformers_config(hf.transformers_config(name)) == name
        assert hf.variant_from_transformers_config(hf.transformers_config(name, official_behaviour=False)) == name
    with pytest.raises(hf.TransformersFormatError, match="D-FINE model .*not DEIMv2"):
        hf.variant_from_transformers_config({"model_type": "d_fine"})
    bent = hf.transformers_config("s")
    bent["d_model"] = 320
    with pytest.raises(hf.TransformersFormatError, match="none of the eight official sizes"):
        hf.variant_from_transformers_config(bent)


# ------------------------------------------------------------------- reading folders transformers wrote


@pytest.fixture(scope="module")
def converted_folders(tmp_path_factory):
    """Folders written by transformers' save_pretrained from official weights (s: zero key bias)."""
    root = tmp_path_factory.mktemp("converted")
    return {v: written_by_transformers(v, root / v, official_state(v, zero_key_bias=v in VIT_TINY)) for v in FAST}


@pytest.mark.parametrize("variant", FAST)
def test_transformers_folder_reads_back_to_the_official_state_dict(converted_folders, variant):
    loaded = load_checkpoint(converted_folders[variant])  # size from config.json, nothing passed
    assert (loaded.variant, loaded.format, loaded.num_classes) == (variant, "transformers", 80)
    assert loaded.class_names is not None and len(loaded.class_names) == 80 and not loaded.dropped
    expected = official_state(variant, zero_key_bias=variant in VIT_TINY)
    assert set(loaded.state) == set(expected)
    assert all(torch.equal(loaded.state[k].to(v.dtype), v) for k, v in expected.items())


def test_sharded_folder_reads_like_one_file(tmp_path):
    folder = written_by_transformers("atto", tmp_path / "sharded", official_state("atto"), max_shard_size="500KB")
    assert (folder / "model.safetensors.index.json").exists() and not (folder / "model.safetensors").exists()
    loaded = load_checkpoint(folder)
    assert all(torch.equal(loaded.state[k].to(v.dtype), v) for k, v in official_state("atto").items())


def test_transformers_round_trip_loses_the_shared_box_head_and_ours_does_not(converted_folders, tmp_path, capsys):
    """transformers 5.24 saves atto's shared box head once under the last layer; from_pretrained restores it
    only from layer 0's name and re-initialises it: its outputs move. Our reader keeps the stored head, and the
    folders we write store it under layer 0, which from_pretrained loads."""
    from transformers import Deimv2ForObjectDetection

    state = official_state("atto")
    reference = official_outputs("atto", state)
    reloaded = Deimv2ForObjectDetection.from_pretrained(str(converted_folders["atto"])).eval()
    fresh = transformers_model("atto", state)
    with torch.no_grad():
        moved = (reloaded(pixel_values=golden_images("atto")).pred_boxes
                 - fresh(pixel_values=golden_images("atto")).pred_boxes).abs().max().item()
    assert moved > 1e-3  # transformers' own round trip changed the model
    with torch.no_grad():
        ours = load_model(converted_folders["atto"])(golden_images("atto"))
    assert compare_rows(ours, reference).ok

    code, _, err = run_cli(["atto", "--format", "hf", "--checkpoint", str(converted_folders["atto"]),
                            "--output-dir", str(tmp_path / "ours"), "--quiet"], capsys)
    assert code == 0, err
    ours_reloaded = Deimv2ForObjectDetection.from_pretrained(str(tmp_path / "ours")).eval()
    theirs = ours_reloaded.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("variant", FAST)
def test_export_of_a_transformers_folder_reproduces_the_official_detections(converted_folders, variant, tmp_path,
                                                                           capsys):
    _export_reproduces_official(variant, converted_folders[variant], tmp_path, capsys)


def _export_reproduces_official(variant, folder, tmp_path, capsys):
    code, out, err = run_cli([variant, "--checkpoint", str(folder), "--output-dir", str(tmp_path), "--quiet",
                              "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)[0]
    assert result["spec"]["build"]["graph"] == "official"
    assert "converter's values" in result["spec"]["build"]["graph_reason"]
    assert tuple(result["spec"]["input_size"]) == get_variant(variant).input_size
    ours = onnx_detections(Path(result["path"]), golden_images(variant))
    state = official_state(variant, zero_key_bias=variant in VIT_TINY)
    report = compare_detections(ours, reference_detections(variant, state))
    assert report.ok and report.max_error <= 0.1, report
    golden = golden_dir() / f"{variant}.golden.npz"
    if variant not in VIT_TINY and golden.exists():  # the official model's own outputs for these weights
        g = np.load(golden)
        report = compare_detections(ours, {"labels": g["labels"][None], "boxes": g["boxes"][None],
                                           "scores": g["scores"][None]})
        assert report.ok, report


# ------------------------------------------------------------- the differences, proven complete (5.24)


def _differences_proof(variant: str):
    state = official_state(variant)  # the golden weights, with the ViT-Tiny key bias (item 6 restores it)
    reference = official_outputs(variant, state)
    golden = golden_dir() / f"{variant}.golden.npz"
    if golden.exists():  # the reference is the official model itself
        g = np.load(golden)
        assert compare_rows(reference, {"pred_logits": torch.from_numpy(g["pred_logits"])[None],
                                        "pred_boxes": torch.from_numpy(g["pred_boxes"])[None]}).ok
    images = golden_images(variant)
    numbers = tuple(d.number for d in differences_for(variant))
    base = transformers_model(variant, state)

    def rows(switched: tuple[int, ...]):
        model = switch_off(copy.deepcopy(base), variant, state, switched)
        with torch.no_grad():
            return compare_rows(model(pixel_values=images), reference, tol=1e-5)

    plain = rows(())
    assert plain.matched == 0, plain  # transformers as it is: not one query row of the official model
    every = rows(numbers)
    assert every.ok and every.max_error < 1e-5, every  # all switched off: the official model, within 1e-5
    for n in numbers:  # any one left on breaks it
        left = rows(tuple(k for k in numbers if k != n))
        assert not left.ok, (n, left)


@pytest.mark.parametrize("variant", FAST)
def test_transformers_equals_official_exactly_when_every_listed_difference_is_switched_off(variant):
    _differences_proof(variant)


# ------------------------------------------------------------------------------------------------ writing


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory):
    root = tmp_path_factory.mktemp("pth")
    paths = {}
    for v in FAST:
        paths[v] = root / get_variant(v).checkpoint_name
        torch.save({"model": official_state(v)}, paths[v])
    return paths


@pytest.mark.parametrize("variant", FAST)
def test_written_folder_loads_in_transformers_with_no_key_complaint(official_pth, variant, tmp_path, capsys):
    _written_folder_checks(variant, official_pth[variant], tmp_path, capsys)


def _written_folder_checks(variant, checkpoint, tmp_path, capsys):
    from transformers import AutoImageProcessor, Deimv2ForObjectDetection

    folder = tmp_path / "hf"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_cli([variant, "--format", "hf", "--checkpoint", str(checkpoint), "--output-dir",
                                  str(folder), "--quiet", "--json"], capsys)
    assert code == 0, err
    notes = [str(w.message) for w in caught if "key bias" in str(w.message)]
    assert len(notes) == (1 if variant in VIT_TINY else 0)  # said once, where the format loses it
    result = json.loads(out)[0]
    assert result["parity"]["ok"] and result["parity"]["transformers"]["loading_info"] == {}
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]

    model, info = Deimv2ForObjectDetection.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected, mismatched key, no error
    expected = transformers_model(variant, official_state(variant, zero_key_bias=True)
                                  if variant in VIT_TINY else official_state(variant)).state_dict()
    theirs = model.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in expected.items())

    processor = AutoImageProcessor.from_pretrained(str(folder))
    cfg = get_variant(variant)
    assert (processor.size.height, processor.size.width) == cfg.input_size
    assert processor.do_normalize == (cfg.mean is not None)
    if cfg.mean is not None:
        assert tuple(processor.image_mean) == pytest.approx(cfg.mean)

    # our config says what a config can (items 4, 8, 9): the remaining switches suffice for equality
    state = official_state(variant, zero_key_bias=variant in VIT_TINY)
    config_fixed = {4, 8, 9}
    rest = tuple(d.number for d in differences_for(variant) if d.number not in config_fixed)
    model = switch_off(model.eval(), variant, state, rest)
    with torch.no_grad():
        assert compare_rows(model(pixel_values=golden_images(variant)), official_outputs(variant, state)).ok

    back = load_checkpoint(folder)  # and our own reader gets the checkpoint back
    assert all(torch.equal(back.state[k].to(v.dtype), v) for k, v in state.items())


def test_fine_tuning_starts_from_a_transformers_folder(converted_folders, trained_folder):
    """deimv2-train --checkpoint FOLDER: official names back; other class count re-initialises the class heads;
    tensors trained inside transformers are left out, saying so."""
    pytest.importorskip("scipy", reason="deimv2-train needs the [train] extra (scipy)")
    from deimv2_deploy.training.trainer import load_pretrained

    model = build_model("atto", num_classes=3)
    lines = load_pretrained(model, converted_folders["atto"])
    assert "re-initialised for 3 classes" in " ".join(lines)
    own, state = model.state_dict(), official_state("atto")
    kept = [k for k in state if "score_head" not in k and "denoising_class_embed" not in k]
    assert all(torch.equal(own[k], state[k].to(own[k].dtype)) for k in kept)

    lines = load_pretrained(build_model("atto"), trained_folder[0])
    assert any("left out 2 tensors trained inside transformers" in line for line in lines), lines


def test_custom_classes_travel_as_id2label(tmp_path, capsys):
    names = ("cat", "dog", "wombat")
    state = load_golden_module("fill").fill_state_dict(build_model("atto", num_classes=3).state_dict())
    source = tmp_path / "custom"
    transformers_model("atto", state, class_names=names).save_pretrained(str(source))
    loaded = load_checkpoint(source)
    assert loaded.class_names == names and loaded.num_classes == 3

    code, out, err = run_cli(["atto", "--checkpoint", str(source), "--output-dir", str(tmp_path / "store"),
                              "--quiet", "--json"], capsys)
    assert code == 0, err
    assert tuple(json.loads(out)[0]["spec"]["class_names"]) == names

    code, out, err = run_cli(["atto", "--format", "hf", "--checkpoint", str(source), "--output-dir",
                              str(tmp_path / "again"), "--quiet"], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "wombat"}


# ------------------------------------------------------------- fine-tuned inside transformers: its graph


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    """An atto folder whose transformers-only tensors (enc_output) were trained, as fine-tuning does."""
    model = transformers_model("atto", official_state("atto"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        linear, norm = model.model.enc_output
        linear.weight.add_(0.05 * torch.randn(linear.weight.shape, generator=g))
        norm.bias.add_(0.05 * torch.randn(norm.bias.shape, generator=g))
    folder = tmp_path_factory.mktemp("trained") / "atto"
    model.save_pretrained(str(folder))
    return folder, model


def test_trained_folder_is_refused_by_the_official_graph_with_what_to_do(trained_folder):
    with pytest.raises(CheckpointError, match=r"fine-tuned inside transformers.*model\.enc_output.*--graph official"):
        load_model(trained_folder[0])
    loaded = load_checkpoint(trained_folder[0], drop_transformers_only=True)  # e.g. as a training start
    assert set(loaded.dropped) == {"model.enc_output.0.weight", "model.enc_output.1.bias"}


def test_trained_folder_exports_through_transformers_graph_with_parity(trained_folder, tmp_path, capsys):
    from deimv2_deploy.exporters.parity import match_detections, parity_batch
    from deimv2_deploy.models.postprocess import PostProcessor
    from deimv2_deploy.runtimes import load_runtime

    folder, model = trained_folder
    code, out, err = run_cli(["atto", "--checkpoint", str(folder), "--output-dir", str(tmp_path), "--quiet",
                              "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)[0]
    build = result["spec"]["build"]
    assert build["graph"] == "transformers" and "model.enc_output" in build["graph_reason"]
    assert result["parity"]["ok"] and "Deimv2ForObjectDetection" in result["parity"]["against"]
    runtime = load_runtime(result["path"])
    assert runtime.spec.build["graph"] == "transformers"  # the metadata travelled with the file
    batch = parity_batch(runtime.spec, count=2)
    with torch.no_grad():  # transformers' own forward, with the official postprocessor
        out_hf = model(pixel_values=torch.from_numpy(batch.images))
        labels, boxes, scores = PostProcessor(300)({"pred_logits": out_hf.logits, "pred_boxes": out_hf.pred_boxes},
                                                   torch.from_numpy(batch.orig_target_sizes))
    report = match_detections(runtime.infer(batch.as_inputs()),
                              {"labels": labels.numpy(), "boxes": boxes.numpy(), "scores": scores.numpy()})
    assert report["ok"] and report["max_box_diff"] <= 1e-2, report


def test_forcing_a_graph_warns_when_it_changes_the_outputs(trained_folder, converted_folders, tmp_path):
    from deimv2_deploy.models.hf_graph import load_deploy_graph

    forced = load_deploy_graph(trained_folder[0], graph="official")
    assert forced.kind == "official" and "left out" in forced.reason
    assert forced.warning and "differ from what transformers computes" in forced.warning
    forced = load_deploy_graph(converted_folders["atto"], graph="transformers")
    assert forced.kind == "transformers" and "differ from the official model's" in forced.warning
    auto = load_deploy_graph(converted_folders["atto"])
    assert auto.kind == "official" and auto.warning is None


def test_torch_runtime_reads_a_transformers_folder(converted_folders):
    from deimv2_deploy.exporters.parity import match_detections, parity_batch
    from deimv2_deploy.runtimes import load_runtime

    runtime = load_runtime(converted_folders["atto"])
    assert runtime.spec.variant == "atto" and runtime.spec.build["graph"] == "official"
    batch = parity_batch(runtime.spec, count=1)
    model = build_model("atto")
    model.load_state_dict(official_state("atto"))
    graph = DeployGraph(model.eval().deploy()).eval()
    with torch.no_grad():
        labels, boxes, scores = graph(torch.from_numpy(batch.images), torch.from_numpy(batch.orig_target_sizes))
    report = match_detections(runtime.infer(batch.as_inputs()),
                              {"labels": labels.numpy(), "boxes": boxes.numpy(), "scores": scores.numpy()})
    assert report["ok"], report


# ------------------------------------------------------------------------------------------- bad input


def _one_line_error(argv, capsys) -> str:
    code, _, err = run_cli(argv, capsys)
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 1 and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("model_type, name", [("d_fine", "D-FINE"), ("rt_detr", "RT-DETR")])
def test_folder_of_another_model_type_is_one_clear_line(tmp_path, capsys, model_type, name, converted_folders):
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    (folder / "model.safetensors").write_bytes((converted_folders["atto"] / "model.safetensors").read_bytes())
    line = _one_line_error(["atto", "--checkpoint", str(folder), "--output-dir", str(tmp_path)], capsys)
    assert f"a {name} model (model_type '{model_type}'), not DEIMv2" in line


def test_missing_weights_and_missing_shard_are_one_clear_line(tmp_path, capsys):
    folder = tmp_path / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf.transformers_config("atto")))
    line = _one_line_error(["atto", "--checkpoint", str(folder), "--output-dir", str(tmp_path)], capsys)
    assert "without model.safetensors" in line

    sharded = written_by_transformers("atto", tmp_path / "sharded", official_state("atto"), max_shard_size="500KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    line = _one_line_error(["atto", "--checkpoint", str(sharded), "--output-dir", str(tmp_path)], capsys)
    assert f"lists shard {shard.name}, which is missing" in line


def test_config_contradicting_the_weights_is_one_clear_line(tmp_path, capsys):
    femto = written_by_transformers("femto", tmp_path / "femto", load_golden_module("fill").fill_state_dict(
        build_model("femto").state_dict()))
    (femto / "config.json").write_text(json.dumps(hf.transformers_config("atto")))
    line = _one_line_error(["atto", "--checkpoint", str(femto), "--output-dir", str(tmp_path)], capsys)
    assert "config.json describes DEIMv2-atto but the weights are DEIMv2-femto's" in line

    atto = written_by_transformers("atto", tmp_path / "atto", official_state("atto"))
    config = hf.transformers_config("atto", ["a", "b"])
    (atto / "config.json").write_text(json.dumps(config))
    line = _one_line_error(["atto", "--checkpoint", str(atto), "--output-dir", str(tmp_path)], capsys)
    assert "id2label names 2 classes but the weights have 80" in line


# ---------------------------------------------------------------- the other six sizes (make test-slow)


@pytest.mark.slow
@pytest.mark.parametrize("variant", OTHERS)
def test_slow_size_differences_proven_complete(variant):
    _differences_proof(variant)


@pytest.mark.slow
@pytest.mark.parametrize("variant", OTHERS)
def test_slow_size_transformers_folder_exports_to_the_official_detections(variant, tmp_path, capsys):
    folder = written_by_transformers(variant, tmp_path / "hf", official_state(variant, zero_key_bias=variant in
                                                                               VIT_TINY))
    _export_reproduces_official(variant, folder, tmp_path / "store", capsys)


@pytest.mark.slow
@pytest.mark.parametrize("variant", OTHERS)
def test_slow_size_written_folder_loads_in_transformers(variant, tmp_path, capsys):
    checkpoint = tmp_path / get_variant(variant).checkpoint_name
    torch.save({"model": official_state(variant)}, checkpoint)
    _written_folder_checks(variant, checkpoint, tmp_path, capsys)
