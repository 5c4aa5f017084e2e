"""COCO box and mask metrics (pycocotools) behind `python -m mrcnn evaluate`.

    python -m mrcnn evaluate --model shapes --data DIR --json     # {"bbox": {...}, "segm": {...}, ...}

    result = evaluate(load_model("shapes"), load_dataset("DIR"), progress=lambda done, total: ...)
    result.bbox["AP"], result.segm["AP50"], result.per_class["circle"]["segm_AP"]
    result.pr_curves["segm"]["circle"] -> {"recall": [...], "precision": [...]}   (IoU 0.5)
    result.predictions[i] -> {"image_id", "boxes", "scores", "labels" (names), "masks" (COCO RLE)}

The model is never mutated: a copy runs with the score threshold lowered for AP (0.05, as torchvision's
reference evaluation). Images go through it in batches of consecutive same-size images (a batch of
differently sized images would be zero-padded, which changes GroupNorm statistics and so the results) on
a few worker threads: each worker loads its own images while the others compute, and on a CPU each runs
one intra-op thread, so the cores never wait on each other's OpenMP barriers (on this shared 2-core
machine two intra-op threads ran one image 4x slower than one thread whenever other processes were
busy). Ground truth from items (generated scenes) is taken from the same pass, not loaded twice.

Predictions are matched to the dataset's categories by name; classes the dataset lacks are left out of
the metrics (they stay in ``predictions``). Dataset classes the model lacks have no per-class row (they
are listed in ``classes_not_in_model``); the overall metrics count their objects as missed, as COCO does.
Metrics without any ground truth in their range are -1, as COCO reports them.
"""
from __future__ import annotations

import contextlib
import copy
import io
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn.data.masks import encode_rles, rle_area
from mrcnn.errors import DatasetError
from mrcnn.inference.input_size import check_input_size
from mrcnn.inference.precision import stage_autocast
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
    # dataset classes the model cannot predict: no row in per_class or pr_curves (its "AP 0" there would
    # read as a measurement); the overall metrics count their objects as missed, as COCO does
    classes_not_in_model: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _metrics(stats) -> dict[str, float]:
    return {k: round(float(v), 6) for k, v in zip(METRIC_KEYS, stats[:6])}


def _empty_metrics() -> dict[str, float]:
    return {k: 0.0 for k in METRIC_KEYS}


