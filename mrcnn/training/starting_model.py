"""The model a training run starts from: fresh, or a trained model's weights with the class-specific head rows
re-indexed for the data's classes (remap_class_weights); then which of its backbone stages train
(prepare_for_training, torchvision's trainable_backbone_layers rule).
"""
from __future__ import annotations

from typing import Callable

import torch

from mrcnn.errors import TrainingError
from mrcnn.model.architectures import ARCHITECTURES, TORCHVISION_ARCHITECTURES, build_model, light_arch
from mrcnn.model.checkpoint import load_state_dict_checked
from mrcnn.model.zoo import load_model
from mrcnn.training.config import BACKBONE_STAGES, TrainConfig


def remap_class_weights(state_dict: dict, old_categories: list[str], new_categories: list[str],
                        fresh: dict) -> tuple[dict, list[str]]:
    """Class-specific head weights re-indexed by class name: classes both lists have keep their rows,
    the others keep ``fresh``'s (new initialisation). Returns (state dict, names of the new classes)."""
    old_index = {name: i for i, name in enumerate(old_categories)}
    out = dict(state_dict)
    for key, new in fresh.items():
        old = state_dict.get(key)
        if old is None or tuple(old.shape) == tuple(new.shape) and old_categories == new_categories:
            continue
        per_class = _rows_per_class(key)
        if per_class is None:
            continue
        merged = new.clone()
        for j, name in enumerate(new_categories):
            i = old_index.get(name)
            if i is not None:
                merged[j * per_class:(j + 1) * per_class] = old[i * per_class:(i + 1) * per_class].to(new.dtype)
        out[key] = merged
    new_classes = [c for c in new_categories if c not in old_index]
    return out, new_classes


def _rows_per_class(key: str) -> int | None:
    if key.startswith("roi_heads.box_predictor.cls_score."):
        return 1
    if key.startswith("roi_heads.box_predictor.bbox_pred."):
        return 4
    if key.startswith("roi_heads.mask_predictor.mask_fcn_logits."):
        return 1
    return None


def starting_model(cfg: TrainConfig, categories: list[str], log: Callable[[str], None]):
    """(model, arch) for the data's categories, from a zoo model / checkpoint or fresh."""
    if cfg.model in ARCHITECTURES:
        arch = light_arch(**(cfg.arch or {})) if cfg.model == "light" else {"name": cfg.model, **(cfg.arch or {})}
        if cfg.image_size:
            arch.update(min_size=int(cfg.image_size), max_size=max(int(cfg.image_size), int(arch.get("max_size", 0))))
        try:
            return build_model(arch, len(categories)), arch
        except ValueError as err:
            raise TrainingError(f"cannot build architecture {cfg.model!r}: {err}") from None
    loaded = load_model(cfg.model, cfg.weights, device="cpu")
    arch = dict(loaded.arch)
    if cfg.arch:
        raise TrainingError("--arch only applies to a fresh architecture, not to a trained model")
    if cfg.image_size:
        arch.update(min_size=int(cfg.image_size), max_size=max(int(cfg.image_size), int(arch.get("max_size", 1333))))
    model = build_model(arch, len(categories))
    state, new_classes = remap_class_weights(loaded.model.state_dict(), loaded.categories, categories,
                                             model.state_dict())
    load_state_dict_checked(model, state, loaded.source)
    kept = [c for c in categories[1:] if c in loaded.categories]
    if loaded.categories != categories:
        log(f"classes: kept {len(kept)} from {cfg.model} ({', '.join(kept) or 'none'}); "
            f"new: {', '.join(new_classes) or 'none'}")
    return model, arch


FINETUNE_TRAINABLE_LAYERS = 3  # torchvision's default for its R50 models started from trained weights


def default_trainable_layers(arch_name: str, from_trained_weights: bool) -> int:
    """torchvision's default: 3 backbone stages train when an R50 starts from trained weights; all 5 for a
    fresh model and for the light architecture (small, GroupNorm: cheap to train whole)."""
    if from_trained_weights and arch_name in TORCHVISION_ARCHITECTURES:
        return FINETUNE_TRAINABLE_LAYERS
    return len(BACKBONE_STAGES)


class FrozenStatsBatchNorm2d(torch.nn.BatchNorm2d):
    """A BatchNorm2d that always normalises with its stored statistics, in training too: torchvision's
    FrozenBatchNorm2d's behaviour with BatchNorm2d's state dict (so checkpoints and exports load as before)."""

    def train(self, mode: bool = True) -> FrozenStatsBatchNorm2d:
        return super().train(False)


def freeze_backbone(model: torch.nn.Module, trainable_layers: int, freeze_norms: bool) -> None:
    """torchvision's rule (backbone_utils._resnet_fpn_extractor): only the first ``trainable_layers`` of
    BACKBONE_STAGES train, the stem's norm only with all 5. ``freeze_norms``: the backbone's BatchNorm layers
    keep their statistics and affine weights, as FrozenBatchNorm2d does in torchvision's trained R50 (a batch
    of a few images cannot estimate them)."""
    body = model.backbone.body
    stages = BACKBONE_STAGES[:trainable_layers] + (("bn1",) if trainable_layers == len(BACKBONE_STAGES) else ())
    for name, parameter in body.named_parameters():
        if not name.startswith(stages):
            parameter.requires_grad_(False)
    if freeze_norms:
        for module in body.modules():
            if type(module) is torch.nn.BatchNorm2d:
                module.__class__ = FrozenStatsBatchNorm2d
                module.requires_grad_(False)


def count_trainable(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def prepare_for_training(model: torch.nn.Module, arch: dict, cfg: TrainConfig) -> int:
    """Freeze what ``cfg`` keeps fixed (before the optimizer is built); returns the trainable stages."""
    from_trained_weights = cfg.model not in ARCHITECTURES
    layers = cfg.trainable_backbone_layers
    if layers is None:
        layers = default_trainable_layers(arch["name"], from_trained_weights)
    freeze_backbone(model, layers, freeze_norms=from_trained_weights)
    return layers


__all__ = ["starting_model", "remap_class_weights", "default_trainable_layers", "freeze_backbone",
           "count_trainable", "prepare_for_training", "FrozenStatsBatchNorm2d", "FINETUNE_TRAINABLE_LAYERS"]
