"""Evaluate page: COCO AP of the sidebar's model on a dataset, PR curves, a second model's AP side by side
(B − A, per class too), what each error type costs (TIDE), confusion matrix, and a per-image browser (every
image, or only those with a miss, a false positive or one class taken for another) that says, for every
missed object, which stage of the network lost it.

UI only: the metrics come from mrcnn.evaluation.evaluate, the error costs from mrcnn.evaluation.error_costs,
the reasons from mrcnn.evaluation.diagnose.

What the page computed stays in the session as one ``Evaluation``: the dataset is scanned once (not
again on a rerun, nor when the same data is evaluated again), each image's boxes are gathered once
after the evaluation, and the views that depend on the score threshold are a fragment that redraws
from them without decoding an image or running the network (except the browser's one image, once).

Every result kept (the evaluation, model B's, the browser's trace) is keyed by what the network computes
with: model, weights, device and precision. After the sidebar's precision or device changes, the kept
tables stay, labelled with the ones that made them, until Evaluate measures again; then both are set side
by side. The network runs take the server's run slots a round at a time (one image per worker side by side:
ui/evaluation_bar.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from mrcnn.data import coco, shapes, uploads
from mrcnn.errors import MrcnnError
from mrcnn.evaluation import evaluate as coco_metrics
from mrcnn.evaluation.compare import ap_difference
from mrcnn.evaluation.diagnose import confusion_matrix, explain_trace_misses, match_detections
from mrcnn.evaluation.error_costs import ERROR_TYPES, error_costs_of
from mrcnn.inference.draw import draw_boxes
from mrcnn.inference.structures import Detections, Thresholds
from mrcnn.inference.trace import run_trace
from ui import sidebar, state, tables
from ui.evaluation_bar import IMAGES_PER_BATCH, EvaluationBar

TP_COLOR, FP_COLOR, MISS_COLOR = (40, 200, 60), (230, 40, 40), (250, 200, 0)
# Which images the per-image browser steps through, judged by the evaluation's own detections at the score
# threshold: what a person looks for after the error costs (the misses, the false positives); then one choice
# per class confusion the matrix shows ("true circle, predicted square").
SHOWN_IMAGES = ("every image", "with a miss", "with a false positive")
# The browser's picture is at least this wide where whole-number enlarging allows: a 256-px scene drawn at its
# own size had 10-px labels on top of each other; enlarged by repeating pixels it stays sharp.
BROWSER_PICTURE_PX = 512


# ---- what the page keeps --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetChoice:
    """What to evaluate on: generated scenes (``shapes``: num, seed, size, classes) or an uploaded zip."""

    name: str  # what messages call it; for an upload, the file's name as the user gave it (never a path)
    shapes: tuple | None = None
    zip_bytes: bytes | None = None
    kept_key: str | None = None  # an upload this session's last evaluation unpacked (its key)

    @property
    def key(self) -> str:
        """Made by the server (the settings, or the upload's sha256): equal keys are the same data."""
        if self.kept_key is not None:
            return self.kept_key
        if self.zip_bytes is None:
            return f"shapes:{self.shapes}"
        return "zip:" + hashlib.sha256(self.zip_bytes).hexdigest()


@dataclass
class ImageBoxes:
    """One image's predictions and ground truth as the confusion matrix needs them (labels: the model's
    class indices; ground truth of classes the model lacks is left out and named in ``lacking``)."""

    pred_boxes: np.ndarray  # float32 (P, 4) xyxy
    pred_scores: np.ndarray  # float32 (P,)
    pred_labels: np.ndarray  # int64 (P,)
    gt_boxes: np.ndarray  # float32 (G, 4) xyxy
    gt_labels: np.ndarray  # int64 (G,)
    lacking: list[str]  # class names of ground-truth objects the model has no class for


@dataclass
class Evaluation:
    """One evaluation the page shows, with the dataset it ran on. The dataset's files live in ``folder``
    (server-named), which is removed when a new evaluation replaces this one (or the session ends):
    one folder per session, however many uploads it makes."""

    model_key: tuple[str, str, str, str]  # LoadedModel.run_key: (name, sha256, device, precision)
    dataset_key: str
    dataset_name: str
    folder: uploads.TemporaryFolder
    dataset: coco.CocoDataset
    result: dict  # EvalResult.to_dict()
    images: list[ImageBoxes]
    error_costs: dict  # error_costs_of(result, dataset): {"bbox"|"segm": {error type: AP50 lost, ...}}
    # the same model on the same data under other settings, measured earlier in the session, to set beside
    # these numbers: _run_settings -> {"bbox": {metric: value}, "segm": {...}}
    other_settings: dict[str, dict] | None = None


def _run_settings(model_key: tuple[str, str, str, str]) -> str:
    """How a kept result's network ran, as its tables are labelled: "bfloat16, cpu"."""
    return f"{model_key[3]}, {model_key[2]}"


# ---- figures and tables ---------------------------------------------------------------------------------
def pr_figure(pr_curves: dict, iou_type: str) -> go.Figure:
    fig = go.Figure()
    for cls, curve in pr_curves.get(iou_type, {}).items():
        fig.add_trace(go.Scatter(x=curve["recall"], y=curve["precision"], mode="lines", name=cls))
    fig.update_layout(height=340, margin={"l": 10, "r": 10, "t": 30, "b": 10}, xaxis_title="recall",
                      yaxis_title="precision", xaxis_range=[0, 1], yaxis_range=[0, 1.02],
                      title=f"{tables.IOU_TYPE_NAMES[iou_type]} precision–recall at IoU 0.5")
    return fig


def confusion_figure(cm: np.ndarray, names: list[str]) -> go.Figure:
    labels = ["background / missed"] + names[1:]
    fig = go.Figure(go.Heatmap(z=cm, x=labels, y=labels, colorscale="Blues", text=cm, texttemplate="%{text}",
                               hovertemplate="true %{y}<br>predicted %{x}<br>%{z}<extra></extra>"))
    fig.update_layout(height=380, margin={"l": 10, "r": 10, "t": 30, "b": 10}, xaxis_title="predicted",
                      yaxis_title="true", yaxis_autorange="reversed")
    return fig


def error_costs_table(costs: dict) -> pd.DataFrame:
    """AP50 lost to each error type (rows), for boxes and masks (columns), with how many errors each is."""
    rows = {}
    for error_type in ERROR_TYPES:
        row = {}
        for iou_type in ("bbox", "segm"):
            name = tables.IOU_TYPE_NAMES[iou_type]
            row[name] = costs[iou_type][error_type]
            row[f"{name} errors"] = costs[iou_type]["counts"][error_type]
        rows[error_type] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "error type"
    return table


def error_costs_figure(costs: dict) -> go.Figure:
    fig = go.Figure([go.Bar(name=tables.IOU_TYPE_NAMES[iou_type], x=list(ERROR_TYPES),
                            y=[costs[iou_type][t] for t in ERROR_TYPES]) for iou_type in ("bbox", "segm")])
    fig.update_layout(height=320, margin={"l": 10, "r": 10, "t": 30, "b": 10}, barmode="group",
                      yaxis_title="AP50 gained by fixing it", title="What each error costs")
    return fig


def _error_costs(evaluation: Evaluation) -> None:
    st.subheader("What each error costs")
    costs = evaluation.error_costs
    st.caption(f"AP50 gained by fixing only the errors of one type, as TIDE (Bolya et al., ECCV 2020) measures it "
               f"(box AP50 {costs['bbox']['AP50']:.3f}, mask AP50 {costs['segm']['AP50']:.3f}). "
               "Classification: right place, wrong class · localisation: right class, IoU 0.1–0.5 · both: wrong "
               "class and IoU 0.1–0.5 · duplicate: an object already found · background: IoU < 0.1 with every "
               "object · missed: objects nothing found — [why each one was missed: per-image browser]"
               "(#per-image-browser).")
    c1, c2 = st.columns([3, 2])
    c1.plotly_chart(error_costs_figure(costs), key="ev_error_costs")
    names = [tables.IOU_TYPE_NAMES[t] for t in ("bbox", "segm")]
    c2.dataframe(error_costs_table(costs).style.format("{:.3f}", subset=names))


def _metrics_tables(result: dict) -> None:
    st.dataframe(tables.summary_table(result).style.format("{:.3f}"))
    per_class = result.get("per_class", {})
    if per_class:
        st.caption("Per class")
        st.dataframe(tables.per_class_table(per_class).style.format("{:.3f}"))
    _classes_not_in_model(st, result)


def settings_table(evaluation: Evaluation) -> pd.DataFrame:
    """AP and AP50 of these numbers' precision and device (first) and of the others measured on the same data."""
    rows = {_run_settings(evaluation.model_key): evaluation.result, **evaluation.other_settings}
    table = pd.DataFrame({settings: {tables.metric_label(t, m): result[t][m] for t in ("bbox", "segm")
                                     for m in ("AP", "AP50")} for settings, result in rows.items()}).T
    table.index.name = "precision, device"
    return table


def _other_settings(evaluation: Evaluation) -> None:
    if evaluation.other_settings:
        st.caption("The same weights on the same data in other precisions or devices, measured earlier in this "
                   "session")
        st.dataframe(settings_table(evaluation).style.format("{:.3f}"))


def _classes_not_in_model(where, result: dict) -> None:
    """The dataset's classes the model cannot predict: they have no row (not a measured AP 0)."""
    lacking = result.get("classes_not_in_model") or []
    if lacking:
        where.caption(f"Not classes of this model: {state.literal(', '.join(lacking))}. Their objects count as "
                      "missed in the overall numbers.")


# ---- a second model on the same data ---------------------------------------------------------------------
def _evaluate_other(other, evaluation: Evaluation) -> dict | None:
    """``other``'s metrics on the evaluation's dataset (already scanned: not again), or None with the reason."""
    name = state.literal(other.name)
    progress = EvaluationBar(f"Evaluating {name}…").model(other, f"{name}: image")
    try:
        with uploads.naming_upload(evaluation.dataset_name, evaluation.folder.path):
            return coco_metrics.evaluate(other, evaluation.dataset, keep_predictions=False, progress=progress.images,
                                         batch_size=IMAGES_PER_BATCH, run_slot=progress.run_slot).to_dict()
    except MrcnnError as err:
        st.error(state.literal(err))
        return None
    finally:
        progress.empty()


def _comparison(loaded, evaluation: Evaluation) -> None:
    """A second model (B) on the same dataset: both AP tables side by side and B − A, overall and per class.
    B's metrics are kept for the session, keyed by its weights and the dataset."""
    st.subheader("Compare with another model")
    infos = {i.name: i for i in state.model_infos() if i.available and i.name != loaded.name}
    options = [None, *infos]
    ss = st.session_state
    state.keep_model_pick("ev_compare_with", infos)
    name = st.selectbox("Model B, on the same data", options, key="ev_compare_with", persist_state="session",
                        on_change=state.remember_pick, args=("ev_compare_with",),
                        format_func=lambda n: "none" if n is None else sidebar.model_label(infos[n]),
                        help="Typical: the model before and after a fine-tune, or the bundled one against an "
                             "imported one")
    if name is None:
        return
    try:
        other = state.get_model(name, ss.get("device", "auto"), ss.get("precision", "auto"))
    except MrcnnError as err:
        st.error(state.literal(err))
        return
    key = (other.run_key, evaluation.dataset_key)
    kept = ss.get("ev_compare")
    if kept is None or kept[0] != key:
        if not st.button(f"Evaluate {name} on the same data", key="ev_compare_go"):
            return
        result = _evaluate_other(other, evaluation)
        if result is None:
            return
        kept = ss["ev_compare"] = (key, result)
    a, b = evaluation.result, kept[1]
    left, right = st.columns(2)
    summaries = tables.summary_table(a), tables.summary_table(b)
    per_class = tables.per_class_table(a.get("per_class", {})), tables.per_class_table(b.get("per_class", {}))
    for column, label, key_, k in ((left, "A", evaluation.model_key, 0), (right, "B", kept[0][0], 1)):
        column.caption(f"**{label}**: {state.literal(key_[0])} ({_run_settings(key_)})")
        column.dataframe(summaries[k].style.format("{:.3f}"))
        column.dataframe(per_class[k].style.format("{:.3f}"))
        _classes_not_in_model(column, (a, b)[k])
    st.caption("B − A (green: B is better; empty: no ground truth of that class, or only one model has it)")
    difference = ap_difference(a, b)
    for what, table in (("overall", tables.summary_table(difference)),
                        ("per class", tables.per_class_table(difference["per_class"]))):
        table.index.name = f"B − A {what}"
        st.dataframe(table.astype(float).style.format("{:+.3f}", na_rep="").map(_difference_color))


def _difference_color(value: float) -> str:
    if value != value or value == 0:  # NaN or no change
        return ""
    return "color: #1a9641" if value > 0 else "color: #d7191c"


# ---- the dataset and the evaluation ---------------------------------------------------------------------
def _dataset_picker(loaded) -> DatasetChoice | None:
    """The generated validation set (shapes models) or an uploaded COCO .zip."""
    known_shapes = [c for c in loaded.categories[1:] if c in shapes.SHAPE_NAMES]
    options = (["Generated shapes scenes"] if known_shapes else []) + ["Upload a COCO .zip"]
    state.keep_choice("ev_source", options, options[0])  # the model decides whether scenes are an option
    source = st.radio("Dataset", options, horizontal=True, key="ev_source", persist_state="session")
    if source.startswith("Generated"):
        c1, c2, c3 = st.columns(3)
        num = c1.number_input("Scenes", 5, 1000, 50, key="ev_num", persist_state="session")
        seed = c2.number_input("Seed", 0, 10**6, 12345, key="ev_seed", persist_state="session")
        size = c3.select_slider("Size", [128, 192, 256, 384, 512], 256, key="ev_size", persist_state="session")
        return DatasetChoice(f"{int(num)} generated scenes", shapes=(int(num), int(seed), int(size),
                                                                     tuple(known_shapes)))
    upload = st.file_uploader("COCO dataset (.zip with annotations.json and images/)", type=["zip"], key="ev_upload")
    if upload is not None:
        return DatasetChoice(upload.name, zip_bytes=upload.getvalue())
    # Streamlit's uploader forgets its file on a page switch; the zip the last evaluation unpacked is still here
    previous = st.session_state.get("ev_evaluation")
    if previous is None or not previous.dataset_key.startswith("zip:"):
        return None
    st.caption(f"Using **{state.literal(previous.dataset_name)}** ({len(previous.dataset)} images), evaluated earlier in this "
               "session; upload another file to replace it.")
    return DatasetChoice(previous.dataset_name, kept_key=previous.dataset_key)


def _open_dataset(choice: DatasetChoice, folder: uploads.TemporaryFolder) -> coco.CocoDataset:
    """Write or unpack the chosen data into ``folder`` and scan it. Messages name the upload as the
    user named it, never the server's folder."""
    if choice.zip_bytes is None:
        num, seed, size, classes = choice.shapes
        shapes.write_dataset(folder.path, num, seed=seed, size=size, classes=classes)
        root = folder.path
    else:
        root = uploads.unpack_dataset_zip(choice.zip_bytes, choice.name, folder.path)
    with uploads.naming_upload(choice.name, folder.path):
        return coco.load_dataset(root)


def image_boxes(result: dict, dataset: coco.CocoDataset, categories: list[str]) -> list[ImageBoxes]:
    """Each image's predictions and ground truth (from the annotations: no image or mask is decoded)."""
    out = []
    for i, pred in enumerate(result.get("predictions", [])):
        anns = dataset.annotations(i)
        names = [dataset.categories[dataset.cat_id_to_label[a.category_id]] for a in anns]
        known = np.array([n in categories for n in names], bool)
        gt_boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a.bbox for a in anns)],
                            np.float32).reshape(-1, 4)
        out.append(ImageBoxes(
            np.asarray(pred["boxes"], np.float32).reshape(-1, 4), np.asarray(pred["scores"], np.float32),
            np.array([categories.index(n) for n in pred["labels"]], np.int64),
            gt_boxes[known], np.array([categories.index(n) for n in names if n in categories], np.int64),
            [n for n, k in zip(names, known) if not k]))
    return out


