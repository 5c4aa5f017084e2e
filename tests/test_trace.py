"""Re-filtering properties and what the trace keeps for the inspector."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from mrcnn.inference.structures import RpnSettings, Thresholds
from torchvision.ops import boxes as box_ops

from mrcnn.inference.trace import PARALLEL_ROIS_MIN, VANILLA_NMS_MIN_BOXES, batched_nms, pool_rois, run_trace
from tests.helpers import scene, tiny_loaded

LOW = Thresholds(score_thresh=0.05)


@pytest.fixture(scope="module")
def trace():
    return run_trace(tiny_loaded(seed=3), scene(96, 128, seed=1), LOW)


class _Forbidden(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the network was run again")


@contextmanager
def forbid(*places):
    """Replace submodules (parent, name) by ones that fail when called; restore them after.
    (pytest's monkeypatch cannot restore nn.Module children: they live in _modules, not __dict__.)"""
    saved = [(parent, name, getattr(parent, name)) for parent, name in places]
    for parent, name, _ in saved:
        setattr(parent, name, _Forbidden())
    try:
        yield
    finally:
        for parent, name, module in saved:
            setattr(parent, name, module)


@pytest.fixture
def no_network(trace):
    """Any call of the backbone, the RPN head or the box head fails the test."""
    m = trace.model
    with forbid((m, "backbone"), (m.roi_heads, "box_head"), (m.rpn, "head")):
        yield trace


def _keys(dets):
    return set(dets.candidate_ids.tolist())


def test_a_read_only_image_is_never_given_to_torch_as_it_is(monkeypatch):
    """torch warns on stderr about a read-only array (once per process, so the warning itself cannot be
    caught reliably here): np.asarray of a PIL image printed it in a check-precision run."""
    given = []
    real = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: given.append(a.flags.writeable) or real(a))
    image = scene(64, 80, seed=3)
    image.flags.writeable = False  # as np.asarray(PIL image) gives it
    trace = run_trace(tiny_loaded(), image)
    assert given and all(given)
    np.testing.assert_array_equal(trace.image, image)


def test_higher_score_threshold_gives_subset(trace, no_network):
    low = trace.refilter(LOW)
    assert len(low) > 3
    for s in (0.1, 0.2, 0.3, 0.5):
        high = trace.refilter(LOW.replace(score_thresh=s))
        assert _keys(high) <= _keys(low)
        assert (high.scores > s).all()


def test_nms_iou_one_keeps_at_least_as_many(trace, no_network):
    base = trace.refilter(LOW)
    loose = trace.refilter(LOW.replace(nms_thresh=1.0))
    assert len(loose) >= len(base)


def test_max_detections_caps_and_keeps_the_best(trace, no_network):
    full = trace.refilter(LOW.replace(nms_thresh=1.0, max_detections=100))
    assert len(full) > 5
    capped = trace.refilter(LOW.replace(nms_thresh=1.0, max_detections=5))
    assert len(capped) == 5
    np.testing.assert_allclose(capped.scores, np.sort(full.scores)[::-1][:5])
    assert len(trace.refilter(LOW.replace(max_detections=0))) == 0


def test_higher_mask_threshold_never_grows_a_mask(trace):
    prev = trace.refilter(LOW.replace(mask_thresh=0.1))
    assert prev.masks.any()
    for m in (0.3, 0.5, 0.7, 0.9):
        cur = trace.refilter(LOW.replace(mask_thresh=m))
        np.testing.assert_array_equal(cur.candidate_ids, prev.candidate_ids)
        assert not (cur.masks & ~prev.masks).any()
        prev = cur


def test_masks_are_memoised(trace):
    trace.refilter(LOW)
    with forbid((trace.model.roi_heads, "mask_head")):
        again = trace.refilter(LOW.replace(mask_thresh=0.6, score_thresh=0.2))  # a subset: all memoised
    assert trace.last_mask_ms == 0.0
    assert again.masks.shape[1:] == (96, 128)


