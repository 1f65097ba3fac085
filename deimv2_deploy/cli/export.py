"""deimv2-export SIZE: the reference model in deploy mode -> ONNX -> OpenVINO IR | TensorRT engine.

deimv2-export dinov3|eomt --checkpoint FOLDER: a transformers DINOv3 ViT / EoMT-DINOv3 folder -> ONNX | OpenVINO IR."""
from __future__ import annotations

import argparse
import json
import sys

from deimv2_deploy.cli import run_cli
from deimv2_deploy.variants import VARIANT_NAMES

VIT_FAMILY_NAMES = ("dinov3", "eomt")  # models.hf_vit.VIT_FAMILIES (kept here: the parser imports no torch)

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deimv2-export",
        description="Export a DEIMv2 model (deploy mode + postprocessor, official I/O) with its preprocessing "
                    "metadata and a parity report against PyTorch.",
        epilog="Examples:\n  deimv2-export atto --random-weights\n"
               "  deimv2-export s --checkpoint deimv2_dinov3_s_coco.pth\n"
               "  deimv2-export s --checkpoint DEIMv2_S_transformers/   (a transformers folder)\n"
               "  deimv2-export s --format hf --checkpoint deimv2_dinov3_s_coco.pth --output-dir DEIMv2_S_hf\n"
               "  deimv2-export s --format onnx --precision fp16\n"
               "  deimv2-export s --format onnx --precision int8 --calibration coco/  (Q/DQ, for TensorRT)\n"
               "  deimv2-export s --format openvino --precision int8 --calibration images/\n"
               "  deimv2-export atto --checkpoint finetuned.pth --class-names cat,dog,bird --category-ids 1,5,9\n"
               "  deimv2-export eomt --checkpoint coco_panoptic_eomt_large_640_dinov3/\n"
               "  deimv2-export dinov3 --checkpoint dinov3-vits16-pretrain-lvd1689m/ --input-size 448\n"
               "  deimv2-export eomt --checkpoint FOLDER --precision fp16 --format openvino\n"
               "  deimv2-export dinov3 --checkpoint FOLDER --precision int8 --calibration images/\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("size", choices=[*VARIANT_NAMES, "all", *VIT_FAMILY_NAMES], metavar="SIZE|FAMILY",
                   help=f"DEIMv2 size ({', '.join(VARIANT_NAMES)}) or 'all'; or a model family exported from a "
                        "transformers folder given by --checkpoint: dinov3 (DINOv3ViTModel features) or eomt "
                        "(EomtDinov3ForUniversalSegmentation); their sizes come from the folder's config")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint",
                     help="official .pth/.safetensors, Hugging Face folder, or transformers folder "
                          "(default: the model store)")
    src.add_argument("--random-weights", action="store_true",
                     help="deterministic untrained weights, for plumbing and benchmarks (recorded in the metadata)")
    p.add_argument("--format", choices=["onnx", "openvino", "tensorrt", "triton", "hf"], default="onnx",
                   help="triton: a Triton model repository entry (see --triton-backend); hf: a transformers DEIMv2 "
                        "folder (config.json + model.safetensors + preprocessor_config.json), --output-dir then "
                        "being the folder itself (with 'all': DIR/deimv2_<size>_hf)")
    p.add_argument("--graph", choices=["auto", "official", "transformers"], default="auto",
                   help="for a transformers checkpoint: the official DEIMv2 graph, or transformers' own (ONNX only); "
                        "auto: transformers' only when the folder was fine-tuned inside transformers "
                        "(docs/transformers.md)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8", "auto", "bf16"],
                   help="ONNX: fp16 (FP16 compute, sensitive blocks FP32) or int8 (explicit symmetric Q/DQ, what "
                        "TensorRT 11 builds from); OpenVINO/TensorRT: the artifact's precision (TensorRT: that of "
                        "the ONNX it is built from). Default fp32, or that of the --onnx file for TensorRT. auto "
                        "(ONNX/OpenVINO): int8 when --calibration is given, else fp32, whose arithmetic (bf16 on "
                        "CPUs that run it natively) the runtime chooses at load time with --precision auto. bf16 is "
                        "that load-time arithmetic, not a file precision (an error naming what to do). dinov3/eomt: "
                        "fp32, fp16, int8 or auto on ONNX and OpenVINO")
    p.add_argument("--output-dir", help="model store to write to (default: $DEIMV2_MODELS or ./models)")
    p.add_argument("--opset", type=int, default=17)
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--batch", type=int, help="fix the batch size (default: dynamic)")
    batch.add_argument("--dynamic-batch", nargs="?", const="dynamic", metavar="MIN:OPT:MAX",
                       help="dynamic batch (the default); for TensorRT the profile range, e.g. 1:1:8")
    p.add_argument("--input-size", type=_input_size, metavar="H[xW]",
                   help="dinov3: the fixed image size of the graph (default: the config's image_size); "
                        "EoMT's is fixed by its config")
    p.add_argument("--stuff-classes", metavar="LABELS",
                   help="eomt: the classes panoptic segmentation treats as stuff (one segment per class), as labels "
                        "and ranges (COCO panoptic: 80-132) or class names, comma-separated; 'none': every class is a "
                        "thing. Recorded in the artifact; transformers' config does not hold it, so without this "
                        "option the artifact's panoptic task needs stuff_classes at run time")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxsim")
    p.add_argument("--fp16", action="store_true", help="the same as --precision fp16 (ONNX)")
    p.add_argument("--calibration", help="INT8 calibration images (OpenVINO, TensorRT, ONNX Q/DQ): a folder of "
                                         "images, or a COCO-format dataset (its folder, or its annotation .json)")
    p.add_argument("--calibration-method", choices=["minmax", "percentile", "entropy"], default="minmax",
                   help="ONNX INT8: how activation ranges are taken from the calibration images")
    p.add_argument("--calibration-size", "--calibration-count", type=int, default=300,
                   help="images used for INT8 calibration")
    p.add_argument("--workspace", type=float, default=4.0, help="TensorRT builder workspace, GB")
    p.add_argument("--timing-cache", help="TensorRT timing cache file (read and updated)")
    p.add_argument("--fp32-attention", action="store_true",
                   help="TensorRT FP16/INT8: keep the ViT attention in FP32 in the ONNX the engine is built from")
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
    p.add_argument("--class-names", metavar="FILE|a,b,c",
                   help="the model's class names, in label order: a,b,c, or a file (one per line, a JSON list, or a "
                        "COCO annotation file: its categories by id give names and ids). Default: those the "
                        "checkpoint carries (deimv2-train, config.json id2label), COCO's for 80 classes, else class_N")
    p.add_argument("--category-ids", metavar="FILE|1,5,9",
                   help="the dataset category id of each class, in label order (what deimv2-val maps labels to)")
    _add_triton_arguments(p)
    p.add_argument("--json", action="store_true", help="print the result (path, spec, parity) as JSON on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _classes(args: argparse.Namespace) -> dict:
    """class_names/category_ids for the exporters from --class-names/--category-ids (None: the checkpoint's)."""
    from deimv2_deploy.classes import read_category_ids, read_class_names

    names, ids = read_class_names(args.class_names) if args.class_names else (None, None)
    if args.category_ids:
        ids = read_category_ids(args.category_ids)
    return {"class_names": names, "category_ids": ids}


def _input_size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H or HxW (e.g. 448 or 448x640), got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected H or HxW (e.g. 448 or 448x640), got {text!r}")
    return (values[0], values[-1])


def _export_vit(args: argparse.Namespace):
    """dinov3 / eomt: ONNX or OpenVINO IR (FP32, FP16 or INT8) from a transformers folder."""
    from deimv2_deploy.exporters.vit_export import VIT_FORMATS, check_vit_precision, export_vit

    if args.checkpoint is None:
        raise ValueError(f"{args.size} exports from a transformers folder: add --checkpoint FOLDER "
                         "(config.json + model.safetensors)")
    if args.format not in VIT_FORMATS:
        raise ValueError(f"{args.size} exports to {' or '.join(VIT_FORMATS)} for now, not --format {args.format}")
    if args.fp16 and args.precision not in (None, "fp16"):
        raise ValueError(f"--fp16 contradicts --precision {args.precision}: pass --precision only")
    precision = "fp16" if args.fp16 else args.precision or "fp32"
    if precision == "auto":
        precision, why = auto_export_precision(args.format, args.calibration)
        print(f"--precision auto -> {precision}: {why}", file=sys.stderr)
    check_vit_precision(precision, args.format, args.calibration)  # before the folder is read
    return export_vit(args.size, args.checkpoint, output_dir=args.output_dir, fmt=args.format, opset=args.opset,
                      batch=args.batch, input_size=args.input_size, stuff_classes=args.stuff_classes,
                      precision=precision, calibration=args.calibration, calibration_size=args.calibration_size,
                      calibration_method=args.calibration_method, quiet=args.quiet)


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
    common = dict(checkpoint=args.checkpoint, random_weights=args.random_weights, output_dir=args.output_dir,
                  **_classes(args))
    if args.format == "hf":
        from deimv2_deploy.exporters.hf_folder import export_hf_folder, hf_folder_name

        folder = args.output_dir
        if folder is not None and args.size == "all":
            folder = f"{folder}/{hf_folder_name(size, args.random_weights)}"
        return export_hf_folder(size, checkpoint=args.checkpoint, random_weights=args.random_weights, folder=folder,
                                quiet=args.quiet)
    precision = "fp16" if args.fp16 else args.precision
    if args.format == "onnx":  # both ONNX paths below
        if args.fp16 and args.precision not in (None, "fp16"):
            raise ValueError(f"--fp16 contradicts --precision {args.precision}: pass --precision only")
        precision = precision or "fp32"
        if args.calibration is not None and precision != "int8":
            raise ValueError("--calibration is for INT8 exports: add --precision int8")
        if args.onnx_path is not None:
            raise ValueError("--onnx starts an OpenVINO or TensorRT export from an ONNX file: add --format openvino "
                             "or --format tensorrt")
    if args.format == "onnx" and args.checkpoint and (args.graph != "auto" or _is_transformers(args.checkpoint)):
        from deimv2_deploy.exporters.transformers_graph import export_checkpoint_onnx

        if args.class_names or args.category_ids:
            raise ValueError("--class-names/--category-ids: a transformers folder carries its classes (config.json "
                             "id2label): edit them there")
        if precision == "int8":
            raise ValueError("--precision int8 is not available for a transformers folder yet: export it at fp32, "
                             "or convert it with --format hf's counterpart (a .pth) first")

        return export_checkpoint_onnx(size, args.checkpoint, graph=args.graph, output_dir=args.output_dir,
                                      opset=args.opset, batch=args.batch, simplify=not args.no_simplify,
                                      fp16=precision == "fp16", quiet=args.quiet)
    if args.graph == "transformers":
        raise ValueError("--graph transformers needs --format onnx and --checkpoint (a transformers folder); build "
                         "OpenVINO/TensorRT from that ONNX file")
    if args.format == "onnx":
        from deimv2_deploy.exporters.onnx_export import export_onnx

        return export_onnx(size, opset=args.opset, batch=args.batch, simplify=not args.no_simplify,
                           precision=precision, calibration=args.calibration, calibration_size=args.calibration_size,
                           calibration_method=args.calibration_method, quiet=args.quiet, **common)
    if args.format == "openvino":
        from deimv2_deploy.exporters.openvino_export import export_openvino

        return export_openvino(size, precision=args.precision or "fp32", calibration=args.calibration,
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
        precision = "fp16" if args.fp16 else args.precision or "fp32"
    elif backend == "openvino":
        options = dict(calibration=args.calibration, calibration_size=args.calibration_size,
                       source=args.openvino_source, onnx_path=args.onnx_path)
        precision = args.precision or "fp32"
    else:
        options = dict(calibration=args.calibration, calibration_size=args.calibration_size, batch=args.batch,
                       workspace_gb=args.workspace, timing_cache=args.timing_cache, fp32_attention=args.fp32_attention,
                       force=args.force, onnx_path=args.onnx_path, device=args.device, check_parity=not args.no_parity)
        if args.dynamic_batch not in (None, "dynamic"):
            options["dynamic_batch"] = args.dynamic_batch
        precision = args.precision or "fp32"
    if model_path is None:  # exported now: with the model's classes (a given artifact carries its own)
        options.update({k: v for k, v in _classes(args).items() if v is not None})
    return export_triton(size, backend, model_path=model_path, repository=args.triton_repository,
                         name=args.triton_name, max_batch=args.max_batch, instances=args.triton_instances,
                         kind=args.triton_kind, threads=args.triton_threads, queue_delay_us=args.triton_queue_delay_us,
                         checkpoint=args.checkpoint, random_weights=args.random_weights, precision=precision,
                         exporter_options=options, output_dir=args.output_dir, quiet=args.quiet)


def _is_transformers(checkpoint: str) -> bool:
    from deimv2_deploy.models.checkpoint import checkpoint_format

    return checkpoint_format(checkpoint) == "transformers"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch is not None and args.batch < 1:
        build_parser().error(f"--batch must be at least 1, got {args.batch}")
    if args.dynamic_batch not in (None, "dynamic") and args.format != "tensorrt" and not (
            args.format == "triton" and args.triton_backend == "tensorrt"):
        build_parser().error("--dynamic-batch MIN:OPT:MAX is for --format tensorrt; "
                             "ONNX and OpenVINO artifacts are dynamic by default")

    if args.size in VIT_FAMILY_NAMES and args.random_weights:
        build_parser().error(f"{args.size} has no --random-weights: give --checkpoint FOLDER")
    if args.size not in VIT_FAMILY_NAMES and args.input_size is not None:
        build_parser().error("--input-size is for dinov3 (DEIMv2 sizes have fixed input sizes)")
    if args.size != "eomt" and args.stuff_classes is not None:
        build_parser().error("--stuff-classes is for eomt (panoptic segmentation)")

    def body() -> int:
        if args.size in VIT_FAMILY_NAMES:
            result = _export_vit(args)
            if args.json:
                json.dump([{"path": str(result.path), "spec": result.spec.to_dict(), "parity": result.parity,
                            "seconds": result.seconds}], sys.stdout, indent=2)
                print()
            else:
                print(f"wrote {result.path}\n  {result.spec.describe()}  ({result.seconds:.1f} s)")
            return 0
        if args.precision == "bf16":
            from deimv2_deploy.precision import bf16_export_error

            raise ValueError(bf16_export_error(args.format))
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
