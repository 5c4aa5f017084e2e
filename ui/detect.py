"""Detect page: images in (uploads or sample scenes), detections out, every control instant.

The network runs once per image and model (ui.state.trace_for); every control below only re-filters
the cached trace (``Trace.refilter``) and redraws, inside a fragment so the rest of the page is not
re-run. The page says how long that took.
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pandas as pd
import streamlit as st

from mrcnn.data import images as mimages
from mrcnn.inference.draw import draw_detections
from mrcnn.errors import MrcnnError
from mrcnn.inference.export import detections_csv, png_bytes, prediction_json
from mrcnn.inference.structures import Detections
from ui import compare, overlay_view, plots, share, state, video
from ui.state import sample_classes, sample_entry

UPLOAD_TYPES = list(mimages.SUPPORTED_EXTENSIONS) + video.UPLOAD_TYPES  # an animated GIF is a clip
STRIP_COLUMNS = 8
SCORE_STEP = 0.01  # the score slider's step; the pictures one step either side are sent ahead
# After a new picture the fragment draws the rest (~40 elements) only this long after it: the browser renders
# the picture and paints it first. Sent together, the rest's rendering (~100 ms of React work in chromium
# here) ran before the picture's and held it back (benchmarks/page_latency.py). The pictures sent ahead are
# drawn in this time.
PICTURE_HEAD_START_S = 0.08


# ---- input --------------------------------------------------------------------------------------------
def ingest_upload(name: str, data: bytes) -> state.ImageEntry:
    """Decode one uploaded file into an image entry. Raises ImageError (a MrcnnError) with the reason."""
    loaded = mimages.load_image(data, name=name, max_pixels=state.detect_max_pixels())  # larger: one message
    return state.make_entry(loaded.array, name, "upload")


def _new_sample(classes: tuple[str, ...]) -> None:
    st.session_state["sample_seed"] = (st.session_state["sample_seed"] + 1) % (state.MAX_SAMPLE_SEED + 1)
    _show_sample(classes)


def _show_sample(classes: tuple[str, ...]) -> None:
    """Seed or size changed: show that scene."""
    state.add_image(sample_entry(st.session_state["sample_seed"], st.session_state["sample_size"], classes))


def _clear() -> None:
    state.clear_images()
    st.session_state["uploader_gen"] = st.session_state.get("uploader_gen", 0) + 1


def _uploads() -> None:
    # a new key empties the uploader (after "Clear")
    files = st.file_uploader("Upload images or clips", type=UPLOAD_TYPES, accept_multiple_files=True,
                             key=f"uploads_{st.session_state.get('uploader_gen', 0)}",
                             help=f"{', '.join(UPLOAD_TYPES)}; up to {state.detect_max_pixels() / 1e6:.0f} megapixels; "
                                  "several at once make a strip to pick from")
    seen: dict = st.session_state["ingested_uploads"]
    newest, in_strip = None, set(st.session_state["images"])
    for f in files or []:
        if f.file_id not in seen and video.is_clip_upload(f):
            seen[f.file_id] = video.ingest_clip(f)
        if f.file_id not in seen:
            try:
                entry = ingest_upload(f.name, f.getvalue())
            except MrcnnError as err:
                seen[f.file_id] = ("error", str(err))
            else:
                state.add_image(entry, select=False)
                seen[f.file_id] = ("ok", entry.id)
                newest = entry.id
                in_strip.add(entry.id)
        status, value = seen[f.file_id]
        if status == "error":
            st.error(f"**{state.literal(f.name)}** was not added: {state.literal(value)}", icon=":material/broken_image:")
    if newest is not None:
        state.select_image(newest)
        # the strip keeps the most recent images only: say so rather than lose the others without a word
        dropped = len(in_strip - set(st.session_state["images"]))
        st.session_state["strip_note"] = (f"The strip keeps the {state.MAX_IMAGES} most recent images: "
                                          f"{dropped} earlier {'one' if dropped == 1 else 'ones'} left it.") if dropped else None
    if st.session_state.get("strip_note"):
        st.caption(st.session_state["strip_note"])


def _strip() -> None:
    images = list(st.session_state["images"].values())
    current = state.current_image()
    if len(images) < 2:
        return
    st.caption(f"{len(images)} images — results are kept for each; pick one:")
    cols = st.columns(STRIP_COLUMNS)
    for k, entry in enumerate(images[-STRIP_COLUMNS * 2:]):
        with cols[k % STRIP_COLUMNS]:
            st.image(entry.thumb, caption=entry.name[:24])
            chosen = current is not None and entry.id == current.id
            st.button("Showing" if chosen else "Show", key=f"pick_{entry.id[:16]}", disabled=chosen,
                      type="primary" if chosen else "secondary", on_click=state.select_image, args=(entry.id,),
                      width="stretch")


def _input(categories: list[str]) -> None:
    classes = sample_classes(categories)
    left, right = st.columns([3, 2])
    with left:
        _uploads()
    with right:
        st.markdown("**Sample scene** (synthetic shapes)")
        c1, c2 = st.columns([1, 1])
        with c1:
            st.number_input("Seed", min_value=0, max_value=state.MAX_SAMPLE_SEED, step=1, key="sample_seed",
                            persist_state="session", on_change=_show_sample, args=(classes,))
        with c2:
            st.select_slider("Size", state.SAMPLE_SIZES, key="sample_size", persist_state="session",
                             on_change=_show_sample, args=(classes,))
        b1, b2 = st.columns(2)
        b1.button("New sample", key="new_sample", icon=":material/casino:", on_click=_new_sample, args=(classes,),
                  width="stretch", help="The next seed's scene")
        b2.button("Clear", key="clear_images", icon=":material/delete:", on_click=_clear,
                  width="stretch", help="Forget every image and its results")
    if not st.session_state["ingested_uploads"]:
        state.ensure_image(categories)
    _strip()


# ---- controls and results (a fragment: a control change re-runs only this) -------------------------------
def _controls(classes: list[str]) -> dict:
    st.markdown("**Thresholds**")
    st.slider("Score threshold", 0.0, 1.0, step=SCORE_STEP, key="score_thresh", persist_state="session")
    st.slider("NMS IoU (per class)", 0.0, 1.0, step=0.05, key="nms_thresh", persist_state="session",
              help="Boxes of one class (of any class with class-agnostic NMS) overlapping more than this are "
                   "suppressed; 1 keeps all")
    st.slider("Max detections", 1, 300, step=1, key="max_detections", persist_state="session")
    state.carry_over("mask_thresh")  # Inspect shows it too
    st.slider("Mask threshold", 0.0, 1.0, step=0.05, key="mask_thresh", persist_state="session")
    st.toggle("Class-agnostic NMS", key="agnostic_nms", persist_state="session",
              help="One NMS over every class's boxes: overlapping detections of different classes suppress "
                   "each other too")
    _class_thresholds(classes)
    class_filter = st.multiselect("Classes", classes, key=state.class_filter_key(), persist_state="session",
                                  placeholder="all classes")
    st.markdown("**Display**")
    t1, t2 = st.columns(2)
    with t1:
        st.toggle("Masks", key="show_masks", persist_state="session")
        st.toggle("Boxes", key="show_boxes", persist_state="session")
    with t2:
        st.toggle("Labels", key="show_labels", persist_state="session")
        st.toggle("Outlines", key="show_outlines", persist_state="session")
    st.radio("Colour by", ["instance", "class"], key="color_by", persist_state="session", horizontal=True)
    st.slider("Mask opacity", 0.0, 1.0, step=0.05, key="opacity", persist_state="session")
    if st.toggle("RPN proposals overlay", key="show_proposals", persist_state="session"):
        st.slider("Top-K proposals", 1, 500, step=1, key="proposals_k", persist_state="session")
    return {"class_filter": class_filter}


def _class_thresh_editor_key() -> str:
    # A new key after each edit: the table starts again from the stored thresholds, so a class set back
    # to the global value follows the slider from then on.
    ss = st.session_state
    return f"class_thresh_table::{ss.get('model_name') or ''}::{ss.get('class_thresh_gen', 0)}"


def _store_class_edits(classes: list[str], editor_key: str) -> None:
    ss = st.session_state
    overrides = dict(ss.get(state.class_thresh_key(), {}))
    for row, change in (ss.get(editor_key) or {}).get("edited_rows", {}).items():
        if "score threshold" not in change or not 0 <= int(row) < len(classes):
            continue
        name, value = classes[int(row)], change["score threshold"]
        if value is None or float(value) == float(ss["score_thresh"]):
            overrides.pop(name, None)
        else:
            overrides[name] = min(max(float(value), 0.0), 1.0)
    ss[state.class_thresh_key()] = overrides
    ss["class_thresh_gen"] = ss.get("class_thresh_gen", 0) + 1


def _keep_class_thresholds(classes: list[str]) -> None:
    """Drop per-class thresholds of names this model does not have (another model's names mean nothing)."""
    ss = st.session_state
    key = state.class_thresh_key()
    overrides = {c: v for c, v in ss.get(key, {}).items() if c in classes}
    if overrides != ss.get(key, {}):
        ss[key] = overrides


def _class_thresholds(classes: list[str]) -> None:
    """A table of the model's classes with their score thresholds, each the global one until edited."""
    ss = st.session_state
    _keep_class_thresholds(classes)
    overrides = ss.get(state.class_thresh_key(), {})
    own = len(overrides)
    with st.expander("Per-class score thresholds" + (f" ({own} set)" if own else ""), icon=":material/tune:"):
        table = pd.DataFrame({"class": classes,
                              "score threshold": [overrides.get(c, float(ss["score_thresh"])) for c in classes]})
        editor_key = _class_thresh_editor_key()
        st.data_editor(table, key=editor_key, hide_index=True, disabled=["class"], width="stretch",
                       on_change=_store_class_edits, args=(classes, editor_key),
                       column_config={"score threshold": st.column_config.NumberColumn(
                           min_value=0.0, max_value=1.0, step=0.01, format="%.2f")})
        st.caption("A class left at the global threshold follows the slider.")


def detections_table(dets: Detections) -> pd.DataFrame:
    areas = dets.areas
    return pd.DataFrame({
        "class": dets.label_names,
        "score": np.round(dets.scores.astype(float), 3),
        "x0": np.round(dets.boxes[:, 0], 1), "y0": np.round(dets.boxes[:, 1], 1),
        "x1": np.round(dets.boxes[:, 2], 1), "y1": np.round(dets.boxes[:, 3], 1),
        "area": areas,
    })


def _pick_key(entry: state.ImageEntry, trace) -> tuple:
    """What a candidate id means something for: this image's detections by this run of this model."""
    return (entry.id, *trace.loaded.run_key, trace.rpn_settings)


def _follow_table(entry: state.ImageEntry, trace, dets: Detections) -> None:
    """A click in the table (its selection differs from the last run's) chooses a detection, kept by
    candidate id in ``det_pick``. The table's selection is emptied, not changed by the user, when another
    page ran (Streamlit drops the state of a widget a run did not draw): the chosen detection stays."""
    ss = st.session_state
    sel = ss.get("det_table")
    if sel is None:  # dropped: the table is drawn anew with nothing selected
        ss["det_table_seen"] = []
        return
    try:
        rows = [int(r) for r in sel["selection"]["rows"]]
    except (KeyError, TypeError, ValueError):
        rows = []
    if rows != ss.get("det_table_seen", []):
        chosen = rows[0] if rows and 0 <= rows[0] < len(dets) else None
        ss["det_pick"] = None if chosen is None else (_pick_key(entry, trace), int(dets.candidate_ids[chosen]))
    ss["det_table_seen"] = rows


def _chosen_row(entry: state.ImageEntry, trace, dets: Detections) -> int | None:
    """The row of ``dets`` holding the chosen detection, if they show it."""
    pick = st.session_state.get("det_pick")
    if pick is None or pick[0] != _pick_key(entry, trace):
        return None
    found = np.flatnonzero(dets.candidate_ids == pick[1])
    return int(found[0]) if len(found) else None


def _class_filter(classes: list[str]) -> list[str]:
    """The Classes control's value before it is drawn (its key holds it from the last press)."""
    chosen = st.session_state.get(state.class_filter_key()) or []
    return [c for c in chosen if c in classes]


def _draw(entry: state.ImageEntry, trace, dets: Detections) -> tuple[int | None, np.ndarray]:
    """(row to highlight, overlay picture) of ``dets`` as the Display controls ask."""
    ss = st.session_state
    highlight = share.restored_row(dets, entry, _chosen_row(entry, trace, dets))
    proposals = scores = None
    if ss["show_proposals"]:
        proposals, scores = trace.proposals_original(int(ss["proposals_k"]))
    overlay = draw_detections(entry.array, dets, **state.display_settings(), highlight=highlight, proposals=proposals,
                              proposal_scores=scores, max_proposals=int(ss["proposals_k"]))
    return highlight, overlay


def _next_pictures(entry: state.ImageEntry, trace, thresholds, class_filter: list[str]) -> dict[str, dict]:
    """The overlay one score-slider step either side, keyed as the slider writes its value ("0.13")."""
    pictures = {}
    for score in (thresholds.score_thresh - SCORE_STEP, thresholds.score_thresh + SCORE_STEP):
        score = round(score, 2)
        if 0.0 <= score <= 1.0:
            dets = trace.detections_at(dataclasses.replace(thresholds, score_thresh=score)).of_classes(class_filter)
            highlight, overlay = _draw(entry, trace, dets)
            pictures[f"{score:.2f}"] = overlay_view.view_data(overlay, dets, highlight, entry.id)
    return pictures


@st.fragment
def results(loaded, entry: state.ImageEntry, trace) -> None:
    """Controls on the left, the overlay, the table and the downloads on the right.

    The picture is sent first: Streamlit streams each element as the script draws it, and the columns can be
    filled in any order, so the new picture is on its way while the ~20 controls, the table and the downloads
    are still being drawn (the controls' values are in session state before the script runs). The pictures
    one score step either side follow it (for pictures of at most overlay_view.AHEAD_MAX_INSTANCES instances),
    so that the next arrow-key press shows its picture at once."""
    classes = [c for c in dict.fromkeys(loaded.categories[1:]) if c != "N/A"]  # COCO has N/A gaps
    ctrl, out = st.columns([1, 3], gap="medium")
    _keep_class_thresholds(classes)
    class_filter = _class_filter(classes)
    thresholds = state.thresholds()
    dets_all, refilter_ms = state.detections_for(trace, thresholds)
    mask_ms = trace.last_mask_ms if refilter_ms is not None else 0.0
    dets = dets_all.of_classes(class_filter)
    _follow_table(entry, trace, dets)
    start = time.perf_counter()
    highlight, overlay = _draw(entry, trace, dets)
    draw_ms = (time.perf_counter() - start) * 1000.0
    st.session_state["highlight"] = None if highlight is None else int(dets.candidate_ids[highlight])

    ss = st.session_state
    with out:
        ran_ms = ss.pop("network_ran_ms", None)
        hidden = len(dets_all) - len(dets)
        st.markdown(f"### {len(dets)} detections" + (f" <small>({hidden} hidden by the class filter)</small>"
                                                      if hidden else ""), unsafe_allow_html=True)
        timing = ("thresholds unchanged, nothing to re-filter" if refilter_ms is None
                  else f"re-filtered in {refilter_ms:.1f} ms")
        if mask_ms >= 0.05:
            timing += f" (mask head for new candidates {mask_ms:.1f} ms)"
        timing += f", drawn in {draw_ms:.0f} ms — "
        timing += (f"network ran once for this image in {ran_ms:.0f} ms" if ran_ms is not None
                   else "network not re-run")
        st.caption(timing)
        state.rpn_note(trace.rpn_settings, trace.loaded)
        shown, changed = overlay_view.show(overlay, dets, highlight=highlight, image_key=entry.id)
        st.caption(f"{state.literal(entry.name)} · {entry.width}×{entry.height} px · model `{loaded.name}` · "
                   "hover an instance for its numbers; drag a rectangle or scroll to zoom, double-click to reset")
        head_start = time.perf_counter()
        # what the pictures ahead depend on (the picture shown can stay the same while they change)
        inputs = (shown, id(trace), thresholds, tuple(class_filter), tuple(state.display_settings().items()),
                  bool(ss["show_proposals"]), int(ss["proposals_k"]), repr(ss.get("det_pick")),
                  repr(ss.get("shared_highlight")))
        if ss.get("overlay_next_pictures", (None,))[0] != inputs:
            cheap = len(dets) <= overlay_view.AHEAD_MAX_INSTANCES
            ahead = _next_pictures(entry, trace, thresholds, class_filter) if cheap else {}
            ss["overlay_next_pictures"] = (inputs, ahead)
        overlay_view.offer_next(ss["overlay_next_pictures"][1], "Score threshold", f"{thresholds.score_thresh:.2f}",
                                shown)
    if changed:
        time.sleep(max(0.0, PICTURE_HEAD_START_S - (time.perf_counter() - head_start)))
    with ctrl:
        _controls(classes)
    with out:
        st.markdown("**Detections** — choose a row to highlight it")
        st.dataframe(detections_table(dets), key="det_table", on_select="rerun", selection_mode="single-row",
                     width="stretch", height=min(38 + 35 * max(len(dets), 1), 320))
        _downloads(loaded, entry, trace, class_filter, thresholds, overlay)
        share.copy_link("detect", entry, st.session_state["highlight"])
        compare.section(loaded, entry, dets, thresholds, class_filter)
        # drawn only while open: a closed expander's chart was still re-sent and re-plotted on every press
        timings = st.expander("Stage timings", icon=":material/timer:", key="det_timings_open", on_change="rerun")
        if timings.open:
            with timings:
                st.plotly_chart(plots.timings_figure(trace.timings_ms, {"re-filter": refilter_ms or 0.0,
                                                                        "draw": draw_ms}),
                                key="timings", width="stretch")
                st.caption(f"network total {trace.network_ms:.0f} ms on {loaded.device}")


def _downloads(loaded, entry, trace, class_filter: list[str], thresholds, overlay) -> None:
    stem = entry.name.rsplit(".", 1)[0] or "image"
    c1, c2, c3 = st.columns(3)
    c1.download_button("Overlay PNG", data=lambda: png_bytes(overlay), file_name=f"{stem}.png", mime="image/png",
                       key="dl_png", on_click="ignore", icon=":material/image:", width="stretch")
    # neither the trace nor its detections: a deferred download would keep them alive after the cache let them go
    timings = dict(trace.timings_ms)
    dets = state.detections_later(loaded, entry, trace, class_filter)
    record = lambda: json.dumps(prediction_json(dets(), entry.name, loaded.name, loaded.sha256,  # noqa: E731
                                                thresholds, timings, loaded.precision), indent=1)
    c2.download_button("Predictions JSON", data=record, file_name=f"{stem}.json", mime="application/json",
                       key="dl_json", on_click="ignore", icon=":material/data_object:", width="stretch")
    c3.download_button("Detections CSV", data=lambda: detections_csv(dets()), file_name=f"{stem}.csv",
                       mime="text/csv", key="dl_csv", on_click="ignore", icon=":material/table:", width="stretch")


def render() -> None:
    st.title("Detect")
    st.caption("The sidebar's model on your images or synthetic scenes: masks, boxes and scores. The network "
               "runs once per image; every control re-filters that run at once.")
    loaded = state.require_model()
    _input(loaded.categories[1:])
    if video.showing_clip():
        video.render(loaded, _controls)
        return
    entry = state.current_image()
    if entry is None:
        st.info("Upload an image or make a sample scene to start.", icon=":material/upload:")
        return
    trace = state.safe_trace(loaded, entry)
    if trace is not None:
        results(loaded, entry, trace)


if __name__ == "__main__":
    render()
