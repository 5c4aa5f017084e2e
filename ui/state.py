"""Session state in one place, and the resources every session shares.

Shared by all sessions (``st.cache_resource``): the loaded models, keyed by (name, weights file, its
mtime/size, device, precision). They are only ever called, never changed. And the trace cache (``trace_cache``):
one memory budget for every session's traces.

Per session (``st.session_state``), initialised by ``init()``:
  model_name, device,       what the sidebar chose (device: "auto" | "cpu" | "cuda";
  precision                 precision: "auto" | "float32" | "bfloat16" | "float16")
  images                    OrderedDict image id -> ImageEntry: uploads and sample scenes, in order
  current_image             the image id Detect and Inspect show
  traces                    this session's live traces, trace key -> Trace: its part of the server-wide
                            trace cache (``trace_cache()``, one byte budget for every session)
  score_thresh … mask_thresh, agnostic_nms, show_*, color_by, opacity, show_proposals, proposals_k,
  insp_* …                  control values (DEFAULTS; insp_anchor_x/y start at the image centre)
  rpn_overrides             Inspect's RPN knobs the user changed, knob key -> value; the others follow the
                            model's own test-time settings (``rpn_settings``; rpn_* are the knobs' widgets)
  class_thresh::<model>     per-class score thresholds that differ from the global one (Detect's table)

A control's value lives in its widget's own state: the widget has the key above and
``persist_state="session"``, so Streamlit keeps the value while a page that does not draw it runs,
and every page that shows the control uses the same key. ``init()`` gives each key its first value;
a button's callback writes ``st.session_state[key]``. Only a range that depends on the image or the
model is enforced here (``clamp``, ``keep_choice``), before the widget is drawn.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
import uuid
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import streamlit as st

from mrcnn.data.images import max_pixels_from_env
from mrcnn.data.video import VideoLimits
from mrcnn.env_settings import env_number
from mrcnn.errors import ModelUnavailable, MrcnnError
from mrcnn.inference.precision import PRECISIONS
from mrcnn.inference.structures import Detections, RpnSettings, Thresholds
from mrcnn.inference.trace import model_rpn_settings, run_trace
from mrcnn.inference.trace_cache import TraceCache, budget_bytes, max_concurrent_runs
from mrcnn.model import zoo

MAX_IMAGES = 16  # images a session keeps in its strip
THUMB_SIZE = 112
# The choices of controls that shared links (ui/share.py) carry too: Detect's sample size, Inspect's feature view.
SAMPLE_SIZES = (128, 192, 256, 384, 512)
MAX_SAMPLE_SEED = 10**9  # the Seed box's and a link's largest; "New sample" goes from it back to 0
FEATURE_MODES = ("mean over channels", "one channel")

DEFAULTS: dict[str, Any] = {
    "model_name": None,
    "device": "auto",
    "precision": "auto",
    # Thresholds (defaults of mrcnn.inference.structures.Thresholds)
    "score_thresh": 0.5,
    "nms_thresh": 0.5,
    "max_detections": 100,
    "mask_thresh": 0.5,
    "agnostic_nms": False,
    # display
    "show_boxes": True,
    "show_masks": True,
    "show_labels": True,
    "show_outlines": False,
    "color_by": "instance",
    "opacity": 0.5,
    "show_proposals": False,
    "proposals_k": 50,
    # input
    "sample_seed": 0,
    "sample_size": 256,
    # Inspect's own views (the anchor point starts at the image centre: see ui/inspect.py)
    "insp_feat_mode": "mean over channels",
    "insp_feat_channel": 0,
    "insp_anchor_level": 1,
    "insp_prop_k": 50,
}
# Inspect's RPN knobs: widget key -> the RpnSettings field it sets. They start at the model's own settings.
RPN_KNOBS = {"rpn_pre_nms_top_n": "pre_nms_top_n", "rpn_post_nms_top_n": "post_nms_top_n",
             "rpn_nms_thresh": "nms_thresh", "rpn_score_thresh": "score_thresh"}


def init() -> None:
    """Give every key its default once per session."""
    ss = st.session_state
    for key, value in DEFAULTS.items():
        if key not in ss:
            ss[key] = value
    if "images" not in ss:
        ss["images"] = OrderedDict()
    if "traces" not in ss:
        ss["traces"] = trace_cache().session(_session_id())
    ss.setdefault("current_image", None)
    ss.setdefault("ingested_uploads", {})  # uploader file id -> image id, or the error message
    ss.pop("network_ran_ms", None)  # a network run's time is for the page run that made it (Inspect shows none)


def clamp(key: str, lo, hi, initial=None) -> None:
    """Keep the value under ``key`` within [lo, hi], a range that depends on the image or the model;
    with no value yet, start at ``initial``. Call before the widget with that key is drawn."""
    ss = st.session_state
    if key not in ss:
        ss[key] = initial
    value = min(max(ss[key], lo), hi)
    if value != ss[key]:  # writing an unchanged value would still count as a change
        ss[key] = value


def carry_over(key: str) -> None:
    """Call just before drawing a control that more than one page shows (the mask threshold).

    Streamlit gives a widget another id on each page. The new page's widget finds the kept value only
    once the old page's widget has been dropped as stale: the browser drops it before it asks for the
    new page, but a switch that still carries the old page's widgets (AppTest's, for one) runs the new
    widget first, at its default, and that default is written back (the mask threshold came back from
    Inspect as 0.00). A value written under the key wins either way."""
    st.session_state[key] = st.session_state[key]


def keep_choice(key: str, options: list, fallback) -> None:
    """Keep the value under ``key`` among ``options`` (which depend on the model or the image), else
    ``fallback``. Call before the widget with that key is drawn."""
    ss = st.session_state
    if ss.get(key) not in options:
        ss[key] = fallback


def keep_model_pick(key: str, offered) -> None:
    """A second-model picker (Detect's "Compare with", Evaluate's model B; None is "none"): the user's pick
    outlives the moments it is not offered (it is the sidebar's model, or its run is unavailable) and comes
    back once it is. Call before drawing the selectbox, with ``on_change=remember_pick, args=(key,)``."""
    ss, wish = st.session_state, f"{key}_wish"
    if ss.get(key) in offered:
        ss[wish] = ss[key]  # a pick, or a shared link's
    elif ss.get(wish) in offered:
        ss[key] = ss[wish]
    elif ss.get(key) is not None:
        del ss[key]  # the widget starts again at "none": None written here would show no choice at all


def remember_pick(key: str) -> None:
    st.session_state[f"{key}_wish"] = st.session_state[key]  # "none" too: a wish to compare nothing


def class_filter_key() -> str:
    """Where the current model's class filter (Detect's "Classes") lives: a list of its class names."""
    return f"class_filter::{st.session_state.get('model_name') or ''}"


def class_thresh_key() -> str:
    """Where the current model's per-class score thresholds live: {class name: threshold}, only the classes
    whose threshold differs from the global one (the others follow the score slider)."""
    return f"class_thresh::{st.session_state.get('model_name') or ''}"


def thresholds() -> Thresholds:
    ss = st.session_state
    return Thresholds(score_thresh=float(ss["score_thresh"]), nms_thresh=float(ss["nms_thresh"]),
                      max_detections=int(ss["max_detections"]), mask_thresh=float(ss["mask_thresh"]),
                      agnostic_nms=bool(ss["agnostic_nms"]), class_thresh=ss.get(class_thresh_key(), {}))


def display_settings() -> dict[str, Any]:
    """The Display controls, as ``draw_detections`` takes them (Detect, its comparison and clips draw alike)."""
    ss = st.session_state
    return {"show_masks": bool(ss["show_masks"]), "show_boxes": bool(ss["show_boxes"]),
            "show_labels": bool(ss["show_labels"]), "show_outlines": bool(ss["show_outlines"]),
            "color_by": ss["color_by"], "opacity": float(ss["opacity"])}


def rpn_settings(loaded: zoo.LoadedModel) -> RpnSettings:
    """The RPN settings runs of ``loaded`` use: the model's own (its arch's rpn_*_test; a model made for few
    objects proposes fewer regions), with the knobs the user changed on Inspect. A knob left alone follows
    each model: Compare with and another sidebar model run with theirs."""
    return _with_overrides(model_rpn_settings(loaded.model))


def _with_overrides(own: RpnSettings) -> RpnSettings:
    changed = st.session_state.get("rpn_overrides") or {}
    return replace(own, **{RPN_KNOBS[k]: v for k, v in changed.items() if k in RPN_KNOBS})


def fill_rpn_knobs(loaded: zoo.LoadedModel) -> None:
    """Before Inspect draws its RPN knobs: show the settings runs use. Written only when those changed (a
    model of other defaults, applied knobs), so that a value typed but not yet applied survives other reruns."""
    ss = st.session_state
    own = model_rpn_settings(loaded.model)
    shown = (own, _with_overrides(own))
    if ss.get("rpn_knobs_shown") != shown:
        for key, name in RPN_KNOBS.items():
            ss[key] = getattr(shown[1], name)
        ss["rpn_knobs_shown"] = shown


def apply_rpn_knobs() -> None:
    """The RPN form's callback: a knob whose value differs from the model's own is the user's change."""
    ss = st.session_state
    own = ss["rpn_knobs_shown"][0]
    ss["rpn_overrides"] = {key: ss[key] for key, name in RPN_KNOBS.items() if ss[key] != getattr(own, name)}


