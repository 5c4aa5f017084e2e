"""The mask head's RoI cap: fewer mask RoIs in training, the box head's sample and inference unchanged."""
import pytest
import torch

from mrcnn.model.architectures import build_model
from mrcnn.model.mask_sampling import MaskSampledRoIHeads
from mrcnn.data.shapes import ShapesDataset

from helpers import CATEGORIES, TINY_LIGHT

ARCH = {**TINY_LIGHT, "box_batch_size_per_image": 32}


def _pair(cap: int):
    """(torchvision's heads, capped heads) with the same weights."""
    torch.manual_seed(0)
    plain = build_model(ARCH, len(CATEGORIES))
    capped = build_model({**ARCH, "mask_batch_size_per_image": cap}, len(CATEGORIES))
    capped.load_state_dict(plain.state_dict())
    return plain, capped


def _batch():
    ds = ShapesDataset(2, seed=3, size=96, categories=CATEGORIES)
    items = [ds[i] for i in range(2)]
    return [image for image, _ in items], [target for _, target in items]


def _rois_per_image(pool: torch.nn.Module, model, images, targets, seed: int = 0) -> tuple[list[int], dict]:
    seen = []
    handle = pool.register_forward_hook(lambda mod, args, out: seen.append([len(b) for b in args[1]]))
    torch.manual_seed(seed)
    losses = model.train()(images, targets)
    handle.remove()
    return seen[0], losses


def test_the_mask_head_trains_on_at_most_the_cap_while_the_box_head_keeps_its_sample():
    plain, capped = _pair(cap=2)
    assert isinstance(capped.roi_heads, MaskSampledRoIHeads)
    images, targets = _batch()
    plain_masks, _ = _rois_per_image(plain.roi_heads.mask_roi_pool, plain, images, targets)
    capped_masks, losses = _rois_per_image(capped.roi_heads.mask_roi_pool, capped, images, targets)
    capped_boxes, _ = _rois_per_image(capped.roi_heads.box_roi_pool, capped, images, targets)
    assert max(plain_masks) > 2  # without the cap, more positives reach the mask head
    assert capped_masks == [min(n, 2) for n in plain_masks]
    assert capped_boxes == [32, 32]
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"}
    sum(losses.values()).backward()
    assert capped.roi_heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0


def test_a_cap_above_the_positives_gives_torchvisions_losses():
    plain, capped = _pair(cap=1000)
    images, targets = _batch()
    _, want = _rois_per_image(plain.roi_heads.mask_roi_pool, plain, images, targets)
    _, got = _rois_per_image(capped.roi_heads.mask_roi_pool, capped, images, targets)
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6), key


def test_inference_and_state_dict_are_torchvisions():
    plain, capped = _pair(cap=2)
    assert list(capped.state_dict()) == list(plain.state_dict())
    images, _ = _batch()
    with torch.no_grad():
        want, got = plain.eval()(images), capped.eval()(images)
    for w, g in zip(want, got):
        for key in w:
            assert torch.equal(w[key], g[key]), key


def test_a_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="mask_batch_size_per_image"):
        build_model({**ARCH, "mask_batch_size_per_image": 0}, len(CATEGORIES))
