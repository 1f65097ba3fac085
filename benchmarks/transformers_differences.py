"""The measured effect of each difference between transformers' DEIMv2 (5.24) and the official model.

For every size, with the golden cases' deterministic official weights (../shared/golden/fill.py) converted as
transformers' converter does, on the golden input: transformers as it is, transformers with every listed
difference switched off (= the official model), and with all switched off but one (= that difference's effect
alone). For atto/femto/pico also transformers' own save_pretrained -> from_pretrained round trip (all
differences off), which re-initialises the shared box head. Writes transformers_differences.{json,md} here;
docs/transformers.md quotes the table.

    .venv/bin/python benchmarks/transformers_differences.py [SIZE ...]

Metrics, against the official outputs: `rows` = query rows (80 logits + 4 box values) equal within 1e-4,
order-free, of Q; `max |dlogit|` / `max |dbox|` = the largest difference with the rows in query order (a model
that gives the same rows in another order, e.g. x with all differences off, shows large values here and Q/Q
rows); `top-100 kept` = of the official model's 100 best detections (640x480 image), how many transformers also
has among its 100 best (same label, IoU >= 0.9). The weights are deterministic, not trained: the sizes of the
effects, not their meaning, carry over.
"""
from __future__ import annotations

import copy
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ORIG_SIZES = torch.tensor([[640, 480]])


def _golden_module(name: str):
    folder = Path(os.environ.get("DEIMV2_GOLDEN", HERE.parent.parent / "shared" / "golden"))
    spec = importlib.util.spec_from_file_location(f"golden_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy -> (N, M)."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None, :] - inter + 1e-12)


def _metrics(logits: torch.Tensor, boxes: torch.Tensor, ref: dict, compare) -> dict:
    from deimv2_deploy.models import postprocess

    rows = compare.compare_queries(logits[0].numpy(), boxes[0].numpy(), ref["pred_logits"][0].numpy(),
                                   ref["pred_boxes"][0].numpy(), tol=1e-4)
    max_dlogit = float((logits - ref["pred_logits"]).abs().max())  # query order
    max_dbox = float((boxes - ref["pred_boxes"]).abs().max())
    ours = postprocess({"pred_logits": logits, "pred_boxes": boxes}, ORIG_SIZES, top_k=100)
    theirs = postprocess(ref, ORIG_SIZES, top_k=100)
    same_label = ours[0][0].numpy()[None, :] == theirs[0][0].numpy()[:, None]
    kept = int(((_iou(theirs[1][0].numpy(), ours[1][0].numpy()) >= 0.9) & same_label).any(1).sum())
    return {"rows": int(rows.matched), "of": int(rows.total), "max_dlogit": max_dlogit, "max_dbox": max_dbox,
            "top100_kept": kept}


def measure(variant: str) -> dict:
    from transformers import Deimv2Config, Deimv2ForObjectDetection
    from transformers.utils import logging as hf_logging

    from deimv2_deploy.models import build_model
    from deimv2_deploy.models import hf_format as hf
    from deimv2_deploy.models.hf_differences import differences_for, switch_off
    from deimv2_deploy.models.zoo import get_variant

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    fill, compare = _golden_module("fill"), _golden_module("compare")
    cfg = get_variant(variant)
    images = fill.golden_input(*cfg.input_size)  # fed as it is, as the golden cases do
    ours = build_model(variant)
    state = fill.fill_state_dict(ours.state_dict())
    ours.load_state_dict(state)
    with torch.no_grad():
        ref = ours.eval()(images)
    base = Deimv2ForObjectDetection(Deimv2Config.from_dict(hf.transformers_config(variant, official_behaviour=False)))
    base.load_state_dict(hf.official_to_transformers(state, variant), strict=True)
    base.eval()
    numbers = tuple(d.number for d in differences_for(variant))

    def run(model) -> dict:
        with torch.no_grad():
            out = model(pixel_values=images)
        return _metrics(out.logits, out.pred_boxes, ref, compare)

    result = {"variant": variant, "queries": cfg.num_queries, "transformers": run(base)}
    result["all_switched_off"] = run(switch_off(copy.deepcopy(base), variant, state, numbers))
    result["only"] = {}
    for d in differences_for(variant):
        others = tuple(n for n in numbers if n != d.number)
        result["only"][str(d.number)] = run(switch_off(copy.deepcopy(base), variant, state, others))
    if cfg.decoder.share_bbox_head:
        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(tmp)
            reloaded = Deimv2ForObjectDetection.from_pretrained(tmp).eval()
        result["save_pretrained_round_trip"] = run(switch_off(reloaded, variant, state, numbers))
    return result


def _cell(m: dict) -> str:
    return f"{m['rows']}/{m['of']}, {m['max_dlogit']:.2g} / {m['max_dbox']:.2g}, {m['top100_kept']}"


def to_markdown(results: list[dict]) -> str:
    items = sorted({int(n) for r in results for n in r["only"]})
    head = ["size", "transformers as is", "all off", *[f"only {n}" for n in items], "save/load (all off)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["variant"], _cell(r["transformers"]), _cell(r["all_switched_off"])]
        cells += [_cell(r["only"][str(n)]) if str(n) in r["only"] else "-" for n in items]
        cells.append(_cell(r["save_pretrained_round_trip"]) if "save_pretrained_round_trip" in r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import transformers

    from deimv2_deploy.variants import VARIANT_NAMES

    sizes = argv or list(VARIANT_NAMES)
    results = []
    for size in sizes:
        t0 = time.perf_counter()
        results.append(measure(size))
        print(f"{size}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    report = {"transformers": transformers.__version__, "torch": torch.__version__,
              "cell": "rows within 1e-4 / Q, max |dlogit| / max |dbox| (query order), official top-100 kept",
              "results": results}
    from deimv2_deploy.media import atomic_path

    with atomic_path(HERE / "transformers_differences.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    md = (f"# transformers {transformers.__version__} DEIMv2 vs the official model\n\n"
          f"Command: `.venv/bin/python benchmarks/transformers_differences.py {' '.join(argv)}`. Each cell: "
          f"{report['cell']}. Item numbers as in docs/transformers.md.\n\n{to_markdown(results)}\n")
    with atomic_path(HERE / "transformers_differences.md") as tmp:
        tmp.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
