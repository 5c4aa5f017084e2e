"""Plotly figure builders for the app: pure functions of numpy arrays and trace data (no streamlit).

    fig = image_figure(entry.array, "original")        # a zoomable picture
    fig = heatmap_figure(trace.objectness_maps[0].max(0).values.sigmoid().numpy(), "objectness P2")

Images go to the browser as one compressed picture (``go.Image(source=data URI)``), never as a JSON
array of pixels, so redrawing stays fast for large images. Detect's overlay is not a plotly figure
(ui/overlay_view.py: plotly's redraw alone took longer than the page's target); it shares the picture
(``display_picture``), the hover outlines (``mask_polygon``) and texts (``instance_hover_lines``) here.

``image_figure`` and ``timings_figure`` are built as plain dicts and wrapped once without plotly's
validation (``_figure``): validating a picture and a hundred hover regions took ~70 ms per redraw here, and
``st.plotly_chart`` copies a figure once more before it serialises it; the dicts hold only what plotly
accepts (tests/test_plots.py validates them).
"""
from __future__ import annotations

import base64
import io
from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mrcnn.inference.structures import Detections

MARGIN = {"l": 0, "r": 0, "t": 30, "b": 0}
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000"]


def image_data_uri(image: np.ndarray, fmt: str = "auto") -> str:
    """An RGB uint8 image as a data: URI. ``auto``: PNG for tiny images, else high-quality JPEG (a
    512×512 scene is ~500 kB and ~20 ms as PNG, a fifth of both as JPEG)."""
    from PIL import Image

    if fmt == "auto":
        fmt = "png" if image.shape[0] * image.shape[1] <= 160 * 160 else "jpeg"
    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(image).save(buf, format="JPEG", quality=92)
    else:
        Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(data: list[dict], layout: dict) -> go.Figure:
    """A figure from plain trace and layout dicts, not validated (see the module docstring)."""
    return go.Figure({"data": data, "layout": layout}, _validate=False)


def _image_layout(height: int, width: int, title: str | None, max_height: int) -> dict:
    shown_h = min(max_height, max(420, height))  # small images are scaled up to a readable size
    return {"height": shown_h, "margin": MARGIN, "title": {"text": title} if title else None, "dragmode": "zoom",
            "showlegend": False, "hoverlabel": {"align": "left"},
            "xaxis": {"visible": False, "range": [-0.5, width - 0.5], "constrain": "domain"},
            "yaxis": {"visible": False, "range": [height - 0.5, -0.5], "scaleanchor": "x", "constrain": "domain"}}


MAX_DISPLAY_SIDE = 1600  # larger pictures are shrunk for the browser; axes stay in original pixels


def image_figure(image: np.ndarray, title: str | None = None, max_height: int = 640,
                 max_side: int = MAX_DISPLAY_SIDE) -> go.Figure:
    """A zoomable picture (no hover on the pixels). Axes are in the image's own pixels even when a
    large picture is sent shrunk (each shown pixel then spans ``factor`` original pixels)."""
    return _figure([_picture(image, max_side)], _image_layout(*image.shape[:2], title, max_height))


def display_picture(image: np.ndarray, max_side: int = MAX_DISPLAY_SIDE) -> tuple[np.ndarray, int]:
    """(picture to send, factor): ``image`` shrunk by a whole ``factor`` until no side exceeds ``max_side``
    (1: as it is). Each sent pixel then spans ``factor`` original pixels."""
    h, w = image.shape[:2]
    factor = int(np.ceil(max(h, w) / max_side)) if max(h, w) > max_side else 1
    if factor == 1:
        return image, 1
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((max(1, w // factor), max(1, h // factor)),
                                                    Image.Resampling.BILINEAR)), factor


def _picture(image: np.ndarray, max_side: int = MAX_DISPLAY_SIDE) -> dict:
    """The image trace of ``image_figure``."""
    shown, factor = display_picture(image, max_side)
    offset = (factor - 1) / 2  # centre of the first shown pixel, in original pixels
    return {"type": "image", "source": image_data_uri(shown), "hoverinfo": "skip", "dx": factor, "dy": factor,
            "x0": offset, "y0": offset}


def box_polygon(box: Sequence[float]) -> tuple[list[float], list[float]]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0]


