"""Rotated RTMDet's training objective, as MMRotate 1.x's `RotatedRTMDetHead.loss_by_feat`
(config `rotated_rtmdet_*-3x-dota`).

- Decoding: the head's distances and angles at every anchor point -> rotated boxes
  (`DistanceAnglePointCoder`, le90; the angle is the raw output, `PseudoAngleCoder`).
- Assignment: RTMDet's `DynamicSoftLabelAssigner` (topk 13) on rotated geometry: candidate
  points lie inside a rotated box (`RotatedBoxes.find_inside_points`, eps 0.01), the centre prior
  uses the box centres, the IoU cost and soft labels use rotated IoU (`RBboxOverlaps2D`).
- Losses: Quality Focal Loss (beta 2) over every point, target the assigned IoU;
  `RotatedIoULoss(mode='linear', loss_weight=2.0)`: 1 - IoU of each matched decoded box with its
  target, weighted by the assigned IoU. Both divided by the batch's sum of assigned IoUs
  (at least 1).

Rotated IoU is `models.rotated_nms.rotated_iou_pairs`, exact convex polygon clipping, which is
differentiable almost everywhere; MMRotate uses mmcv's compiled `diff_iou_rotated_2d`.
Deviation: a predicted box without positive width and height has IoU 0 (loss 1, no gradient).
"""
from __future__ import annotations

import math

import torch

from ..losses import quality_focal_loss
from ..rotated_nms import rotated_iou_matrix, rotated_iou_pairs
from ..rtmdet.assigner import DynamicSoftLabelAssigner
from ..rtmdet.loss import RTMDetLoss, mean_over_processes
from .model import RawOutputs, distance_angle_to_rotated

IOU_LOSS_EPS = 1e-6         # RotatedIoULoss: IoU clamped from below before 1 - IoU
INSIDE_EPS = 0.01           # RotatedBoxes.find_inside_points: strictly inside by this margin


class RotatedDynamicSoftLabelAssigner(DynamicSoftLabelAssigner):
    """The dynamic soft-label assigner on rotated boxes [G, 5] (cx, cy, w, h, angle)."""

    def points_inside(self, points: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        offset = points[:, None] - gt_boxes[None, :, :2]                # [N, G, 2]
        cos, sin = gt_boxes[:, 4].cos(), gt_boxes[:, 4].sin()
        along = offset[..., 0] * cos + offset[..., 1] * sin            # in the box's frame
        across = -offset[..., 0] * sin + offset[..., 1] * cos
        half_w, half_h = gt_boxes[:, 2] / 2 - INSIDE_EPS, gt_boxes[:, 3] / 2 - INSIDE_EPS
        return (along.abs() <= half_w) & (across.abs() <= half_h)

    def box_centres(self, gt_boxes: torch.Tensor) -> torch.Tensor:
        return gt_boxes[:, :2]

    def box_ious(self, boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        return rotated_iou_matrix(boxes, gt_boxes)


def regularize_le90(boxes: torch.Tensor) -> torch.Tensor:
    """MMRotate's `RotatedBoxes.regularize_boxes('le90')`: w > h (else swapped, angle + pi/2),
    angle in [-pi/2, pi/2). The same box, another parametrisation."""
    cx, cy, w, h, angle = boxes.unbind(-1)
    longer = w > h
    angle = torch.where(longer, angle, angle + math.pi / 2)
    angle = torch.remainder(angle + math.pi / 2, math.pi) - math.pi / 2
    return torch.stack([cx, cy, torch.where(longer, w, h), torch.where(longer, h, w), angle], -1)


def rotated_iou_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pair 1 - IoU [P] of rotated boxes pred [P, 5] and target [P, 5] (mode 'linear',
    IoU clamped at 1e-6), differentiable in `pred`."""
    iou = rotated_iou_pairs(pred, target)
    has_size = (pred[:, 2] > 0) & (pred[:, 3] > 0)
    iou = torch.where(has_size, iou, torch.zeros_like(iou))
    return 1 - iou.clamp(min=IOU_LOSS_EPS)


class RotatedRTMDetLoss(RTMDetLoss):
    """loss_cls (QFL) and loss_bbox (2 x rotated IoU loss) of a batch of raw head outputs."""

    def __init__(self, strides: tuple[int, ...], cls_weight: float = 1.0,
                 box_weight: float = 2.0):
        super().__init__(strides, RotatedDynamicSoftLabelAssigner(), cls_weight, box_weight)

    def decode(self, raw: RawOutputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [B, A, C], rotated boxes [B, A, 5], priors [A, 4]) over all levels."""
        batch, num_classes = raw.cls_scores[0].shape[:2]

        def flat(levels, channels):
            return torch.cat([t.permute(0, 2, 3, 1).reshape(batch, -1, channels)
                              for t in levels], 1)
        priors = self.priors(raw).to(raw.bbox_preds[0].dtype)
        boxes = distance_angle_to_rotated(priors[None, :, :2], flat(raw.bbox_preds, 4),
                                          flat(raw.angle_preds, 1))
        return flat(raw.cls_scores, num_classes), boxes, priors

    def __call__(self, raw: RawOutputs, gt_boxes: list[torch.Tensor],
                 gt_labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """gt_boxes[i] [G_i, 5] rotated boxes (cx, cy, w, h, angle) in input pixels."""
        logits, boxes, priors = self.decode(raw)
        labels, quality, targets = self.targets(logits.detach(), boxes.detach(), priors,
                                                gt_boxes, gt_labels)
        return self.losses(logits, boxes, labels, quality, targets)

    @torch.no_grad()
    def targets(self, logits: torch.Tensor, boxes: torch.Tensor, priors: torch.Tensor,
                gt_boxes: list[torch.Tensor], gt_labels: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per point of the batch: assigned class (-1 background), assigned IoU, and the target
        box (le90), from the detached predictions."""
        labels, quality, targets = [], [], []
        for index in range(logits.shape[0]):
            assignment = self.assigner.assign(logits[index], boxes[index], priors,
                                              gt_boxes[index], gt_labels[index])
            labels.append(assignment.labels)
            quality.append(assignment.ious)
            targets.append(regularize_le90(gt_boxes[index])[assignment.gt_index.clamp(min=0)]
                           if len(gt_boxes[index]) else boxes.new_zeros((len(priors), 5)))
        return torch.cat(labels), torch.cat(quality), torch.cat(targets)

    def losses(self, logits: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
               quality: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """QFL over every point and the weighted rotated IoU loss over matched ones, each
        divided by the sum of assigned IoUs (at least 1)."""
        num_classes = logits.shape[2]
        flat_logits, flat_boxes = logits.reshape(-1, num_classes), boxes.reshape(-1, 5)
        loss_cls = quality_focal_loss(flat_logits, labels, quality).sum()
        positive = labels >= 0
        if positive.any():
            loss_bbox = (rotated_iou_loss(flat_boxes[positive], targets[positive])
                         * quality[positive]).sum()
        else:
            loss_bbox = flat_boxes.sum() * 0
        average = mean_over_processes(quality.sum().detach()).clamp(min=1)
        return {'loss_cls': self.cls_weight * loss_cls / average,
                'loss_bbox': self.box_weight * loss_bbox / average}
