"""deimv2-serve on EoMT-DINOv3 (POST /segment) and DINOv3 (POST /embed) artifacts.

Tiny random models written by transformers and exported by deimv2-export. Most checks call the Serve deployment's
class directly (its __call__ takes a starlette Request; no Ray), on one event loop, so the dynamic batcher is the real
one. One test starts the real service (the console script, Ray on loopback) on the EoMT artifact. Every answer is
compared with `runtime.predict` on the same image in this process: RLE masks decode to the same masks, the semantic
map rebuilt from its per-class RLE equals the runtime's, base64 float32 arrays equal the embeddings.
"""
from __future__ import annotations

import asyncio
import json

import cv2
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers", reason="the dev extra installs transformers (pinned 5.24)")
pytest.importorskip("ray.serve", reason="deimv2-serve needs the serve extra (ray[serve]), not installed here")

from starlette.requests import Request  # noqa: E402
from test_serve import _encode, _kill, _request, _start_service  # noqa: E402
from vit_helpers import TINY_NAMES, tiny_vit_artifacts  # noqa: E402

from deimv2_deploy.runtimes import load_runtime  # noqa: E402
from deimv2_deploy.serving.settings import ServeSettings  # noqa: E402
from deimv2_deploy.vit_records import array_from_record, rle_decode  # noqa: E402
from deimv2_deploy.vit_spec import VitSpec  # noqa: E402

NAMES = TINY_NAMES
STUFF = (2, 3)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_vit")
    return tiny_vit_artifacts(root)


@pytest.fixture(scope="module")
def images() -> list[tuple[str, bytes, np.ndarray]]:
    """(content type, bytes, decoded BGR): sizes whose semantic pass needs 1, 2 and 3 windows."""
    out = []
    for i, (h, w, ext) in enumerate([(37, 53, ".png"), (32, 32, ".png"), (41, 120, ".png"), (60, 45, ".jpg")]):
        rng = np.random.default_rng(100 + i)
        data = _encode(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), ext)
        out.append(("image/png" if ext == ".png" else "image/jpeg", data,
                    cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)))
    return out


class DirectApp:
    """The deployment's class without Ray: requests go to its __call__ on one event loop (the batcher lives there)."""

    def __init__(self, artifact, **settings) -> None:
        from deimv2_deploy.serving.app import DetectorDeployment

        self.loop = asyncio.new_event_loop()
        self.app = DetectorDeployment.func_or_class(
            ServeSettings(str(artifact), threads=1, cpus_per_replica=1, **settings).to_dict())

    async def _call(self, method: str, path: str, body: bytes, content_type: str) -> tuple[int, dict]:
        query = path.partition("?")[2]
        scope = {"type": "http", "method": method, "path": path.partition("?")[0], "root_path": "",
                 "query_string": query.encode(), "headers": [(b"content-type", content_type.encode()),
                                                             (b"content-length", str(len(body)).encode())]}
        chunks = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}

        response = await self.app(Request(scope, receive))
        return response.status_code, json.loads(response.body)

    def call(self, method: str, path: str, body: bytes = b"", content_type: str = "image/png") -> tuple[int, dict]:
        return self.loop.run_until_complete(self._call(method, path, body, content_type))

    def many(self, requests: list[tuple[str, bytes, str]]) -> list[tuple[int, dict]]:
        """POST requests sent together (they meet in the batcher)."""
        async def together():
            return await asyncio.gather(*(self._call("POST", path, body, ctype) for path, body, ctype in requests))
        return self.loop.run_until_complete(together())

    def close(self) -> None:
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


@pytest.fixture(scope="module")
def eomt_app(artifacts):
    app = DirectApp(artifacts["eomt"], max_batch=4, batch_wait_ms=100.0, score=0.3)
    yield app
    app.close()


@pytest.fixture(scope="module")
def eomt_runtime(artifacts):
    return load_runtime(artifacts["eomt"], threads=1)


