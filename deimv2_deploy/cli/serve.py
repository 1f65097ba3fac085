"""deimv2-serve ARTIFACT: a detection (POST /detect), segmentation (EoMT: POST /segment) or embedding (DINOv3:
POST /embed) service on Ray Serve, with GET /health and GET /metadata."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deimv2_deploy.cli import run_cli

__all__ = ["main", "build_parser", "settings_from_args", "write_config"]

EPILOG = """\
Examples:
  deimv2-serve models/deimv2_s_fp32.onnx --replicas 2 --port 8000
  curl --data-binary @street.jpg http://127.0.0.1:8000/detect
  curl -F image=@street.jpg 'http://127.0.0.1:8000/detect?score=0.5'
  deimv2-serve models/deimv2_s_fp32.onnx --replicas 4 --write-config serve.yaml   # then: serve deploy serve.yaml
  deimv2-serve models/eomt_dinov3_coco_640x640_fp32.onnx      # EoMT: POST /segment
  curl --data-binary @street.jpg 'http://127.0.0.1:8000/segment?task=semantic,panoptic&score=0.5'
  deimv2-serve models/dinov3_vit_..._448x448_fp32.onnx         # DINOv3: POST /embed
  curl --data-binary @street.jpg 'http://127.0.0.1:8000/embed?patches=1'
Needs the serve extra: pip install 'deimv2-deploy[serve]'.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deimv2-serve",
        description="Serve an exported DEIMv2 detector, EoMT-DINOv3 segmenter or DINOv3 feature extractor over "
                    "HTTP with Ray Serve: replicas, each with its own runtime, and requests from many clients "
                    "batched together.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", help="exported model (.onnx, .xml, .engine) from deimv2-export (detector, eomt or "
                                    "dinov3)")
    p.add_argument("--replicas", type=int, default=1, help="replicas, each one runtime (default 1)")
    p.add_argument("--max-batch", type=int, default=8, help="requests batched into one inference, at most")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a replica waits for a batch to fill (default 5 ms)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--score", type=float, default=0.4,
                   help="default score threshold of detections and EoMT instances (a request may pass ?score=)")
    p.add_argument("--backend", help="runtime backend (default: the one the file type implies)")
    p.add_argument("--device", default="cpu", help="runtime device (cpu, cuda, ...)")
    p.add_argument("--variant", help="model size, only for an ONNX from the official exporter (no metadata)")
    p.add_argument("--cpus-per-replica", type=float,
                   help="Ray CPUs of each replica (default: the machine's cores shared equally)")
    p.add_argument("--threads", type=int, help="inference threads per replica (default: its whole CPUs, >= 1)")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest request body accepted (default 20)")
    p.add_argument("--max-pixels", type=int, default=50_000_000,
                   help="largest image accepted, width x height (default 50 million)")
    p.add_argument("--object-store-mb", type=int, default=256, help="Ray object store of the local instance")
    p.add_argument("--write-config", metavar="FILE",
                   help="write a Ray Serve config for `serve deploy FILE` on an existing cluster, and exit")
    p.add_argument("--verbose", action="store_true", help="Ray's and Serve's logs on the terminal")
    return p


def settings_from_args(args: argparse.Namespace):
    from deimv2_deploy.serving.settings import ServeSettings

    return ServeSettings(artifact=args.artifact, backend=args.backend, device=args.device, variant=args.variant,
                         score=args.score, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                         replicas=args.replicas, cpus_per_replica=args.cpus_per_replica, threads=args.threads,
                         max_image_mb=args.max_image_mb, max_pixels=args.max_pixels)


def write_config(path: str | Path, settings, host: str, port: int) -> Path:
    """The Serve config as YAML, written atomically."""
    try:
        import yaml
    except ImportError as e:
        raise RuntimeError("--write-config needs PyYAML (part of the serve extra): "
                           "pip install 'deimv2-deploy[serve]'") from e
    from deimv2_deploy.media import atomic_path
    from deimv2_deploy.serving.settings import serve_config

    text = ("# Ray Serve config written by deimv2-serve: `serve deploy` this file on a running Ray cluster.\n"
            "# The artifact path must exist on every node that runs a replica.\n"
            + yaml.safe_dump(serve_config(settings, host, port), sort_keys=False))
    out = Path(path)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be 1..65535, got {args.port}")

    def body() -> int:
        settings = settings_from_args(args)
        if not Path(settings.artifact).exists():
            raise FileNotFoundError(f"artifact not found: {settings.artifact} (export one with deimv2-export)")
        if args.write_config:
            out = write_config(args.write_config, settings, args.host, args.port)
            print(f"wrote {out}: deploy it with `serve deploy {out}` on a running Ray cluster")
            return 0
        try:  # Ray, and the web stack that ray[serve] brings; imported now only to give the install hint
            import ray  # noqa: F401
            import starlette  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"deimv2-serve needs Ray Serve ({e.name} is missing): "
                               "pip install 'deimv2-deploy[serve]'") from e
        from deimv2_deploy.serving.server import run_server

        return run_server(settings, host=args.host, port=args.port, verbose=args.verbose,
                          object_store_mb=args.object_store_mb)

    return run_cli(body, "deimv2-serve")


if __name__ == "__main__":
    sys.exit(main())
