"""deimv2-export SIZE: the reference model in deploy mode -> ONNX -> OpenVINO IR | TensorRT engine."""
from __future__ import annotations

import argparse
import json
import sys

from deimv2_deploy.cli import run_cli
from deimv2_deploy.variants import VARIANT_NAMES

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deimv2-export",
        description="Export a DEIMv2 model (deploy mode + postprocessor, official I/O) with its preprocessing "
                    "metadata and a parity report against PyTorch.",
        epilog="Examples:\n  deimv2-export atto --random-weights\n"
               "  deimv2-export s --checkpoint deimv2_dinov3_s_coco.pth\n"
               "  deimv2-export s --format openvino --precision int8 --calibration images/\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("size", choices=[*VARIANT_NAMES, "all"], help="model size, or 'all'")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint",
                     help="official .pth/.safetensors or Hugging Face folder (default: the model store)")
    src.add_argument("--random-weights", action="store_true",
                     help="deterministic untrained weights, for plumbing and benchmarks (recorded in the metadata)")
    p.add_argument("--format", choices=["onnx", "openvino", "tensorrt", "triton"], default="onnx",
                   help="triton: a Triton model repository entry (see --triton-backend)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "auto"], default="fp32",
                   help="OpenVINO/TensorRT precision (ONNX: use --fp16); auto (ONNX/OpenVINO): int8 when "
                        "--calibration is given, else fp32, whose arithmetic (bf16 on CPUs that run it natively) "
                        "the runtime chooses at load time with --precision auto")
    p.add_argument("--output-dir", help="model store to write to (default: $DEIMV2_MODELS or ./models)")
    p.add_argument("--opset", type=int, default=17)
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, help="fix the batch size (default: dynamic)")
    batch.add_argument("--dynamic-batch", nargs="?", const="dynamic", metavar="MIN:OPT:MAX",
                       help="dynamic batch (the default); for TensorRT the profile range, e.g. 1:1:8")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    p.add_argument("--fp16", action="store_true", help="ONNX with FP16 weights (I/O stays float32/int64)")
    p.add_argument("--calibration", help="folder of images for INT8 calibration (OpenVINO, TensorRT)")
    p.add_argument("--calibration-size", type=int, default=300, help="images used for INT8 calibration")
    p.add_argument("--workspace", type=float, default=4.0, help="TensorRT builder workspace, GB")
    p.add_argument("--timing-cache", help="TensorRT timing cache file (read and updated)")
    p.add_argument("--fp32-attention", action="store_true", help="TensorRT FP16: keep ViT attention in FP32")
    p.add_argument("--force", action="store_true", help="TensorRT: build FP16 even on TensorRT < 10.6")
    p.add_argument("--device", default="cuda", help="TensorRT: the GPU to build on (cuda or cuda:N)")
    p.add_argument("--no-parity", action="store_true",
                   help="TensorRT: skip the engine-vs-ONNX Runtime parity check after the build")
    from deimv2_deploy.exporters.openvino_export import SOURCES

    p.add_argument("--openvino-source", choices=SOURCES, default="auto",
                   help="OpenVINO: convert from our ONNX (onnx) or the PyTorch module (torch); auto: the store's ONNX "
                        "of the same weights if there is one, else the PyTorch module")
    p.add_argument("--onnx", dest="onnx_path", metavar="FILE",
                   help="OpenVINO/TensorRT: start from this ONNX file (made by deimv2-export, or the official "
                        "exporter) instead of exporting the model again")
    _add_triton_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result (path, spec, parity) as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _add_triton_arguments(parser: argparse.ArgumentParser) -> None:
    """deimv2-export's Triton options (--format triton)."""
    from deimv2_deploy.exporters.triton_export import (
        BACKENDS,
        DEFAULT_MAX_BATCH,
        DEFAULT_QUEUE_DELAY_US,
        KINDS,
    )

    group = parser.add_argument_group("Triton model repository (--format triton)")
    group.add_argument("--triton-backend", choices=BACKENDS, default="onnxruntime",
                       help="Triton backend: onnxruntime (model.onnx), openvino (model.xml/.bin), "
                            "tensorrt (model.plan)")
    group.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                       help=f"Triton max_batch_size (dynamic batching up to it; 0: off; default {DEFAULT_MAX_BATCH})")
    group.add_argument("--triton-model", metavar="FILE",
                       help="put this exported model in the repository as it is (.onnx, .xml, or a TensorRT "
                            ".engine/.plan with its .json sidecar) instead of exporting one")
    group.add_argument("--triton-repository", metavar="DIR", help="model repository (default: <store>/triton)")
    group.add_argument("--triton-name", help="model name (default: the artifact's name and the backend)")
    group.add_argument("--triton-instances", type=int, default=1, help="model instances (instance_group count)")
    group.add_argument("--triton-kind", choices=sorted(KINDS),
                       help="instance kind (default: cpu for onnxruntime/openvino, gpu for tensorrt)")
    group.add_argument("--triton-threads", type=int,
                       help="inference threads per instance (ONNX Runtime intra-op / OpenVINO threads)")
    group.add_argument("--triton-queue-delay-us", type=int, default=DEFAULT_QUEUE_DELAY_US,
                       help=f"longest wait for a batch to fill, microseconds (default {DEFAULT_QUEUE_DELAY_US})")


