"""Same weights -> same detections as torchvision's own model(images) (minGPT's equivalence test)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mrcnn.inference.structures import RpnSettings, Thresholds
from mrcnn.inference.trace import run_trace
from tests.helpers import scene, tiny_loaded

# Small test-time sizes and 100 proposals (torchvision's default: 1000) keep the R50 models fast. The trace is
# given no RPN settings: it takes each model's own (model_rpn_settings), the R50s' 100 proposals and the light
# model's torchvision defaults, as the model's forward does.
R50_PROPOSALS = 100
R50_SMALL = {"min_size": 128, "max_size": 192, "rpn_post_nms_top_n_test": R50_PROPOSALS}
ARCHS = {
    "light": None,
    "r50": {"name": "maskrcnn_resnet50_fpn", **R50_SMALL},
    "r50v2": {"name": "maskrcnn_resnet50_fpn_v2", **R50_SMALL},
}
SHAPES = {"square": (96, 96), "landscape": (80, 130), "portrait": (140, 72)}


def _torchvision_output(loaded, image: np.ndarray, t: Thresholds) -> dict:
    model = loaded.model
    saved = (model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img)
    model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img = (
        t.score_thresh, t.nms_thresh, t.max_detections)
    try:
        with torch.inference_mode():
            return model([torch.from_numpy(image).permute(2, 0, 1).float() / 255.0])[0]
    finally:
        model.roi_heads.score_thresh, model.roi_heads.nms_thresh, model.roi_heads.detections_per_img = saved


def _assert_same(trace_dets, ref: dict) -> None:
    assert len(trace_dets) == ref["boxes"].shape[0]
    np.testing.assert_array_equal(trace_dets.labels, ref["labels"].numpy())
    np.testing.assert_allclose(trace_dets.boxes, ref["boxes"].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(trace_dets.scores, ref["scores"].numpy(), atol=1e-4, rtol=0)
    ref_masks = (ref["masks"][:, 0] > 0.5).numpy()
    differ = (trace_dets.masks != ref_masks).sum()
    assert differ == 0, f"{differ} mask pixels differ"


# Every arch on every shape would be 9 cases; the resizing the shapes exercise is one transform for all, so the
# R50s take one shape each (the slowest tests of the suite otherwise) and the light model all three.
CASES = [("light", "square"), ("light", "landscape"), ("light", "portrait"), ("r50", "landscape"),
         ("r50v2", "portrait")]


@pytest.fixture(scope="module")
def loaded_by_arch():
    """One model per architecture, built when a case first asks for it."""
    models = {}

    def get(arch: str):
        if arch not in models:
            models[arch] = tiny_loaded(ARCHS[arch], seed=3)
        return models[arch]
    return get


@pytest.mark.parametrize("arch, shape", CASES, ids=[f"{a}-{s}" for a, s in CASES])
def test_trace_equals_torchvision(loaded_by_arch, arch, shape):
    loaded = loaded_by_arch(arch)
    image = scene(*SHAPES[shape], seed=1)
    thresholds = Thresholds(score_thresh=0.05)  # torchvision's default box_score_thresh
    trace = run_trace(loaded, image, thresholds)
    assert trace.rpn_settings == RpnSettings(post_nms_top_n=1000 if arch == "light" else R50_PROPOSALS)
    ref = _torchvision_output(loaded, image, thresholds)
    assert ref["boxes"].shape[0] > 0, "random weights should give some detections at 0.05"
    _assert_same(trace.detections, ref)
    # the default thresholds too (0.5), re-filtered from the same trace
    defaults = Thresholds()
    _assert_same(trace.refilter(defaults), _torchvision_output(loaded, image, defaults))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_no_detections_matches(loaded_by_arch, arch):
    loaded = loaded_by_arch(arch)
    image = scene(96, 96, seed=2)
    thresholds = Thresholds(score_thresh=0.999)
    trace = run_trace(loaded, image, thresholds)
    ref = _torchvision_output(loaded, image, thresholds)
    assert len(trace.detections) == 0 == ref["boxes"].shape[0]
    assert trace.detections.masks.shape == (0, 96, 96)
    assert trace.detections.boxes.shape == (0, 4)
