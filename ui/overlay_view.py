"""Detect's picture: the drawn overlay with each instance's numbers on hover, and zoom.

    overlay_view.show(overlay_rgb, dets, highlight=2, image_key=entry.id)

A Streamlit component (``st.components.v2``) with its script and style in overlay_view.js / .css: the
browser gets the picture (one JPEG/PNG data URI, as plotly figures do) and one outline polygon per instance
(``plots.mask_polygon``, in original pixels, largest first so a small instance inside a large one gets the
hover). It shows the picture in an <img> and the outlines in an SVG over it, both zoomed together: drag a
rectangle or scroll to zoom, double-click to see the whole picture; the zoom is kept while the image stays
the same. It replaced a plotly figure whose redraw alone took ~230 ms in the browser on each slider press
(benchmarks/page_latency.py; an <img> takes ~70 ms).

The picture is swapped only once the new one is decoded, with its outlines at the same moment, so what is
hovered always matches what is seen.

``offer_next`` sends, with each new picture, the pictures one slider step either side (a hidden second
instance of the component): when that slider moves to one of those values the browser shows it at once, on
the key press itself, and the page's round trip that follows brings the same picture (nothing changes then).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import streamlit as st

from mrcnn.inference.structures import Detections
from ui import plots

HERE = Path(__file__).resolve().parent
SHOWN_HEIGHT = (420, 640)  # the picture's height on the page: small images scaled up, tall ones down
# The pictures ahead cost two more draws per press, and a draw's cost grows with its instances: a page sends
# them only for pictures of at most this many. Ten sessions on an R50 with ~100 instances each
# (benchmarks/many_sessions.py) took 530-1080 ms per slider step with them always sent (one draw ~200 ms).
AHEAD_MAX_INSTANCES = 30

# Registered once, at import; isolate_styles=False keeps it in the page's DOM (the benchmark and the
# browser tests find the picture there); every class name in overlay_view.css starts with ``mrcnn-ov``.
_component = st.components.v2.component(
    "mrcnn_overlay_view", js=(HERE / "overlay_view.js").read_text(), css=(HERE / "overlay_view.css").read_text(),
    isolate_styles=False)


def _points(xs: list[float], ys: list[float]) -> str:
    """SVG polygon points, ``"x,y x,y …"``; mask_polygon's coordinates are whole or half pixels."""
    return " ".join(f"{x:g},{y:g}" for x, y in zip(xs, ys))


def view_data(overlay: np.ndarray, dets: Detections, highlight: int | None = None,
              image_key: str = "") -> dict:
    """What the browser gets (JSON): the picture, its size in original pixels, how tall to show it, and per
    instance, largest box first, its outline, hover lines and whether it is the highlighted one.
    ``image_key``: the zoom is kept while it and the size stay the same."""
    h, w = overlay.shape[:2]
    shown, _ = plots.display_picture(overlay)
    regions = []
    if len(dets):
        areas = dets.areas
        box_areas = (dets.boxes[:, 2] - dets.boxes[:, 0]) * (dets.boxes[:, 3] - dets.boxes[:, 1])
        for i in (int(k) for k in np.argsort(-box_areas, kind="stable")):
            xs, ys = (plots.mask_polygon(dets.masks[i], dets.boxes[i]) if dets.masks is not None
                      else plots.box_polygon(dets.boxes[i]))
            regions.append({"index": i, "points": _points(xs, ys),
                            "lines": plots.instance_hover_lines(dets, i, int(areas[i])),
                            "chosen": highlight is not None and i == int(highlight)})
    data = {"src": plots.image_data_uri(shown), "width": w, "height": h, "image_key": image_key,
            "shown_height": min(SHOWN_HEIGHT[1], max(SHOWN_HEIGHT[0], h)), "regions": regions}
    data["signature"] = _signature(data)
    return data


def _signature(data: dict) -> str:
    """Equal for data that show the same thing: the browser skips a picture it already shows."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(data["src"].encode("ascii"))
    for region in data["regions"]:
        digest.update(f"|{region['points']}|{region['chosen']}|{region['lines']}".encode())
    digest.update(f"|{data['image_key']}".encode())
    return digest.hexdigest()


def show(overlay: np.ndarray, dets: Detections, highlight: int | None = None, image_key: str = "",
         key: str = "overlay") -> tuple[str, bool]:
    """The overlay on the page, under a stable ``key``: a new picture updates the element in place (no
    remount, no flicker, the zoom kept). Returns its signature and whether it changed since the last run."""
    data = view_data(overlay, dets, highlight, image_key)
    _component(key=key, data=data, width="stretch", height="content")
    changed = st.session_state.get(f"overlay_shown::{key}") != data["signature"]
    st.session_state[f"overlay_shown::{key}"] = data["signature"]
    return data["signature"], changed


def offer_next(pictures: dict[str, dict], slider: str, value: str, shown: str, key: str = "overlay_next") -> None:
    """Pictures for other values of the slider labelled ``slider`` (``{"0.13": view_data(...)}``, keyed as
    that slider writes its value), valid while the picture with signature ``shown``, drawn for the slider at
    ``value``, is the one on the page (back at ``value``, that picture is shown again). Drawn as a hidden
    element (no gap) where it is called."""
    _component(key=key, data={"next": {"slider": slider, "value": value, "shown": shown, "pictures": pictures}},
               width="stretch", height="content")
