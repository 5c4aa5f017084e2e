"""Matching and miss reasons on hand-made proposals and candidates (each reason has its case)."""
from __future__ import annotations

import numpy as np
import pytest

from mrcnn.evaluation.diagnose import confusion_matrix, explain_misses, explain_trace_misses, match_detections
from mrcnn.inference.structures import Detections, Thresholds
from mrcnn.inference.trace import run_trace
from tests.helpers import scene, tiny_loaded

CATS = ["__background__", "circle", "square"]
T = Thresholds(score_thresh=0.5, nms_thresh=0.5, max_detections=100)
GT = np.array([[10, 10, 50, 50]], np.float32)


def dets(boxes, scores, labels, cands=None):
    n = len(scores)
    return Detections(np.array(boxes, np.float32).reshape(-1, 4), np.array(scores, np.float32),
                      np.array(labels, np.int64), None,
                      np.array(cands if cands is not None else [-1] * n, np.int64), CATS, (100, 100))


def cands(rows):
    """rows: (proposal box, probs over 3 classes, refined box used for every class)."""
    props = np.array([r[0] for r in rows], np.float32)
    probs = np.array([r[1] for r in rows], np.float32)
    boxes = np.stack([np.tile(np.array(r[2], np.float32), (3, 1)) for r in rows])
    return props, probs, boxes


def test_match_greedy_by_score():
    d = dets([[10, 10, 50, 50], [11, 11, 50, 50], [60, 60, 90, 90]], [0.6, 0.9, 0.8], [1, 1, 1])
    m = match_detections(d, np.array([[10, 10, 50, 50]]), np.array([1]))
    assert m.det_tp.tolist() == [False, True, False] and m.gt_det.tolist() == [1]
    assert m.missed.size == 0


def test_no_proposal():
    props, probs, boxes = cands([([70, 70, 90, 90], [0.1, 0.9, 0.0], [70, 70, 90, 90])])
    (r,) = explain_misses(dets([], [], []), GT, [1], T, props, probs, boxes)
    assert r.reason == "no_proposal" and "best proposal IoU 0.00" in r.message


def test_low_score():
    props, probs, boxes = cands([(GT[0], [0.7, 0.2, 0.1], GT[0])])
    (r,) = explain_misses(dets([], [], []), GT, [1], T, props, probs, boxes)
    assert r.reason == "low_score" and r.score == pytest.approx(0.2) and "0.20" in r.message


def test_other_class_detected():
    props, probs, boxes = cands([(GT[0], [0.1, 0.2, 0.7], GT[0])])
    d = dets([GT[0]], [0.7], [2], [0 * 3 + 2])
    (r,) = explain_misses(d, GT, [1], T, props, probs, boxes)
    assert r.reason == "other_class" and "detected as square" in r.message and r.by_detection == 0


def test_other_class_by_box_head():
    props, probs, boxes = cands([(GT[0], [0.9, 0.05, 0.05], [60, 60, 99, 99])])  # refined away from it
    (r,) = explain_misses(dets([], [], []), GT, [1], T, props, probs, boxes)
    assert r.reason == "other_class" and "background" in r.message


def test_suppressed_by_nms_names_the_detection():
    gt = np.array([[10, 10, 50, 50], [14, 14, 54, 54]], np.float32)
    props, probs, boxes = cands([(gt[0], [0.05, 0.9, 0.05], gt[0]), (gt[1], [0.2, 0.8, 0.0], gt[1])])
    d = dets([gt[0]], [0.9], [1], [0 * 3 + 1])
    (r,) = explain_misses(d, gt, [1, 1], T, props, probs, boxes)
    assert r.gt_index == 1 and r.reason == "nms" and r.by_detection == 0 and "IoU" in r.message
    # with NMS IoU 0.9 it is not suppressed: nothing to explain once it is detected
    d2 = dets(gt, [0.9, 0.8], [1, 1], [1, 4])
    assert explain_misses(d2, gt, [1, 1], T.replace(nms_thresh=0.9), props, probs, boxes) == []


def test_max_detections_cut():
    gt = np.array([[10, 10, 50, 50], [60, 60, 95, 95]], np.float32)
    props, probs, boxes = cands([(gt[0], [0.05, 0.9, 0.05], gt[0]), (gt[1], [0.2, 0.8, 0.0], gt[1])])
    d = dets([gt[0]], [0.9], [1], [1])
    (r,) = explain_misses(d, gt, [1, 1], T.replace(max_detections=1), props, probs, boxes)
    assert r.reason == "max_detections"


def test_on_a_real_trace_every_gt_is_matched_or_explained():
    trace = run_trace(tiny_loaded(seed=3), scene(96, 128, seed=1), Thresholds(score_thresh=0.3))
    gt = np.array([[5, 5, 40, 40], [50, 20, 120, 90]], np.float32)
    reasons = explain_trace_misses(trace, gt, np.array([1, 2]))
    m = match_detections(trace.detections, gt, np.array([1, 2]))
    assert sorted(r.gt_index for r in reasons) == m.missed.tolist()
    assert all(r.message for r in reasons)


def test_confusion_matrix_counts_hits_confusions_misses_and_false_positives():
    gt = np.array([[10, 10, 50, 50], [60, 60, 95, 95], [0, 60, 30, 95]], np.float32)
    labels = np.array([1, 2, 2])
    d = dets([[10, 10, 50, 50], [60, 60, 95, 95], [70, 0, 99, 20]], [0.9, 0.8, 0.7], [1, 1, 2])
    cm = confusion_matrix([(d, gt, labels), (dets([], [], []), np.zeros((0, 4)), np.zeros(0))], 3)
    assert cm[1, 1] == 1  # circle found as circle
    assert cm[2, 1] == 1  # square called a circle
    assert cm[2, 0] == 1  # square missed
    assert cm[0, 2] == 1  # a square where there is nothing
    assert cm.sum() == 4
