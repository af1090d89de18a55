"""Faster R-CNN (ResNet-FPN) in plain PyTorch: backbone, FPN, RPN with its proposals, RoI head,
and the per-class decoding and NMS of MMDetection's `BBoxHead.predict_by_feat`.

Module names follow MMDetection 3.x, so its `faster-rcnn_r50/r101_fpn` checkpoints load with
`strict=True`. `forward` runs both stages (the RPN's proposal settings are constructor
arguments, MMDetection's test config by default); `postprocess` turns the RoI head's outputs
into the `detect` task's outputs. Training (assigners, samplers, losses) is not here.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
from torch import nn

from detdeploy.core.nms import NMSConfig
from detdeploy.core.tasks import NMS_MODES

from ..anchors import AnchorGenerator
from ..base import Detector, RawRowGroup
from ..box_coders import delta2bbox
from ..fpn import FPN
from ..nms import _top_k_lower_index_first, batched_nms_op, efficient_nms_op
from ..resnet import ResNet
from .roi_head import StandardRoIHead
from .rpn import RPNHead, propose

RPN_STRIDES = (4, 8, 16, 32, 64)
ROI_STRIDES = (4, 8, 16, 32)
BOX_STDS = (0.1, 0.1, 0.2, 0.2)
"""The R-CNN box coder's target stds (the RPN's are 1)."""
PROPOSAL_PAIRING_PX = 0.1
MIN_PAIRED_PROPOSALS = 0.95
"""Mask R-CNN's `paired_raw_outputs` (its mask rows): rows pair when their boxes agree within
0.1 px; below 95 % paired, they are compared unpaired (and fail). Faster R-CNN's own rows are
paired by `parity` (`raw_row_groups`)."""


class RawOutputs(NamedTuple):
    """Both stages' raw outputs. RPN per level: objectness logits [B, 3, H, W] and deltas
    [B, 12, H, W]. RoI head per proposal: proposals [B, P, 4] xyxy px (zero rows pad), class
    logits [B, P, C + 1] (background last), class-specific deltas [B, P, 4C]."""
    rpn_cls_scores: tuple[torch.Tensor, ...]
    rpn_bbox_preds: tuple[torch.Tensor, ...]
    proposals: torch.Tensor
    cls_scores: torch.Tensor
    bbox_preds: torch.Tensor


class DecodedRoIs(NamedTuple):
    """Per proposal and class: boxes [B, P, C, 4] xyxy px, softmax scores [B, P, C] (-1 on
    padding rows)."""
    boxes: torch.Tensor
    scores: torch.Tensor


def decode_rois(raw: RawOutputs, clamp_hw: tuple[int, int]) -> DecodedRoIs:
    """Softmax over classes and background, background dropped; each class's deltas applied to
    its proposal with stds (0.1, 0.1, 0.2, 0.2), clamped to `clamp_hw`."""
    batch, num_rois = raw.proposals.shape[0], raw.proposals.shape[1]
    scores = raw.cls_scores.softmax(-1)[..., :-1]
    deltas = raw.bbox_preds.reshape(batch, num_rois, -1, 4)
    boxes = delta2bbox(raw.proposals[:, :, None, :], deltas, stds=BOX_STDS, max_shape=clamp_hw)
    is_proposal = (raw.proposals[..., 2] > raw.proposals[..., 0]) & (
        raw.proposals[..., 3] > raw.proposals[..., 1])
    scores = torch.where(is_proposal[..., None], scores, torch.full_like(scores, -1.0))
    return DecodedRoIs(boxes, scores)


def best_pairs(decoded: DecodedRoIs, pre_top_k: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(proposal, class) pairs entering NMS: boxes [B, M, 4], scores [B, M], labels [B, M];
    all pairs (MMDetection's way) if `pre_top_k` covers them, else the best `pre_top_k`."""
    batch, num_rois, num_classes = decoded.scores.shape
    pair_scores = decoded.scores.reshape(batch, num_rois * num_classes)
    pair_boxes = decoded.boxes.reshape(batch, num_rois * num_classes, 4)
    if pre_top_k >= num_rois * num_classes:
        labels = torch.arange(num_classes, device=pair_scores.device).repeat(num_rois)
        return pair_boxes, pair_scores, labels[None].expand(batch, -1)
    pair_scores, pair_index = _top_k_lower_index_first(pair_scores, pre_top_k)
    pair_boxes = torch.gather(pair_boxes, 1, pair_index[..., None].expand(-1, -1, 4))
    return pair_boxes, pair_scores, pair_index % num_classes


