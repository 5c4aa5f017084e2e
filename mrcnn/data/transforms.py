"""Training augmentation with torchvision.transforms.v2 on tv_tensors, boxes and masks kept consistent.

    ds = ShapesDataset(1000, transforms=train_transforms())      # or CocoDataset(..., transforms=...)

Datasets hand ``(image float32 [3, H, W], target dict of plain tensors)`` to their ``transforms``; the
callables here wrap them as tv_tensors (Image, BoundingBoxes XYXY with canvas_size, Mask), run the v2
pipeline, and unwrap. After the geometric steps boxes are recomputed from the masks (so a box is
exactly its mask's extent, pixel-inclusive), and SanitizeBoundingBoxes removes instances whose mask
left the image — box, mask, label, iscrowd and area together. ``area`` is recomputed from the masks.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from mrcnn.data.masks import masks_to_boxes

_PER_INSTANCE = ("labels", "iscrowd", "area")  # plain tensors sanitized along with the boxes


def to_tv_tensors(image: torch.Tensor, target: dict) -> tuple[tv_tensors.Image, dict]:
    """Plain (image [3, H, W], target) -> tv_tensors: Image, BoundingBoxes (XYXY, canvas_size), Mask."""
    h, w = image.shape[-2:]
    target = dict(target)
    target["boxes"] = tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(h, w))
    if "masks" in target:
        target["masks"] = tv_tensors.Mask(target["masks"])
    return tv_tensors.Image(image), target


def from_tv_tensors(image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
    """tv_tensors back to plain tensors (what torchvision's detection models take)."""
    plain = {k: v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v for k, v in target.items()}
    return image.as_subclass(torch.Tensor), plain


class BoxesFromMasks(v2.Transform):
    """Replace boxes by their masks' extents (after resampling, the masks are the truth)."""

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        image, target = sample
        if "masks" in target:
            boxes = target["boxes"]
            target = dict(target)
            target["boxes"] = tv_tensors.wrap(masks_to_boxes(target["masks"]).to(boxes.dtype), like=boxes)
        return image, target


def _sanitize_getter(sample: Any) -> tuple[torch.Tensor, ...]:
    _, target = sample
    return tuple(target[k] for k in _PER_INSTANCE if k in target)


class DetectionTransform:
    """A v2 pipeline applied to a dataset's plain ``(image, target)``; returns plain tensors."""

    def __init__(self, transforms: Sequence[v2.Transform]):
        self.pipeline = v2.Compose(list(transforms))

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        image, target = self.pipeline(to_tv_tensors(image, target))
        image, target = from_tv_tensors(image, target)
        if "masks" in target:
            target["area"] = target["masks"].flatten(1).sum(1).float()
        return image, target

    def __repr__(self) -> str:
        return f"DetectionTransform({self.pipeline})"


def train_transforms(flip: bool = True, scale_jitter: tuple[float, float] | None = (0.8, 1.25),
                     color_jitter: float = 0.2) -> DetectionTransform:
    """Horizontal flip (p=0.5), scale jitter about the centre (canvas kept; zooming in crops, zooming
    out pads with black), colour jitter (brightness/contrast/saturation ``color_jitter``, hue a quarter
    of it); then boxes from masks and SanitizeBoundingBoxes. Any part can be switched off (False/None/0).
    """
    steps: list[v2.Transform] = []
    if flip:
        steps.append(v2.RandomHorizontalFlip(0.5))
    if scale_jitter:
        lo, hi = scale_jitter
        if not 0 < lo <= hi:
            raise ValueError(f"scale_jitter must be (low, high) with 0 < low <= high, got {scale_jitter}")
        steps.append(v2.RandomAffine(degrees=0.0, scale=(lo, hi)))
    if color_jitter:
        c = float(color_jitter)
        steps.append(v2.ColorJitter(brightness=c, contrast=c, saturation=c, hue=min(c / 4, 0.5)))
    steps += [BoxesFromMasks(), v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_sanitize_getter)]
    return DetectionTransform(steps)
