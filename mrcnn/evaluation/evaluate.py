"""COCO box and mask metrics (pycocotools) behind `python -m mrcnn evaluate`.

    python -m mrcnn evaluate --model shapes --data DIR --json     # {"bbox": {...}, "segm": {...}, ...}

    result = evaluate(load_model("shapes"), load_dataset("DIR"), progress=lambda done, total: ...)
    result.bbox["AP"], result.segm["AP50"], result.per_class["circle"]["segm_AP"]
    result.pr_curves["segm"]["circle"] -> {"recall": [...], "precision": [...]}   (IoU 0.5)
    result.predictions[i] -> {"image_id", "boxes", "scores", "labels" (names), "masks" (COCO RLE)}

The model is never mutated: a copy runs with the score threshold lowered for AP (0.05, as torchvision's
reference evaluation). Predictions are matched to the dataset's categories by name; classes the
dataset lacks are left out of the metrics (they stay in ``predictions``). Metrics without any
ground truth in their range are -1, as COCO reports them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.data.masks import encode_rles, rle_area
from mrcnn.errors import DatasetError
from mrcnn.inference.structures import Thresholds

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
IOU_TYPES = ("bbox", "segm")


@dataclass
class EvalResult:
    bbox: dict[str, float]
    segm: dict[str, float]
    per_class: dict[str, dict[str, float]]             # class -> {"bbox_AP", "segm_AP", "bbox_AP50", "segm_AP50"}
    pr_curves: dict[str, dict[str, dict[str, list]]]   # iou_type -> class -> {"recall", "precision"} at IoU 0.5
    predictions: list[dict] = field(default_factory=list)
    num_images: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _metrics(stats) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in zip(METRIC_KEYS, stats[:6])}


def _empty_metrics() -> dict[str, float]:
    return {k: 0.0 for k in METRIC_KEYS}


def _gt_coco(dataset, categories: list[str]):
    """(COCO ground truth, {dataset label index -> COCO category id}) for any dataset of items."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    if hasattr(base, "coco") and hasattr(base, "label_to_cat_id") and not isinstance(dataset, torch.utils.data.Subset):
        return base.coco, dict(base.label_to_cat_id)
    # build it from the items (e.g. ShapesDataset): category id = label index
    images, anns = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        image_id = int(target["image_id"])
        h, w = image.shape[-2:]
        images.append({"id": image_id, "width": int(w), "height": int(h)})
        rles = encode_rles(target["masks"].numpy())
        for k, (box, label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist())):
            x0, y0, x1, y1 = box
            rle = rles[k]
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(label),
                         "segmentation": rle,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": rle_area(rle),
                         "iscrowd": int(target["iscrowd"][k]) if "iscrowd" in target else 0})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": k, "name": n} for k, n in enumerate(categories) if k > 0]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, {k: k for k in range(1, len(categories))}


def ground_truth(dataset) -> tuple[COCO, dict[str, int]]:
    """(COCO ground truth of ``dataset``, {class name -> COCO category id})."""
    gt, label_to_cat = _gt_coco(dataset, list(dataset.categories))
    return gt, {dataset.categories[label]: cid for label, cid in label_to_cat.items()}


def _eval_model(model: torch.nn.Module, score_thresh: float, max_detections: int, device) -> torch.nn.Module:
    """A copy of ``model`` set up for AP: eval mode, low score threshold. The original is untouched."""
    m = copy.deepcopy(model).eval()
    if device is not None:
        m.to(device)
    m.roi_heads.score_thresh = float(score_thresh)
    m.roi_heads.detections_per_img = int(max_detections)
    return m


