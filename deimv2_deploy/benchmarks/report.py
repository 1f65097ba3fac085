"""Benchmark reports: markdown table (terminal and file), CSV, JSON (schema_version 1) and a plot.

Every function takes a `BenchResult` or its JSON dict, so a saved JSON can be rendered again later
(`to_markdown(load_json("results.json"))`). The JSON schema is documented in benchmarks/README.md.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from deimv2_deploy.benchmarks.harness import SCHEMA_VERSION, BenchResult
from deimv2_deploy.files import atomic_write, write_text
from deimv2_deploy.variants import VARIANT_NAMES, get_variant_info

__all__ = ["to_markdown", "to_csv", "write_markdown", "write_csv", "write_json", "write_plot", "load_json",
           "CSV_FIELDS", "STAT_KEYS"]

STAT_KEYS = ("mean", "std", "min", "p50", "p90", "p99", "max")
_ROW_SCALARS = ("size", "backend", "precision", "batch", "mode", "tier", "device", "device_name", "threads", "status",
                "reason", "artifact", "artifact_reused", "prepare_s", "backend_version", "random_weights", "load_s",
                "first_ms", "warmup", "iters", "executed_precision")
_STAGES = ("read", "preprocess", "infer", "postprocess")
CSV_FIELDS = (
    ("schema_version",) + _ROW_SCALARS + tuple(f"{k}_ms" for k in STAT_KEYS)
    + ("fps", "throughput_ips", "rss_mb", "peak_rss_mb", "load_1m", "speedup_vs_torch", "parity_ok",
       "parity_matched_fraction", "parity_max_box_diff", "parity_max_score_diff", "parity_max_abs_diff")
    + tuple(f"{s}_mean_ms" for s in _STAGES) + tuple(f"{s}_p99_ms" for s in _STAGES)
    + ("AP", "AP50", "AP75", "accuracy_images", "accuracy_note")
)


def _data(result: BenchResult | dict[str, Any]) -> dict[str, Any]:
    data = result.to_dict() if isinstance(result, BenchResult) else result
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(f"benchmark results have schema_version {data.get('schema_version')!r}; this deimv2-deploy "
                         f"reads version {SCHEMA_VERSION}")
    return data


def load_json(path: str | os.PathLike) -> dict[str, Any]:
    return _data(json.loads(Path(path).read_text()))


# --- formatting ------------------------------------------------------------------------------------------
def _num(x: float | None, digits: int | None = None) -> str:
    if x is None:
        return "–"
    if digits is not None:
        return f"{x:.{digits}f}"
    ax = abs(x)
    return f"{x:.3f}" if ax < 1 else f"{x:.2f}" if ax < 10 else f"{x:.1f}" if ax < 1000 else f"{x:.0f}"


def _parity_cell(row: dict[str, Any]) -> str:
    if row["backend"] == "torch" and row["status"] == "ok":
        return "reference"
    p = row.get("parity")
    if not p:
        return "–"
    if p.get("ok") is None:
        return p.get("detail", "n/a")
    mark = "" if p["ok"] else " ✗"
    if "max_abs_diff" in p:  # --vit rows: the graph's outputs against the reference's (benchmarks/vit.py)
        agreed = "".join(f" · {k} {v:.3f}" for k, v in (p.get("agreement") or {}).items())  # FP16/INT8/bf16 rows
        return f"max abs diff {p['max_abs_diff']:.1e}{agreed} vs {p['against']}{mark}"
    return f"{100 * p['matched_fraction']:.1f}% · {p['max_box_diff']:.1e} px · {p['max_score_diff']:.1e}{mark}"


def _isa_summary(cpu: dict[str, Any]) -> str:
    isa = cpu.get("isa") or {}
    groups = {"AVX2": ["AVX2"], "AVX-512": ["AVX-512F"], "VNNI": ["AVX-512 VNNI", "AVX-VNNI"], "AMX": ["AMX"]}
    return ", ".join(f"{name} {'yes' if any(isa.get(f) for f in flags) else 'no'}" for name, flags in groups.items())


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "n/a"


def _contention(system: dict[str, Any], cores: int | None) -> str:
    loads = (system.get("load_average") or [])[:1] + (system.get("load_average_end") or [])[:1]
    if cores and loads and max(loads) > cores:
        return " (above the core count: other processes competed for the CPU, so latencies are pessimistic)"
    return ""


def _threads(n: Any) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _header(data: dict[str, Any]) -> list[str]:
    system, config = data["system"], data["config"]
    cpu = system["cpu"]
    libs = ", ".join(f"{k} {v}" for k, v in system["libraries"].items() if v)
    gpus = "; ".join(f"{g['name']} ({g.get('memory') or '?'}, driver {g.get('driver') or '?'})"
                     for g in system.get("gpus") or []) or "none"
    tiers = sorted({f"{r['tier']} ({r['device_name']})" for r in data["rows"]})
    weights = _weights_label(config, "RANDOM deterministic weights (timing only; detections meaningless)")
    timed = f"{config['iters']} timed calls" if config["iters"] else f"{config['seconds']} s of timed calls"
    tasks = f" (EoMT tasks {', '.join(config['tasks'])})" if config.get("tasks") else ""
    return [
        f"Tier: {', '.join(tiers) or config['device']} · mode {config['mode']}{tasks} · "
        f"{_threads(config['threads'])} · "
        f"{config['warmup']} warm-up calls then {timed} per row · {weights}",
        f"CPU: {cpu['model']} ({cpu['arch']}), {cpu['usable_cores']} usable / {cpu['logical_cores']} logical cores"
        + (f", cgroup quota {cpu['cgroup_cpu_quota']}" if cpu.get("cgroup_cpu_quota") else "")
        + f", {cpu.get('memory_gb')} GB RAM; {_isa_summary(cpu)}",
        f"GPU: {gpus}",
        f"Libraries: {libs}",
        f"Load average (1/5/15 min) at start {_load(system.get('load_average'))}, at end "
        f"{_load(system.get('load_average_end'))} on {cpu['usable_cores']} usable cores"
        + _contention(system, cpu["usable_cores"]),
        f"OS: {system['os']}, Python {system['python']}",
        *_accuracy_header(data),
        f"Command: `{data['command']}`",
        f"Created: {data['created_utc']} (schema_version {data['schema_version']})",
    ]


def _accuracy_header(data: dict[str, Any]) -> list[str]:
    acc = data.get("accuracy")
    if not acc:
        return []
    evaluator = acc.get("evaluator") or {}
    return [f"Accuracy: COCO bbox AP and AP50 of each row's own runtime on {acc['images']} of {acc['images_total']} "
            f"images of `{acc['annotations']}` ({acc['categories']} categories; top-300 detections per image, no "
            f"score threshold, as deimv2-val; {evaluator.get('name', '?')} {evaluator.get('version', '?')}); "
            "evaluation is not timed"]


_COLUMNS = ("tier · device", "size", "backend", "prec", "batch", "status", "calls", "mean ms", "std", "min", "p50",
            "p90", "p99", "max", "FPS", "img/s", "first ms", "load s", "peak RSS MB", "load 1m", "× torch",
            "parity vs torch (matched · max box · max score)", "note")
_AP_AT = _COLUMNS.index("first ms")  # --accuracy: AP and AP50 go right after the latency figures
_VIT_COLUMNS = {"size": "model",  # --vit runs: the model's name, and parity as the largest output difference
                "parity vs torch (matched · max box · max score)": "parity (max abs diff vs reference)"}


def _weights_label(config: dict[str, Any], random_label: str) -> str:
    """Whose weights the rows ran: random, a given --checkpoint file, or the store's official checkpoints."""
    if config.get("vit"):
        return f"model {config['vit']} (its own weights; the `model` column is the JSON/CSV `size`)"
    if config.get("random_weights"):
        return random_label
    if config.get("checkpoint"):
        return f"weights {Path(config['checkpoint']).name}"
    return "official checkpoints"


