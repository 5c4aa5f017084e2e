"""Mask pasting: the pixel-centre convention is exact to the sub-pixel box; torchvision's is kept as is."""
import numpy as np
import pytest
import torch
from torchvision.models.detection.roi_heads import paste_masks_in_image

from mrcnn.model.architectures import build_model
from mrcnn.model.paste import CentrePasteTransform, paste_masks_cropped, paste_masks_full, paste_mode
from tests.helpers import TINY_LIGHT

M = 28


def _full(crops, size):
    out = np.zeros((len(crops), *size), np.float32)
    for n, (y0, x0, crop) in enumerate(crops):
        out[n, y0:y0 + crop.shape[0], x0:x0 + crop.shape[1]] = crop
    return out


def _disk(m: int = M) -> torch.Tensor:
    """A disk inscribed in the mask grid, soft at its edge: symmetric about the box centre."""
    c = (torch.arange(m, dtype=torch.float32) + 0.5) / m - 0.5
    r = torch.sqrt(c[None, :] ** 2 + c[:, None] ** 2)
    return torch.clamp((0.4 - r) * m + 0.5, 0, 1)


@pytest.mark.parametrize("box", [(10.0, 20.0, 30.0, 40.0), (10.3, 20.6, 29.8, 39.2), (3.5, 0.2, 9.4, 5.9)])
def test_centre_paste_of_a_full_mask_covers_exactly_the_pixels_whose_centre_is_in_the_box(box):
    crops = paste_masks_cropped(torch.ones(1, M, M), torch.tensor([box]), (48, 64), mode="centre")
    got = _full(crops, (48, 64))[0] > 0.5
    x0, y0, x1, y1 = box
    cx, cy = np.arange(64) + 0.5, np.arange(48) + 0.5
    want = ((cx > x0) & (cx < x1))[None, :] & ((cy > y0) & (cy < y1))[:, None]
    assert (got == want).all()


def test_centre_paste_keeps_a_symmetric_mask_centred_on_its_box_at_every_sub_pixel_offset():
    centre_err, torchvision_err = [], []
    for dx in np.linspace(0, 0.9, 10):
        box = torch.tensor([[20.0 + dx, 15.0 + dx, 38.0 + dx, 33.0 + dx]])  # 18 px, centre 29 + dx, 24 + dx
        for mode, errs in (("centre", centre_err), ("torchvision", torchvision_err)):
            full = _full(paste_masks_cropped(_disk()[None], box, (64, 64), mode=mode), (64, 64))[0]
            yy, xx = np.mgrid[0:64, 0:64] + 0.5  # pixel x covers [x, x + 1): its centre is x + 0.5
            errs.append(abs((full * xx).sum() / full.sum() - (29.0 + dx)))
            errs.append(abs((full * yy).sum() / full.sum() - (24.0 + dx)))
    assert max(centre_err) < 0.05
    assert max(torchvision_err) > 0.25  # truncated boxes: off by a fraction of a pixel, which the centre mode fixes


def test_torchvision_mode_equals_torchvision_paste():
    torch.manual_seed(0)
    probs = torch.rand(3, 1, M, M)
    boxes = torch.tensor([[3.2, 4.7, 30.1, 22.9], [-5.0, 10.0, 12.5, 50.0], [40.0, 30.0, 70.0, 60.0]])
    want = paste_masks_in_image(probs, boxes, (48, 64), padding=1)
    assert torch.equal(paste_masks_full(probs, boxes, (48, 64), mode="torchvision"), want)
    crops = _full(paste_masks_cropped(probs[:, 0], boxes, (48, 64), mode="torchvision"), (48, 64))
    assert np.array_equal(crops, want[:, 0].numpy())


def test_centre_paste_handles_boxes_at_and_beyond_the_border():
    probs = torch.ones(3, 1, M, M)
    boxes = torch.tensor([[-10.0, -10.0, 5.0, 5.0], [60.0, 40.0, 90.0, 70.0], [100.0, 100.0, 120.0, 120.0]])
    full = paste_masks_full(probs, boxes, (48, 64), mode="centre")
    assert full.shape == (3, 1, 48, 64)
    assert (full[0, 0] > 0.5).sum() == 25 and (full[1, 0] > 0.5).sum() == 4 * 8 and full[2].sum() == 0


def test_light_models_paste_at_pixel_centres_unless_told_otherwise():
    arch = TINY_LIGHT
    assert paste_mode(build_model(arch, 4)) == "centre"
    assert isinstance(build_model(arch, 4).transform, CentrePasteTransform)
    assert paste_mode(build_model({**arch, "mask_paste": "torchvision"}, 4)) == "torchvision"
    with torch.device("meta"):  # the paste mode is all that is looked at: no weights needed
        assert paste_mode(build_model({"name": "maskrcnn_resnet50_fpn"}, 3)) == "torchvision"
    with pytest.raises(ValueError, match="mask_paste"):
        build_model({**arch, "mask_paste": "nearest"}, 4)


def test_centre_transform_keeps_the_resize_settings():
    model = build_model(dict(TINY_LIGHT, min_size=[256, 320], max_size=640), 4)
    t = model.transform
    assert tuple(t.min_size) == (256, 320) and t.max_size == 640 and t.size_divisible == 32


def test_traceable_centre_paste_gives_the_same_values():
    """The whole-image paste used when tracing (ONNX export) equals the cropped one."""
    from mrcnn.model.paste import _paste_centre_full

    torch.manual_seed(0)
    probs = torch.rand(4, 1, M, M)
    boxes = torch.tensor([[3.3, 4.7, 20.2, 30.9], [-5.0, 10.0, 12.5, 18.0], [40.0, 30.0, 70.0, 60.0],
                          [10.0, 10.0, 10.0005, 10.0005]])
    assert torch.allclose(_paste_centre_full(probs, boxes, (48, 64)),
                          paste_masks_full(probs, boxes, (48, 64), mode="centre"), atol=1e-6)
