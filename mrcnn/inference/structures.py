"""Small value types shared by every part: inference thresholds, RPN knobs and a detections container."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Mapping

import numpy as np


# More would not be looked at, and each detection keeps a full-image mask (1,000 of a 1 MP image: 1 GB).
MAX_DETECTIONS = 1000


def _check_fraction(name: str, value: float) -> None:
    if not (0.0 <= float(value) <= 1.0):  # NaN fails too
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")


@dataclass(frozen=True)
class Thresholds:
    """Everything applied after the network to turn candidates into detections (mmdetection's test_cfg)."""

    score_thresh: float = 0.5
    nms_thresh: float = 0.5  # per-class NMS IoU; 1.0 disables suppression
    max_detections: int = 100
    mask_thresh: float = 0.5
    agnostic_nms: bool = False  # one NMS over every class's boxes instead of one per class
    # class name -> its own score threshold (classes not named use score_thresh). Given as a mapping or
    # pairs; kept as sorted (name, value) pairs so that Thresholds stays hashable (the app caches by it).
    class_thresh: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        _check_fraction("score_thresh", self.score_thresh)
        _check_fraction("nms_thresh", self.nms_thresh)
        _check_fraction("mask_thresh", self.mask_thresh)
        if not 0 <= int(self.max_detections) <= MAX_DETECTIONS:
            raise ValueError(f"max_detections must be between 0 and {MAX_DETECTIONS}, got {self.max_detections!r}")
        pairs = self.class_thresh.items() if isinstance(self.class_thresh, Mapping) else self.class_thresh
        checked = {}
        for name, value in pairs:
            if not isinstance(name, str) or not name:
                raise ValueError(f"class_thresh: class names must be non-empty strings, got {name!r}")
            _check_fraction(f"score threshold of class {name!r}", value)
            checked[name] = float(value)
        object.__setattr__(self, "class_thresh", tuple(sorted(checked.items())))
        object.__setattr__(self, "agnostic_nms", bool(self.agnostic_nms))

    def score_thresh_of(self, class_name: str) -> float:
        return dict(self.class_thresh).get(class_name, float(self.score_thresh))

    def check_classes(self, categories: list[str]) -> None:
        """ValueError naming the first class of class_thresh the model does not have."""
        known = [c for c in dict.fromkeys(categories[1:]) if c != "N/A"]  # COCO's label space has N/A gaps
        for name, _ in self.class_thresh:
            if name not in known:
                raise ValueError(f"unknown class {name!r}; the model's classes are {', '.join(known)}")

    def to_dict(self) -> dict:
        record = asdict(self)
        record["class_thresh"] = dict(self.class_thresh)
        return record

    def replace(self, **changes) -> "Thresholds":
        return replace(self, **changes)


@dataclass(frozen=True)
class RpnSettings:
    """Test-time RPN knobs (torchvision's rpn_* arguments); changing them re-runs RPN filtering only."""

    pre_nms_top_n: int = 1000  # per FPN level
    post_nms_top_n: int = 1000
    nms_thresh: float = 0.7
    score_thresh: float = 0.0

    def __post_init__(self) -> None:
        _check_fraction("rpn nms_thresh", self.nms_thresh)
        _check_fraction("rpn score_thresh", self.score_thresh)
        for name in ("pre_nms_top_n", "post_nms_top_n"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Detections:
    """Detections of one image, all fields the same length N and indexed together (detectron2's Instances).

    boxes: float32 (N, 4) xyxy in original-image pixels; scores: float32 (N,);
    labels: int64 (N,) index into ``categories`` (0 is "__background__", never a detection);
    masks: bool (N, H, W) at the mask threshold, or None when the model has no masks;
    candidate_ids: int64 (N,) the candidate each came from (proposal_index * num_classes + label),
    so the trace can say where a detection came from.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    candidate_ids: np.ndarray
    categories: list[str]
    image_size: tuple[int, int]  # (height, width) of the original image

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __getitem__(self, index) -> "Detections":
        """Select by integer array, slice or boolean mask, like a numpy array."""
        if isinstance(index, (int, np.integer)):
            index = [int(index)]
        return Detections(
            boxes=self.boxes[index],
            scores=self.scores[index],
            labels=self.labels[index],
            masks=None if self.masks is None else self.masks[index],
            candidate_ids=self.candidate_ids[index],
            categories=self.categories,
            image_size=self.image_size,
        )

    def of_classes(self, names: list[str]) -> "Detections":
        """Only the detections of the classes named (all of them when none are named; unknown names match none)."""
        if not names:
            return self
        return self[np.isin(self.labels, [self.categories.index(c) for c in names if c in self.categories])]

    @property
    def label_names(self) -> list[str]:
        return [self.categories[int(i)] for i in self.labels]

    @property
    def areas(self) -> np.ndarray:
        """Mask area in pixels where there are masks, box area otherwise."""
        if self.masks is not None:
            return np.array([np.count_nonzero(m) for m in self.masks], np.int64)  # 5x faster than a bool sum
        w = self.boxes[:, 2] - self.boxes[:, 0]
        h = self.boxes[:, 3] - self.boxes[:, 1]
        return (w * h).astype(np.int64)

    @classmethod
    def empty(cls, categories: list[str], image_size: tuple[int, int], with_masks: bool = True) -> "Detections":
        h, w = image_size
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            labels=np.zeros((0,), np.int64),
            masks=np.zeros((0, h, w), bool) if with_masks else None,
            candidate_ids=np.zeros((0,), np.int64),
            categories=list(categories),
            image_size=(int(h), int(w)),
        )


__all__ = ["Thresholds", "RpnSettings", "Detections"]