def _ap_cell(row: dict[str, Any], key: str) -> str:
    acc = row.get("accuracy")
    if not acc or row["status"] != "ok":
        return "–"
    if acc.get(key) is None:
        return "n/a"
    return f"{acc[key]:.3f}" + (" (random weights)" if acc.get("random_weights") else "")


def _accuracy_note(row: dict[str, Any]) -> str | None:
    acc = row.get("accuracy") or {}
    if acc.get("error"):
        return f"no AP: {acc['error']}"
    return "; ".join(acc.get("notes") or []) or None


def _precision_cell(row: dict[str, Any]) -> str:
    """The row's precision, and what really ran (read from the runtime) where that is another word."""
    executed = row.get("executed_precision")
    return row["precision"] if executed in (None, row["precision"]) else f"{row['precision']} (ran {executed})"


def _cells(row: dict[str, Any], accuracy: bool = False) -> list[str]:
    lat = row.get("latency_ms") or {}
    ok = row["status"] == "ok"
    notes = [row["reason"]] if row.get("reason") else []
    if ok and row.get("stages_ms"):
        notes.append("stages mean ms: " + ", ".join(f"{k} {_num(v['mean'])}" for k, v in row["stages_ms"].items()))
    if ok and row.get("artifact_reused") is False:
        notes.append(f"exported in {_num(row.get('prepare_s'))} s")
    notes += row.get("notes") or []
    if accuracy and _accuracy_note(row):
        notes.append(_accuracy_note(row))
    note = "; ".join(notes)
    return [
        f"{row['tier']} · {row['device_name']}", row["size"], row["backend"], _precision_cell(row), str(row["batch"]),
        row["status"], f"{row['iters']}+{row['warmup']}w" if ok else "–",
        *(_num(lat.get(k)) if ok else "–" for k in STAT_KEYS),
        _num(row.get("fps")), _num(row.get("throughput_ips")),
        *((_ap_cell(row, "AP"), _ap_cell(row, "AP50")) if accuracy else ()), _num(row.get("first_ms")),
        _num(row.get("load_s"), 2), _num(row.get("peak_rss_mb"), 0), _num(row.get("load_1m"), 1),
        _num(row.get("speedup_vs_torch"), 2) if row.get("speedup_vs_torch") else "–",
        _parity_cell(row), note.replace("|", "/").replace("\n", " "),
    ]


