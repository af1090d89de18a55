"""Rotated RTMDet in plain PyTorch: RTMDet's CSPNeXt backbone and PAFPN neck, MMRotate's
RotatedRTMDetSepBNHead (an angle branch beside the box branch) and its decoding
(`DistanceAnglePointCoder`, le90) into the shared rotated post-processing.

Module and attribute names follow MMRotate 1.x, so its checkpoints load with `strict=True`.
The forward pass returns the raw per-level head outputs; rotated NMS is `models.rotated_nms`,
named sizes and presets are `sizes.py`. Training is not here.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from detdeploy.core.nms import NMSConfig

from ..base import Detector
from ..nms import DecodedOutputs
from ..priors import grid_priors
from ..rotated_nms import rotated_dense_outputs
from ..rtmdet.model import CSPNeXt, CSPNeXtPAFPN, RTMDetSepBNHead


class RawOutputs(NamedTuple):
    """Per-level head outputs: class logits [B, C, H, W], box distances [B, 4, H, W] (px) and
    angles [B, 1, H, W] (rad, before le90 normalisation)."""
    cls_scores: tuple[torch.Tensor, ...]
    bbox_preds: tuple[torch.Tensor, ...]
    angle_preds: tuple[torch.Tensor, ...]


def norm_angle_le90(angle: torch.Tensor) -> torch.Tensor:
    """Angles into [-pi/2, pi/2), as MMRotate's `norm_angle(angle, 'le90')`."""
    return torch.remainder(angle + math.pi / 2, math.pi) - math.pi / 2


def distance_angle_to_rotated(points: torch.Tensor, distances: torch.Tensor,
                              angles: torch.Tensor) -> torch.Tensor:
    """MMRotate's `DistanceAnglePointCoder.decode` (no clipping): (left, top, right, bottom)
    distances [..., 4] measured in the box's rotated frame and angles [..., 1] at points
    [..., 2] -> (cx, cy, w, h, angle) [..., 5], angle le90."""
    cos, sin = angles.cos(), angles.sin()
    size = distances[..., :2] + distances[..., 2:]
    offset = (distances[..., 2:] - distances[..., :2]) / 2
    offset_x, offset_y = offset[..., :1], offset[..., 1:]
    centre = points + torch.cat([cos * offset_x - sin * offset_y,
                                 sin * offset_x + cos * offset_y], -1)
    return torch.cat([centre, size, norm_angle_le90(angles)], -1)


def decode_outputs(raw: RawOutputs, strides: tuple[int, ...]) -> DecodedOutputs:
    """Concatenate levels, apply sigmoid, decode rotated boxes [B, N, 5] at the priors."""
    batch = raw.cls_scores[0].shape[0]

    def flat(levels, channels):
        return torch.cat([t.permute(0, 2, 3, 1).reshape(batch, -1, channels) for t in levels], 1)
    scores = flat(raw.cls_scores, raw.cls_scores[0].shape[1]).sigmoid()
    feature_sizes = [(s.shape[-2], s.shape[-1]) for s in raw.cls_scores]
    priors = grid_priors(feature_sizes, strides, scores.device, scores.dtype)
    boxes = distance_angle_to_rotated(priors[None], flat(raw.bbox_preds, 4),
                                      flat(raw.angle_preds, 1))
    return DecodedOutputs(boxes, scores, [h * w for h, w in feature_sizes])


class RotatedRTMDetSepBNHead(RTMDetSepBNHead):
    """RTMDet's separated-BN head plus `rtm_ang`, one angle per anchor point from the box
    tower (PseudoAngleCoder: the raw value is the angle)."""

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int,
                 stacked_convs: int = 2, strides: tuple[int, ...] = (8, 16, 32),
                 exp_on_reg: bool = False, share_conv: bool = True, pred_kernel_size: int = 1):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, strides,
                         exp_on_reg, share_conv, pred_kernel_size)
        self.rtm_ang = nn.ModuleList(
            nn.Conv2d(feat_channels, 1, pred_kernel_size, padding=pred_kernel_size // 2)
            for _ in strides)

    def init_weights(self, prior_prob: float = 0.01) -> None:
        super().init_weights(prior_prob)    # covers rtm_ang: N(0, 0.01), bias 0

    def forward(self, feats: tuple[torch.Tensor, ...]) -> RawOutputs:
        cls_scores, bbox_preds, angle_preds = [], [], []
        for level, (x, stride) in enumerate(zip(feats, self.strides)):
            cls_feat, reg_feat = x, x
            for layer in self.cls_convs[level]:
                cls_feat = layer(cls_feat)
            for layer in self.reg_convs[level]:
                reg_feat = layer(reg_feat)
            reg_dist = self.rtm_reg[level](reg_feat)
            if self.exp_on_reg:
                reg_dist = reg_dist.exp()
            cls_scores.append(self.rtm_cls[level](cls_feat))
            bbox_preds.append(reg_dist * stride)
            angle_preds.append(self.rtm_ang[level](reg_feat))
        return RawOutputs(tuple(cls_scores), tuple(bbox_preds), tuple(angle_preds))


class RotatedRTMDet(Detector):
    """Rotated RTMDet: `forward` gives raw head outputs, `postprocess` the oriented
    detections (boxes [B, K, 5] cx, cy, w, h, angle le90)."""

    family = 'rotated_rtmdet'
    task = 'rotated'
    num_classes_key = 'bbox_head.rtm_cls.0.weight'

    def __init__(self, deepen_factor: float, widen_factor: float, neck_channels: tuple[int, ...],
                 out_channels: int, num_csp_blocks: int, exp_on_reg: bool, num_classes: int = 15):
        super().__init__()
        self.backbone = CSPNeXt(deepen_factor, widen_factor)
        self.neck = CSPNeXtPAFPN(neck_channels, out_channels, num_csp_blocks)
        self.bbox_head = RotatedRTMDetSepBNHead(num_classes, out_channels, out_channels,
                                                exp_on_reg=exp_on_reg)
        self.bbox_head.init_weights()
        self.strides: tuple[int, ...] = self.bbox_head.strides

    @property
    def num_classes(self) -> int:
        return self.bbox_head.num_classes

    @property
    def size_divisor(self) -> int:
        return max(self.strides)

    def forward(self, images: torch.Tensor) -> RawOutputs:
        return self.bbox_head(self.neck(self.backbone(images)))

    @property
    def raw_output_names(self) -> tuple[str, ...]:
        return tuple(f'{kind}.{level}' for kind in RawOutputs._fields
                     for level in range(len(self.strides)))

    def raw_tensors(self, raw: RawOutputs) -> tuple[torch.Tensor, ...]:
        return (*raw.cls_scores, *raw.bbox_preds, *raw.angle_preds)

    def postprocess(self, raw: RawOutputs, input_hw: tuple[int, int], nms: NMSConfig,
                    nms_mode: str) -> tuple[torch.Tensor, ...]:
        # MMRotate does not clip rotated boxes to the image; `input_hw` is not needed
        return rotated_dense_outputs(decode_outputs(raw, self.strides), nms, nms_mode)

    def synthetic_head(self) -> tuple[list[nn.Conv2d], list[tuple[nn.Conv2d, str]], float]:
        head = self.bbox_head
        towers = [layer.conv for tower in (*head.cls_convs, *head.reg_convs) for layer in tower]
        predictors = ([(conv, 'logits') for conv in head.rtm_cls]
                      + [(conv, 'box') for conv in head.rtm_reg]
                      + [(conv, 'angle') for conv in head.rtm_ang])
        return towers, predictors, 0.7 if head.exp_on_reg else 2.0
