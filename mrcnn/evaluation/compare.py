"""Two models' COCO metrics on the same data: B − A, overall and per class.

    difference = ap_difference(result_a.to_dict(), result_b.to_dict())
    difference["bbox"]["AP"], difference["per_class"]["circle"]["segm_AP50"]   # None: no number to compare

Used by the Evaluate page's "Compare with" and `python -m mrcnn evaluate --compare MODEL`.
"""
from __future__ import annotations

from mrcnn.evaluation.evaluate import IOU_TYPES, METRIC_KEYS

PER_CLASS_KEYS = tuple(f"{t}_{m}" for t in IOU_TYPES for m in ("AP", "AP50"))


def _minus(a: float | None, b: float | None) -> float | None:
    # COCO reports -1 where a metric has no ground truth in its range: nothing to compare there
    if a is None or b is None or a < 0 or b < 0:
        return None
    return round(float(b) - float(a), 6)


def ap_difference(a: dict, b: dict) -> dict:
    """B − A of two evaluations (``EvalResult.to_dict()`` or the CLI's JSON): {"bbox": {metric: d},
    "segm": {...}, "per_class": {class: {"bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50"}}}, classes in
    A's order then B's others. ``d`` is None where either side has no number: -1 (no ground truth in
    range), or a class only one of them was measured on."""
    out: dict = {t: {m: _minus(a[t].get(m), b[t].get(m)) for m in METRIC_KEYS} for t in IOU_TYPES}
    per_a, per_b = a.get("per_class", {}), b.get("per_class", {})
    out["per_class"] = {
        name: {k: _minus(per_a.get(name, {}).get(k), per_b.get(name, {}).get(k)) for k in PER_CLASS_KEYS}
        for name in dict.fromkeys([*per_a, *per_b])}
    return out


__all__ = ["ap_difference", "PER_CLASS_KEYS"]
