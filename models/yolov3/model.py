"""YOLOv3 in plain PyTorch: a MobileNetV2 backbone, YOLOV3Neck, YOLOV3Head, and its decoding and
post-processing (objectness filter, class scores times objectness) over the shared NMS ops.

Module and attribute names follow MMDetection 3.x, so its YOLOv3 checkpoints load with
`strict=True`. The forward pass returns the raw per-level prediction maps; named sizes and
presets are `sizes.py`.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from detdeploy.core.nms import NMSConfig
from detdeploy.core.tasks import NMS_MODES

from ..base import Detector
from ..conv_modules import ConvModuleWithActivation
from ..mobilenet_v2 import MobileNetV2
from ..nms import (DecodedOutputs, batched_nms_op, dense_candidate_scores, efficient_nms_op,
                   select_candidates)
from .anchors import yolo_decode, yolo_level_anchors

LeakyReLU = partial(nn.LeakyReLU, negative_slope=0.1)     # the configs' act_cfg


class RawOutputs(NamedTuple):
    """Per-level prediction maps [B, A * (5 + C), H, W], coarsest level (stride 32) first; per
    anchor: centre x, y (logits), log w, h ratios, objectness logit, class logits."""
    pred_maps: tuple[torch.Tensor, ...]


class YOLODecoded(NamedTuple):
    """Per-anchor outputs of all levels: boxes [B, N, 4] xyxy px (not clamped), class scores
    after sigmoid [B, N, C], objectness after sigmoid [B, N]."""
    boxes: torch.Tensor
    cls_scores: torch.Tensor
    objectness: torch.Tensor


class DetectionBlock(nn.Module):
    """Five ConvModules: 1x1 to n, 3x3 to 2n, 1x1 to n, 3x3 to 2n, 1x1 to n channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        widths = (in_channels, out_channels, 2 * out_channels, out_channels, 2 * out_channels,
                  out_channels)
        for index in range(5):
            kernel = 3 if index % 2 else 1
            self.add_module(f'conv{index + 1}', ConvModuleWithActivation(
                widths[index], widths[index + 1], kernel, padding=kernel // 2,
                activation=LeakyReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(5):
            x = getattr(self, f'conv{index + 1}')(x)
        return x


class YOLOV3Neck(nn.Module):
    """A small FPN: a DetectionBlock on the coarsest input, then per finer level a 1x1 conv,
    2x nearest upsampling, concatenation with that level and a DetectionBlock. Takes inputs
    fine to coarse, returns them coarse to fine."""

    def __init__(self, in_channels: tuple[int, ...], out_channels: tuple[int, ...]):
        super().__init__()
        self.num_scales = len(in_channels)
        self.detect1 = DetectionBlock(in_channels[0], out_channels[0])
        for index in range(1, self.num_scales):
            self.add_module(f'conv{index}', ConvModuleWithActivation(
                out_channels[index - 1], out_channels[index], 1, activation=LeakyReLU()))
            self.add_module(f'detect{index + 1}', DetectionBlock(
                in_channels[index] + out_channels[index], out_channels[index]))

    def forward(self, feats: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out = self.detect1(feats[-1])
        outs = [out]
        for index, finer in enumerate(reversed(feats[:-1])):
            lateral = F.interpolate(getattr(self, f'conv{index + 1}')(out), scale_factor=2)
            out = getattr(self, f'detect{index + 2}')(torch.cat((lateral, finer), 1))
            outs.append(out)
        return tuple(outs)


class YOLOV3Head(nn.Module):
    """Per level a 3x3 ConvModule bridge and a 1x1 prediction conv to A * (5 + C) channels."""

    def __init__(self, num_classes: int, in_channels: tuple[int, ...],
                 out_channels: tuple[int, ...], num_anchors: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.convs_bridge = nn.ModuleList(
            ConvModuleWithActivation(cin, cout, 3, padding=1, activation=LeakyReLU())
            for cin, cout in zip(in_channels, out_channels))
        self.convs_pred = nn.ModuleList(
            nn.Conv2d(cout, num_anchors * (5 + num_classes), 1) for cout in out_channels)

    @property
    def num_attrib(self) -> int:
        return 5 + self.num_classes

    def init_weights(self, strides: tuple[int, ...]) -> None:
        """MMDetection's: N(0, 0.01) convs, BN at 1, objectness bias for 8 objects per 608 px
        image, class biases for a prior of 0.01."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            for conv, stride in zip(self.convs_pred, strides):
                bias = conv.bias.view(self.num_anchors, -1)
                bias[:, 4] = _bias_for_prior(8 / (608 / stride) ** 2)
                bias[:, 5:] = _bias_for_prior(0.01)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> RawOutputs:
        return RawOutputs(tuple(pred(bridge(x)) for x, bridge, pred
                                in zip(feats, self.convs_bridge, self.convs_pred)))


def _bias_for_prior(prior_prob: float) -> float:
    return -math.log((1 - prior_prob) / prior_prob)


def decode_outputs(raw: RawOutputs, strides: tuple[int, ...],
                   base_sizes: tuple[tuple[tuple[int, int], ...], ...], num_classes: int
                   ) -> YOLODecoded:
    """Per level: sigmoid the centre offsets, decode at the level's anchors; then concatenate
    levels (coarsest first, as MMDetection's `YOLOV3Head.predict_by_feat`)."""
    boxes, cls_scores, objectness = [], [], []
    for pred_map, stride, sizes in zip(raw.pred_maps, strides, base_sizes):
        batch, _, height, width = pred_map.shape
        pred = pred_map.permute(0, 2, 3, 1).reshape(batch, -1, 5 + num_classes)
        anchors = yolo_level_anchors((height, width), stride, sizes, pred.device, pred.dtype)
        boxes.append(yolo_decode(anchors[None], pred[..., :2].sigmoid(), pred[..., 2:4], stride))
        objectness.append(pred[..., 4].sigmoid())
        cls_scores.append(pred[..., 5:].sigmoid())
    return YOLODecoded(torch.cat(boxes, 1), torch.cat(cls_scores, 1), torch.cat(objectness, 1))


def yolo_outputs(decoded: YOLODecoded, nms: NMSConfig, nms_mode: str) -> tuple[torch.Tensor, ...]:
    """Decoded outputs -> the `detect` task's outputs for `nms_mode`, as MMDetection's
    `YOLOV3Head.predict_by_feat`: anchors with objectness below `nms.objectness_thr` are dropped;
    of the rest, the best `pre_top_k` (anchor, class) pairs over all levels with class score
    above `score_thr`; their score becomes class score x objectness; per-class NMS on that score
    (no further threshold); the best `max_det`. `none` gives every anchor's boxes and class
    score x objectness."""
    if nms_mode not in NMS_MODES:
        raise ValueError(f'nms_mode must be one of {NMS_MODES}')
    boxes, cls_scores, objectness = decoded
    if nms_mode == 'none':
        return boxes, cls_scores * objectness[..., None]
    kept = (objectness >= nms.objectness_thr)[..., None]
    ranked = torch.where(kept, cls_scores, torch.full_like(cls_scores, -1.0))
    num_anchors, num_classes = cls_scores.shape[1], cls_scores.shape[2]
    candidates = select_candidates(DecodedOutputs(boxes, ranked, [num_anchors]), nms.score_thr,
                                   nms.pre_top_k)
    candidate_objectness = torch.gather(objectness, 1, candidates.pair_index // num_classes)
    # Valid candidates score above score_thr >= 0; the others are -1 and stay out of NMS.
    scores = torch.where(candidates.scores > 0, candidates.scores * candidate_objectness,
                         torch.full_like(candidates.scores, -1.0))
    if nms_mode == 'onnx':
        return tuple(batched_nms_op(candidates.boxes, scores, candidates.labels, 0.0,
                                    nms.iou_thr, nms.max_det, nms.class_agnostic))
    dense_scores = dense_candidate_scores(candidates._replace(scores=scores), num_anchors,
                                          num_classes)
    return tuple(efficient_nms_op(boxes, dense_scores, 0.0, nms.iou_thr, nms.max_det,
                                  nms.class_agnostic))


class YOLOV3(Detector):
    """YOLOv3 with a MobileNetV2 backbone: `forward` gives raw prediction maps, `postprocess`
    the detections (boxes not clamped to the input, as MMDetection's YOLOv3)."""

    family = 'yolov3'
    task = 'detect'
    num_classes_key = 'bbox_head.convs_pred.0.weight'

    def __init__(self, base_sizes: tuple[tuple[tuple[int, int], ...], ...],
                 strides: tuple[int, ...] = (32, 16, 8),
                 backbone_out_indices: tuple[int, ...] = (2, 4, 6),
                 neck_in_channels: tuple[int, ...] = (320, 96, 32),
                 neck_out_channels: tuple[int, ...] = (96, 96, 96),
                 head_channels: tuple[int, ...] = (96, 96, 96), num_classes: int = 80):
        super().__init__()
        self.strides = tuple(strides)
        self.base_sizes = tuple(tuple(tuple(size) for size in level) for level in base_sizes)
        self.backbone = MobileNetV2(out_indices=backbone_out_indices, activation=LeakyReLU)
        self.neck = YOLOV3Neck(neck_in_channels, neck_out_channels)
        self.bbox_head = YOLOV3Head(num_classes, neck_out_channels, head_channels,
                                    num_anchors=len(self.base_sizes[0]))
        self.bbox_head.init_weights(self.strides)

    @classmethod
    def num_classes_in(cls, state_dict: Mapping[str, torch.Tensor]) -> int | None:
        """The prediction conv has A * (5 + C) rows."""
        weight = state_dict.get(cls.num_classes_key)
        if weight is None:
            return None
        per_anchor, remainder = divmod(weight.shape[0], 3)
        return per_anchor - 5 if remainder == 0 and per_anchor > 5 else None

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
        return tuple(f'pred_maps.{level}' for level in range(len(self.strides)))

    def raw_tensors(self, raw: RawOutputs) -> tuple[torch.Tensor, ...]:
        return tuple(raw.pred_maps)

    def decode(self, raw: RawOutputs) -> YOLODecoded:
        return decode_outputs(raw, self.strides, self.base_sizes, self.num_classes)

    def postprocess(self, raw: RawOutputs, input_hw: tuple[int, int], nms: NMSConfig,
                    nms_mode: str) -> tuple[torch.Tensor, ...]:
        return yolo_outputs(self.decode(raw), nms, nms_mode)

    def synthetic_head(self) -> tuple[list[nn.Conv2d], list[tuple[nn.Conv2d, str]], float]:
        head = self.bbox_head
        return ([bridge.conv for bridge in head.convs_bridge],
                [(conv, 'logits') for conv in head.convs_pred], 0.0)

    def adjust_synthetic_weights(self, generator: torch.Generator) -> None:
        """After `randomize_detector` scaled the prediction convs as logits: box terms near the
        anchors (centre offsets and log sizes with small weights and zero bias), so boxes
        overlap, and objectness mostly 0.05-0.5 with a few anchors below the eval preset's
        threshold of 0.005, so that the objectness filter has something to drop."""
        with torch.no_grad():
            for conv in self.bbox_head.convs_pred:
                weight = conv.weight.view(self.bbox_head.num_anchors, -1, conv.in_channels)
                bias = conv.bias.view(self.bbox_head.num_anchors, -1)
                weight[:, :4] *= 0.3
                bias[:, :4] = 0.0
                bias[:, 4] = torch.randn(bias.shape[0], generator=generator) - 2.0
