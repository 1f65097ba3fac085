"""The training loop of `deimv2-train`: the official DEIM recipe on a COCO-format dataset, on CPU or CUDA.

One iteration: augmented batch -> training forward (with denoising queries) -> DEIM criterion -> backward ->
gradient clipping -> AdamW step -> EMA update -> learning rate for the next iteration (warm-up, flat, cosine,
constant during the final no-augmentation epochs). Validation evaluates the EMA weights, as the official does,
through the same deploy graph and evaluator as `deimv2-val`.

Checkpoints are the official format (`model`, `ema: {module, updates}`, `optimizer`, `lr_scheduler`,
`last_epoch`) plus what deployment and an exact resume need: the size, class names and dataset category ids,
the settings, the position inside the epoch and the random states. `deimv2-export` takes them unchanged.
Ctrl-C or SIGTERM finishes the current iteration, writes `last.pth` and stops; `--resume` continues from it.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["TrainSettings", "Trainer", "TrainingInterrupted", "TrainingError", "CHECKPOINT_FORMAT", "release_weights"]

CHECKPOINT_FORMAT = 1


class TrainingError(ValueError):
    """A training run that cannot start or continue; the message says why and what to do."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM: `last.pth` was written; `checkpoint` continues the run with --resume."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}; saved {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint


@dataclass
class TrainSettings:
    """What one training run was asked to do (stored in every checkpoint; --resume restores it)."""

    size: str
    train_images: str
    train_annotations: str
    output_dir: str
    val_images: str | None = None
    val_annotations: str | None = None
    checkpoint: str | None = None  # pretrained weights to start from (official, our own, Hugging Face)
    epochs: int | None = None  # None: the official recipe's number of epochs for the size
    batch: int = 16
    lr: float | None = None  # None: the recipe's learning rate scaled to the batch size
    device: str = "cpu"
    workers: int | None = None  # data-loading processes; None: one per spare core (0 on a 2-core machine)
    threads: int | None = None  # torch CPU threads; None: torch's default
    seed: int = 0
    val_every: int = 5  # epochs between validations (and always after the last epoch)
    max_val_images: int | None = None
    amp: bool = True  # mixed precision on CUDA (ignored on the CPU)
    log_every: int = 10  # iterations between log lines

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise TrainingError(f"--batch must be at least 1, got {self.batch}")
        if self.epochs is not None and self.epochs < 1:
            raise TrainingError(f"--epochs must be at least 1, got {self.epochs}")
        if self.lr is not None and not (0 < self.lr < 1):
            raise TrainingError(f"--lr must be a small positive number such as 0.001, got {self.lr}")
        if self.val_every < 1:
            raise TrainingError(f"--val-every must be at least 1, got {self.val_every}")
        if (self.val_images is None) != (self.val_annotations is None):
            raise TrainingError("give both --val-images and --val-annotations, or neither")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainSettings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class _Progress:
    """Where the run is: restored by --resume."""

    epoch: int = 0  # the epoch being trained (or next to train)
    iteration: int = 0  # batches of `epoch` already done
    global_step: int = 0
    best_ap: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per finished epoch


class Trainer:
    """Build everything from `settings` (or from a `last.pth` to resume), then `fit()`."""

    def __init__(self, settings: TrainSettings, resume: str | os.PathLike | None = None,
                 printer: Callable[[str], None] = print) -> None:
        from deimv2_deploy.models import build_model
        from deimv2_deploy.models.zoo import get_variant
        from deimv2_deploy.training.data import build_training_data

        self.say = printer
        state = _read_resume(resume) if resume is not None else None
        if state is not None:
            settings = _merge_resume_settings(TrainSettings.from_dict(state["deimv2"]["settings"]), settings)
        self.settings = settings
        self.config = get_variant(settings.size)
        self.device = _check_device(settings.device)
        if settings.threads:
            torch.set_num_threads(int(settings.threads))
        self.output_dir = Path(settings.output_dir)

        # data first: the number of classes comes from the dataset
        self.data = build_training_data(settings, self.config, printer=self.say)
        self.class_names, self.category_ids = self.data.class_names, self.data.category_ids
        num_classes = len(self.class_names)

        self.recipe = _recipe_for(settings, self.data.iterations_per_epoch)
        self.lr = _learning_rate(settings, self.recipe)
        torch.manual_seed(settings.seed)  # initial weights and denoising noise follow --seed (resume restores it)
        self.model = build_model(self.config.name, num_classes=num_classes)
        if settings.checkpoint and state is None:
            for line in load_pretrained(self.model, settings.checkpoint):
                self.say(line)
        self.model.to(self.device)

        from deimv2_deploy.training import FlatCosineSchedule, ModelEMA, build_criterion, build_optimizer

        self.criterion = build_criterion(self.config.name, num_classes=num_classes, recipe=self.recipe)
        self.optimizer = build_optimizer(self.model, self.recipe, lr=self.lr)
        self.scheduler = FlatCosineSchedule.from_recipe(self.optimizer, self.recipe, self.data.iterations_per_epoch)
        self.ema = ModelEMA(self.model, decay=self.recipe.ema_decay, warmups=self.recipe.ema_warmups)
        self.scaler = torch.amp.GradScaler("cuda") if self._amp else None
        self.progress = _Progress()
        if state is not None:
            self._restore(state)
            self.say(f"resuming {resume}: epoch {self.progress.epoch + 1}/{self.recipe.epochs}, "
                     f"batch {self.progress.iteration}/{self.data.iterations_per_epoch}")
        self._stop_signal: int | None = None

    # --- the run ------------------------------------------------------------------------------------
    @property
    def _amp(self) -> bool:
        return self.settings.amp and self.device.type == "cuda"

    def fit(self) -> dict[str, Any]:
        """Train to the last epoch (or until Ctrl-C/SIGTERM: TrainingInterrupted after saving last.pth)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log = _JsonLog(self.output_dir / "log.jsonl")
        if self.progress.global_step == 0:
            log.write({"kind": "start", "settings": asdict(self.settings), "recipe": self.recipe.as_dict(),
                       "lr": self.lr, "classes": list(self.class_names), "machine": _machine()})
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        start = time.time()
        try:
            while self.progress.epoch < self.recipe.epochs:
                epoch = self.progress.epoch
                if epoch == self.recipe.stop_epoch and self.progress.iteration == 0:
                    self._restart_ema()
                record = self._train_epoch(epoch, log)
                if self._stop_signal is not None:
                    saved = self._save("last.pth")
                    write_curves(self.output_dir / "log.jsonl", self.output_dir / "curves.png")  # the run so far
                    raise TrainingInterrupted(self._stop_signal, saved)
                last = epoch + 1 == self.recipe.epochs
                if self.data.has_validation and ((epoch + 1) % self.settings.val_every == 0 or last):
                    record["val"] = self.validate()
                    ap = record["val"]["AP"] or 0.0
                    if ap > self.progress.best_ap:
                        self.progress.best_ap, self.progress.best_epoch = ap, epoch
                        record["best"] = True
                self.progress.history.append(record)
                self.progress.epoch, self.progress.iteration = epoch + 1, 0
                log.write({"kind": "epoch", **record})
                if record.get("best"):
                    self._save("best.pth")
                self._save("last.pth")
                if self._stop_signal is not None:
                    write_curves(self.output_dir / "log.jsonl", self.output_dir / "curves.png")  # the run so far
                    raise TrainingInterrupted(self._stop_signal, self.output_dir / "last.pth")
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if not self.data.has_validation:  # no validation set: the final EMA weights are the result
            self._save("best.pth")
        summary = {"epochs": self.recipe.epochs, "best_ap": self.progress.best_ap,
                   "best_epoch": self.progress.best_epoch + 1, "seconds": round(time.time() - start, 1),
                   "best": str(self.output_dir / "best.pth"), "last": str(self.output_dir / "last.pth")}
        log.write({"kind": "end", **summary})
        plot = write_curves(self.output_dir / "log.jsonl", self.output_dir / "curves.png")
        if plot is not None:
            summary["curves"] = str(plot)
        return summary

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._stop_signal is not None:  # a second Ctrl-C: the user insists
            raise KeyboardInterrupt
        self._stop_signal = signum
        self.say(f"\n{signal.Signals(signum).name}: finishing this iteration, then saving last.pth "
                 "(press Ctrl-C again to abort without saving)")

    def _train_epoch(self, epoch: int, log: _JsonLog) -> dict[str, Any]:
        from tqdm import tqdm

        self.model.train()
        self.data.set_epoch(epoch)
        total = self.data.iterations_per_epoch
        first = self.progress.iteration
        sums: dict[str, float] = {}
        count, images_seen, t0 = 0, 0, time.time()
        bar = tqdm(total=total, initial=first, desc=f"epoch {epoch + 1}/{self.recipe.epochs}", unit="batch",
                   dynamic_ncols=True, leave=True)
        for images, targets in self.data.batches(epoch, start=first):
            terms = self._step(images, targets, epoch)
            loss = sum(terms.values())
            count += 1
            images_seen += images.shape[0]
            for k, v in _summarise_terms(terms).items():
                sums[k] = sums.get(k, 0.0) + v
            self.progress.iteration += 1
            self.progress.global_step += 1
            rate = images_seen / max(time.time() - t0, 1e-9)
            lr = self.optimizer.param_groups[0]["lr"]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            if self.progress.global_step % self.settings.log_every == 0:
                log.write({"kind": "iter", "epoch": epoch, "iteration": self.progress.iteration,
                           "step": self.progress.global_step, "loss": loss, "lr": lr, "images_per_s": rate,
                           **{k: round(v, 6) for k, v in _summarise_terms(terms).items()}})
            if self._stop_signal is not None:
                break
        bar.close()
        means = {k: v / max(count, 1) for k, v in sums.items()}
        return {"epoch": epoch + 1, "loss": sum(means[k] for k in ("mal", "bbox", "giou", "fgl", "ddf") if k in means),
                "terms": means, "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": images_seen / max(time.time() - t0, 1e-9), "seconds": round(time.time() - t0, 1)}

    def _step(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]], epoch: int) -> dict[str, float]:
        images = images.to(self.device, non_blocking=True)
        targets = [{k: v.to(self.device) for k, v in t.items()} for t in targets]
        if self._amp:
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16
                                if torch.cuda.is_bf16_supported() else torch.float16):
                outputs = self.model(images, targets=targets)
            outputs = _to_float(outputs)
        else:
            outputs = self.model(images, targets=targets)
        losses = self.criterion(outputs, targets, epoch=epoch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            path = self._save("last.pth")
            raise TrainingError(f"the loss became {float(loss)} at epoch {epoch + 1}, step "
                                f"{self.progress.global_step}: stopped (state before this step saved in {path}); "
                                "try a lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        clip = self.recipe.clip_max_norm
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip > 0:
                nn.utils.clip_grad_norm_(self.model.parameters(), clip)
            self.optimizer.step()
        self.ema.update(self.model)
        self.scheduler.step()  # the learning rate of the next iteration
        return {k: float(v.detach()) for k, v in losses.items()}

    def _restart_ema(self) -> None:
        """The official stage switch: the final no-augmentation epochs restart from the best weights so far,
        with the EMA's restart decay."""
        best = self.output_dir / "best.pth"
        if best.exists() and self.progress.best_epoch >= 0:
            state = torch.load(best, map_location=self.device, weights_only=True)
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.say(f"no-augmentation epochs: continuing from the best weights so far (epoch "
                     f"{self.progress.best_epoch + 1}, AP {self.progress.best_ap:.4f})")
        elif self.progress.best_epoch >= 0:  # a resumed run moved to another --output-dir without its best.pth
            self.say(f"no-augmentation epochs: no {best} (copy the run's best.pth there to restart from it); "
                     "continuing from the current weights")
        self.ema.decay = self.recipe.ema_restart_decay

    # --- validation ---------------------------------------------------------------------------------
    def deploy_runtime(self) -> Any:
        """A torch Runtime of the current EMA weights in deploy form (what an export would contain)."""
        from deimv2_deploy.models.graph import DeployGraph
        from deimv2_deploy.runtimes.torch_backend import TorchRuntime
        from deimv2_deploy.spec import EXPORTER, ArtifactSpec

        module = copy.deepcopy(self.ema.module).to("cpu").eval().deploy()
        spec = ArtifactSpec.for_variant(self.config.name, class_names=self.class_names,
                                        category_ids=self.category_ids,
                                        weights=f"training EMA, epoch {self.progress.epoch + 1}",
                                        exporter=f"{EXPORTER} (training validation)")
        return TorchRuntime(graph=DeployGraph(module), spec=spec)

    def validate(self) -> dict[str, Any]:
        from deimv2_deploy.evaluation import evaluate

        runtime = self.deploy_runtime()
        result = evaluate(runtime, self.settings.val_images, self.settings.val_annotations,
                          batch=8, max_images=self.settings.max_val_images, progress=True)
        metrics = {k: result[k] for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")}
        # COCO reports None (-1) for a size range with no objects in the validation set
        self.say("validation (EMA): " + ", ".join(f"{k} {'n/a' if v is None else f'{v:.4f}'}"
                                                  for k, v in metrics.items()))
        return metrics

    # --- checkpoints --------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        from deimv2_deploy import __version__

        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict(),
            "last_epoch": self.progress.epoch - 1 if self.progress.iteration == 0 else self.progress.epoch,
            "ema_decay": float(self.ema.decay),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "deimv2": {
                "format": CHECKPOINT_FORMAT, "version": __version__, "size": self.config.name,
                "class_names": list(self.class_names),
                "category_ids": None if self.category_ids is None else [int(i) for i in self.category_ids],
                "settings": asdict(self.settings), "recipe": self.recipe.as_dict(), "lr": self.lr,
                "progress": {"epoch": self.progress.epoch, "iteration": self.progress.iteration,
                             "global_step": self.progress.global_step, "best_ap": self.progress.best_ap,
                             "best_epoch": self.progress.best_epoch},
                "history_json": json.dumps(self.progress.history),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def _save(self, name: str) -> Path:
        from deimv2_deploy.media import atomic_path

        path = self.output_dir / name
        with atomic_path(path) as tmp:
            torch.save(self.checkpoint_state(), tmp)
        return path

    def _restore(self, state: dict[str, Any]) -> None:
        meta = state["deimv2"]
        if list(meta["class_names"]) != list(self.class_names):
            raise TrainingError(f"the checkpoint was trained on classes {meta['class_names']}, the dataset has "
                                f"{list(self.class_names)}: resume with the same dataset")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.ema.decay = float(state.get("ema_decay", self.ema.decay))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        p = meta["progress"]
        self.progress = _Progress(epoch=p["epoch"], iteration=p["iteration"], global_step=p["global_step"],
                                  best_ap=p["best_ap"], best_epoch=p["best_epoch"],
                                  history=json.loads(meta["history_json"]))
        torch.set_rng_state(meta["torch_rng"])
        if meta.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(meta["cuda_rng"])


# ---------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------


def _check_device(device: str) -> torch.device:
    d = str(device).lower()
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {device}: PyTorch sees no CUDA GPU here (CPU-only build or no driver); "
                                "use --device cpu")
    elif d != "cpu":
        raise TrainingError(f"--device must be cpu or cuda[:N], got {device!r}")
    return torch.device(d)


def _recipe_for(settings: TrainSettings, iterations_per_epoch: int) -> Any:
    """The official recipe of the size, stretched to this run's epochs and iterations (official proportions)."""
    from deimv2_deploy.training.recipe import get_recipe

    return get_recipe(settings.size).scaled(epochs=settings.epochs, iters_per_epoch=iterations_per_epoch)


def _learning_rate(settings: TrainSettings, recipe: Any) -> float:
    """--lr, else the recipe's base rate scaled to the batch by the square root of the batch ratio (the usual rule
    for Adam-type optimisers; the official rates are for batches of 128 (atto..pico) or 32 (n..x))."""
    if settings.lr is not None:
        return float(settings.lr)
    return recipe.lr * (settings.batch / recipe.batch_size) ** 0.5


def _read_resume(path: str | os.PathLike, flag: str = "--resume") -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise TrainingError(f"{flag} {p}: no such checkpoint (expected OUTPUT_DIR/last.pth or best.pth of a "
                            "deimv2-train run)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, or one carrying code
        raise TrainingError(f"{flag} {p}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "deimv2" not in state or "optimizer" not in state:
        raise TrainingError(f"{flag} {p} is not a deimv2-train checkpoint (no training state); to start from its "
                            "weights use --checkpoint instead")
    return state


def release_weights(checkpoint: str | os.PathLike, output: str | os.PathLike) -> Path:
    """The deployable part of a deimv2-train checkpoint: its EMA weights (what validation measured) and the
    deimv2 metadata (size, classes, category ids, settings, progress), without the optimizer, scheduler and RNG
    states a resume needs (about a quarter of the size). Exporters, runtimes and --checkpoint read it as any
    official checkpoint ({"ema": {"module": ...}})."""
    from deimv2_deploy.media import atomic_path

    src, dst = Path(checkpoint), Path(output)
    state = _read_resume(src, flag="--release")
    meta = {k: v for k, v in state["deimv2"].items() if k not in ("torch_rng", "cuda_rng")}
    meta["released_from"] = src.name
    slim = {"ema": {"module": state["ema"]["module"], "updates": state["ema"].get("updates", 0)}, "deimv2": meta}
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        torch.save(slim, tmp)
    return dst


def _merge_resume_settings(stored: TrainSettings, given: TrainSettings) -> TrainSettings:
    """A resumed run keeps its settings; only what depends on the machine may change: device, workers, threads,
    and, when given, where the data and the output are (a run moved to another machine or folder; the classes are
    still checked against the checkpoint's)."""
    moved = {name: getattr(given, name) for name in _RELOCATABLE if getattr(given, name)}
    return replace(stored, device=given.device, workers=given.workers, threads=given.threads, **moved)


_RELOCATABLE = ("train_images", "train_annotations", "val_images", "val_annotations", "output_dir")


def _to_float(node: Any) -> Any:
    """Outputs of an autocast forward back to float32 for the losses."""
    if isinstance(node, torch.Tensor):
        return node.float() if node.is_floating_point() else node
    if isinstance(node, dict):
        return {k: _to_float(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return type(node)(_to_float(v) for v in node)
    return node


def _summarise_terms(terms: dict[str, float]) -> dict[str, float]:
    """Per loss kind (mal, bbox, giou, fgl, ddf), summed over layers, denoising and proposals."""
    out: dict[str, float] = {}
    for name, value in terms.items():
        kind = name.removeprefix("loss_").split("_")[0]
        out[kind] = out.get(kind, 0.0) + value
    return out


def _machine() -> dict[str, Any]:
    from deimv2_deploy.cpu import cpu_info

    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_info()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class _JsonLog:
    """Append-only JSON lines, flushed per line so a killed run keeps its log."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def write_curves(log_path: Path, out: Path) -> Path | None:
    """Loss per iteration and validation AP per epoch as one PNG (None when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from deimv2_deploy.media import atomic_path

    records = read_log(log_path)
    iters = [r for r in records if r.get("kind") == "iter"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    if iters:
        by_step = {r["step"]: r["loss"] for r in iters}  # a resumed run logs again what the stopped one had
        steps = np.array(sorted(by_step))
        loss = np.array([by_step[s] for s in steps])
        ax_loss.plot(steps, loss, lw=0.5, alpha=0.4, label="loss")
        window = max(1, len(loss) // 50)
        total = np.concatenate([[0.0], np.cumsum(loss)])
        first = np.maximum(np.arange(len(loss)) + 1 - window, 0)  # trailing mean, shorter at the start
        ax_loss.plot(steps, (total[1:] - total[first]) / (np.arange(len(loss)) + 1 - first), lw=1.5,
                     label="smoothed")
        ax_loss.set_xlabel("iteration")
        ax_loss.set_ylabel("total loss")
        ax_loss.set_yscale("log")
        ax_loss.legend()
    validated = [r for r in epochs if "val" in r]
    if validated:
        for key in ("AP", "AP50", "AP75"):
            ax_ap.plot([r["epoch"] for r in validated], [r["val"][key] for r in validated], marker="o", label=key)
        ax_ap.set_ylim(0, 1)
        ax_ap.set_xlabel("epoch")
        ax_ap.set_ylabel("validation (EMA)")
        ax_ap.legend()
    else:
        ax_ap.text(0.5, 0.5, "no validation set", ha="center", va="center")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning: start from pretrained weights with another number of classes
# ---------------------------------------------------------------------------------------------------------

# parameters whose first dimension is the number of classes (+1 for the denoising "no object" row)
_CLASS_HEADS = ("decoder.enc_score_head.", "decoder.dec_score_head.", "decoder.denoising_class_embed.")


def load_pretrained(model: nn.Module, source: str | os.PathLike) -> list[str]:
    """Load pretrained weights strictly, except the class heads when the number of classes differs (those
    keep their fresh initialisation). Returns lines saying what was loaded and re-initialised."""
    from deimv2_deploy.models.checkpoint import (
        CheckpointError,
        checkpoint_format,
        compare_state_dict,
        load_checkpoint,
        read_checkpoint,
    )

    notes: list[str] = []
    if checkpoint_format(source) == "transformers":  # official names back (docs/transformers.md)
        loaded = load_checkpoint(source, drop_transformers_only=True)
        state = loaded.state
        if loaded.dropped:
            notes.append(f"left out {len(loaded.dropped)} tensors trained inside transformers that the official "
                         f"model has no place for (e.g. {next(iter(loaded.dropped))})")
    else:
        state, _ = read_checkpoint(source)
    own = model.state_dict()
    report = compare_state_dict(state, own)
    class_keys = [k for k, _, _ in report.mismatched if k.startswith(_CLASS_HEADS)]
    other = [(k, a, b) for k, a, b in report.mismatched if not k.startswith(_CLASS_HEADS)]
    if report.missing or report.unexpected or other:
        bad = replace_report(report, other)
        raise CheckpointError(f"{source} does not fit DEIMv2 of this size: {bad.describe()}")
    keep = {k: v for k, v in state.items() if k in own and k not in class_keys}
    for k, v in keep.items():
        if v.dtype != own[k].dtype:
            keep[k] = v.to(own[k].dtype)
    missing, _ = model.load_state_dict(keep, strict=False)
    if set(missing) - set(class_keys) - _aliases_of(model, set(class_keys)):
        raise CheckpointError(f"{source}: weights missing for {sorted(set(missing) - set(class_keys))[:5]}")
    lines = [f"loaded {len(keep)} tensors from {source}", *notes]
    if class_keys:
        lines.append(f"re-initialised for {_num_classes(own)} classes ({len(class_keys)} tensors of the class "
                     f"heads: {', '.join(sorted({k.rsplit('.', 1)[0] for k in class_keys})[:6])} ...)")
    return lines


def replace_report(report: Any, mismatched: Sequence[tuple]) -> Any:
    return replace(report, mismatched=list(mismatched))


def _aliases_of(model: nn.Module, keys: set[str]) -> set[str]:
    """Keys that share storage with `keys` (the shared heads of atto/femto/pico appear under several names)."""
    state = model.state_dict()
    ptrs = {state[k].data_ptr() for k in keys if k in state}
    return {k for k, v in state.items() if v.data_ptr() in ptrs}


def _num_classes(state: dict[str, torch.Tensor]) -> int:
    return int(state["decoder.enc_score_head.weight"].shape[0])

