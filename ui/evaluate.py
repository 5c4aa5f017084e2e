"""Evaluate page: COCO AP of a model on a dataset, PR curves, confusion matrix, and a per-image browser
that says, for every missed object, which stage of the network lost it.

UI only: the metrics come from mrcnn.evaluation.evaluate, the reasons from mrcnn.evaluation.diagnose.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from mrcnn.evaluation.diagnose import confusion_matrix, explain_trace_misses, match_detections
from mrcnn.inference.draw import draw_boxes
from mrcnn.errors import MrcnnError
from mrcnn.inference.structures import Detections, Thresholds
from mrcnn.inference.trace import run_trace
from ui.state import get_model, model_infos

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TP_COLOR, FP_COLOR, MISS_COLOR = (40, 200, 60), (230, 40, 40), (250, 200, 0)


def pr_figure(pr_curves: dict, iou_type: str) -> go.Figure:
    fig = go.Figure()
    for cls, curve in pr_curves.get(iou_type, {}).items():
        fig.add_trace(go.Scatter(x=curve["recall"], y=curve["precision"], mode="lines", name=cls))
    fig.update_layout(height=340, margin={"l": 10, "r": 10, "t": 30, "b": 10}, xaxis_title="recall",
                      yaxis_title="precision", xaxis_range=[0, 1], yaxis_range=[0, 1.02],
                      title=f"{'box' if iou_type == 'bbox' else 'mask'} precision–recall at IoU 0.5")
    return fig


def confusion_figure(cm: np.ndarray, names: list[str]) -> go.Figure:
    labels = ["background / missed"] + names[1:]
    fig = go.Figure(go.Heatmap(z=cm, x=labels, y=labels, colorscale="Blues", text=cm, texttemplate="%{text}",
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{z}<extra></extra>"))
    fig.update_layout(height=380, margin={"l": 10, "r": 10, "t": 30, "b": 10}, xaxis_title="predicted",
                      yaxis_title="true", yaxis_autorange="reversed")
    return fig


def _dataset_picker(loaded):
    """The generated validation set (shapes models) or an uploaded COCO .zip -> a dataset folder."""
    from mrcnn.data.shapes import SHAPE_NAMES

    known_shapes = [c for c in loaded.categories[1:] if c in SHAPE_NAMES]
    options = (["Generated shapes scenes"] if known_shapes else []) + ["Upload a COCO .zip"]
    source = st.radio("Dataset", options, horizontal=True, key="ev_source")
    if source.startswith("Generated"):
        c1, c2, c3 = st.columns(3)
        num = c1.number_input("Scenes", 5, 1000, 50, key="ev_num")
        seed = c2.number_input("Seed", 0, 10**6, 12345, key="ev_seed")
        size = c3.select_slider("Size", [128, 192, 256, 384, 512], 256, key="ev_size")
        return ("shapes", int(num), int(seed), int(size), tuple(known_shapes))
    upload = st.file_uploader("COCO dataset (.zip with annotations.json and images/)", type=["zip"], key="ev_upload")
    if upload is None:
        return None
    return ("zip", upload.name, upload.getvalue())


@st.cache_resource(show_spinner=False, max_entries=4)
def _dataset_dir(spec: tuple) -> str:
    """Materialise a dataset spec as a COCO folder (cached: the same spec is written once)."""
    folder = Path(tempfile.mkdtemp(prefix="mrcnn-eval-"))
    if spec[0] == "shapes":
        from mrcnn.data.shapes import write_dataset

        _, num, seed, size, classes = spec
        write_dataset(folder, num, seed=seed, size=size, classes=classes)
        return str(folder)
    from mrcnn.data.coco import safe_extract_zip

    zip_path = folder / spec[1]
    zip_path.write_bytes(spec[2])
    return str(safe_extract_zip(zip_path, folder / "data"))


def _run(loaded, spec) -> None:
    from mrcnn.data.coco import load_dataset
    from mrcnn.evaluation.evaluate import evaluate

    bar = st.progress(0.0, text="Preparing the dataset…")
    try:
        root = _dataset_dir(spec)
        dataset = load_dataset(root)
        result = evaluate(loaded, dataset, progress=lambda d, t: bar.progress(d / max(t, 1),
                                                                              text=f"Evaluating image {d}/{t}"))
    except MrcnnError as err:
        bar.empty()
        st.error(str(err))
        return
    bar.empty()
    st.session_state["ev_result"] = {"model": loaded.name, "root": root, "result": result.to_dict()}


def _metrics_tables(result: dict) -> None:
    table = pd.DataFrame({("box" if k == "bbox" else "mask"): {m: result[k][m] for m in METRIC_KEYS}
                          for k in ("bbox", "segm")}).T
    st.dataframe(table.style.format("{:.3f}"))
    per_class = result.get("per_class", {})
    if per_class:
        st.caption("Per class")
        st.dataframe(pd.DataFrame(per_class).T.rename(columns={"bbox_AP": "box AP", "segm_AP": "mask AP"})
                     .style.format("{:.3f}"))


def _gt_of(dataset, i: int, model_categories: list[str]):
    """Ground truth of image i with labels as the model's class indices (-1 for classes it lacks)."""
    _, target = dataset[i]
    names = [dataset.categories[int(lbl)] for lbl in target["labels"]]
    labels = np.array([model_categories.index(n) if n in model_categories else -1 for n in names], np.int64)
    return target["boxes"].numpy().reshape(-1, 4), labels, names


