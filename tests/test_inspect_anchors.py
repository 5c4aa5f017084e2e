"""Inspect's anchors: the cell picked under a pixel is the one whose anchors are centred nearest it, on every
level, and the strides shown are those torchvision tiles the anchors at (the pooled level's grid rounds up)."""
from __future__ import annotations

import torch

from mrcnn.inference.trace import run_trace
from tests.helpers import scene, tiny_loaded
from ui.inspect import anchor_strides, feature_cell

SIZE = 160  # P5 5×5, so the pooled level is 3×3 and its stride 160 // 3 = 53 (160 / 3 = 53.3 on no grid)


def _centres(trace, level: int) -> torch.Tensor:
    start = sum(trace.num_anchors_per_level[:level])
    anchors = trace.anchors[start:start + trace.num_anchors_per_level[level]]
    return (anchors[:, :2] + anchors[:, 2:]) / 2


def test_the_cell_under_a_pixel_has_the_nearest_anchor_centres_on_every_level():
    trace = run_trace(tiny_loaded(min_size=SIZE, max_size=SIZE), scene(SIZE, SIZE))
    assert trace.scale == 1 and tuple(trace.padded_size) == (SIZE, SIZE)
    grids = [tuple(m.shape[1:]) for m in trace.objectness_maps]
    assert grids[-1] == (3, 3)
    assert [anchor_strides(trace, h, w) for h, w in grids] == [(4, 4), (8, 8), (16, 16), (32, 32), (53, 53)]
    for level in range(len(grids)):
        centres = _centres(trace, level)
        for p in range(0, SIZE, 5):  # along the diagonal: x = y = p
            cy, cx = feature_cell(trace, level, p, p)
            chosen = _centres_of_cell(trace, level, cy, cx)
            nearest = (centres - p).abs().max(dim=1).values.min()
            assert (chosen - p).abs().max() <= nearest + 0.5, (level, p, (cy, cx))


def _centres_of_cell(trace, level: int, y: int, x: int) -> torch.Tensor:
    boxes = trace.anchors_at(level, y, x)
    return ((boxes[:, :2] + boxes[:, 2:]) / 2).mean(dim=0)
