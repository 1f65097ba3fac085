"""ONNX export + the common Runtime: parity with PyTorch, batching, official files, errors, no torch."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import onnx
import pytest

from deimv2_deploy.exporters.parity import match_detections, parity_batch, reference_outputs
from deimv2_deploy.media import read_image
from deimv2_deploy.runtimes import BackendUnavailableError, load_runtime
from deimv2_deploy.spec import ArtifactSpec


def _torch_reference(result, batch):
    from deimv2_deploy.models.graph import DeployGraph
    from deimv2_deploy.models.reference import load_reference

    model, _, _ = load_reference(result.spec.variant, random_weights=True)
    return reference_outputs(DeployGraph(model), batch)


@pytest.mark.parametrize("fixture", ["atto_onnx", "s_onnx"])
def test_onnxruntime_matches_pytorch(request, fixture):
    result = request.getfixturevalue(fixture)
    assert result.parity["ok"] and result.parity["fraction"] >= 0.98  # the export's own report
    runtime = load_runtime(result.path)
    assert runtime.spec == result.spec  # the metadata travelled with the file
    assert runtime.spec.random_weights and "random" in result.path.name
    batch = parity_batch(runtime.spec, count=3)
    report = match_detections(runtime.infer(batch.as_inputs()), _torch_reference(result, batch),
                              box_tol=1e-2, score_tol=1e-5)
    assert report["ok"], report
    assert report["fraction"] >= 0.98 and report["max_box_diff"] <= 1e-2 and report["max_score_diff"] <= 1e-5


def test_batch_of_four_equals_four_batches_of_one(atto_onnx):
    runtime = load_runtime(atto_onnx.path)
    batch = parity_batch(runtime.spec, count=4)
    together = runtime.infer(batch.as_inputs())
    for i in range(4):
        alone = runtime.infer({"images": batch.images[i:i + 1], "orig_target_sizes": batch.orig_target_sizes[i:i + 1]})
        one = {k: v[i:i + 1] for k, v in together.items()}
        assert match_detections(alone, one, box_tol=1e-3, score_tol=1e-6)["fraction"] >= 0.98


def test_predict_on_the_example_photo(atto_onnx, example_image_path):
    runtime = load_runtime(atto_onnx.path)
    image = read_image(example_image_path)
    detections = runtime.predict(image)
    assert len(detections) == 300 and detections.image_size == image.shape[:2]
    assert np.all(np.diff(detections.scores) <= 0)  # best first
    # boxes come back in the photo's pixels: the graph's with the original size, clipped to the photo
    batch = runtime.prepare(image)
    raw = runtime.infer(batch.as_inputs())
    h, w = image.shape[:2]
    clipped = np.clip(raw["boxes"][0], 0, [w, h, w, h])
    assert np.allclose(np.sort(clipped.ravel()), np.sort(detections.xyxy.ravel()))
    assert detections.xyxy.min() >= 0
    assert (detections.xyxy[:, 0::2] <= w).all() and (detections.xyxy[:, 1::2] <= h).all()
    assert batch.orig_target_sizes.tolist() == [[image.shape[1], image.shape[0]]]
    several = runtime.predict([image, image[:200, :300]], score_threshold=0.5)
    assert isinstance(several, list) and several[1].image_size == (200, 300)
    letterboxed = load_runtime(atto_onnx.path)
    from deimv2_deploy.preprocess import Preprocessor
    letterboxed.preprocessor = Preprocessor(letterboxed.spec, resize="letterbox")
    lb = letterboxed.predict(image)
    assert len(lb) == 300 and lb.xyxy[:, 2].max() < 4 * image.shape[1]


def test_official_onnx_without_metadata_needs_the_variant(atto_onnx, tmp_path):
    model = onnx.load(str(atto_onnx.path))
    del model.metadata_props[:]  # what the official exporter writes: the same I/O, no metadata
    official = tmp_path / "model.onnx"
    onnx.save(model, str(official))
    with pytest.raises(ValueError, match="pass the size.*variant='atto'"):
        load_runtime(official)
    runtime = load_runtime(official, variant="atto")
    assert runtime.spec.exporter.startswith("official") and runtime.spec.input_size == (320, 320)
    batch = parity_batch(runtime.spec)
    ours = load_runtime(atto_onnx.path).infer(batch.as_inputs())
    assert match_detections(runtime.infer(batch.as_inputs()), ours)["ok"]
    with pytest.raises(ValueError, match="takes 320x320 images but DEIMv2-s uses 640x640"):
        load_runtime(official, variant="s")


def test_runtime_names_expected_and_received_inputs(atto_onnx):
    runtime = load_runtime(atto_onnx.path)
    good = parity_batch(runtime.spec).as_inputs()
    with pytest.raises(ValueError, match=r"shape \(N, 3, 320, 320\), got \(2, 3, 640, 640\)"):
        runtime.infer({**good, "images": np.zeros((2, 3, 640, 640), np.float32)})
    with pytest.raises(ValueError, match="float32.*got float64"):
        runtime.infer({**good, "images": good["images"].astype(np.float64)})
    with pytest.raises(ValueError, match="int64.*got int32"):
        runtime.infer({**good, "orig_target_sizes": good["orig_target_sizes"].astype(np.int32)})
    with pytest.raises(ValueError, match=r"missing \['orig_target_sizes'\]"):
        runtime.infer({"images": good["images"]})


def test_unknown_and_missing_files(tmp_path):
    odd = tmp_path / "model.tflite"
    odd.write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown file type '.tflite'"):
        load_runtime(odd)
    with pytest.raises(FileNotFoundError, match="artifact not found"):
        load_runtime(tmp_path / "nope.onnx")
    fake_onnx = tmp_path / "model.onnx"
    fake_onnx.write_bytes(b"x")
    with pytest.raises(ValueError, match="cannot load .onnx files"):
        load_runtime(fake_onnx, backend="tensorrt")


def test_tensorrt_absent_is_explained(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    with pytest.raises(BackendUnavailableError, match="(?i)tensorrt"):
        load_runtime(engine)


def test_export_cli_without_checkpoint_says_where_it_looked(tmp_path, capsys):
    from deimv2_deploy.cli.export import main

    assert main(["pico", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "deimv2_hgnetv2_pico_coco.pth" in err and str(tmp_path.resolve()) in err and "--random-weights" in err
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_infer_cli_writes_annotated_image_and_json(atto_onnx, example_image_path, tmp_path):
    from deimv2_deploy.cli.infer import main

    out = tmp_path / "out"
    assert main([str(atto_onnx.path), str(example_image_path), "--output-dir", str(out), "--json"]) == 0
    assert read_image(out / "example.jpg").shape == read_image(example_image_path).shape
    import json
    record = json.loads((out / "example.json").read_text())
    assert record["image_size"] == [375, 500] and all(d["score"] >= 0.4 for d in record["detections"])


def test_inference_path_imports_no_torch(atto_onnx, example_image_path):
    code = textwrap.dedent(f"""
        import sys, time
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, NoTorch())
        t = time.perf_counter()
        from deimv2_deploy.runtimes import load_runtime
        from deimv2_deploy.media import read_image
        print("import_s", time.perf_counter() - t)
        runtime = load_runtime({str(atto_onnx.path)!r})
        d = runtime.predict(read_image({str(example_image_path)!r}))
        assert len(d) == 300
        assert "torch" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


