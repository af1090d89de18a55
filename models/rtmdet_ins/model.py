"""RTMDet-Ins in plain PyTorch: RTMDet's CSPNeXt backbone and PAFPN neck, MMDetection's
RTMDetInsSepBNHead (a kernel branch beside the class and box branches, and a mask prototype
module), and its post-processing: RTMDet's decode and NMS, then each kept detection's dynamic
convolutions on the prototypes, in the graph.

Module and attribute names follow MMDetection 3.3.0, so its RTMDet-Ins checkpoints load with
`strict=True`. The forward pass returns the raw head outputs in MMDetection's structure; named
sizes and presets are `sizes.py`. Training is not here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from detdeploy.core.errors import DetdeployError
from detdeploy.core.masks import MaskConfig
from detdeploy.core.nms import NMSConfig

from ..base import Detector
from ..conv_modules import ConvModule
from ..nms import batched_nms_index_op, select_candidates
from ..priors import grid_priors
from ..rtmdet.model import CSPNeXt, CSPNeXtPAFPN, RTMDetSepBNHead, decode_outputs

NUM_PROTOTYPES = 8
DYCONV_CHANNELS = 8
NUM_DYCONVS = 3
COORD_SCALE = 8
"""MMDetection divides the relative coordinates by the detection's prior stride times 8."""


class RawOutputs(NamedTuple):
    """MMDetection's head outputs: per level class logits [B, C, H, W], box distances
    [B, 4, H, W] (px) and dynamic-conv parameters [B, G, H, W]; mask prototypes
    [B, 8, H0, W0] at the first level's stride (8)."""
    cls_scores: tuple[torch.Tensor, ...]
    bbox_preds: tuple[torch.Tensor, ...]
    kernel_preds: tuple[torch.Tensor, ...]
    mask_feat: torch.Tensor


def dynamic_conv_sizes(num_prototypes: int = NUM_PROTOTYPES,
                       channels: int = DYCONV_CHANNELS,
                       layers: int = NUM_DYCONVS) -> tuple[list[int], list[int]]:
    """Weight and bias counts of each dynamic 1x1 conv layer, as MMDetection lays out the
    kernel predictor's channels: the weights of every layer first, then the biases. The first
    layer sees the prototypes and the two relative coordinates, the last has one output."""
    weights, biases = [], []
    for i in range(layers):
        inputs = num_prototypes + 2 if i == 0 else channels
        outputs = 1 if i == layers - 1 else channels
        weights.append(inputs * outputs)
        biases.append(outputs)
    return weights, biases


class MaskFeatModule(nn.Module):
    """Mask prototypes: the levels resized (bilinear) to the first's size and concatenated, a
    1x1 fusion conv, stacked 3x3 ConvModules, a 1x1 projection to `num_prototypes` channels."""

    def __init__(self, in_channels: int, feat_channels: int, stacked_convs: int = 4,
                 num_levels: int = 3, num_prototypes: int = NUM_PROTOTYPES):
        super().__init__()
        self.num_levels = num_levels
        self.fusion_conv = nn.Conv2d(num_levels * in_channels, in_channels, 1)
        self.stacked_convs = nn.Sequential(*(
            ConvModule(in_channels if i == 0 else feat_channels, feat_channels, 3, 1, 1)
            for i in range(stacked_convs)))
        self.projection = nn.Conv2d(feat_channels, num_prototypes, 1)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        fused = [feats[0], *(F.interpolate(feats[i], size=size, mode='bilinear')
                             for i in range(1, self.num_levels))]
        return self.projection(self.stacked_convs(self.fusion_conv(torch.cat(fused, 1))))


