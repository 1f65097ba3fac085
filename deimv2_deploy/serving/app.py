"""The Ray Serve application of deimv2-serve: one Runtime per replica, concurrent requests batched together.

    from deimv2_deploy.serving import ServeSettings
    from deimv2_deploy.serving.app import build_application
    serve.run(build_application(ServeSettings("models/deimv2_atto_fp32.onnx", replicas=2)))

Endpoints (JSON answers; see `protocol` for the request rules), one predict endpoint per kind of artifact, each
taking JPEG/PNG bytes or a multipart form with the file in a field named 'image':
- a DEIMv2 detector: `POST /detect` (`?score=` overrides the threshold);
- an EoMT-DINOv3 artifact: `POST /segment` (`?task=semantic,instance,panoptic`, `?score=` the instances'
  threshold): deimv2-infer's JSON record, every mask COCO RLE;
- a DINOv3 artifact: `POST /embed` (`?patches=1` adds the patch grid): CLS, pooled, registers as base64 float32;
and `GET /health`, `GET /metadata` for all. Another kind's predict endpoint is a 404 naming the right one.
A request Ray Serve routes to a replica is checked and decoded there, then joins the replica's dynamic batcher
(`batching`): while the model is busy, requests gather; when it is free, up to `max_batch` of them run as one
`Runtime.predict` call on the list of images, waiting at most `batch_wait_ms` from the oldest for the batch to
fill (EoMT: one call per distinct task set in the batch, since predict takes one for the whole list). The model runs
in a worker thread, so the replica keeps accepting requests meanwhile. `build_app(args)` is the application builder
a Serve config file names (`deimv2-serve --write-config`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from deimv2_deploy.runtimes import load_runtime
from deimv2_deploy.serving.batching import DynamicBatcher
from deimv2_deploy.serving.protocol import (
    PREDICT_PATHS,
    RequestError,
    check_query,
    decode_image,
    detections_payload,
    embeddings_payload,
    endpoints,
    error_payload,
    extract_upload,
    model_identity,
    model_kind,
    parse_flag,
    parse_score,
    parse_tasks,
    segmentation_payload,
    wrong_endpoint,
)
from deimv2_deploy.serving.settings import DEPLOYMENT_NAME, ServeSettings

__all__ = ["DetectorDeployment", "build_application", "build_app", "ROUTES", "DRAIN_TIMEOUT_S"]

logger = logging.getLogger("ray.serve")

# path -> allowed methods; of the predict paths only the artifact's own answers (protocol.PREDICT_PATHS)
ROUTES: dict[str, tuple[str, ...]] = {
    "/detect": ("POST",),
    "/segment": ("POST",),
    "/embed": ("POST",),
    "/health": ("GET", "HEAD"),
    "/metadata": ("GET", "HEAD"),
    "/": ("GET", "HEAD"),
}
# when a replica cannot be built (bad artifact, missing library) Serve gives up after this many tries
CONSTRUCTOR_RETRIES = 3
DRAIN_TIMEOUT_S = 30.0  # how long a stopping replica may take to answer the requests it holds


@dataclass
class _Job:
    image: np.ndarray  # BGR uint8 (H, W, 3)
    score: float  # detector: the threshold the graph call may use (the lowest of the batch)
    queued_at: float  # perf_counter when the request joined the batch queue
    tasks: tuple[str, ...] = ()  # EoMT: what to compute


@dataclass
class _Done:
    result: Any  # Detections (detector), Segmentation (EoMT), Embeddings (DINOv3)
    batch_size: int
    queue_ms: float  # waiting for the batch to fill and for the previous batch to finish
    inference_ms: float  # Runtime.predict of the whole batch (preprocess, graph, boxes)


def _json(payload: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(payload, status_code=status, headers=headers)


def _route_path(scope: dict[str, Any]) -> str:
    """The request path below the application's route prefix."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") or "/"


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing one over `limit` bytes as soon as that is known (declared length, or while reading)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, f"request body of {int(declared)} bytes is over this service's limit of "
                                    f"{limit} bytes; send a smaller image")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over this service's limit of {limit} bytes; "
                                    "send a smaller image")
        chunks.append(chunk)
    return b"".join(chunks)


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests constructing the class directly)
        return "local"


