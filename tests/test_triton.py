"""Triton model repositories: config.pbtxt parsed with Triton's own ModelConfig (tritonclient), field by field.

No Triton server runs here (no container engine, no GPU): these tests check what the server would read. The
ONNX Runtime repository holds the session's atto ONNX; the OpenVINO one an IR exported through export_triton
itself (the exporter path); the TensorRT one a stand-in file with a real sidecar, which is honest because the
config is made from the sidecar's spec alone, never from the engine's bytes (the test proves the bytes are only
copied).
"""
from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest

from deimv2_deploy.exporters.triton_export import (
    DEFAULT_QUEUE_DELAY_US,
    MODEL_FILES,
    export_triton,
    triton_model_config,
    write_repository,
)
from deimv2_deploy.spec import ArtifactSpec

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] (Triton's ModelConfig protobuf) is not installed")
text_format = pytest.importorskip("google.protobuf.text_format")

CONTRACT_TYPES = {"images": "TYPE_FP32", "orig_target_sizes": "TYPE_INT64", "labels": "TYPE_INT64",
                  "boxes": "TYPE_FP32", "scores": "TYPE_FP32"}


def parse(model_dir: Path):
    """config.pbtxt as Triton's ModelConfig; text_format refuses unknown fields and malformed values."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def dtype_name(value: int) -> str:
    return model_config_pb2.DataType.Name(value)


def params(config) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def check_io(config, spec: ArtifactSpec, max_batch: int) -> None:
    """Inputs/outputs: the official names in order, contract dtypes, shapes from the spec (batch axis per Triton)."""
    h, w = spec.input_size
    k = spec.top_k
    shapes = {"images": [3, h, w], "orig_target_sizes": [2], "labels": [k], "boxes": [k, 4], "scores": [k]}
    if max_batch == 0:
        shapes = {n: [spec.batch or -1, *s] for n, s in shapes.items()}
    assert [t.name for t in config.input] == ["images", "orig_target_sizes"]
    assert [t.name for t in config.output] == ["labels", "boxes", "scores"]
    for t in (*config.input, *config.output):
        assert dtype_name(t.data_type) == CONTRACT_TYPES[t.name], t.name
        assert list(t.dims) == shapes[t.name], t.name
        assert not t.HasField("reshape") and not getattr(t, "optional", False)


def check_common(config, spec: ArtifactSpec, name: str, backend: str, max_batch: int, instances: int,
                 kind: str, backend_params: dict[str, str]) -> None:
    assert config.name == name and config.backend == backend and config.platform == ""
    assert config.max_batch_size == max_batch
    check_io(config, spec, max_batch)
    if max_batch > 0:
        assert config.dynamic_batching.max_queue_delay_microseconds == DEFAULT_QUEUE_DELAY_US
        assert list(config.dynamic_batching.preferred_batch_size) == []
    else:
        assert not config.HasField("dynamic_batching")
    (group,) = config.instance_group
    assert group.count == instances and model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == kind
    assert list(group.gpus) == []
    parameters = params(config)
    metadata = {k: v for k, v in parameters.items() if k.startswith("deimv2.")}
    assert metadata == spec.to_metadata()
    assert ArtifactSpec.from_json(parameters["deimv2.spec"]) == spec  # the whole spec round-trips
    assert {k: v for k, v in parameters.items() if not k.startswith("deimv2.")} == backend_params
    # every field that is set is one the tests above checked
    set_fields = {f.name for f, _ in config.ListFields()}
    expected = {"name", "backend", "input", "output", "instance_group", "parameters"}
    assert set_fields == expected | ({"max_batch_size", "dynamic_batching"} if max_batch > 0 else set())


# --- ONNX Runtime -----------------------------------------------------------------------------------------------
def test_onnxruntime_repository(atto_onnx, tmp_path):
    import onnx

    repo = tmp_path / "repo"
    result = export_triton("atto", "onnxruntime", model_path=atto_onnx.path, repository=repo, threads=2,
                           instances=2, quiet=True)
    name = "deimv2_atto_random_fp32_onnxruntime"
    assert result.path == repo / name and result.spec == atto_onnx.spec
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()) == \
        [f"{name}/1/model.onnx", f"{name}/config.pbtxt"]
    assert filecmp.cmp(repo / name / "1" / "model.onnx", atto_onnx.path, shallow=False)
    config = parse(result.path)
    check_common(config, atto_onnx.spec, name, "onnxruntime", 8, 2, "KIND_CPU",
                 {"intra_op_thread_count": "2", "inter_op_thread_count": "1", "execution_mode": "0"})
    # and the declared I/O is the file's: names, element types, and every fixed dimension
    graph = onnx.load(str(repo / name / "1" / "model.onnx"), load_external_data=False).graph
    onnx_types = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.INT64: "TYPE_INT64"}
    for declared, actual in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in actual]
        for t, v in zip(declared, actual, strict=True):
            assert dtype_name(t.data_type) == onnx_types[v.type.tensor_type.elem_type]
            dims = v.type.tensor_type.shape.dim
            assert dims[0].dim_param and not dims[0].dim_value, "the batch axis must be dynamic"
            for want, have in zip(t.dims, dims[1:], strict=True):
                assert not have.dim_value or have.dim_value == want


def test_cli_writes_the_repository(atto_onnx, tmp_path, capsys):
    from deimv2_deploy.cli.export import main

    repo = tmp_path / "models"
    assert main(["atto", "--format", "triton", "--onnx", str(atto_onnx.path), "--triton-repository", str(repo),
                 "--triton-name", "detector", "--max-batch", "4", "--triton-threads", "1", "--quiet"]) == 0
    assert "tritonserver" in capsys.readouterr().out
    config = parse(repo / "detector")
    check_common(config, atto_onnx.spec, "detector", "onnxruntime", 4, 1, "KIND_CPU",
                 {"intra_op_thread_count": "1", "inter_op_thread_count": "1", "execution_mode": "0"})
    assert main(["atto", "--format", "triton", "--onnx", str(atto_onnx.path), "--triton-repository", str(repo),
                 "--triton-name", "bad name"]) == 1
    assert "must be letters" in capsys.readouterr().err
    assert main(["atto", "--format", "triton", "--onnx", str(atto_onnx.path), "--random-weights",
                 "--triton-repository", str(repo)]) == 1
    assert "either a model file" in capsys.readouterr().err


# --- OpenVINO ----------------------------------------------------------------------------------------------------
def test_openvino_repository_through_the_exporter(atto_onnx, tmp_path):
    from deimv2_deploy.runtimes.openvino_backend import openvino_core

    store = tmp_path / "store"
    result = export_triton("atto", "openvino", random_weights=True, output_dir=store, max_batch=4, quiet=True,
                           exporter_options={"onnx_path": atto_onnx.path})
    name = "deimv2_atto_random_fp32_openvino"
    assert result.path == store / "triton" / name
    version = result.path / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.bin", "model.xml"]
    ir = store / "deimv2_atto_random_fp32.xml"  # what the OpenVINO exporter wrote to the store
    assert filecmp.cmp(version / "model.xml", ir, shallow=False)
    assert filecmp.cmp(version / "model.bin", ir.with_suffix(".bin"), shallow=False)
    config = parse(result.path)
    check_common(config, result.spec, name, "openvino", 4, 1, "KIND_CPU",
                 {"NUM_STREAMS": "1", "PERFORMANCE_HINT": "LATENCY", "ENABLE_BATCH_PADDING": "YES"})
    assert result.spec.parity["ok"]
    # the renamed pair is a loadable IR whose ports are the declared ones, batch axis dynamic
    model = openvino_core().read_model(str(version / "model.xml"))
    for declared, ports in ((config.input, model.inputs), (config.output, model.outputs)):
        by_name = {n: p for p in ports for n in p.get_names()}
        for t in declared:
            shape = by_name[t.name].get_partial_shape()
            assert shape[0].is_dynamic
            assert [d.get_length() if d.is_static else -1 for d in list(shape)[1:]] in (list(t.dims),
                                                                                       [-1] * len(t.dims))
    # the same model with a thread count and two instances: throughput mode, a stream per instance
    config = triton_model_config(result.spec, "openvino", "x", instances=2, threads=3)
    assert config.parameters["NUM_STREAMS"] == "2" and config.parameters["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert config.parameters["INFERENCE_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match="CPU instances"):
        triton_model_config(result.spec, "openvino", "x", kind="gpu")


# --- TensorRT (stand-in engine) ------------------------------------------------------------------------------
def _engine_with_sidecar(tmp_path: Path, profile: dict[str, int] | None, batch: int | None = None) -> Path:
    from deimv2_deploy.tensorrt_support import write_sidecar

    engine = tmp_path / "deimv2_s_fp16.engine"
    # stand-in bytes: the repository copies them; the config never reads them
    engine.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    build = {"precision": "fp16"} if profile is None else {"precision": "fp16", "batch_profile": profile}
    spec = ArtifactSpec.for_variant("s", precision="fp16", batch=batch, build=build, exporter="deimv2-deploy test")
    write_sidecar(engine, spec)
    return engine


def test_tensorrt_repository_from_an_engine(tmp_path):
    engine = _engine_with_sidecar(tmp_path, {"min": 1, "opt": 4, "max": 16})
    repo = tmp_path / "repo"
    result = export_triton("s", "tensorrt", model_path=engine, repository=repo, max_batch=16, quiet=True)
    name = "deimv2_s_fp16_tensorrt"
    assert sorted(p.name for p in (repo / name / "1").iterdir()) == ["model.plan"]
    assert filecmp.cmp(repo / name / "1" / "model.plan", engine, shallow=False)
    config = parse(result.path)
    check_common(config, result.spec, name, "tensorrt", 16, 1, "KIND_GPU", {})
    assert json.loads(params(config)["deimv2.spec"])["build"]["batch_profile"]["max"] == 16
    # the engine's profile bounds Triton's batches
    with pytest.raises(ValueError, match="covers 1..16"):
        export_triton("s", "tensorrt", model_path=engine, repository=repo, max_batch=32, quiet=True)
    with pytest.raises(ValueError, match="runs on a GPU"):
        export_triton("s", "tensorrt", model_path=engine, repository=repo, kind="cpu", quiet=True)
    with pytest.raises(ValueError, match="not 'atto'"):
        export_triton("atto", "tensorrt", model_path=engine, repository=repo, quiet=True)


def test_fixed_batch_engine_needs_batching_off(tmp_path):
    engine = _engine_with_sidecar(tmp_path, {"min": 4, "opt": 4, "max": 4}, batch=4)
    repo = tmp_path / "repo"
    with pytest.raises(ValueError, match="fixed batch of 4"):
        export_triton("s", "tensorrt", model_path=engine, repository=repo, quiet=True)
    result = export_triton("s", "tensorrt", model_path=engine, repository=repo, max_batch=0, quiet=True)
    config = parse(result.path)
    check_common(config, result.spec, "deimv2_s_fp16_b4_tensorrt", "tensorrt", 0, 1, "KIND_GPU", {})
    assert list(config.input[0].dims) == [4, 3, 640, 640]


def test_engine_without_sidecar_uses_the_official_spec(tmp_path):
    engine = tmp_path / "official.plan"
    engine.write_bytes(b"stand-in engine bytes")
    result = export_triton("n", "tensorrt", model_path=engine, repository=tmp_path / "repo", quiet=True)
    config = parse(result.path)
    assert result.spec == ArtifactSpec.for_official_export("n")
    check_common(config, result.spec, "deimv2_n_fp32_tensorrt", "tensorrt", 8, 1, "KIND_GPU", {})


# --- the text itself -------------------------------------------------------------------------------------------
def test_custom_class_names_survive_the_text_format(tmp_path):
    names = ("piéton", "vélo", 'quote " and \\ backslash', "日本語", "tab\tnewline\n")
    spec = ArtifactSpec.for_variant("atto", class_names=names, weights="ckpt.pth sha256:0123")
    engine = tmp_path / "custom.engine"
    engine.write_bytes(b"x")
    config = triton_model_config(spec, "tensorrt", "custom")
    model_dir = write_repository(config, [engine], tmp_path / "repo")
    parsed = parse(model_dir)
    assert ArtifactSpec.from_json(params(parsed)["deimv2.spec"]).class_names == names
    assert parsed.name == "custom"


def test_switching_backend_removes_the_other_model_files(atto_onnx, tmp_path):
    repo = tmp_path / "repo"
    engine = _engine_with_sidecar(tmp_path, {"min": 1, "opt": 1, "max": 8})
    export_triton("atto", "onnxruntime", model_path=atto_onnx.path, repository=repo, name="m", quiet=True)
    export_triton("s", "tensorrt", model_path=engine, repository=repo, name="m", quiet=True)
    assert sorted(p.name for p in (repo / "m" / "1").iterdir()) == list(MODEL_FILES["tensorrt"])
    assert parse(repo / "m").backend == "tensorrt"


@pytest.mark.parametrize("kwargs, words", [
    (dict(backend="pytorch"), "must be one of"),
    (dict(max_batch=-1), "max_batch must be >= 0"),
    (dict(instances=0), "instances"),
    (dict(threads=0), "threads"),
    (dict(kind="tpu"), "cpu or gpu"),
])
def test_config_arguments_are_checked(kwargs, words):
    args = dict(backend="onnxruntime", name="m")
    args.update(kwargs)
    with pytest.raises(ValueError, match=words):
        triton_model_config(ArtifactSpec.for_variant("atto"), args.pop("backend"), args.pop("name"), **args)


def test_client_inputs_match_the_config(atto_onnx, tmp_path, example_image_path):
    """The README's client side, offline: the spec read back from the config preprocesses an image into tensors
    whose names, Triton types and shapes are the config's (tritonclient refuses a dtype that does not match)."""
    import tritonclient.grpc as triton

    from deimv2_deploy.media import read_image
    from deimv2_deploy.preprocess import Preprocessor

    result = export_triton("atto", "onnxruntime", model_path=atto_onnx.path, repository=tmp_path, quiet=True)
    config = parse(result.path)
    spec = ArtifactSpec.from_json(params(config)["deimv2.spec"])
    batch = Preprocessor(spec)([read_image(example_image_path)])
    arrays = {"images": batch.images, "orig_target_sizes": batch.orig_target_sizes}
    for declared in config.input:
        array = arrays[declared.name]
        tensor = triton.InferInput(declared.name, list(array.shape), dtype_name(declared.data_type)[len("TYPE_"):])
        tensor.set_data_from_numpy(array)
        assert list(array.shape) == [1, *declared.dims]