def test_spec_is_readable_without_our_package(atto_onnx):
    props = {p.key: p.value for p in onnx.load(str(atto_onnx.path)).metadata_props}
    assert props["deimv2.variant"] == "atto" and props["deimv2.normalize"] == "none"
    spec = ArtifactSpec.from_metadata(props)
    assert spec.parity["ok"] and spec.versions["onnxruntime"]


def test_parity_excuses_only_score_ties():
    """Rows swapped by rounding where scores tie (at the top-k boundary, or inside a tie group an inner top-k
    chose from) are excused and counted; a wrong box of an untied row is still a failure."""
    rng = np.random.default_rng(0)
    k = 20
    ref = {"labels": rng.integers(0, 8, (1, k)), "boxes": rng.uniform(0, 300, (1, k, 4)).astype(np.float32),
           "scores": np.sort(rng.uniform(0.2, 0.9, (1, k)).astype(np.float32))[:, ::-1].copy()}
    ref["scores"][0, -3:] = 0.01  # three rows tied at the cutoff
    swapped = {key: v.copy() for key, v in ref.items()}
    swapped["boxes"][0, -2:] += 50.0  # two of the tied rows replaced by other queries with the same score
    report = match_detections(swapped, ref)
    assert report["ok"] and report["matched"] == k - 2 and report["score_ties"] == 2

    lost = {key: v.copy() for key, v in swapped.items()}
    lost["boxes"][0, 0] += 50.0  # the best detection moved: no tie excuses that
    assert not match_detections(lost, ref, min_matched=1.0)["ok"]

    inner = {key: v.copy() for key, v in ref.items()}
    inner["scores"][0, 5:7] = inner["scores"][0, 5]  # a tie group of two rows of one label
    inner["labels"][0, 5:7] = inner["labels"][0, 5]
    swapped = {key: v.copy() for key, v in inner.items()}
    swapped["boxes"][0, 6] += 50.0  # the encoder picked another query of the same score
    report = match_detections(swapped, inner)
    assert report["ok"] and report["score_ties"] == 1
    wrong = {key: v.copy() for key, v in inner.items()}
    wrong["boxes"][0, 8] += 50.0  # an untied row with a wrong box
    assert match_detections(wrong, inner, min_matched=1.0)["score_ties"] == 0