def _run(loaded, choice: DatasetChoice) -> None:
    ss = st.session_state
    previous = ss.get("ev_evaluation")
    key = choice.key
    reuse = previous is not None and previous.dataset_key == key  # the same data: not written nor scanned again
    progress = EvaluationBar("Preparing the dataset…").model(loaded, "Evaluating image")
    folder = previous.folder if reuse else uploads.TemporaryFolder("mrcnn-eval-")
    try:
        dataset = previous.dataset if reuse else _open_dataset(choice, folder)
        with uploads.naming_upload(choice.name, folder.path):
            result = coco_metrics.evaluate(loaded, dataset, progress=progress.images,
                                           batch_size=IMAGES_PER_BATCH, run_slot=progress.run_slot).to_dict()
            progress.bar.progress(1.0, text="Measuring what each error costs…")
            costs = error_costs_of(result, dataset)
    except BaseException as err:
        progress.empty()
        if not reuse:
            folder.close()
        if not isinstance(err, MrcnnError):
            raise
        st.error(state.literal(err))
        return
    progress.empty()
    other_settings = {}
    if reuse and previous.model_key[:2] == loaded.run_key[:2]:  # the same weights, maybe another precision
        other_settings = {**(previous.other_settings or {}),
                          _run_settings(previous.model_key): {t: previous.result[t] for t in ("bbox", "segm")}}
        other_settings.pop(_run_settings(loaded.run_key), None)
    ss["ev_evaluation"] = Evaluation(loaded.run_key, key, choice.name, folder, dataset, result,
                                     image_boxes(result, dataset, loaded.categories), costs, other_settings)
    if previous is not None and not reuse:
        previous.folder.close()
    ss.pop("ev_browser", None)  # the browser's image and trace belong to the previous evaluation