def _assert_same_segmentation(answer: dict, want, tasks: tuple[str, ...], score: float) -> None:
    """The answer of POST /segment equals EomtRuntime.predict(image, tasks): same masks (RLE decoded), labels,
    names and scores; the semantic map rebuilt from the per-class RLE masks equals the runtime's map."""
    h, w = want.image_size
    assert answer["tasks"] == list(tasks) and answer["image_size"] == [h, w] and answer["score"] == score
    assert ("semantic" in answer) == ("semantic" in tasks) and ("instances" in answer) == ("instance" in tasks)
    assert ("panoptic" in answer) == ("panoptic" in tasks)
    if "semantic" in tasks:
        rebuilt = np.full((h, w), -1, np.int64)
        for row in answer["semantic"]["classes"]:
            mask = rle_decode(row["segmentation"])
            assert mask.shape == (h, w) and not (rebuilt[mask] >= 0).any(), "semantic masks must not overlap"
            rebuilt[mask] = row["label"]
            assert row["pixels"] == mask.sum() and row["class_name"] == NAMES[row["label"]]
        np.testing.assert_array_equal(rebuilt, want.semantic)
    if "instance" in tasks:
        kept = want.instances.filter(score)
        assert len(answer["instances"]) == len(kept) >= 1 and answer["instance_score_threshold"] == score
        for row, mask, s, label in zip(answer["instances"], kept.masks, kept.scores, kept.labels, strict=True):
            np.testing.assert_array_equal(rle_decode(row["segmentation"]), mask)
            assert row["label"] == label and row["class_name"] == NAMES[int(label)] and abs(row["score"] - s) < 1e-6
    if "panoptic" in tasks:
        segments = answer["panoptic"]["segments"]
        assert answer["panoptic"]["stuff_classes"] == list(STUFF) and len(segments) == len(want.panoptic) >= 1
        for row, seg in zip(segments, want.panoptic.segments, strict=True):
            assert (row["id"], row["label"], row["is_thing"]) == (seg.id, seg.label, seg.is_thing)
            np.testing.assert_array_equal(rle_decode(row["segmentation"]), want.panoptic.mask(seg.id))


def test_segment_equals_runtime_predict_and_batches_mixed_tasks(eomt_app, eomt_runtime, images):
    # one by one: the default tasks (the artifact records its stuff classes, so panoptic is among them)
    ctype, data, image = images[0]
    status, answer = eomt_app.call("POST", "/segment", data, ctype)
    assert status == 200, answer
    default = ("semantic", "instance", "panoptic")
    _assert_same_segmentation(answer, eomt_runtime.predict(image, tasks=default), default, 0.3)
    assert answer["model"]["family"] == "eomt" and answer["batch_size"] == 1
    assert set(answer["timing_ms"]) == {"receive", "decode", "queue", "inference", "total"}
    # together: different task sets and thresholds share one batch (one predict call per task set)
    queries = [("?task=instance&score=0.5", ("instance",), 0.5), ("?task=panoptic,semantic", ("panoptic", "semantic"),
               0.3), ("?task=semantic&task=instance", ("semantic", "instance"), 0.3), ("", default, 0.3)]
    requests = [(f"/segment{q}", data, ctype) for (ctype, data, _), (q, _, _) in zip(images, queries, strict=True)]
    answers = eomt_app.many(requests)
    for (_, _, image), (_, tasks, score), (status, answer) in zip(images, queries, answers, strict=True):
        assert status == 200, answer
        _assert_same_segmentation(answer, eomt_runtime.predict(image, tasks=tasks), tasks, score)
    assert max(a["batch_size"] for _, a in answers) > 1, [a["batch_size"] for _, a in answers]


def test_segment_metadata_and_health(eomt_app, eomt_runtime):
    status, meta = eomt_app.call("GET", "/metadata")
    assert status == 200 and VitSpec.from_dict(meta["spec"]) == eomt_runtime.spec
    assert meta["runtime"]["family"] == "eomt" and meta["serving"]["max_batch"] == 4
    status, health = eomt_app.call("GET", "/health")
    assert status == 200 and health["model"]["family"] == "eomt" and health["model"]["backend"] == "onnxruntime"
    status, index = eomt_app.call("GET", "/")
    assert status == 200 and index["endpoints"].startswith("POST /segment?task=&score=")


def test_embed_equals_runtime_predict(artifacts, images):
    app = DirectApp(artifacts["dino"], max_batch=4, batch_wait_ms=100.0)
    try:
        runtime = load_runtime(artifacts["dino"], threads=1)
        ctype, data, image = images[2]
        want = runtime.predict(image)
        status, answer = app.call("POST", "/embed", data, ctype)
        assert status == 200, answer
        assert "patches" not in answer and answer["dim"] == want.dim and answer["grid"] == list(want.grid)
        assert answer["image_size"] == list(want.image_size) and answer["model"]["family"] == "dinov3"
        for name in ("cls", "pooled", "registers"):
            assert answer[name]["shape"] == list(getattr(want, name).shape)
            np.testing.assert_array_equal(array_from_record(answer[name]), getattr(want, name))
        answers = app.many([("/embed?patches=1", data, ctype) for ctype, data, _ in images])
        assert max(a["batch_size"] for _, a in answers) > 1
        for (_, _, image), (status, answer) in zip(images, answers, strict=True):
            assert status == 200, answer
            want = runtime.predict(image)
            assert answer["patches"]["shape"] == list(want.patches.shape)
            np.testing.assert_allclose(array_from_record(answer["patches"]), want.patches, rtol=0, atol=1e-5)
            np.testing.assert_allclose(array_from_record(answer["cls"]), want.cls, rtol=0, atol=1e-5)
        status, meta = app.call("GET", "/metadata")
        assert status == 200 and VitSpec.from_dict(meta["spec"]) == runtime.spec
        # the DINOv3 service refuses what is not its own
        for path, code, words in [("/segment", 404, "send the image to POST /embed"),
                                  ("/detect", 404, "POST /embed"),
                                  ("/embed?patches=maybe", 400, "patches must be 1 or 0"),
                                  ("/embed?score=0.5", 400, "unknown query parameter 'score'")]:
            status, error = app.call("POST", path, data, ctype)
            assert status == error["status"] == code and words in error["error"], (path, error)
    finally:
        app.close()