def to_markdown(result: BenchResult | dict[str, Any], title: str = "DEIMv2 latency") -> str:
    """The report as markdown: fingerprint, one table row per configuration, and how to read it."""
    data = _data(result)
    accuracy = bool(data.get("accuracy"))
    vit = bool(data["config"].get("vit"))
    columns = _COLUMNS if not accuracy else (*_COLUMNS[:_AP_AT], "AP", "AP50", *_COLUMNS[_AP_AT:])
    if vit:
        columns = tuple(_VIT_COLUMNS.get(c, c) for c in columns)
    lines = [f"# {title}", ""]
    lines += [f"- {h}" for h in _header(data)]
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cells(r, accuracy)) + " |" for r in data["rows"]]
    lines += [
        "",
        "Latency in milliseconds per call (a call processes `batch` images) over every timed call: nothing is "
        "trimmed, so slow calls count in mean, p99 and max. FPS = 1000 / mean at batch 1; img/s = batch × 1000 / "
        "mean. `calls` = timed + warm-up (`w`); the first warm-up call is `first ms`. `peak RSS` is the process-wide "
        "high-water mark so far (earlier rows included). `load 1m`: the system's 1-minute load average when the row "
        "ended; above the core count, other processes competed for the CPU during that row. `× torch` = PyTorch "
        "eager mean / this mean on the same device. Parity: detections matched order-free against PyTorch on the "
        "same input (fraction matched, largest box and score difference among matched)."
        + (" AP: COCO AP@[.50:.95], AP50: AP@.50, of the row's own runtime on the dataset named above (random "
           "weights say so: their AP measures nothing)." if accuracy else "")
        + (" --vit rows: `model` is the model's name (`size` in the JSON and CSV); `× torch` and parity compare "
           "with transformers' eager model (the folder given), else parity compares with the ONNX Runtime row: the "
           "largest absolute difference over the graph's outputs on the same pixel_values (✗ above the exporter's "
           "tolerance, 1e-4 + 1e-4 × max |reference|). predict mode: Runtime.predict on a 640x480 image, the torch "
           "row graph only." if vit
           else ""),
        "",
    ]
    if data.get("choice"):
        lines += _choice_lines(data["choice"])
    return "\n".join(lines)


