"""Post-processing shared by dense (anchor-point) heads, in PyTorch: candidate selection, NMS as
custom ops, and the outputs of each NMS mode.

Batched and traceable, so the exporter turns the same code into the ONNX graph. NMS is the custom
op `detdeploy::batched_nms` (with the kept candidates' indices: `detdeploy::batched_nms_index`;
TensorRT's plugin: `detdeploy::efficient_nms`): this module holds
their eager implementations; `detdeploy.export` translates them to ONNX. A family decodes its
head into `DecodedOutputs` (boxes and class scores per anchor); everything after that is here.
Boxes stay in network-input pixels; rescaling to the original image is the host's job.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torchvision

from detdeploy.core.nms import NMSConfig
from detdeploy.core.tasks import NMS_MODES


class DecodedOutputs(NamedTuple):
    """Per-anchor outputs of all levels: boxes [B, N, 4] xyxy px (rotated heads: [B, N, 5]),
    sigmoid scores [B, N, C]."""
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
    boxes: torch.Tensor        # [B, M, 4] (rotated: [B, M, 5])
    scores: torch.Tensor       # [B, M]
    labels: torch.Tensor       # [B, M] int64
    pair_index: torch.Tensor   # [B, M] index into the flattened [N * C] scores


def xyxy_has_area(boxes: torch.Tensor) -> torch.Tensor:
    """xyxy boxes with positive width and height."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def select_candidates(decoded: DecodedOutputs, score_thr: float, pre_top_k: int,
                      has_area=xyxy_has_area) -> Candidates:
    """Per level, the best `pre_top_k` (anchor, class) pairs; one anchor can carry several
    labels. Pairs scoring at most `score_thr`, or whose box has no area (`has_area`: boxes
    [..., D] -> mask; D is 4 for xyxy, 5 for rotated boxes), get score -1.

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
    cand_boxes = torch.gather(boxes, 1, anchors[..., None].expand(-1, -1, boxes.shape[-1]))
    valid = (cand_scores > score_thr) & has_area(cand_boxes)
    cand_scores = torch.where(valid, cand_scores, torch.full_like(cand_scores, -1.0))
    return Candidates(cand_boxes, cand_scores, labels, pair_index)


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                iou_thr: float, class_agnostic: bool = False) -> torch.Tensor:
    """Per-class NMS over one image's boxes (with `class_agnostic`, over all of them at once);
    indices kept, by descending score.

    Separates classes by offsetting boxes by `label * (max_coordinate + 1)`, as mmcv's
    `batched_nms` does at any box count, so results match MMDetection bit for bit. A box is
    suppressed when its float32 IoU exceeds `iou_thr` rounded to float32, as in mmcv's kernel
    and ONNX's NonMaxSuppression (torchvision would compare with the float64 value: at 0.6,
    which rounds up in float32, an IoU of exactly float32(0.6) would be suppressed).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    iou_thr_float32 = torch.tensor(iou_thr, dtype=torch.float32).item()
    if class_agnostic:
        return torchvision.ops.nms(boxes, scores, iou_thr_float32)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_thr_float32)


def _batched_nms_rows(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                      score_thr: float, iou_thr: float, max_det: int, class_agnostic: bool
                      ) -> tuple[torch.Tensor, ...]:
    """The eager NMS of both ops below: the four padded outputs and the candidate index of
    each row (padding rows: 0)."""
    batch = boxes.shape[0]
    out_boxes = boxes.new_zeros(batch, max_det, 4)
    out_scores = scores.new_zeros(batch, max_det)
    out_labels = torch.full((batch, max_det), -1, dtype=torch.int32, device=boxes.device)
    num_dets = torch.zeros(batch, 1, dtype=torch.int32, device=boxes.device)
    out_index = torch.zeros(batch, max_det, dtype=torch.int64, device=boxes.device)
    for image in range(batch):
        valid = scores[image] > score_thr
        image_boxes, image_scores = boxes[image][valid], scores[image][valid]
        image_labels = labels[image][valid]
        keep = batched_nms(image_boxes, image_scores, image_labels, iou_thr,
                           class_agnostic)[:max_det]
        count = len(keep)
        num_dets[image, 0] = count
        out_boxes[image, :count] = image_boxes[keep]
        out_scores[image, :count] = image_scores[keep]
        out_labels[image, :count] = image_labels[keep].to(torch.int32)
        out_index[image, :count] = valid.nonzero()[:, 0][keep]
    return num_dets, out_boxes, out_scores, out_labels, out_index


