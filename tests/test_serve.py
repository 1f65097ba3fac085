"""deimv2-serve: the request rules and settings (no Ray), then one real service on loopback for the module.

The service is the console script's code (`python -m deimv2_deploy.cli.serve`) on the session's atto ONNX
(random weights) at 127.0.0.1 on a free port; Ray starts once (20-40 s on 2 cores). Every answer is compared
with `Runtime.predict` on the same image in this process. The last test stops it with SIGTERM while requests
are in flight and checks that they were all answered and that no Ray process is left.
"""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from deimv2_deploy.detections import Detections
from deimv2_deploy.serving.protocol import (
    RequestError,
    decode_image,
    detections_payload,
    extract_upload,
    image_dimensions,
    parse_score,
)
from deimv2_deploy.serving.settings import ServeSettings, default_cpus_per_replica, serve_config
from deimv2_deploy.spec import ArtifactSpec

HOST = "127.0.0.1"  # loopback only
START_TIMEOUT_S = 240.0
MAX_IMAGE_MB = 1.0  # small, so the over-limit request is quick
BATCH_WAIT_MS = 50.0  # long enough that concurrent requests share batches even on a loaded machine
MAX_BATCH = 4


# --- images -------------------------------------------------------------------------------------------------
def _scene(height: int, width: int, seed: int) -> np.ndarray:
    """A BGR picture with a few filled shapes (deterministic)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), rng.integers(40, 200, 3), np.uint8)
    for _ in range(6):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(1, width // 3 + 2)), int(rng.integers(1, height // 3 + 2))
        cv2.rectangle(image, (x, y), (x + w, y + h), tuple(int(c) for c in rng.integers(0, 255, 3)), -1)
    return image


def _encode(image: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, image)
    assert ok
    return buf.tobytes()


def _multipart(field_name: str, data: bytes, filename: str = "image.jpg",
               extra: dict[str, str] | None = None) -> tuple[bytes, str]:
    boundary = "deimv2-test-boundary-7c1f"
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
             for k, v in (extra or {}).items()]
    parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"{filename}\"\r\n"
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _png_header_claiming(width: int, height: int) -> bytes:
    """The first bytes of a PNG whose header claims width x height (a decompression bomb's header)."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + len(ihdr).to_bytes(4, "big") + b"IHDR" + ihdr + b"\0\0\0\0" + b"\0" * 64


# --- request rules (no Ray) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("ext", [".jpg", ".png"])
@pytest.mark.parametrize("size", [(480, 640), (33, 17), (1080, 1920)])
def test_image_dimensions_from_header(ext, size):
    h, w = size
    data = _encode(_scene(h, w, 0), ext)
    assert image_dimensions(data) == (w, h)
    assert decode_image(data, max_pixels=w * h).shape == (h, w, 3)


def test_progressive_jpeg_and_grayscale_png():
    image = _scene(120, 90, 1)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok and image_dimensions(buf.tobytes()) == (90, 120)
    gray = _encode(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), ".png")
    decoded = decode_image(gray, 10**6)
    assert decoded.shape == (120, 90, 3) and decoded.dtype == np.uint8


