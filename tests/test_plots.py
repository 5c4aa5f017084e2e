"""The app's Plotly figure builders: pure functions of arrays and trace data."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from mrcnn.inference.structures import Thresholds
from mrcnn.inference.trace import run_trace
from tests.helpers import CATEGORIES, nested_detections, scene, tiny_loaded
from ui import plots


@pytest.fixture(scope="module")
def trace():
    return run_trace(tiny_loaded(seed=3), scene(96, 128, seed=1), Thresholds(score_thresh=0.05))


def test_image_goes_as_one_compressed_picture():
    img = np.zeros((60, 80, 3), np.uint8)
    fig = plots.image_figure(img)
    src = fig.data[0].source
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert fig.data[0].z is None  # no pixel array in the JSON
    assert plots.image_data_uri(np.zeros((1024, 1024, 3), np.uint8)).startswith("data:image/jpeg")


def test_hover_lines_name_the_instance_and_its_numbers():
    dets = nested_detections(3)
    assert plots.instance_hover_lines(dets, 0) == ["#0 circle", "score 0.900", "box [5, 5, 40, 30]",
                                                   f"area {int(dets.masks[0].sum())} px"]


def test_large_pictures_are_sent_shrunk_by_a_whole_factor():
    small = np.zeros((60, 80, 3), np.uint8)
    assert plots.display_picture(small)[0] is small and plots.display_picture(small)[1] == 1
    shown, factor = plots.display_picture(np.zeros((1000, 3300, 3), np.uint8))
    assert factor == 3 and shown.shape == (333, 1100, 3)


def test_boxes_figure_groups_and_texts():
    fig = plots.boxes_figure(np.zeros((50, 50, 3), np.uint8), [
        {"boxes": [[1, 1, 10, 10], [5, 5, 20, 20]], "name": "anchors", "texts": ["a", "b"]},
        {"boxes": np.zeros((0, 4)), "name": "none"}])
    assert [d.name for d in fig.data[1:]] == ["anchors", "none"]
    assert list(fig.data[1].x).count(None) == 2


def test_heatmaps_and_their_validation():
    fig = plots.heatmap_figure(np.arange(12).reshape(3, 4), "t")
    assert fig.data[0].z.shape == (3, 4)
    with pytest.raises(ValueError):
        plots.heatmap_figure(np.zeros((2, 2, 2)))
    grid = plots.heatmap_grid([("p2", np.zeros((8, 8))), ("p3", np.zeros((4, 4))), ("p4", np.zeros((2, 2))),
                               ("p5", np.ones((1, 1)))], cols=3)
    assert len(grid.data) == 4
    assert grid.layout.annotations[0].text == "p2 (8×8)"


def test_mask_figure_outlines_the_threshold_only_when_crossed():
    probs = np.linspace(0, 1, 28 * 28).reshape(28, 28)
    assert len(plots.mask_figure(probs, 0.5).data) == 2
    assert len(plots.mask_figure(np.zeros((28, 28)), 0.5).data) == 1


def test_histogram_bins_with_numpy():
    fig = plots.histogram_figure({"dx": np.array([0.0, 0.1, 0.2, np.inf]), "dy": np.array([-1.0, 1.0])}, bins=10,
                                 value_range=(-1, 1))
    assert len(fig.data) == 2
    assert sum(fig.data[0].y) == 3 and sum(fig.data[1].y) == 2


def test_feature_objectness_and_delta_helpers(trace):
    feat = trace.features[trace.level_names[0]][0].numpy()
    assert plots.feature_map_2d(feat).shape == feat.shape[1:]
    np.testing.assert_array_equal(plots.feature_map_2d(feat, 3), feat[3])
    with pytest.raises(ValueError):
        plots.feature_map_2d(feat, feat.shape[0])
    obj = plots.objectness_2d(trace.objectness_maps[0].numpy())
    assert obj.shape == trace.objectness_maps[0].shape[1:] and 0 <= obj.min() <= obj.max() <= 1
    deltas = plots.split_deltas([d.numpy() for d in trace.delta_maps])
    assert set(deltas) == {"dx", "dy", "dw", "dh"}
    assert deltas["dx"].size == sum(trace.num_anchors_per_level)


def test_class_probs_timings_and_nms_figures(trace):
    cid = int(trace.detections.candidate_ids[0])
    probs = trace.class_probs(cid)
    fig = plots.class_probs_figure(probs, trace.categories, chosen=cid % trace.num_classes)
    assert len(fig.data[0].x) == len(CATEGORIES)
    assert "#d62728" in list(fig.data[0].marker.color)
    t = plots.timings_figure(trace.timings_ms, {"re-filter": 1.0})
    assert list(t.data[0].y) == list(trace.timings_ms) and len(t.data) == 2
    summary = trace.nms_summary()
    n = plots.nms_figure(summary)
    assert [list(d.y) for d in n.data] == [[r["before_nms"] for r in summary], [r["kept"] for r in summary]]


def test_downsample_keeps_small_maps_and_shrinks_big_ones():
    small = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert plots.downsample(small, 8) is not None and plots.downsample(small, 8).shape == (3, 4)
    big = np.zeros((200, 272), np.float32)
    big[5, 7] = 1.0
    out = plots.downsample(big, 100, how="max")
    assert max(out.shape) <= 100 and out.max() == 1.0
    assert plots.downsample(np.ones((201, 50)), 100).shape == (67, 17)


def test_large_pictures_are_shrunk_but_keep_original_coordinates():
    fig = plots.image_figure(np.zeros((100, 4000, 3), np.uint8), max_side=1000)
    img = fig.data[0]
    assert img.dx == 4 and img.dy == 4 and img.x0 == 1.5
    assert list(fig.layout.xaxis.range) == [-0.5, 3999.5]


def test_mask_polygon_follows_the_mask_and_falls_back_to_the_box():
    mask = np.zeros((40, 40), bool)
    yy, xx = np.mgrid[:40, :40]
    mask[(yy - 20) ** 2 + (xx - 20) ** 2 <= 100] = True  # a disc of radius 10
    xs, ys = plots.mask_polygon(mask, [10, 10, 30, 30])
    assert xs[0] == xs[-1] and ys[0] == ys[-1]  # closed
    assert min(xs) == 9.5 and max(xs) == 30.5 and min(ys) == 9.5 and max(ys) == 30.5
    row20 = [x for x, y in zip(xs, ys) if y == 20.0]
    assert sorted(row20) == [9.5, 30.5]
    top = [x for x, y in zip(xs, ys) if y == 9.5]
    assert max(top) - min(top) == 1.0  # the disc's top row is one pixel wide
    assert plots.mask_polygon(np.zeros((40, 40), bool), [1, 2, 3, 4]) == plots.box_polygon([1, 2, 3, 4])
    one_row = np.zeros((10, 10), bool)
    one_row[4, 2:6] = True
    xs, ys = plots.mask_polygon(one_row, [2, 4, 6, 5])
    assert len(xs) == len(ys) == 5


def test_focus_ranges_zoom_on_a_box_inside_the_image():
    xr, yr = plots.focus_ranges([100, 100, 110, 120], (480, 640))
    assert xr[0] < 100 and xr[1] > 110 and yr[0] > 120 and yr[1] < 100  # y reversed
    assert xr[1] - xr[0] == pytest.approx(60)  # height 20 * (1 + 2) wins over 48 px
    xr, yr = plots.focus_ranges([0, 0, 5, 5], (480, 640))
    assert xr[0] == -0.5 and yr[1] == -0.5
    fig = plots.boxes_figure(np.zeros((480, 640, 3), np.uint8), [{"boxes": [[100, 100, 110, 120]], "name": "b"}],
                             focus=[100, 100, 110, 120])
    assert list(fig.layout.xaxis.range) == pytest.approx([75, 135])


def test_unvalidated_figures_pass_plotlys_validation(trace):
    """The slider path's figures skip plotly's validation (ui/plots.py): what they hold must be valid."""
    import plotly.graph_objects as go

    figures = [plots.image_figure(np.zeros((60, 80, 3), np.uint8), title="picture"),
               plots.timings_figure(trace.timings_ms, {"re-filter": 1.0, "draw": 2.0})]
    for fig in figures:
        checked = go.Figure(fig.to_dict())  # raises ValueError on any invalid property
        assert len(checked.data) == len(fig.data)
