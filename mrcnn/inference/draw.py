"""Overlays of detections on an image, with numpy and Pillow only (no matplotlib).

    overlay = draw_detections(image, detections)                      # masks, outlines, boxes, "name 0.93" tags
    overlay = draw_detections(image, dets, color_by="class", highlight=2, proposals=boxes, proposal_scores=s)

Every function returns a new (H, W, 3) uint8 RGB array and never modifies its input. Colours come from
one fixed palette (``color_for``): by instance, detection i gets ``color_for(i)``; by class, a detection
of label k gets ``color_for(k)`` - so a legend can be built from ``color_for`` alone.
The primitives (``draw_boxes``, ``overlay_mask``, ``mask_outline``) are what the composite is made of.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mrcnn.inference.structures import Detections

Color = tuple[int, int, int]

# Sasha Trubetskoy's "20 distinct colours" without grey, white and black: distinct on photos and on each other.
PALETTE: tuple[Color, ...] = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128),
)
PROPOSAL_COLOR: Color = (255, 255, 255)
_DIM_OPACITY = 0.3  # what is left of the others' opacity when one instance is highlighted


def color_for(index: int) -> Color:
    """The palette colour for ``index`` (cycling): same index, same colour, in every run."""
    return PALETTE[int(index) % len(PALETTE)]


# --- primitives ----------------------------------------------------------------------------------


def mask_outline(mask: np.ndarray, thickness: int = 1) -> np.ndarray:
    """Boundary pixels of a boolean (H, W) mask: the mask minus its 3x3 erosion (``thickness`` times).

    The outline lies inside the mask; pixels on the image border count as boundary.
    """
    mask = np.asarray(mask, dtype=bool)
    inner = mask
    for _ in range(max(int(thickness), 1)):
        p = np.pad(inner, 1, constant_values=False)
        # 3x3 erosion: a pixel stays when all 8 neighbours and itself are set.
        inner = (p[:-2, :-2] & p[:-2, 1:-1] & p[:-2, 2:] & p[1:-1, :-2] & p[1:-1, 1:-1] & p[1:-1, 2:]
                 & p[2:, :-2] & p[2:, 1:-1] & p[2:, 2:])
    return mask & ~inner


def overlay_mask(image: np.ndarray, mask: np.ndarray, color: Sequence[int], opacity: float = 0.5) -> np.ndarray:
    """Blend ``color`` into the pixels of ``mask`` (bool (H, W)) at ``opacity``; a new array."""
    out = _as_rgb(image).copy()
    _blend_mask(out, _check_mask(mask, out.shape[:2]), _as_color(color), _check_opacity(opacity))
    return out


def draw_boxes(image: np.ndarray, boxes: np.ndarray, colors: Sequence[Sequence[int]] | Sequence[int] | None = None,
               width: int = 2, labels: Sequence[str] | None = None) -> np.ndarray:
    """Draw xyxy ``boxes`` (N, 4) with one colour each (or one colour for all; None: the palette),
    and a filled tag with ``labels[i]`` above each box (inside or below when it does not fit above)."""
    out = _as_rgb(image).copy()
    boxes = _check_boxes(boxes, "boxes")
    if labels is not None and len(labels) != len(boxes):
        raise ValueError(f"got {len(labels)} labels for {len(boxes)} boxes")
    colors = _colors_for(colors, len(boxes))
    pil = Image.fromarray(out)
    draw = ImageDraw.Draw(pil, "RGBA")
    for box, color in zip(boxes, colors):
        _draw_box(draw, box, color, width, pil.size)
    if labels is not None:
        font = _font(_font_size(out.shape[:2]))
        for box, color, text in zip(boxes, colors, labels):
            _draw_tag(draw, box, str(text), color, font, pil.size)
    return np.asarray(pil).copy()


# --- the composite -------------------------------------------------------------------------------


def draw_detections(image: np.ndarray, dets: Detections, *, show_masks: bool = True, show_boxes: bool = True,
                    show_labels: bool = True, show_outlines: bool = True, color_by: str = "instance",
                    opacity: float = 0.5, highlight: int | None = None, proposals: np.ndarray | None = None,
                    proposal_scores: np.ndarray | None = None, max_proposals: int = 100) -> np.ndarray:
    """Draw ``dets`` on ``image`` (H, W, 3 uint8 RGB): a new array of the same shape.

    Layers, bottom to top: proposals (thin boxes, the ``max_proposals`` best by ``proposal_scores``,
    brighter when better; in the given order without scores), masks blended at ``opacity`` (large
    ones first so small ones stay visible), mask outlines, boxes, labels "name 0.93".
    ``highlight``: position of one detection to draw thicker and on top while the others are dimmed;
    an index out of range highlights nothing. Masks must be (N, H, W) like the image, or None.
    """
    out = _as_rgb(image).copy()
    if color_by not in ("instance", "class"):
        raise ValueError(f"color_by must be 'instance' or 'class', got {color_by!r}")
    opacity = _check_opacity(opacity)
    n = len(dets)
    boxes = _check_boxes(dets.boxes, "dets.boxes")
    masks = dets.masks
    if masks is not None and n and masks.shape[1:] != out.shape[:2]:
        raise ValueError(f"masks are {masks.shape[1]}x{masks.shape[2]} but the image is "
                         f"{out.shape[0]}x{out.shape[1]} (H x W)")
    if highlight is not None and not 0 <= int(highlight) < n:
        highlight = None
    colors = [color_for(int(dets.labels[i]) if color_by == "class" else i) for i in range(n)]
    dimmed = highlight is not None
    size = out.shape[:2]

    if proposals is not None:
        out = _draw_proposals(out, proposals, proposal_scores, max_proposals)

    if masks is not None and n and (show_masks or show_outlines):
        # Large masks first, the highlighted one last: nothing small disappears under something big.
        areas = dets.areas
        order = sorted(range(n), key=lambda i: (i == highlight, -int(areas[i])))
        for i in order:
            crop = _mask_crop(masks[i], boxes[i])
            if crop is None:
                continue
            ys, xs = crop
            region, mask = out[ys, xs], np.asarray(masks[i][ys, xs], dtype=bool)
            strong = not dimmed or i == highlight
            if show_masks:
                _blend_mask(region, mask, colors[i], opacity if strong else opacity * _DIM_OPACITY)
            if show_outlines:
                outline = mask_outline(mask, thickness=2 if dimmed and strong else 1)
                if strong:
                    region[outline] = colors[i]
                else:
                    _blend_mask(region, outline, colors[i], _DIM_OPACITY * 2)

    if n and (show_boxes or show_labels):
        pil = Image.fromarray(out)
        draw = ImageDraw.Draw(pil, "RGBA")
        base = max(2, round(min(size) / 300))  # 2 px up to 600 px images, thicker on large ones
        order = [i for i in range(n) if i != highlight] + ([highlight] if dimmed else [])
        if show_boxes:
            for i in order:
                strong = not dimmed or i == highlight
                _draw_box(draw, boxes[i], colors[i] if strong else (*colors[i], 110),
                          base * 2 if dimmed and strong else (base if strong else 1), pil.size)
        if show_labels:
            font = _font(_font_size(size))
            names = dets.label_names
            for i in order:
                strong = not dimmed or i == highlight
                _draw_tag(draw, boxes[i], f"{names[i]} {float(dets.scores[i]):.2f}", colors[i], font, pil.size,
                          alpha=255 if strong else 110)
        out = np.asarray(pil).copy()
    return out


# --- helpers -------------------------------------------------------------------------------------


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """A uint8 (H, W, 3) view or copy; grey (H, W) images are expanded. Never the caller's array to write on."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {a.dtype}")
    return a


