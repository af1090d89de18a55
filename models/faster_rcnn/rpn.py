"""Faster R-CNN's region proposal network: MMDetection's `RPNHead` (one 3x3 conv, objectness and
delta predictors per anchor) and its proposals, batched and traceable.

Proposals follow MMDetection's `RPNHead.predict_by_feat`: per level the best `pre_top_k` anchors,
delta decoding clamped to the input, boxes without area dropped, NMS per level, the best
`num_proposals`. Here each image gets exactly `num_proposals` rows (zero boxes pad the rest), so
a batch runs as one tensor with no cross-talk between images. Training targets are not here.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..anchors import AnchorGenerator
from ..box_coders import delta2bbox
from ..nms import _top_k_lower_index_first, batched_nms_op

ANY_SCORE = -0.5
"""Score threshold of the proposal NMS: every anchor with area competes (sigmoid scores are
>= 0, even where they underflow); anchors without area carry -1 and never do."""


class RPNOutputs(NamedTuple):
    """Per-level RPN maps: objectness logits [B, A, H, W], deltas [B, 4A, H, W]."""
    cls_scores: tuple[torch.Tensor, ...]
    bbox_preds: tuple[torch.Tensor, ...]


class RPNHead(nn.Module):
    """MMDetection's `RPNHead` with `num_convs=1` and a sigmoid objectness per anchor."""

    def __init__(self, in_channels: int = 256, feat_channels: int = 256,
                 num_anchors: int = 3):
        super().__init__()
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> RPNOutputs:
        cls_scores, bbox_preds = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            cls_scores.append(self.rpn_cls(x))
            bbox_preds.append(self.rpn_reg(x))
        return RPNOutputs(tuple(cls_scores), tuple(bbox_preds))


def propose(rpn: RPNOutputs, anchor_generator: AnchorGenerator, input_hw: tuple[int, int],
            pre_top_k: int, iou_thr: float, num_proposals: int) -> torch.Tensor:
    """RPN maps -> proposals [B, num_proposals, 4] xyxy px, best first; rows past an image's
    proposal count are zero boxes (no area, so never confused with a proposal)."""
    batch = rpn.cls_scores[0].shape[0]
    feature_sizes = [(s.shape[-2], s.shape[-1]) for s in rpn.cls_scores]
    anchors_per_level = anchor_generator.grid_anchors(feature_sizes, rpn.cls_scores[0].device,
                                                      rpn.cls_scores[0].dtype)
    level_boxes, level_scores, level_ids = [], [], []
    for level, (logits, deltas, anchors) in enumerate(
            zip(rpn.cls_scores, rpn.bbox_preds, anchors_per_level)):
        # (cell, anchor) order, as the anchors are laid out
        scores = logits.permute(0, 2, 3, 1).reshape(batch, -1).sigmoid()
        deltas = deltas.permute(0, 2, 3, 1).reshape(batch, -1, 4)
        k = min(pre_top_k, anchors.shape[0])
        top_scores, top_index = _top_k_lower_index_first(scores, k)
        top_deltas = torch.gather(deltas, 1, top_index[..., None].expand(-1, -1, 4))
        level_boxes.append(delta2bbox(anchors[top_index], top_deltas, max_shape=input_hw))
        level_scores.append(top_scores)
        level_ids.append(torch.full_like(top_index, level))
    boxes, scores = torch.cat(level_boxes, 1), torch.cat(level_scores, 1)
    has_area = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    scores = torch.where(has_area, scores, torch.full_like(scores, -1.0))
    # NMS within each level: the level id is the "class" of the per-class NMS
    _, proposals, _, _ = batched_nms_op(boxes, scores, torch.cat(level_ids, 1), ANY_SCORE,
                                        iou_thr, num_proposals)
    return proposals
