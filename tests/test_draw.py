"""mrcnn.inference.draw: overlays are new arrays, masks touch only their pixels, colours are stable, edge cases draw."""
from __future__ import annotations

import numpy as np
import pytest

from mrcnn.inference.draw import PALETTE, color_for, draw_boxes, draw_detections, mask_outline, overlay_mask
from mrcnn.inference.structures import Detections
from tests.helpers import CATEGORIES as CATS

H, W = 96, 128


def background() -> np.ndarray:
    yy, xx = np.mgrid[0:H, 0:W]
    return np.stack([xx * 2 % 256, yy * 2 % 256, np.full_like(xx, 60)], -1).astype(np.uint8)


def make_dets(with_masks: bool = True) -> Detections:
    boxes = np.array([[10, 30, 50, 70], [60, 40, 120, 90], [70, 2, 100, 20]], np.float32)
    masks = np.zeros((3, H, W), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[i, y0 + 2:y1 - 2, x0 + 2:x1 - 2] = True
    return Detections(boxes=boxes, scores=np.array([0.93, 0.71, 0.55], np.float32),
                      labels=np.array([1, 2, 1], np.int64), masks=masks if with_masks else None,
                      candidate_ids=np.arange(3, dtype=np.int64), categories=CATS, image_size=(H, W))


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=2)


def test_output_is_a_new_rgb_uint8_array_and_the_input_is_untouched():
    img = background()
    before = img.copy()
    dets = make_dets()
    masks_before = dets.masks.copy()
    out = draw_detections(img, dets, proposals=dets.boxes + 3, proposal_scores=np.ones(3))
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert out is not img and not np.shares_memory(out, img)
    np.testing.assert_array_equal(img, before)
    np.testing.assert_array_equal(dets.masks, masks_before)
    assert changed(out, img).any()


def test_masks_change_pixels_inside_the_masks_only():
    img, dets = background(), make_dets()
    out = draw_detections(img, dets, show_boxes=False, show_labels=False)
    diff = changed(out, img)
    union = dets.masks.any(axis=0)
    assert not diff[~union].any()
    assert diff[union].mean() > 0.95  # every masked pixel is tinted (a colour equal to the image is rare)


def test_opacity_blends_towards_the_colour():
    img = np.full((H, W, 3), 100, np.uint8)
    dets = make_dets()[[0]]
    color = np.array(color_for(0), float)
    inside = (45, 25)  # well inside mask 0, away from its outline
    for opacity in (0.0, 0.5, 1.0):
        out = draw_detections(img, dets, show_boxes=False, show_labels=False, show_outlines=False, opacity=opacity)
        expected = np.rint(100 * (1 - opacity) + color * opacity)
        assert np.abs(out[inside[0], inside[1]].astype(float) - expected).max() <= 1
    with pytest.raises(ValueError, match="opacity"):
        draw_detections(img, dets, opacity=1.5)


def test_outlines_lie_on_the_mask_boundary():
    img, dets = np.zeros((H, W, 3), np.uint8), make_dets()[[1]]
    out = draw_detections(img, dets, show_masks=False, show_boxes=False, show_labels=False)
    drawn = changed(out, img)
    np.testing.assert_array_equal(drawn, mask_outline(dets.masks[0]))
    assert (out[drawn] == color_for(0)).all()


def test_mask_outline_is_the_boundary_of_a_square():
    mask = np.zeros((10, 10), bool)
    mask[2:8, 3:9] = True
    outline = mask_outline(mask)
    assert outline.sum() == 2 * 6 + 2 * 4
    assert not outline[3:7, 4:8].any() and outline[2, 3] and outline[7, 8]
    assert (mask_outline(mask, thickness=2) >= outline).all() and mask_outline(mask, thickness=2).sum() == 32
    edge = np.ones((4, 4), bool)  # touching the image border: the border is boundary
    assert mask_outline(edge).sum() == 12
    assert not mask_outline(np.zeros((5, 5), bool)).any()


def test_colours_are_deterministic_distinct_and_cycle():
    assert [color_for(i) for i in range(5)] == [color_for(i) for i in range(5)]
    assert len(set(PALETTE)) == len(PALETTE) >= 10
    assert color_for(len(PALETTE)) == color_for(0)
    assert all(isinstance(c, int) and 0 <= c <= 255 for c in color_for(3))
    img, dets = background(), make_dets()
    a = draw_detections(img, dets)
    np.testing.assert_array_equal(a, draw_detections(img, dets))


def test_colour_by_class_uses_the_label_index():
    img, dets = np.zeros((H, W, 3), np.uint8), make_dets()  # labels 1, 2, 1
    kw = dict(show_masks=False, show_boxes=False, show_labels=False)
    by_class = draw_detections(img, dets, color_by="class", **kw)
    by_instance = draw_detections(img, dets, color_by="instance", **kw)
    for i, label in enumerate(dets.labels):
        outline = mask_outline(dets.masks[i])
        assert (by_class[outline] == color_for(int(label))).all()
        assert (by_instance[outline] == color_for(i)).all()
    with pytest.raises(ValueError, match="color_by"):
        draw_detections(img, dets, color_by="rainbow")


def test_boxes_and_labels_are_drawn_in_the_instance_colour():
    img, dets = np.zeros((H, W, 3), np.uint8), make_dets()[[1]]
    out = draw_detections(img, dets, show_masks=False, show_outlines=False, show_labels=False)
    assert tuple(out[40, 60]) == color_for(0) and tuple(out[89, 119]) == color_for(0)  # corners of [60,40,120,90]
    assert (out[60:80, 70:110] == 0).all()  # the inside stays clear
    labelled = draw_detections(img, dets, show_masks=False, show_outlines=False)
    above = changed(labelled, out)
    assert above.any() and np.nonzero(above)[0].max() < 40  # the tag sits above the box