def reset_rpn_knobs() -> None:
    st.session_state["rpn_overrides"] = {}
    st.session_state.pop("rpn_knobs_shown", None)  # the knobs show the model's settings again, typed ones too


def rpn_note(rpn: RpnSettings, loaded: zoo.LoadedModel) -> None:
    """Detect's and a clip's note that Inspect's RPN knobs, which change what is found, are not the model's own."""
    if rpn != model_rpn_settings(loaded.model):
        st.caption(f":orange[RPN knobs set on Inspect are in use] ({rpn_text(rpn)})")


def rpn_text(rpn: RpnSettings) -> str:
    return (f"pre-NMS top-N {rpn.pre_nms_top_n}, post-NMS top-N {rpn.post_nms_top_n}, NMS IoU "
            f"{rpn.nms_thresh:.2f}, score ≥ {rpn.score_thresh:.2f}")


# ---- models -----------------------------------------------------------------------------------------
@st.cache_data(ttl=60, show_spinner=False)
def model_infos() -> list[zoo.ModelInfo]:
    """Every model the zoo knows of, with availability (re-read every few seconds: downloads, runs)."""
    return zoo.list_models()


def _file_stamp(path: str | None) -> tuple:
    try:
        st_ = os.stat(path) if path else None
    except OSError:
        return ()
    return (st_.st_mtime_ns, st_.st_size) if st_ else ()


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def _load_model(name: str, weights: str | None, device: str, stamp: tuple, precision: str) -> zoo.LoadedModel:
    # ``stamp`` is only part of the key: a re-written weights file is loaded again.
    return zoo.load_model(name, weights=weights, device=device, precision=precision)