# ---- views that follow the score threshold --------------------------------------------------------------
def _detections_above(im: ImageBoxes, categories: list[str], score_thresh: float) -> Detections:
    keep = im.pred_scores > score_thresh
    return Detections(im.pred_boxes[keep], im.pred_scores[keep], im.pred_labels[keep], None,
                      np.full(int(keep.sum()), -1, np.int64), categories, (0, 0))


def confusion_name(categories: list[str], true: int, predicted: int) -> str:
    return f"true {categories[true]}, predicted {categories[predicted]}"


def at_threshold(images: list[ImageBoxes], categories: list[str],
                 score_thresh: float) -> tuple[np.ndarray, dict[str, list[int]]]:
    """From the evaluation's own detections scoring above ``score_thresh`` (no image decoded, no network run),
    in one pass over the images: the confusion matrix, and what the per-image browser can step through, each
    with its image indices: SHOWN_IMAGES (misses and false positives as the browser matches detections: same
    class, IoU ≥ 0.5), then each class confusion of the matrix with the images that hold one."""
    total = np.zeros((len(categories), len(categories)), np.int64)
    choices: dict[str, list[int]] = {name: [] for name in SHOWN_IMAGES}
    confusions: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        dets = _detections_above(im, categories, score_thresh)
        match = match_detections(dets, im.gt_boxes, im.gt_labels)
        choices["every image"].append(i)
        if len(match.missed):
            choices["with a miss"].append(i)
        if not match.det_tp.all():
            choices["with a false positive"].append(i)
        cm = confusion_matrix([(dets, im.gt_boxes, im.gt_labels)], len(categories))  # images count apart
        total += cm
        for true, predicted in zip(*np.nonzero(cm)):
            if true and predicted and true != predicted:  # row and column 0 are misses and false positives
                confusions.setdefault((int(true), int(predicted)), []).append(i)
    for (true, predicted), indices in sorted(confusions.items()):
        choices[confusion_name(categories, true, predicted)] = indices
    return total, choices


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _browser_image(loaded, evaluation: Evaluation, idx: int, score_thresh: float):
    """(image array, trace) of one dataset image: decoded and run once, then kept for the session
    (one image at a time: traces are large)."""
    key = (loaded.run_key, evaluation.dataset_key, idx)
    kept = st.session_state.get("ev_browser")
    if kept is None or kept[0] != key:
        image, _ = evaluation.dataset[idx]
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        with state.network_slot(loaded, array.shape):  # a run like Detect's: in the server's slots and budget
            trace = run_trace(loaded, array, Thresholds(score_thresh=score_thresh))
        kept = (key, array, trace)
        st.session_state["ev_browser"] = kept
    return kept[1], kept[2]


