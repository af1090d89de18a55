"""RTMDet in plain PyTorch: CSPNeXt backbone, CSPNeXtPAFPN neck, RTMDetSepBNHead, and its
decoding (distances from anchor points) into the shared dense post-processing.

Module and attribute names follow MMDetection 3.x, so its RTMDet checkpoints load with
`strict=True`. The forward pass returns the raw per-level head outputs; NMS is `models.nms`,
named sizes and presets are `sizes.py`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from detdeploy.core.nms import NMSConfig

from ..base import Detector
from ..box_coders import distance2bbox
from ..conv_modules import ConvModule
from ..csp_layers import CSPLayer, SPPBottleneck
from ..nms import DecodedOutputs, dense_outputs
from ..priors import grid_priors


class RawOutputs(NamedTuple):
    """Per-level head outputs: class logits [B, C, H, W] and box distances [B, 4, H, W] (px)."""
    cls_scores: tuple[torch.Tensor, ...]
    bbox_preds: tuple[torch.Tensor, ...]


def decode_boxes(distances: torch.Tensor, feature_sizes: list[tuple[int, int]],
                 strides: tuple[int, ...], clamp_hw: tuple[int, int]) -> torch.Tensor:
    """Per-anchor distances [B, N, 4] of all levels -> xyxy boxes [B, N, 4] clamped to
    `clamp_hw`."""
    priors = grid_priors(feature_sizes, strides, distances.device, distances.dtype)
    return distance2bbox(priors[None], distances, clamp_hw)


def decode_outputs(raw: RawOutputs, strides: tuple[int, ...],
                   clamp_hw: tuple[int, int]) -> DecodedOutputs:
    """Concatenate levels, apply sigmoid, decode distances at the priors, clamp to `clamp_hw`."""
    batch = raw.cls_scores[0].shape[0]
    scores = torch.cat([s.permute(0, 2, 3, 1).reshape(batch, -1, s.shape[1])
                        for s in raw.cls_scores], 1).sigmoid()
    distances = torch.cat([b.permute(0, 2, 3, 1).reshape(batch, -1, 4) for b in raw.bbox_preds], 1)
    feature_sizes = [(s.shape[-2], s.shape[-1]) for s in raw.cls_scores]
    boxes = decode_boxes(distances, feature_sizes, strides, clamp_hw)
    return DecodedOutputs(boxes, scores, [h * w for h, w in feature_sizes])

# MMDetection's CSPNeXt 'P5' arch: (in_channels, out_channels, num_blocks, add_identity, use_spp)
CSPNEXT_P5 = ((64, 128, 3, True, False), (128, 256, 6, True, False),
              (256, 512, 6, True, False), (512, 1024, 3, False, True))


class CSPNeXt(nn.Module):
    """CSPNeXt backbone (P5); returns the outputs of stages 2, 3 and 4 (strides 8, 16, 32)."""

    def __init__(self, deepen_factor: float, widen_factor: float, expand_ratio: float = 0.5,
                 channel_attention: bool = True, spp_kernel_sizes: tuple[int, ...] = (5, 9, 13),
                 out_indices: tuple[int, ...] = (2, 3, 4)):
        super().__init__()
        stem_channels = int(CSPNEXT_P5[0][0] * widen_factor)
        self.stem = nn.Sequential(
            ConvModule(3, stem_channels // 2, 3, 2, 1),
            ConvModule(stem_channels // 2, stem_channels // 2, 3, 1, 1),
            ConvModule(stem_channels // 2, stem_channels, 3, 1, 1))
        self.out_indices = out_indices
        self.layers = ['stem']
        for i, (in_ch, out_ch, num_blocks, add_identity, use_spp) in enumerate(CSPNEXT_P5):
            in_ch, out_ch = int(in_ch * widen_factor), int(out_ch * widen_factor)
            stage: list[nn.Module] = [ConvModule(in_ch, out_ch, 3, 2, 1)]
            if use_spp:
                stage.append(SPPBottleneck(out_ch, out_ch, spp_kernel_sizes))
            stage.append(CSPLayer(out_ch, out_ch, expand_ratio,
                                  max(round(num_blocks * deepen_factor), 1),
                                  add_identity, channel_attention))
            self.add_module(f'stage{i + 1}', nn.Sequential(*stage))
            self.layers.append(f'stage{i + 1}')

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for i, name in enumerate(self.layers):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


class CSPNeXtPAFPN(nn.Module):
    """Path-aggregation FPN with CSPNeXt blocks: top-down, bottom-up, then a 3x3 conv per level."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: int, num_csp_blocks: int,
                 expand_ratio: float = 0.5):
        super().__init__()
        self.in_channels = in_channels
        self.upsample = nn.Upsample(scale_factor=2, mode='nearest')
        self.reduce_layers = nn.ModuleList()
        self.top_down_blocks = nn.ModuleList()
        for idx in range(len(in_channels) - 1, 0, -1):
            self.reduce_layers.append(ConvModule(in_channels[idx], in_channels[idx - 1], 1))
            self.top_down_blocks.append(CSPLayer(in_channels[idx - 1] * 2, in_channels[idx - 1],
                                                 expand_ratio, num_csp_blocks, add_identity=False))
        self.downsamples = nn.ModuleList()
        self.bottom_up_blocks = nn.ModuleList()
        for idx in range(len(in_channels) - 1):
            self.downsamples.append(ConvModule(in_channels[idx], in_channels[idx], 3, 2, 1))
            self.bottom_up_blocks.append(CSPLayer(in_channels[idx] * 2, in_channels[idx + 1],
                                                  expand_ratio, num_csp_blocks, add_identity=False))
        self.out_convs = nn.ModuleList(
            ConvModule(ch, out_channels, 3, 1, 1) for ch in in_channels)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        num_levels = len(self.in_channels)
        inner_outs = [inputs[-1]]
        for idx in range(num_levels - 1, 0, -1):
            block_idx = num_levels - 1 - idx
            feat_high = self.reduce_layers[block_idx](inner_outs[0])
            inner_outs[0] = feat_high
            merged = torch.cat([self.upsample(feat_high), inputs[idx - 1]], 1)
            inner_outs.insert(0, self.top_down_blocks[block_idx](merged))
        outs = [inner_outs[0]]
        for idx in range(num_levels - 1):
            merged = torch.cat([self.downsamples[idx](outs[-1]), inner_outs[idx + 1]], 1)
            outs.append(self.bottom_up_blocks[idx](merged))
        return tuple(conv(out) for conv, out in zip(self.out_convs, outs))