def _coco_gt_of(dataset) -> tuple[COCO, dict[int, int]] | None:
    """A dataset's own COCO ground truth and {label index -> COCO category id}, or None when it has
    none (e.g. ShapesDataset: the ground truth is then built from its items)."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    if hasattr(base, "coco") and hasattr(base, "label_to_cat_id") and not isinstance(dataset, torch.utils.data.Subset):
        return base.coco, dict(base.label_to_cat_id)
    return None


def _gt_annotations(image, target) -> tuple[dict, list[dict]]:
    """(COCO image record, its annotations without ids) of one dataset item; category id = label index."""
    image_id = int(target["image_id"])
    h, w = image.shape[-2:]
    rles = encode_rles(target["masks"].numpy())
    anns = []
    for k, (box, label) in enumerate(zip(target["boxes"].tolist(), target["labels"].tolist())):
        x0, y0, x1, y1 = box
        anns.append({"image_id": image_id, "category_id": int(label), "segmentation": rles[k],
                     "bbox": [x0, y0, x1 - x0, y1 - y0], "area": rle_area(rles[k]),
                     "iscrowd": int(target["iscrowd"][k]) if "iscrowd" in target else 0})
    return {"id": image_id, "width": int(w), "height": int(h)}, anns


def _coco_from_items(items: list[tuple[dict, list[dict]]], categories: list[str]) -> tuple[COCO, dict[int, int]]:
    images, anns = [], []
    for image, image_anns in items:
        images.append(image)
        anns += [{"id": len(anns) + k + 1, **a} for k, a in enumerate(image_anns)]
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": k, "name": n} for k, n in enumerate(categories) if k > 0]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, {k: k for k in range(1, len(categories))}


def _gt_coco(dataset, categories: list[str]):
    """(COCO ground truth, {dataset label index -> COCO category id}) for any dataset of items."""
    own = _coco_gt_of(dataset)
    if own is not None:
        return own
    return _coco_from_items([_gt_annotations(*dataset[i]) for i in range(len(dataset))], categories)


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


def _item_name(dataset, i: int) -> str:
    """Item ``i`` as a person finds it: its file (a COCO folder's), else its index."""
    base, index = dataset, i
    if isinstance(dataset, torch.utils.data.Subset):
        base, index = dataset.dataset, dataset.indices[i]
    file_name = getattr(base, "file_name", None)
    where = f"image {index + 1} of the dataset"
    return f"{file_name(index)} ({where})" if callable(file_name) else where


def _check_sizes(module: torch.nn.Module, dataset, indices: range, images: list[torch.Tensor]) -> None:
    """ImageError naming the first image the model's input transform would scale to nothing on a side
    (a 1000x1 image: torch's resize fails on it with a message that names no image)."""
    for i, image in zip(indices, images):
        check_input_size(module, image.shape[-2], image.shape[-1], _item_name(dataset, i))


def _batches(total: int, batch_size: int) -> list[range]:
    return [range(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]


def _same_size_runs(images: list[torch.Tensor]) -> list[slice]:
    """Consecutive images of one size go through the network together."""
    runs, start = [], 0
    for k in range(1, len(images) + 1):
        if k == len(images) or images[k].shape != images[start].shape:
            runs.append(slice(start, k))
            start = k
    return runs


def evaluate(model, dataset, progress: Callable[[int, int], None] | None = None, score_thresh: float = 0.05,
             max_detections: int = 100, device: str | torch.device | None = None,
             categories: list[str] | None = None, mask_thresh: float = 0.5, keep_predictions: bool = True,
             batch_size: int = 2, workers: int | None = None,
             run_slot: Callable[[tuple[int, int, int], int], AbstractContextManager] | None = None) -> EvalResult:
    """COCO metrics of ``model`` (a LoadedModel, or an nn.Module with ``categories``) on ``dataset``
    (CocoDataset, ShapesDataset or any dataset of the same items with ``.categories``).

    progress(done, total) is called after each image, from the calling thread. ``batch_size``: images per
    network call (consecutive images of one size); ``workers``: threads that load and run batches
    (default: the caller's intra-op thread count on a CPU, 2 on a GPU). The metrics do not depend on
    either.

    ``run_slot(shape, images)``, when given, is entered around each round of network runs (one batch per
    worker, side by side), in the calling thread, with the (H, W, C) of the round's largest image and the
    round's number of images: a server's run slot and memory reservation (the app's is
    TraceCache.network_run), so that other users' runs wait one round, not the whole evaluation. Loading the
    images and encoding the masks stay outside it.
    ValueError for a threshold that is NaN or out of range."""
    Thresholds(score_thresh=score_thresh, max_detections=max_detections, mask_thresh=mask_thresh)
    if int(batch_size) < 1 or (workers is not None and int(workers) < 1):
        raise ValueError(f"batch_size and workers must be at least 1, got {batch_size} and {workers}")
    t0 = time.time()
    precision = "float32"
    if hasattr(model, "model") and hasattr(model, "categories"):  # LoadedModel
        module, model_categories = model.model, list(model.categories)
        device = device if device is not None else model.device
        precision = model.precision  # the network stages run under autocast in a reduced one
    else:
        module = model
        model_categories = list(categories if categories is not None else dataset.categories)
    if device is None:
        device = next(module.parameters()).device
    device = torch.device(device)
    data_categories = list(dataset.categories)
    if len(dataset) == 0:
        raise DatasetError("the evaluation dataset has no images")
    own_gt = _coco_gt_of(dataset)
    label_to_cat = own_gt[1] if own_gt is not None else {k: k for k in range(1, len(data_categories))}
    # nothing the model could find: COCOeval has nothing to average, and the tables showed AP 0.000 without
    # a word (pycocotools' getAnnIds filters nothing for an empty category list)
    shared = [cid for label, cid in label_to_cat.items() if data_categories[label] in model_categories[1:]]
    if not shared:
        raise DatasetError(f"none of the dataset's classes ({', '.join(data_categories[1:]) or 'none'}) is one of "
                           f"the model's ({', '.join(model_categories[1:])}): AP cannot be measured on it")
    if own_gt is not None and not own_gt[0].getAnnIds(catIds=shared):
        raise DatasetError(f"the dataset has no annotated object of the model's classes "
                           f"({', '.join(model_categories[1:])}): AP cannot be measured on it")
    name_to_cat = {data_categories[label]: cid for label, cid in label_to_cat.items()}
    cat_names = {cid: data_categories[label] for label, cid in label_to_cat.items()}

    net = _eval_model(module, score_thresh, max_detections, device)
    total = len(dataset)
    if workers is None:
        workers = torch.get_num_threads() if device.type == "cpu" else 2

    callers_threads = torch.get_num_threads()

    def one_thread_per_worker() -> None:
        if device.type == "cpu" and workers > 1:
            torch.set_num_threads(1)  # this thread's OpenMP count, and the default of threads started from now on

    def load(indices: range) -> list:
        items = [dataset[i] for i in indices]
        _check_sizes(net, dataset, indices, [image for image, _ in items])
        return items

    def compute(items: list) -> list[dict]:
        images, outputs = [image for image, _ in items], []
        with torch.inference_mode(), stage_autocast(precision, device):  # autocast is per thread: set here
            for run in _same_size_runs(images):
                outputs += net([image.to(device) for image in images[run]])
        return outputs

    def encode(items: list, outputs: list[dict]) -> list[tuple[dict, tuple | None]]:
        """(prediction record, ground truth items or None) per image of the batch."""
        records = []
        for (image, target), out in zip(items, outputs):
            boxes = out["boxes"].float().cpu().numpy()
            rles = []
            if "masks" in out and len(boxes):
                rles = encode_rles((out["masks"][:, 0] > mask_thresh).cpu().numpy())
            record = {"image_id": int(target["image_id"]), "boxes": boxes,
                      "scores": out["scores"].float().cpu().numpy(),
                      "labels": [model_categories[int(k)] for k in out["labels"].cpu()], "masks": rles}
            records.append((record, None if own_gt is not None else _gt_annotations(image, target)))
        return records

    def run_batch(indices: range) -> list[tuple[dict, tuple | None]]:
        items = load(indices)
        return encode(items, compute(items))

    def rounds() -> Iterator[list[tuple[dict, tuple | None]]]:
        """With ``run_slot``: one batch per worker at a time, their network runs side by side inside one slot
        (a slot per worker's batch left the other cores idle: half the throughput), loading and encoding
        outside it (loading the next round while this one ran gained nothing measurable)."""
        batches = list(_batches(total, int(batch_size)))
        for k in range(0, len(batches), int(workers)):
            group = list(pool.map(load, batches[k:k + int(workers)]))
            images = [image for items in group for image, _ in items]
            largest = (max(i.shape[-2] for i in images), max(i.shape[-1] for i in images), images[0].shape[0])
            with run_slot(largest, len(images)):
                outputs = list(pool.map(compute, group))
            yield from pool.map(encode, group, outputs)

    results = {"bbox": [], "segm": []}
    predictions, gt_items = [], []
    pool = ThreadPoolExecutor(max_workers=int(workers), initializer=one_thread_per_worker,
                              thread_name_prefix="mrcnn-evaluate")
    try:
        done = 0
        batches = pool.map(run_batch, _batches(total, int(batch_size))) if run_slot is None else rounds()
        for records in batches:  # in dataset order
            for record, gt_item in records:
                _add_results(results, record, name_to_cat)
                if gt_item is not None:
                    gt_items.append(gt_item)
                if keep_predictions:
                    predictions.append({**record, "boxes": record["boxes"].round(2).tolist(),
                                        "scores": record["scores"].round(4).tolist()})
                done += 1
                if progress is not None:
                    progress(done, total)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an error (or a stop) leaves no batch running
        # the workers' one thread had become every new thread's: on the app's server, each later page run (a new
        # script thread: Detect's network runs, the next evaluation's worker count) ran on one core
        torch.set_num_threads(callers_threads)
    gt = own_gt[0] if own_gt is not None else _coco_from_items(gt_items, data_categories)[0]

    summary, per_class, pr_curves = {}, {}, {}
    for iou_type in IOU_TYPES:
        summary[iou_type], per_cls, pr_curves[iou_type] = _coco_eval(gt, results[iou_type], iou_type, cat_names)
        for name, values in per_cls.items():
            entry = per_class.setdefault(name, {})
            entry[f"{iou_type}_AP"] = values["AP"]
            entry[f"{iou_type}_AP50"] = values["AP50"]
    lacking = [n for n in dict.fromkeys(cat_names.values()) if n not in model_categories[1:]]
    per_class = {n: v for n, v in per_class.items() if n not in lacking}
    pr_curves = {t: {n: c for n, c in curves.items() if n not in lacking} for t, curves in pr_curves.items()}
    return EvalResult(summary["bbox"], summary["segm"], per_class, pr_curves, predictions, total,
                      round(time.time() - t0, 2), lacking)


def _add_results(results: dict[str, list], record: dict, name_to_cat: dict[str, int]) -> None:
    """One image's detections as COCO result entries (classes the dataset lacks are left out)."""
    for k, (name, box, score) in enumerate(zip(record["labels"], record["boxes"].tolist(), record["scores"])):
        cid = name_to_cat.get(name)
        if cid is None:
            continue
        x0, y0, x1, y1 = box
        common = {"image_id": record["image_id"], "category_id": cid, "score": float(score)}
        results["bbox"].append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
        if record["masks"]:
            results["segm"].append({**common, "segmentation": record["masks"][k]})


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