def _check_opacity(opacity: float) -> float:
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1, got {opacity!r}")
    return float(opacity)


def _check_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask is {mask.shape} but the image is {tuple(shape)}")
    return mask.astype(bool, copy=False)


def _check_boxes(boxes, what: str) -> np.ndarray:
    if boxes is None or np.size(boxes) == 0:
        return np.zeros((0, 4))
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim == 1 and boxes.shape[0] == 4:
        boxes = boxes[None]
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{what} must be (N, 4) xyxy, got shape {boxes.shape}")
    return boxes


def _as_color(color: Sequence[int]) -> Color:
    r, g, b = (int(c) for c in list(color)[:3])
    return r, g, b


def _colors_for(colors, n: int) -> list[Color]:
    if colors is None:
        return [color_for(i) for i in range(n)]
    colors = list(colors)
    if len(colors) == 3 and all(isinstance(c, (int, np.integer)) for c in colors):
        return [_as_color(colors)] * n  # one colour for all
    if len(colors) != n:
        raise ValueError(f"got {len(colors)} colours for {n} boxes")
    return [_as_color(c) for c in colors]


def _blend_mask(region: np.ndarray, mask: np.ndarray, color: Color, opacity: float) -> None:
    """In place: region[mask] = (1 - opacity) * region + opacity * color (rounded)."""
    if opacity <= 0 or not mask.any():
        return
    # Whole-crop arithmetic + copyto(where=) is several times faster than boolean fancy indexing.
    blended = region.astype(np.float32)
    blended *= 1.0 - opacity
    blended += np.asarray(color, np.float32) * opacity + 0.5  # a convex mix: stays within 0..255.5
    np.copyto(region, blended.astype(np.uint8), where=mask[..., None])


