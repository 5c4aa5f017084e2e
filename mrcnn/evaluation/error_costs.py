"""What each error costs, in the manner of TIDE (Bolya et al., ECCV 2020): the AP50 gained by fixing only
the errors of one type, for boxes and for masks.

    costs = error_costs_of(evaluate(model, dataset).to_dict(), dataset)
    costs["bbox"]["classification"]  # AP50 after correcting every mis-classed detection, minus the AP50

Detections are matched to ground truth as COCO does at IoU 0.5 (score order, same class, each object
once); every detection left unmatched is one error, tested in TIDE's order:

    localisation    right class, 0.1 <= IoU < 0.5 with an object     fix: snap the box (mask) to the object
    classification  IoU >= 0.5 with an object of another class       fix: correct the class
    duplicate       right class, IoU >= 0.5 with an object already   fix: remove the detection
                    matched by a higher-scoring detection
    background      IoU < 0.1 with every object                      fix: remove the detection
    both            wrong class and 0.1 <= IoU < 0.5                 fix: remove the detection
    missed          an object no detection found nor came close to   fix: leave the object out of the AP
                    as a classification or localisation error

A fix whose object another detection already claimed removes the detection instead (as TIDE does).
The costs are in AP units (0..1), on the IoU the iou_type names (box IoU, or mask IoU on the RLEs).
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.evaluation.evaluate import ground_truth

ERROR_TYPES = ("classification", "localisation", "both", "duplicate", "background", "missed")
FOREGROUND_IOU, BACKGROUND_IOU = 0.5, 0.1


def ap50(gt: COCO, dets: list[dict], iou_type: str) -> float:
    """COCO AP at IoU 0.5 (area all, 100 detections per image) of ``dets`` (COCO results) against ``gt``."""
    if not dets or not gt.getAnnIds():
        return 0.0
    key = "bbox" if iou_type == "bbox" else "segmentation"
    # loadRes fills in the other representation when both are absent: hand it only the one evaluated
    results = [{"image_id": d["image_id"], "category_id": d["category_id"], "score": d["score"], key: d[key]}
               for d in dets]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ev = COCOeval(gt, gt.loadRes(results), iou_type)
        ev.params.iouThrs = np.array([FOREGROUND_IOU])
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, :, 0, -1]  # (recall points, classes); -1: class without objects
    valid = precision > -1
    return float(precision[valid].mean()) if valid.any() else 0.0


def _region(item: dict, iou_type: str):
    return item["bbox"] if iou_type == "bbox" else item["segmentation"]


def _gt_region(gt: COCO, ann: dict, iou_type: str):
    return ann["bbox"] if iou_type == "bbox" else gt.annToRLE(ann)


def classify_errors(gt: COCO, dets: list[dict], iou_type: str) -> tuple[list, list[int]]:
    """(per-detection outcome, ids of the missed annotations). ``outcomes[i]`` is (kind, annotation):
    kind "correct" with the object it matched (None on a crowd region), or an error type with the object
    a classification or localisation fix snaps to (None for the others)."""
    outcomes: list[tuple[str, dict | None]] = [("correct", None)] * len(dets)
    missed: list[int] = []
    by_image: dict[int, list[int]] = {}
    for i, d in enumerate(dets):
        by_image.setdefault(d["image_id"], []).append(i)
    for image_id in gt.getImgIds():
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[image_id]))
        order = sorted(by_image.get(image_id, []), key=lambda i: -dets[i]["score"])
        image_outcomes = _image_outcomes(gt, anns, [dets[i] for i in order], iou_type)
        for i, outcome in zip(order, image_outcomes):
            outcomes[i] = outcome
        found = {target["id"] for _, target in image_outcomes if target is not None}
        missed += [a["id"] for a in anns if not a.get("iscrowd", 0) and a["id"] not in found]
    return outcomes, missed


def _image_outcomes(gt: COCO, anns: list[dict], dets: list[dict], iou_type: str) -> list[tuple[str, dict | None]]:
    """The outcome of each of one image's detections (given in score order)."""
    if not anns:
        return [("background", None)] * len(dets)
    if not dets:
        return []
    crowd = [int(a.get("iscrowd", 0)) for a in anns]
    # (D, G): IoU of each detection with each object; for a crowd object, the share of the detection inside it
    ious = np.asarray(mask_utils.iou([_region(d, iou_type) for d in dets],
                                     [_gt_region(gt, a, iou_type) for a in anns], crowd)).reshape(len(dets), len(anns))
    gt_cats = np.array([a["category_id"] for a in anns])
    is_crowd = np.array(crowd, bool)
    used = np.zeros(len(anns), bool)
    outcomes: list[tuple[str, dict | None]] = []
    for k, d in enumerate(dets):
        same = (gt_cats == d["category_id"]) & ~is_crowd
        free = np.where(same & ~used, ious[k], -1.0)
        if free.max() >= FOREGROUND_IOU:  # a true positive, matched as COCO does
            used[free.argmax()] = True
            outcomes.append(("correct", anns[free.argmax()]))
            continue
        if ((gt_cats == d["category_id"]) & is_crowd & (ious[k] >= FOREGROUND_IOU)).any():
            outcomes.append(("correct", None))  # on a crowd region of its class: COCO ignores it
            continue
        same_iou = np.where(same, ious[k], -1.0)
        other_iou = np.where(~same & ~is_crowd, ious[k], -1.0)
        best_same, best_other = same_iou.argmax(), other_iou.argmax()
        if BACKGROUND_IOU <= same_iou[best_same] < FOREGROUND_IOU:
            outcomes.append(("localisation", anns[best_same]))
        elif other_iou[best_other] >= FOREGROUND_IOU:
            outcomes.append(("classification", anns[best_other]))
        elif same_iou[best_same] >= FOREGROUND_IOU:
            outcomes.append(("duplicate", None))
        elif ious[k][~is_crowd].max(initial=0.0) < BACKGROUND_IOU:
            outcomes.append(("background", None))
        else:
            outcomes.append(("both", None))
    return outcomes