def test_label_goes_inside_when_the_box_touches_the_top():
    img = np.zeros((H, W, 3), np.uint8)
    dets = make_dets()[[2]]  # box y0 = 2: no room above
    out = draw_detections(img, dets, show_masks=False, show_outlines=False)
    assert changed(out, img)[:, 70:101].any()
    assert not changed(out, img)[:, :60].any()  # the tag stays near its box


def test_empty_detections_and_no_masks_draw_fine():
    img = background()
    empty = Detections.empty(CATS, (H, W))
    np.testing.assert_array_equal(draw_detections(img, empty), img)
    no_masks = Detections.empty(CATS, (H, W), with_masks=False)
    np.testing.assert_array_equal(draw_detections(img, no_masks, highlight=0), img)
    boxes_only = make_dets(with_masks=False)
    out = draw_detections(img, boxes_only, show_labels=False)
    diff = changed(out, img)
    assert diff.any() and not diff[35:65, 15:45].any()  # boxes only: the inside of box 0 ([10, 30, 50, 70]) untouched


def test_mask_size_must_match_the_image():
    dets = make_dets()
    with pytest.raises(ValueError, match="masks are 96x128"):
        draw_detections(np.zeros((50, 50, 3), np.uint8), dets)


def test_highlight_is_thicker_and_dims_the_others():
    img, dets = np.full((H, W, 3), 100, np.uint8), make_dets()
    plain = draw_detections(img, dets, show_labels=False)
    lit = draw_detections(img, dets, show_labels=False, highlight=1)
    inside0, inside1 = (50, 30), (65, 90)
    # the others: closer to the image than without a highlight
    d_plain = np.abs(plain[inside0].astype(int) - 100).sum()
    d_lit = np.abs(lit[inside0].astype(int) - 100).sum()
    assert d_lit < d_plain
    # the highlighted one: as strong as before, with a thicker box
    np.testing.assert_array_equal(lit[inside1], plain[inside1])
    box_px = lambda o: (o[40:90, 60:120] == color_for(1)).all(axis=2).sum()  # noqa: E731
    assert box_px(lit) > box_px(plain)
    # out of range: nothing highlighted
    np.testing.assert_array_equal(draw_detections(img, dets, show_labels=False, highlight=7), plain)


def test_proposals_top_k_by_score():
    img = np.zeros((H, W, 3), np.uint8)
    empty = Detections.empty(CATS, (H, W))
    proposals = np.array([[5, 5, 20, 20], [30, 30, 60, 60], [70, 10, 110, 50]], np.float32)
    scores = np.array([0.2, 0.9, 0.5], np.float32)
    out = draw_detections(img, empty, proposals=proposals, proposal_scores=scores, max_proposals=2)
    diff = changed(out, img)
    assert diff[30, 30:61].any() and diff[10, 70:111].any()  # the two best
    assert not diff[5, 5:21].any()  # the worst left out
    assert out[30, 45].astype(int).sum() > out[10, 90].astype(int).sum()  # better is brighter
    all_three = changed(draw_detections(img, empty, proposals=proposals), img)
    assert all_three[5, 5:21].any()  # no scores: the first max_proposals in order
    assert not changed(draw_detections(img, empty, proposals=proposals, max_proposals=0), img).any()
    with pytest.raises(ValueError, match="proposal scores"):
        draw_detections(img, empty, proposals=proposals, proposal_scores=scores[:2])


def test_primitives():
    img = np.zeros((20, 30, 3), np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:10, 5:10] = True
    out = overlay_mask(img, mask, (200, 100, 0), 0.5)
    np.testing.assert_array_equal(changed(out, img), mask)
    assert tuple(out[7, 7]) == (100, 50, 0) and (img == 0).all()
    boxes = np.array([[2, 2, 12, 12], [15, 5, 28, 18]], np.float32)
    one = draw_boxes(img, boxes, (0, 255, 0), width=1)
    assert tuple(one[2, 2]) == (0, 255, 0) and tuple(one[17, 27]) == (0, 255, 0) and (img == 0).all()
    two = draw_boxes(img, boxes, [(255, 0, 0), (0, 0, 255)], width=1, labels=["a", "b"])
    assert tuple(two[11, 11]) == (255, 0, 0) and tuple(two[17, 27]) == (0, 0, 255)
    np.testing.assert_array_equal(draw_boxes(img, np.zeros((0, 4)), []), img)
    # boxes partly or wholly outside the image, degenerate or not finite: no error
    odd = np.array([[-10, -10, 5, 5], [25, 15, 60, 60], [100, 100, 120, 120], [3, 3, 3, 3],
                    [np.nan, 0, 4, 4]], np.float32)
    assert draw_boxes(img, odd, None, labels=list("abcde")).shape == (20, 30, 3)
    with pytest.raises(ValueError, match="colours"):
        draw_boxes(img, boxes, [(1, 2, 3)] * 3)


def test_mask_pixels_far_outside_their_box_are_still_drawn():
    """Masks are searched near their box first (for speed): one reaching far beyond it is drawn whole."""
    image = np.full((60, 80, 3), 100, np.uint8)
    masks = np.zeros((1, 60, 80), bool)
    masks[0, 10:20, 10:20] = True
    masks[0, 50:55, 70:75] = True  # far from the box below
    dets = Detections(np.array([[10, 10, 20, 20]], np.float32), np.array([0.9], np.float32), np.array([1]),
                      masks, np.array([0]), CATS, (60, 80))
    out = draw_detections(image, dets, show_boxes=False, show_labels=False, show_outlines=False, opacity=1.0)
    assert (out[52, 72] == color_for(0)).all() and (out[15, 15] == color_for(0)).all()
    assert (out[30, 40] == 100).all()
