"""RetinaNet in plain PyTorch: ResNet backbone, FPN (P3-P7, extra convs on the input), RetinaHead,
and its decoding (delta-xywh at anchors) into the shared dense post-processing.

Module and attribute names follow MMDetection 3.x, so its RetinaNet checkpoints load with
`strict=True`. The forward pass returns the raw per-level head outputs; NMS is `models.nms`,
named sizes and presets are `sizes.py`. No training (loss, assigner) here.
"""
from __future__ import annotations

import math
from typing import Mapping, NamedTuple

import torch
from torch import nn

from detdeploy.core.nms import NMSConfig

from ..anchors import AnchorGenerator
from ..base import Detector
from ..box_coders import delta2bbox
from ..fpn import FPN
from ..nms import DecodedOutputs, dense_outputs
from ..resnet import ResNet


class RawOutputs(NamedTuple):
    """Per-level head outputs: class logits [B, A * C, H, W] and deltas [B, A * 4, H, W]
    (A anchors per cell; channel a * C + c is anchor a's class c)."""
    cls_scores: tuple[torch.Tensor, ...]
    bbox_preds: tuple[torch.Tensor, ...]


class ConvReLU(nn.Module):
    """mmcv's ConvModule without norm: a biased 3x3 conv, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.conv(x))


class RetinaHead(nn.Module):
    """Class and box towers of `stacked_convs` conv+ReLU layers shared by all levels, then a 3x3
    predictor each: A * C logits and A * 4 deltas per cell."""

    def __init__(self, num_classes: int, in_channels: int = 256, feat_channels: int = 256,
                 stacked_convs: int = 4, num_anchors: int = 9):
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.cls_convs = nn.ModuleList(
            ConvReLU(in_channels if i == 0 else feat_channels, feat_channels)
            for i in range(stacked_convs))
        self.reg_convs = nn.ModuleList(
            ConvReLU(in_channels if i == 0 else feat_channels, feat_channels)
            for i in range(stacked_convs))
        self.retina_cls = nn.Conv2d(feat_channels, num_anchors * num_classes, 3, padding=1)
        self.retina_reg = nn.Conv2d(feat_channels, num_anchors * 4, 3, padding=1)

    def init_weights(self, prior_prob: float = 0.01) -> None:
        """MMDetection's RetinaHead initialisation: N(0, 0.01) convs, classifier bias so that
        initial scores equal `prior_prob`."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)
        nn.init.constant_(self.retina_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: tuple[torch.Tensor, ...]) -> RawOutputs:
        cls_scores, bbox_preds = [], []
        for x in feats:
            cls_feat, reg_feat = x, x
            for layer in self.cls_convs:
                cls_feat = layer(cls_feat)
            for layer in self.reg_convs:
                reg_feat = layer(reg_feat)
            cls_scores.append(self.retina_cls(cls_feat))
            bbox_preds.append(self.retina_reg(reg_feat))
        return RawOutputs(tuple(cls_scores), tuple(bbox_preds))


def decode_outputs(raw: RawOutputs, anchor_generator: AnchorGenerator,
                   clamp_hw: tuple[int, int]) -> DecodedOutputs:
    """Concatenate levels (cell-major, then anchor), apply sigmoid, decode the deltas at the
    anchors (mmdet's DeltaXYWHBBoxCoder, means 0, stds 1), clamp to `clamp_hw`."""
    batch = raw.cls_scores[0].shape[0]
    num_classes = raw.cls_scores[0].shape[1] // anchor_generator.num_base_anchors[0]
    scores = torch.cat([s.permute(0, 2, 3, 1).reshape(batch, -1, num_classes)
                        for s in raw.cls_scores], 1).sigmoid()
    deltas = torch.cat([b.permute(0, 2, 3, 1).reshape(batch, -1, 4) for b in raw.bbox_preds], 1)
    feature_sizes = [(s.shape[-2], s.shape[-1]) for s in raw.cls_scores]
    anchors = torch.cat(anchor_generator.grid_anchors(feature_sizes, deltas.device, deltas.dtype))
    boxes = delta2bbox(anchors[None], deltas, max_shape=clamp_hw)
    level_sizes = [h * w * count for (h, w), count in
                   zip(feature_sizes, anchor_generator.num_base_anchors)]
    return DecodedOutputs(boxes, scores, level_sizes)


class RetinaNet(Detector):
    """RetinaNet detector: `forward` gives raw head outputs, `postprocess` the detections."""

    family = 'retinanet'
    task = 'detect'
    num_classes_key = 'bbox_head.retina_cls.weight'

    def __init__(self, depth: int = 50, fpn_channels: int = 256, stacked_convs: int = 4,
                 strides: tuple[int, ...] = (8, 16, 32, 64, 128), octave_base_scale: int = 4,
                 scales_per_octave: int = 3, ratios: tuple[float, ...] = (0.5, 1.0, 2.0),
                 num_classes: int = 80):
        super().__init__()
        self.backbone = ResNet(depth)
        self.neck = FPN(list(self.backbone.out_channels), fpn_channels, num_outs=len(strides),
                        start_level=1, add_extra_convs='on_input')
        self.anchor_generator = AnchorGenerator(
            strides=list(strides), ratios=list(ratios), octave_base_scale=octave_base_scale,
            scales_per_octave=scales_per_octave)
        self.bbox_head = RetinaHead(num_classes, fpn_channels, fpn_channels, stacked_convs,
                                    self.anchor_generator.num_base_anchors[0])
        self.bbox_head.init_weights()
        self.strides = tuple(strides)

    @classmethod
    def num_classes_in(cls, state_dict: Mapping[str, torch.Tensor]) -> int | None:
        """retina_cls has A * C rows; A is retina_reg's rows / 4."""
        if cls.num_classes_key not in state_dict or 'bbox_head.retina_reg.weight' not in state_dict:
            return None
        num_anchors = state_dict['bbox_head.retina_reg.weight'].shape[0] // 4
        return state_dict[cls.num_classes_key].shape[0] // num_anchors

    @property
    def num_classes(self) -> int:
        return self.bbox_head.num_classes

    @property
    def size_divisor(self) -> int:
        # MMDetection pads to multiples of 32 (C5's stride); P6 and P7 come from stride-2
        # convs, whose grids (ceil of half) the anchors follow at any size
        return 32

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
        return dense_outputs(decode_outputs(raw, self.anchor_generator, input_hw), nms, nms_mode)

    def synthetic_head(self) -> tuple[list[nn.Conv2d], list[tuple[nn.Conv2d, str]], float]:
        head = self.bbox_head
        towers = [layer.conv for layer in (*head.cls_convs, *head.reg_convs)]
        # deltas are relative to anchors that already have an extent: no bias needed
        return towers, [(head.retina_cls, 'logits'), (head.retina_reg, 'box')], 0.0
