"""RoI heads whose mask branch trains on a random subset of the box branch's positive RoIs.

torchvision trains the mask head on every positive RoI the box sampler drew, so the box head's sample
size (``box_batch_size_per_image`` × positive fraction 0.25) also sets the mask head's cost, which on
a CPU dominates a training step. Capping the mask RoIs separately (``mask_batch_size_per_image``)
lets the cheap box classifier see many more RoIs per image (torchvision's default is 512) for the
price of a few masks. Only training changes: inference is torchvision's own.
"""
from __future__ import annotations

import torch
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss, maskrcnn_loss


class MaskSampledRoIHeads(RoIHeads):
    """torchvision's RoIHeads, training the mask head on at most ``mask_batch_size_per_image`` of each
    image's positive RoIs (drawn at random from those the box head trains on)."""

    def __init__(self, *args, mask_batch_size_per_image: int, **kwargs):
        super().__init__(*args, **kwargs)
        if mask_batch_size_per_image < 1:
            raise ValueError(f"mask_batch_size_per_image must be at least 1, got {mask_batch_size_per_image}")
        self.mask_batch_size_per_image = int(mask_batch_size_per_image)

    @classmethod
    def like(cls, heads: RoIHeads, mask_batch_size_per_image: int) -> "MaskSampledRoIHeads":
        """The same heads (same modules, so the same state dict keys) with the mask RoIs capped."""
        if not heads.has_mask() or heads.has_keypoint():
            raise ValueError("mask_batch_size_per_image needs mask heads and no keypoint heads")
        return cls(
            heads.box_roi_pool, heads.box_head, heads.box_predictor,
            heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
            heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
            heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
            mask_roi_pool=heads.mask_roi_pool, mask_head=heads.mask_head, mask_predictor=heads.mask_predictor,
            mask_batch_size_per_image=mask_batch_size_per_image,
        )

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if targets is None:
            raise ValueError("targets are needed in training mode")
        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)
        loss_classifier, loss_box_reg = fastrcnn_loss(class_logits, box_regression, labels, regression_targets)

        mask_proposals, pos_matched_idxs = [], []
        for boxes, matched, image_labels in zip(proposals, matched_idxs, labels):
            pos = torch.where(image_labels > 0)[0]
            pos = pos[torch.randperm(len(pos), device=pos.device)[:self.mask_batch_size_per_image]]
            mask_proposals.append(boxes[pos])
            pos_matched_idxs.append(matched[pos])
        mask_logits = self.mask_predictor(self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes)))
        loss_mask = maskrcnn_loss(mask_logits, mask_proposals, [t["masks"] for t in targets],
                                  [t["labels"] for t in targets], pos_matched_idxs)
        return [], {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg, "loss_mask": loss_mask}


__all__ = ["MaskSampledRoIHeads"]