def _mask_crop(mask: np.ndarray, box: np.ndarray) -> tuple[slice, slice] | None:
    """The bounding slices of a mask's pixels, or None when it is empty. Searched near its box when every
    pixel is there (a pasted mask spills a little over its box): searching the whole image for each mask
    was most of the drawing time."""
    h, w = mask.shape
    y0 = x0 = 0
    if np.all(np.isfinite(box)):
        margin = 2 + 0.25 * max(float(box[2] - box[0]), float(box[3] - box[1]), 0.0)
        y0, x0 = int(max(box[1] - margin, 0)), int(max(box[0] - margin, 0))
        near = mask[y0:int(min(box[3] + margin + 1, h)), x0:int(min(box[2] + margin + 1, w))]
        if np.count_nonzero(near) == np.count_nonzero(mask):
            mask = near
        else:
            y0 = x0 = 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return slice(y0 + rows[0], y0 + rows[-1] + 1), slice(x0 + cols[0], x0 + cols[-1] + 1)


def _box_pixels(box: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """xyxy float box (pixel edges) -> inclusive integer pixel rectangle inside the image, or None."""
    if not np.all(np.isfinite(box)):
        return None
    w, h = size
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    x0, x1 = max(0, min(x0, x1)), min(w - 1, max(x0, x1) - 1)
    y0, y1 = max(0, min(y0, y1)), min(h - 1, max(y0, y1) - 1)
    if x0 > w - 1 or y0 > h - 1 or x1 < 0 or y1 < 0:
        return None
    return x0, y0, max(x0, x1), max(y0, y1)


def _draw_box(draw: ImageDraw.ImageDraw, box: np.ndarray, color, width: int, size: tuple[int, int]) -> None:
    rect = _box_pixels(box, size)
    if rect is not None:
        draw.rectangle(rect, outline=tuple(color), width=max(int(width), 1))


def _font_size(size: tuple[int, int]) -> int:
    return int(np.clip(round(min(size) / 40), 10, 28))


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: scalable, no font file needed
    except Exception:  # noqa: BLE001 - Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@lru_cache(maxsize=4096)
def _text_bbox(text: str, font) -> tuple[int, int, int, int]:
    """Where ``text`` drawn at (0, 0) lands: measured once per label (a redraw draws the same labels again)."""
    return ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)


def _draw_tag(draw: ImageDraw.ImageDraw, box: np.ndarray, text: str, color: Color, font, size: tuple[int, int],
              alpha: int = 255) -> None:
    """A filled tag with ``text`` at the box's top-left corner: above the box, inside it when there is no
    room above, below it when the box is too short too; always kept inside the image."""
    rect = _box_pixels(box, size)
    if rect is None:
        return
    w, h = size
    x0, y0, x1, y1 = rect
    left, top, right, bottom = _text_bbox(text, font)
    pad = 2
    tw, th = right - left + 2 * pad, bottom - top + 2 * pad
    if y0 - th >= 0:
        ty = y0 - th  # above
    elif y1 - y0 + 1 >= 2 * th or y1 + th > h - 1:
        ty = max(y0, 0)  # inside, at the top
    else:
        ty = y1 + 1  # below
    ty = int(min(max(ty, 0), max(h - th, 0)))
    tx = int(min(max(x0, 0), max(w - tw, 0)))
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    ink = (0, 0, 0) if luminance > 150 else (255, 255, 255)
    draw.rectangle((tx, ty, tx + tw - 1, ty + th - 1), fill=(*color, alpha))
    draw.text((tx + pad - left, ty + pad - top), text, font=font, fill=(*ink, alpha))


def _draw_proposals(out: np.ndarray, proposals: np.ndarray, scores: np.ndarray | None,
                    max_proposals: int) -> np.ndarray:
    boxes = _check_boxes(proposals, "proposals")
    if scores is not None:
        scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        if scores.shape[0] != boxes.shape[0]:
            raise ValueError(f"got {scores.shape[0]} proposal scores for {boxes.shape[0]} proposals")
        order = np.argsort(-scores, kind="stable")[:max(int(max_proposals), 0)]
    else:
        order = np.arange(min(len(boxes), max(int(max_proposals), 0)))
    if order.size == 0:
        return out
    pil = Image.fromarray(out).convert("RGBA")
    layer = Image.new("RGBA", pil.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    k = order.size
    for rank, i in reversed(list(enumerate(order))):  # best drawn last, on top
        alpha = int(round(230 - 150 * rank / max(k - 1, 1)))  # best 230 ... worst 80
        _draw_box(draw, boxes[i], (*PROPOSAL_COLOR, alpha), 1, pil.size)
    return np.asarray(Image.alpha_composite(pil, layer).convert("RGB")).copy()


__all__ = ["PALETTE", "color_for", "mask_outline", "overlay_mask", "draw_boxes", "draw_detections"]