def evaluate(model, dataset, progress: Callable[[int, int], None] | None = None, score_thresh: float = 0.05,
             max_detections: int = 100, device: str | torch.device | None = None,
             categories: list[str] | None = None, mask_thresh: float = 0.5, keep_predictions: bool = True) -> EvalResult:
    """COCO metrics of ``model`` (a LoadedModel, or an nn.Module with ``categories``) on ``dataset``
    (CocoDataset, ShapesDataset or any dataset of the same items with ``.categories``).

    progress(done, total) is called after each image. ValueError for a threshold that is NaN or out of range."""
    Thresholds(score_thresh=score_thresh, max_detections=max_detections, mask_thresh=mask_thresh)
    t0 = time.time()
    if hasattr(model, "model") and hasattr(model, "categories"):  # LoadedModel
        module, model_categories = model.model, list(model.categories)
        device = device if device is not None else model.device
    else:
        module = model
        model_categories = list(categories if categories is not None else dataset.categories)
    if device is None:
        device = next(module.parameters()).device
    device = torch.device(device)
    data_categories = list(dataset.categories)
    if len(dataset) == 0:
        raise DatasetError("the evaluation dataset has no images")
    gt, label_to_cat = _gt_coco(dataset, data_categories)
    name_to_cat = {data_categories[label]: cid for label, cid in label_to_cat.items()}
    cat_names = {cid: data_categories[label] for label, cid in label_to_cat.items()}

    net = _eval_model(module, score_thresh, max_detections, device)
    results = {"bbox": [], "segm": []}
    predictions = []
    total = len(dataset)
    with torch.inference_mode():
        for i in range(total):
            image, target = dataset[i]
            image_id = int(target["image_id"])
            out = net([image.to(device)])[0]
            boxes = out["boxes"].float().cpu().numpy()
            scores = out["scores"].float().cpu().numpy()
            names = [model_categories[int(k)] for k in out["labels"].cpu()]
            rles = []
            if "masks" in out and len(boxes):
                rles = encode_rles((out["masks"][:, 0] > mask_thresh).cpu().numpy())
            for k in range(len(boxes)):
                cid = name_to_cat.get(names[k])
                if cid is None:
                    continue
                x0, y0, x1, y1 = boxes[k].tolist()
                common = {"image_id": image_id, "category_id": cid, "score": float(scores[k])}
                results["bbox"].append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
                if rles:
                    results["segm"].append({**common, "segmentation": rles[k]})
            if keep_predictions:
                predictions.append({
                    "image_id": image_id, "boxes": boxes.round(2).tolist(), "scores": scores.round(4).tolist(),
                    "labels": names, "masks": rles})
            if progress is not None:
                progress(i + 1, total)

    summary, per_class, pr_curves = {}, {}, {}
    for iou_type in IOU_TYPES:
        summary[iou_type], per_cls, pr_curves[iou_type] = _coco_eval(gt, results[iou_type], iou_type, cat_names)
        for name, values in per_cls.items():
            entry = per_class.setdefault(name, {})
            entry[f"{iou_type}_AP"] = values["AP"]
            entry[f"{iou_type}_AP50"] = values["AP50"]
    return EvalResult(summary["bbox"], summary["segm"], per_class, pr_curves, predictions, total,
                      round(time.time() - t0, 2))


def _coco_eval(gt, dets: list[dict], iou_type: str, cat_names: dict[int, str]):
    """(summary metrics, per-class {"AP", "AP50"}, per-class PR curve at IoU 0.5)."""
    if not dets or not gt.getAnnIds():
        zero_classes = {n: {"AP": 0.0, "AP50": 0.0} for n in cat_names.values()}
        return _empty_metrics(), zero_classes, {}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]  # (T iou, R recall, K classes, A areas, M maxdets); -1 = no data
    recall_points = ev.params.recThrs
    per_class, curves = {}, {}
    for k, cid in enumerate(ev.params.catIds):
        name = cat_names.get(cid, str(cid))
        p_all = precision[:, :, k, 0, -1]
        p50 = precision[0, :, k, 0, -1]
        per_class[name] = {"AP": round(float(p_all[p_all > -1].mean()), 6) if (p_all > -1).any() else -1.0,
                           "AP50": round(float(p50[p50 > -1].mean()), 6) if (p50 > -1).any() else -1.0}
        valid = p50 > -1
        curves[name] = {"recall": [round(float(r), 4) for r in recall_points[valid]],
                        "precision": [round(float(p), 4) for p in p50[valid]]}
    return _metrics(ev.stats), per_class, curves


__all__ = ["EvalResult", "evaluate", "ground_truth", "METRIC_KEYS"]