def _cache_key(name: str, device: str) -> tuple[str, str | None, str, tuple]:
    """(name, weights, device, stamp): what a loaded model is cached under, but its precision."""
    dev = str(zoo.resolve_device(device))
    info = next((i for i in model_infos() if i.name == name), None)
    if info is not None and not info.available:
        # a run's model is named by its checkpoint's path, with which the reason already starts
        raise ModelUnavailable(info.reason if info.reason.startswith(name) else f"{name}: {info.reason}")
    weights = info.path if info is not None else None
    return name, weights, dev, _file_stamp(weights)


def get_model(name: str, device: str = "auto", precision: str = "float32") -> zoo.LoadedModel:
    """The shared LoadedModel for a model name (or checkpoint path). Raises MrcnnError with the reason."""
    return _load_model(*_cache_key(name, device), precision)


def load_model_uncached(name: str, device: str = "auto", precision: str = "float32") -> zoo.LoadedModel:
    """A model loaded for one task and freed after it (not kept among the shared models)."""
    name, weights, dev, _ = _cache_key(name, device)
    return zoo.load_model(name, weights=weights, device=dev, precision=precision)


def forget_loaded_model(name: str, device: str = "auto") -> None:
    """Drop every precision's shared copy of a model, so that the next page loads it again: its precision
    check changed what ``auto`` picks (and every session sees it from its next rerun)."""
    key = _cache_key(name, device)
    for precision in PRECISIONS:
        _load_model.clear(*key, precision)


