"""From raw dense-head outputs to detections, in PyTorch: priors, decoding, candidates, NMS.

Follows MMDetection's RTMDet test-time post-processing (`_predict_by_feat_single`,
`_bbox_post_process`), batched and traceable so that the exporter turns the same code into the
ONNX graph. NMS is the custom op `detdeploy::batched_nms`: this module holds its eager
implementation; `detdeploy.export` translates it to ONNX. Boxes stay in network-input pixels;
rescaling to the original image is the host's job (`detdeploy.runtimes`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torchvision


class RawOutputs(NamedTuple):
    """Per-level head outputs: class logits [B, C, H, W] and box distances [B, 4, H, W] (px)."""
    cls_scores: tuple[torch.Tensor, ...]
    bbox_preds: tuple[torch.Tensor, ...]


class DecodedOutputs(NamedTuple):
    """Per-anchor outputs of all levels: boxes [B, N, 4] xyxy px, sigmoid scores [B, N, C]."""
    boxes: torch.Tensor
    scores: torch.Tensor
    level_sizes: list[int]


class DetectionOutputs(NamedTuple):
    """The four NMS outputs, padded to K = max_det rows per image; rows past num_dets hold
    zero boxes and scores and label -1."""
    num_dets: torch.Tensor     # [B, 1] int32
    boxes: torch.Tensor        # [B, K, 4] float32, xyxy in network-input pixels
    scores: torch.Tensor       # [B, K] float32
    labels: torch.Tensor       # [B, K] int32


class Detections(NamedTuple):
    """One image's detections, best first: boxes [K, 4] xyxy px, scores [K], labels [K]."""
    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class NMSConfig:
    """Post-processing settings.

    `pre_top_k` keeps the best (anchor, class) pairs per pyramid level, `score_thr` those
    scoring strictly above it; per-class NMS at `iou_thr`; at most `max_det` per image.
    """
    score_thr: float = 0.001
    pre_top_k: int = 30000
    iou_thr: float = 0.65
    max_det: int = 300

    def to_dict(self) -> dict:
        return asdict(self)


EVAL_NMS = NMSConfig(score_thr=0.001, pre_top_k=30000, iou_thr=0.65, max_det=300)
"""MMDetection RTMDet's test config: what its published mAP is measured with."""
DEPLOY_NMS = NMSConfig(score_thr=0.05, pre_top_k=1000, iou_thr=0.65, max_det=100)
"""Deployment defaults: fewer, surer candidates and a smaller output."""


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


def decode_boxes(distances: torch.Tensor, feature_sizes: list[tuple[int, int]],
                 strides: tuple[int, ...], clamp_hw: tuple[int, int]) -> torch.Tensor:
    """Per-anchor distances [B, N, 4] of all levels -> xyxy boxes [B, N, 4] clamped to
    `clamp_hw`. A NaN distance gives a NaN coordinate (clamping keeps NaN, in PyTorch and in
    ONNX `Clip`); +-inf ones are clamped to the edges."""
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


def _top_k_lower_index_first(values: torch.Tensor, k) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k along the last axis; equal values in ascending index order.

    That is ONNX TopK's rule, so exporting uses topk; eager PyTorch's topk leaves the order of
    ties open, so eager code takes a stable sort instead.
    """
    if torch.compiler.is_exporting():
        return values.topk(k, dim=-1)
    sorted_values, order = values.sort(dim=-1, descending=True, stable=True)
    return sorted_values[..., :k], order[..., :k]


class Candidates(NamedTuple):
    """(anchor, class) pairs entering NMS, [B, M] each; invalid ones have score -1."""
    boxes: torch.Tensor        # [B, M, 4]
    scores: torch.Tensor       # [B, M]
    labels: torch.Tensor       # [B, M] int64
    pair_index: torch.Tensor   # [B, M] index into the flattened [N * C] scores


def select_candidates(decoded: DecodedOutputs, score_thr: float, pre_top_k: int) -> Candidates:
    """Per level, the best `pre_top_k` (anchor, class) pairs; one anchor can carry several
    labels. Pairs scoring at most `score_thr`, or whose box has no area, get score -1.

    A NaN score is -1 before ranking: it is never selected and takes a level's pre-top-k slot
    only when fewer real scores are left (sorting would rank NaN first in PyTorch, but ONNX
    Runtime's TopK skips it). A box with a NaN coordinate has no area, so is never selected.
    """
    boxes, scores, level_sizes = decoded
    batch, _, num_classes = scores.shape
    scores = torch.where(scores.isnan(), torch.full_like(scores, -1.0), scores)
    picked_scores, picked_pairs = [], []
    start = 0
    for size in level_sizes:
        level_scores = scores[:, start:start + size].reshape(batch, -1)
        k = min(pre_top_k, size * num_classes)
        top_scores, top_pairs = _top_k_lower_index_first(level_scores, k)
        picked_scores.append(top_scores)
        picked_pairs.append(top_pairs + start * num_classes)
        start = start + size
    cand_scores, pair_index = torch.cat(picked_scores, 1), torch.cat(picked_pairs, 1)
    anchors, labels = pair_index // num_classes, pair_index % num_classes
    cand_boxes = torch.gather(boxes, 1, anchors[..., None].expand(-1, -1, 4))
    has_area = (cand_boxes[..., 2] > cand_boxes[..., 0]) & (cand_boxes[..., 3] > cand_boxes[..., 1])
    valid = (cand_scores > score_thr) & has_area
    cand_scores = torch.where(valid, cand_scores, torch.full_like(cand_scores, -1.0))
    return Candidates(cand_boxes, cand_scores, labels, pair_index)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_thr: float) -> torch.Tensor:
    """Per-class NMS over one image's boxes; indices kept, by descending score.

    Separates classes by offsetting boxes by `label * (max_coordinate + 1)`, as mmcv's
    `batched_nms` does at any box count, so results match MMDetection bit for bit. A box is
    suppressed when its float32 IoU exceeds `iou_thr` rounded to float32, as in mmcv's kernel
    and ONNX's NonMaxSuppression (torchvision would compare with the float64 value: at 0.6,
    which rounds up in float32, an IoU of exactly float32(0.6) would be suppressed).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    iou_thr_float32 = torch.tensor(iou_thr, dtype=torch.float32).item()
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_thr_float32)


