"""Class-agnostic NMS and per-class score thresholds (issue 16, point 1): re-filtering the cached trace,
the `predict` flags and the prediction JSON's record of them."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from mrcnn.cli import main
from mrcnn.inference.structures import MAX_DETECTIONS, Thresholds
from mrcnn.inference.trace import Trace, run_trace
from mrcnn.model.checkpoint import save_checkpoint
from tests.helpers import CATEGORIES, TINY_LIGHT, scene, tiny_loaded


def crowded_loaded():
    """Random weights with damped class weights and raised foreground biases: each proposal scores about
    a third in every class at once, with nearly one box, so detections of different classes overlap."""
    loaded = tiny_loaded(seed=1)
    with torch.no_grad():
        cls_score = loaded.model.roi_heads.box_predictor.cls_score
        cls_score.weight.mul_(0.2)
        cls_score.bias.copy_(torch.tensor([0.0, 3.0, 3.0, 3.0]))
        # small box refinements: the classes' boxes of one proposal stay close together
        loaded.model.roi_heads.box_predictor.bbox_pred.weight.mul_(0.1)
    return loaded


# Enough detections kept that several classes are among them (the top 100 can all be one class).
BASE = Thresholds(score_thresh=0.05, max_detections=MAX_DETECTIONS)


@pytest.fixture(scope="module")
def trace():
    return run_trace(crowded_loaded(), scene(96, 128, seed=2), BASE)


@pytest.fixture
def network_runs(monkeypatch):
    runs = []
    original = Trace._run_network
    monkeypatch.setattr(Trace, "_run_network", lambda self: (runs.append(1), original(self))[1])
    return runs


def max_cross_iou(dets) -> float:
    iou = box_iou(torch.from_numpy(dets.boxes), torch.from_numpy(dets.boxes))
    iou.fill_diagonal_(0)
    return float(iou.max()) if len(dets) > 1 else 0.0


def test_agnostic_nms_leaves_no_overlap_above_the_iou_whatever_the_classes(trace, network_runs):
    per_class = trace.refilter(BASE)
    assert len(set(per_class.labels.tolist())) > 1
    assert max_cross_iou(per_class) > 0.5, "the crowded model must give cross-class overlaps to remove"
    agnostic = trace.refilter(BASE.replace(agnostic_nms=True))
    assert 0 < len(agnostic) < len(per_class)
    # torchvision's nms suppresses IoU > threshold; the IoU recomputed in original pixels may differ by rounding
    assert max_cross_iou(agnostic) <= 0.5 + 1e-4
    assert agnostic.candidate_ids[0] == per_class.candidate_ids[0]  # the best-scoring one always stays
    assert network_runs == []


def test_per_class_thresholds_hold_per_class_and_one_at_1_removes_its_class(trace, network_runs):
    base = trace.refilter(BASE)
    assert {"circle", "square", "triangle"} <= set(base.label_names)
    t = BASE.replace(class_thresh={"circle": 0.335, "square": 1.0})
    dets = trace.refilter(t)
    names = dets.label_names
    assert "square" not in names and "circle" in names and "triangle" in names
    for name, score in zip(names, dets.scores):
        assert score > t.score_thresh_of(name)
    assert sum(n == "circle" for n in names) < sum(n == "circle" for n in base.label_names)
    assert network_runs == []


def test_class_thresh_is_validated_and_hashable(trace):
    t = Thresholds(class_thresh={"square": 0.7, "circle": 0.2})
    assert t == Thresholds(class_thresh=[("circle", 0.2), ("square", 0.7)]) and hash(t) == hash(t.replace())
    assert t.to_dict()["class_thresh"] == {"circle": 0.2, "square": 0.7}
    for bad in (float("nan"), 1.5, -0.1, float("inf")):
        with pytest.raises(ValueError, match="circle"):
            Thresholds(class_thresh={"circle": bad})
    with pytest.raises(ValueError, match="unknown class 'dog'.*circle, square, triangle"):
        trace.refilter(Thresholds(class_thresh={"dog": 0.5}))


def test_defaults_keep_the_old_selection(trace):
    """No class thresholds and per-class NMS: exactly torchvision's batched_nms path."""
    a, b = trace.refilter(BASE), trace.refilter(BASE.replace(class_thresh={"circle": 0.05}))
    assert np.array_equal(a.candidate_ids, b.candidate_ids)


@pytest.fixture(scope="module")
def checkpoint_and_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    model = crowded_loaded().model
    ckpt = save_checkpoint(folder / "tiny.pt", TINY_LIGHT, CATEGORIES, model.state_dict())
    image = folder / "scene.png"
    Image.fromarray(scene(96, 128, seed=2)).save(image)
    return ckpt, image


def test_predict_flags_filter_and_are_recorded(checkpoint_and_image, tmp_path):
    ckpt, image = checkpoint_and_image
    common = ["predict", str(image), "--model", str(ckpt), "--score-thresh", "0.05",
              "--max-detections", str(MAX_DETECTIONS)]
    assert main(common + ["--out", str(tmp_path / "plain")]) == 0
    assert main(common + ["--agnostic-nms", "--class-thresh", "square=1.0, circle=0.335",
                          "--out", str(tmp_path / "filtered")]) == 0
    plain = json.loads((tmp_path / "plain" / "scene.json").read_text())
    record = json.loads((tmp_path / "filtered" / "scene.json").read_text())
    assert plain["thresholds"]["agnostic_nms"] is False and plain["thresholds"]["class_thresh"] == {}
    assert record["thresholds"] == {"score_thresh": 0.05, "nms_thresh": 0.5, "max_detections": MAX_DETECTIONS,
                                    "mask_thresh": 0.5, "agnostic_nms": True,
                                    "class_thresh": {"circle": 0.335, "square": 1.0}}
    labels = [d["label"] for d in record["detections"]]
    assert labels and "square" not in labels and "square" in [d["label"] for d in plain["detections"]]
    assert all(d["score"] > 0.335 for d in record["detections"] if d["label"] == "circle")
    boxes = torch.tensor([d["box"] for d in record["detections"]], dtype=torch.float32)
    iou = box_iou(boxes, boxes).fill_diagonal_(0)
    assert float(iou.max()) <= 0.5 + 1e-3


@pytest.mark.parametrize("value, words", [
    ("circle", ["NAME=VALUE", "'circle'"]),
    ("circle=abc", ["NAME=VALUE", "circle=abc"]),
    ("=0.5", ["NAME=VALUE"]),
    ("circle=nan", ["circle", "nan"]),
    ("circle=2", ["circle", "between 0 and 1"]),
    ("dog=0.5", ["unknown class 'dog'", "circle, square, triangle"]),
])
def test_bad_class_thresh_is_one_error_line_and_exit_2(checkpoint_and_image, tmp_path, capsys, value, words):
    ckpt, image = checkpoint_and_image
    rc = main(["predict", str(image), "--model", str(ckpt), "--class-thresh", value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0]
    assert not (tmp_path / "o" / "scene.json").exists()
