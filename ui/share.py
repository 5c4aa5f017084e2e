"""Shareable views: "Copy link" on Detect and Inspect, and the link's view restored in a fresh session.

A link is the page's own address (/detect or /inspect) with the view in its query:

    /detect?model=shapes&seed=3&size=256&score_thresh=0.05&agnostic_nms=1&class_thresh={"circle":0.9}&highlight=412

``model``, the sample scene (``seed``, ``size``, and ``shapes`` when it was drawn from other shapes than the
link's model knows: a scene depends on the model it was made for) and, when set, ``highlight`` (the chosen detection's
candidate id), ``class_thresh`` (per-class score thresholds, JSON), ``classes`` (Detect's class
filter, JSON) and ``compare`` (Detect's second model); then every control of SETTINGS whose value
differs from its default (ui.state.DEFAULTS), and each RPN knob the user changed (the others follow the
model's own settings), under its session-state key. Uploaded images are not
in links (the page says so): such a link opens the sample scene of the Sample scene controls.

``restore()`` runs once per session, from app.py before the sidebar and the pages draw their widgets
(and before the hidden start page switches to Detect, which drops the query). Every value is checked:
an unknown model, a number that is not one or out of range, a class the model lacks is left at its
default and named in one warning line (``show_problems``). The query is then cleared, so the address bar does not go on
showing values the user has since changed.
"""
from __future__ import annotations

import json
from typing import Any, Callable
from urllib.parse import urlencode

import numpy as np
import streamlit as st

from mrcnn.data.shapes import SHAPE_NAMES
from mrcnn.inference.structures import Detections
from ui import sidebar, state
from ui.state import FEATURE_MODES, SAMPLE_SIZES

PAGE_PATHS = ("detect", "inspect", "finetune", "evaluate", "start")  # app.py's url_paths


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError("not between 0 and 1")
    return value


