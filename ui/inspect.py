"""Inspect page: the pipeline for the current image, one section per stage, each a picture and its numbers.

Everything here reads the cached trace (ui.state.trace_for): the backbone never runs again. The RPN
knobs re-run proposal filtering and the heads from the cached features (``Trace.set_rpn``).
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import pandas as pd
import streamlit as st
import torch

from mrcnn.model.paste import paste_mode
from mrcnn.inference.saliency import METHODS as SALIENCY_METHODS, heat_overlay, saliency
from mrcnn.inference.trace import model_rpn_settings
from ui import plots, share, state

SECTIONS = ["1 Input and resize", "2 Backbone / FPN", "3 Anchors", "4 RPN", "5 Proposals", "6 RoI pooling",
            "7 Box head", "8 Per-class NMS", "9 Masks", "10 Where the time went"]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _section(n: int, help_text: str) -> None:
    st.divider()
    st.subheader(SECTIONS[n - 1], anchor=f"step-{n}")
    st.caption(help_text)


def network_input_image(trace) -> np.ndarray:
    """The padded, normalised batch tensor the backbone saw, back as an RGB uint8 picture."""
    transform = trace.model.transform
    x = trace.image_list.tensors[0].detach().float().cpu()  # (3, Hp, Wp)
    mean = torch.tensor(transform.image_mean).view(3, 1, 1)
    std = torch.tensor(transform.image_std).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()


def level_labels(trace) -> dict[str, str]:
    """FPN level names as in the paper, from each level's stride: torchvision's "0" (stride 4) is P2."""
    labels = {}
    for name, feat in trace.features.items():
        stride = trace.padded_size[0] / feat.shape[-2]
        labels[name] = f"P{round(math.log2(max(stride, 1)))}" + (" (pool)" if name == "pool" else "")
    return labels


# ---- 1 ----------------------------------------------------------------------------------------------------
def _input_resize(trace, entry) -> None:
    _section(1, "The image is resized so its short side is the model's min_size (long side at most max_size), "
                "normalised, and padded to a multiple of 32 for the FPN.")
    (oh, ow), (ih, iw), (ph, pw) = trace.original_size, trace.input_size, trace.padded_size
    c = st.columns(4)
    c[0].metric("Original (w×h)", f"{ow}×{oh}")
    c[1].metric("Network input", f"{iw}×{ih}")
    c[2].metric("Padded batch", f"{pw}×{ph}")
    c[3].metric("Scale", f"{trace.scale:.3f}")
    left, right = st.columns(2)
    left.plotly_chart(plots.image_figure(entry.array, "original", max_height=360), key="in_orig")
    right.plotly_chart(plots.boxes_figure(network_input_image(trace), [
        {"boxes": [[0, 0, iw, ih]], "name": "resized image (the rest is padding)", "color": "#00e5ff"}],
        "network input (denormalised)", max_height=360), key="in_net")


# ---- 2 ----------------------------------------------------------------------------------------------------
@st.fragment
def _backbone(trace) -> None:
    _section(2, "The backbone's feature maps merged top-down by the FPN: one map per level, coarser as the "
                "stride grows. Shown as the mean over channels, or one chosen channel.")
    names = trace.level_names
    labels = level_labels(trace)
    channels = int(next(iter(trace.features.values())).shape[1])
    c1, c2 = st.columns([1, 3])
    with c1:
        mode = st.radio("Show", state.FEATURE_MODES, key="insp_feat_mode", persist_state="session")
        channel = None
        if mode == "one channel":
            state.clamp("insp_feat_channel", 0, channels - 1)
            channel = int(st.number_input("Channel", min_value=0, max_value=channels - 1, step=1,
                                          key="insp_feat_channel", persist_state="session"))
        rows = []
        for name in names:
            _, ch, h, w = trace.features[name].shape
            sy, sx = anchor_strides(trace, h, w)
            rows.append({"level": labels[name], "shape (C×H×W)": f"{ch}×{h}×{w}",
                         "stride": f"{sy}" if sy == sx else f"{sy} (y), {sx} (x)"})
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    maps = [(labels[n], plots.downsample(plots.feature_map_2d(_np(trace.features[n][0]), channel))) for n in names]
    c2.plotly_chart(plots.heatmap_grid(maps, cols=3), key="feat_grid", width="stretch")


# ---- 3 ----------------------------------------------------------------------------------------------------
def _anchor_rows(trace) -> list[dict]:
    settings = trace.anchor_settings()
    labels = level_labels(trace)
    rows = []
    for lvl, name in enumerate(trace.level_names[:len(trace.objectness_maps)]):
        a, h, w = trace.objectness_maps[lvl].shape
        rows.append({"level": labels[name], "grid (H×W)": f"{h}×{w}", "anchors per cell": int(a),
                     "anchors": int(trace.num_anchors_per_level[lvl]),
                     "sizes": ", ".join(str(s) for s in settings["sizes"][lvl]),
                     "aspect ratios": ", ".join(f"{r:g}" for r in settings["aspect_ratios"][lvl])})
    return rows


def anchor_strides(trace, h: int, w: int) -> tuple[int, int]:
    """(y, x) strides torchvision's AnchorGenerator tiles an h×w level's anchors at: the padded input's size
    // the grid's. The pooled level's grid rounds up (P5's 11 cells → 6), so its stride is then 58, not 64."""
    return trace.padded_size[0] // h, trace.padded_size[1] // w


