"""Mask R-CNN's mask branch: MMDetection's `FCNMaskHead` and the RoI head that adds it to Faster
R-CNN's box branch, under the names `roi_head.mask_head.*` of MMDetection's checkpoints.

The mask RoI extractor is the box branch's multi-level RoIAlign (same level mapping, aligned,
adaptive sampling) at 14 x 14. Pasting masks into the image is the host's job; losses and
mask targets are not here.
"""
from __future__ import annotations

import torch
from torch import nn

from ..faster_rcnn.roi_head import StandardRoIHead, multi_level_roi_align
from ..fpn import ConvNoNorm

MASK_ROI_SIZE = 14
MASK_SIZE = 2 * MASK_ROI_SIZE
"""RoI features 14 x 14, upsampled 2x by the deconvolution: 28 x 28 mask logits."""


class FCNMaskHead(nn.Module):
    """Four 3x3 convs with ReLU, a 2x deconvolution with ReLU, 1x1 logits per class:
    RoI features [R, 256, 14, 14] -> mask logits [R, num_classes, 28, 28]."""

    def __init__(self, num_classes: int = 80, in_channels: int = 256, conv_channels: int = 256,
                 num_convs: int = 4):
        super().__init__()
        self.convs = nn.ModuleList([
            ConvNoNorm(in_channels if i == 0 else conv_channels, conv_channels, 3, padding=1)
            for i in range(num_convs)])
        self.upsample = nn.ConvTranspose2d(conv_channels, conv_channels, 2, stride=2)
        self.conv_logits = nn.Conv2d(conv_channels, num_classes, 1)

    def forward(self, roi_feats: torch.Tensor) -> torch.Tensor:
        x = roi_feats
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.conv_logits(torch.relu(self.upsample(x)))


class MaskRoIHead(StandardRoIHead):
    """Faster R-CNN's box branch plus the mask branch, which runs on given boxes (the final
    detections): `mask_logits(feats, boxes, labels)`."""

    def __init__(self, num_classes: int = 80, strides: tuple[int, ...] = (4, 8, 16, 32),
                 **box_head_options):
        super().__init__(num_classes, strides, **box_head_options)
        self.mask_head = FCNMaskHead(num_classes)

    def mask_logits(self, feats: tuple[torch.Tensor, ...], boxes: torch.Tensor,
                    labels: torch.Tensor) -> torch.Tensor:
        """Boxes [B, K, 4] xyxy input px and labels [B, K] (-1 on padding rows) -> the mask
        logits of each box's class [B, K, 28, 28]. Padding rows (zero boxes) get RoIAlign's
        zero features and so constant logits; `postprocess` zeroes their probabilities."""
        batch, num_boxes = boxes.shape[0], boxes.shape[1]
        roi_feats = multi_level_roi_align(feats[:len(self.strides)], boxes, self.strides,
                                          MASK_ROI_SIZE)
        logits = self.mask_head(roi_feats)
        size = logits.shape[-1]
        channel = labels.clamp(min=0).to(torch.int64).reshape(batch * num_boxes, 1, 1, 1)
        picked = torch.gather(logits, 1, channel.expand(-1, 1, size, size))
        return picked.reshape(batch, num_boxes, size, size)