@pytest.mark.parametrize("data, status, words", [
    (b"", 400, "empty"),
    (b"hello, not an image", 415, "not a JPEG or PNG"),
    (b"GIF89a" + b"\0" * 30, 415, "not a JPEG or PNG"),
    (b"\x89PNG\r\n\x1a\n\0\0", 400, "truncated PNG"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF", 400, "JPEG"),
])
def test_bad_bodies_are_refused_with_a_reason(data, status, words):
    with pytest.raises(RequestError) as info:
        decode_image(data, 10**6)
    assert info.value.status == status and words in info.value.message


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(RequestError) as info:
        decode_image(_png_header_claiming(100_000, 100_000), max_pixels=50_000_000)
    assert info.value.status == 413 and "100000x100000" in info.value.message


def test_truncated_image_is_a_400():
    data = _encode(_scene(200, 300, 2), ".png")
    with pytest.raises(RequestError) as info:
        decode_image(data[: len(data) // 3], 10**6)
    assert info.value.status == 400


def test_multipart_upload_is_found_by_field_name_or_filename():
    jpeg = _encode(_scene(50, 60, 3), ".jpg")
    for name in ("image", "file", "photo"):
        body, ctype = _multipart(name, jpeg, extra={"note": "x"})
        assert extract_upload(body, ctype) == jpeg
    assert extract_upload(jpeg, "image/jpeg") == jpeg
    assert extract_upload(jpeg, None) == jpeg
    body = b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--b\r\nContent-Disposition: form-data; " \
           b"name=\"c\"\r\n\r\n2\r\n--b--\r\n"
    with pytest.raises(RequestError) as info:
        extract_upload(body, "multipart/form-data; boundary=b")
    assert info.value.status == 400 and "'a'" in info.value.message and "'image'" in info.value.message


@pytest.mark.parametrize("value, expected", [(None, 0.4), ("", 0.4), ("0", 0.0), ("0.25", 0.25), ("1", 1.0)])
def test_parse_score(value, expected):
    assert parse_score(value, 0.4) == expected


@pytest.mark.parametrize("value", ["abc", "-0.1", "1.5", "nan", "inf"])
def test_parse_score_refuses(value):
    with pytest.raises(RequestError) as info:
        parse_score(value, 0.4)
    assert info.value.status == 400 and repr(value) in info.value.message


def test_detections_payload_names_classes_and_category_ids():
    spec = ArtifactSpec.for_variant("atto", class_names=("cat", "dog", "bird"))
    dets = Detections(np.array([[1, 2, 30, 40], [5, 6, 7, 8]], np.float32), np.array([0.9, 0.5], np.float32),
                      np.array([2, 0]), spec.class_names, (100, 200))
    payload = detections_payload(dets, spec)
    assert payload["count"] == 2 and payload["image_size"] == [100, 200]
    assert [d["class_name"] for d in payload["detections"]] == ["bird", "cat"]
    assert all("category_id" not in d for d in payload["detections"])
    # a spec carrying dataset category ids (the optional ArtifactSpec field) adds them
    with_ids = SimpleNamespace(category_ids=(11, 22, 33))
    assert [d["category_id"] for d in detections_payload(dets, with_ids)["detections"]] == [33, 11]


# --- the dynamic batcher (asyncio only) ---------------------------------------------------------------------
class _Model:
    """A batch function that records its calls and can be held busy by the test."""

    def __init__(self, fail_on: object = None) -> None:
        import asyncio

        self.calls: list[list] = []
        self.started: list[float] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_on = fail_on

    async def __call__(self, items):
        self.calls.append(list(items))
        self.started.append(time.monotonic())
        await self.gate.wait()
        if self.fail_on in items:
            raise RuntimeError("model failed")
        return [item * 10 for item in items]


def test_batcher_gathers_requests_while_the_model_is_busy():
    import asyncio

    from deimv2_deploy.serving.batching import DynamicBatcher

    async def scenario():
        model = _Model()
        batcher = DynamicBatcher(model, max_batch=3, wait_s=0.0)
        model.gate.clear()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)  # the model now holds [1]
        rest = [asyncio.ensure_future(batcher.submit(i)) for i in range(2, 9)]
        await asyncio.sleep(0.05)
        assert batcher.pending == 7
        model.gate.set()
        return await first, await asyncio.gather(*rest), model.calls

    first, rest, calls = asyncio.run(scenario())
    assert first == 10 and rest == [i * 10 for i in range(2, 9)]
    # what arrived during the first call ran in full batches, in arrival order
    assert calls == [[1], [2, 3, 4], [5, 6, 7], [8]]


def test_batcher_waits_from_the_oldest_request_not_from_the_model_being_free():
    import asyncio

    from deimv2_deploy.serving.batching import DynamicBatcher

    async def scenario():
        model = _Model()
        batcher = DynamicBatcher(model, max_batch=8, wait_s=2.0)
        a = asyncio.ensure_future(batcher.submit(1))  # waits up to 2 s for company, none comes
        await asyncio.sleep(0.05)
        model.gate.clear()
        while not model.calls:
            await asyncio.sleep(0.05)
        b = asyncio.ensure_future(batcher.submit(2))  # arrives while [1] runs
        await asyncio.sleep(2.5)  # b has now waited longer than wait_s
        released = time.monotonic()
        model.gate.set()
        await asyncio.gather(a, b)
        return model.calls, model.started[1] - released

    calls, gap = asyncio.run(scenario())
    assert calls == [[1], [2]]
    assert gap < 1.0, f"the second batch waited {gap:.2f} s after the model was free (its request had waited 2.5 s)"


def test_batcher_errors_reach_every_request_of_the_batch_only():
    import asyncio

    from deimv2_deploy.serving.batching import DynamicBatcher

    async def scenario():
        model = _Model(fail_on=2)
        batcher = DynamicBatcher(model, max_batch=2, wait_s=0.5)
        bad = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
        good = await batcher.submit(3)
        return bad, good

    bad, good = asyncio.run(scenario())
    assert all(isinstance(e, RuntimeError) and "model failed" in str(e) for e in bad)
    assert good == 30


def test_batcher_skips_cancelled_requests():
    import asyncio

    from deimv2_deploy.serving.batching import DynamicBatcher

    async def scenario():
        model = _Model()
        batcher = DynamicBatcher(model, max_batch=4, wait_s=0.0)
        model.gate.clear()
        first = asyncio.ensure_future(batcher.submit(1))
        await asyncio.sleep(0.05)
        gone = asyncio.ensure_future(batcher.submit(2))
        kept = asyncio.ensure_future(batcher.submit(3))
        await asyncio.sleep(0.05)
        gone.cancel()  # its client went away
        model.gate.set()
        return await first, await kept, model.calls

    first, kept, calls = asyncio.run(scenario())
    assert (first, kept) == (10, 30) and calls == [[1], [3]]


def test_batcher_checks_its_arguments():
    from deimv2_deploy.serving.batching import DynamicBatcher

    with pytest.raises(ValueError, match="max_batch"):
        DynamicBatcher(_Model, max_batch=0, wait_s=0.0)
    with pytest.raises(ValueError, match="wait_s"):
        DynamicBatcher(_Model, max_batch=1, wait_s=-1)


# --- settings and the Serve config --------------------------------------------------------------------------
def test_settings_validate_and_share_cpus(tmp_path):
    s = ServeSettings(str(tmp_path / "m.onnx"), replicas=2, cpus_per_replica=None)
    assert Path(s.artifact).is_absolute()
    assert default_cpus_per_replica(2, cpus=2) == 1.0
    assert default_cpus_per_replica(3, cpus=2) == 0.667
    assert default_cpus_per_replica(1, cpus=16) == 16.0
    assert ServeSettings("m.onnx", cpus_per_replica=0.5).runtime_threads == 1
    assert ServeSettings("m.onnx", cpus_per_replica=3).runtime_threads == 3
    assert ServeSettings("m.onnx", cpus_per_replica=3, threads=1).runtime_threads == 1
    assert ServeSettings("m.onnx", max_batch=32).max_ongoing_requests >= 2 * 32
    for bad in (dict(score=1.5), dict(max_batch=0), dict(replicas=0), dict(batch_wait_ms=-1),
                dict(cpus_per_replica=0), dict(threads=0), dict(max_image_mb=0), dict(max_pixels=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServeSettings("m.onnx", **bad)
    with pytest.raises(ValueError, match="unknown deimv2-serve settings"):
        ServeSettings.from_dict({"artifact": "m.onnx", "replica": 2})


def test_write_config_is_a_valid_serve_config(tmp_path, atto_onnx):
    pytest.importorskip("ray.serve", reason="the serve extra (ray[serve]) is not installed")
    yaml = pytest.importorskip("yaml")
    from ray.serve.schema import ServeDeploySchema

    from deimv2_deploy.cli.serve import main
    from deimv2_deploy.serving.app import build_app

    out = tmp_path / "serve.yaml"
    assert main([str(atto_onnx.path), "--replicas", "2", "--max-batch", "16", "--batch-wait-ms", "3",
                 "--cpus-per-replica", "1.5", "--port", "9123", "--write-config", str(out)]) == 0
    config = yaml.safe_load(out.read_text())
    schema = ServeDeploySchema.model_validate(config)  # Ray's own schema for `serve deploy`
    assert schema.http_options.host == HOST and schema.http_options.port == 9123
    (app_config,) = schema.applications
    assert app_config.import_path == "deimv2_deploy.serving.app:build_app"
    args = app_config.args
    assert args["artifact"] == os.path.abspath(atto_onnx.path) and args["replicas"] == 2
    assert args["max_batch"] == 16 and args["batch_wait_ms"] == 3.0 and args["cpus_per_replica"] == 1.5
    # the builder `serve deploy` calls turns those args into the deployment
    deployment = build_app(args)._bound_deployment
    assert deployment.num_replicas == 2 and deployment.ray_actor_options == {"num_cpus": 1.5}
    assert deployment.max_ongoing_requests == ServeSettings.from_dict(args).max_ongoing_requests
    assert ServeSettings.from_dict(deployment.init_args[0]) == ServeSettings.from_dict(args)
    # without --cpus-per-replica the config still fixes each replica's share
    assert serve_config(ServeSettings("m.onnx", replicas=2))["applications"][0]["args"]["cpus_per_replica"] > 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    from deimv2_deploy.cli.serve import main

    assert main([str(tmp_path / "missing.onnx")]) == 1
    err = capsys.readouterr().err
    assert "artifact not found" in err and "Traceback" not in err
    assert main([str(tmp_path / "m.onnx"), "--score", "2"]) == 1
    assert "score must lie in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path / "m.onnx"), "--port", "0"])


def test_cpu_check_refuses_unschedulable_replicas():
    from deimv2_deploy.serving.server import check_cpus

    check_cpus(ServeSettings("m.onnx", replicas=2, cpus_per_replica=1), cpus=2)
    with pytest.raises(ValueError, match="need 4 CPUs"):
        check_cpus(ServeSettings("m.onnx", replicas=2, cpus_per_replica=2), cpus=2)


# --- the service --------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _request(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
             timeout: float = 120.0) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection (closed after), so a dropped connection shows as an exception."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def _ray_processes(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _alive(proc) -> bool:
    """Running and not a zombie (is_running also tells a reused pid apart by its start time)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class Service:
    process: subprocess.Popen
    port: int
    log: Path
    seen: dict[int, object] = field(default_factory=dict)  # every descendant process seen: pid -> psutil.Process

    def remember_processes(self) -> None:
        for proc in _ray_processes(self.process.pid):
            self.seen.setdefault(proc.pid, proc)

    def get(self, path: str) -> tuple[int, dict]:
        status, _, body = _request(self.port, "GET", path)
        return status, json.loads(body)

    def detect(self, data: bytes, query: str = "", content_type: str = "image/jpeg") -> tuple[int, dict]:
        status, _, body = _request(self.port, "POST", f"/detect{query}", data, {"Content-Type": content_type})
        return status, json.loads(body)


def _start_service(artifact: Path, log: Path) -> Service:
    port = _free_port()
    cmd = [sys.executable, "-m", "deimv2_deploy.cli.serve", str(artifact), "--host", HOST, "--port", str(port),
           "--max-batch", str(MAX_BATCH), "--batch-wait-ms", str(BATCH_WAIT_MS), "--max-image-mb", str(MAX_IMAGE_MB),
           "--replicas", "1", "--cpus-per-replica", "1"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    with open(log, "wb") as fh:
        process = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    service = Service(process, port, log)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"deimv2-serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if service.get("/health")[0] == 200:
                service.remember_processes()
                return service
        except (OSError, http.client.HTTPException, json.JSONDecodeError):
            pass
        time.sleep(1.0)
    _kill(service)
    pytest.fail(f"deimv2-serve did not answer within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-4000:]}")


def _kill(service: Service) -> None:
    """Last resort (a failed test): end the server and every process it started, by pid."""
    import psutil

    service.remember_processes()
    if service.process.poll() is None:
        service.process.send_signal(signal.SIGTERM)
        try:
            service.process.wait(60)
        except subprocess.TimeoutExpired:
            service.process.kill()
    for proc in service.seen.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def service(atto_onnx, tmp_path_factory) -> Iterator[Service]:
    pytest.importorskip("ray.serve", reason="deimv2-serve needs the serve extra (ray[serve]), not installed here")
    pytest.importorskip("psutil", reason="the shutdown check lists processes with psutil")
    log = tmp_path_factory.mktemp("serve") / "deimv2-serve.log"
    svc = _start_service(atto_onnx.path, log)
    yield svc
    if svc.process.poll() is None:  # the shutdown test did not run (or failed): stop it anyway
        _kill(svc)


@pytest.fixture(scope="module")
def reference(atto_onnx):
    from deimv2_deploy.runtimes import load_runtime

    runtime = load_runtime(atto_onnx.path, backend="onnxruntime", threads=1)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def images(example_image_path) -> list[tuple[str, bytes, np.ndarray]]:
    """(content type, bytes, decoded BGR image) of JPEG and PNG pictures of several sizes."""
    from deimv2_deploy.media import read_image

    out = [("image/jpeg", example_image_path.read_bytes(), read_image(example_image_path))]
    for i, (h, w, ext) in enumerate([(480, 640, ".jpg"), (240, 320, ".png"), (720, 1280, ".jpg"), (97, 131, ".png"),
                                     (600, 400, ".jpg")]):
        data = _encode(_scene(h, w, 10 + i), ext)
        out.append(("image/jpeg" if ext == ".jpg" else "image/png", data,
                    cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)))
    return out


def _assert_same_detections(answer: dict, expected: Detections) -> None:
    """The service's JSON equals Runtime.predict: same count and image size, and every detection matched
    (same label and class name, box within 0.01 px, score within 1e-5) regardless of the order of ties."""
    got = answer["detections"]
    assert answer["image_size"] == list(expected.image_size)
    assert answer["count"] == len(got) == len(expected), (len(got), len(expected))
    scores = np.array([d["score"] for d in got], np.float64)
    assert np.all(np.diff(scores) <= 1e-6), "detections must come best first"
    boxes = np.array([d["box"] for d in got], np.float64).reshape(-1, 4)
    labels = np.array([d["label"] for d in got], np.int64)
    free = np.ones(len(expected), bool)
    for i in range(len(got)):
        ok = free & (expected.labels == labels[i]) & (np.abs(expected.scores - scores[i]) <= 1e-5) \
            & (np.abs(expected.xyxy - boxes[i]).max(axis=1) <= 1e-2)
        assert ok.any(), f"detection {got[i]} has no match in Runtime.predict"
        j = int(np.flatnonzero(ok)[0])
        free[j] = False
        assert got[i]["class_name"] == expected.class_names[expected.labels[j]]


def test_health_and_metadata(service, reference):
    status, health = service.get("/health")
    assert status == 200 and health["status"] == "ok" and health["model"]["variant"] == "atto"
    status, meta = service.get("/metadata")
    assert status == 200
    assert ArtifactSpec.from_dict(meta["spec"]) == reference.spec
    assert meta["runtime"]["backend"] == "onnxruntime" and meta["runtime"]["threads"] == 1
    assert meta["serving"]["max_batch"] == MAX_BATCH and meta["serving"]["max_image_mb"] == MAX_IMAGE_MB
    status, index = service.get("/")
    assert status == 200 and "POST /detect" in index["endpoints"]


@pytest.mark.timeout(600)
def test_concurrent_requests_equal_runtime_predict(service, reference, images):
    # every image several times, raw bytes and multipart, at the default threshold and a request's own
    jobs = []
    for k in range(4):
        for idx, (ctype, data, _) in enumerate(images):
            query = "" if k % 2 == 0 else "?score=0.9"
            if k >= 2:
                body, form_type = _multipart("image", data, filename=f"img{idx}")
                jobs.append((idx, body, form_type, query))
            else:
                jobs.append((idx, data, ctype, query))
    barrier = threading.Barrier(8)

    def send(job):
        idx, body, ctype, query = job
        try:
            barrier.wait(timeout=1)  # the first requests leave together, so they meet in the batch queue
        except threading.BrokenBarrierError:
            pass
        return job, service.detect(body, query, ctype)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, jobs))
    batch_sizes = []
    for (idx, _, _, query), (status, answer) in results:
        assert status == 200, answer
        score = 0.9 if query else 0.4
        expected = reference.predict(images[idx][2], score_threshold=score)
        _assert_same_detections(answer, expected)
        assert answer["score"] == score and answer["model"]["variant"] == "atto"
        assert 1 <= answer["batch_size"] <= MAX_BATCH
        assert set(answer["timing_ms"]) == {"receive", "decode", "queue", "inference", "total"}
        batch_sizes.append(answer["batch_size"])
    assert max(batch_sizes) > 1, f"no two requests shared a batch: {batch_sizes}"
    service.remember_processes()


def test_bad_requests_get_4xx_json_and_the_service_keeps_answering(service, images):
    big = os.urandom(int(MAX_IMAGE_MB * 1024 * 1024) + 1000)
    form_without_image, form_type = _multipart("note", b"hello", filename="")
    cases = [
        ("POST", "/detect", b"", {"Content-Type": "image/jpeg"}, 400, "empty"),
        ("POST", "/detect", b"plain text, not an image", {"Content-Type": "text/plain"}, 415, "not a JPEG or PNG"),
        ("POST", "/detect", b"\xff\xd8\xff" + big, {"Content-Type": "image/jpeg"}, 413, "limit"),
        ("POST", "/detect", _png_header_claiming(60_000, 60_000), {"Content-Type": "image/png"}, 413, "pixels"),
        ("POST", "/detect?score=7", images[0][1], {"Content-Type": "image/jpeg"}, 400, "score"),
        ("POST", "/detect", form_without_image.replace(b'filename=""', b""), {"Content-Type": form_type}, 400,
         "'image'"),
        ("GET", "/detect", None, {}, 405, "POST"),
        ("DELETE", "/health", None, {}, 405, "GET"),
        ("GET", "/nowhere", None, {}, 404, "/detect"),
    ]
    for method, path, body, headers, status, words in cases:
        got, response_headers, raw = _request(service.port, method, path, body, headers)
        answer = json.loads(raw)
        assert got == status and answer["status"] == status, (method, path, got, answer)
        assert words in answer["error"], (method, path, answer)
        if status == 405:
            assert response_headers.get("allow") or response_headers.get("Allow")
    status, answer = service.detect(images[0][1])
    assert status == 200 and answer["count"] > 0


@pytest.mark.timeout(600)
def test_a_killed_replica_is_replaced(service, reference, images):

    _, before = service.get("/health")
    replicas = [p for p in _ray_processes(service.process.pid) if "ServeReplica" in _cmdline(p)]
    assert len(replicas) == 1, [_cmdline(p) for p in replicas]
    service.remember_processes()
    replicas[0].kill()  # SIGKILL: the replica dies without any clean-up
    replicas[0].wait(30)
    deadline, after = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        try:
            status, health = service.get("/health")
            if status == 200 and health["replica"] != before["replica"]:
                after = health
                break
        except (OSError, http.client.HTTPException, json.JSONDecodeError):
            pass
        time.sleep(0.5)
    assert after is not None, f"no new replica answered within 180 s:\n{service.log.read_text()[-3000:]}"
    status, answer = service.detect(images[0][1])
    assert status == 200 and answer["replica"] == after["replica"]
    _assert_same_detections(answer, reference.predict(images[0][2], score_threshold=0.4))
    service.remember_processes()
    assert not _alive(replicas[0])


@pytest.mark.timeout(600)
def test_sigterm_answers_requests_in_flight_and_leaves_no_ray_process(service, images):

    service.remember_processes()
    assert any("raylet" in _cmdline(p) for p in service.seen.values() if _alive(p))
    count = 24
    sent = threading.Semaphore(0)
    outcomes: list[object] = []

    def one() -> None:
        conn = http.client.HTTPConnection(HOST, service.port, timeout=120)
        try:
            conn.request("POST", "/detect", body=images[0][1], headers={"Connection": "close"})
            sent.release()
            response = conn.getresponse()
            outcomes.append(response.status)
            response.read()
        except Exception as e:  # noqa: BLE001 - recorded and asserted on below
            sent.release()
            outcomes.append(repr(e))
        finally:
            conn.close()

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for _ in range(count):
        assert sent.acquire(timeout=60)
    service.process.send_signal(signal.SIGTERM)  # every request is on its way
    for t in threads:
        t.join(180)
    assert outcomes == [200] * count, outcomes
    assert service.process.wait(180) == 0, service.log.read_text()[-3000:]
    assert "stopping" in service.log.read_text()
    deadline = time.monotonic() + 60
    alive = [p for p in service.seen.values() if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if _alive(p)]
    assert not alive, f"Ray processes left behind: {[(p.pid, _cmdline(p)[:80]) for p in alive]}"
    # and none of this service's processes went unnoticed: nothing left with its Ray session in the command line
    assert len(service.seen) >= 5