def test_bad_segment_requests_are_4xx_and_the_replica_keeps_serving(eomt_app, artifacts, images, atto_onnx):
    ctype, data, _ = images[0]
    cases = [
        ("/detect", data, 404, "this service runs an EoMT-DINOv3 segmentation model: send the image to POST /segment"),
        ("/embed", data, 404, "POST /segment"),
        ("/segment?task=depth", data, 400, "task 'depth' is not an EoMT task: choose from semantic, instance"),
        ("/segment?tasks=semantic", data, 400, "unknown query parameter 'tasks'"),
        ("/segment?score=2", data, 400, "score must lie in [0, 1]"),
        ("/segment", b"plain text, not an image", 415, "not a JPEG or PNG"),
        ("/segment", b"", 400, "empty"),
    ]
    for path, body, code, words in cases:
        status, error = eomt_app.call("POST", path, body, ctype)
        assert status == error["status"] == code and words in error["error"], (path, error)
    status, error = eomt_app.call("GET", "/segment")
    assert status == 405 and "POST" in error["error"]
    status, answer = eomt_app.call("POST", "/segment?task=instance", data, ctype)
    assert status == 200 and len(answer["instances"]) >= 1
    # panoptic on an artifact that does not record which classes are stuff
    nostuff = DirectApp(artifacts["eomt_nostuff"])
    try:
        status, error = nostuff.call("POST", "/segment?task=semantic,panoptic", data, ctype)
        assert status == 400 and "does not record it" in error["error"] and "--stuff-classes" in error["error"]
        status, answer = nostuff.call("POST", "/segment", data, ctype)  # default tasks: no panoptic here
        assert status == 200 and answer["tasks"] == ["semantic", "instance"] and "panoptic" not in answer
    finally:
        nostuff.close()
    # and the other way round: a detector service refuses the segmentation endpoint
    detector = DirectApp(atto_onnx.path)
    try:
        status, error = detector.call("POST", "/segment", data, ctype)
        assert status == 404 and "send the image to POST /detect" in error["error"]
        status, answer = detector.call("POST", "/detect", data, ctype)
        assert status == 200 and "detections" in answer and answer["model"]["variant"] == "atto"
    finally:
        detector.close()


def test_write_config_for_a_segmentation_artifact(artifacts, tmp_path):
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema

    from deimv2_deploy.cli.serve import main
    from deimv2_deploy.serving.app import DetectorDeployment, build_app

    out = tmp_path / "serve.yaml"
    assert main([str(artifacts["eomt"]), "--replicas", "2", "--score", "0.6", "--write-config", str(out)]) == 0
    (app_config,) = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text())).applications
    assert app_config.args["artifact"] == str(artifacts["eomt"]) and app_config.args["score"] == 0.6
    deployment = build_app(app_config.args)._bound_deployment
    assert deployment.num_replicas == 2
    # the replica those args build serves /segment with that threshold
    replica = DetectorDeployment.func_or_class(deployment.init_args[0])
    assert replica.kind == "eomt" and replica.settings.score == 0.6
    assert replica.endpoints.startswith("POST /segment") and replica.identity["family"] == "eomt"


@pytest.mark.timeout(600)
def test_service_on_an_eomt_artifact(artifacts, eomt_runtime, images, tmp_path):
    """The real service (console script, Ray): answers equal EomtRuntime.predict; a wrong endpoint is a 404."""
    pytest.importorskip("psutil", reason="the service helpers list processes with psutil")
    service = _start_service(artifacts["eomt"], tmp_path / "deimv2-serve.log")
    try:
        status, meta = service.get("/metadata")
        assert status == 200 and VitSpec.from_dict(meta["spec"]) == eomt_runtime.spec
        for (ctype, data, image), (query, tasks) in zip(images, [("", ("semantic", "instance", "panoptic")),
                                                                 ("?task=panoptic&score=0.5", ("panoptic",))],
                                                        strict=False):
            status, _, raw = _request(service.port, "POST", f"/segment{query}", data, {"Content-Type": ctype})
            answer = json.loads(raw)
            assert status == 200, answer
            _assert_same_segmentation(answer, eomt_runtime.predict(image, tasks=tasks), tasks,
                                      0.5 if "score" in query else 0.4)
        status, _, raw = _request(service.port, "POST", "/detect", images[0][1], {"Content-Type": images[0][0]})
        assert status == 404 and "POST /segment" in json.loads(raw)["error"]
    finally:
        _kill(service)
    log = service.log.read_text()
    assert service.process.returncode == 0, log[-3000:]
    assert "deimv2-serve: EoMT-DINOv3 (onnxruntime, fp32)" in log and "POST /segment?task=&score=" in log