def _fixed(gt: COCO, dets: list[dict], outcomes: list, missed: list[int], error_type: str):
    """(ground truth, detections) with only the errors of ``error_type`` fixed."""
    if error_type == "missed":
        return _without_annotations(gt, set(missed)), dets
    claimed = {d["image_id"]: set() for d in dets}  # objects a correct or fixed detection already took
    for d, (kind, target) in zip(dets, outcomes):
        if kind == "correct" and target is not None:
            claimed[d["image_id"]].add(target["id"])
    fixed = []
    for i in sorted(range(len(dets)), key=lambda i: -dets[i]["score"]):
        d, (kind, target) = dets[i], outcomes[i]
        if kind != error_type:
            fixed.append(d)
            continue
        if target is None or target["id"] in claimed[d["image_id"]]:
            continue  # removed: background, duplicate, both, or a fix whose object is already found
        claimed[d["image_id"]].add(target["id"])
        d = dict(d, category_id=target["category_id"])
        if error_type == "localisation":
            d["bbox"] = list(target["bbox"])
            d["segmentation"] = gt.annToRLE(target)
        fixed.append(d)
    return gt, fixed


def _without_annotations(gt: COCO, ann_ids: set[int]) -> COCO:
    """A copy of ``gt`` without the given annotations."""
    out = COCO()
    out.dataset = {**gt.dataset, "annotations": [a for a in gt.dataset["annotations"] if a["id"] not in ann_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        out.createIndex()
    return out


def error_costs(gt: COCO, dets: list[dict], iou_type: str) -> dict:
    """{"AP50", "counts": {type: number of errors}, and per error type: AP50 with only those fixed minus AP50}.
    ``dets``: COCO results, each with "bbox" (xywh) for iou_type "bbox", "segmentation" (RLE) for "segm"."""
    outcomes, missed = classify_errors(gt, dets, iou_type)
    base = ap50(gt, dets, iou_type)
    costs: dict = {"AP50": round(base, 6)}
    counts = {t: sum(kind == t for kind, _ in outcomes) for t in ERROR_TYPES}
    counts["missed"] = len(missed)
    for error_type in ERROR_TYPES:
        fixed_gt, fixed_dets = _fixed(gt, dets, outcomes, missed, error_type)
        costs[error_type] = round(ap50(fixed_gt, fixed_dets, iou_type) - base, 6) if counts[error_type] else 0.0
    costs["counts"] = counts
    return costs


def error_costs_of(result: dict, dataset) -> dict[str, dict]:
    """Box and mask error costs of an evaluation (``EvalResult.to_dict()`` with its predictions) on the
    dataset it ran on: {"bbox": error_costs(...), "segm": error_costs(...)}."""
    gt, name_to_cat = ground_truth(dataset)
    dets = []
    for pred in result["predictions"]:
        masks = pred["masks"] or [None] * len(pred["boxes"])
        for (x0, y0, x1, y1), score, name, rle in zip(pred["boxes"], pred["scores"], pred["labels"], masks):
            if name in name_to_cat:
                dets.append({"image_id": pred["image_id"], "category_id": name_to_cat[name], "score": score,
                             "bbox": [x0, y0, x1 - x0, y1 - y0], "segmentation": rle})
    return {"bbox": error_costs(gt, dets, "bbox"),
            "segm": error_costs(gt, [d for d in dets if d["segmentation"] is not None], "segm")}


__all__ = ["ERROR_TYPES", "ap50", "classify_errors", "error_costs", "error_costs_of"]
