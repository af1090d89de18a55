"""RTMDet-Ins's training objective, as MMDetection 3.3.0's `RTMDetInsHead.loss_by_feat`: RTMDet's
box losses (`models/rtmdet/loss.py`, same assignment) plus the dice loss of the positives' masks.

The assigner's centre prior uses each mask's centre of mass instead of its box centre (as
MMDetection's does when the ground truth has masks). Every positive anchor point (no cap on
their number) turns its predicted kernel into a mask over the stride-8 prototypes (the model's
`dynamic_mask_logits`, as at inference); those logits are upsampled 2x (bilinear) to
`mask_loss_stride` 4, and the ground-truth mask of its assigned box is sampled at the centre of
every 4x4 cell ([2::4, 2::4], as MMDetection), then dice (eps 5e-6, weight 2) is averaged over the
positives of the batch (averaged across processes under DDP, at least 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import dice_loss
from ..rtmdet.loss import RTMDetLoss, mean_over_processes
from .model import dynamic_conv_sizes, dynamic_mask_logits

# float32 machine epsilon: MMDetection's `weight_reduce_loss` adds it to the average factor
AVG_EPS = torch.finfo(torch.float32).eps


def centre_of_mass(masks: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """[G, 2] (x, y) pixel-index centroid of each mask [G, H, W] (an empty mask gives (0, 0)),
    which MMDetection's assigner uses as the centre of a box with a mask."""
    height, width = masks.shape[-2:]
    masks = masks.float()
    total = masks.sum((1, 2)).clamp(min=eps)
    ys = torch.arange(height, device=masks.device, dtype=masks.dtype)
    xs = torch.arange(width, device=masks.device, dtype=masks.dtype)
    return torch.stack([(masks.sum(1) * xs).sum(1) / total, (masks.sum(2) * ys).sum(1) / total], 1)


class RTMDetInsLoss(RTMDetLoss):
    def __init__(self, strides: tuple[int, ...], mask_weight: float = 2.0,
                 mask_loss_stride: int = 4, dice_eps: float = 5e-6, **kwargs):
        super().__init__(strides, **kwargs)
        self.mask_weight = mask_weight
        self.mask_loss_stride = mask_loss_stride
        self.dice_eps = dice_eps
        self.kernel_layout = dynamic_conv_sizes()       # 8 prototypes, 3 layers of 8 channels

    def __call__(self, raw, gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor],
                 gt_masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """loss_cls, loss_bbox and loss_mask; `raw` has cls_scores, bbox_preds, kernel_preds (per
        level) and mask_feat [B, P, H/8, W/8]; gt_masks[i] [G_i, H, W] (bool or 0/1) at the
        padded input size."""
        targets = self.targets(raw, gt_boxes, gt_labels, [centre_of_mass(m) for m in gt_masks])
        losses = self.box_losses(targets, gt_boxes)
        losses['loss_mask'] = self.mask_loss(raw, targets, gt_masks)
        return losses

    def mask_loss(self, raw, targets, gt_masks: list[torch.Tensor]) -> torch.Tensor:
        batch = raw.mask_feat.shape[0]
        num_params = raw.kernel_preds[0].shape[1]
        kernels = torch.cat([k.permute(0, 2, 3, 1).reshape(batch, -1, num_params)
                             for k in raw.kernel_preds], 1)
        mask_stride = self.strides[0]
        logits, wanted = [], []
        for index, assignment in enumerate(targets.assignments):
            positive = (assignment.gt_index >= 0).nonzero().squeeze(1)
            if len(positive) == 0:
                continue
            priors = targets.priors[positive]
            logits.append(dynamic_mask_logits(
                raw.mask_feat[index:index + 1], kernels[index:index + 1, positive],
                priors[None, :, :2], priors[None, :, 2], mask_stride, *self.kernel_layout)[0])
            wanted.append(gt_masks[index][assignment.gt_index[positive]])
        count = sum(len(image_logits) for image_logits in logits)
        num_positive = float(mean_over_processes(
            raw.mask_feat.new_tensor([count])).clamp(min=1))
        # keeps every mask-branch parameter in the graph when there is nothing to learn (DDP)
        untouched = (raw.mask_feat.sum() + kernels.sum()) * 0
        if count == 0:
            return untouched
        logits, wanted = torch.cat(logits), torch.cat(wanted)
        step = self.mask_loss_stride
        logits = F.interpolate(logits[None], scale_factor=mask_stride // step, mode='bilinear',
                               align_corners=False)[0]
        wanted = wanted[:, step // 2::step, step // 2::step]
        loss = dice_loss(logits, wanted, self.dice_eps).sum() / (num_positive + AVG_EPS)
        return self.mask_weight * loss + untouched
