"""Two models' detections of one image, matched one to one.

    comparison = compare_detections(dets_a, dets_b)          # same class name, box IoU >= 0.5
    comparison.pairs      # (M, 2) index into A, index into B
    comparison.only_a     # indices of A's detections B has no match for; only_b likewise
    counts_by_class(comparison, dets_a, dets_b)  # {"circle": {"matched": 2, "only A": 1, "only B": 0}, ...}

Classes are matched by name, not index: the two models may order (or name) their classes differently,
e.g. the bundled model against an imported one. Matching is greedy by IoU, highest first (ties: the
higher score sum first), the same rule as a COCO evaluation's one-to-one assignment but symmetric:
swapping A and B swaps the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from mrcnn.inference.structures import Detections

MATCH_IOU = 0.5
COUNT_COLUMNS = ("matched", "only A", "only B")


@dataclass(frozen=True)
class Comparison:
    """The one-to-one matching of detections A and B (indices into each)."""

    pairs: np.ndarray  # int64 (M, 2): (index in A, index in B), highest IoU first
    ious: np.ndarray  # float32 (M,): box IoU of each pair
    only_a: np.ndarray  # int64 (Ka,): A's detections without a match, ascending
    only_b: np.ndarray  # int64 (Kb,)

    @property
    def counts(self) -> dict[str, int]:
        return dict(zip(COUNT_COLUMNS, (len(self.pairs), len(self.only_a), len(self.only_b))))


def compare_detections(a: Detections, b: Detections, iou_thresh: float = MATCH_IOU,
                       max_score_diff: float | None = None) -> Comparison:
    """Match each detection of ``a`` to at most one of ``b``: same class name, box IoU >= ``iou_thresh``
    and, when ``max_score_diff`` is given, scores at most that far apart."""
    if not 0.0 < float(iou_thresh) <= 1.0:  # NaN fails too
        raise ValueError(f"iou_thresh must be in (0, 1], got {iou_thresh!r}")
    iou = box_iou(torch.as_tensor(a.boxes, dtype=torch.float32).reshape(-1, 4),
                  torch.as_tensor(b.boxes, dtype=torch.float32).reshape(-1, 4)).numpy()  # (Na, Nb)
    same_class = np.asarray(a.label_names, object)[:, None] == np.asarray(b.label_names, object)[None, :]
    candidates = same_class & (iou >= iou_thresh)
    if max_score_diff is not None:
        candidates &= np.abs(a.scores[:, None].astype(np.float64) - b.scores[None, :]) <= max_score_diff
    ia, ib = np.nonzero(candidates)
    score_sum = a.scores[ia].astype(np.float64) + b.scores[ib]
    order = np.lexsort((-score_sum, -iou[ia, ib]))  # by IoU, then by score, both descending
    used_a, used_b = np.zeros(len(a), bool), np.zeros(len(b), bool)
    pairs = []
    for k in order:
        i, j = ia[k], ib[k]
        if not used_a[i] and not used_b[j]:
            used_a[i] = used_b[j] = True
            pairs.append((i, j))
    pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
    return Comparison(pairs, iou[pairs[:, 0], pairs[:, 1]].astype(np.float32),
                      np.flatnonzero(~used_a), np.flatnonzero(~used_b))


def counts_by_class(comparison: Comparison, a: Detections, b: Detections) -> dict[str, dict[str, int]]:
    """{class name: {"matched", "only A", "only B"}} for every class either model detected, sorted by name."""
    names_a, names_b = a.label_names, b.label_names
    counts: dict[str, dict[str, int]] = {}

    def add(name: str, column: str) -> None:
        counts.setdefault(name, dict.fromkeys(COUNT_COLUMNS, 0))[column] += 1

    for i, _ in comparison.pairs:
        add(names_a[i], "matched")
    for i in comparison.only_a:
        add(names_a[i], "only A")
    for j in comparison.only_b:
        add(names_b[j], "only B")
    return dict(sorted(counts.items()))


__all__ = ["Comparison", "compare_detections", "counts_by_class", "MATCH_IOU", "COUNT_COLUMNS"]