def feature_cell(trace, level: int, x: float, y: float) -> tuple[int, int]:
    """The cell of a level whose anchors are centred nearest an original-image pixel (x, y): torchvision
    centres a cell's anchors on the cell's index × stride."""
    _, fh, fw = trace.objectness_maps[level].shape
    stride_y, stride_x = anchor_strides(trace, fh, fw)
    cy = int(min(max(round(y * trace.scale / stride_y), 0), fh - 1))
    cx = int(min(max(round(x * trace.scale / stride_x), 0), fw - 1))
    return cy, cx


@st.fragment
def _anchors(trace, entry) -> None:
    _section(3, "Anchors are fixed boxes tiled over every feature-map cell: one size per FPN level, several "
                "aspect ratios. The RPN scores each and regresses it towards an object.")
    rows = _anchor_rows(trace)
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption(f"{sum(r['anchors'] for r in rows):,} anchors in all")
    c1, c2 = st.columns([1, 2])
    with c1:
        state.clamp("insp_anchor_level", 0, len(rows) - 1)
        level = st.selectbox("Level", list(range(len(rows))), key="insp_anchor_level", persist_state="session",
                             format_func=lambda i: rows[i]["level"])
        x_max, y_max = max(entry.width - 1, 1), max(entry.height - 1, 1)  # a slider needs min < max
        state.clamp("insp_anchor_x", 0, x_max, initial=entry.width // 2)
        state.clamp("insp_anchor_y", 0, y_max, initial=entry.height // 2)
        x = st.slider("x (image pixels)", 0, x_max, key="insp_anchor_x", persist_state="session")
        y = st.slider("y (image pixels)", 0, y_max, key="insp_anchor_y", persist_state="session")
        x, y = min(int(x), entry.width - 1), min(int(y), entry.height - 1)
        cy, cx = feature_cell(trace, level, x, y)
        boxes_in = trace.anchors_at(level, cy, cx)
        boxes = trace.to_original(boxes_in)
        wh = _np(boxes_in[:, 2:] - boxes_in[:, :2])
        table = pd.DataFrame({"w (input px)": wh[:, 0].round(1), "h (input px)": wh[:, 1].round(1),
                              "h / w": (wh[:, 1] / np.maximum(wh[:, 0], 1e-6)).round(2)})
        st.caption(f"cell (y={cy}, x={cx}) of {rows[level]['level']}")
        st.dataframe(table, hide_index=True, width="stretch")
    texts = [f"anchor {i}: {w:.0f}×{h:.0f} input px" for i, (w, h) in enumerate(wh)]
    c2.plotly_chart(plots.boxes_figure(entry.array, [
        {"boxes": boxes, "name": f"anchors at cell ({cy}, {cx})", "color": "#ffdd00", "texts": texts},
        {"boxes": [[x - 1, y - 1, x + 1, y + 1]], "name": "chosen point", "color": "#ff0000", "width": 4}]),
        key="anchor_fig", width="stretch")


# ---- 4 ----------------------------------------------------------------------------------------------------
def _rpn(trace) -> None:
    _section(4, "The RPN head: for every anchor an objectness score and four box deltas (dx, dy: shift as a "
                "fraction of the anchor size; dw, dh: log scale). Heatmaps show the best anchor per cell.")
    labels = level_labels(trace)
    names = trace.level_names[:len(trace.objectness_maps)]
    maps = [(labels[n], plots.downsample(plots.objectness_2d(_np(o)), how="max"))
            for n, o in zip(names, trace.objectness_maps)]
    st.plotly_chart(plots.heatmap_grid(maps, cols=3, colorscale="Inferno", zmin=0.0, zmax=1.0), key="obj_grid",
                    width="stretch")
    probs = torch.sigmoid(trace.anchor_objectness.float())
    c = st.columns(3)
    c[0].metric("Anchors", f"{probs.numel():,}")
    c[1].metric("Objectness > 0.5", f"{int((probs > 0.5).sum()):,}")
    c[2].metric("Highest objectness", f"{float(probs.max()) if probs.numel() else 0:.3f}")
    deltas = plots.split_deltas([_np(d) for d in trace.delta_maps])
    st.plotly_chart(plots.histogram_figure(deltas, title="box deltas, all anchors"), key="delta_hist",
                    width="stretch")


# ---- 5 ----------------------------------------------------------------------------------------------------
def _proposals(trace, entry) -> None:
    _section(5, "Per level the top-N anchors by objectness, decoded and clipped (before NMS); NMS per level, "
                "then the best post-NMS-top-N overall are the proposals the heads see.")
    p = trace.proposals
    c = st.columns(4)
    c[0].metric("Before NMS", f"{len(p.boxes_pre):,}")
    c[1].metric("Suppressed by NMS", f"{p.num_suppressed:,}")
    c[2].metric("Kept (proposals)", f"{len(p.boxes):,}")
    c[3].metric("Cut by post-NMS top-N", f"{len(p.boxes_pre) - p.num_suppressed - len(p.boxes):,}")
    k = int(st.slider("Top-K to draw", 1, 300, step=1, key="insp_prop_k", persist_state="session"))
    before, before_s = trace.proposals_original(k, before_nms=True)
    after, after_s = trace.proposals_original(k)
    left, right = st.columns(2)
    left.plotly_chart(plots.boxes_figure(entry.array, [
        {"boxes": before, "name": f"top {len(before)} before NMS", "color": "#ff7f0e",
         "texts": [f"objectness {s:.3f}" for s in before_s], "width": 1}], max_height=400), key="prop_before")
    right.plotly_chart(plots.boxes_figure(entry.array, [
        {"boxes": after, "name": f"top {len(after)} after NMS", "color": "#2ca02c",
         "texts": [f"objectness {s:.3f}" for s in after_s], "width": 1}], max_height=400), key="prop_after")
    state.fill_rpn_knobs(trace.loaded)
    own = model_rpn_settings(trace.model)
    ss = st.session_state
    with st.form("rpn_knobs", border=True):
        st.markdown("**RPN knobs** — re-run proposal filtering and the heads from the cached features")
        f = st.columns(4)
        f[0].number_input("Pre-NMS top-N (per level)", min_value=1, max_value=100_000, step=50,
                          key="rpn_pre_nms_top_n", persist_state="session")
        f[1].number_input("Post-NMS top-N", min_value=1, max_value=100_000, step=50, key="rpn_post_nms_top_n",
                          persist_state="session")
        f[2].slider("RPN NMS IoU", 0.0, 1.0, step=0.05, key="rpn_nms_thresh", persist_state="session")
        f[3].slider("RPN score threshold", 0.0, 1.0, step=0.01, key="rpn_score_thresh", persist_state="session")
        b = st.columns([1, 1, 3])
        b[0].form_submit_button("Re-run RPN", type="primary", icon=":material/replay:",
                                on_click=state.apply_rpn_knobs)
        b[1].form_submit_button("Defaults", on_click=state.reset_rpn_knobs,
                                help=f"{state.literal(trace.loaded.name)}'s own test-time settings: pre-NMS top-N "
                                     f"{own.pre_nms_top_n}, post-NMS top-N {own.post_nms_top_n}, NMS IoU "
                                     f"{own.nms_thresh:.2f}, score ≥ {own.score_thresh:.2f}")
    ms = ss.get("rpn_rerun_ms")
    if trace.rpn_settings != own:
        st.caption("RPN settings other than the model's own are in use; Detect shows their detections too.")
    if ms is not None:
        st.caption(f"RPN filtering + heads re-ran in {ms:.0f} ms — backbone not re-run")


# ---- 6–9: one chosen detection ---------------------------------------------------------------------------
def _det_label(dets, i: int) -> str:
    return f"#{i} {dets.categories[int(dets.labels[i])]} ({float(dets.scores[i]):.2f})"


@st.fragment
def _detection_steps(trace, entry) -> None:
    thresholds = state.thresholds()
    dets, _ = state.detections_for(trace, thresholds)
    cids = [int(c) for c in dets.candidate_ids]
    cid = None
    st.divider()
    if cids:
        highlight = st.session_state.get("highlight")
        if highlight in cids and st.session_state.get("insp_seen_highlight") != highlight:
            st.session_state["insp_det"] = highlight  # the row chosen on Detect
        st.session_state["insp_seen_highlight"] = highlight
        state.keep_choice("insp_det", cids, cids[0])
        by_cid = {c: i for i, c in enumerate(cids)}
        cid = st.selectbox("Detection to follow through steps 6, 7 and 9", cids, key="insp_det",
                           persist_state="session", format_func=lambda c: _det_label(dets, by_cid[c]))
    else:
        st.info(f"No detections at score ≥ {thresholds.score_thresh:.2f}: lower the score threshold on Detect "
                "to follow one through RoI pooling, the box head and the mask head.")
    share.copy_link("inspect", entry, cid)
    if cid is not None:
        _roi(trace, entry, cid)
        _box_head(trace, entry, cid)
        _saliency(trace, entry, cid, dets, by_cid[cid])
    _nms(trace, thresholds)
    if cid is not None:
        _masks(trace, entry, cid, dets, by_cid[cid])


def fpn_level_rule(box, canonical_scale: int = 224, canonical_level: int = 4) -> float:
    """torchvision's LevelMapper before flooring: k0 + log2(sqrt(area) / 224)."""
    w, h = float(box[2] - box[0]), float(box[3] - box[1])
    return canonical_level + math.log2(max(math.sqrt(max(w * h, 1e-6)), 1e-6) / canonical_scale)


def _roi(trace, entry, cid: int) -> None:
    _section(6, "RoIAlign cuts a fixed-size crop out of one FPN level for each box: larger boxes read coarser "
                "levels. The box head sees 7×7 crops of the proposal, the mask head 14×14 crops of the refined box.")
    crops = trace.roi_crops(cid)
    cols = st.columns(2)
    for col, key, what in ((cols[0], "box", "box head: the proposal"), (cols[1], "mask", "mask head: the refined box")):
        info = crops[key]
        crop = info["crop"].numpy()  # (C, S, S)
        rule = fpn_level_rule(info["box"].tolist())
        with col:
            level = level_labels(trace)[info["level_name"]]
            st.markdown(f"**{what}** → level **{level}**, crop {crop.shape[0]}×{crop.shape[1]}×{crop.shape[2]}")
            st.caption(f"k = 4 + log2(√area / 224) = {rule:.2f} → floor, clamped to the pooled levels")
            st.plotly_chart(plots.heatmap_figure(crop.mean(axis=0), f"{crop.shape[1]}×{crop.shape[2]} crop, "
                                                 "mean over channels", height=300), key=f"roi_{key}")


def _box_head(trace, entry, cid: int) -> None:
    _section(7, "The box head classifies each proposal and regresses one refined box per class; the detection "
                "is the refined box of its class.")
    proposal, objectness, level = trace.proposal_of(cid)
    refined = trace.candidate_boxes([cid])
    num_classes = trace.num_classes
    label = cid % num_classes
    probs = trace.class_probs(cid)
    p_orig, r_orig = trace.to_original(proposal[None]), trace.to_original(refined)
    left, right = st.columns([3, 2])
    left.plotly_chart(plots.boxes_figure(entry.array, [
        {"boxes": p_orig, "name": f"proposal (objectness {objectness:.3f})", "color": "#ff7f0e", "dash": "dash"},
        {"boxes": r_orig, "name": f"refined: {trace.categories[label]}", "color": "#00e5ff"}], max_height=420,
        focus=np.concatenate([np.minimum(p_orig[0, :2], r_orig[0, :2]), np.maximum(p_orig[0, 2:], r_orig[0, 2:])])),
        key="boxhead_fig")
    left.caption("zoomed on the two boxes — double-click the picture for all of it")
    with right:
        st.plotly_chart(plots.class_probs_figure(probs, trace.categories, chosen=label), key="class_probs")
        st.dataframe(pd.DataFrame({"": ["proposal", "refined"],
                                   "x0": [p_orig[0, 0], r_orig[0, 0]], "y0": [p_orig[0, 1], r_orig[0, 1]],
                                   "x1": [p_orig[0, 2], r_orig[0, 2]], "y1": [p_orig[0, 3], r_orig[0, 3]]}).round(1),
                     hide_index=True, width="stretch")
        rpn_level = level_labels(trace)[trace.level_names[level]]
        st.caption(f"proposal from RPN level {rpn_level} · P({trace.categories[label]}) = {probs[label]:.3f}")


def cached_saliency(trace, cid: int, method: str):
    """The saliency of one candidate, computed once per trace, RPN settings (they renumber the
    candidates), candidate and method, and kept while the session holds the trace."""
    per_trace = st.session_state.setdefault("saliency_cache", weakref.WeakKeyDictionary())
    cache = per_trace.setdefault(trace, {})
    key = (trace.rpn_settings, cid, method)
    if key not in cache:
        cache[key] = saliency(trace, cid, method)
    return cache[key]


def _saliency(trace, entry, cid: int, dets, index: int) -> None:
    st.markdown("**Where the model looks** for this detection's class")
    st.caption("The gradient of the class logit with respect to the FPN level the proposal was pooled from, "
               "from the cached features (RoI pooling and the box head re-run, the backbone does not). "
               "Element-wise: each cell's share of the score (HiResCAM); Grad-CAM: channels weighted by their "
               "mean gradient over the whole level, which also lights up other objects alike.")
    c1, c2 = st.columns([1, 3])
    with c1:
        state.keep_choice("insp_sal_method", list(SALIENCY_METHODS), SALIENCY_METHODS[0])
        state.clamp("insp_sal_opacity", 0.0, 1.0, initial=0.6)
        method = st.radio("Saliency", SALIENCY_METHODS, key="insp_sal_method", persist_state="session")
        opacity = float(st.slider("Heat opacity", 0.0, 1.0, step=0.05, key="insp_sal_opacity",
                                  persist_state="session"))
    sal = cached_saliency(trace, cid, method)
    level = level_labels(trace)[sal.level_name]
    c2.plotly_chart(plots.boxes_figure(heat_overlay(entry.array, sal.heat, opacity), [
        {"boxes": dets.boxes[index:index + 1], "name": _det_label(dets, index), "color": "#00e5ff"}],
        max_height=420), key="saliency_fig")
    c1.caption(f"level {level} · logit {sal.logit:.2f} for {trace.categories[sal.label]}")


def _nms(trace, thresholds) -> None:
    _section(8, f"Candidates (proposal × class) scoring above {thresholds.score_thresh:.2f}, before and after "
                f"NMS at IoU {thresholds.nms_thresh:.2f} within each class (then the best "
                f"{thresholds.max_detections} overall).")
    summary = trace.nms_summary(thresholds)
    if not summary:
        st.info("No candidate is above the score threshold.")
        return
    left, right = st.columns([2, 1])
    left.plotly_chart(plots.nms_figure(summary), key="nms_fig")
    right.dataframe(pd.DataFrame(summary), hide_index=True, width="stretch")


def _masks(trace, entry, cid: int, dets, index: int) -> None:
    how = ("sampled at every pixel's centre, to a fraction of a pixel" if paste_mode(trace.model) == "centre"
           else "resized onto the box rounded to whole pixels, as torchvision does")
    _section(9, "The mask head predicts a 28×28 probability map for the detection's class inside its box; it "
                f"is pasted into the image ({how}) and cut at the mask threshold.")
    state.carry_over("mask_thresh")  # the same control as Detect's: one value, shown and set on both pages
    t = float(st.slider("Mask threshold", 0.0, 1.0, step=0.05, key="mask_thresh", persist_state="session"))
    small = _np(trace.mask_probs_28([cid])[0])
    full = trace.mask_probs_full(cid)
    x0, y0, x1, y1 = (int(v) for v in dets.boxes[index])
    pad = max(4, (x1 - x0 + y1 - y0) // 8)
    ya, yb = max(y0 - pad, 0), min(y1 + pad + 1, full.shape[0])
    xa, xb = max(x0 - pad, 0), min(x1 + pad + 1, full.shape[1])
    left, right = st.columns(2)
    left.plotly_chart(plots.mask_figure(small, t, "28×28 mask-head probabilities"), key="mask28")
    right.plotly_chart(plots.mask_figure(full[ya:yb, xa:xb], t, "pasted into the image (around the box)",
                                         x0=xa, y0=ya), key="mask_full")
    area = int((full > t).sum())
    st.caption(f"{area} pixels above {t:.2f} · box {x1 - x0}×{y1 - y0} px · "
               f"mean probability inside the box {full[y0:y1 + 1, x0:x1 + 1].mean():.3f}")


# ---- 10 ---------------------------------------------------------------------------------------------------
def _timings(trace) -> None:
    _section(10, "Milliseconds per stage of the one network run on this image (on "
                 f"{trace.device}); re-filtering and RPN re-runs reuse it.")
    extra = {"last re-filter": trace.last_refilter_ms}
    if st.session_state.get("rpn_rerun_ms") is not None:
        extra["last RPN re-run"] = st.session_state["rpn_rerun_ms"]
    left, right = st.columns([2, 1])
    left.plotly_chart(plots.timings_figure(trace.timings_ms, extra), key="time_fig")
    rows = [{"stage": k, "ms": round(float(v), 2)} for k, v in trace.timings_ms.items()]
    rows.append({"stage": "network total", "ms": round(trace.network_ms, 2)})
    right.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")


def render() -> None:
    st.title("Inspect")
    st.caption("Every stage of the network on Detect's image, from the resized input to the masks: a picture "
               "and the numbers for each, all read from the one run.")
    loaded = state.require_model()
    state.ensure_image(loaded.categories[1:])
    share.apply_highlight()
    entry = state.current_image()
    st.page_link("ui/detect.py", label="Choose the image and the thresholds on Detect",
                 icon=":material/center_focus_strong:")
    trace = state.safe_trace(loaded, entry)
    if trace is None:
        return
    t = state.thresholds()
    st.caption(f"**{state.literal(entry.name)}** · model `{loaded.name}` · score ≥ {t.score_thresh:.2f}, NMS IoU {t.nms_thresh:.2f} "
               f"(set on Detect), mask ≥ {t.mask_thresh:.2f} · "
               + " · ".join(f"[{s}](#step-{i + 1})" for i, s in enumerate(SECTIONS)))
    _input_resize(trace, entry)
    _backbone(trace)
    _anchors(trace, entry)
    _rpn(trace)
    _proposals(trace, entry)
    _detection_steps(trace, entry)
    _timings(trace)


if __name__ == "__main__":
    render()
