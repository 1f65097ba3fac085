"""ServeSettings: everything one deimv2-serve application is built from, and its Ray Serve config file.

The same settings travel three ways: from the command line (`deimv2-serve`), as the `args` of a Serve config
file (`serve deploy serve.yaml` calls `deimv2_deploy.serving.app:build_app(args)`), and to each replica's
constructor. So they are plain JSON values, validated once here. No Ray import: the config file is a dict.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

__all__ = ["ServeSettings", "serve_config", "APP_NAME", "DEPLOYMENT_NAME", "IMPORT_PATH", "default_cpus_per_replica",
           "available_cpus"]

APP_NAME = "deimv2"
DEPLOYMENT_NAME = "DEIMv2Detector"
IMPORT_PATH = "deimv2_deploy.serving.app:build_app"


def available_cpus() -> int:
    """The cores this process may run on (the local Ray instance is given as many)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_cpus_per_replica(replicas: int, cpus: int | None = None) -> float:
    """An equal share of this machine's cores per replica: whole cores where there are enough, else a fraction
    (Ray then packs several replicas on one core)."""
    share = (available_cpus() if cpus is None else cpus) / replicas
    return float(math.floor(share)) if share >= 1 else round(share, 3)


@dataclass(frozen=True)
class ServeSettings:
    artifact: str  # absolute path of the exported model (every replica loads it; on a cluster, on every node)
    backend: str | None = None  # None: the backend the file type implies (see runtimes.load_runtime)
    device: str = "cpu"
    variant: str | None = None  # only for an artifact without deimv2-deploy metadata (official exporter)
    score: float = 0.4  # default score threshold (detections; EoMT instances); a request may pass ?score=
    max_batch: int = 8  # requests batched into one graph call, at most
    batch_wait_ms: float = 5.0  # how long a replica waits for a batch to fill
    replicas: int = 1
    cpus_per_replica: float | None = None  # Ray CPU resources of each replica; None: an equal share of the cores
    threads: int | None = None  # the runtime's inference threads; None: the replica's whole cores (at least 1)
    max_image_mb: float = 20.0  # request body limit
    max_pixels: int = 50_000_000  # decoded image limit (width x height), checked from the header before decoding

    def __post_init__(self) -> None:
        if not self.artifact:
            raise ValueError("artifact must name an exported model file (.onnx, .xml, .engine; EoMT and DINOv3: "
                             ".onnx, .xml)")
        object.__setattr__(self, "artifact", os.path.abspath(os.path.expanduser(str(self.artifact))))
        if not 0.0 <= float(self.score) <= 1.0:
            raise ValueError(f"score must lie in [0, 1], got {self.score}")
        if int(self.max_batch) < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if float(self.batch_wait_ms) < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")
        if int(self.replicas) < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.cpus_per_replica is not None and float(self.cpus_per_replica) <= 0:
            raise ValueError(f"cpus_per_replica must be positive, got {self.cpus_per_replica}")
        if self.threads is not None and int(self.threads) < 1:
            raise ValueError(f"threads must be at least 1 (or unset), got {self.threads}")
        if float(self.max_image_mb) <= 0:
            raise ValueError(f"max_image_mb must be positive, got {self.max_image_mb}")
        if int(self.max_pixels) < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        for name, kind in (("score", float), ("max_batch", int), ("batch_wait_ms", float), ("replicas", int),
                           ("max_image_mb", float), ("max_pixels", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))

    # --- derived ----------------------------------------------------------------------------------------
    @property
    def replica_cpus(self) -> float:
        if self.cpus_per_replica is not None:
            return float(self.cpus_per_replica)
        return default_cpus_per_replica(self.replicas)

    @property
    def runtime_threads(self) -> int:
        """Inference threads of each replica's runtime: its CPU share, whole cores, at least one."""
        return int(self.threads) if self.threads is not None else max(1, int(self.replica_cpus))

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)

    @property
    def max_ongoing_requests(self) -> int:
        """Requests a replica holds at once (running, and waiting for a batch); more wait in Serve's proxy.
        Generous on purpose: a stopping replica answers everything it holds, while requests still waiting in
        the proxy when the application is deleted are dropped."""
        return max(64, 4 * self.max_batch)

    # --- serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved(self) -> ServeSettings:
        """These settings with the CPU share fixed here, so every replica (on any node) uses the same one."""
        return replace(self, cpus_per_replica=self.replica_cpus)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServeSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown deimv2-serve settings {unknown}; known: {sorted(known)}")
        if "artifact" not in d:
            raise ValueError("the settings need 'artifact': the path of the exported model")
        return cls(**d)


def serve_config(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
                 route_prefix: str = "/") -> dict[str, Any]:
    """A Ray Serve config (the file `serve deploy` takes) running this application with these settings."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": int(port)},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": route_prefix,
            "import_path": IMPORT_PATH,
            "args": settings.resolved().to_dict(),
        }],
    }