class FasterRCNN(Detector):
    """Faster R-CNN with a ResNet-FPN backbone: `forward` gives both stages' raw outputs,
    `postprocess` the detections."""

    family = 'faster_rcnn'
    task = 'detect'
    num_classes_key = 'roi_head.bbox_head.fc_cls.weight'
    roi_head_class = StandardRoIHead     # Mask R-CNN's adds a mask branch

    def __init__(self, depth: int = 50, num_classes: int = 80, rpn_pre_top_k: int = 1000,
                 rpn_iou_thr: float = 0.7, num_proposals: int = 1000):
        super().__init__()
        self.backbone = ResNet(depth)
        self.neck = FPN(list(self.backbone.out_channels), 256, len(RPN_STRIDES))
        self.rpn_head = RPNHead(256, 256, num_anchors=3)
        self.roi_head = self.roi_head_class(num_classes, ROI_STRIDES)
        self.anchor_generator = AnchorGenerator(RPN_STRIDES, ratios=[0.5, 1.0, 2.0], scales=[8])
        self.rpn_pre_top_k = rpn_pre_top_k
        self.rpn_iou_thr = rpn_iou_thr
        self.num_proposals = num_proposals

    @classmethod
    def num_classes_in(cls, state_dict: Mapping[str, torch.Tensor]) -> int | None:
        key = cls.num_classes_key
        return state_dict[key].shape[0] - 1 if key in state_dict else None   # background row

    @property
    def num_classes(self) -> int:
        return self.roi_head.bbox_head.num_classes

    @property
    def size_divisor(self) -> int:
        return 32     # MMDetection pads to 32; P6 is a max-pool, which takes any size

    def forward(self, images: torch.Tensor) -> RawOutputs:
        return self.box_stages(self.neck(self.backbone(images)),
                               (images.shape[2], images.shape[3]))

    def box_stages(self, feats: tuple[torch.Tensor, ...], input_hw: tuple[int, int]
                   ) -> RawOutputs:
        """FPN features -> the RPN's and the box head's raw outputs (a subclass adding a
        branch on the same features, Mask R-CNN, calls this)."""
        rpn = self.rpn_head(feats)
        proposals = propose(rpn, self.anchor_generator, input_hw, self.rpn_pre_top_k,
                            self.rpn_iou_thr, self.num_proposals)
        cls_scores, bbox_preds = self.roi_head(feats, proposals)
        return RawOutputs(rpn.cls_scores, rpn.bbox_preds, proposals, cls_scores, bbox_preds)

    @property
    def raw_output_names(self) -> tuple[str, ...]:
        levels = range(len(RPN_STRIDES))
        return (*(f'rpn_cls_scores.{level}' for level in levels),
                *(f'rpn_bbox_preds.{level}' for level in levels),
                'proposals', 'cls_scores', 'bbox_preds')

    def raw_tensors(self, raw: RawOutputs) -> tuple[torch.Tensor, ...]:
        return (*raw.rpn_cls_scores, *raw.rpn_bbox_preds, raw.proposals, raw.cls_scores,
                raw.bbox_preds)

    @property
    def raw_row_groups(self) -> tuple[RawRowGroup, ...]:
        """The RoI head's rows follow the proposals, which come out of the RPN's NMS: float
        differences of ~1e-4 between runtimes reorder near-tied proposals or swap one for its
        neighbour (0.4 % of the rows on synthetic weights, up to 0.5 % on flat images), so
        `parity` pairs them by proposal box."""
        return (RawRowGroup('proposals', ('cls_scores', 'bbox_preds'), self.rpn_iou_thr,
                            self.num_proposals),)

    def postprocess(self, raw: RawOutputs, input_hw: tuple[int, int], nms: NMSConfig,
                    nms_mode: str) -> tuple[torch.Tensor, ...]:
        """`onnx`: per-class NMS of the (proposal, class) pairs above `score_thr`, the best
        `max_det`; `trt`: the same by EfficientNMS_TRT with class-specific boxes [B, P, C, 4];
        `none`: one row per (proposal, class) pair, boxes [B, P*C, 4] and scores [B, P*C, C]
        holding the pair's own class score (0 for the other classes and padding)."""
        if nms_mode not in NMS_MODES:
            raise ValueError(f'nms_mode must be one of {NMS_MODES}')
        decoded = decode_rois(raw, input_hw)
        if nms_mode == 'onnx':
            return batched_nms_op(*best_pairs(decoded, nms.pre_top_k), nms.score_thr,
                                  nms.iou_thr, nms.max_det, nms.class_agnostic)
        batch, num_rois, num_classes = decoded.scores.shape
        if nms_mode == 'trt':
            scores = decoded.scores
            if nms.pre_top_k < num_rois * num_classes:
                flat = scores.reshape(batch, -1)
                top_scores, top_index = _top_k_lower_index_first(flat, nms.pre_top_k)
                scores = torch.full_like(flat, -1.0).scatter(1, top_index, top_scores).reshape(
                    batch, num_rois, num_classes)
            return efficient_nms_op(decoded.boxes, scores, nms.score_thr, nms.iou_thr,
                                    nms.max_det, nms.class_agnostic)
        own_class = torch.eye(num_classes, dtype=torch.bool, device=decoded.scores.device)
        pair_scores = torch.where(own_class, decoded.scores[..., None],
                                  torch.zeros_like(decoded.scores[..., None]))
        return (decoded.boxes.reshape(batch, num_rois * num_classes, 4),
                pair_scores.clamp(min=0).reshape(batch, num_rois * num_classes, num_classes))

    def synthetic_head(self) -> tuple[list[nn.Module], list[tuple[nn.Module, str]], float]:
        bbox_head = self.roi_head.bbox_head
        towers = [self.rpn_head.rpn_conv, *bbox_head.shared_fcs]
        predictors = [(self.rpn_head.rpn_cls, 'logits'), (self.rpn_head.rpn_reg, 'box'),
                      (bbox_head.fc_cls, 'logits'), (bbox_head.fc_reg, 'box')]
        return towers, predictors, 0.0
