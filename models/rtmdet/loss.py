"""RTMDet's training objective over the head's raw outputs, as MMDetection's `RTMDetHead.loss`.

Per image, the assigner matches anchor points to boxes using the detached predictions; the
classification loss (QFL, target = IoU of the matched prediction) covers every point; the box
loss (GIoU, weight 2) covers matched points, each weighted by its IoU. Both are divided by the
sum of matched IoUs over the batch (averaged across processes under DDP), at least 1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from ..box_coders import distance2bbox
from ..losses import giou_loss, quality_focal_loss
from ..priors import grid_priors_with_strides
from .assigner import Assignment, DynamicSoftLabelAssigner
from .model import RawOutputs


class Targets(NamedTuple):
    """A batch's predictions, flattened over levels, and their assignment."""
    priors: torch.Tensor                # [A, 4] x, y, stride, stride
    logits: torch.Tensor                # [B, A, C]
    boxes: torch.Tensor                 # [B, A, 4] decoded xyxy
    assignments: list[Assignment]       # per image


def mean_over_processes(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class RTMDetLoss:
    def __init__(self, strides: tuple[int, ...], assigner: DynamicSoftLabelAssigner | None = None,
                 cls_weight: float = 1.0, box_weight: float = 2.0):
        self.strides = strides
        self.assigner = assigner or DynamicSoftLabelAssigner()
        self.cls_weight = cls_weight
        self.box_weight = box_weight

    def priors(self, raw: RawOutputs) -> torch.Tensor:
        """[A, 4]: x, y, stride, stride of every anchor point, levels concatenated."""
        sizes = [(s.shape[-2], s.shape[-1]) for s in raw.cls_scores]
        return grid_priors_with_strides(sizes, self.strides, raw.cls_scores[0].device)

    def targets(self, raw: RawOutputs, gt_boxes: list[torch.Tensor],
                gt_labels: list[torch.Tensor], gt_centres: list[torch.Tensor] | None = None
                ) -> Targets:
        """Decode the predictions and assign every anchor point of every image (no grad through
        the assignment); `gt_centres` replace the box centres in the assigner's centre prior."""
        batch = raw.cls_scores[0].shape[0]
        num_classes = raw.cls_scores[0].shape[1]
        logits = torch.cat([s.permute(0, 2, 3, 1).reshape(batch, -1, num_classes)
                            for s in raw.cls_scores], 1)
        distances = torch.cat([b.permute(0, 2, 3, 1).reshape(batch, -1, 4)
                               for b in raw.bbox_preds], 1)
        priors = self.priors(raw)
        boxes = distance2bbox(priors[None, :, :2], distances)
        assignments = [self.assigner.assign(logits[index].detach(), boxes[index].detach(),
                                            priors, gt_boxes[index], gt_labels[index],
                                            None if gt_centres is None else gt_centres[index])
                       for index in range(batch)]
        return Targets(priors, logits, boxes, assignments)

    def box_losses(self, targets: Targets, gt_boxes: list[torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
        """loss_cls and loss_bbox of assigned predictions."""
        num_classes = targets.logits.shape[-1]
        labels = torch.cat([a.labels for a in targets.assignments])
        quality = torch.cat([a.ious for a in targets.assignments])
        matched = torch.cat([
            gt_boxes[index][assignment.gt_index.clamp(min=0)] if len(gt_boxes[index])
            else targets.boxes.new_zeros((len(targets.priors), 4))
            for index, assignment in enumerate(targets.assignments)])
        flat_logits, flat_boxes = targets.logits.reshape(-1, num_classes), \
            targets.boxes.reshape(-1, 4)

        loss_cls = quality_focal_loss(flat_logits, labels, quality).sum()
        positive = labels >= 0
        if positive.any():
            loss_bbox = (giou_loss(flat_boxes[positive], matched[positive])
                         * quality[positive]).sum()
        else:
            loss_bbox = flat_boxes.sum() * 0
        average = mean_over_processes(quality.sum().detach()).clamp(min=1)
        return {'loss_cls': self.cls_weight * loss_cls / average,
                'loss_bbox': self.box_weight * loss_bbox / average}

    def __call__(self, raw: RawOutputs, gt_boxes: list[torch.Tensor],
                 gt_labels: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """loss_cls and loss_bbox for a batch; gt_boxes[i] [G_i, 4] xyxy in input pixels."""
        return self.box_losses(self.targets(raw, gt_boxes, gt_labels), gt_boxes)
