"""Mask R-CNN architectures, built from torchvision's detection modules.

An architecture is described by a plain dict ``{"name": ..., **builder kwargs}`` so that a checkpoint
can store it and rebuild itself (nanoGPT's habit). Builders never download anything: pretrained
weights are loaded separately by mrcnn.model.zoo.

- ``maskrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn_v2``: torchvision's models, same modules.
- ``light``: a small ResNet-GroupNorm FPN with slim heads, for the bundled ``shapes`` model and for
  fast tests. GroupNorm rather than BatchNorm: trained from scratch on small batches, BatchNorm's
  running statistics end up not describing the trained network (every image gets the same output).

``mask_paste`` (any architecture) picks how masks are pasted into the image (mrcnn.model.paste): the light
architecture pastes at pixel centres, torchvision's models the torchvision way unless told otherwise.
``mask_batch_size_per_image`` (any architecture; training only) caps the RoIs the mask head trains on
per image (mrcnn.model.mask_sampling); unset, it trains on every positive RoI of the box head, as torchvision.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from mrcnn.model.mask_sampling import MaskSampledRoIHeads
from mrcnn.model.paste import PASTE_MODES, CentrePasteTransform

# MaskRCNN keyword arguments an arch dict may carry for any architecture (test-time settings, sizes).
MODEL_KWARGS = (
    "min_size", "max_size", "image_mean", "image_std",
    "rpn_pre_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test",
    "rpn_nms_thresh", "rpn_score_thresh", "rpn_batch_size_per_image",
    "box_score_thresh", "box_nms_thresh", "box_detections_per_img", "box_batch_size_per_image",
)

# Settings build_model applies itself, after building, to any architecture (not MaskRCNN arguments).
ANY_ARCH_SETTINGS = ("mask_paste", "mask_batch_size_per_image")

LIGHT_DEFAULTS: dict[str, Any] = {
    "depths": [2, 2, 2, 2],      # BasicBlocks per ResNet stage (ResNet-18 layout)
    "fpn_channels": 64,
    "gn_groups": 8,
    "anchor_sizes": [16, 32, 64, 128, 256],
    "box_head_dim": 256,
    "mask_head_channels": [128, 128],
    "min_size": 256,
    "max_size": 512,
    "box_batch_size_per_image": 64,
    "rpn_batch_size_per_image": 128,
    "mask_paste": "centre",
    "mask_batch_size_per_image": None,  # None: every positive RoI of the box head, as torchvision
}


def _group_norm(groups: int):
    return lambda channels: nn.GroupNorm(min(groups, channels), channels)


def _build_light(num_classes: int, cfg: dict[str, Any]) -> MaskRCNN:
    norm = _group_norm(cfg["gn_groups"])
    body = resnet.ResNet(resnet.BasicBlock, list(cfg["depths"]), norm_layer=norm)
    body.fc = nn.Identity()  # unused; the FPN reads layer1..layer4
    fpn_ch = int(cfg["fpn_channels"])
    backbone = BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[64, 128, 256, 512],
        out_channels=fpn_ch,
        extra_blocks=LastLevelMaxPool(),
        norm_layer=norm,
    )
    sizes = tuple((int(s),) for s in cfg["anchor_sizes"])
    anchor_generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    box_dim = int(cfg["box_head_dim"])
    mask_layers = list(cfg["mask_head_channels"])
    model_kwargs = {k: cfg[k] for k in MODEL_KWARGS if k in cfg}
    model = MaskRCNN(
        backbone,
        num_classes=None,  # given by the predictors
        rpn_anchor_generator=anchor_generator,
        box_head=TwoMLPHead(fpn_ch * 7 * 7, box_dim),
        box_predictor=_fast_rcnn_predictor(box_dim, num_classes),
        mask_head=MaskRCNNHeads(fpn_ch, mask_layers, 1, norm_layer=norm),
        mask_predictor=_mask_predictor(mask_layers[-1], num_classes),
        **model_kwargs,
    )
    return model


def _fast_rcnn_predictor(dim: int, num_classes: int) -> FastRCNNPredictor:
    return FastRCNNPredictor(dim, num_classes)


def _mask_predictor(dim: int, num_classes: int) -> MaskRCNNPredictor:
    return MaskRCNNPredictor(dim, dim, num_classes)


_TORCHVISION_BUILDERS = {
    "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2,
}

ARCHITECTURES = ("light", *_TORCHVISION_BUILDERS)


def light_arch(**overrides) -> dict[str, Any]:
    """The arch dict of the light architecture with the given overrides (e.g. fpn_channels=32)."""
    unknown = set(overrides) - set(LIGHT_DEFAULTS) - set(MODEL_KWARGS)
    if unknown:
        raise ValueError(f"unknown light-architecture settings: {sorted(unknown)}")
    return {"name": "light", **LIGHT_DEFAULTS, **overrides}


def build_model(arch: dict[str, Any], num_classes: int) -> MaskRCNN:
    """Build an untrained Mask R-CNN (random weights, nothing downloaded) from an arch dict."""
    if not isinstance(arch, dict) or "name" not in arch:
        raise ValueError(f"an architecture is a dict with a 'name', got {arch!r}")
    name = arch["name"]
    if num_classes < 2:
        raise ValueError(f"num_classes must count the background and at least one class, got {num_classes}")
    if name == "light":
        cfg = {**LIGHT_DEFAULTS, **{k: v for k, v in arch.items() if k != "name"}}
        model = _build_light(num_classes, cfg)
    elif name in _TORCHVISION_BUILDERS:
        cfg = {"mask_paste": "torchvision", "mask_batch_size_per_image": None, **arch}
        kwargs = {k: v for k, v in arch.items() if k not in ("name", *ANY_ARCH_SETTINGS)}
        unknown = set(kwargs) - set(MODEL_KWARGS)
        if unknown:
            raise ValueError(f"unknown settings for {name}: {sorted(unknown)}")
        # weights_backbone=None: the default would download ImageNet weights.
        model = _TORCHVISION_BUILDERS[name](weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    else:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}")
    return _with_mask_sampling(_with_paste(model, cfg["mask_paste"]), cfg["mask_batch_size_per_image"])


def _with_paste(model: MaskRCNN, mode: str) -> MaskRCNN:
    if mode not in PASTE_MODES:
        raise ValueError(f"unknown mask_paste {mode!r}; known: {', '.join(PASTE_MODES)}")
    if mode == "centre":
        model.transform = CentrePasteTransform.like(model.transform)
    return model


def _with_mask_sampling(model: MaskRCNN, mask_batch_size_per_image: int | None) -> MaskRCNN:
    if mask_batch_size_per_image is not None:
        model.roi_heads = MaskSampledRoIHeads.like(model.roi_heads, mask_batch_size_per_image)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ARCHITECTURES", "LIGHT_DEFAULTS", "build_model", "light_arch", "count_parameters"]
