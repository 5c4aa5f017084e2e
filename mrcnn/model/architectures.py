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

import math
from typing import Any, Callable

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

_TORCHVISION_BUILDERS = {
    "maskrcnn_resnet50_fpn": maskrcnn_resnet50_fpn,
    "maskrcnn_resnet50_fpn_v2": maskrcnn_resnet50_fpn_v2,
}
TORCHVISION_ARCHITECTURES = tuple(_TORCHVISION_BUILDERS)  # R50-FPN v1, v2: torchvision state dicts
ARCHITECTURES = ("light", *TORCHVISION_ARCHITECTURES)

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

# GroupNorm splits every width of the light backbone (64..512 channels) into gn_groups: a power of two.
GN_GROUPS = (1, 2, 4, 8, 16, 32, 64)


# ---------------------------------------------------------------------------------------- validation
# Each check returns None for a good value, else what the value should be. The ranges are generous
# for real use and keep a typo (fpn_channels 2,000,000) from allocating gigabytes.

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_in(lo: int, hi: int) -> Callable[[Any], str | None]:
    return lambda v: None if _is_int(v) and lo <= v <= hi else f"an integer in {lo}..{hi}"


def _number_in(lo: float, hi: float) -> Callable[[Any], str | None]:
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
        return None if ok else f"a number in {lo:g}..{hi:g}"
    return check


def _list_of(item: Callable[[Any], str | None], min_len: int, max_len: int) -> Callable[[Any], str | None]:
    def check(v):
        ok = isinstance(v, (list, tuple)) and min_len <= len(v) <= max_len and all(item(x) is None for x in v)
        count = f"{min_len}" if min_len == max_len else f"{min_len}..{max_len}"
        return None if ok else f"a list of {count} values, each {item(None)}"
    return check


def _one_of(choices: tuple) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices and not isinstance(v, bool) else f"one of {', '.join(map(str, choices))}"


def _optional(check: Callable[[Any], str | None]) -> Callable[[Any], str | None]:
    return lambda v: None if v is None or check(v) is None else f"null or {check(v)}"


def _size_or_sizes(v: Any) -> str | None:
    """min_size: one size, or a list the training transform picks from at random (torchvision)."""
    if _int_in(16, 4096)(v) is None or _list_of(_int_in(16, 4096), 1, 16)(v) is None:
        return None
    return "an integer in 16..4096 or a list of them"


_COUNT = _int_in(1, 100_000)
_FRACTION = _number_in(0.0, 1.0)
_ANY_ARCH_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "min_size": _size_or_sizes,
    "max_size": _int_in(16, 8192),
    "image_mean": _list_of(_number_in(0.0, 1.0), 3, 3),
    "image_std": _list_of(_number_in(0.001, 1.0), 3, 3),
    "rpn_pre_nms_top_n_train": _COUNT, "rpn_pre_nms_top_n_test": _COUNT,
    "rpn_post_nms_top_n_train": _COUNT, "rpn_post_nms_top_n_test": _COUNT,
    "rpn_nms_thresh": _FRACTION, "rpn_score_thresh": _FRACTION, "rpn_batch_size_per_image": _COUNT,
    "box_score_thresh": _FRACTION, "box_nms_thresh": _FRACTION, "box_detections_per_img": _COUNT,
    "box_batch_size_per_image": _COUNT,
    "mask_paste": _one_of(PASTE_MODES),
    "mask_batch_size_per_image": _optional(_COUNT),
}
_LIGHT_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "depths": _list_of(_int_in(1, 32), 4, 4),
    "fpn_channels": _int_in(1, 512),
    "gn_groups": _one_of(GN_GROUPS),
    "anchor_sizes": _list_of(_int_in(1, 4096), 5, 5),  # one per FPN level: 4 stages + the max-pool level
    "box_head_dim": _int_in(1, 4096),
    "mask_head_channels": _list_of(_int_in(1, 512), 1, 8),
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_arch(arch: Any) -> dict[str, Any]:
    """``arch`` itself if it is a valid architecture dict, else ValueError naming the first bad setting.

    Valid: a dict with a known ``name``, only the settings that architecture takes, each of the right
    type and in range (missing ones take their defaults). Used for --arch and for every checkpoint's arch.
    """
    if not isinstance(arch, dict):
        raise ValueError(f"an architecture is a JSON object (dict), got {_short(arch)}")
    name = arch.get("name")
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture name {_short(name)}; known: {', '.join(ARCHITECTURES)}")
    checks = {**_ANY_ARCH_CHECKS, **(_LIGHT_CHECKS if name == "light" else {})}
    unknown = sorted(str(k) for k in arch if k != "name" and k not in checks)
    if unknown:
        raise ValueError(f"unknown setting(s) for architecture {name!r}: {', '.join(unknown)}; "
                         f"known: {', '.join(checks)}")
    for key, value in arch.items():
        expected = checks[key](value) if key != "name" else None
        if expected is not None:
            raise ValueError(f"{key} must be {expected}, got {_short(value)}")
    if name == "light":
        groups = arch.get("gn_groups", LIGHT_DEFAULTS["gn_groups"])
        widths = {"fpn_channels": [arch.get("fpn_channels", LIGHT_DEFAULTS["fpn_channels"])],
                  "mask_head_channels": arch.get("mask_head_channels", LIGHT_DEFAULTS["mask_head_channels"])}
        for key, channels in widths.items():
            if any(c % min(groups, c) for c in channels):  # GroupNorm(min(groups, c), c) needs a divisor
                raise ValueError(f"{key} must be a multiple of gn_groups ({groups}), got {_short(arch.get(key))}")
    return arch


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


def light_arch(**overrides) -> dict[str, Any]:
    """The arch dict of the light architecture with the given overrides (e.g. fpn_channels=32)."""
    return check_arch({"name": "light", **LIGHT_DEFAULTS, **overrides})


def build_model(arch: dict[str, Any], num_classes: int) -> MaskRCNN:
    """Build an untrained Mask R-CNN (random weights, nothing downloaded) from an arch dict.
    ValueError (naming the setting) for an arch that check_arch refuses."""
    check_arch(arch)
    if num_classes < 2:
        raise ValueError(f"num_classes must count the background and at least one class, got {num_classes}")
    name = arch["name"]
    if name == "light":
        cfg = {**LIGHT_DEFAULTS, **{k: v for k, v in arch.items() if k != "name"}}
        model = _build_light(num_classes, cfg)
    else:
        cfg = {"mask_paste": "torchvision", "mask_batch_size_per_image": None, **arch}
        kwargs = {k: v for k, v in arch.items() if k not in ("name", *ANY_ARCH_SETTINGS)}
        # weights_backbone=None: the default would download ImageNet weights.
        model = _TORCHVISION_BUILDERS[name](weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    return _with_mask_sampling(_with_paste(model, cfg["mask_paste"]), cfg["mask_batch_size_per_image"])


def _with_paste(model: MaskRCNN, mode: str) -> MaskRCNN:
    if mode == "centre":
        model.transform = CentrePasteTransform.like(model.transform)
    return model


def _with_mask_sampling(model: MaskRCNN, mask_batch_size_per_image: int | None) -> MaskRCNN:
    if mask_batch_size_per_image is not None:
        model.roi_heads = MaskSampledRoIHeads.like(model.roi_heads, mask_batch_size_per_image)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["ARCHITECTURES", "TORCHVISION_ARCHITECTURES", "LIGHT_DEFAULTS", "build_model", "check_arch", "light_arch", "count_parameters"]
