"""Augmentation: boxes stay the masks' extents through flip and scale; instances pushed out vanish whole."""
from __future__ import annotations

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from mrcnn.data.shapes import SHAPE_NAMES, ShapesDataset
from mrcnn.data.masks import masks_to_boxes
from mrcnn.data.transforms import (from_tv_tensors, to_tv_tensors, train_transforms,
                              DetectionTransform)


def target_of(masks: torch.Tensor, labels: list[int]) -> dict:
    return {"boxes": masks_to_boxes(masks), "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": masks.to(torch.uint8), "image_id": torch.tensor(5),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64), "area": masks.flatten(1).sum(1).float()}


def check_consistent(image: torch.Tensor, t: dict) -> None:
    n = len(t["boxes"])
    assert type(image) is torch.Tensor and all(type(v) is torch.Tensor for v in t.values())
    assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (n, 4)
    assert t["masks"].dtype == torch.uint8 and t["masks"].shape == (n, *image.shape[1:])
    assert t["labels"].shape == t["iscrowd"].shape == t["area"].shape == (n,)
    assert torch.equal(t["boxes"], masks_to_boxes(t["masks"])), "box == mask extent"
    assert (t["area"] == t["masks"].flatten(1).sum(1)).all() and (t["area"] > 0).all()
    assert ((t["boxes"][:, 2:] - t["boxes"][:, :2]) >= 1).all()


def test_boxes_from_masks_pixel_inclusive():
    m = torch.zeros(3, 10, 12, dtype=torch.uint8)
    m[0, 2:5, 3:9] = 1
    m[1, 9, 11] = 1
    assert masks_to_boxes(m).tolist() == [[3, 2, 9, 5], [11, 9, 12, 10], [0, 0, 0, 0]]
    assert masks_to_boxes(torch.zeros(0, 4, 4)).shape == (0, 4)


def test_tv_tensor_round_trip():
    masks = torch.zeros(1, 8, 10, dtype=torch.uint8)
    masks[0, 1:3, 2:6] = 1
    image, t = to_tv_tensors(torch.rand(3, 8, 10), target_of(masks, [2]))
    assert isinstance(image, tv_tensors.Image) and isinstance(t["masks"], tv_tensors.Mask)
    assert t["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY and tuple(t["boxes"].canvas_size) == (8, 10)
    image, t = from_tv_tensors(image, t)
    assert type(image) is torch.Tensor and type(t["boxes"]) is torch.Tensor


def test_flip_mirrors_boxes_and_masks():
    masks = torch.zeros(1, 8, 10, dtype=torch.uint8)
    masks[0, 1:3, 0:3] = 1
    flip = DetectionTransform([v2.RandomHorizontalFlip(1.0)])  # the geometry alone, no box recompute
    image = torch.rand(3, 8, 10)
    out_image, t = flip(image, target_of(masks, [1]))
    assert torch.equal(out_image, image.flip(-1))
    assert t["boxes"].tolist() == [[7, 1, 10, 3]] == masks_to_boxes(t["masks"]).tolist()


@pytest.mark.parametrize("scale", [(0.6, 0.6), (1.6, 1.6), (0.8, 1.25)])
def test_random_augmentation_keeps_boxes_on_masks(scale):
    torch.manual_seed(0)
    ds = ShapesDataset(6, seed=4, size=64, classes=SHAPE_NAMES, transforms=train_transforms(scale_jitter=scale))
    plain = ShapesDataset(6, seed=4, size=64, classes=SHAPE_NAMES)
    for i in range(len(ds)):
        image, t = ds[i]
        check_consistent(image, t)
        assert image.shape == (3, 64, 64) and t["image_id"].item() == i + 1
        assert set(t["labels"].tolist()) <= set(plain[i][1]["labels"].tolist())


def test_instances_pushed_out_vanish_with_mask_and_label():
    # Three objects: one in the centre, two at the left and right edges. Zooming in 2x about the
    # centre pushes the edge ones out of the canvas; they must leave with their masks and labels.
    masks = torch.zeros(3, 40, 40, dtype=torch.uint8)
    masks[0, 17:23, 17:23] = 1
    masks[1, 18:22, 0:4] = 1
    masks[2, 18:22, 36:40] = 1
    t_in = target_of(masks, [1, 2, 3])
    t_in["iscrowd"] = torch.tensor([0, 1, 0])
    zoom = train_transforms(flip=False, scale_jitter=(2.0, 2.0), color_jitter=0)
    image, t = zoom(torch.rand(3, 40, 40), t_in)
    check_consistent(image, t)
    assert t["labels"].tolist() == [1] and t["iscrowd"].tolist() == [0]
    assert t["boxes"].tolist() == [[14, 14, 26, 26]]
    assert t["image_id"].item() == 5

    # Zooming out keeps everything inside (padding around).
    image, t = train_transforms(flip=False, scale_jitter=(0.5, 0.5), color_jitter=0)(torch.rand(3, 40, 40), t_in)
    check_consistent(image, t)
    assert t["labels"].tolist() == [1, 2, 3]


def test_empty_target_passes_through():
    image, t = train_transforms()(torch.rand(3, 20, 24), target_of(torch.zeros(0, 20, 24), []))
    check_consistent(image, t)
    assert t["masks"].shape == (0, 20, 24) and t["boxes"].shape == (0, 4)


def test_colour_jitter_changes_pixels_not_geometry():
    masks = torch.zeros(1, 16, 16, dtype=torch.uint8)
    masks[0, 4:9, 5:12] = 1
    t_in = target_of(masks, [1])
    torch.manual_seed(1)
    image = torch.rand(3, 16, 16)
    out, t = train_transforms(flip=False, scale_jitter=None, color_jitter=0.4)(image, t_in)
    assert not torch.equal(out, image) and 0 <= out.min() and out.max() <= 1
    assert torch.equal(t["masks"], masks) and torch.equal(t["boxes"], t_in["boxes"])


def test_bad_scale_jitter():
    with pytest.raises(ValueError):
        train_transforms(scale_jitter=(1.2, 0.8))