def mask_polygon(mask: np.ndarray, box: Sequence[float], max_rows: int = 48) -> tuple[list[float], list[float]]:
    """A hover outline for one instance: per mask row its leftmost and rightmost pixel (exact for
    shapes convex along rows, a close envelope otherwise), at most ``max_rows`` rows. The box when
    the mask is empty."""
    h, w = mask.shape
    x0, y0 = max(int(box[0]), 0), max(int(box[1]), 0)
    x1, y1 = min(int(np.ceil(box[2])) + 1, w), min(int(np.ceil(box[3])) + 1, h)
    crop = mask[y0:y1, x0:x1]
    rows = np.flatnonzero(crop.any(axis=1)) if crop.size else np.zeros(0, np.int64)
    if rows.size == 0:
        return box_polygon(box)
    if rows.size > max_rows:
        rows = rows[np.linspace(0, rows.size - 1, max_rows).round().astype(int)]
    sel = crop[rows]
    left = sel.argmax(axis=1) + x0 - 0.5
    right = sel.shape[1] - 1 - sel[:, ::-1].argmax(axis=1) + x0 + 0.5
    ys = (rows + y0).astype(float)
    ys_top, ys_bottom = ys.copy(), ys.copy()
    ys_top[0] -= 0.5
    ys_bottom[-1] += 0.5
    xs = [*left.tolist(), *right[::-1].tolist(), float(left[0])]
    yy = [*ys_top[:1].tolist(), *ys[1:-1].tolist(), *ys_bottom[-1:].tolist()] if len(ys) > 1 else [ys_top[0]]
    if len(ys) == 1:  # one row: a thin rectangle
        return [float(left[0]), float(right[0]), float(right[0]), float(left[0]), float(left[0])], \
               [ys[0] - 0.5, ys[0] - 0.5, ys[0] + 0.5, ys[0] + 0.5, ys[0] - 0.5]
    return xs, [*yy, *yy[::-1], yy[0]]


def instance_hover_lines(dets: Detections, i: int, area: int | None = None) -> list[str]:
    """What hovering instance ``i`` shows: its title (``#i class``), then its score, box and area."""
    x0, y0, x1, y1 = (float(v) for v in dets.boxes[i])
    area = int(dets.areas[i]) if area is None else area
    return [f"#{i} {dets.categories[int(dets.labels[i])]}", f"score {float(dets.scores[i]):.3f}",
            f"box [{x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}]", f"area {area} px"]


def focus_ranges(box: Sequence[float], image_size: tuple[int, int], margin: float = 1.0,
                 min_side: float = 48.0) -> tuple[list[float], list[float]]:
    """Axis ranges (x, then y reversed) showing ``box`` with ``margin`` × its size around it, at least
    ``min_side`` pixels, clipped to the image."""
    h, w = image_size
    x0, y0, x1, y1 = (float(v) for v in box)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max((x1 - x0) * (1 + 2 * margin), (y1 - y0) * (1 + 2 * margin), min_side) / 2
    xa, xb = max(cx - half, -0.5), min(cx + half, w - 0.5)
    ya, yb = max(cy - half, -0.5), min(cy + half, h - 0.5)
    return [xa, xb], [yb, ya]


def boxes_figure(image: np.ndarray, groups: Sequence[dict], title: str | None = None,
                 max_height: int = 520, focus: Sequence[float] | None = None) -> go.Figure:
    """A picture with groups of boxes drawn as outlines with hover.

    Each group: ``{"boxes": (N, 4), "name": str, "color": css, "texts": [str]*N (optional),
    "dash": "solid"|"dash"|"dot" (optional), "width": float (optional)}``. ``focus``: a box to zoom on."""
    fig = image_figure(image, title, max_height)
    for g in groups:
        boxes = np.asarray(g["boxes"], dtype=np.float32).reshape(-1, 4)
        texts = g.get("texts") or [g["name"]] * len(boxes)
        xs, ys, hover = [], [], []
        for box, text in zip(boxes, texts):
            bx, by = box_polygon(box)
            xs += bx + [None]
            ys += by + [None]
            hover += [text] * 5 + [None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", name=g["name"], text=hover, hoverinfo="text",
                                 line={"color": g.get("color", "#ffff00"), "width": g.get("width", 2),
                                       "dash": g.get("dash", "solid")}))
    fig.update_layout(showlegend=True, legend={"orientation": "h", "y": -0.02, "yanchor": "top"})
    if focus is not None:  # zoomed on one region; double-click shows the whole picture
        xr, yr = focus_ranges(focus, image.shape[:2])
        fig.update_xaxes(range=xr)
        fig.update_yaxes(range=yr)
    return fig


