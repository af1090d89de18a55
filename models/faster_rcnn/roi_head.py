"""Faster R-CNN's second stage: multi-level RoIAlign (MMDetection's `SingleRoIExtractor`) and
the `Shared2FCBBoxHead`, under the names `roi_head.bbox_head.*` of MMDetection's checkpoints.

RoIAlign is `torchvision.ops.roi_align`, which the exporter turns into ONNX `RoiAlign`. Every
level sees every RoI, those of other levels shrunk to zero size (RoIAlign yields exact zeros
for them, at the cost of one sample each): no level is ever empty, shapes never depend on the
data, and the sum over levels is each RoI's own level's features, bit for bit. Losses and
sampling are not here.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import roi_align

FINEST_SCALE = 56
"""A RoI of sqrt(area) below 2 * 56 px takes the finest level, each doubling one level up."""


def roi_levels(boxes: torch.Tensor, num_levels: int) -> torch.Tensor:
    """MMDetection's `map_roi_levels`: floor(log2(sqrt(w * h) / 56 + 1e-6)), clamped to the
    levels, for xyxy boxes [..., 4]."""
    scale = torch.sqrt((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))
    levels = torch.floor(torch.log2(scale / FINEST_SCALE + 1e-6))
    return levels.clamp(min=0, max=num_levels - 1).long()


def multi_level_roi_align(feats: tuple[torch.Tensor, ...], boxes: torch.Tensor,
                          strides: tuple[int, ...], output_size: int = 7,
                          sampling_ratio: int = 0) -> torch.Tensor:
    """Features [B * R, C, S, S] of the RoIs `boxes` [B, R, 4] (xyxy input px), each from its
    level (`roi_levels`), RoIAlign with aligned=True as mmcv's `RoIAlign(aligned=True)`."""
    batch, num_rois = boxes.shape[0], boxes.shape[1]
    image_index = torch.arange(batch, device=boxes.device, dtype=boxes.dtype)
    image_index = image_index[:, None, None].expand(batch, num_rois, 1)
    flat_boxes = boxes.reshape(batch * num_rois, 4)
    flat_index = image_index.reshape(batch * num_rois, 1)
    levels = roi_levels(flat_boxes, len(feats))
    roi_feats = None
    for level, (feat, stride) in enumerate(zip(feats, strides)):
        on_level = (levels == level)[:, None]
        level_boxes = torch.where(on_level, flat_boxes, torch.zeros_like(flat_boxes))
        level_feats = roi_align(feat, torch.cat([flat_index, level_boxes], 1), output_size,
                                spatial_scale=1.0 / stride, sampling_ratio=sampling_ratio,
                                aligned=True)
        roi_feats = level_feats if roi_feats is None else roi_feats + level_feats
    return roi_feats


class Shared2FCBBoxHead(nn.Module):
    """Two shared fully connected layers, then class logits (the last one background) and
    class-specific deltas: [R, C, S, S] -> ([R, num_classes + 1], [R, 4 * num_classes])."""

    def __init__(self, num_classes: int = 80, in_channels: int = 256, roi_feat_size: int = 7,
                 fc_out_channels: int = 1024):
        super().__init__()
        self.num_classes = num_classes
        self.shared_fcs = nn.ModuleList([
            nn.Linear(in_channels * roi_feat_size * roi_feat_size, fc_out_channels),
            nn.Linear(fc_out_channels, fc_out_channels)])
        self.fc_cls = nn.Linear(fc_out_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_out_channels, 4 * num_classes)

    def forward(self, roi_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = roi_feats.flatten(1)
        for fc in self.shared_fcs:
            x = torch.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)


class StandardRoIHead(nn.Module):
    """The box branch of MMDetection's `StandardRoIHead` (no mask branch): RoI features of
    proposals [B, R, 4] -> class logits [B, R, num_classes + 1], deltas [B, R, 4 * num_classes]."""

    def __init__(self, num_classes: int = 80, strides: tuple[int, ...] = (4, 8, 16, 32),
                 roi_feat_size: int = 7, in_channels: int = 256, fc_out_channels: int = 1024):
        super().__init__()
        self.strides = tuple(strides)
        self.roi_feat_size = roi_feat_size
        self.bbox_head = Shared2FCBBoxHead(num_classes, in_channels, roi_feat_size,
                                           fc_out_channels)

    def forward(self, feats: tuple[torch.Tensor, ...], proposals: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, num_rois = proposals.shape[0], proposals.shape[1]
        roi_feats = multi_level_roi_align(feats[:len(self.strides)], proposals, self.strides,
                                          self.roi_feat_size)
        cls_scores, bbox_preds = self.bbox_head(roi_feats)
        return (cls_scores.reshape(batch, num_rois, -1), bbox_preds.reshape(batch, num_rois, -1))
