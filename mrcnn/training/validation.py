"""What a training run reports on its validation data: box and mask AP (validation_metrics) and the loss per
term (validation_losses), computed without changing anything the run goes on with.
"""
from __future__ import annotations

import torch

from mrcnn.evaluation.evaluate import evaluate
from mrcnn.training.config import LOSS_TERMS
from mrcnn.training.devices import rng_state, set_rng_state


def validation_losses(model: torch.nn.Module, val_ds, device: torch.device, batch_size: int) -> dict[str, float]:
    """{"loss", and each of LOSS_TERMS}: the mean per image over ``val_ds``. torchvision returns losses only in
    training mode, so the pass runs in it, but changes nothing: no gradients; norm layers that keep running
    statistics normalise with them and do not update them; the random stream that the RPN and RoI sampling
    draw from is put back, so the training run goes on as it would have without validation."""
    modes = {module: module.training for module in model.modules()}
    rng = rng_state()
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    try:
        model.train()
        for module in model.modules():
            if getattr(module, "track_running_stats", False):  # BatchNorm (R50); GroupNorm keeps no statistics
                module.eval()
        with torch.no_grad():
            for start in range(0, len(val_ds), batch_size):
                items = [val_ds[i] for i in range(start, min(start + batch_size, len(val_ds)))]
                images = [image.to(device) for image, _ in items]
                targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in target.items()}
                           for _, target in items]
                for term, value in model(images, targets).items():
                    sums[term] += float(value) * len(items)
    finally:
        for module, training in modes.items():
            module.training = training
        set_rng_state(rng)
    means = {term: round(total / len(val_ds), 6) for term, total in sums.items()}
    return {"loss": round(sum(means.values()), 6), **means}


def validation_metrics(model, val_ds, device) -> dict:
    result = evaluate(model, val_ds, device=device, categories=val_ds.categories)
    return {"bbox_AP": result.bbox["AP"], "segm_AP": result.segm["AP"],
            "bbox_AP50": result.bbox["AP50"], "segm_AP50": result.segm["AP50"]}


__all__ = ["validation_losses", "validation_metrics"]
