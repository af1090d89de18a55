"""RTMDet's DynamicSoftLabelAssigner: which anchor points learn which ground-truth box.

As MMDetection 3.x's `DynamicSoftLabelAssigner` (topk 13, soft centre radius 3, IoU weight 3):
candidates are points inside a box; each (point, box) pair costs a soft classification cost
(BCE against the IoU-valued soft label, scaled by the squared gap) + -3 log IoU + a soft centre
prior 10^(d/stride - 3), d the distance to the box centre (or, for instance masks, to the
mask's centre of mass, as MMDetection does when the ground truth has masks); every box takes the k cheapest points, k = sum of its top-13 IoUs
(at least 1); a point claimed by several boxes keeps the cheapest.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

INF = 100000000
EPS = 1e-7


class Assignment(NamedTuple):
    gt_index: torch.Tensor      # [N] long: assigned box index, -1 for background
    labels: torch.Tensor        # [N] long: assigned class, -1 for background
    ious: torch.Tensor          # [N] float: IoU of the prediction with its box (0 for background)


class DynamicSoftLabelAssigner:
    def __init__(self, topk: int = 13, soft_center_radius: float = 3.0, iou_weight: float = 3.0):
        self.topk = topk
        self.soft_center_radius = soft_center_radius
        self.iou_weight = iou_weight

    @torch.no_grad()
    def assign(self, cls_logits: torch.Tensor, pred_boxes: torch.Tensor, priors: torch.Tensor,
               gt_boxes: torch.Tensor, gt_labels: torch.Tensor,
               gt_centres: torch.Tensor | None = None) -> Assignment:
        """One image. cls_logits [N, C], pred_boxes [N, 4] xyxy, priors [N, 4] (x, y, stride_x,
        stride_y), gt_boxes [G, 4] xyxy, gt_labels [G] (boxes as the geometry methods below
        take them); gt_centres [G, 2] (x, y) for the centre prior instead of the box centres."""
        num_points, num_gt = priors.shape[0], gt_boxes.shape[0]
        gt_index = priors.new_full((num_points,), -1, dtype=torch.long)
        labels = priors.new_full((num_points,), -1, dtype=torch.long)
        ious = priors.new_zeros((num_points,))
        if num_gt == 0 or num_points == 0:
            return Assignment(gt_index, labels, ious)

        inside = self.points_inside(priors[:, :2], gt_boxes)            # [N, G]
        valid = inside.any(dim=1)
        if not valid.any():
            return Assignment(gt_index, labels, ious)

        valid_logits, valid_boxes, valid_priors = cls_logits[valid], pred_boxes[valid], priors[valid]
        num_valid = valid_logits.shape[0]
        if gt_centres is None:
            gt_centres = self.box_centres(gt_boxes)
        distance = ((valid_priors[:, None, :2] - gt_centres[None]).pow(2).sum(-1).sqrt()
                    / valid_priors[:, 2:3])
        soft_center_prior = torch.pow(10, distance - self.soft_center_radius)
        pair_ious = self.box_ious(valid_boxes, gt_boxes)                # [V, G]
        iou_cost = -torch.log(pair_ious + EPS) * self.iou_weight
        onehot = F.one_hot(gt_labels.long(), cls_logits.shape[-1]).to(cls_logits.dtype)
        logits = valid_logits[:, None, :].expand(num_valid, num_gt, -1)
        soft_label = onehot[None] * pair_ious[..., None]
        scale = soft_label - logits.sigmoid()
        cls_cost = (F.binary_cross_entropy_with_logits(logits, soft_label, reduction='none')
                    * scale.abs().pow(2.0)).sum(-1)
        cost = cls_cost + iou_cost + soft_center_prior

        matched_ious, matched_gt, foreground = self._dynamic_k_matching(cost, pair_ious)
        valid_index = valid.nonzero().squeeze(1)[foreground]
        gt_index[valid_index] = matched_gt
        labels[valid_index] = gt_labels[matched_gt].long()
        ious[valid_index] = matched_ious
        return Assignment(gt_index, labels, ious)

    # The box geometry (axis-aligned xyxy here; `models.rotated_rtmdet.loss` overrides these
    # for rotated boxes, as MMRotate's RotatedBoxes and RBboxOverlaps2D do)
    def points_inside(self, points: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        """[N, G]: points [N, 2] strictly inside boxes [G, 4]."""
        deltas = torch.cat([points[:, None] - gt_boxes[None, :, :2],
                            gt_boxes[None, :, 2:] - points[:, None]], dim=-1)
        return deltas.min(dim=-1).values > 0

    def box_centres(self, gt_boxes: torch.Tensor) -> torch.Tensor:
        return (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2

    def box_ious(self, boxes: torch.Tensor, gt_boxes: torch.Tensor) -> torch.Tensor:
        return box_iou(boxes, gt_boxes)

    def _dynamic_k_matching(self, cost: torch.Tensor, pair_ious: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(IoU with the matched box, matched box index) per matched candidate, and the mask of
        matched candidates among the valid ones."""
        matching = torch.zeros_like(cost, dtype=torch.uint8)
        candidate_topk = min(self.topk, pair_ious.shape[0])
        top_ious, _ = torch.topk(pair_ious, candidate_topk, dim=0)
        dynamic_ks = torch.clamp(top_ious.sum(0).int(), min=1)
        for gt in range(cost.shape[1]):
            _, chosen = torch.topk(cost[:, gt], k=int(dynamic_ks[gt]), largest=False)
            matching[chosen, gt] = 1
        claimed_twice = matching.sum(1) > 1
        if claimed_twice.any():
            cheapest = cost[claimed_twice].argmin(dim=1)
            matching[claimed_twice] = 0
            matching[claimed_twice.nonzero().squeeze(1), cheapest] = 1
        foreground = matching.sum(1) > 0
        matched_gt = matching[foreground].argmax(1)
        matched_ious = (matching * pair_ious).sum(1)[foreground]
        return matched_ious, matched_gt, foreground
