"""deimv2-data: the synthetic COCO-format dataset (synth), and a check of any COCO-format dataset (check)."""
from __future__ import annotations

import argparse
import os
import sys
import time

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deimv2-data", description="COCO-format detection datasets: generate a synthetic one, or check one.",
        epilog="Examples:\n  deimv2-data synth --output data/shapes --train 20000 --val 500 --seed 0\n"
               "  deimv2-data synth --output data/shapes_val --train 0 --val 1000 --seed 1\n"
               "  deimv2-data synth --output data/shapes_val --panoptic-only   # panoptic files for an existing one\n"
               "  deimv2-data check data/shapes --split val\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="generate the synthetic shapes dataset (COCO layout)",
                       description="Write DIR/annotations/instances_<split>.json and DIR/<split>/*.jpg: 8 shape "
                                   "classes on textured backgrounds with clutter, exact boxes; the same seed gives "
                                   "byte-identical files. Also the panoptic ground truth in the COCO panoptic layout "
                                   "(DIR/annotations/panoptic_<split>.json and panoptic_<split>/*.png: the 8 shapes "
                                   "as things, 'background' as stuff) unless --no-panoptic.")
    s.add_argument("--output", required=True, help="dataset folder")
    s.add_argument("--train", type=int, default=0, metavar="N", help="training images (default 0: no train split)")
    s.add_argument("--val", type=int, default=0, metavar="M", help="validation images (default 0)")
    s.add_argument("--image-size", type=int, default=320, metavar="S", help="square image side in pixels (default 320)")
    s.add_argument("--seed", type=int, default=0, help="seed (default 0); evaluate on a seed training never saw")
    s.add_argument("--workers", type=int, default=None,
                   help="processes rendering images (default: the CPU count, at most 8); the output does not "
                        "depend on it")
    s.add_argument("--overwrite", action="store_true", help="replace splits that already exist in --output")
    s.add_argument("--no-panoptic", action="store_true", help="write images and instances files only")
    s.add_argument("--panoptic-only", action="store_true",
                   help="add the panoptic files to the synthetic dataset already in --output (seed, split and size "
                        "from its instances files; images and instances files untouched)")
    s.add_argument("--split", action="append", choices=("train", "val"),
                   help="with --panoptic-only: the split to do (repeatable; default: every split in --output)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("check", help="read and check a COCO-format dataset, and say what training would change",
                       description="Reads the annotation file, checks every listed image exists, and prints what "
                                   "training would clip or skip.")
    c.add_argument("dataset", nargs="?", help="dataset folder in a standard layout (or use --images/--annotations)")
    c.add_argument("--split", default="val", help="split to look for in a dataset folder (default val)")
    c.add_argument("--images", help="image folder")
    c.add_argument("--annotations", help="COCO instances JSON")
    return p


def _workers(args: argparse.Namespace) -> int:
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    return workers


def _panoptic_only(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from deimv2_deploy.data.synth import add_panoptic

    given = [flag for flag, on in (("--train", args.train), ("--val", args.val), ("--no-panoptic", args.no_panoptic),
                                   ("--image-size", args.image_size != 320), ("--seed", args.seed != 0)) if on]
    if given:
        raise ValueError(f"--panoptic-only takes the images, seed and size from the dataset in --output: leave out "
                         f"{', '.join(given)} (choose splits with --split)")
    workers = _workers(args)
    bars: list = []

    def start(split: str, images: int) -> None:
        if bars:
            bars.pop().close()
        bars.append(tqdm(total=images, desc=f"panoptic {split}", unit="img", disable=args.quiet, file=sys.stderr,
                         dynamic_ncols=True))

    t0 = time.perf_counter()
    try:
        written = add_panoptic(args.output, args.split, workers=workers, overwrite=args.overwrite,
                               progress=lambda n: bars[-1].update(n), on_split=start)
    finally:
        for bar in bars:
            bar.close()
    import json

    for split, path in written.items():
        data = json.loads(path.read_text())
        segments = sum(len(a["segments_info"]) for a in data["annotations"])
        print(f"{split}: {len(data['images'])} panoptic PNGs, {segments} segments -> {path.with_suffix('')}/, {path}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from deimv2_deploy.data.synth import write_dataset

    if args.panoptic_only:
        return _panoptic_only(args)
    if args.split:
        raise ValueError("--split chooses the splits of --panoptic-only; to generate splits give --train N / --val M")
    if args.train < 0 or args.val < 0:
        raise ValueError(f"--train and --val must be >= 0, got {args.train} and {args.val}")
    if args.train == 0 and args.val == 0:
        raise ValueError("nothing to generate: give --train N and/or --val M (numbers of images)")
    if args.image_size < 64:
        raise ValueError(f"--image-size must be >= 64, got {args.image_size}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    workers = _workers(args)
    total = args.train + args.val
    t0 = time.perf_counter()
    with tqdm(total=total, desc="generating", unit="img", disable=args.quiet, file=sys.stderr,
              dynamic_ncols=True) as bar:
        written = write_dataset(args.output, {"train": args.train, "val": args.val}, image_size=args.image_size,
                                seed=args.seed, workers=workers, overwrite=args.overwrite, progress=bar.update,
                                panoptic=not args.no_panoptic)
    seconds = time.perf_counter() - t0
    import json

    for split, ann in written.items():
        data = json.loads(ann.read_text())
        panoptic = "" if args.no_panoptic else f" (+ {ann.parent / f'panoptic_{split}.json'} and PNGs)"
        print(f"{split}: {len(data['images'])} images, {len(data['annotations'])} objects -> "
              f"{ann.parent.parent / split}/, {ann}{panoptic}")
    print(f"generated {total} images in {seconds:.1f} s ({total / max(seconds, 1e-9):.0f} images/s, "
          f"{workers} worker{'s' if workers > 1 else ''})")
    return 0


def _check(args: argparse.Namespace) -> int:
    from deimv2_deploy.data.coco import load_coco, resolve_dataset, sanitize_for_training

    paths = resolve_dataset(args.dataset, images=args.images, annotations=args.annotations, split=args.split)
    dataset = load_coco(paths.images_dir, paths.annotation_file)
    names = ", ".join(f"{c.id}:{c.name}" for c in dataset.categories[:12])
    more = f", ... ({len(dataset.categories)} in all)" if len(dataset.categories) > 12 else ""
    print(f"{paths.annotation_file}: {len(dataset)} images in {paths.images_dir}, {dataset.num_objects} objects, "
          f"{len(dataset.categories)} categories ({names}{more})")
    print(f"for training: {sanitize_for_training(dataset).report.summary()}")  # type: ignore[union-attr]
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _synth(args) if args.command == "synth" else _check(args)
    except KeyboardInterrupt:
        print("deimv2-data: interrupted (nothing half-written was left under a final name)", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:  # DatasetError is a ValueError
        print(f"deimv2-data: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
