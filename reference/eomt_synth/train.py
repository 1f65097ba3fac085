"""Train a tiny EoMT-DINOv3 from scratch on the synthetic shapes, so segmentation accuracy (mIoU, PQ) of its
exports means something. This is the command that made reference/eomt_synth/model (see make.sh beside it).

The model is transformers' `EomtDinov3ForUniversalSegmentation` with its own training loss (Hungarian matching of
queries to segments, cross-entropy on classes with a 0.1 no-object weight, sigmoid BCE + dice on sampled mask
points, on every masked block's prediction as well as the last one). The recipe follows the EoMT paper at toy
scale: AdamW, linear warm-up then polynomial decay, and "mask annealing": each masked block starts with masked
attention on (probability 1) and is weaned off it in turn, so the released model runs with plain attention
(probability 0 in every block, which is what `deimv2-export eomt` exports without masks).

Data: panoptic targets straight from the generator (`deimv2_deploy.data.synth.render_scene`): one segment per
visible shape (8 thing classes) and one "background" stuff segment (every pixel no shape owns, clutter included).
Training image i of the stream is (seed, "train", i): training sees steps x batch distinct images, and the
evaluation split (`deimv2-data synth --seed 7`) is never seen. A random horizontal flip is the only augmentation.

Resumable: `--output DIR` holds `last.pt` (model, optimizer, step; written atomically every --save-every steps
and on SIGTERM/Ctrl-C); running the same command again continues from it.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from deimv2_deploy.data.synth import SYNTH_CLASSES, render_scene
from deimv2_deploy.vit_spec import IMAGENET_MEAN, IMAGENET_STD

LABELS = (*SYNTH_CLASSES, "background")  # model label order: 8 things, then the one stuff class
BACKGROUND = len(SYNTH_CLASSES)


def model_config(image_size: int) -> dict:
    """A DINOv3-style ViT-Tiny-ish EoMT: 6 layers of width 192, the last 2 with queries (EoMT's "blocks")."""
    return dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                image_size=image_size, patch_size=16, num_register_tokens=4, num_blocks=2, num_queries=24,
                num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)},
                train_num_points=2048, drop_path_rate=0.0)


def scene_targets(seed: int, split: str, index: int, size: int, flip: bool):
    """(pixel_values (3, S, S) float32 normalised RGB, masks (n, S, S) float32, labels (n,) int64)."""
    scene = render_scene(seed, split, index, size)
    rgb = scene.image[:, :, ::-1].astype(np.float32) / 255.0
    owner = scene.owner
    if flip:
        rgb, owner = rgb[:, ::-1], owner[:, ::-1]
    masks, labels = [], []
    for i, obj in enumerate(scene.objects):
        m = owner == i
        if m.any():
            masks.append(m)
            labels.append(obj.category_id - 1)
    if (owner < 0).any():
        masks.append(owner < 0)
        labels.append(BACKGROUND)
    pixels = (rgb - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    return (torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1))),
            torch.from_numpy(np.stack(masks).astype(np.float32)), torch.tensor(labels, dtype=torch.int64))


class Stream(torch.utils.data.Dataset):
    def __init__(self, seed: int, size: int, start: int, count: int) -> None:
        self.seed, self.size, self.start, self.count = seed, size, start, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int):
        index = self.start + k
        flip = bool(np.random.default_rng([self.seed, index, 99]).integers(2))
        return scene_targets(self.seed, "train", index, self.size, flip)


def collate(items):
    return torch.stack([p for p, _, _ in items]), [m for _, m, _ in items], [c for _, _, c in items]


def annealing(step: int, total: int, blocks: int) -> list[float]:
    """Masked-attention probability per block: block b goes from 1 to 0 (power 0.9) over its own window; the
    windows follow each other between 20 % and 80 % of training, so the last fifth runs without masks."""
    start, span = 0.2 * total, 0.6 * total / blocks
    probs = []
    for b in range(blocks):
        t = (step - start - b * span) / span
        probs.append(1.0 if t <= 0 else 0.0 if t >= 1 else (1.0 - t) ** 0.9)
    return probs