class RTMDetInsSepBNHead(RTMDetSepBNHead):
    """RTMDet's separated-BN head with MMDetection's instance branches: `kernel_convs` and
    `rtm_kernel` predict each anchor's dynamic-conv parameters, `mask_head` the prototypes.

    As in MMDetection, `reg_convs` is the same module list as `cls_convs` (the checkpoint
    stores it under both names), and box distances are ReLU(rtm_reg) * stride.
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int,
                 stacked_convs: int = 2, strides: tuple[int, ...] = (8, 16, 32),
                 share_conv: bool = True, pred_kernel_size: int = 1,
                 num_prototypes: int = NUM_PROTOTYPES, dyconv_channels: int = DYCONV_CHANNELS,
                 num_dyconvs: int = NUM_DYCONVS):
        super().__init__(num_classes, in_channels, feat_channels, stacked_convs, strides,
                         exp_on_reg=False, share_conv=share_conv,
                         pred_kernel_size=pred_kernel_size)
        self.reg_convs = self.cls_convs
        self.weight_nums, self.bias_nums = dynamic_conv_sizes(num_prototypes, dyconv_channels,
                                                              num_dyconvs)
        self.dyconv_channels = dyconv_channels
        num_params = sum(self.weight_nums) + sum(self.bias_nums)
        self.kernel_convs = nn.ModuleList(
            nn.ModuleList(ConvModule(in_channels if i == 0 else feat_channels, feat_channels,
                                     3, 1, 1) for i in range(stacked_convs))
            for _ in strides)
        self.rtm_kernel = nn.ModuleList(
            nn.Conv2d(feat_channels, num_params, pred_kernel_size,
                      padding=pred_kernel_size // 2) for _ in strides)
        self.mask_head = MaskFeatModule(in_channels, feat_channels, 4, len(strides),
                                        num_prototypes)

    def init_weights(self, prior_prob: float = 0.01) -> None:
        """MMDetection's: every conv N(0, 0.01) (kernel branch and prototypes included), BN at
        1/0, class biases at `prior_prob`, box biases 1."""
        super().init_weights(prior_prob)
        for rtm_reg in self.rtm_reg:
            nn.init.constant_(rtm_reg.bias, 1.0)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> RawOutputs:
        mask_feat = self.mask_head(feats)
        cls_scores, bbox_preds, kernel_preds = [], [], []
        for level, (x, stride) in enumerate(zip(feats, self.strides)):
            cls_feat, kernel_feat = x, x
            for layer in self.cls_convs[level]:
                cls_feat = layer(cls_feat)
            for layer in self.kernel_convs[level]:
                kernel_feat = layer(kernel_feat)
            # reg_convs are cls_convs: the box branch sees the class tower's features
            cls_scores.append(self.rtm_cls[level](cls_feat))
            kernel_preds.append(self.rtm_kernel[level](kernel_feat))
            bbox_preds.append(F.relu(self.rtm_reg[level](cls_feat)) * stride)
        return RawOutputs(tuple(cls_scores), tuple(bbox_preds), tuple(kernel_preds), mask_feat)


def dynamic_mask_logits(mask_feat: torch.Tensor, kernels: torch.Tensor, points: torch.Tensor,
                        prior_strides: torch.Tensor, mask_stride: int,
                        weight_nums: list[int], bias_nums: list[int]) -> torch.Tensor:
    """MMDetection's `_mask_predict_by_feat_single`, batched: prototypes [B, P, h, w], each
    detection's kernel parameters [B, K, G], its prior point [B, K, 2] (x, y px) and prior
    stride [B, K] -> mask logits [B, K, h, w].

    The first layer's input is the detection's relative coordinates (prior point minus each
    mask pixel's point at `mask_stride`, over prior stride * 8; x then y) followed by the
    prototypes; 1x1 convs with ReLU between them. Per detection, as MMDetection's grouped
    conv, written as matrix products so that it batches and exports.
    """
    batch, num_prototypes, height, width = mask_feat.shape
    num_dets = kernels.shape[1]
    coords = grid_priors([(height, width)], (mask_stride,), mask_feat.device, mask_feat.dtype)
    relative = (points[:, :, None, :] - coords) / (prior_strides[:, :, None, None] * COORD_SCALE)
    relative = relative.transpose(2, 3)                                   # [B, K, 2, h*w]
    prototypes = mask_feat.reshape(batch, 1, num_prototypes, height * width)
    splits = torch.split(kernels, weight_nums + bias_nums, dim=2)
    weights, biases = splits[:len(weight_nums)], splits[len(weight_nums):]
    x = None
    for layer, (weight, bias) in enumerate(zip(weights, biases)):
        outputs = bias.shape[-1]
        weight = weight.reshape(batch, num_dets, outputs, -1)
        if layer == 0:
            x = weight[..., :2] @ relative + weight[..., 2:] @ prototypes
        else:
            x = weight @ x
        x = x + bias[..., None]
        if layer < len(weights) - 1:
            x = x.relu()
    return x.reshape(batch, num_dets, height, width)


class RTMDetIns(Detector):
    """RTMDet-Ins: `forward` gives the raw head outputs, `postprocess` the detections with
    their mask probabilities at the prototypes' stride."""

    family = 'rtmdet_ins'
    task = 'instance'
    num_classes_key = 'bbox_head.rtm_cls.0.weight'

    def __init__(self, deepen_factor: float, widen_factor: float, neck_channels: tuple[int, ...],
                 out_channels: int, num_csp_blocks: int, num_classes: int = 80):
        super().__init__()
        self.backbone = CSPNeXt(deepen_factor, widen_factor)
        self.neck = CSPNeXtPAFPN(neck_channels, out_channels, num_csp_blocks)
        self.bbox_head = RTMDetInsSepBNHead(num_classes, out_channels, out_channels)
        self.bbox_head.init_weights()
        self.strides: tuple[int, ...] = self.bbox_head.strides

    @property
    def num_classes(self) -> int:
        return self.bbox_head.num_classes

    @property
    def size_divisor(self) -> int:
        return max(self.strides)

    @property
    def mask_stride(self) -> int:
        """Input pixels per mask pixel: the prototypes are at the first level's stride."""
        return self.strides[0]

    @property
    def mask_config(self) -> MaskConfig:
        """Masks cover the padded input at stride 8 (the mask prototypes' stride, P3's), as
        [B, K, H/8, W/8] probabilities; foreground where > 0.5 after resampling (MMDetection's
        `mask_thr_binary`)."""
        return MaskConfig('input', stride=self.mask_stride, threshold=0.5)

    def forward(self, images: torch.Tensor) -> RawOutputs:
        return self.bbox_head(self.neck(self.backbone(images)))

    @property
    def raw_output_names(self) -> tuple[str, ...]:
        levels = range(len(self.strides))
        return (*(f'{kind}.{level}' for kind in RawOutputs._fields[:3] for level in levels),
                'mask_feat')

    def raw_tensors(self, raw: RawOutputs) -> tuple[torch.Tensor, ...]:
        return (*raw.cls_scores, *raw.bbox_preds, *raw.kernel_preds, raw.mask_feat)

    def postprocess(self, raw: RawOutputs, input_hw: tuple[int, int], nms: NMSConfig,
                    nms_mode: str) -> tuple[torch.Tensor, ...]:
        """The `instance` outputs (num_dets, boxes, scores, labels, masks), as MMDetection's
        `predict_by_feat` without rescaling: masks [B, K, H/8, W/8] are the sigmoid of
        `detections_and_mask_logits`' logits, 0 on padding rows. Only the `onnx` NMS mode: the
        others cannot pick the kept detections' kernels."""
        self.check_nms_mode(nms_mode)
        num_dets, boxes, scores, labels, logits = self.detections_and_mask_logits(
            raw, input_hw, nms)
        rows = torch.arange(nms.max_det, device=num_dets.device)[None]
        is_detection = (rows < num_dets).to(logits.dtype)                            # [B, K]
        masks = logits.sigmoid() * is_detection[:, :, None, None]
        return num_dets, boxes, scores, labels, masks

    def detections_and_mask_logits(self, raw: RawOutputs, input_hw: tuple[int, int],
                                   nms: NMSConfig) -> tuple[torch.Tensor, ...]:
        """RTMDet's candidates and NMS (the `onnx` mode's four outputs), then each kept
        detection's dynamic convs on the prototypes: mask logits [B, K, H/8, W/8] (padding
        rows: some candidate's logits). MMDetection resamples these logits, not
        probabilities, to the image."""
        decoded = decode_outputs(raw, self.strides, input_hw)
        candidates = select_candidates(decoded, nms.score_thr, nms.pre_top_k)
        num_dets, boxes, scores, labels, kept = batched_nms_index_op(
            candidates.boxes, candidates.scores, candidates.labels, nms.score_thr, nms.iou_thr,
            nms.max_det, nms.class_agnostic)
        anchors = torch.gather(candidates.pair_index, 1, kept) // self.num_classes   # [B, K]
        batch = anchors.shape[0]
        kernels = torch.cat([k.permute(0, 2, 3, 1).reshape(batch, -1, k.shape[1])
                             for k in raw.kernel_preds], 1)
        kernels = torch.gather(kernels, 1, anchors[..., None].expand(-1, -1, kernels.shape[2]))
        feature_sizes = [(s.shape[-2], s.shape[-1]) for s in raw.cls_scores]
        points = grid_priors(feature_sizes, self.strides, kernels.device, kernels.dtype)
        prior_strides = torch.cat([points.new_full((h * w,), float(stride))
                                   for (h, w), stride in zip(feature_sizes, self.strides)])
        logits = dynamic_mask_logits(raw.mask_feat, kernels, points[anchors],
                                     prior_strides[anchors], self.mask_stride,
                                     self.bbox_head.weight_nums, self.bbox_head.bias_nums)
        return num_dets, boxes, scores, labels, logits

    def check_nms_mode(self, nms_mode: str) -> None:
        check_nms_mode(nms_mode)

    def synthetic_head(self) -> tuple[list[nn.Conv2d], list[tuple[nn.Conv2d, str]], float]:
        head = self.bbox_head
        towers = [layer.conv for tower in (*head.cls_convs, *head.kernel_convs)
                  for layer in tower]
        towers += [head.mask_head.fusion_conv,
                   *(layer.conv for layer in head.mask_head.stacked_convs)]
        predictors = ([(conv, 'logits') for conv in head.rtm_cls]
                      + [(conv, 'box') for conv in head.rtm_reg]
                      + [(conv, 'kernel') for conv in head.rtm_kernel]
                      + [(head.mask_head.projection, 'kernel')])
        return towers, predictors, 2.0

    def adjust_synthetic_weights(self, generator: torch.Generator) -> None:
        """Masks with edges, not probabilities all near 0.5 nor masks all 0 or all 1
        (`randomize_detector` scales predictors other than logits to a spread of 0.2): the
        kernel predictor to a spread of 0.6, its rows that give the dynamic convs' biases to
        0.06, so that a mask's shape comes from the prototypes (spread 1) and the relative
        coordinates. Larger kernels make logits of hundreds, whose float32 rounding in another
        runtime moves the probabilities by more than 1e-4."""
        head = self.bbox_head
        first_bias = sum(head.weight_nums)
        for conv in head.rtm_kernel:
            conv.weight.mul_(3.0)
            conv.weight[first_bias:].mul_(0.1)
        head.mask_head.projection.weight.mul_(5.0)


def check_nms_mode(nms_mode: str) -> None:
    """RTMDet-Ins needs each kept detection's candidate index to pick its mask kernel: only
    the `onnx` mode's NonMaxSuppression graph gives it (TensorRT 10 parses that graph too)."""
    if nms_mode == 'trt':
        raise DetdeployError('--nms trt is not available for RTMDet-Ins: EfficientNMS_TRT '
                             "does not say which candidates it kept, so the masks' kernels "
                             'cannot be picked; use --nms onnx (TensorRT 10 parses its '
                             'NonMaxSuppression)')
    if nms_mode != 'onnx':
        raise DetdeployError(f'--nms {nms_mode} is not available for instance models: use '
                             '--nms onnx')
