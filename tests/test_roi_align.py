"""The gathered RoIAlign (mrcnn.inference.roi_align) against torchvision's MultiScaleRoIAlign, and where the trace
uses it."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from mrcnn.evaluation.fidelity import in_precision
from mrcnn.inference import roi_align
from mrcnn.inference.structures import Thresholds
from mrcnn.inference.trace import run_trace
from tests.helpers import scene, tiny_loaded

IMAGE = (160, 224)  # (h, w) of the network input the maps below come from


def _maps(channels_last: bool) -> OrderedDict[str, torch.Tensor]:
    torch.manual_seed(0)
    maps = OrderedDict((str(i), torch.randn(1, 8, IMAGE[0] // 4 // 2**i, IMAGE[1] // 4 // 2**i)) for i in range(4))
    maps["pool"] = torch.randn(1, 8, 3, 4)  # a level the pooler does not read
    if channels_last:
        maps = OrderedDict((k, v.contiguous(memory_format=torch.channels_last)) for k, v in maps.items())
    return maps


def _boxes() -> torch.Tensor:
    torch.manual_seed(1)
    h, w = IMAGE
    corner = torch.rand(60, 2) * torch.tensor([w, h])
    boxes = torch.cat([corner, corner + torch.rand(60, 2) ** 2 * 180], 1)
    edge_cases = torch.tensor([
        [0.0, 0.0, 0.5, 0.5],  # smaller than a pixel of any map
        [w - 1.0, h - 1.0, w, h],  # on the last pixel
        [0.0, 0.0, w, h],  # the whole input
        [-40.0, -30.0, 6.0, 5.0],  # mostly outside: samples past -1 weigh nothing
        [w - 20.0, h - 20.0, w + 60.0, h + 50.0],  # past the far edges
        [30.0, 40.0, 30.0, 40.0],  # empty
    ])
    return torch.cat([boxes, edge_cases])


@pytest.mark.parametrize("size, ratio", [(7, 2), (14, 2), (7, 1), (5, 3)])
@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_gathered_roi_align_equals_torchvisions_to_float_rounding(size, ratio, channels_last):
    pooler = MultiScaleRoIAlign(["0", "1", "2", "3"], size, ratio)
    maps, boxes = _maps(channels_last), _boxes()
    expected = pooler(maps, [boxes], [IMAGE])
    rows = roi_align.PixelRows(maps)
    got = roi_align.multiscale_roi_align(pooler, rows, boxes, IMAGE)
    assert got.shape == expected.shape == (len(boxes), 8, size, size)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


def test_the_pixel_rows_hold_the_maps_in_float32_and_one_level_pools_alone():
    maps = _maps(False)
    rows = roi_align.PixelRows(OrderedDict((k, v.bfloat16()) for k, v in maps.items()))
    assert list(rows.maps) == list(maps)
    for name, fmap in maps.items():
        kept = rows.maps[name]
        assert kept.dtype == torch.float32 and kept.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(kept, fmap.bfloat16().float(), atol=0, rtol=0)
    assert rows.table.shape == (sum(m.shape[2] * m.shape[3] for m in maps.values()), 8)
    pooler, boxes = MultiScaleRoIAlign(["2"], 7, 2), _boxes()
    torch.testing.assert_close(roi_align.multiscale_roi_align(pooler, rows, boxes, IMAGE),
                               pooler(rows.maps, [boxes], [IMAGE]), atol=2e-6, rtol=1e-5)
    assert roi_align.multiscale_roi_align(pooler, rows, boxes[:0], IMAGE).shape == (0, 8, 7, 7)


def test_only_maps_of_one_image_and_channel_count_make_a_table():
    assert roi_align.PixelRows.fits(_maps(True))
    assert not roi_align.PixelRows.fits(OrderedDict(a=torch.zeros(1, 8, 4, 4), b=torch.zeros(1, 4, 2, 2)))
    assert not roi_align.PixelRows.fits(OrderedDict(a=torch.zeros(2, 8, 4, 4)))
    assert not roi_align.PixelRows.fits(OrderedDict())


def test_only_a_fixed_sampling_ratio_on_a_cpu_is_gathered():
    assert roi_align.supports(MultiScaleRoIAlign(["0"], 7, 2), torch.device("cpu"))
    assert not roi_align.supports(MultiScaleRoIAlign(["0"], 7, 0), torch.device("cpu"))  # adaptive: per RoI
    assert not roi_align.supports(MultiScaleRoIAlign(["0"], 7, 2), torch.device("cuda"))
    assert not roi_align.supports(torch.nn.Identity(), torch.device("cpu"))


def test_a_reduced_precision_trace_gathers_and_finds_what_torchvisions_kernel_finds(monkeypatch):
    """The bfloat16 trace pools with the gathers; with torchvision's kernel instead it gives the same candidates
    to bfloat16's rounding and the same detections. The float32 trace never gathers (its equivalence tests pin
    torchvision's kernel bit for bit)."""
    loaded = tiny_loaded(seed=3)
    reduced = in_precision(loaded, "bfloat16")
    image = scene(96, 128, seed=1)
    t = Thresholds(score_thresh=0.05)
    calls = []
    gather = roi_align.multiscale_roi_align
    monkeypatch.setattr(roi_align, "multiscale_roi_align", lambda *a: calls.append(1) or gather(*a))
    run_trace(loaded, image, t)
    assert calls == []
    gathered = run_trace(reduced, image, t)
    assert len(calls) == 2  # the box head's proposals and the detections' masks
    assert all(f.dtype == torch.float32 for f in gathered.features.values())
    probs = gathered.candidates.probs
    gathered.drop_features()  # the trace cache's eviction: the heads re-run on maps the backbone makes again
    gathered.set_rpn(gathered.rpn_settings)
    assert len(calls) == 4 and torch.equal(gathered.candidates.probs, probs)
    monkeypatch.setattr(roi_align, "supports", lambda pooler, device: False)
    kernel = run_trace(reduced, image, t)
    assert len(calls) == 4
    torch.testing.assert_close(gathered.candidates.probs, kernel.candidates.probs, atol=2e-2, rtol=0)
    assert len(gathered.detections) > 0
    np.testing.assert_array_equal(gathered.detections.labels, kernel.detections.labels)
    np.testing.assert_allclose(gathered.detections.boxes, kernel.detections.boxes, atol=0.5)