@serve.deployment(name=DEPLOYMENT_NAME, max_constructor_retry_count=CONSTRUCTOR_RETRIES)
class DetectorDeployment:
    """One replica: a Runtime (a detector's, or an EomtRuntime / Dinov3Runtime) with `settings.runtime_threads`
    threads, and a batch queue in front of it. (The name stays from when it served detectors only: Serve configs
    and logs know the deployment by it.)"""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = ServeSettings.from_dict(settings)
        s = self.settings
        # spinning off: between batches the idle inference threads sleep, leaving the cores to the HTTP proxy
        # and to request decoding (ONNX Runtime only; the other backends ignore the option)
        self.runtime = load_runtime(s.artifact, backend=s.backend, device=s.device, variant=s.variant,
                                    threads=s.runtime_threads, spinning=False)
        self.runtime.max_batch = s.max_batch  # one graph call per batch
        self.spec = self.runtime.spec
        self.kind = model_kind(self.spec)  # "detector", "eomt", "dinov3": which predict endpoint answers
        self.endpoints = endpoints(self.kind)
        backend = self.runtime.backend
        self.identity = model_identity(self.spec, getattr(backend, "value", backend))
        self._batcher: DynamicBatcher[_Job, _Done] | None = None  # made in the replica's event loop, on first use
        self.replica = _replica_id()
        self.started = time.time()

    # --- HTTP ---------------------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> JSONResponse:
        try:
            path = _route_path(request.scope)
            allowed = ROUTES.get(path)
            if allowed is None:
                raise RequestError(404, f"no endpoint {path!r}: use {self.endpoints}")
            if request.method not in allowed:
                return _json(error_payload(405, f"{request.method} is not allowed on {path}; use "
                                                f"{' or '.join(allowed)}"), 405, {"Allow": ", ".join(allowed)})
            if path in PREDICT_PATHS.values():
                if path != PREDICT_PATHS[self.kind]:
                    raise wrong_endpoint(path, self.kind)
                return _json(await self._predict(request))
            if path == "/health":
                return _json({"status": "ok", "replica": self.replica, "model": self.identity,
                              "uptime_s": round(time.time() - self.started, 3)})
            if path == "/metadata":
                return _json(self.metadata())
            return _json({"service": "deimv2-serve", "endpoints": self.endpoints, "model": self.identity})
        except RequestError as e:
            return _json(error_payload(e.status, e.message), e.status)
        except Exception as e:  # a backend failure: the request gets a 500 naming it, the replica keeps serving
            logger.exception("deimv2-serve: request failed")
            return _json(error_payload(500, f"internal error: {type(e).__name__}: {e}"), 500)

    async def _predict(self, request: Request) -> dict[str, Any]:
        """POST /detect, /segment or /embed (the artifact's own): query checked before the body is read."""
        start = time.perf_counter()
        s = self.settings
        query = request.query_params
        tasks: tuple[str, ...] = ()
        patches = False
        score = s.score
        if self.kind != "detector":  # the new endpoints refuse what they do not understand
            check_query(list(query.keys()), self.kind)
        if self.kind in ("detector", "eomt"):
            score = parse_score(query.get("score"), s.score)
        if self.kind == "eomt":
            tasks = parse_tasks(query.getlist("task"), self.spec)
        elif self.kind == "dinov3":
            patches = parse_flag(query.get("patches"), "patches")
        body = await _read_body(request, s.max_body_bytes)
        received = time.perf_counter()
        image = decode_image(extract_upload(body, request.headers.get("content-type")), s.max_pixels)
        decoded = time.perf_counter()
        if self._batcher is None:
            self._batcher = DynamicBatcher(self._run_batch, s.max_batch, s.batch_wait_ms / 1000.0)
        done = await self._batcher.submit(_Job(image, score, decoded, tasks))
        if self.kind == "detector":
            payload = detections_payload(done.result.filter(score), self.spec)
        elif self.kind == "eomt":
            payload = segmentation_payload(done.result, tasks, score)
        else:
            payload = embeddings_payload(done.result, patches)
        ms = lambda a, b: round((b - a) * 1000, 3)  # noqa: E731
        payload.update(model=self.identity, replica=self.replica, batch_size=done.batch_size,
                       timing_ms={"receive": ms(start, received), "decode": ms(received, decoded),
                                  "queue": round(done.queue_ms, 3), "inference": round(done.inference_ms, 3),
                                  "total": ms(start, time.perf_counter())})
        if self.kind != "dinov3":
            payload["score"] = score
        return payload

    def metadata(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "runtime": self.runtime.describe(), "replica": self.replica,
                "serving": {**self.settings.to_dict(), "runtime_threads": self.settings.runtime_threads,
                            "replica_cpus": self.settings.replica_cpus}}

    # --- batching -----------------------------------------------------------------------------------------
    async def _run_batch(self, jobs: list[_Job]) -> list[_Done]:
        begin = time.perf_counter()
        results = await asyncio.to_thread(self._predict_batch, jobs)
        inference_ms = (time.perf_counter() - begin) * 1000
        return [_Done(result, len(jobs), (begin - job.queued_at) * 1000, inference_ms)
                for job, result in zip(jobs, results, strict=True)]

    def _predict_batch(self, jobs: list[_Job]) -> list[Any]:
        """Runtime.predict on the batch's images, in the worker thread; results in the jobs' order."""
        images = [job.image for job in jobs]
        if self.kind == "detector":
            # one graph call for the batch, at the lowest threshold asked; each request filters its own after
            return self.runtime.predict(images, min(job.score for job in jobs))
        if self.kind == "dinov3":
            return self.runtime.predict(images)
        # EoMT: predict takes one task set for its list, so one call per distinct set (instances are filtered
        # by each request's score afterwards, so the score does not split the batch)
        results: list[Any] = [None] * len(jobs)
        groups: dict[frozenset[str], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(frozenset(job.tasks), []).append(i)
        for indices in groups.values():
            tasks = jobs[indices[0]].tasks
            for i, seg in zip(indices, self.runtime.predict([images[i] for i in indices], tasks=tasks), strict=True):
                results[i] = seg
        return results


def build_application(settings: ServeSettings) -> serve.Application:
    """The Serve application for these settings: replicas, their CPU share, and how many requests each takes."""
    settings = settings.resolved()
    return DetectorDeployment.options(
        num_replicas=settings.replicas,
        max_ongoing_requests=settings.max_ongoing_requests,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
    ).bind(settings.to_dict())


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve config files (`import_path: deimv2_deploy.serving.app:build_app`): the
    config's `args` are ServeSettings fields."""
    return build_application(ServeSettings.from_dict(dict(args)))
