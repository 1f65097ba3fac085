"""DINOv3 ViT and EoMT-DINOv3: transformers folders -> ONNX / OpenVINO IR -> torch-free runtimes.

The folders are tiny random-weight models written by transformers itself (save_pretrained); the exported graphs
must give transformers' own forward within 1e-4, and the runtime's EoMT post-processing must equal the official
one (re-stated below in torch, step by step as github.com/tue-mps/eomt's evaluation code does it).
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers (pinned 5.24)")
F = torch.nn.functional

from deimv2_deploy.cli.export import main as export_main  # noqa: E402
from deimv2_deploy.exporters.vit_export import export_vit  # noqa: E402
from deimv2_deploy.runtimes import load_runtime  # noqa: E402
from deimv2_deploy.runtimes.vit_runtime import Dinov3Runtime, EomtRuntime  # noqa: E402

TOL = 1e-4

DINOV3 = {  # name -> config overrides (several shapes: registers, gated MLP, rectangular input)
    "dino_a": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                   patch_size=16, num_register_tokens=2),
    "dino_b": dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=3, image_size=32,
                   patch_size=8, num_register_tokens=0, use_gated_mlp=True, layerscale_value=0.5),
}
EOMT = {  # name -> (config overrides, masked-attention probabilities saved in the folder)
    "eomt_on": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, image_size=64,
                     patch_size=16, num_register_tokens=2, num_blocks=2, num_queries=6, num_labels=5), 1.0),
    "eomt_off": (dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                      patch_size=8, num_register_tokens=1, num_blocks=1, num_queries=30, num_labels=7), 0.0),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    out = {}
    for name, overrides in DINOV3.items():
        model = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**overrides)).eval()
        model.save_pretrained(root / name)
        out[name] = root / name
    for name, (overrides, prob) in EOMT.items():
        model = transformers.EomtDinov3ForUniversalSegmentation(transformers.EomtDinov3Config(**overrides)).eval()
        model.attn_mask_probs.fill_(prob)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def exported(folders, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    return {name: export_vit("eomt" if name.startswith("eomt") else "dinov3", folder, output_dir=store, quiet=True)
            for name, folder in folders.items()}


def _transformers_forward(folder, pixels: np.ndarray, names) -> dict[str, np.ndarray]:
    config = json.loads((folder / "config.json").read_text())
    cls = (transformers.EomtDinov3ForUniversalSegmentation if config["model_type"] == "eomt_dinov3"
           else transformers.DINOv3ViTModel)
    model = cls.from_pretrained(str(folder)).eval()
    with torch.inference_mode():
        out = model(pixel_values=torch.from_numpy(pixels))
    return {n: getattr(out, n).numpy() for n in names}


@pytest.mark.parametrize("name", [*DINOV3, *EOMT])
def test_onnx_equals_transformers_forward(folders, exported, name):
    result = exported[name]
    assert result.parity["ok"] and result.parity["max_abs_diff"] <= TOL
    runtime = load_runtime(result.path)  # torch-free path: ONNX Runtime through the package's runtime
    assert isinstance(runtime, EomtRuntime if name.startswith("eomt") else Dinov3Runtime)
    h, w = runtime.spec.input_size
    for batch in (1, 3):  # the batch axis is dynamic; neither size is the one traced
        pixels = np.random.default_rng(batch).normal(size=(batch, 3, h, w)).astype(np.float32)
        got = runtime.infer(pixels)
        want = _transformers_forward(folders[name], pixels, runtime.spec.output_names)
        for n in runtime.spec.output_names:
            assert got[n].shape == want[n].shape
            np.testing.assert_allclose(got[n], want[n], rtol=0, atol=TOL, err_msg=f"{name} {n} batch {batch}")


def test_eomt_masked_attention_is_baked_in(exported):
    assert exported["eomt_on"].spec.masked_attention == (1.0, 1.0)
    assert exported["eomt_off"].spec.masked_attention == (0.0,)


def test_dinov3_embeddings_are_the_model_rows(folders, exported):
    runtime = load_runtime(exported["dino_a"].path)
    image = np.random.default_rng(5).integers(0, 256, (37, 71, 3), dtype=np.uint8)
    emb = runtime.predict(image)
    from deimv2_deploy.preprocess import resize_like_pil

    pixels = runtime.normalize(resize_like_pil(image[:, :, ::-1], runtime.spec.input_size))[None]
    want = _transformers_forward(folders["dino_a"], pixels, ("last_hidden_state", "pooler_output"))
    hidden = want["last_hidden_state"][0]
    assert emb.image_size == (37, 71) and emb.grid == (4, 4) and emb.dim == 32 and emb.registers.shape == (2, 32)
    np.testing.assert_allclose(emb.cls, hidden[0], atol=TOL, rtol=0)
    np.testing.assert_allclose(emb.registers, hidden[1:3], atol=TOL, rtol=0)
    np.testing.assert_allclose(emb.patches.reshape(16, 32), hidden[3:], atol=TOL, rtol=0)
    np.testing.assert_allclose(emb.pooled, want["pooler_output"][0], atol=TOL, rtol=0)
    assert len(runtime.predict([image, image[:20]])) == 2


@pytest.mark.slow  # OpenVINO's conversion + two compilations: ~35 s on a busy 2-core machine
def test_dinov3_openvino_ir(folders, tmp_path):
    result = export_vit("dinov3", folders["dino_a"], output_dir=tmp_path, fmt="openvino", input_size=(32, 80),
                        quiet=True)
    assert result.path.suffix == ".xml" and result.parity["openvino"]["ok"]
    runtime = load_runtime(result.path)
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 80)).astype(np.float32)
    want = _transformers_forward(folders["dino_a"], pixels, runtime.spec.output_names)
    got = runtime.infer(pixels)
    for n in runtime.spec.output_names:
        np.testing.assert_allclose(got[n], want[n], atol=TOL, rtol=0)
    assert runtime.predict(np.zeros((9, 9, 3), np.uint8)).grid == (2, 5)


# --- EoMT post-processing against the official steps (torch) --------------------------------------------------
def _official_semantic(runtime, image_rgb: np.ndarray) -> np.ndarray:
    """Official semantic evaluation: windows, per-pixel logits, averaged overlaps, resize, argmax (in torch)."""
    from deimv2_deploy.preprocess import resize_like_pil

    size = runtime.spec.input_size[0]
    h, w = image_rgb.shape[:2]
    factor = max(size / h, size / w)
    nh, nw = round(h * factor), round(w * factor)
    scaled = resize_like_pil(image_rgb, (nh, nw))  # the image resize is ours on both sides (not under test here)
    crops, origins = [], []
    num = math.ceil(max(nh, nw) / size)
    overlap = num * size - max(nh, nw)
    per = overlap / (num - 1) if overlap > 0 else 0
    for j in range(num):
        start = int(j * (size - per))
        crops.append(scaled[start:start + size] if nh > nw else scaled[:, start:start + size])
        origins.append((start, start + size))
    out = runtime.infer(np.stack([runtime.normalize(c) for c in crops]))
    masks = F.interpolate(torch.from_numpy(out["masks_queries_logits"]), (size, size), mode="bilinear")
    classes = torch.from_numpy(out["class_queries_logits"])
    crop_logits = torch.einsum("bqhw, bqc -> bchw", masks.sigmoid(), classes.softmax(dim=-1)[..., :-1])
    sums = torch.zeros((crop_logits.shape[1], nh, nw))
    counts = torch.zeros((crop_logits.shape[1], nh, nw))
    for i, (start, end) in enumerate(origins):
        if h > w:
            sums[:, start:end] += crop_logits[i]
            counts[:, start:end] += 1
        else:
            sums[:, :, start:end] += crop_logits[i]
            counts[:, :, start:end] += 1
    logits = F.interpolate((sums / counts)[None], (h, w), mode="bilinear")[0]
    return logits.argmax(0).numpy()


def _official_instances(runtime, image_rgb: np.ndarray, top_k: int = 100):
    """Official instance evaluation: fit + pad, top-k (query, class) pairs, score x mean mask probability."""
    from deimv2_deploy.preprocess import resize_like_pil

    size = runtime.spec.input_size[0]
    h, w = image_rgb.shape[:2]
    factor = min(size / h, size / w)
    nh, nw = round(h * factor), round(w * factor)
    canvas = np.zeros((size, size, 3), np.uint8)
    canvas[:nh, :nw] = resize_like_pil(image_rgb, (nh, nw))
    out = runtime.infer(runtime.normalize(canvas)[None])
    mask_logits = F.interpolate(torch.from_numpy(out["masks_queries_logits"]), (size, size), mode="bilinear")
    mask_logits = F.interpolate(mask_logits[:, :, :nh, :nw], (h, w), mode="bilinear")[0]
    scores = torch.from_numpy(out["class_queries_logits"][0]).softmax(dim=-1)[:, :-1]
    labels = torch.arange(scores.shape[-1]).unsqueeze(0).repeat(scores.shape[0], 1).flatten(0, 1)
    top_scores, top_idx = scores.flatten(0, 1).topk(min(top_k, scores.numel()), sorted=False)
    labels = labels[top_idx]
    mask_logits = mask_logits[top_idx // scores.shape[-1]]
    masks = mask_logits > 0
    mask_scores = (mask_logits.sigmoid().flatten(1) * masks.flatten(1)).sum(1) / (masks.flatten(1).sum(1) + 1e-6)
    return masks.numpy(), (top_scores * mask_scores).numpy(), labels.numpy()


@pytest.mark.parametrize("name", list(EOMT))
@pytest.mark.parametrize("hw", [(45, 130), (90, 40), (32, 32)])
def test_eomt_postprocessing_is_the_official_one(exported, name, hw):
    runtime = load_runtime(exported[name].path)
    image = np.random.default_rng(hw[0]).integers(0, 256, (*hw, 3), dtype=np.uint8)
    seg = runtime.predict(image, color="rgb")
    assert seg.image_size == hw and seg.semantic.shape == hw and seg.semantic.dtype == np.int64
    want_sem = _official_semantic(runtime, image)
    # argmax over near-equal random-weight scores may flip on float noise: compare almost all pixels
    assert np.mean(seg.semantic == want_sem) > 0.995
    masks, scores, labels = _official_instances(runtime, image)
    inst = seg.instances
    k = min(100, runtime.spec.num_queries * len(runtime.spec.class_names))
    assert len(inst) == k and inst.masks.shape == (k, *hw) and inst.masks.dtype == bool
    assert np.all(np.diff(inst.scores) <= 0)  # best first
    np.testing.assert_allclose(inst.scores, np.sort(scores)[::-1], atol=1e-5, rtol=0)
    # the same (query-mask, label, score) triples: match each official one to ours by label and score
    for m, s, lab in zip(masks, scores, labels, strict=True):
        hit = np.flatnonzero((inst.labels == lab) & (np.abs(inst.scores - s) < 1e-5))
        assert hit.size and any(np.mean(inst.masks[j] == m) > 0.999 for j in hit)


def test_eomt_tasks_and_bad_inputs(exported):
    runtime = load_runtime(exported["eomt_off"].path)
    image = np.zeros((20, 30, 3), np.uint8)
    only = runtime.predict(image, tasks="semantic")
    assert only.instances is None and only.semantic.shape == (20, 30)
    assert runtime.predict(image, tasks=["instance"]).semantic is None
    with pytest.raises(ValueError, match="unknown task 'panoptics'"):
        runtime.predict(image, tasks=["panoptics"])
    with pytest.raises(ValueError, match=r"pixel_values of shape \(N, 3, 32, 32\), got \(1, 3, 64, 64\)"):
        runtime.infer(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="image must be uint8"):
        runtime.predict(np.zeros((20, 30, 3), np.float32))


# --- refusals, one line each --------------------------------------------------------------------------------
def _one_line_error(capsys, argv) -> str:
    capsys.readouterr()  # drop what the test's own transformers calls printed
    assert export_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("deimv2-export: error:") and "\n" not in err and "Traceback" not in err
    return err


def test_export_refuses_random_masked_attention(folders, tmp_path, capsys):
    model = transformers.EomtDinov3ForUniversalSegmentation.from_pretrained(str(folders["eomt_on"]))
    model.attn_mask_probs.copy_(torch.tensor([1.0, 0.5]))
    model.save_pretrained(tmp_path / "annealing")
    err = _one_line_error(capsys, ["eomt", "--checkpoint", str(tmp_path / "annealing"), "--output-dir",
                                   str(tmp_path / "store"), "--quiet"])
    assert "masked-attention probability 0.5 in block 1" in err
    assert not (tmp_path / "store").exists()
    # on, then off: transformers reuses block 0's mask in block 1, the official EoMT attends fully there
    model.attn_mask_probs.copy_(torch.tensor([1.0, 0.0]))
    model.save_pretrained(tmp_path / "on_then_off")
    err = _one_line_error(capsys, ["eomt", "--checkpoint", str(tmp_path / "on_then_off"), "--output-dir",
                                   str(tmp_path / "store"), "--quiet"])
    assert "on in block 0 but off in the later block 1" in err and not (tmp_path / "store").exists()


def test_export_warns_where_transformers_head_activation_is_not_the_official_gelu(tmp_path):
    config = transformers.EomtDinov3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, num_register_tokens=0,
                                           num_blocks=1, num_queries=4, num_labels=3, hidden_act="silu")
    model = transformers.EomtDinov3ForUniversalSegmentation(config).eval()
    model.attn_mask_probs.fill_(0.0)
    model.save_pretrained(tmp_path / "silu")
    with pytest.warns(UserWarning, match="official EoMT hard-codes GELU"):
        export_vit("eomt", tmp_path / "silu", output_dir=tmp_path / "out", quiet=True)


def test_export_refuses_other_folders(folders, tmp_path, capsys):
    err = _one_line_error(capsys, ["eomt", "--checkpoint", str(folders["dino_a"]), "--quiet"])
    assert "type 'dinov3_vit', expected eomt_dinov3; for model_type 'dinov3_vit' use `deimv2-export dinov3`" in err
    other = tmp_path / "deimv2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "deimv2"}))
    err = _one_line_error(capsys, ["dinov3", "--checkpoint", str(other), "--quiet"])
    assert "holds a model of type 'deimv2', expected dinov3_vit" in err
    empty = tmp_path / "no_weights"
    empty.mkdir()
    (empty / "config.json").write_text((folders["eomt_off"] / "config.json").read_text())
    err = _one_line_error(capsys, ["eomt", "--checkpoint", str(empty), "--quiet"])
    assert "has a config.json but no weights" in err
    err = _one_line_error(capsys, ["dinov3", "--quiet"])
    assert "add --checkpoint FOLDER" in err
    err = _one_line_error(capsys, ["eomt", "--checkpoint", str(folders["eomt_off"]), "--input-size", "64",
                                   "--quiet", "--output-dir", str(tmp_path / "s")])
    assert "fixed by its config (32x32)" in err


def test_cli_export_json(folders, tmp_path, capsys):
    assert export_main(["dinov3", "--checkpoint", str(folders["dino_b"]), "--input-size", "24x16", "--batch", "2",
                        "--output-dir", str(tmp_path), "--json", "--quiet"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["spec"]["input_size"] == [24, 16] and row["spec"]["batch"] == 2 and row["parity"]["ok"]
    assert row["path"].endswith("dinov3_vit_dino_b_24x16_fp32_b2.onnx")
    runtime = load_runtime(row["path"])
    with pytest.raises(ValueError, match="fixed batch of 2"):
        runtime.infer(np.zeros((1, 3, 24, 16), np.float32))
    assert len(runtime.predict([np.zeros((5, 5, 3), np.uint8)] * 3)) == 3  # padded to the fixed batch


def test_eomt_with_transformers_default_two_labels_exports(tmp_path):
    """transformers writes no id2label/num_labels for its default of two labels: the folder still has 2 classes."""
    from deimv2_deploy.models.hf_vit import inspect_vit_folder

    config = transformers.EomtDinov3Config(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8, num_register_tokens=0,
                                           num_blocks=1, num_queries=4)
    model = transformers.EomtDinov3ForUniversalSegmentation(config).eval()
    model.attn_mask_probs.fill_(0.0)
    model.save_pretrained(tmp_path / "two")
    saved = json.loads((tmp_path / "two" / "config.json").read_text())
    assert "id2label" not in saved and "num_labels" not in saved  # what makes this case
    assert inspect_vit_folder(tmp_path / "two").class_names == ("class_0", "class_1")
    result = export_vit("eomt", tmp_path / "two", output_dir=tmp_path / "out", quiet=True)
    assert load_runtime(result.path).predict(np.zeros((40, 30, 3), np.uint8)).class_names == ("class_0", "class_1")
