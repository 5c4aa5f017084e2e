"""Models for the benchmarks, made here: torchvision's Mask R-CNN R50-FPN with random weights, imported
as a user would (``python -m mrcnn import``), so nothing is downloaded.

    models = make_r50_models_dir(tmp)          # then MRCNN_MODELS_DIR=models; the model is R50_NAME
"""
from __future__ import annotations

from pathlib import Path

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn

from mrcnn.model.importer import import_model

R50_NAME = "r50-random"


def make_r50_models_dir(tmp: Path, seed: int = 0) -> Path:
    """A models folder (for $MRCNN_MODELS_DIR) holding R50_NAME: 91 COCO-sized classes, random weights."""
    torch.manual_seed(seed)
    state = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91).state_dict()
    source = Path(tmp) / "r50-random.pth"
    torch.save(state, source)
    models = Path(tmp) / "models"
    import_model(source, name=R50_NAME, dest_dir=models)
    source.unlink()
    return models