def current_model() -> zoo.LoadedModel | None:
    """The model the sidebar chose, or None (the reason is in session_state["model_error"])."""
    ss = st.session_state
    name = ss.get("model_name")
    ss["model_error"] = None
    if not name:
        ss["model_error"] = "no model is available"
        return None
    try:
        return get_model(name, ss.get("device", "auto"), ss.get("precision", "auto"))
    except MrcnnError as err:
        ss["model_error"] = str(err)
        return None


def require_model() -> zoo.LoadedModel:
    """The current model, or a clear message on the page and stop."""
    loaded = current_model()
    if loaded is None:
        st.warning(f"No model loaded — {literal(st.session_state.get('model_error'))}. "
                   "Pick an available model in the sidebar.", icon=":material/warning:")
        st.stop()
    return loaded


_MARKDOWN_CHARACTERS = re.compile(r"([\\`*_\[\]()!#$<>~|])")


def literal(text: str) -> str:
    """``text`` (a name a user gave: an upload's, a clip's) shown as it is inside Markdown: an upload named
    '![a](http://…).png' showed as an image that every browser showing the message fetched."""
    return _MARKDOWN_CHARACTERS.sub(r"\\\1", str(text))


# ---- images ------------------------------------------------------------------------------------------
@dataclass
class ImageEntry:
    """One image of the session's strip."""

    id: str  # sha1 of the pixels: the same picture uploaded twice is one entry
    name: str
    array: np.ndarray  # (H, W, 3) uint8, EXIF-oriented
    source: str  # "upload" | "sample"
    thumb: np.ndarray = field(repr=False, default=None)
    scene: tuple[int, int, tuple[str, ...]] | None = None  # a sample's (seed, size, shapes drawn from)

    @property
    def height(self) -> int:
        return int(self.array.shape[0])

    @property
    def width(self) -> int:
        return int(self.array.shape[1])


def image_id(array: np.ndarray) -> str:
    h = hashlib.sha1(str(array.shape).encode())
    h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def make_entry(array: np.ndarray, name: str, source: str) -> ImageEntry:
    from PIL import Image

    thumb = Image.fromarray(array)
    thumb.thumbnail((THUMB_SIZE, THUMB_SIZE))
    return ImageEntry(image_id(array), name, array, source, np.asarray(thumb))


def add_image(entry: ImageEntry, select: bool = True) -> ImageEntry:
    images: OrderedDict = st.session_state["images"]
    if entry.id in images:  # the same pixels again: one entry, named as given last, now the newest
        entry = images[entry.id] = replace(images[entry.id], name=entry.name, source=entry.source, scene=entry.scene)
        images.move_to_end(entry.id)
    else:
        images[entry.id] = entry
        while len(images) > MAX_IMAGES:
            oldest = next(iter(images))
            if oldest == st.session_state.get("current_image"):
                images.move_to_end(oldest)
                oldest = next(iter(images))
            images.pop(oldest)
    if select:
        select_image(entry.id)
    return entry