def learning_rate(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (1.0 - (step - warmup) / max(1, total - warmup)) ** 0.9


@torch.no_grad()
def semantic_miou(model, seed: int, count: int, size: int) -> tuple[float, list[float]]:
    """Semantic mIoU of the torch model on `count` images of (seed, "val"): the quick check logged while training
    (the measured numbers come from deimv2-val on the exports)."""
    model.eval()
    saved = model.attn_mask_probs.clone()
    model.attn_mask_probs.fill_(0.0)
    n = len(LABELS)
    confusion = np.zeros((n, n), np.int64)
    for start in range(0, count, 16):
        batch = [render_scene(seed, "val", i, size) for i in range(start, min(count, start + 16))]
        pixels = torch.stack([scene_targets(seed, "val", start + k, size, False)[0] for k in range(len(batch))])
        out = model(pixel_values=pixels)
        masks = torch.nn.functional.interpolate(out.masks_queries_logits, size=(size, size), mode="bilinear")
        probs = torch.einsum("bqc,bqhw->bchw", out.class_queries_logits.softmax(-1)[..., :-1], masks.sigmoid())
        pred = probs.argmax(1).numpy()
        for scene, p in zip(batch, pred, strict=True):
            truth = np.array([o.category_id - 1 for o in scene.objects] + [BACKGROUND])[scene.owner]
            confusion += np.bincount(truth.ravel() * n + p.ravel(), minlength=n * n).reshape(n, n)
    model.attn_mask_probs.copy_(saved)
    model.train()
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), [round(float(v), 4) for v in iou]


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="run folder: last.pt, log.jsonl and, at the end, model/")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--image-size", type=int, default=192)
    p.add_argument("--seed", type=int, default=1, help="training images are (seed, 'train', i)")
    p.add_argument("--first-image", type=int, default=0,
                   help="index of the first training image (a second stage starts after the first one's images)")
    p.add_argument("--val-seed", type=int, default=7, help="the quick check's images are (val-seed, 'val', i)")
    p.add_argument("--val-images", type=int, default=64)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--init", metavar="FOLDER", help="start from this transformers EoMT folder (a previous run's "
                   "model/) instead of random weights: a second stage with its own schedule")
    p.add_argument("--no-mask-annealing", action="store_true",
                   help="train without masked attention throughout (for --init from an annealed model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    from transformers import EomtDinov3Config, EomtDinov3ForUniversalSegmentation

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.init:
        model = EomtDinov3ForUniversalSegmentation.from_pretrained(args.init)
        if model.config.id2label != dict(enumerate(LABELS)):
            sys.exit(f"--init {args.init}: its classes {list(model.config.id2label.values())} are not {list(LABELS)}")
    else:
        model = EomtDinov3ForUniversalSegmentation(EomtDinov3Config(**model_config(args.image_size)))
    decay = [p_ for n, p_ in model.named_parameters() if p_.ndim > 1 and "embeddings" not in n]
    rest = [p_ for n, p_ in model.named_parameters() if not (p_.ndim > 1 and "embeddings" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.999))
    step = 0
    state_path = out / "last.pt"
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["args"]["steps"] != args.steps or state["args"]["batch"] != args.batch:
            sys.exit(f"{state_path} was written by a run of {state['args']['steps']} steps x batch "
                     f"{state['args']['batch']}: give the same --steps/--batch to resume, or another --output")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resuming at step {step} of {args.steps}", flush=True)
    n_params = sum(p_.numel() for p_ in model.parameters())
    print(f"EoMT-DINOv3 {n_params / 1e6:.2f} M parameters, {args.image_size} px, batch {args.batch}, "
          f"{args.steps} steps", flush=True)
    stop = {"now": False}

    def request_stop(signum, frame):  # finish the step, save, exit
        stop["now"] = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with (out / "log.jsonl").open("a") as log:
            return _train(args, model, optimizer, step, state_path, stop, log)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _train(args: argparse.Namespace, model, optimizer, step: int, state_path: Path, stop: dict, log) -> int:
    out = state_path.parent
    data = torch.utils.data.DataLoader(Stream(args.seed, args.image_size, args.first_image + step * args.batch,
                                              (args.steps - step) * args.batch),
                                       batch_size=args.batch, num_workers=args.workers, collate_fn=collate,
                                       persistent_workers=False)

    def save() -> None:
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "args": vars(args)}, state_path)

    model.train()
    tick, seen, running = time.perf_counter(), 0, []
    for pixels, masks, labels in data:
        blocks = model.config.num_blocks
        probs = [0.0] * blocks if args.no_mask_annealing else annealing(step, args.steps, blocks)
        model.attn_mask_probs.copy_(torch.tensor(probs))
        lr = learning_rate(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(pixel_values=pixels, mask_labels=masks, class_labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        seen += len(masks)
        running.append(loss.item())
        if step % 20 == 0 or step == args.steps:
            rate = seen / (time.perf_counter() - tick)
            record = {"step": step, "loss": round(float(np.mean(running)), 4), "lr": lr,
                      "mask_probs": [round(v, 3) for v in probs], "images_per_s": round(rate, 2)}
            running, seen, tick = [], 0, time.perf_counter()
            if step % args.val_every == 0 or step == args.steps:
                record["val_miou"], record["val_iou"] = semantic_miou(model, args.val_seed, args.val_images,
                                                                      args.image_size)
            print(json.dumps(record), flush=True)
            log.write(json.dumps(record) + "\n")
            log.flush()
        if step % args.save_every == 0 or stop["now"]:
            save()
        if stop["now"]:
            print(f"stopped at step {step}; run the same command again to continue", flush=True)
            return 0
    save()
    model.eval()
    model.attn_mask_probs.fill_(0.0)  # annealed: the released model runs without masked attention
    model.save_pretrained(out / "model")
    print(f"wrote {out / 'model'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
