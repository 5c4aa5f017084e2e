"""Tiny models and images shared by the tests (random weights, fixed seeds, small sizes)."""
from __future__ import annotations

import re

from contextlib import contextmanager
from pathlib import Path

import numpy as np
import streamlit as st
import torch

from mrcnn.inference.structures import Detections
from mrcnn.model.architectures import build_model, light_arch
from mrcnn.model.zoo import LoadedModel

TINY_LIGHT = light_arch(depths=[1, 1, 1, 1], fpn_channels=16, box_head_dim=32, mask_head_channels=[16],
                        min_size=96, max_size=128)
CATEGORIES = ["__background__", "circle", "square", "triangle"]
# The same tiny network as a training run's --arch overrides: 64-px inputs, few RoIs, quick steps.
TINY_TRAIN_ARCH = {"depths": [1, 1, 1, 1], "fpn_channels": 16, "gn_groups": 4, "box_head_dim": 32,
                   "mask_head_channels": [16], "min_size": 64, "max_size": 96, "rpn_pre_nms_top_n_train": 200,
                   "rpn_post_nms_top_n_train": 100, "box_batch_size_per_image": 16}


def shaped_state_dict(arch_name: str, num_classes: int) -> dict[str, torch.Tensor]:
    """The keys and shapes of a torchvision Mask R-CNN, each tensor one stored number (zero-stride ``expand``):
    a 170 MB model's file in a few kilobytes, for tests where the weights do not matter."""
    with torch.device("meta"):
        own = build_model({"name": arch_name}, num_classes).state_dict()
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in own.items()}


def tiny_loaded(arch: dict | None = None, categories: list[str] | None = None, seed: int = 0,
                **model_kwargs) -> LoadedModel:
    """A random-weight model wrapped like zoo.load_model's result (CPU, eval)."""
    arch = dict(arch or TINY_LIGHT, **model_kwargs)
    categories = categories or CATEGORIES
    torch.manual_seed(seed)
    model = build_model(arch, len(categories)).eval()
    return LoadedModel("tiny", model, categories, arch, "<memory>", "0" * 64, {}, torch.device("cpu"))


def scene(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB image with a few bright rectangles: gives a random-weight net varied activations."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)), np.full_like(xx, 90)], -1)
    for _ in range(4):
        y0, x0 = rng.integers(0, h - 8), rng.integers(0, w - 8)
        img[y0:y0 + rng.integers(6, h // 2), x0:x0 + rng.integers(6, w // 2)] = rng.integers(0, 256, 3)
    return img.astype(np.uint8)


def nested_detections(n: int, h: int = 60, w: int = 80) -> Detections:
    """``n`` nested rectangles on an h×w image, the first the smallest, each its own mask."""
    boxes = np.array([[5 + i, 5 + i, 40 + 3 * i, 30 + 2 * i] for i in range(n)], np.float32).reshape(-1, 4)
    masks = np.zeros((n, h, w), bool)
    for i, (x0, y0, x1, y1) in enumerate(boxes.astype(int)):
        masks[i, y0:y1, x0:x1] = True
    return Detections(boxes, np.linspace(0.9, 0.5, n).astype(np.float32), np.arange(n) % 3 + 1, masks,
                      np.arange(n), CATEGORIES, (h, w))


def forward_settings(model) -> dict:
    """What an eval-mode forward reads besides the weights: the resize, the RPN's and the box heads' settings."""
    rpn, heads, transform = model.rpn, model.roi_heads, model.transform
    return {"transform": (transform.min_size, transform.max_size, transform.image_mean, transform.image_std,
                          transform.size_divisible, transform.fixed_size),
            "rpn": (rpn._pre_nms_top_n, rpn._post_nms_top_n, rpn.nms_thresh, rpn.score_thresh, rpn.min_size),
            "heads": (heads.score_thresh, heads.nms_thresh, heads.detections_per_img)}


def fewer_proposals(model) -> None:
    """100 proposals and 10 detections, not 1000 and 100: where each proposal is a detection (random weights,
    class scores raised), the heads' work on them was most of an R50 forward (4 s for v2). For comparing two
    models' forwards: done to both, after asserting their forward_settings are equal."""
    model.rpn._post_nms_top_n = dict(model.rpn._post_nms_top_n, testing=100)
    model.roi_heads.detections_per_img = 10


@contextmanager
def app_folders(tmp_path: Path, monkeypatch, shapes_checkpoint: Path):
    """The app's folders under ``tmp_path`` for an AppTest: weights/shapes.pt is ``shapes_checkpoint``; runs,
    imported models and the torch hub are empty folders; Streamlit's caches cleared before and after (they
    hold other tests' model lists and models)."""
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "shapes.pt").symlink_to(shapes_checkpoint)
    monkeypatch.setenv("MRCNN_WEIGHTS_DIR", str(weights))
    monkeypatch.setenv("MRCNN_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("MRCNN_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    st.cache_data.clear()
    st.cache_resource.clear()
    try:
        yield tmp_path
    finally:
        st.cache_data.clear()
        st.cache_resource.clear()


def shown(text: str) -> str:
    """A Markdown element's text as a person reads it: the backslash escapes ui.state.literal puts before the
    Markdown characters of a user-given name removed."""
    return re.sub(r"\\(.)", r"\1", text)


def shown_option(selectbox) -> str | None:
    """The option the browser shows in an AppTest selectbox: None where it shows no choice ("Choose an
    option"), as after None was written to its key (Streamlit's "no selection")."""
    proto = selectbox.proto
    if proto.set_value:
        return proto.raw_value if proto.HasField("raw_value") else None
    return selectbox.options[proto.default]
