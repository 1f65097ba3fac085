"""Running the application on a Ray instance of its own (what `deimv2-serve ARTIFACT` does).

Start: a local Ray (no dashboard, usage statistics off unless the user set RAY_USAGE_STATS_ENABLED, every Ray
service on the loopback address unless the HTTP host asks for more), Serve's HTTP proxy on host:port, the
application deployed and healthy. Stop (Ctrl-C or SIGTERM): requests keep being routed for `STOP_GRACE_S`
(those already sent reach a replica), then Serve is shut down first, which lets every replica
finish the requests it holds (up to `app.DRAIN_TIMEOUT_S`), then Ray and all its processes. To run on an existing
cluster instead, write a config with `deimv2-serve --write-config` and `serve deploy` it.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from deimv2_deploy.serving.settings import APP_NAME, ServeSettings, available_cpus

__all__ = ["run_server", "check_port_free", "check_cpus", "LOOPBACK_HOSTS"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def check_port_free(host: str, port: int) -> None:
    """A clear error now rather than a Serve proxy that retries binding forever."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as e:
            raise RuntimeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or --host") \
                from None


def check_cpus(settings: ServeSettings, cpus: float) -> None:
    """Ray would leave replicas pending forever when they ask for more CPUs than the machine has."""
    need = settings.replicas * settings.replica_cpus
    if need > cpus + 1e-9:
        raise ValueError(f"{settings.replicas} replicas x {settings.replica_cpus:g} CPUs need {need:g} CPUs, but "
                         f"Ray sees {cpus:g} here; lower --cpus-per-replica or --replicas")


def _check_artifact(settings: ServeSettings) -> Any:
    """Load the artifact once here, so a bad file fails now with its own message, not in every replica."""
    from deimv2_deploy.runtimes import load_runtime

    runtime = load_runtime(settings.artifact, backend=settings.backend, device=settings.device,
                           variant=settings.variant, threads=1)
    spec, backend = runtime.spec, getattr(runtime.backend, "value", runtime.backend)  # ViT runtimes: a str
    runtime.close()
    return spec, backend


def run_server(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, verbose: bool = False,
               object_store_mb: int = 256, on_ready: Callable[[str], None] | None = None,
               stop: threading.Event | None = None) -> int:
    """Serve until Ctrl-C/SIGTERM (or `stop` is set); returns the exit status. `on_ready(url)` is called once
    the application answers."""
    spec, backend = _check_artifact(settings)
    check_port_free(host, port)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from a detection service
    import ray
    from ray import serve

    from deimv2_deploy.serving.app import build_application
    from deimv2_deploy.serving.protocol import endpoints, model_kind, model_title

    stop = stop or threading.Event()
    previous: dict[int, Any] = {}
    level = logging.INFO if verbose else logging.WARNING
    node_ip = "127.0.0.1" if host in LOOPBACK_HOSTS else None  # Ray's own services stay on loopback
    started = time.perf_counter()
    try:
        # address="local": a Ray of its own even where RAY_ADDRESS names a cluster (use --write-config for that)
        ray.init(address="local", num_cpus=available_cpus(), include_dashboard=False, logging_level=level,
                 log_to_driver=verbose, _node_ip_address=node_ip, object_store_memory=object_store_mb * 1024 * 1024,
                 namespace="deimv2-serve")
        if threading.current_thread() is threading.main_thread():  # signals reach only the main thread
            # after ray.init, whose own SIGTERM handler would end the process at once
            previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        logging.getLogger("ray.serve").setLevel(level)
        check_cpus(settings, float(ray.cluster_resources().get("CPU", 0)))
        serve.start(http_options={"host": host, "port": port},
                    logging_config={"log_level": "INFO" if verbose else "WARNING"})
        app = build_application(settings)
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        print(f"deimv2-serve: {model_title(spec)} ({backend}, {spec.precision}) on {url}  "
              f"[{settings.replicas} replica(s) x {settings.runtime_threads} thread(s), batches of up to "
              f"{settings.max_batch}, ready in {time.perf_counter() - started:.1f} s]", file=sys.stderr, flush=True)
        print(f"  {endpoints(model_kind(spec))}; Ctrl-C to stop", file=sys.stderr, flush=True)
        if on_ready is not None:
            on_ready(url)
        while not stop.wait(0.5):
            pass
        print("deimv2-serve: stopping (answering requests in flight)", file=sys.stderr, flush=True)
        # requests sent just before the signal may still be on their way to the proxy: keep routing them for a
        # moment (deleting the application at once answers those with 404)
        time.sleep(STOP_GRACE_S)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _shutdown()


STOP_GRACE_S = 1.5  # after Ctrl-C/SIGTERM, before the application is deleted: requests already sent get routed


def _shutdown() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            # deleting the application first lets its replicas answer what they hold while the proxy still
            # carries the answers back (serve.shutdown alone stops the proxy with them, dropping those requests)
            serve.delete(APP_NAME, _blocking=True)
            serve.shutdown()
        finally:
            ray.shutdown()