def heatmap_figure(values: np.ndarray, title: str | None = None, colorscale: str = "Viridis",
                   zmin: float | None = None, zmax: float | None = None, height: int = 320,
                   colorbar_title: str | None = None) -> go.Figure:
    """A 2-D array as a heatmap, row 0 at the top, square cells."""
    values = np.asarray(values, dtype=np.float32)
    if values.ndim != 2:
        raise ValueError(f"heatmap_figure expects a 2-D array, got shape {values.shape}")
    fig = go.Figure(go.Heatmap(z=values, colorscale=colorscale, zmin=zmin, zmax=zmax,
                               colorbar={"title": colorbar_title} if colorbar_title else None,
                               hovertemplate="x %{x}, y %{y}: %{z:.3f}<extra></extra>"))
    fig.update_layout(height=height, margin=MARGIN, title=title)
    fig.update_yaxes(autorange="reversed", scaleanchor="x", constrain="domain", showgrid=False)
    fig.update_xaxes(constrain="domain", showgrid=False)
    return fig


def mask_figure(probs: np.ndarray, mask_thresh: float, title: str | None = None, height: int = 320,
                x0: float = 0.0, y0: float = 0.0) -> go.Figure:
    """Mask probabilities as a heatmap with the outline where they cross ``mask_thresh``.
    (x0, y0): where the array's first pixel sits, for crops of a larger picture."""
    probs = np.asarray(probs, dtype=np.float32)
    fig = heatmap_figure(probs, title, colorscale="Magma", zmin=0.0, zmax=1.0, height=height)
    fig.data[0].update(x0=x0, y0=y0)
    if probs.size and probs.min() < mask_thresh < probs.max():
        # coloring="lines" with a one-colour scale: the outline only, no fill between levels
        fig.add_trace(go.Contour(z=probs, x0=x0, y0=y0, showscale=False, hoverinfo="skip",
                                 contours={"start": mask_thresh, "end": mask_thresh, "size": 1.0,
                                           "coloring": "lines"},
                                 colorscale=[[0, "#00e5ff"], [1, "#00e5ff"]],
                                 line={"width": 2}, name=f"threshold {mask_thresh:.2f}"))
    return fig


def heatmap_grid(maps: Sequence[tuple[str, np.ndarray]], cols: int = 3, colorscale: str = "Viridis",
                 zmin: float | None = None, zmax: float | None = None, height_per_row: int = 260) -> go.Figure:
    """Several named 2-D maps side by side (e.g. one per FPN level), each with its shape in the title.
    Without zmin/zmax each map gets its own colour range (no colour bar; hover gives the values)."""
    n = max(len(maps), 1)
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    titles = [f"{name} ({m.shape[0]}×{m.shape[1]})" for name, m in maps]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.04,
                        vertical_spacing=0.12)
    for k, (name, m) in enumerate(maps):
        r, c = k // cols + 1, k % cols + 1
        fig.add_trace(go.Heatmap(z=np.asarray(m, dtype=np.float32), colorscale=colorscale, zmin=zmin, zmax=zmax,
                                 showscale=k == 0 and zmin is not None and zmax is not None, name=name,
                                 hovertemplate=f"{name} x %{{x}}, y %{{y}}: %{{z:.3f}}<extra></extra>"),
                      row=r, col=c)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{k + 1 if k else ''}", showticklabels=False,
                         row=r, col=c)
        fig.update_xaxes(showticklabels=False, row=r, col=c)
    fig.update_layout(height=rows * height_per_row + 40, margin={"l": 0, "r": 0, "t": 40, "b": 0})
    return fig


