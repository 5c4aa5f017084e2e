"""Detect's "Compare with": a second model on the same image, side by side with the sidebar's model.

Model A is the sidebar's, model B the one picked here. Both are filtered at the same thresholds (a
per-class threshold applies to B only where B has that class) and class filter, and their detections
are matched one to one (``mrcnn.inference.compare``: same class, box IoU >= 0.5). B's trace lives in
the session's trace cache like A's (``state.trace_for``), so a control change re-filters both and
runs neither network again. Drawn inside Detect's results fragment.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from mrcnn.errors import MrcnnError
from mrcnn.inference.compare import COUNT_COLUMNS, Comparison, compare_detections, counts_by_class
from mrcnn.inference.draw import draw_boxes, draw_detections
from mrcnn.inference.structures import Detections, Thresholds
from ui import sidebar, state

ONLY_ONE_COLOR = (255, 0, 255)  # magenta: found by one model only, drawn thick over the usual overlay


def comparison_table(comparison: Comparison, a: Detections, b: Detections) -> pd.DataFrame:
    """Matched / only A / only B: one row for all classes, then one per class."""
    rows = {"all classes": comparison.counts, **counts_by_class(comparison, a, b)}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(COUNT_COLUMNS))
    table.index.name = "class"
    return table


def picture(image: np.ndarray, dets: Detections, only: np.ndarray) -> np.ndarray:
    """The page's overlay of ``dets`` with the detections at ``only`` boxed thick in magenta."""
    out = draw_detections(image, dets, **state.display_settings())
    if len(only):
        width = max(3, round(min(image.shape[:2]) / 150))
        out = draw_boxes(out, dets.boxes[only], ONLY_ONE_COLOR, width=width)
    return out


def thresholds_for(thresholds: Thresholds, categories: list[str]) -> Thresholds:
    """A's thresholds for model B: per-class thresholds of classes B lacks are dropped."""
    return thresholds.replace(class_thresh={c: v for c, v in thresholds.class_thresh if c in categories})


def _picker(infos: dict) -> str | None:
    state.keep_model_pick("compare_with", infos)  # the pick comes back after the sidebar visits that model
    return st.selectbox("Compare with", [None, *infos], key="compare_with", persist_state="session",
                        on_change=state.remember_pick, args=("compare_with",),
                        format_func=lambda n: "none" if n is None else sidebar.model_label(infos[n]),
                        help="A second model on the same image, at the same thresholds: its detections are "
                             "matched one to one to this model's (same class, box IoU ≥ 0.5)")


def section(loaded, entry: state.ImageEntry, dets: Detections, thresholds: Thresholds,
            class_filter: list[str]) -> None:
    """The "Compare with" picker and, when a model is picked, the two pictures and the counts.
    ``dets``: the sidebar model's detections as the page shows them; ``class_filter``: the page's."""
    st.markdown("**Compare with another model**")
    infos = {i.name: i for i in state.model_infos() if i.available and i.name != loaded.name}
    name = _picker(infos)
    if name is None:
        return
    label = sidebar.model_label(infos[name])
    ss = st.session_state
    try:
        other = state.get_model(name, ss.get("device", "auto"), ss.get("precision", "auto"))
    except MrcnnError as err:
        st.error(f"Cannot compare with {state.literal(name)}: {state.literal(err)}", icon=":material/error:")
        return
    trace = state.safe_trace(other, entry)
    ran_ms = ss.pop("network_ran_ms", None)  # B's run: the page's timing line speaks of A's
    if trace is None:
        return
    other_dets = state.detections_for(trace, thresholds_for(thresholds, other.categories))[0].of_classes(class_filter)
    comparison = compare_detections(dets, other_dets)
    counts = comparison.counts
    left, right = st.columns(2)
    left.image(picture(entry.array, dets, comparison.only_a), width="stretch",
               caption=f"A: {loaded.name} — {len(dets)} detections, {counts['only A']} only here")
    right.image(picture(entry.array, other_dets, comparison.only_b), width="stretch",
                caption=f"B: {label} — {len(other_dets)} detections, {counts['only B']} only here")
    st.caption(f"{counts['matched']} matched (same class, box IoU ≥ 0.5) · magenta boxes: found by one model "
               "only · " + (f"B ran once for this image in {ran_ms:.0f} ms" if ran_ms is not None
                            else "neither network re-run"))
    st.dataframe(comparison_table(comparison, dets, other_dets), key="compare_table", width="stretch")
