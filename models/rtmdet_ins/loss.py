"""RTMDet-Ins's training objective, as MMDetection 3.3.0's `RTMDetInsHead.loss_by_feat`: RTMDet's
box losses (`models/rtmdet/loss.py`, same assignment) plus the dice loss of the positives' masks.

The assigner's centre prior uses each mask's centre of mass instead of its box centre (as
MMDetection's does when the ground truth has masks). Every positive anchor point (no cap on their number) turns its predicted kernel into a mask over
the stride-8 prototype (`mask_logits_at_points`); those logits are upsampled 2x (bilinear) to
`mask_loss_stride` 4, and the ground-truth mask of its assigned box is sampled at the centre of
every 4x4 cell ([2::4, 2::4], as MMDetection), then dice (eps 5e-6, weight 2) is averaged over the
positives of the batch (averaged across processes under DDP, at least 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..losses import dice_loss
from ..rtmdet.loss import RTMDetLoss, mean_over_processes

NUM_PROTOTYPES, DYCONV_CHANNELS, NUM_DYCONVS = 8, 8, 3
# float32 machine epsilon: MMDetection's `weight_reduce_loss` adds it to the average factor
AVG_EPS = torch.finfo(torch.float32).eps


def kernel_layout(num_prototypes: int = NUM_PROTOTYPES, channels: int = DYCONV_CHANNELS,
                  num_layers: int = NUM_DYCONVS) -> tuple[list[int], list[int]]:
    """Sizes of each dynamic layer's weights and biases within a kernel vector (MMDetection's
    `weight_nums`, `bias_nums`): the first layer sees the prototypes plus 2 relative coordinates,
    the last outputs one channel."""
    weights, biases = [], []
    for layer in range(num_layers):
        fan_in = num_prototypes + 2 if layer == 0 else channels
        fan_out = 1 if layer == num_layers - 1 else channels
        weights.append(fan_in * fan_out)
        biases.append(fan_out)
    return weights, biases


def mask_logits_at_points(mask_feat: torch.Tensor, kernels: torch.Tensor, points: torch.Tensor,
                          point_strides: torch.Tensor, mask_stride: int = 8,
                          channels: int = DYCONV_CHANNELS) -> torch.Tensor:
    """Mask logits [N, h, w] of N instances over one image's prototypes `mask_feat` [P, h, w]
    (stride `mask_stride`): each instance's kernel [N, params] parameterises 1x1 convs (ReLU
    between) over the prototypes and the coordinates relative to its point [N, 2] (x, y),
    divided by 8 x its level's stride `point_strides` [N]."""
    num, (prototypes, height, width) = kernels.shape[0], mask_feat.shape
    if num == 0:
        return mask_feat.new_zeros((0, height, width))
    ys = torch.arange(height, device=mask_feat.device, dtype=mask_feat.dtype) * mask_stride
    xs = torch.arange(width, device=mask_feat.device, dtype=mask_feat.dtype) * mask_stride
    scale = (point_strides.to(mask_feat.dtype) * 8)[:, None, None]
    relative = torch.stack([(points[:, 0, None, None] - xs[None, None, :]).expand(num, height, width),
                            (points[:, 1, None, None] - ys[None, :, None]).expand(num, height, width)],
                           1) / scale[:, None]
    x = torch.cat([relative, mask_feat[None].expand(num, -1, -1, -1)], 1)     # [N, P + 2, h, w]
    weight_sizes, bias_sizes = kernel_layout(prototypes, channels)
    parts = torch.split(kernels, weight_sizes + bias_sizes, dim=1)
    weights, biases = parts[:len(weight_sizes)], parts[len(weight_sizes):]
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        fan_out = bias.shape[1]
        x = torch.einsum('noi,nihw->nohw', weight.reshape(num, fan_out, -1), x) \
            + bias[:, :, None, None]
        if layer < len(weights) - 1:
            x = F.relu(x)
    return x[:, 0]


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
            priors = targets.priors[positive]
            logits.append(mask_logits_at_points(raw.mask_feat[index], kernels[index, positive],
                                                priors[:, :2], priors[:, 2], mask_stride))
            wanted.append(gt_masks[index][assignment.gt_index[positive]])
        logits, wanted = torch.cat(logits), torch.cat(wanted)
        num_positive = float(mean_over_processes(
            raw.mask_feat.new_tensor([len(logits)])).clamp(min=1))
        # keeps every mask-branch parameter in the graph when there is nothing to learn (DDP)
        untouched = (raw.mask_feat.sum() + kernels.sum()) * 0
        if len(logits) == 0:
            return untouched
        step = self.mask_loss_stride
        logits = F.interpolate(logits[None], scale_factor=mask_stride // step, mode='bilinear',
                               align_corners=False)[0]
        wanted = wanted[:, step // 2::step, step // 2::step]
        loss = dice_loss(logits, wanted, self.dice_eps).sum() / (num_positive + AVG_EPS)
        return self.mask_weight * loss + untouched