def _row_name(entry: dict[str, Any]) -> str:
    ran = entry["executed_precision"]
    return f"{entry['backend']} {entry['precision']}" + (f" (ran {ran})" if ran != entry["precision"] else "")


def _choice_lines(choice: list[dict[str, Any]]) -> list[str]:
    """--max-ap-drop: the fastest row within the AP budget, per size and batch (see benchmarks/choice.py)."""
    budget = choice[0]["max_ap_drop"]
    lines = [f"## Fastest within {budget:g} AP points of FP32 (--max-ap-drop)", ""]
    for entry in choice:
        head = f"- {entry['size']} batch {entry['batch']}: "
        if entry.get("error"):
            lines.append(head + f"no choice: {entry['error']}")
            continue
        chosen, ref = entry["chosen"], entry["reference"]
        drop = chosen["ap_drop"]
        versus = (f"{drop:.1f} points below" if drop >= 0.05 else f"{-drop:.1f} points above" if drop <= -0.05
                  else "equal to")
        lines.append(head + f"**{_row_name(chosen)}**, {_num(chosen['ms_per_image'])} ms per image, AP "
                     f"{chosen['AP']:.3f} ({versus} FP32's {ref['AP']:.3f} of {_row_name(ref)}, "
                     f"{_num(ref['ms_per_image'])} ms): {chosen['speedup_vs_reference']:.2f}x")
        for r in entry["faster_over_budget"]:
            lines.append(f"  - faster but over the budget: {_row_name(r)}, {_num(r['ms_per_image'])} ms, AP drop "
                         f"{r['ap_drop']:.1f} points")
    return [*lines, ""]


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
    out.update({k: row.get(k) for k in _ROW_SCALARS})
    lat = row.get("latency_ms") or {}
    out.update({f"{k}_ms": lat.get(k) for k in STAT_KEYS})
    out.update({k: row.get(k) for k in ("fps", "throughput_ips", "rss_mb", "peak_rss_mb", "load_1m",
                                        "speedup_vs_torch")})
    parity = row.get("parity") or {}
    out.update({"parity_ok": parity.get("ok"), "parity_matched_fraction": parity.get("matched_fraction"),
                "parity_max_box_diff": parity.get("max_box_diff"),
                "parity_max_score_diff": parity.get("max_score_diff"),
                "parity_max_abs_diff": parity.get("max_abs_diff")})
    stages = row.get("stages_ms") or {}
    for s in _STAGES:
        out[f"{s}_mean_ms"] = stages.get(s, {}).get("mean")
        out[f"{s}_p99_ms"] = stages.get(s, {}).get("p99")
    acc = row.get("accuracy") or {}
    out.update({k: acc.get(k) for k in ("AP", "AP50", "AP75")})
    out["accuracy_images"] = acc.get("images")
    notes = (["random weights"] if acc.get("random_weights") else []) + ([_accuracy_note(row)] if acc else [])
    out["accuracy_note"] = "; ".join(n for n in notes if n) or None
    return out


