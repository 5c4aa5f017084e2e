"""Why did the model miss this object? Matching detections to ground truth, and reasons from the trace.

For every ground-truth object that no detection of its class matched, the trace tells which stage
lost it, checked in pipeline order:

1. ``no_proposal``   — no RPN proposal overlapped it enough (RPN recall);
2. ``low_score``     — a candidate of its class covered it, but its best score was under the threshold;
3. ``other_class``   — it was detected, but as another class (or the box head gave its proposals
                       to another class or the background);
4. ``duplicate``     — the only detection covering it matched another object;
5. ``nms``           — a candidate above the threshold was suppressed by a higher-scoring detection
                       of the same class (which one, and their IoU);
6. ``max_detections``— it survived NMS but fell past the max-detections cut.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from mrcnn.inference.structures import Detections, Thresholds


@dataclass
class Match:
    """Greedy COCO-style matching at one IoU: detections by descending score take the best free GT."""

    det_tp: np.ndarray  # bool (D,) detection matched a GT of its class
    det_gt: np.ndarray  # int (D,) index of the matched GT or -1
    gt_det: np.ndarray  # int (G,) index of the matching detection or -1

    @property
    def missed(self) -> np.ndarray:
        return np.flatnonzero(self.gt_det < 0)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), np.float32)
    return box_iou(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)).numpy()


def match_detections(dets: Detections, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                     iou_thresh: float = 0.5) -> Match:
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
    ious = _iou(dets.boxes, gt_boxes)
    det_gt = np.full(len(dets), -1, np.int64)
    gt_det = np.full(len(gt_boxes), -1, np.int64)
    for d in np.argsort(-dets.scores, kind="stable"):
        same = (gt_labels == dets.labels[d]) & (gt_det < 0) & (ious[d] >= iou_thresh)
        if same.any():
            g = int(np.argmax(np.where(same, ious[d], -1.0)))
            det_gt[d], gt_det[g] = g, d
    return Match(det_gt >= 0, det_gt, gt_det)


@dataclass
class MissReason:
    gt_index: int
    label: str
    reason: str  # one of the codes in the module docstring
    message: str
    score: float | None = None  # best candidate score of the right class, where there was one
    by_detection: int | None = None  # the detection that suppressed it / took it

    def to_dict(self) -> dict:
        return asdict(self)


def explain_misses(dets: Detections, gt_boxes: np.ndarray, gt_labels: np.ndarray, thresholds: Thresholds,
                   proposal_boxes: np.ndarray, cand_probs: np.ndarray, cand_boxes: np.ndarray,
                   iou_thresh: float = 0.5) -> list[MissReason]:
    """Reasons for every missed ground-truth object.

    proposal_boxes (P, 4), cand_probs (P, C), cand_boxes (P, C, 4) are the trace's proposals and
    candidates, all boxes in original-image pixels; dets are the detections shown at ``thresholds``."""
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
    match = match_detections(dets, gt_boxes, gt_labels, iou_thresh)
    prop_iou = _iou(proposal_boxes, gt_boxes)  # (P, G)
    det_iou = _iou(dets.boxes, gt_boxes)  # (D, G)
    reasons = []
    for g in match.missed:
        g = int(g)
        cls = int(gt_labels[g])
        name = dets.categories[cls] if 0 <= cls < len(dets.categories) else str(cls)

        def miss(reason, message, score=None, by=None):
            reasons.append(MissReason(g, name, reason, message, score, by))

        best_prop = float(prop_iou[:, g].max()) if len(proposal_boxes) else 0.0
        if best_prop < iou_thresh:
            miss("no_proposal", f"no RPN proposal covered it (best proposal IoU {best_prop:.2f} < {iou_thresh})")
            continue
        same_iou = _iou(cand_boxes[:, cls], gt_boxes[g:g + 1])[:, 0]  # refined boxes of its class
        covering = np.flatnonzero(same_iou >= iou_thresh)
        # candidates already shown as detections matched other objects (else this one would match)
        shown = set(dets.candidate_ids.tolist())
        free = np.array([p for p in covering if p * cand_probs.shape[1] + cls not in shown], np.int64)
        best = int(free[np.argmax(cand_probs[free, cls])]) if free.size else None
        best_score = float(cand_probs[best, cls]) if best is not None else 0.0
        other = [d for d in np.flatnonzero(det_iou[:, g] >= iou_thresh) if dets.labels[d] != cls]
        if best is None and covering.size:
            miss("duplicate", "the detection covering it was matched to another object")
            continue
        if best is None or best_score <= thresholds.score_thresh:
            if other:
                d = int(max(other, key=lambda d: dets.scores[d]))
                miss("other_class", f"detected as {dets.categories[int(dets.labels[d])]} "
                     f"(score {dets.scores[d]:.2f}) instead of {name}", best_score if best is not None else None, d)
            elif best is not None:
                miss("low_score", f"its best candidate scored {best_score:.2f}, below the score threshold "
                     f"{thresholds.score_thresh:.2f}", best_score)
            else:
                props = np.flatnonzero(prop_iou[:, g] >= iou_thresh)
                top = props[np.argmax(prop_iou[props, g])]
                guess = int(np.argmax(cand_probs[top]))
                what = "background" if guess == 0 else dets.categories[guess]
                miss("other_class", f"the box head took its best proposal for {what} "
                     f"(p={cand_probs[top, guess]:.2f}; {name} p={cand_probs[top, cls]:.2f})")
            continue
        best_box = cand_boxes[best, cls][None]
        same_dets = [d for d in range(len(dets)) if dets.labels[d] == cls and dets.scores[d] >= best_score]
        sup_iou = _iou(dets.boxes[same_dets], best_box)[:, 0] if same_dets else np.zeros(0)
        suppressors = [(d, i) for d, i in zip(same_dets, sup_iou) if i > thresholds.nms_thresh]
        if suppressors:
            d, i = max(suppressors, key=lambda x: x[1])
            tp = match.det_gt[d]
            other_obj = f", which matched object {tp}" if tp >= 0 else ""
            miss("nms", f"suppressed by NMS: detection {d} ({dets.categories[cls]} {dets.scores[d]:.2f}{other_obj}) "
                 f"overlaps its candidate ({best_score:.2f}) with IoU {i:.2f} > {thresholds.nms_thresh:.2f}",
                 best_score, int(d))
        else:
            miss("max_detections", f"its candidate ({best_score:.2f}) survived NMS but fell past the "
                 f"max-detections cut ({thresholds.max_detections})", best_score)
    return reasons


def explain_trace_misses(trace, gt_boxes: np.ndarray, gt_labels: np.ndarray,
                         iou_thresh: float = 0.5) -> list[MissReason]:
    """explain_misses for a Trace's current detections (gt boxes in original-image pixels)."""
    num_props, num_classes = trace.candidates.probs.shape
    cand_boxes = trace.to_original(trace.candidates.boxes.reshape(-1, 4)).reshape(num_props, num_classes, 4)
    return explain_misses(trace.detections, gt_boxes, gt_labels, trace.thresholds,
                          trace.to_original(trace.proposals.boxes), trace.candidates.probs.float().cpu().numpy(),
                          cand_boxes, iou_thresh)


