"""Tables of the Evaluate and Fine-tune pages: metrics, with one naming scheme for their headers, and the
dataset report of what a dataset check skipped.

COCO's iou types are shown as what they measure: "bbox" -> "box", "segm" -> "mask"; a metric is
"<box|mask> <COCO metric>", e.g. "box AP", "mask AP50". mrcnn.evaluation.evaluate's per-class keys
("bbox_AP50") become those names here and nowhere else.
"""
from __future__ import annotations

import pandas as pd
import streamlit as st

from mrcnn.evaluation.evaluate import IOU_TYPES, METRIC_KEYS

IOU_TYPE_NAMES = {"bbox": "box", "segm": "mask"}


def metric_label(iou_type: str, metric: str) -> str:
    """("bbox", "AP50") -> "box AP50"."""
    return f"{IOU_TYPE_NAMES[iou_type]} {metric}"


def summary_table(result: dict) -> pd.DataFrame:
    """One row per iou type ("box", "mask"), one column per COCO metric (AP, AP50, ... APl)."""
    return pd.DataFrame({IOU_TYPE_NAMES[t]: {m: result[t][m] for m in METRIC_KEYS} for t in IOU_TYPES}).T


def per_class_table(per_class: dict[str, dict[str, float]]) -> pd.DataFrame:
    """One row per class; columns "box AP", "box AP50", "mask AP", "mask AP50" from evaluate's
    ``per_class`` ({"bbox_AP": ..., "segm_AP50": ...})."""
    columns = {f"{t}_{m}": metric_label(t, m) for t in IOU_TYPES for m in ("AP", "AP50")}
    table = pd.DataFrame(per_class).T
    return table.reindex(columns=[c for c in columns if c in table.columns]).rename(columns=columns)


def dataset_report(skipped: list[str], notes: list[str] = (), shown: int = 200) -> None:
    """A dataset check's annotations skipped (why, one line each) and notes on how it was read (an EXIF
    orientation), in a folded report."""
    if not skipped and not notes:
        return
    counts = [f"{len(skipped)} annotation{'' if len(skipped) == 1 else 's'} skipped"] if skipped else []
    counts += [f"{len(notes)} note{'' if len(notes) == 1 else 's'}"] if notes else []
    lines = [*notes, *skipped]
    with st.expander(f"Dataset report: {', '.join(counts)}", icon=":material/report:"):
        st.markdown("\n".join(f"- {line}" for line in lines[:shown])
                    + (f"\n- … and {len(lines) - shown} more" if len(lines) > shown else ""))