def auto_export_precision(fmt: str, calibration: str | None) -> tuple[str, str]:
    """(precision, why) that `--precision auto` exports: bf16 is not a file format but an arithmetic OpenVINO
    chooses at load time, so a CPU artifact is FP32, or INT8 when calibration images were given."""
    if fmt not in ("onnx", "openvino"):
        raise ValueError(f"--precision auto is for CPU artifacts (--format onnx or openvino), not {fmt}: choose "
                         "fp32, fp16 or int8")
    if calibration is not None:
        if fmt == "onnx":
            raise ValueError("--calibration with --precision auto makes an INT8 OpenVINO IR: add --format openvino")
        return "int8", "calibration images given: INT8 (fast on CPUs with VNNI or AMX)"
    return "fp32", ("FP32 artifact; load it with --precision auto (deimv2-infer, deimv2-bench, load_runtime) to run "
                    "bf16 where the CPU has it natively")


def _export_one(args: argparse.Namespace, size: str):
    common = dict(checkpoint=args.checkpoint, random_weights=args.random_weights, output_dir=args.output_dir)
    if args.format == "onnx":
        from deimv2_deploy.exporters.onnx_export import export_onnx

        if args.precision != "fp32" and not args.fp16:
            raise ValueError("for ONNX use --fp16 (INT8 is available for --format openvino / tensorrt)")
        if args.calibration is not None:
            raise ValueError("--calibration is for INT8 exports: add --format openvino (or tensorrt) --precision int8")
        if args.onnx_path is not None:
            raise ValueError("--onnx starts an OpenVINO or TensorRT export from an ONNX file: add --format openvino "
                             "or --format tensorrt")
        return export_onnx(size, opset=args.opset, batch=args.batch, simplify=not args.no_simplify,
                           fp16=args.fp16, quiet=args.quiet, **common)
    if args.format == "openvino":
        from deimv2_deploy.exporters.openvino_export import export_openvino

        return export_openvino(size, precision=args.precision, calibration=args.calibration,
                               calibration_size=args.calibration_size, source=args.openvino_source,
                               onnx_path=args.onnx_path, quiet=args.quiet, **common)
    if args.format == "triton":
        return _export_triton(args, size)
    from deimv2_deploy.exporters.tensorrt_export import export_tensorrt, parse_dynamic_batch

    dynamic = None
    if args.dynamic_batch not in (None, "dynamic"):
        dynamic = parse_dynamic_batch(args.dynamic_batch)
    return export_tensorrt(size, precision=args.precision, calibration=args.calibration,
                           calibration_size=args.calibration_size, batch=args.batch, dynamic_batch=dynamic,
                           workspace_gb=args.workspace, timing_cache=args.timing_cache,
                           fp32_attention=args.fp32_attention, force=args.force, onnx_path=args.onnx_path,
                           device=args.device, check_parity=not args.no_parity, quiet=args.quiet, **common)


def _export_triton(args: argparse.Namespace, size: str):
    from deimv2_deploy.exporters.triton_export import export_triton

    backend, model_path = args.triton_backend, args.triton_model
    if backend == "onnxruntime":  # the ONNX file is the model itself
        model_path = model_path or args.onnx_path
        options = dict(opset=args.opset, batch=args.batch, simplify=not args.no_simplify)
        precision = "fp16" if args.fp16 else args.precision
    elif backend == "openvino":
        options = dict(calibration=args.calibration, calibration_size=args.calibration_size,
                       source=args.openvino_source, onnx_path=args.onnx_path)
        precision = args.precision
    else:
        options = dict(calibration=args.calibration, calibration_size=args.calibration_size, batch=args.batch,
                       workspace_gb=args.workspace, timing_cache=args.timing_cache, fp32_attention=args.fp32_attention,
                       force=args.force, onnx_path=args.onnx_path, device=args.device, check_parity=not args.no_parity)
        if args.dynamic_batch not in (None, "dynamic"):
            options["dynamic_batch"] = args.dynamic_batch
        precision = args.precision
    return export_triton(size, backend, model_path=model_path, repository=args.triton_repository,
                         name=args.triton_name, max_batch=args.max_batch, instances=args.triton_instances,
                         kind=args.triton_kind, threads=args.triton_threads, queue_delay_us=args.triton_queue_delay_us,
                         checkpoint=args.checkpoint, random_weights=args.random_weights, precision=precision,
                         exporter_options=options, output_dir=args.output_dir, quiet=args.quiet)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch is not None and args.batch < 1:
        build_parser().error(f"--batch must be at least 1, got {args.batch}")
    if args.dynamic_batch not in (None, "dynamic") and args.format != "tensorrt" and not (
            args.format == "triton" and args.triton_backend == "tensorrt"):
        build_parser().error("--dynamic-batch MIN:OPT:MAX is for --format tensorrt; "
                             "ONNX and OpenVINO artifacts are dynamic by default")

    def body() -> int:
        if args.precision == "auto":
            args.precision, why = auto_export_precision(args.format, args.calibration)
            print(f"--precision auto -> {args.precision}: {why}", file=sys.stderr)
        sizes = list(VARIANT_NAMES) if args.size == "all" else [args.size]
        results = []
        for size in sizes:
            result = _export_one(args, size)
            results.append(result)
            if not args.json:
                print(f"wrote {result.path}\n  {result.spec.describe()}  ({result.seconds:.1f} s)")
                if args.format == "triton":
                    print(f"  serve it: tritonserver --model-repository {result.path.parent.resolve()}")
                if result.spec.random_weights:
                    print("  NOTE: random weights: detections are meaningless; use an official checkpoint for real use")
        if args.json:
            json.dump([{"path": str(r.path), "spec": r.spec.to_dict(), "parity": r.parity, "seconds": r.seconds}
                       for r in results], sys.stdout, indent=2)
            print()
        return 0

    return run_cli(body, "deimv2-export")


if __name__ == "__main__":
    sys.exit(main())
