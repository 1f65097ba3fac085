"""deimv2-bench --max-ap-drop: the fastest row whose measured AP stays within the user's accuracy budget.

The precision policy (`deimv2_deploy.precision`) picks bf16 or f32 from what the CPU can do; whether INT8, FP16 or
bf16 is worth its accuracy cost can only be answered by measuring, on the user's data. A --accuracy run measures
both latency and AP for every row, so the choice is made here, per size and batch, from those measurements:

    reference  the best AP among rows that ran exact FP32 (precision fp32, executed fp32) of that size and batch
    candidates the rows that ran and have an AP, whose drop below the reference is <= the budget (AP points)
    chosen     the candidate with the lowest mean latency per image

The budget is in AP points (COCO AP x 100), as published tables quote it: `--max-ap-drop 0.5` allows AP 53.0 ->
52.5. Random weights measure nothing, so no choice is made for them. Faster rows over the budget are listed with
their drop, so the cost of the budget is visible.
"""
from __future__ import annotations

from typing import Any

__all__ = ["choose_within_budget"]


def _ms_per_image(row: dict[str, Any]) -> float:
    return row["latency_ms"]["mean"] / row["batch"]


def _label(row: dict[str, Any]) -> dict[str, Any]:
    acc = row["accuracy"]
    return {"backend": row["backend"], "precision": row["precision"],
            "executed_precision": row.get("executed_precision") or row["precision"],
            "ms_per_image": round(_ms_per_image(row), 3), "AP": acc["AP"], "artifact": row.get("artifact")}


def _drop_points(row: dict[str, Any], reference_ap: float) -> float:
    return round((reference_ap - row["accuracy"]["AP"]) * 100, 3)


def _exact_fp32(row: dict[str, Any]) -> bool:
    return row["precision"] == "fp32" and (row.get("executed_precision") or "fp32") == "fp32"


def choose_within_budget(rows: list[dict[str, Any]], max_ap_drop: float) -> list[dict[str, Any]]:
    """One entry per (size, batch) of `rows` (BenchRow.to_dict() dicts): the chosen row, the FP32 reference, the
    faster rows the budget ruled out, or `error` saying why no choice could be made."""
    if max_ap_drop < 0:
        raise ValueError(f"max_ap_drop is in AP points and cannot be negative, got {max_ap_drop}")
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["size"], row["batch"]), []).append(row)
    return [{"size": size, "batch": batch, "max_ap_drop": max_ap_drop, **_choose(group, max_ap_drop)}
            for (size, batch), group in groups.items()]


def _choose(group: list[dict[str, Any]], max_ap_drop: float) -> dict[str, Any]:
    measured = [r for r in group if r["status"] == "ok" and r.get("latency_ms")
                and (r.get("accuracy") or {}).get("AP") is not None]
    if any((r.get("accuracy") or {}).get("random_weights") for r in measured):
        return {"error": "random weights: their AP measures nothing, so no precision is chosen"}
    references = [r for r in measured if _exact_fp32(r)]
    if not references:
        return {"error": "no FP32 row with an AP to measure the drop from: add fp32 to --precision"}
    reference = max(references, key=lambda r: r["accuracy"]["AP"])
    drops = [_drop_points(r, reference["accuracy"]["AP"]) for r in measured]
    within = [r for r, d in zip(measured, drops, strict=True) if d <= max_ap_drop]
    chosen = min(within, key=_ms_per_image)  # the reference itself is always within the budget
    over = sorted(((r, d) for r, d in zip(measured, drops, strict=True)
                   if d > max_ap_drop and _ms_per_image(r) < _ms_per_image(chosen)),
                  key=lambda pair: _ms_per_image(pair[0]))
    return {"reference": _label(reference),
            "chosen": {**_label(chosen), "ap_drop": _drop_points(chosen, reference["accuracy"]["AP"]),
                       "speedup_vs_reference": round(_ms_per_image(reference) / _ms_per_image(chosen), 3)},
            "faster_over_budget": [{**_label(r), "ap_drop": d} for r, d in over]}
