"""From raw dense-head outputs to detections, in PyTorch: priors, box decoding, filtering, NMS.

Follows MMDetection's RTMDet test-time post-processing (`_predict_by_feat_single` and
`_bbox_post_process`), except that boxes stay in network-input pixels: rescaling to the original
image is the host's job (`detdeploy.runtimes`), so every backend shares it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torchvision


class RawOutputs(NamedTuple):
    """Per-level head outputs: class logits [B, C, H, W] and box distances [B, 4, H, W] (px)."""
    cls_scores: tuple[torch.Tensor, ...]
    bbox_preds: tuple[torch.Tensor, ...]


class Detections(NamedTuple):
    """One image's detections, best first: boxes [K, 4] xyxy px, scores [K], labels [K] int64."""
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class NMSConfig:
    """Post-processing settings; the defaults are MMDetection RTMDet's test config.

    `nms_pre` keeps the best (anchor, class) pairs above `score_thr` per pyramid level.
    """
    score_thr: float = 0.001
    nms_pre: int = 30000
    iou_thr: float = 0.65
    max_per_img: int = 300


def grid_priors(feature_sizes: list[tuple[int, int]], strides: tuple[int, ...],
                device: torch.device | None = None, dtype: torch.dtype = torch.float32
                ) -> torch.Tensor:
    """Anchor points (x, y) of every level, row-major within a level, offset 0: [sum(H*W), 2]."""
    points = []
    for (height, width), stride in zip(feature_sizes, strides):
        shift_x = torch.arange(width, device=device, dtype=dtype) * stride
        shift_y = torch.arange(height, device=device, dtype=dtype) * stride
        yy, xx = torch.meshgrid(shift_y, shift_x, indexing='ij')
        points.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=-1))
    return torch.cat(points)


def distance2bbox(points: torch.Tensor, distances: torch.Tensor,
                  max_shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode (left, top, right, bottom) distances from points to xyxy boxes.

    With `max_shape` (height, width), x is clamped to [0, width] and y to [0, height].
    """
    x1 = points[..., 0] - distances[..., 0]
    y1 = points[..., 1] - distances[..., 1]
    x2 = points[..., 0] + distances[..., 2]
    y2 = points[..., 1] + distances[..., 3]
    if max_shape is not None:
        height, width = max_shape
        x1, x2 = x1.clamp(0, width), x2.clamp(0, width)
        y1, y2 = y1.clamp(0, height), y2.clamp(0, height)
    return torch.stack([x1, y1, x2, y2], dim=-1)


def flatten_raw_outputs(raw: RawOutputs, strides: tuple[int, ...]):
    """Concatenate levels: logits [B, N, C], distances [B, N, 4], priors [N, 2], level sizes."""
    cls_flat = [s.permute(0, 2, 3, 1).reshape(s.shape[0], -1, s.shape[1]) for s in raw.cls_scores]
    box_flat = [b.permute(0, 2, 3, 1).reshape(b.shape[0], -1, 4) for b in raw.bbox_preds]
    feature_sizes = [tuple(s.shape[-2:]) for s in raw.cls_scores]
    priors = grid_priors(feature_sizes, strides, raw.cls_scores[0].device, raw.bbox_preds[0].dtype)
    level_sizes = [h * w for h, w in feature_sizes]
    return torch.cat(cls_flat, 1), torch.cat(box_flat, 1), priors, level_sizes


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_thr: float) -> torch.Tensor:
    """Per-class NMS; indices kept, by descending score.

    Separates classes by offsetting boxes by `label * (max_coordinate + 1)`, as mmcv's
    `batched_nms` does at any box count, so results match MMDetection bit for bit.
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_thr)


def select_candidates(scores: torch.Tensor, level_sizes: list[int], score_thr: float,
                      nms_pre: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per level: (anchor, class) pairs scoring above `score_thr`, best `nms_pre` of them.

    Returns anchor indices (into the concatenated levels), their scores and labels; one anchor
    can appear with several labels.
    """
    anchor_idx, cand_scores, cand_labels = [], [], []
    start = 0
    for size in level_sizes:
        level_scores = scores[start:start + size]
        valid = torch.nonzero(level_scores > score_thr)
        valid_scores = level_scores[valid[:, 0], valid[:, 1]]
        valid_scores, order = valid_scores.sort(descending=True)
        keep = order[:nms_pre]
        anchor_idx.append(valid[keep, 0] + start)
        cand_labels.append(valid[keep, 1])
        cand_scores.append(valid_scores[:nms_pre])
        start += size
    return torch.cat(anchor_idx), torch.cat(cand_scores), torch.cat(cand_labels)


def postprocess_image(scores: torch.Tensor, distances: torch.Tensor, priors: torch.Tensor,
                      level_sizes: list[int], clamp_shape: tuple[int, int],
                      cfg: NMSConfig) -> Detections:
    """One image: sigmoid scores [N, C], distances [N, 4] -> detections in input pixels."""
    anchor_idx, cand_scores, cand_labels = select_candidates(
        scores, level_sizes, cfg.score_thr, cfg.nms_pre)
    boxes = distance2bbox(priors[anchor_idx], distances[anchor_idx], clamp_shape)
    has_area = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, cand_scores, cand_labels = boxes[has_area], cand_scores[has_area], cand_labels[has_area]
    keep = batched_nms(boxes, cand_scores, cand_labels, cfg.iou_thr)[:cfg.max_per_img]
    return Detections(boxes[keep], cand_scores[keep], cand_labels[keep])