@torch.library.custom_op('detdeploy::batched_nms', mutates_args=())
def batched_nms_op(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                   score_thr: float, iou_thr: float, max_det: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates [B, M, 4], [B, M], [B, M] -> (num_dets, boxes, scores, labels) padded to
    `max_det`: per image, candidates scoring above `score_thr`, per-class NMS, the best
    `max_det` by score."""
    batch = boxes.shape[0]
    out_boxes = boxes.new_zeros(batch, max_det, 4)
    out_scores = scores.new_zeros(batch, max_det)
    out_labels = torch.full((batch, max_det), -1, dtype=torch.int32, device=boxes.device)
    num_dets = torch.zeros(batch, 1, dtype=torch.int32, device=boxes.device)
    for image in range(batch):
        valid = scores[image] > score_thr
        image_boxes, image_scores = boxes[image][valid], scores[image][valid]
        image_labels = labels[image][valid]
        keep = batched_nms(image_boxes, image_scores, image_labels, iou_thr)[:max_det]
        count = len(keep)
        num_dets[image, 0] = count
        out_boxes[image, :count] = image_boxes[keep]
        out_scores[image, :count] = image_scores[keep]
        out_labels[image, :count] = image_labels[keep].to(torch.int32)
    return num_dets, out_boxes, out_scores, out_labels


@batched_nms_op.register_fake
def _batched_nms_shapes(boxes, scores, labels, score_thr, iou_thr, max_det):
    batch = boxes.shape[0]
    return (boxes.new_empty(batch, 1, dtype=torch.int32), boxes.new_empty(batch, max_det, 4),
            scores.new_empty(batch, max_det), boxes.new_empty(batch, max_det, dtype=torch.int32))


TRT_MAX_CANDIDATES = 4096
"""EfficientNMS_TRT runs NMS on at most this many of the best pairs above its score threshold."""


@torch.library.custom_op('detdeploy::efficient_nms', mutates_args=())
def efficient_nms_op(boxes: torch.Tensor, scores: torch.Tensor, score_thr: float, iou_thr: float,
                     max_det: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TensorRT EfficientNMS_TRT's semantics in PyTorch: boxes [B, N, 4], scores [B, N, C] ->
    the four padded outputs. The (anchor, class) pairs scoring above `score_thr`, the best
    `TRT_MAX_CANDIDATES` of them, per-class NMS, the best `max_det`."""
    batch, num_anchors, num_classes = scores.shape
    pair_scores, pair_index = _top_k_lower_index_first(
        scores.reshape(batch, -1), min(TRT_MAX_CANDIDATES, num_anchors * num_classes))
    pair_boxes = torch.gather(boxes, 1, (pair_index // num_classes)[..., None].expand(-1, -1, 4))
    return batched_nms_op(pair_boxes, pair_scores, pair_index % num_classes, score_thr, iou_thr,
                          max_det)


@efficient_nms_op.register_fake
def _efficient_nms_shapes(boxes, scores, score_thr, iou_thr, max_det):
    batch = boxes.shape[0]
    return (boxes.new_empty(batch, 1, dtype=torch.int32), boxes.new_empty(batch, max_det, 4),
            scores.new_empty(batch, max_det), boxes.new_empty(batch, max_det, dtype=torch.int32))


def dense_candidate_scores(candidates: Candidates, num_anchors: int, num_classes: int
                           ) -> torch.Tensor:
    """Candidate scores scattered back to [B, N, C]; pairs that are not candidates get -1."""
    batch = candidates.scores.shape[0]
    dense = candidates.scores.new_full((batch, num_anchors * num_classes), -1.0)
    return dense.scatter(1, candidates.pair_index, candidates.scores).reshape(
        batch, num_anchors, num_classes)


def nms_outputs(decoded: DecodedOutputs, cfg: NMSConfig) -> DetectionOutputs:
    """Decoded boxes and scores -> the four NMS outputs: candidates, then per-class NMS."""
    candidates = select_candidates(decoded, cfg.score_thr, cfg.pre_top_k)
    return DetectionOutputs(*batched_nms_op(candidates.boxes, candidates.scores,
                                            candidates.labels, cfg.score_thr, cfg.iou_thr,
                                            cfg.max_det))


def postprocess(raw: RawOutputs, strides: tuple[int, ...], clamp_hw: tuple[int, int],
                cfg: NMSConfig) -> DetectionOutputs:
    """Raw head outputs -> the four NMS outputs (network-input pixels)."""
    return nms_outputs(decode_outputs(raw, strides, clamp_hw), cfg)


def split_detections(outputs: DetectionOutputs) -> list[Detections]:
    """Per-image detections from padded outputs."""
    return [Detections(outputs.boxes[i, :n], outputs.scores[i, :n], outputs.labels[i, :n].long())
            for i, n in enumerate(outputs.num_dets[:, 0].tolist())]