def test_rpn_knobs_rerun_without_backbone():
    loaded = tiny_loaded(seed=3)
    image = scene(96, 128, seed=1)
    trace = run_trace(loaded, image, LOW)
    before = trace.detections
    with forbid((loaded.model, "backbone"), (loaded.model.rpn, "head")):
        few = trace.set_rpn(RpnSettings(post_nms_top_n=10))
        assert trace.proposals.boxes.shape[0] == 10
        assert len(set(few.candidate_ids // trace.num_classes)) <= 10
        back = trace.set_rpn(RpnSettings())
    np.testing.assert_allclose(back.scores, before.scores)
    np.testing.assert_allclose(back.boxes, before.boxes)


def test_rpn_knobs_match_torchvision():
    loaded = tiny_loaded(seed=3)
    image = scene(96, 128, seed=1)
    rpn = RpnSettings(pre_nms_top_n=50, post_nms_top_n=20, nms_thresh=0.5)
    trace = run_trace(loaded, image, LOW, rpn)
    model = loaded.model
    model.rpn._pre_nms_top_n = {"training": 2000, "testing": 50}
    model.rpn._post_nms_top_n = {"training": 2000, "testing": 20}
    model.rpn.nms_thresh = 0.5
    model.roi_heads.score_thresh = 0.05
    with torch.inference_mode():
        ref = model([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])[0]
    np.testing.assert_allclose(trace.detections.boxes, ref["boxes"].numpy(), atol=1e-4)
    np.testing.assert_allclose(trace.detections.scores, ref["scores"].numpy(), atol=1e-4)


def test_trace_keeps_every_stage(trace):
    assert trace.original_size == (96, 128)
    assert trace.input_size[0] == 96 and trace.scale == pytest.approx(1.0)
    assert trace.level_names == ["0", "1", "2", "3", "pool"]
    assert len(trace.objectness_maps) == 5 and sum(trace.num_anchors_per_level) == trace.anchors.shape[0]
    num_a, fh, fw = trace.objectness_maps[0].shape
    assert num_a == 3 and trace.anchors_at(0, 2, 3).shape == (3, 4)
    p = trace.proposals
    assert p.boxes_pre.shape[0] >= p.boxes.shape[0] > 0
    assert trace.candidates.probs.shape == (p.boxes.shape[0], 4)
    assert torch.allclose(trace.candidates.probs.sum(1), torch.ones(p.boxes.shape[0]), atol=1e-5)
    for stage in ("transform", "backbone", "rpn_head", "rpn_filter", "box_head", "detections", "masks"):
        assert trace.timings_ms[stage] >= 0.0
    dets = trace.refilter(LOW)
    cid = int(dets.candidate_ids[0])
    crops = trace.roi_crops(cid)
    assert crops["box"]["crop"].shape == (16, 7, 7) and crops["mask"]["crop"].shape == (16, 14, 14)
    assert 0 <= crops["box"]["level"] <= 3
    assert trace.mask_probs_28([cid]).shape == (1, 28, 28)
    assert trace.class_probs(cid).shape == (4,)
    full = trace.mask_probs_full(cid)
    np.testing.assert_array_equal(full > 0.05, trace.refilter(LOW.replace(mask_thresh=0.05)).masks[0])
    summary = trace.nms_summary(LOW)
    assert sum(r["kept"] for r in summary) == len(trace.refilter(LOW))
    assert all(r["before_nms"] >= r["kept"] for r in summary)


def test_boxes_in_original_pixels_when_resized():
    loaded = tiny_loaded(seed=3)
    image = scene(300, 200, seed=4)  # resized to min_size 96 internally
    trace = run_trace(loaded, image, LOW)
    assert trace.scale < 1.0
    d = trace.detections
    assert d.masks.shape[1:] == (300, 200)
    assert (d.boxes[:, 2] <= 200 + 1e-3).all() and (d.boxes[:, 3] <= 300 + 1e-3).all()


def test_refuses_non_rgb_input():
    with pytest.raises(ValueError, match="RGB uint8"):
        run_trace(tiny_loaded(), np.zeros((10, 10), np.uint8))


def test_empty_detections_export(trace):
    from mrcnn.inference.export import detections_csv, trace_json

    none = trace.refilter(LOW.replace(score_thresh=0.999))
    assert len(none) == 0 and none.masks.shape == (0, 96, 128)
    assert none.areas.shape == (0,)
    assert trace_json(trace, "x.png")["detections"] == []
    assert detections_csv(none).count("\n") == 1  # header only


def test_many_rois_are_pooled_across_the_intra_op_threads_with_the_same_result(trace):
    """torchvision's CPU RoIAlign runs on one thread: the trace splits the RoIs over the intra-op threads."""
    pooler = trace.model.roi_heads.box_roi_pool
    h, w = trace.input_size
    corners = torch.rand(300, 2, 2, generator=torch.Generator().manual_seed(0)) * torch.tensor([w, h])
    boxes = torch.cat([corners.min(1).values, corners.max(1).values + 1], 1)
    threads_seen = set()
    # Each chunk waits for the other, so they must run at once; without it, one pool thread may take both.
    both_running = threading.Barrier(2, timeout=60)

    def recording_pooler(*args):
        name = threading.current_thread().name
        threads_seen.add(name)
        if name.startswith("trace-worker"):
            both_running.wait()
        return pooler(*args)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            split = pool_rois(recording_pooler, trace.features, boxes, trace.input_size)
            few = pool_rois(recording_pooler, trace.features, boxes[:PARALLEL_ROIS_MIN - 1], trace.input_size)
    finally:
        torch.set_num_threads(before)
    with torch.inference_mode():
        whole = pooler(trace.features, [boxes], [trace.input_size])
    assert torch.equal(split, whole) and torch.equal(few, whole[:PARALLEL_ROIS_MIN - 1])
    assert len([name for name in threads_seen if name.startswith("trace-worker")]) == 2
    assert threading.current_thread().name in threads_seen  # the few were pooled where they were asked for


def test_detections_at_other_thresholds_leave_the_trace_as_it_was(trace):
    shown = trace.refilter(LOW)
    kept = trace.thresholds, trace.detections, trace.last_refilter_ms, trace.last_mask_ms
    other = LOW.replace(score_thresh=0.06, mask_thresh=0.3)
    ahead = trace.detections_at(other)
    assert (trace.thresholds, trace.detections, trace.last_refilter_ms, trace.last_mask_ms) == kept
    assert trace.detections is shown
    again = trace.refilter(other)  # what the next control step will show is what was drawn ahead
    assert np.array_equal(ahead.candidate_ids, again.candidate_ids) and np.array_equal(ahead.masks, again.masks)
    trace.refilter(LOW)  # as the other tests expect the shared trace


def test_importing_mrcnn_turns_off_numpys_huge_page_advice():
    """numpy's transparent-huge-page advice made each fresh full-size mask array wait 100-300 ms for memory
    compaction here (mrcnn/__init__.py); the setting returns its previous value."""
    import mrcnn  # noqa: F401  (imported already; the setting is made at import)
    from numpy._core import multiarray
    assert multiarray._set_madvise_hugepage(False) is False


@pytest.mark.parametrize("n", [VANILLA_NMS_MIN_BOXES + 500, VANILLA_NMS_MIN_BOXES // 2])
def test_batched_nms_over_threads_keeps_what_torchvision_keeps_in_its_order(monkeypatch, n):
    """Above 1000 boxes the groups' NMS runs go to the worker threads; kept indices and order are torchvision's."""
    gen = torch.Generator().manual_seed(0)
    corners = torch.rand(n, 2, generator=gen) * 300
    boxes = torch.cat([corners, corners + torch.rand(n, 2, generator=gen) * 60 + 2], 1)
    scores = torch.rand(n, generator=gen)
    scores[::7] = scores[1::7][: len(scores[::7])]  # ties: the merge must order them as torchvision does
    groups = torch.randint(0, 5, (n,), generator=gen)
    threads_seen = set()
    nms = box_ops.nms

    def recording_nms(*args):
        threads_seen.add(threading.current_thread().name)
        return nms(*args)

    monkeypatch.setattr(box_ops, "nms", recording_nms)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            got = batched_nms(boxes, scores, groups, 0.5)
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(box_ops, "nms", nms)
    assert torch.equal(got, box_ops.batched_nms(boxes, scores, groups, 0.5))
    on_workers = any(name.startswith("trace-worker") for name in threads_seen)
    assert on_workers == (n > VANILLA_NMS_MIN_BOXES)