@torch.library.custom_op('detdeploy::batched_nms', mutates_args=())
def batched_nms_op(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                   score_thr: float, iou_thr: float, max_det: int, class_agnostic: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates [B, M, 4], [B, M], [B, M] -> (num_dets, boxes, scores, labels) padded to
    `max_det`: per image, candidates scoring above `score_thr`, per-class (or class-agnostic)
    NMS, the best `max_det` by score."""
    return _batched_nms_rows(boxes, scores, labels, score_thr, iou_thr, max_det,
                             class_agnostic)[:4]


@batched_nms_op.register_fake
def _batched_nms_shapes(boxes, scores, labels, score_thr, iou_thr, max_det,
                        class_agnostic=False):
    batch = boxes.shape[0]
    return (boxes.new_empty(batch, 1, dtype=torch.int32), boxes.new_empty(batch, max_det, 4),
            scores.new_empty(batch, max_det), boxes.new_empty(batch, max_det, dtype=torch.int32))


@torch.library.custom_op('detdeploy::batched_nms_index', mutates_args=())
def batched_nms_index_op(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                         score_thr: float, iou_thr: float, max_det: int,
                         class_agnostic: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                    torch.Tensor]:
    """`batched_nms_op` plus, per output row, the index [B, K] int64 of the candidate it came
    from (rows past num_dets: any valid candidate index), for heads that carry more per
    candidate than a box (RTMDet-Ins: its mask kernel)."""
    return _batched_nms_rows(boxes, scores, labels, score_thr, iou_thr, max_det,
                             class_agnostic)


@batched_nms_index_op.register_fake
def _batched_nms_index_shapes(boxes, scores, labels, score_thr, iou_thr, max_det,
                              class_agnostic=False):
    batch = boxes.shape[0]
    return (*_batched_nms_shapes(boxes, scores, labels, score_thr, iou_thr, max_det),
            boxes.new_empty(batch, max_det, dtype=torch.int64))


TRT_MAX_CANDIDATES = 4096
"""EfficientNMS_TRT runs NMS on at most this many of the best pairs above its score threshold."""


@torch.library.custom_op('detdeploy::efficient_nms', mutates_args=())
def efficient_nms_op(boxes: torch.Tensor, scores: torch.Tensor, score_thr: float, iou_thr: float,
                     max_det: int, class_agnostic: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """TensorRT EfficientNMS_TRT's semantics in PyTorch: boxes [B, N, 4] (or class-specific
    [B, N, C, 4], as two-stage heads give), scores [B, N, C] -> the four padded outputs. The
    (anchor, class) pairs scoring above `score_thr`, the best `TRT_MAX_CANDIDATES` of them,
    per-class (or class-agnostic) NMS, the best `max_det`."""
    batch, num_anchors, num_classes = scores.shape
    pair_scores, pair_index = _top_k_lower_index_first(
        scores.reshape(batch, -1), min(TRT_MAX_CANDIDATES, num_anchors * num_classes))
    if boxes.dim() == 4:
        pair_boxes = torch.gather(boxes.reshape(batch, -1, 4), 1,
                                  pair_index[..., None].expand(-1, -1, 4))
    else:
        pair_boxes = torch.gather(boxes, 1,
                                  (pair_index // num_classes)[..., None].expand(-1, -1, 4))
    return batched_nms_op(pair_boxes, pair_scores, pair_index % num_classes, score_thr, iou_thr,
                          max_det, class_agnostic)


@efficient_nms_op.register_fake
def _efficient_nms_shapes(boxes, scores, score_thr, iou_thr, max_det, class_agnostic=False):
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
                                            cfg.max_det, cfg.class_agnostic))


def dense_outputs(decoded: DecodedOutputs, nms: NMSConfig, nms_mode: str
                  ) -> tuple[torch.Tensor, ...]:
    """A dense head's decoded outputs -> the `detect` task's outputs for `nms_mode`
    (`core.tasks`): `onnx` the four NMS outputs, `trt` the same from TensorRT's plugin op after
    the same candidate selection, `none` the per-anchor boxes and scores."""
    if nms_mode not in NMS_MODES:
        raise ValueError(f'nms_mode must be one of {NMS_MODES}')
    if nms_mode == 'onnx':
        return tuple(nms_outputs(decoded, nms))
    if nms_mode == 'none':
        return decoded.boxes, decoded.scores
    candidates = select_candidates(decoded, nms.score_thr, nms.pre_top_k)
    dense_scores = dense_candidate_scores(candidates, decoded.boxes.shape[1],
                                          decoded.scores.shape[2])
    return tuple(efficient_nms_op(decoded.boxes, dense_scores, nms.score_thr, nms.iou_thr,
                                  nms.max_det, nms.class_agnostic))


def split_detections(outputs: DetectionOutputs) -> list[Detections]:
    """Per-image detections from padded outputs."""
    return [Detections(outputs.boxes[i, :n], outputs.scores[i, :n], outputs.labels[i, :n].long())
            for i, n in enumerate(outputs.num_dets[:, 0].tolist())]
