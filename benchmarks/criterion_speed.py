"""How long one call of the DEIM training criterion takes on the CPU (it runs every training iteration).

Cases: the atto golden case (batch 2, as the official criterion was timed there) and random official-structure
outputs (`deimv2_deploy.training.fake_outputs`) for atto (100 queries) and n (300 queries, uni-set + FGL/DDF)
at several batch sizes with 7 objects per image (about the COCO mean). For each: the Hungarian matching of all
outputs alone (`criterion.matchings`), the whole loss (forward), and forward + backward. Calls alternate over the
cases `--repeats` times and the median is reported, because this machine is shared. `--model-context` adds, for
scale, one whole CPU training iteration (model forward in train mode + criterion + backward) of atto and n.

    PYTHONPATH=. .venv/bin/python benchmarks/criterion_speed.py --markdown benchmarks/criterion_speed.md
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from deimv2_deploy.benchmarks.sysinfo import command_line, cpu_info, load_average
from deimv2_deploy.training import build_criterion
from deimv2_deploy.training.fake_outputs import random_targets, random_training_outputs

GOLDEN = Path(os.environ.get("DEIMV2_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))


def _golden_atto():
    path = GOLDEN / "criterion" / "load_case.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("deimv2_golden_load_case", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    outputs, targets, *_ = module.load_case(str(GOLDEN / "criterion" / "atto_seed0"))

    def leaves(node) -> None:  # the stored predictions become leaves that take gradients
        if isinstance(node, dict):
            for k, v in node.items():
                if k.startswith("pred_") and isinstance(v, torch.Tensor):
                    v.requires_grad_(True)
                else:
                    leaves(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                leaves(v)

    leaves(outputs)
    return outputs, targets


def _cases(batches: list[int]) -> list[tuple[str, str, object]]:
    cases = []
    golden = _golden_atto()
    if golden is not None:
        cases.append(("atto golden case (batch 2, 1 + 6 objects)", "atto", lambda: golden))
    for size, queries in (("atto", 100), ("n", 300)):
        for b in batches:
            def make(b=b, queries=queries):
                targets = random_targets([7] * b, seed=b)
                return random_training_outputs(targets, num_queries=queries, seed=b), targets
            cases.append((f"{size}, batch {b} x 7 objects, {queries} queries", size, make))
    return cases


def _round(crit, out, tg) -> tuple[float, float, float]:
    """Seconds for: the matching alone, the loss, the loss + backward."""
    t0 = time.perf_counter()
    crit.matchings(out, tg, epoch=0, with_union=crit.use_uni_set)
    t1 = time.perf_counter()
    crit(out, tg, epoch=0)
    t2 = time.perf_counter()
    sum(crit(out, tg, epoch=0).values()).backward()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def _model_context(repeats: int) -> list[tuple[str, float, float]]:
    """(name, median iteration seconds, median criterion-forward seconds) of atto batch 16 and n batch 4."""
    from deimv2_deploy.models import build_model

    rows = []
    for size, batch, side in (("atto", 16, 320), ("n", 4, 640)):
        model, crit = build_model(size).train(), build_criterion(size)
        targets, images = random_targets([7] * batch, seed=0), torch.rand(batch, 3, side, side)
        total, part = [], []
        for _ in range(max(2, repeats // 2)):
            t0 = time.perf_counter()
            out = model(images, targets=targets)
            t1 = time.perf_counter()
            loss = sum(crit(out, targets, epoch=0).values())
            t2 = time.perf_counter()
            loss.backward()
            model.zero_grad(set_to_none=True)
            total.append(time.perf_counter() - t0)
            part.append(t2 - t1)
        rows.append((f"{size}, batch {batch} at {side}", statistics.median(total), statistics.median(part)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--model-context", action="store_true", help="also time whole training iterations")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = load_average()
    cases = _cases(args.batches)
    crits = {size: build_criterion(size) for size in {c[1] for c in cases}}
    built = [make() for _, _, make in cases]
    for (_, size, _), (out, tg) in zip(cases, built, strict=True):  # warm-up (scipy import, allocator)
        crits[size](out, tg, epoch=0)
    times: list[dict[str, list[float]]] = [{"match": [], "forward": [], "forward+backward": []} for _ in cases]
    for _ in range(args.repeats):
        for i, ((_, size, _), (out, tg)) in enumerate(zip(cases, built, strict=True)):
            for key, seconds in zip(times[i], _round(crits[size], out, tg), strict=True):
                times[i][key].append(seconds)
    context = _model_context(args.repeats) if args.model_context else []
    load_after = load_average()

    cpu = cpu_info()
    lines = [
        "# DEIM criterion: time per call on the CPU",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPU: {cpu.get('model', '?')}, {os.cpu_count()} logical cores; torch threads: {args.threads}; "
        f"load average {load_before[0] if load_before else '?'} before, {load_after[0] if load_after else '?'} "
        "after (other jobs share this machine)",
        f"- command: `PYTHONPATH=. .venv/bin/python benchmarks/{command_line()}`",
        f"- torch {torch.__version__}, float32; median of {args.repeats} alternating rounds (min in brackets)",
        "- match: the Hungarian matching of every output (last, aux, pre, encoder; union set where used); "
        "forward: every loss term (includes the matching); forward+backward: plus the backward pass of their sum",
        "",
        "| case | match ms | forward ms | forward+backward ms |",
        "|---|---:|---:|---:|",
    ]
    for (name, _, _), t in zip(cases, times, strict=True):
        cells = [f"{statistics.median(v) * 1e3:.1f} ({min(v) * 1e3:.1f})" for v in t.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if context:
        lines += ["", "For scale, one whole training iteration on the same threads (model forward in train mode with",
                  "denoising, criterion, backward; random weights, 7 objects per image):", "",
                  "| model, batch | iteration ms | criterion forward ms | criterion share |", "|---|---:|---:|---:|"]
        for name, total, crit in context:
            lines.append(f"| {name} | {total * 1e3:.0f} | {crit * 1e3:.0f} | {crit / total:.1%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