def confusion_matrix(per_image: list[tuple[Detections, np.ndarray, np.ndarray]], num_classes: int,
                     iou_thresh: float = 0.5) -> np.ndarray:
    """(C, C) counts, rows = true class, columns = predicted class; index 0 is the background:
    row 0 counts detections that cover no object (false positives), column 0 objects no detection
    covered (misses). Each object takes the highest-scoring free detection that overlaps it, any class.

    per_image: (detections, gt_boxes (G, 4), gt_labels (G,)) for every image."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for dets, gt_boxes, gt_labels in per_image:
        gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
        gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
        ious = _iou(dets.boxes, gt_boxes)
        taken = np.zeros(len(dets), bool)
        # objects in order; for each, prefer a same-class detection, else the best-overlapping one
        for g in range(len(gt_boxes)):
            free = (~taken) & (ious[:, g] >= iou_thresh) if len(dets) else np.zeros(0, bool)
            if not free.any():
                cm[gt_labels[g], 0] += 1
                continue
            same = free & (dets.labels == gt_labels[g])
            pool = np.flatnonzero(same if same.any() else free)
            d = int(pool[np.argmax(dets.scores[pool])])
            taken[d] = True
            cm[gt_labels[g], dets.labels[d]] += 1
        for d in np.flatnonzero(~taken):
            cm[0, dets.labels[d]] += 1
    return cm
