"""deimv2-train SIZE: train or fine-tune DEIMv2 on a COCO-format dataset with the official DEIM recipe."""
from __future__ import annotations

import argparse
import json
import sys

from deimv2_deploy.cli import run_cli
from deimv2_deploy.variants import VARIANT_NAMES

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deimv2-train",
        description="Train or fine-tune a DEIMv2 detector on a COCO-format dataset (the official DEIM recipe: "
                    "dense O2O matching, MAL, FGL/DDF, denoising, EMA, flat-cosine schedule). Writes best.pth and "
                    "last.pth in the official checkpoint format (deimv2-export takes them), log.jsonl and "
                    "curves.png.",
        epilog="Examples:\n"
               "  deimv2-data synth --output data/synth --train 4000 --val 500 --seed 1\n"
               "  deimv2-train atto --images data/synth/train \\\n"
               "      --annotations data/synth/annotations/instances_train.json \\\n"
               "      --val-images data/synth/val --val-annotations data/synth/annotations/instances_val.json \\\n"
               "      --epochs 60 --output-dir runs/atto\n"
               "  deimv2-train s --checkpoint deimv2_dinov3_s_coco.pth --images ... --annotations ...   # fine-tune\n"
               "  deimv2-train atto --resume runs/atto/last.pth\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("size", nargs="?", choices=VARIANT_NAMES, help="model size (not needed with --resume)")
    p.add_argument("--images", help="folder of training images")
    p.add_argument("--annotations", help="COCO instances JSON of the training images")
    p.add_argument("--val-images", help="folder of validation images (validation mAP every --val-every epochs)")
    p.add_argument("--val-annotations", help="COCO instances JSON of the validation images")
    p.add_argument("--checkpoint", help="pretrained weights to fine-tune from (official .pth, deimv2-train "
                                        "checkpoint, .safetensors or Hugging Face folder); class heads are "
                                        "re-initialised when the number of classes differs")
    p.add_argument("--epochs", type=int, help="epochs (default: the official recipe of the size); the schedule's "
                                              "epoch-based points scale with it")
    p.add_argument("--batch", type=int, default=16, help="images per iteration (default 16)")
    p.add_argument("--lr", type=float, help="base learning rate (default: the recipe's, scaled to --batch)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--output-dir", help="where checkpoints and logs go (default runs/train; with --resume: the "
                                        "run's own, unless given)")
    p.add_argument("--resume", metavar="LAST_PTH", help="continue a stopped run exactly where it stopped")
    p.add_argument("--workers", type=int, help="data-loading processes (default: one per spare CPU core)")
    p.add_argument("--threads", type=int, help="PyTorch CPU threads (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=5, help="epochs between validations (default 5)")
    p.add_argument("--max-val-images", type=int, help="validate on at most this many images")
    p.add_argument("--no-amp", action="store_true", help="CUDA: train in float32 (default: mixed precision)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    p.add_argument("--release", nargs=2, metavar=("CHECKPOINT", "OUTPUT"),
                   help="write the deployable part of a deimv2-train checkpoint (EMA weights, classes, settings; "
                   "no optimizer state) to OUTPUT, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.release:
        def release() -> int:
            from deimv2_deploy.training.trainer import release_weights

            out = release_weights(*args.release)
            print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): EMA weights and classes of {args.release[0]}")
            return 0

        return run_cli(release, "deimv2-train")
    if args.resume is None:
        missing = [flag for flag, value in (("SIZE", args.size), ("--images", args.images),
                                            ("--annotations", args.annotations)) if value is None]
        if missing:
            parser.error(f"{', '.join(missing)} required (or --resume OUTPUT_DIR/last.pth)")

    def body() -> int:
        from deimv2_deploy.training.trainer import Trainer, TrainingInterrupted, TrainSettings

        settings = TrainSettings(
            size=args.size or "atto", train_images=args.images or "", train_annotations=args.annotations or "",
            output_dir=args.output_dir or ("" if args.resume else "runs/train"),
            val_images=args.val_images, val_annotations=args.val_annotations,
            checkpoint=args.checkpoint, epochs=args.epochs, batch=args.batch, lr=args.lr, device=args.device,
            workers=args.workers, threads=args.threads, seed=args.seed, val_every=args.val_every,
            max_val_images=args.max_val_images, amp=not args.no_amp)
        trainer = Trainer(settings, resume=args.resume)
        try:
            summary = trainer.fit()
        except TrainingInterrupted as stop:
            print(f"deimv2-train: {stop}; continue with: deimv2-train --resume {stop.checkpoint}", file=sys.stderr)
            return 128 + stop.signum  # 130 for Ctrl-C, 143 for SIGTERM
        if args.json:
            json.dump(summary, sys.stdout, indent=2)
            print()
        else:
            best = f"best AP {summary['best_ap']:.4f} (epoch {summary['best_epoch']})" if summary["best_ap"] >= 0 else \
                "no validation set"
            print(f"trained {summary['epochs']} epochs in {summary['seconds'] / 60:.1f} min; {best}\n"
                  f"  best: {summary['best']}\n  last: {summary['last']}\n"
                  f"  export: deimv2-export {trainer.config.name} --checkpoint {summary['best']}")
        return 0

    return run_cli(body, "deimv2-train")


if __name__ == "__main__":
    sys.exit(main())
