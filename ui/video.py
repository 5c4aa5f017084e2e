"""Detect on a clip: every frame processed once (a progress bar with the time left), then a frame scrubber
whose detections re-filter at once with the page's thresholds, "Open this frame in Inspect", and the
annotated clip to download with the current display settings.

What the session keeps per frame is the frame's candidates (mrcnn.inference.video.FrameCandidates: a few
KB each), never a trace; a frame's pixels are decoded again from the clip when it is shown. Hooks in
ui/detect.py: uploads that are clips come here (``is_clip_upload``/``ingest_clip``), and while a clip is
open the page shows it (``showing_clip``/``render``). Session state: ``video`` (the open clip),
``video_frame`` (the scrubber), ``video_shown_frame`` and ``video_download`` (caches of the last frame
decoded and the last annotated clip made).

Frames run as Detect's images do: with the session's RPN knobs (Inspect's), each in one of the server's run
slots with its memory reserved in the trace cache's budget (``state.network_slot``), taken per frame so that
another session waits at most one frame. The frames are processed again when the model, its weights, device
or precision change (``run_key``). A change of Inspect's RPN knobs alone asks first: processing a clip takes
minutes, and the knobs are turned while looking at one frame. The last few processings are kept (a few KB a
frame), so going back to earlier settings shows their frames at once.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import streamlit as st

from mrcnn.data.video import CLIP_EXTENSIONS, Clip, is_clip, open_clip
from mrcnn.errors import MrcnnError
from mrcnn.inference.draw import draw_detections
from mrcnn.inference.structures import RpnSettings, Thresholds
from mrcnn.inference.video import FrameCandidates, annotate_clip, detect_frames
from ui import state

UPLOAD_TYPES = list(CLIP_EXTENSIONS)  # and animated GIFs, which the image list already has
DISPLAY_KEYS = ("show_masks", "show_boxes", "show_labels", "show_outlines", "color_by", "opacity")
KEPT_PROCESSINGS = 3  # a clip's processings kept per session, the one shown included


@dataclass(eq=False)
class Processing:
    """Every frame of a clip processed under one ``run_key``."""

    rpn: RpnSettings  # the RPN knobs the frames were processed with
    pts: list  # frame index -> timestamp (Clip.frame_at)
    times: list  # frame index -> seconds
    candidates: list  # frame index -> FrameCandidates
    seconds: float  # processing time


@dataclass(eq=False)
class ClipState:
    """The open clip and, once processed, each frame's candidates under the settings it is shown with
    (``run_key``) and under the last few others (``processings``, least recently shown first)."""

    upload_id: str  # the uploader's file id: a failure is recorded under it
    clip: Clip
    run_key: tuple | None = None  # the processing shown; None: none yet
    processings: OrderedDict = field(default_factory=OrderedDict)  # run_key -> Processing
    over_image: str | None = None  # the image the clip is shown over; choosing another closes the clip

    @property
    def name(self) -> str:
        return self.clip.info.name

    @property
    def shown(self) -> Processing:
        return self.processings[self.run_key]

    @property
    def candidates(self) -> list:
        return self.shown.candidates if self.run_key is not None else []

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.candidates)

    def show(self, key: tuple) -> None:
        self.run_key = key
        self.processings.move_to_end(key)

    def keep(self, key: tuple, processing: Processing) -> None:
        self.processings[key] = processing
        self.show(key)
        while len(self.processings) > KEPT_PROCESSINGS:
            self.processings.popitem(last=False)

    def forget_shown(self) -> None:
        """Drop the processing shown (to process the clip again under the same settings)."""
        self.processings.pop(self.run_key, None)
        self.run_key = None


def is_clip_upload(upload) -> bool:
    return is_clip(upload.name, upload.getvalue() if upload.name.lower().endswith(".gif") else None)


def ingest_clip(upload) -> tuple[str, str]:
    """Check an uploaded clip and open it on the page: ("clip", id), or ("error", the reason)."""
    data = upload.getvalue()
    try:
        clip = open_clip(data, name=upload.name)
    except MrcnnError as err:
        return "error", str(err)
    st.session_state["video"] = ClipState(upload.file_id, clip)
    st.session_state["video_frame"] = 0
    st.session_state.pop("video_download", None)
    return "clip", hashlib.sha1(data).hexdigest()


def showing_clip() -> bool:
    """Whether the page shows the open clip: until another image is chosen (or "Clear"), which closes it."""
    ss = st.session_state
    clip: ClipState | None = ss.get("video")
    if clip is None:
        return False
    if clip.over_image is None:  # just uploaded: images uploaded with it were selected after it
        clip.over_image = ss.get("current_image")
    if clip.over_image != ss.get("current_image"):
        close_clip()
        return False
    return True


def close_clip() -> None:
    for key in ("video", "video_shown_frame", "video_download"):
        st.session_state.pop(key, None)


def run_key(loaded, rpn: RpnSettings) -> tuple:
    """Everything that changes what the network computes on a frame: a clip processed under another key is
    processed again (its candidates, and an annotated clip made from them, are another model's)."""
    return (*loaded.run_key, rpn)


def _left(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f" — about {seconds:.0f} s left" if seconds >= 1 else " — almost done"


def _process(loaded, clip: ClipState, rpn: RpnSettings) -> bool:
    """Run the model on every frame once (a progress bar with the time left), each frame in a run slot of
    its own; False after a message."""
    st.session_state.pop("video_download", None)  # drawn from the candidates about to be replaced
    clip.run_key = None  # until every frame is in: a run stopped half-way leaves no clip that looks processed
    bar = st.progress(0.0, text=f"Processing {clip.name}…")

    def progress(done: int, total: int, seconds_left: float | None) -> None:
        bar.progress(done / total if total else 0.0,
                     text=f"Processing {clip.name}: frame {done} of {total or '?'}{_left(seconds_left)}")

    start = time.perf_counter()
    runs = itertools.count()
    pts, times, candidates = [], [], []
    try:
        for result in detect_frames(loaded, clip.clip, state.thresholds(), rpn, keep_candidates=True,
                                    progress=progress,
                                    # the first frame's run measures the model's memory per pixel; the
                                    # others reuse it (the sampler thread cost ~15% of a frame's time)
                                    around_run=lambda array: state.network_slot(loaded, array.shape,
                                                                                learn=next(runs) == 0)):
            pts.append(result.pts)
            times.append(result.time_s)
            candidates.append(result.candidates)
    except (MrcnnError, RuntimeError) as err:  # RuntimeError: the model ran out of memory, say
        st.session_state["ingested_uploads"][clip.upload_id] = ("error", str(err))
        close_clip()
        st.error(f"**{state.literal(clip.name)}** was not processed: {state.literal(err)}", icon=":material/broken_image:")
        return False
    bar.empty()
    clip.keep(run_key(loaded, rpn), Processing(rpn, pts, times, candidates, time.perf_counter() - start))
    st.session_state["video_frame"] = min(st.session_state.get("video_frame", 0), len(candidates) - 1)
    return True


def _frame_pixels(clip: ClipState, index: int) -> np.ndarray:
    """The frame decoded again (the session keeps only the last one shown)."""
    ss = st.session_state
    cached = ss.get("video_shown_frame")
    if cached is not None and cached[0] == (id(clip), index):
        return cached[1]
    array = clip.clip.frame_at(index, clip.shown.pts[index])
    ss["video_shown_frame"] = ((id(clip), index), array)
    return array


def _open_in_inspect(clip: ClipState, index: int, array: np.ndarray) -> None:
    stem = Path(clip.name).stem or "clip"
    entry = state.add_image(state.make_entry(array, f"{stem}-frame{index}.png", "upload"))
    clip.over_image = entry.id  # back on Detect, the clip is still open
    st.switch_page("ui/inspect.py")


@st.fragment
def _explore(loaded, clip: ClipState, controls: Callable[[list[str]], dict]) -> None:
    """Controls on the left; the scrubbed frame, its detections and the downloads on the right."""
    ctrl, out = st.columns([1, 3], gap="medium")
    with ctrl:
        opts = controls([c for c in dict.fromkeys(loaded.categories[1:]) if c != "N/A"])
    thresholds = state.thresholds()
    shown = clip.shown
    n = len(shown.candidates)
    with out:
        index = st.slider("Frame", 0, max(n - 1, 1), key="video_frame", disabled=n < 2, persist_state="session",
                          help="Each frame's detections were computed once; moving this only re-filters them")
        index = min(int(index), n - 1)
        start = time.perf_counter()
        frame_cands: FrameCandidates = shown.candidates[index]
        dets = frame_cands.refilter(thresholds).of_classes(opts.get("class_filter", []))
        refilter_ms = (time.perf_counter() - start) * 1000.0
        array = _frame_pixels(clip, index)
        st.markdown(f"### {len(dets)} detections")
        st.caption(f"Frame {index + 1} of {n} · {shown.times[index]:.2f} s · re-filtered in {refilter_ms:.0f} ms — "
                   f"the network ran once per frame ({shown.seconds:.0f} s for the clip)")
        if not frame_cands.exact_for(thresholds):
            st.caption(f":orange[The frames keep candidates scoring above {frame_cands.floor:.2f}: lower "
                       "thresholds show only those.]")
            if st.button("Process the clip again at this threshold", key="video_again", icon=":material/replay:"):
                clip.forget_shown()
                st.rerun()
        if shown.rpn == state.rpn_settings(loaded):  # else _offer_rpn_processing says which knobs they had
            state.rpn_note(shown.rpn, loaded)
        st.image(draw_detections(array, dets, **state.display_settings()), width="stretch")
        st.caption(f"{state.literal(clip.name)} · {clip.clip.info.width}×{clip.clip.info.height} px · {clip.clip.info.fps:.3g} fps "
                   f"· model `{loaded.name}` · kept per frame: {clip.nbytes / n / 1e3:.0f} KB on average")
        c1, c2 = st.columns(2)
        if c1.button("Open this frame in Inspect", key="video_inspect", icon=":material/account_tree:",
                     width="stretch"):
            _open_in_inspect(clip, index, array)
        _download(clip, thresholds, opts.get("class_filter", []), c2)


def _download(clip: ClipState, thresholds: Thresholds, class_filter: list[str], where) -> None:
    """The annotated clip at the current thresholds and display settings, made on request."""
    ss = st.session_state
    settings = (id(clip), clip.run_key, thresholds, tuple(class_filter),
                tuple(sorted(state.display_settings().items())))
    made = ss.get("video_download")
    if made is None or made[0] != settings:
        if not where.button("Make the annotated clip", key="video_make", icon=":material/movie:", width="stretch",
                            help="Every frame drawn with the current thresholds and display settings"):
            return
        bar = st.progress(0.0, text="Drawing every frame…")

        def progress(done: int, total: int, seconds_left: float | None) -> None:
            bar.progress(done / total if total else 0.0, text=f"Frame {done} of {total or '?'}{_left(seconds_left)}")

        buf = io.BytesIO()
        try:
            annotate_clip(clip.clip, lambda i: clip.candidates[i].refilter(thresholds).of_classes(class_filter),
                          buf, progress=progress, **state.display_settings())
        except MrcnnError as err:
            st.error(f"Could not make the annotated clip: {state.literal(err)}", icon=":material/error:")
            return
        bar.empty()
        ss["video_download"] = made = (settings, buf.getvalue())
    where.download_button("Download the annotated clip", data=made[1], mime="video/mp4",
                          file_name=f"{Path(clip.name).stem or 'clip'}-detections.mp4", key="video_dl",
                          on_click="ignore", icon=":material/download:", width="stretch")


def render(loaded, controls: Callable[[list[str]], dict]) -> None:
    """The open clip: processed once under the current model, then explored."""
    clip: ClipState = st.session_state["video"]
    info = clip.clip.info
    head, close = st.columns([5, 1])
    head.markdown(f"**{state.literal(clip.name)}** · {info.width}×{info.height} px · {info.frames or '?'} frames at "
                  f"{info.fps:.3g} fps")
    if close.button("Close clip", key="video_close", icon=":material/close:", width="stretch"):
        close_clip()
        st.rerun()
    rpn = state.rpn_settings(loaded)
    wanted = run_key(loaded, rpn)
    if clip.run_key != wanted:
        if wanted in clip.processings:  # processed under these settings before: shown at once
            clip.show(wanted)
        elif clip.run_key is not None and clip.run_key[:-1] == wanted[:-1]:  # only Inspect's RPN knobs changed
            if not _offer_rpn_processing(loaded, clip, rpn):
                return
        elif not _process(loaded, clip, rpn):
            return
    _explore(loaded, clip, controls)


def _offer_rpn_processing(loaded, clip: ClipState, rpn: RpnSettings) -> bool:
    """Inspect's RPN knobs changed since the clip was processed: the frames stay as they were processed
    until the user asks for the clip to be processed again. False after a message (the clip failed)."""
    with st.container(border=True):
        st.markdown(f":orange[These frames were processed with other RPN knobs] ({state.rpn_text(clip.shown.rpn)}); "
                    f"Inspect's are now {state.rpn_text(rpn)}. Processing the clip again runs the network on "
                    f"every frame (it took {clip.shown.seconds:.0f} s).")
        if not st.button("Process the clip with the current RPN knobs", key="video_rpn_again",
                         icon=":material/replay:"):
            return True
    if _process(loaded, clip, rpn):
        st.rerun()  # drawn again without this offer
    return False