def to_csv(result: BenchResult | dict[str, Any]) -> str:
    """One line per row, columns `CSV_FIELDS` (empty where a value does not apply)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in _data(result)["rows"]:
        writer.writerow({k: ("" if v is None else v) for k, v in _flat(row).items()})
    return buf.getvalue()


def write_markdown(result: BenchResult | dict[str, Any], path: str | os.PathLike, title: str = "DEIMv2 latency"
                   ) -> Path:
    return write_text(path, to_markdown(result, title))


def write_csv(result: BenchResult | dict[str, Any], path: str | os.PathLike) -> Path:
    return write_text(path, to_csv(result))


def write_json(result: BenchResult | dict[str, Any], path: str | os.PathLike) -> Path:
    return write_text(path, json.dumps(_data(result), indent=1, allow_nan=True) + "\n")


# --- plot ------------------------------------------------------------------------------------------------
def write_plot(result: BenchResult | dict[str, Any], path: str | os.PathLike) -> Path:
    """Latency across sizes per backend (mean, bars p50..p99), and published COCO AP against measured latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import FuncFormatter

    data = _data(result)
    if data["config"].get("vit"):
        raise ValueError("the plot compares DEIMv2 sizes (and their published AP); a --vit run has one model: use "
                         "the table, --csv or --output")
    rows = [r for r in data["rows"] if r["status"] == "ok" and r.get("latency_ms")]
    if not rows:
        raise ValueError("no timed rows to plot (all rows were skipped or failed)")
    sizes = [s for s in VARIANT_NAMES if any(r["size"] == s for r in rows)]
    series: dict[tuple[str, str, int, str], dict[str, dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["backend"], r["precision"], r["batch"], r["tier"]), {})[r["size"]] = r

    fig, (ax_lat, ax_ap) = plt.subplots(1, 2, figsize=(13, 5.2))
    offsets = np.linspace(-0.12, 0.12, len(series)) if len(series) > 1 else [0.0]
    fastest: dict[str, float] = {}  # size -> lowest latency per image over the series
    for offset, ((backend, precision, batch, tier), by_size) in zip(offsets, sorted(series.items()), strict=True):
        present = [s for s in sizes if s in by_size]
        xs = np.array([sizes.index(s) for s in present]) + offset
        lat = [by_size[s]["latency_ms"] for s in present]
        label = f"{backend} {precision}" + (f" b{batch}" if batch != 1 else "") + f" ({tier})"
        (line,) = ax_lat.plot(xs, [v["mean"] for v in lat], marker="o", label=label)
        ax_lat.vlines(xs, [v["p50"] for v in lat], [v["p99"] for v in lat], color=line.get_color(), alpha=0.6)
        ax_lat.plot(xs, [v["p99"] for v in lat], "_", color=line.get_color(), markersize=10)
        aps = [(by_size[s]["latency_ms"]["mean"] / by_size[s]["batch"], get_variant_info(s).published_ap, s)
               for s in present]
        ax_ap.plot([a[0] for a in aps], [a[1] for a in aps], marker="o", color=line.get_color(), label=label)
        for x, _, s in aps:
            fastest[s] = min(fastest.get(s, x), x)
    for s, x in fastest.items():  # one label per size, left of its fastest point
        ax_ap.annotate(s, (x, get_variant_info(s).published_ap), textcoords="offset points", xytext=(-8, 0),
                       ha="right", va="center", fontsize=8)
    ax_lat.set_xticks(range(len(sizes)), sizes)
    ax_lat.set_yscale("log")
    ax_lat.set_xlabel("DEIMv2 size")
    ax_lat.set_ylabel("latency per call, ms (dot: mean; bar: p50 to p99; log)")
    for axis in (ax_lat.yaxis, ax_ap.xaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "25" else ""))
    ax_lat.set_title("Measured latency")
    ax_lat.grid(True, which="both", alpha=0.3)
    ax_lat.legend(fontsize=8)
    ax_ap.set_xscale("log")
    ax_ap.set_xlabel("measured latency per image, ms (mean; log)")
    ax_ap.set_ylabel("published AP, COCO val2017 (official README)")
    ax_ap.set_title("published AP vs latency measured here")
    ax_ap.grid(True, which="both", alpha=0.3)
    ax_ap.legend(fontsize=8)
    cfg, cpu = data["config"], data["system"]["cpu"]
    devices = ", ".join(sorted({f"{r['tier']}: {r['device_name']}" for r in rows}))
    weights = _weights_label(cfg, "random weights (latency only)")
    fig.suptitle(f"DEIMv2 {cfg['mode']} latency · {devices} · {_threads(cfg['threads'])} · {weights}\n"
                 f"{cpu['usable_cores']} usable cores; 1-min load average {_load(data['system'].get('load_average'))}"
                 f" at start, {_load(data['system'].get('load_average_end'))} at end; {data['created_utc']}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path