def test_maps_no_table_fits_are_kept_contiguous_and_pooled_by_torchvision(monkeypatch):
    reduced = in_precision(tiny_loaded(seed=3), "bfloat16")
    image = scene(96, 128, seed=1)
    monkeypatch.setattr(roi_align.PixelRows, "fits", staticmethod(lambda maps: False))
    monkeypatch.setattr(roi_align, "multiscale_roi_align", lambda *a: pytest.fail("gathered without a table"))
    trace = run_trace(reduced, image, Thresholds(score_thresh=0.05))
    assert all(f.dtype == torch.float32 and f.is_contiguous() for f in trace.features.values())
    assert len(trace.detections) > 0


def test_casting_the_pooled_rois_before_the_box_head_changes_no_value(monkeypatch):
    """The reduced-precision trace casts the pooled RoIs itself, before the box head flattens them (half the
    bytes to copy); autocast would have cast the same values at the head's first layer."""
    from mrcnn.inference import trace as trace_module
    reduced = in_precision(tiny_loaded(seed=3), "bfloat16")
    trace = run_trace(reduced, scene(96, 128, seed=1), Thresholds(score_thresh=0.05))
    early = trace._box_head(trace.proposals.boxes)
    monkeypatch.setattr(trace_module, "REDUCED_DTYPES", {"bfloat16": torch.float32})  # leaves it to autocast
    late = trace._box_head(trace.proposals.boxes)
    assert torch.equal(early.probs, late.probs) and torch.equal(early.boxes, late.boxes)


def test_inspects_roi_crops_are_what_the_reduced_precision_heads_pooled():
    reduced = in_precision(tiny_loaded(seed=3), "bfloat16")
    trace = run_trace(reduced, scene(96, 128, seed=1), Thresholds(score_thresh=0.05))
    cid = int(trace.detections.candidate_ids[0])
    crops = trace.roi_crops(cid)
    heads = trace.model.roi_heads
    proposal = trace.proposal_of(cid)[0][None]
    with torch.inference_mode():
        pooled = roi_align.multiscale_roi_align(heads.box_roi_pool, trace._pixel_rows, proposal, trace.input_size)[0]
    assert crops["box"]["crop"].is_contiguous() and torch.equal(crops["box"]["crop"], pooled)
    assert crops["mask"]["crop"].shape[-2:] == heads.mask_roi_pool.output_size
