"""Fidelity of the reduced precisions, measured against float32 on the same weights (issue 17's targets).

    record = ap_fidelity(loaded, dataset, ["bfloat16", "float16"])   # a model card's "precision_fidelity"
    matched, total = matched_share(float32_detections, bfloat16_detections)   # mrcnn bench, R50
    record = check_precisions(loaded_float32, images)   # any model, no labels: recorded for its weights file

``ap_fidelity``: COCO box and mask AP in float32 and in each reduced precision; a precision is ``ok`` when
neither AP falls more than AP_TOLERANCE below float32's. ``matched_share``: the share of float32's
detections that the reduced run also finds (same label, box IoU ≥ 0.95, score within 0.02); ``ok`` at
MIN_MATCHED_SHARE. ``check_precisions``: ``matched_share`` on a model's own images (or generated scenes),
recorded for its weights file (zoo.write_precision_check): how a model with no card — imported, torchvision's
— gets measured. A record whose precision is not ok keeps ``auto`` from picking it for that model
(mrcnn.model.zoo.load_model reads the card's and the check's).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable

import numpy as np
import torch

from mrcnn.data.shapes import generate_scene
from mrcnn.errors import MrcnnError
from mrcnn.evaluation.evaluate import evaluate
from mrcnn.inference.compare import compare_detections
from mrcnn.inference.precision import AP_TOLERANCE, MIN_MATCHED_SHARE, native_precisions, prepare_model
from mrcnn.inference.structures import Detections, Thresholds
from mrcnn.inference.trace import run_trace
from mrcnn.model.zoo import LoadedModel, write_precision_check

MATCH_IOU = 0.95
MATCH_SCORE_DIFF = 0.02
CHECK_SCENES, CHECK_SCENE_SIZE = 3, 512  # what check_precisions runs on when given no images


def reduced_native_precisions(device: torch.device) -> list[str]:
    """The reduced precisions ``device`` runs natively: those ``auto`` may pick, so those worth checking."""
    return [p for p in native_precisions(device) if p != "float32"]


def in_precision(loaded: LoadedModel, precision: str) -> LoadedModel:
    """A copy of a float32 model that runs in ``precision`` (the original is untouched: it may be shared)."""
    if precision == loaded.precision:
        return loaded
    model = prepare_model(copy.deepcopy(loaded.model), precision)
    return dataclasses.replace(loaded, model=model, precision=precision, precision_note="")


def ap_fidelity(loaded: LoadedModel, dataset, precisions: list[str], data_name: str = "",
                progress: Callable[[int, int], None] | None = None) -> dict:
    """Box and mask AP of float32 ``loaded`` and of each of ``precisions`` on ``dataset``, with ``ok`` per
    precision. ``progress(done, total)`` counts images over all runs."""
    runs = ["float32", *precisions]
    total, done = len(dataset) * len(runs), [0]

    def step(i: int, _n: int) -> None:
        if progress is not None:
            progress(done[0] + i, total)

    results = {}
    for precision in runs:
        results[precision] = evaluate(in_precision(loaded, precision), dataset, progress=step,
                                      keep_predictions=False)
        done[0] += len(dataset)
    base = results["float32"]
    record = {"data": data_name, "images": len(dataset), "device": str(loaded.device),
              "target": f"box and mask AP at most {AP_TOLERANCE} below float32's",
              "float32": {"box_AP": base.bbox["AP"], "mask_AP": base.segm["AP"]}}
    for precision in precisions:
        r = results[precision]
        ok = (base.bbox["AP"] - r.bbox["AP"] <= AP_TOLERANCE and base.segm["AP"] - r.segm["AP"] <= AP_TOLERANCE)
        record[precision] = {
            "box_AP": r.bbox["AP"], "mask_AP": r.segm["AP"], "ok": ok,
            "summary": f"box AP {r.bbox['AP']:.4f}, mask AP {r.segm['AP']:.4f} against float32's "
                       f"{base.bbox['AP']:.4f}, {base.segm['AP']:.4f} on {len(dataset)} images"}
    return record


def matched_share(reference: Detections, other: Detections, min_iou: float = MATCH_IOU,
                  max_score_diff: float = MATCH_SCORE_DIFF) -> tuple[int, int]:
    """(matched, total): how many of ``reference``'s detections ``other`` has too — same label, box IoU ≥
    ``min_iou``, score within ``max_score_diff`` — matched one to one, best IoU first (``compare_detections``)."""
    pairs = compare_detections(reference, other, min_iou, max_score_diff).pairs
    return len(pairs), len(reference)


def detection_fidelity(loaded: LoadedModel, images: list[np.ndarray], precisions: list[str],
                       thresholds: Thresholds | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """For each of ``precisions``: the share of float32 ``loaded``'s detections on ``images`` that the
    reduced run matches, with ``ok`` at MIN_MATCHED_SHARE (None when float32 found nothing to match).
    ``progress(done, total)`` counts the traced runs."""
    thresholds = thresholds or Thresholds()
    total_runs, done = len(images) * (1 + len(precisions)), 0

    def traced(model: LoadedModel, image: np.ndarray) -> Detections:
        nonlocal done
        detections = run_trace(model, image, thresholds).detections
        done += 1
        if progress is not None:
            progress(done, total_runs)
        return detections

    reference = [traced(loaded, image) for image in images]
    record = {"images": len(images), "device": str(loaded.device),
              "target": f"at least {MIN_MATCHED_SHARE:.0%} of float32's detections matched (same label, "
                        f"box IoU >= {MATCH_IOU}, score within {MATCH_SCORE_DIFF})"}
    for precision in precisions:
        reduced = in_precision(loaded, precision)
        counts = [matched_share(ref, traced(reduced, image)) for ref, image in zip(reference, images)]
        matched, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
        if not total:  # nothing to compare: no verdict either way
            record[precision] = {"matched": None, "detections": 0, "ok": None,
                                 "summary": f"float32 found no detections at score >= {thresholds.score_thresh} "
                                            f"on {len(images)} images: nothing to compare"}
            continue
        share = matched / total
        record[precision] = {"matched": round(share, 4), "detections": total, "ok": share >= MIN_MATCHED_SHARE,
                             "summary": f"{share:.2%} of float32's {total} detections matched"}
    return record


def precisions_to_check(device: torch.device) -> list[str]:
    """The reduced precisions ``device`` runs natively (MrcnnError when none: there is nothing to check)."""
    precisions = reduced_native_precisions(device)
    if not precisions:
        raise MrcnnError(f"{device} runs no reduced precision natively (auto runs float32 there): "
                         "there is nothing to check")
    return precisions


def check_precisions(loaded: LoadedModel, images: list[np.ndarray] | None = None, data_name: str = "",
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """``detection_fidelity`` of float32 ``loaded`` in every reduced precision its device runs natively, on
    ``images`` (default: CHECK_SCENES generated shapes scenes), recorded for its weights file
    (zoo.write_precision_check) so that loading it with ``auto`` follows the result. Written once measured:
    a check stopped half-way leaves no record."""
    if loaded.precision != "float32":
        raise ValueError(f"check_precisions compares against float32; {loaded.name} was loaded in {loaded.precision}")
    precisions = precisions_to_check(loaded.device)
    if not images:
        images = [generate_scene(seed, size=CHECK_SCENE_SIZE).image for seed in range(CHECK_SCENES)]
        data_name = f"{CHECK_SCENES} generated {CHECK_SCENE_SIZE}-px shapes scenes"
    record = {**detection_fidelity(loaded, images, precisions, progress=progress),
              "data": data_name or f"{len(images)} images", "checked": time.strftime("%Y-%m-%d %H:%M")}
    write_precision_check(loaded.sha256, record)
    return record