def _predictions_as_detections(pred: dict, categories: list[str], size) -> Detections:
    boxes = np.asarray(pred["boxes"], np.float32).reshape(-1, 4)
    labels = np.array([categories.index(n) if n in categories else 0 for n in pred["labels"]], np.int64) \
        if pred["labels"] and isinstance(pred["labels"][0], str) else np.asarray(pred["labels"], np.int64)
    return Detections(boxes, np.asarray(pred["scores"], np.float32), labels, None,
                      np.full(len(boxes), -1, np.int64), categories, size)


def _confusion(result: dict, dataset, loaded, score_thresh: float) -> None:
    per_image = []
    for i, pred in enumerate(result.get("predictions", [])):
        boxes, labels, _ = _gt_of(dataset, i, loaded.categories)
        dets = _predictions_as_detections(pred, loaded.categories, (0, 0))
        keep = dets.scores > score_thresh
        per_image.append((dets[keep], boxes[labels >= 0], labels[labels >= 0]))
    if per_image:
        cm = confusion_matrix(per_image, loaded.num_classes)
        st.plotly_chart(confusion_figure(cm, loaded.categories), key="ev_cm")


def _browser(loaded, dataset, score_thresh: float) -> None:
    st.subheader("Per-image browser")
    st.caption("Green: correct detections · red: false positives · yellow: missed objects, with the reason "
               "taken from the trace.")
    n = len(dataset)
    idx = st.slider("Image", 0, max(n - 1, 0), 0, key="ev_img") if n > 1 else 0
    image, _ = dataset[idx]
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    gt_boxes, gt_labels, gt_names = _gt_of(dataset, idx, loaded.categories)
    key = ("ev_trace", loaded.name, loaded.sha256, idx)
    trace = st.session_state.get("ev_trace_cache", {}).get(key)
    if trace is None:
        trace = run_trace(loaded, array, Thresholds(score_thresh=score_thresh))
        st.session_state["ev_trace_cache"] = {key: trace}  # one image at a time: traces are large
    dets = trace.refilter(trace.thresholds.replace(score_thresh=score_thresh))
    known = gt_labels >= 0
    match = match_detections(dets, gt_boxes[known], gt_labels[known])
    reasons = explain_trace_misses(trace, gt_boxes[known], gt_labels[known])
    canvas = array
    if len(dets):
        colors = [TP_COLOR if tp else FP_COLOR for tp in match.det_tp]
        canvas = draw_boxes(canvas, dets.boxes, colors, width=2,
                            labels=[f"{n} {s:.2f}" for n, s in zip(dets.label_names, dets.scores)])
    missed_boxes = gt_boxes[known][match.missed]
    if len(missed_boxes):
        canvas = draw_boxes(canvas, missed_boxes, [MISS_COLOR] * len(missed_boxes), width=3,
                            labels=[f"missed {r.label}" for r in reasons])
    c1, c2 = st.columns([3, 2])
    c1.image(canvas, caption=f"{int(match.det_tp.sum())} correct, {int((~match.det_tp).sum())} false positives, "
                             f"{len(match.missed)} missed")
    with c2:
        if reasons:
            st.dataframe(pd.DataFrame([{"object": r.label, "why it was missed": r.message} for r in reasons]),
                         hide_index=True)
        else:
            st.write("Nothing missed in this image.")
        lacking = [n for n, k in zip(gt_names, known) if not k]
        if lacking:
            st.caption(f"{len(lacking)} objects of classes the model does not have: {', '.join(sorted(set(lacking)))}")


st.header("Evaluate")
st.caption("COCO box and mask AP of a model on a dataset — and, for every object it missed, why.")
models = [m.name for m in model_infos() if m.available]
if not models:
    st.warning("No model is available. See the sidebar for how to get one.")
    st.stop()
default = st.session_state.get("model_name")
name = st.selectbox("Model", models, index=models.index(default) if default in models else 0, key="ev_model")
try:
    loaded = get_model(name, st.session_state.get("device", "auto"))
except MrcnnError as err:
    st.error(str(err))
    st.stop()
spec = _dataset_picker(loaded)
if spec is not None and st.button("Evaluate", type="primary", key="ev_go"):
    _run(loaded, spec)

state = st.session_state.get("ev_result")
if state and state["model"] == loaded.name:
    from mrcnn.data.coco import load_dataset

    result = state["result"]
    _metrics_tables(result)
    c1, c2 = st.columns(2)
    c1.plotly_chart(pr_figure(result.get("pr_curves", {}), "bbox"), key="ev_pr_box")
    c2.plotly_chart(pr_figure(result.get("pr_curves", {}), "segm"), key="ev_pr_mask")
    score = st.slider("Score threshold for the confusion matrix and the browser", 0.05, 0.95, 0.5, 0.05,
                      key="ev_score")
    dataset = load_dataset(state["root"])
    st.subheader("Confusion matrix")
    _confusion(result, dataset, loaded, score)
    _browser(loaded, dataset, score)