def _whole(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not lo <= value <= hi:
            raise ValueError(f"not between {lo} and {hi}")
        return value
    return parse


def _switch(text: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError("not 0 or 1")
    return text == "1"


def _one_of(options: tuple) -> Callable[[str], Any]:
    def parse(text: str):
        for option in options:
            if text == str(option):
                return option
        raise ValueError("not one of " + ", ".join(map(str, options)))
    return parse


# Session-state key -> how its text is read back, with the range its widget allows.
SETTINGS: dict[str, Callable[[str], Any]] = {
    "score_thresh": _fraction, "nms_thresh": _fraction, "max_detections": _whole(1, 300),
    "mask_thresh": _fraction, "agnostic_nms": _switch,
    "show_boxes": _switch, "show_masks": _switch, "show_labels": _switch, "show_outlines": _switch,
    "color_by": _one_of(("instance", "class")), "opacity": _fraction,
    "show_proposals": _switch, "proposals_k": _whole(1, 500),
    "insp_feat_mode": _one_of(FEATURE_MODES), "insp_feat_channel": _whole(0, 4096),  # the page clamps both
    "insp_anchor_level": _whole(0, 16), "insp_prop_k": _whole(1, 300),
}
# Inspect's RPN knobs the user changed (state.RPN_KNOBS: the others follow the model's own settings).
RPN_SETTINGS: dict[str, Callable[[str], Any]] = {
    "rpn_pre_nms_top_n": _whole(1, 100_000), "rpn_post_nms_top_n": _whole(1, 100_000),
    "rpn_nms_thresh": _fraction, "rpn_score_thresh": _fraction,
}
VIEW_KEYS = ("model", "seed", "size", "shapes", "highlight", "class_thresh", "classes", "compare")


def _text(value) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def view_params(entry: state.ImageEntry, highlight: int | None) -> dict[str, str]:
    """The query that reopens this view (see the module docstring)."""
    ss = st.session_state
    model = ss.get("model_name") or ""
    seed, size, shapes = entry.scene or (ss["sample_seed"], ss["sample_size"], None)
    params = {"model": model, "seed": str(seed), "size": str(size)}
    if shapes is not None and shapes != state.sample_classes(_classes_of(model)):  # drawn for another model
        params["shapes"] = json.dumps(list(shapes), separators=(",", ":"))
    if highlight is not None and entry.source == "sample":
        params["highlight"] = str(int(highlight))
    if ss.get(state.class_thresh_key()):
        params["class_thresh"] = json.dumps(ss[state.class_thresh_key()], separators=(",", ":"))
    if ss.get(state.class_filter_key()):
        params["classes"] = json.dumps(list(ss[state.class_filter_key()]), separators=(",", ":"))
    if ss.get("compare_with"):
        params["compare"] = ss["compare_with"]
    for key in SETTINGS:
        if ss.get(key, state.DEFAULTS[key]) != state.DEFAULTS[key]:
            params[key] = _text(ss[key])
    for key, value in (ss.get("rpn_overrides") or {}).items():
        params[key] = _text(value)
    return params


def _base_url() -> str:
    """The app's address without the page (empty where the browser's address is unknown, e.g. AppTest)."""
    url = (st.context.url or "").split("?")[0].rstrip("/")
    head, _, last = url.rpartition("/")
    return head if last in PAGE_PATHS else url


def link(page: str, entry: state.ImageEntry, highlight: int | None) -> str:
    return f"{_base_url()}/{page}?{urlencode(view_params(entry, highlight))}"


def copy_link(page: str, entry: state.ImageEntry, highlight: int | None) -> None:
    """A "Copy link" button that shows this view's link (st.code has a copy button)."""
    with st.popover("Copy link", icon=":material/link:"):
        st.code(link(page, entry, highlight), language=None, wrap_lines=True)
        st.caption("Opens this view in a fresh browser: the model, every threshold and display setting, the "
                   "chosen detection and the sample scene.")
        if entry.source == "upload":
            st.warning(f"Uploaded images are not in links: this one opens the sample scene (seed "
                       f"{st.session_state['sample_seed']}, size {st.session_state['sample_size']}) instead.",
                       icon=":material/link_off:")


# ---- restoring a shared view ---------------------------------------------------------------------------
def _classes_of(name: str | None) -> list[str]:
    info = next((i for i in state.model_infos() if i.name == name), None)
    return [c for c in info.classes if c != "N/A"] if info is not None else []


def _read_view(params: dict[str, str], problems: list[str]) -> dict[str, Any]:
    """{session-state key: value} of the link's valid values; each bad one named in ``problems``."""
    infos = {i.name: i for i in state.model_infos() if i.available}
    values: dict[str, Any] = {}
    model = params.get("model")
    if model is not None:
        if model in infos:
            values["model_name"] = model
        else:
            problems.append(f"model {model!r} is not available here")
            model = None
    model = model or sidebar.default_model(state.model_infos())
    classes = _classes_of(model)

    def read(name: str, key: str, parse: Callable[[str], Any]) -> None:
        if name in params:
            try:
                values[key] = parse(params[name])
            except (ValueError, TypeError, AttributeError, RecursionError):  # JSON nested past Python's stack
                problems.append(f"{name}={params[name][:40]!r} is not valid")

    def class_names(text: str) -> list[str]:
        names = json.loads(text)
        if not isinstance(names, list) or not all(n in classes for n in names) or len(set(names)) < len(names):
            raise ValueError("not a list of the model's classes, each once")
        return names

    def class_thresholds(text: str) -> dict[str, float]:
        pairs = json.loads(text)
        if not isinstance(pairs, dict) or not all(n in classes for n in pairs):
            raise ValueError("not a mapping of the model's classes")
        return {n: _fraction(str(v)) for n, v in pairs.items()}

    def other_model(name: str) -> str:
        if name not in infos or name == model:
            raise ValueError("not another available model")
        return name

    def scene_shapes(text: str) -> tuple[str, ...]:
        names = json.loads(text)
        if (not isinstance(names, list) or not names or not all(n in SHAPE_NAMES for n in names)
                or len(set(names)) < len(names)):
            raise ValueError("not a list of shapes, each once")
        return tuple(names)

    def candidate(text: str) -> int:
        if int(text) < 0:
            raise ValueError("negative")
        return int(text)

    read("seed", "sample_seed", _whole(0, state.MAX_SAMPLE_SEED))
    read("size", "sample_size", _one_of(SAMPLE_SIZES))
    read("shapes", "shared_scene_shapes", scene_shapes)
    read("highlight", "shared_highlight", candidate)
    read("class_thresh", f"class_thresh::{model}", class_thresholds)
    read("classes", f"class_filter::{model}", class_names)
    read("compare", "compare_with", other_model)
    for key, parse in {**SETTINGS, **RPN_SETTINGS}.items():
        read(key, key, parse)
    overrides = {key: values.pop(key) for key in RPN_SETTINGS if key in values}
    if overrides:
        values["rpn_overrides"] = overrides
    return values


def restore() -> None:
    """Once per session: the view in the query (a shared link), checked value by value; then clear it."""
    ss = st.session_state
    if ss.get("share_restored"):
        return
    ss["share_restored"] = True
    known = (*SETTINGS, *RPN_SETTINGS, *VIEW_KEYS)
    params = {k: v for k, v in st.query_params.to_dict().items() if k in known}
    if not params:
        return
    problems: list[str] = []
    ss.update(_read_view(params, problems))
    for key in params:
        del st.query_params[key]
    if problems:
        ss["share_problems"] = "This link's " + "; ".join(problems) + " — left at the default."


def show_problems() -> None:
    """The restored link's bad values, in one warning line, once (on the page the link opened)."""
    message = st.session_state.pop("share_problems", None)
    if message:
        st.warning(message, icon=":material/link_off:")


def restored_row(dets: Detections, entry: state.ImageEntry, selected: int | None) -> int | None:
    """Detect's row to highlight: the one chosen in the table, else the detection a shared link named,
    on the image the link opened and while it is shown."""
    ss = st.session_state
    shared = ss.get("shared_highlight")
    if selected is not None or shared is None:
        ss.pop("shared_highlight", None)
        return selected
    if isinstance(shared, int):  # the first image shown after restoring is the link's
        shared = ss["shared_highlight"] = (entry.id, shared)
    if shared[0] != entry.id:
        return None
    rows = np.flatnonzero(dets.candidate_ids == shared[1])
    return int(rows[0]) if len(rows) else None


def apply_highlight() -> None:
    """Inspect: the detection a shared link named becomes the one to follow (after the page made its image)."""
    shared = st.session_state.pop("shared_highlight", None)
    if isinstance(shared, int):
        st.session_state["highlight"] = shared
