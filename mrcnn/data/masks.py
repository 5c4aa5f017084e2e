"""Instance masks: COCO run-length encoding and boxes from masks, used by every module that needs either.

Boxes are pixel-inclusive extents (``x1 = last column + 1``), the convention the datasets and the
shapes generator use, so a one-pixel mask has a one-pixel box; empty masks get ``[0, 0, 0, 0]``.
"""
from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import masks_to_boxes as _tv_masks_to_boxes


def encode_rles(masks: np.ndarray) -> list[dict]:
    """(N, H, W) masks -> N COCO compressed RLEs, ``{"size": [H, W], "counts": str}`` (JSON-ready)."""
    masks = np.asarray(masks)
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))
    return [{"size": [int(r["size"][0]), int(r["size"][1])], "counts": r["counts"].decode("ascii")} for r in rles]


def encode_rle(mask: np.ndarray) -> dict:
    """One (H, W) mask -> COCO compressed RLE with a str ``counts``."""
    return encode_rles(np.asarray(mask)[None])[0]


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO compressed RLE (``counts`` str or bytes) -> bool (H, W)."""
    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def rle_area(rle: dict) -> float:
    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    return float(mask_utils.area({"size": list(rle["size"]), "counts": counts}))


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks -> (N, 4) float32 xyxy, pixel-inclusive; empty masks -> zeros (torchvision's
    ``masks_to_boxes`` gives the last pixel's coordinate, one less than the extent on the right and bottom)."""
    if masks.shape[0] == 0:
        return torch.zeros((0, 4), dtype=torch.float32, device=masks.device)
    binary = masks.bool()  # any() of uint8 masks is uint8, which torch.where refuses (deprecated) as a condition
    boxes = _tv_masks_to_boxes(binary)
    filled = binary.flatten(1).any(1, keepdim=True)
    return torch.where(filled, boxes + boxes.new_tensor([0, 0, 1, 1]), torch.zeros_like(boxes))