class RTMDetSepBNHead(nn.Module):
    """Per-level cls/reg towers whose convs are shared across levels while BN stays per level.

    Returns class logits [B, C, H, W] and box distances (left, top, right, bottom) in input
    pixels [B, 4, H, W] per level; `exp_on_reg` applies exp() before scaling by the stride.
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int,
                 stacked_convs: int = 2, strides: tuple[int, ...] = (8, 16, 32),
                 exp_on_reg: bool = False, share_conv: bool = True, pred_kernel_size: int = 1):
        super().__init__()
        self.num_classes = num_classes
        self.strides = strides
        self.exp_on_reg = exp_on_reg
        self.cls_convs = nn.ModuleList()
        self.reg_convs = nn.ModuleList()
        self.rtm_cls = nn.ModuleList()
        self.rtm_reg = nn.ModuleList()
        for _ in strides:
            self.cls_convs.append(nn.ModuleList(
                ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, 1, 1)
                for i in range(stacked_convs)))
            self.reg_convs.append(nn.ModuleList(
                ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, 1, 1)
                for i in range(stacked_convs)))
            self.rtm_cls.append(nn.Conv2d(feat_channels, num_classes, pred_kernel_size,
                                          padding=pred_kernel_size // 2))
            self.rtm_reg.append(nn.Conv2d(feat_channels, 4, pred_kernel_size,
                                          padding=pred_kernel_size // 2))
        if share_conv:
            for level in range(1, len(strides)):
                for i in range(stacked_convs):
                    self.cls_convs[level][i].conv = self.cls_convs[0][i].conv
                    self.reg_convs[level][i].conv = self.reg_convs[0][i].conv

    def init_weights(self, prior_prob: float = 0.01) -> None:
        """MMDetection's head initialisation: N(0, 0.01) convs, BN at 1/0, classifier biases
        set so that initial scores equal `prior_prob`."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        bias_cls = -math.log((1 - prior_prob) / prior_prob)
        for rtm_cls in self.rtm_cls:
            nn.init.constant_(rtm_cls.bias, bias_cls)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> RawOutputs:
        cls_scores, bbox_preds = [], []
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
        return RawOutputs(tuple(cls_scores), tuple(bbox_preds))


class RTMDet(Detector):
    """RTMDet detector: `forward` gives raw head outputs, `postprocess` the detections."""

    family = 'rtmdet'
    task = 'detect'
    num_classes_key = 'bbox_head.rtm_cls.0.weight'

    def __init__(self, deepen_factor: float, widen_factor: float, neck_channels: tuple[int, ...],
                 out_channels: int, num_csp_blocks: int, exp_on_reg: bool, num_classes: int = 80):
        super().__init__()
        self.backbone = CSPNeXt(deepen_factor, widen_factor)
        self.neck = CSPNeXtPAFPN(neck_channels, out_channels, num_csp_blocks)
        self.bbox_head = RTMDetSepBNHead(num_classes, out_channels, out_channels,
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
        return (*raw.cls_scores, *raw.bbox_preds)

    def postprocess(self, raw: RawOutputs, input_hw: tuple[int, int], nms: NMSConfig,
                    nms_mode: str) -> tuple[torch.Tensor, ...]:
        return dense_outputs(decode_outputs(raw, self.strides, input_hw), nms, nms_mode)

    def synthetic_head(self) -> tuple[list[nn.Conv2d], list[tuple[nn.Conv2d, str]], float]:
        head = self.bbox_head
        towers = [layer.conv for tower in (*head.cls_convs, *head.reg_convs) for layer in tower]
        predictors = ([(conv, 'logits') for conv in head.rtm_cls]
                      + [(conv, 'box') for conv in head.rtm_reg])
        return towers, predictors, 0.7 if head.exp_on_reg else 2.0