def browser_picture(image: np.ndarray, dets: Detections, det_tp: np.ndarray, missed_boxes: np.ndarray,
                    missed_labels: list[str]) -> np.ndarray:
    """The image with its detections boxed green (correct) or red (false positive) and its missed objects
    yellow; a small image enlarged by a whole factor first (BROWSER_PICTURE_PX), so the labels stay legible."""
    scale = max(1, -(-BROWSER_PICTURE_PX // max(image.shape[:2])))
    canvas = image.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else image
    if len(dets):
        canvas = draw_boxes(canvas, dets.boxes * scale, [TP_COLOR if tp else FP_COLOR for tp in det_tp], width=2,
                            labels=[f"{n} {s:.2f}" for n, s in zip(dets.label_names, dets.scores)])
    if len(missed_boxes):
        canvas = draw_boxes(canvas, missed_boxes * scale, [MISS_COLOR] * len(missed_boxes), width=3,
                            labels=missed_labels)
    return canvas


def _browser(loaded, evaluation: Evaluation, score_thresh: float, choices: dict[str, list[int]]) -> None:
    st.subheader("Per-image browser", anchor="per-image-browser")  # "missed" in the error costs links here
    st.caption("Green: correct detections · red: false positives · yellow: missed objects, with the reason "
               "taken from the trace.")
    choices.setdefault(st.session_state.get("ev_show") or SHOWN_IMAGES[0], [])  # a confusion gone at this threshold
    show = st.selectbox("Show", list(choices), key="ev_show", persist_state="session",
                        format_func=lambda name: f"{name} ({_plural(len(choices[name]), 'image')})",
                        help="judged by the evaluation's detections above the score threshold; a class "
                             "confusion is a cell of the confusion matrix off its diagonal")
    indices = choices[show]
    if not indices:
        st.info(f"No image to show ({show}) at score threshold {score_thresh:.2f}.")
        return
    if len(indices) > 1:
        ss = st.session_state
        if ss.get("ev_img") not in indices:  # the next image the filter keeps, else its first
            ss["ev_img"] = next((i for i in indices if i >= (ss.get("ev_img") or 0)), indices[0])
        idx = st.select_slider("Image", indices, key="ev_img", persist_state="session",
                               help=f"{len(indices)} of the {len(evaluation.images)} images")
    else:
        idx = indices[0]
        st.caption(f"The one image to show ({show}): image {idx}")
    array, trace = _browser_image(loaded, evaluation, idx, score_thresh)
    truth = evaluation.images[idx]
    dets = trace.refilter(trace.thresholds.replace(score_thresh=score_thresh))
    match = match_detections(dets, truth.gt_boxes, truth.gt_labels)
    reasons = explain_trace_misses(trace, truth.gt_boxes, truth.gt_labels)
    canvas = browser_picture(array, dets, match.det_tp, truth.gt_boxes[match.missed],
                             [f"missed {r.label}" for r in reasons])
    c1, c2 = st.columns([3, 2])
    c1.image(canvas, caption=f"{evaluation.dataset.file_name(idx)}: {int(match.det_tp.sum())} correct, "
                             f"{_plural(int((~match.det_tp).sum()), 'false positive')}, {len(match.missed)} missed")
    with c2:
        if reasons:
            st.dataframe(pd.DataFrame([{"object": r.label, "why it was missed": r.message} for r in reasons]),
                         hide_index=True)
        else:
            st.write("Nothing missed in this image.")
        if truth.lacking:
            st.caption(f"{len(truth.lacking)} objects of classes the model does not have: "
                       f"{', '.join(sorted(set(truth.lacking)))}")


@st.fragment
def _threshold_views(loaded, evaluation: Evaluation) -> None:
    """Moving the threshold or the image redraws only this, from what the evaluation kept."""
    score = st.slider("Score threshold for the confusion matrix and the browser", 0.05, 0.95, 0.5, 0.05,
                      key="ev_score", persist_state="session")
    confusion, choices = at_threshold(evaluation.images, loaded.categories, score)
    st.subheader("Confusion matrix")
    if evaluation.images:
        st.plotly_chart(confusion_figure(confusion, loaded.categories), key="ev_cm")
    _browser(loaded, evaluation, score, choices)


def render() -> None:
    st.title("Evaluate")
    st.caption("COCO box and mask AP of the sidebar's model on a dataset — and, for every object it missed, why.")
    loaded = state.require_model()
    choice = _dataset_picker(loaded)
    if choice is not None and st.button("Evaluate", type="primary", key="ev_go"):
        _run(loaded, choice)
    evaluation = st.session_state.get("ev_evaluation")
    if evaluation is None or evaluation.model_key[:2] != loaded.run_key[:2]:  # another model, other weights
        return
    made_in = _run_settings(evaluation.model_key)
    st.caption(f"{state.literal(loaded.name)} ({made_in}) on {state.literal(evaluation.dataset_name)}: "
               f"{len(evaluation.dataset)} images")
    result = evaluation.result
    if evaluation.model_key != loaded.run_key:
        # the sidebar's precision or device changed: these numbers are not what the model computes now, and the
        # views that run it (B, the browser) would mix the two; the tables stay, to compare with the next ones
        st.warning(f"Measured in {made_in}; the sidebar now runs {state.literal(loaded.name)} in "
                   f"{_run_settings(loaded.run_key)}. Press Evaluate to measure it so.", icon=":material/sync:")
        _metrics_tables(result)
        return
    report = evaluation.dataset.report
    tables.dataset_report([str(issue) for issue in report.warnings], [str(issue) for issue in report.notes])
    _metrics_tables(result)
    _other_settings(evaluation)
    _comparison(loaded, evaluation)
    c1, c2 = st.columns(2)
    c1.plotly_chart(pr_figure(result.get("pr_curves", {}), "bbox"), key="ev_pr_box")
    c2.plotly_chart(pr_figure(result.get("pr_curves", {}), "segm"), key="ev_pr_mask")
    _error_costs(evaluation)
    _threshold_views(loaded, evaluation)


if __name__ == "__main__":
    render()
