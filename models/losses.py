"""RTMDet's training losses: Quality Focal Loss for classification, GIoU loss for boxes, dice
loss for instance masks (RTMDet-Ins).

Element-wise (unreduced) forms of MMDetection's `QualityFocalLoss` (sigmoid, beta 2),
`GIoULoss` and `DiceLoss`; the caller weights, sums and divides by the average factors as
RTMDet's head does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

GIOU_EPS = 1e-6


def quality_focal_loss(logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor,
                       beta: float = 2.0) -> torch.Tensor:
    """Per-point loss [N]: logits [N, C]; labels [N] (class, or -1 / >= C for background);
    quality [N] the soft target (IoU) of the labelled class.

    Negatives (every class of a background point, and the other classes of a positive one) are
    pushed to 0 with weight sigmoid^beta; the labelled class to `quality` with weight
    |quality - sigmoid|^beta."""
    probs = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                              reduction='none') * probs.pow(beta)
    positive = ((labels >= 0) & (labels < logits.shape[1])).nonzero().squeeze(1)
    if positive.numel():
        classes = labels[positive].long()
        target = quality[positive].to(logits.dtype)
        pos_logits = logits[positive, classes]
        scale = (target - probs[positive, classes]).abs().pow(beta)
        loss = loss.index_put((positive, classes), F.binary_cross_entropy_with_logits(
            pos_logits, target, reduction='none') * scale)
    return loss.sum(dim=1)


def giou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pair 1 - GIoU for aligned xyxy boxes [N, 4] (MMDetection's eps 1e-6)."""
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    area_pred = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_target = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    union = (area_pred + area_target - overlap).clamp(min=GIOU_EPS)
    ious = overlap / union
    enclose_wh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])
                  ).clamp(min=0)
    enclose = (enclose_wh[:, 0] * enclose_wh[:, 1]).clamp(min=GIOU_EPS)
    return 1 - (ious - (enclose - union) / enclose)


def dice_loss(mask_logits: torch.Tensor, targets: torch.Tensor, eps: float = 5e-6
              ) -> torch.Tensor:
    """Per-mask V-Net dice loss [N] of sigmoid(logits) against 0/1 targets, both [N, ...]:
    1 - 2 sum(p t) / (sum(p^2) + eps + sum(t^2) + eps) (MMDetection's `DiceLoss`, not naive;
    RTMDet-Ins uses eps 5e-6)."""
    probs = mask_logits.sigmoid().flatten(1)
    targets = targets.flatten(1).to(probs.dtype)
    overlap = (probs * targets).sum(1)
    return 1 - 2 * overlap / ((probs * probs).sum(1) + eps + (targets * targets).sum(1) + eps)