def sample_classes(categories: list[str]) -> tuple[str, ...]:
    """The shape classes a model knows (sample scenes use them), or the default shapes."""
    from mrcnn.data.shapes import DEFAULT_CLASSES, SHAPE_NAMES

    known = tuple(c for c in categories if c in SHAPE_NAMES)
    return known or DEFAULT_CLASSES


def sample_entry(seed: int, size: int, classes: tuple[str, ...]) -> ImageEntry:
    """A synthetic shapes scene (deterministic by seed, size and the shapes it is drawn from) as an image
    entry; named by its seed, and by its shapes where they are not the default ones."""
    from mrcnn.data.shapes import DEFAULT_CLASSES, generate_scene

    classes = tuple(classes)
    scene = generate_scene(int(seed), size=int(size), classes=classes)
    name = f"sample-{int(seed)}" + ("" if classes == DEFAULT_CLASSES else "-" + "-".join(classes))
    return replace(make_entry(scene.image, f"{name}.png", "sample"), scene=(int(seed), int(size), classes))


def ensure_image(categories: list[str]) -> None:
    """Something to look at from the first second: with no image yet, the sample scene of the current
    seed (in the shapes the model knows)."""
    if not st.session_state["images"]:  # a shared link's scene keeps the shapes it was drawn from
        shapes = st.session_state.pop("shared_scene_shapes", None) or sample_classes(categories)
        add_image(sample_entry(st.session_state["sample_seed"], st.session_state["sample_size"], shapes))


def select_image(image_id_: str) -> None:
    st.session_state["current_image"] = image_id_
    st.session_state.pop("det_table", None)  # a row chosen on another image means nothing here
    st.session_state.pop("det_pick", None)
    st.session_state["highlight"] = None


def current_image() -> ImageEntry | None:
    images = st.session_state.get("images") or {}
    key = st.session_state.get("current_image")
    if key in images:
        return images[key]
    return next(reversed(images.values()), None) if images else None


def clear_images() -> None:
    st.session_state["images"] = OrderedDict()
    trace_cache().forget(_session_id())
    st.session_state["current_image"] = None
    st.session_state["ingested_uploads"] = {}


# ---- the server's limits, from its environment ----------------------------------------------------------
# Detect's pixel limit: lower than mrcnn.data.images' 40 MP default because the page keeps full-size masks per
# detection; $MRCNN_MAX_PIXELS overrides both.
DETECT_MAX_PIXELS = 16_000_000
MODEL_UPLOAD_MB_ENV = "MRCNN_MAX_MODEL_UPLOAD_MB"
DEFAULT_MODEL_UPLOAD_MB = 1024  # the largest model file "Add a model" takes (torchvision's R50 files: 170-180 MB)


def detect_max_pixels() -> int:
    return max_pixels_from_env(DETECT_MAX_PIXELS)


def model_upload_mb() -> int:
    return env_number(MODEL_UPLOAD_MB_ENV, DEFAULT_MODEL_UPLOAD_MB, "megabytes", whole=True)


def server_settings_problem() -> str | None:
    """What is wrong with the server's limits in its environment (the trace cache's budget and runs, the pixel,
    clip and model-file limits), as one line; None when they are fine. The app shows it instead of the pages."""
    problems = []
    for setting in (budget_bytes, max_concurrent_runs, detect_max_pixels, VideoLimits.from_env, model_upload_mb):
        try:
            setting()
        except MrcnnError as err:
            problems.append(str(err))
    return "; ".join(dict.fromkeys(problems)) or None  # $MRCNN_MAX_PIXELS is read twice: said once


# ---- traces ------------------------------------------------------------------------------------------


@st.cache_resource(show_spinner=False)
def trace_cache() -> TraceCache:
    """Every session's traces, and the network runs in flight, under one budget ($MRCNN_TRACE_CACHE_GB,
    default 4 GB), with at most $MRCNN_MAX_CONCURRENT_RUNS runs at once (default 1): least recently used
    first, feature maps before detections (mrcnn.inference.trace_cache)."""
    return TraceCache(budget_bytes(), max_concurrent_runs())


