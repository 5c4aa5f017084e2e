"""Where the model looks: a saliency map for one detection, computed from the cached trace.

The gradient of the detection's class logit with respect to the FPN level its proposal was pooled from.
Only RoI pooling, the box head and the box predictor run again, on a grad-enabled copy of that level's
cached feature map: the backbone never runs, and the shared model is not touched (no hooks, no
``requires_grad`` changes; gradients are asked for the copy alone).

Two ways to turn the gradient into a map (METHODS):

- ``"element-wise"`` (HiResCAM, Draelos & Carin 2020): ReLU(Σ_c ∂score/∂A_c ⊙ A_c), each cell's first-order
  share of the score. The default: on generated scenes it lies on the chosen object (tests/test_saliency.py).
- ``"grad-cam"`` (Selvaraju et al. 2017): ReLU(Σ_c w_c A_c) with w_c the spatial mean of the gradient. The
  weights say which channels matter, and the map then lights up every object with such channels, so for one
  detection among several objects of a kind it often points at the others as much as at its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops.poolers import _setup_scales

from mrcnn.inference.trace import Trace

METHODS = ("element-wise", "grad-cam")


@dataclass
class Saliency:
    heat: np.ndarray  # (H, W) float32 in [0, 1], original-image pixels
    level_name: str  # the FPN level the proposal was pooled from (torchvision's name)
    label: int  # the detection's class index
    logit: float  # its class logit, the score differentiated


def pooled_level(trace: Trace, box: torch.Tensor) -> int:
    """Index (into the box pooler's levels) of the FPN level RoIAlign reads for a box in network-input pixels."""
    pooler = trace.model.roi_heads.box_roi_pool
    feats = [trace.features[k] for k in pooler.featmap_names]
    _, mapper = _setup_scales(feats, [trace.input_size], pooler.canonical_scale, pooler.canonical_level)
    return int(mapper([box[None]])[0])


def to_image(trace: Trace, cam: torch.Tensor) -> np.ndarray:
    """A map over a (padded) feature level -> the original image's size, normalised to [0, 1]."""
    (ph, pw), (ih, iw) = trace.padded_size, trace.input_size
    up = F.interpolate(cam[None, None].float(), size=(ph, pw), mode="bilinear", align_corners=False)
    up = F.interpolate(up[..., :ih, :iw], size=trace.original_size, mode="bilinear", align_corners=False)[0, 0]
    up = up.clamp_min(0)
    peak = float(up.max())
    return (up / peak if peak > 0 else up).cpu().numpy().astype(np.float32)


def saliency(trace: Trace, candidate_id: int, method: str = "element-wise") -> Saliency:
    """The saliency of one candidate (a detection's ``candidate_ids`` entry) for its class; see METHODS."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}: choose one of {', '.join(METHODS)}")
    heads = trace.model.roi_heads
    pooler = heads.box_roi_pool
    label = int(candidate_id) % trace.num_classes
    box, _, _ = trace.proposal_of(candidate_id)
    level_name = pooler.featmap_names[pooled_level(trace, box)]
    # The trace's tensors may be inference tensors: clones made outside inference mode can enter autograd.
    with torch.inference_mode(False), torch.enable_grad():
        feats = {k: v.detach().clone() for k, v in trace.features.items()}
        activations = feats[level_name].requires_grad_(True)
        pooled = pooler(feats, [box.detach().clone()[None]], [trace.input_size])
        logits, _ = heads.box_predictor(heads.box_head(pooled))
        logit = logits[0, label]
        (grads,) = torch.autograd.grad(logit, activations)
    grads, activations = grads[0], activations.detach()[0]  # (C, h, w)
    if method == "grad-cam":
        # RoIAlign reads only around the box, so the gradient is zero elsewhere: its sum over the map is the
        # mean over the RoI up to a positive factor, which the normalisation removes.
        cam = torch.einsum("c,chw->hw", grads.sum(dim=(1, 2)), activations)
    else:
        cam = (grads * activations).sum(0)
    return Saliency(to_image(trace, torch.relu(cam)), level_name, label, float(logit.detach()))


# A heat colour scale (dark red → orange → yellow → white), as (position, RGB) control points.
HEAT_STOPS = np.array([0.0, 0.35, 0.7, 1.0], np.float32)
HEAT_COLOURS = np.array([[120, 0, 0], [230, 60, 0], [255, 200, 0], [255, 255, 220]], np.float32)


def heat_overlay(image: np.ndarray, heat: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """An RGB uint8 image with a [0, 1] heat map blended over it: hot pixels take the heat colour, cold
    ones keep the image, so the picture stays readable where the model does not look."""
    colours = np.stack([np.interp(heat, HEAT_STOPS, HEAT_COLOURS[:, c]) for c in range(3)], axis=-1)
    alpha = (opacity * heat)[..., None]  # (H, W, 1)
    return np.round((1 - alpha) * image.astype(np.float32) + alpha * colours).astype(np.uint8)