def histogram_figure(series: dict[str, np.ndarray], bins: int = 60, value_range: tuple[float, float] | None = None,
                     title: str | None = None, height: int = 300) -> go.Figure:
    """Overlaid histograms, binned here with numpy (no raw values go to the browser)."""
    fig = go.Figure()
    finite = [np.asarray(v, np.float64)[np.isfinite(v)] for v in series.values()]
    if value_range is None:
        allv = np.concatenate(finite) if finite and sum(v.size for v in finite) else np.zeros(1)
        lo, hi = np.percentile(allv, [0.5, 99.5]) if allv.size else (0.0, 1.0)
        value_range = (float(lo), float(hi) if hi > lo else float(lo) + 1.0)
    edges = np.linspace(value_range[0], value_range[1], bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    for (name, _), values in zip(series.items(), finite):
        counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
        fig.add_trace(go.Bar(x=centers, y=counts, name=name, opacity=0.6, width=edges[1] - edges[0]))
    fig.update_layout(barmode="overlay", height=height, margin=MARGIN, title=title, bargap=0,
                      legend={"orientation": "h"}, yaxis_title="count")
    return fig


def class_probs_figure(probs: np.ndarray, categories: Sequence[str], chosen: int | None = None,
                       top: int = 20, height: int = 300) -> go.Figure:
    """Bar chart of one proposal's class probabilities (the ``top`` largest, background included)."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, kind="stable")[:top]
    colors = ["#d62728" if chosen is not None and int(c) == int(chosen) else
              ("#7f7f7f" if int(c) == 0 else "#1f77b4") for c in order]
    fig = go.Figure(go.Bar(x=[categories[int(c)] for c in order], y=probs[order], marker_color=colors,
                           hovertemplate="%{x}: %{y:.4f}<extra></extra>"))
    fig.update_layout(height=height, margin=MARGIN, yaxis={"range": [0, 1], "title": "probability"},
                      title="class probabilities (box head)")
    return fig


def timings_figure(timings_ms: dict[str, float], extra: dict[str, float] | None = None,
                   height: int = 260) -> go.Figure:
    """Horizontal bars: milliseconds per stage, in pipeline order (``extra`` drawn in another colour)."""
    names = list(timings_ms)
    values = [float(timings_ms[k]) for k in names]
    bars = [{"type": "bar", "y": names, "x": values, "orientation": "h", "name": "network run",
             "marker": {"color": "#1f77b4"}, "text": [f"{v:.1f} ms" for v in values], "textposition": "auto",
             "hovertemplate": "%{y}: %{x:.1f} ms<extra></extra>"}]
    if extra:
        bars.append({"type": "bar", "y": list(extra), "x": [float(v) for v in extra.values()], "orientation": "h",
                     "name": "this re-filter", "marker": {"color": "#ff7f0e"},
                     "text": [f"{v:.1f} ms" for v in extra.values()], "textposition": "auto"})
    return _figure(bars, {"height": height, "margin": MARGIN, "xaxis": {"title": {"text": "ms"}},
                          "yaxis": {"autorange": "reversed"}, "legend": {"orientation": "h"},
                          "showlegend": bool(extra)})


def nms_figure(summary: Sequence[dict], height: int = 280) -> go.Figure:
    """Per class: candidates above the score threshold before per-class NMS and how many it kept."""
    names = [r["class"] for r in summary]
    fig = go.Figure([
        go.Bar(x=names, y=[r["before_nms"] for r in summary], name="before NMS", marker_color="#aec7e8"),
        go.Bar(x=names, y=[r["kept"] for r in summary], name="kept", marker_color="#1f77b4"),
    ])
    fig.update_layout(barmode="group", height=height, margin=MARGIN, yaxis_title="candidates",
                      legend={"orientation": "h"})
    return fig


# ---- array helpers for the pictures (numpy only) ------------------------------------------------------
def feature_map_2d(feature: np.ndarray, channel: int | None = None) -> np.ndarray:
    """(C, H, W) -> (H, W): one channel, or the mean over channels when ``channel`` is None."""
    feature = np.asarray(feature, dtype=np.float32)
    if feature.ndim != 3:
        raise ValueError(f"expected (C, H, W), got shape {feature.shape}")
    if channel is None:
        return feature.mean(axis=0)
    if not 0 <= channel < feature.shape[0]:
        raise ValueError(f"channel {channel} is outside 0..{feature.shape[0] - 1}")
    return feature[channel]


def downsample(values: np.ndarray, max_side: int = 160, how: str = "mean") -> np.ndarray:
    """Shrink a 2-D map by an integer factor (block mean or max) until both sides fit ``max_side``,
    so big feature maps do not send hundreds of thousands of cells to the browser."""
    values = np.asarray(values, dtype=np.float32)
    f = int(np.ceil(max(values.shape) / max_side)) if max(values.shape) > max_side else 1
    if f <= 1:
        return values
    h, w = values.shape
    ph, pw = (-h) % f, (-w) % f
    padded = np.pad(values, ((0, ph), (0, pw)), mode="edge")
    blocks = padded.reshape((h + ph) // f, f, (w + pw) // f, f)
    return blocks.max(axis=(1, 3)) if how == "max" else blocks.mean(axis=(1, 3))


def objectness_2d(logits: np.ndarray) -> np.ndarray:
    """(A, H, W) objectness logits -> (H, W) probability of the most confident anchor at each cell."""
    logits = np.asarray(logits, dtype=np.float32)
    return 1.0 / (1.0 + np.exp(-logits.max(axis=0)))


def split_deltas(delta_maps: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-level (A*4, H, W) box deltas -> the four components (dx, dy, dw, dh) over all anchors."""
    parts = {k: [] for k in ("dx", "dy", "dw", "dh")}
    for d in delta_maps:
        d = np.asarray(d, dtype=np.float32)
        a4, h, w = d.shape
        d = d.reshape(a4 // 4, 4, h * w)  # (A*4, H, W) -> (A, 4, H*W)
        for j, k in enumerate(parts):
            parts[k].append(d[:, j].reshape(-1))
    return {k: (np.concatenate(v) if v else np.zeros(0, np.float32)) for k, v in parts.items()}