def _session_id() -> str:
    """Names this session in the shared trace cache (made here: nothing a user typed)."""
    return st.session_state.setdefault("trace_session", uuid.uuid4().hex)


def network_slot(loaded: zoo.LoadedModel, image_shape: tuple[int, ...], learn: bool = True):
    """Around a network run a page makes: one of the server's run slots (the page says when it waits for
    one) and room in the trace-cache budget for the run's working memory (``TraceCache.network_run``;
    ``learn=False`` for a block that is more than one run, whose peak is no run's)."""
    waiting = f"Waiting for another session's model run to finish before running {loaded.name}…"
    return trace_cache().network_run(loaded, image_shape, waiting=lambda: st.spinner(waiting), learn=learn)


def trace_for(loaded: zoo.LoadedModel, entry: ImageEntry):
    """The trace of this image under this model: from the trace cache, or run once now.

    A run waits for one of the server's run slots (saying so on the page) and makes room in the budget for its
    working memory first (``TraceCache.network_run``). A cached trace whose RPN settings differ from the
    session's is re-filtered from its features (``Trace.set_rpn``); features the cache dropped to stay in
    budget are recomputed then, by the backbone alone, through the same slots."""
    ss = st.session_state
    cache = trace_cache()
    key = (*loaded.run_key, entry.id)
    rpn = rpn_settings(loaded)
    trace = cache.get(_session_id(), key)
    if trace is None:
        with network_slot(loaded, entry.array.shape) as reservation:
            with st.spinner(f"Running {loaded.name} on {entry.name}…"):
                start = time.perf_counter()
                trace = run_trace(loaded, entry.array, thresholds(), rpn)
                ss["network_ran_ms"] = (time.perf_counter() - start) * 1000.0
            cache.put(_session_id(), key, trace, reservation)
    else:
        if trace.rpn_settings != rpn:
            start = time.perf_counter()
            trace.set_rpn(rpn)
            ss["rpn_rerun_ms"] = (time.perf_counter() - start) * 1000.0
    return trace


def detections_for(trace, thresholds: Thresholds):
    """(detections, re-filter ms or None): a trace already filtered at these thresholds is reused as
    it is, so display-only changes (toggles, colours, a table row) cost only the drawing."""
    if trace.thresholds == thresholds and getattr(trace, "detections", None) is not None:
        return trace.detections, None
    dets = trace.refilter(thresholds)
    return dets, trace.last_refilter_ms


def detections_later(loaded: zoo.LoadedModel, entry: ImageEntry, trace, class_filter: list[str]
                     ) -> Callable[[], Detections]:
    """The trace's current detections (of ``class_filter``'s classes) for a deferred download, which Streamlit
    calls when the button is clicked, without keeping them alive until then: their full-size masks are most
    of a trace's memory, and the trace cache counts them only while it holds the trace (ten R50 sessions held
    ~300 MB outside the budget that way: benchmarks/many_sessions.py). Once the cache has let them go, they
    are computed again: same model, image, RPN settings and thresholds, in a run slot of the budget."""
    kept = weakref.ref(trace.detections)
    thresholds, rpn, image = trace.thresholds, trace.rpn_settings, entry.array

    def detections() -> Detections:
        found = kept()
        if found is None:
            with trace_cache().network_run(loaded, image.shape):
                found = run_trace(loaded, image, thresholds, rpn).detections
        return found.of_classes(class_filter)

    return detections


def safe_trace(loaded: zoo.LoadedModel, entry: ImageEntry):
    """trace_for, or None with the reason on the page when the model cannot run on this image
    (e.g. out of memory); the app keeps working."""
    try:
        return trace_for(loaded, entry)
    except (MrcnnError, ValueError, RuntimeError) as err:
        st.error(f"Could not run {literal(loaded.name)} on {literal(entry.name)}: {literal(err)}", icon=":material/error:")
        return None
