"""TIDE-style error costs on crafted predictions whose errors are known: the whole AP loss lands on the
error type that was made, for boxes and for masks."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO

from mrcnn.data.masks import encode_rle
from mrcnn.data.shapes import ShapesDataset
from mrcnn.evaluation.error_costs import ERROR_TYPES, classify_errors, error_costs, error_costs_of
from mrcnn.evaluation.evaluate import evaluate
from tests.test_evaluate import OracleModel

SIZE = 100
# per image: two objects (class, x0, y0, x1, y1), far apart
OBJECTS = [[(1, 5, 5, 35, 35), (2, 55, 55, 90, 90)],
           [(2, 10, 50, 40, 85), (1, 60, 10, 95, 40)],
           [(1, 20, 20, 50, 60), (2, 60, 60, 95, 95)]]


def _rect_rle(x0, y0, x1, y1) -> dict:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[int(y0):int(y1), int(x0):int(x1)] = 1
    return encode_rle(mask)


def _ground_truth() -> COCO:
    anns = []
    for image_id, objects in enumerate(OBJECTS, 1):
        for cat, x0, y0, x1, y1 in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "iscrowd": 0,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                         "segmentation": _rect_rle(x0, y0, x1, y1)})
    gt = COCO()
    gt.dataset = {"images": [{"id": i, "width": SIZE, "height": SIZE} for i in range(1, len(OBJECTS) + 1)],
                  "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _det(image_id, cat, score, x0, y0, x1, y1) -> dict:
    return {"image_id": image_id, "category_id": cat, "score": score, "bbox": [x0, y0, x1 - x0, y1 - y0],
            "segmentation": _rect_rle(x0, y0, x1, y1)}


def _perfect(scores=None) -> list[dict]:
    scores = iter(scores or np.linspace(0.95, 0.5, 6))
    return [_det(i, cat, float(next(scores)), *box) for i, objects in enumerate(OBJECTS, 1)
            for cat, *box in objects]


def _only(costs: dict, error_type: str) -> None:
    """The AP lost is all of ``error_type``'s: fixing it recovers everything, fixing the others nothing."""
    assert costs[error_type] == pytest.approx(1.0 - costs["AP50"], abs=1e-6)
    assert costs[error_type] > 0.05
    for other in ERROR_TYPES:
        if other != error_type:
            assert costs[other] == pytest.approx(0.0, abs=1e-6), other


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_perfect_detections_cost_nothing(iou_type):
    costs = error_costs(_ground_truth(), _perfect(), iou_type)
    assert costs["AP50"] == pytest.approx(1.0)
    assert all(costs[t] == 0.0 for t in ERROR_TYPES)


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_class_swaps_are_classification_errors(iou_type):
    dets = _perfect()
    for d in dets[::2]:  # half of them, at every score level
        d["category_id"] = 3 - d["category_id"]
    costs = error_costs(_ground_truth(), dets, iou_type)
    assert costs["counts"]["classification"] == 3 and costs["counts"]["missed"] == 0
    _only(costs, "classification")


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_shifted_boxes_are_localisation_errors(iou_type):
    dets = _perfect()
    for d in dets[::2]:
        x, y, w, h = d["bbox"]
        shifted = (x + w * 0.6, y, x + w * 1.6, y + h)  # IoU 0.25 with its object
        d.update(_det(d["image_id"], d["category_id"], d["score"], *shifted))
    costs = error_costs(_ground_truth(), dets, iou_type)
    assert costs["counts"]["localisation"] == 3
    _only(costs, "localisation")


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_duplicated_detections_are_duplicate_errors(iou_type):
    dets = _perfect([0.95, 0.85, 0.75, 0.65, 0.55, 0.45])
    dets += [dict(d, score=d["score"] - 0.05) for d in dets]  # each just below its original
    costs = error_costs(_ground_truth(), dets, iou_type)
    assert costs["counts"]["duplicate"] == 6
    _only(costs, "duplicate")


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_boxes_in_empty_areas_are_background_errors(iou_type):
    dets = _perfect([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    dets += [_det(i, 1, 0.95 - 0.2 * i, 40, 0, 50, 8) for i in (1, 2, 3)]
    costs = error_costs(_ground_truth(), dets, iou_type)
    assert costs["counts"]["background"] == 3
    _only(costs, "background")


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_dropped_detections_are_missed(iou_type):
    dets = _perfect()[1::2]
    costs = error_costs(_ground_truth(), dets, iou_type)
    assert costs["counts"]["missed"] == 3
    _only(costs, "missed")


def test_wrong_class_and_poor_box_is_both():
    gt = _ground_truth()
    dets = _perfect()
    x, y, w, h = dets[0]["bbox"]
    dets[0] = _det(1, 2, dets[0]["score"], x + w * 0.6, y, x + w * 1.6, y + h)
    outcomes, missed = classify_errors(gt, dets, "bbox")
    assert [kind for kind, _ in outcomes] == ["both"] + ["correct"] * 5
    assert missed == [1]  # its object was found by nothing


def test_error_costs_of_an_evaluation_match_its_ap():
    """From an evaluation's kept predictions: the AP50 is the evaluation's, and a model that finds all
    but the first object of each scene loses AP only to misses."""
    ds = ShapesDataset(4, seed=3, size=64)
    oracle = OracleModel(ds, ds.categories)
    oracle.answers = {image: {k: v[1:] for k, v in a.items()} for image, a in oracle.answers.items()}
    result = evaluate(oracle, ds, categories=ds.categories).to_dict()
    costs = error_costs_of(result, ds)
    for iou_type in ("bbox", "segm"):
        assert costs[iou_type]["AP50"] == pytest.approx(result[iou_type]["AP50"], abs=1e-4)
        assert costs[iou_type]["counts"]["missed"] == 4
        _only(costs[iou_type], "missed")
