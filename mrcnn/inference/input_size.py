"""The size an image has when it reaches the network, and the images too thin to have one.

    network_input_size(loaded.model, 1, 1000)              # (0, 704) for the bundled model: (height, width)
    check_input_size(loaded.model, 1, 1000, "w1000.png")   # ImageError "w1000.png: 1000x1 px would be scaled
                                                           # to 704x0 px for the network (…): too thin …"

A model's transform (torchvision's GeneralizedRCNNTransform, at inference) scales an image by
min(min_size / shorter side, max_size / longer side) and truncates each side: a very thin image's shorter
side becomes 0 px, on which the resize fails deep inside torch with a message that names no image. Every
way an image reaches the network (the trace, a clip's frames, evaluation, the CLI's checks) asks here first.
"""
from __future__ import annotations

import torch

from mrcnn.errors import ImageError


def _shorter_side(transform, training: bool) -> float:
    """The shorter side the transform scales to: at inference the last of its sizes; in training a step may
    pick any of them, so the smallest (torchvision)."""
    sizes = transform.min_size
    if not isinstance(sizes, (list, tuple)):
        return float(sizes)
    return float(min(sizes) if training else sizes[-1])


def network_input_size(model: torch.nn.Module, height: int, width: int,
                       training: bool = False) -> tuple[int, int]:
    """(height, width) of an image of ``height`` x ``width`` px after ``model.transform``'s resize (before
    padding), with torchvision's own arithmetic (a float scale, each side truncated); ``training``: the
    smallest a training step may make it."""
    transform = model.transform
    height, width = int(height), int(width)
    if transform.fixed_size is not None:
        fixed_w, fixed_h = transform.fixed_size  # torchvision gives it as (width, height)
        return int(fixed_h), int(fixed_w)
    scale = min(_shorter_side(transform, training) / min(height, width), float(transform.max_size) / max(height, width))
    return int(height * scale), int(width * scale)


def check_input_size(model: torch.nn.Module, height: int, width: int, name: str | None = None,
                     training: bool = False) -> None:
    """ImageError naming ``name`` (when given) when the model's input transform would scale an image of this
    size to nothing on a side (``training``: at any size a training step may pick)."""
    if min(int(height), int(width)) < 1:
        raise ImageError(f"{name + ': ' if name else ''}the image has no pixels ({width}x{height} px)")
    new_h, new_w = network_input_size(model, height, width, training)
    if min(new_h, new_w) < 1:
        transform = model.transform
        raise ImageError(f"{name + ': ' if name else ''}{width}x{height} px would be scaled to {new_w}x{new_h} px "
                         f"for the network (shorter side to {_shorter_side(transform, training):.0f}, longer side "
                         f"at most {transform.max_size}): too thin for this model")


__all__ = ["check_input_size", "network_input_size"]
