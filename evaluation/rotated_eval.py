"""DOTA-style mean average precision of rotated detections: VOC AP per class at a rotated IoU
threshold (0.5), as MMRotate's `DOTAMetric` / `eval_rbbox_map` compute it.

Numbers in, numbers out: no model running, reading or printing here. Rotated IoU is
`detdeploy.models.rotated_nms` (imported when called, so this module loads without torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

AP_MODES = ('11points', 'area')
"""11points: VOC2007's 11-point interpolation (MMRotate's DOTA default); area: the area under
the interpolated precision-recall curve (VOC2010+)."""


@dataclass
class RotatedImage:
    """One image's rotated boxes [K, 5] (cx, cy, w, h, angle rad) and labels; detections also
    have scores, ground truth may mark boxes `ignore` (DOTA's difficult: neither hit nor miss)."""
    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray | None = None
    ignore: np.ndarray | None = None


@dataclass
class ClassAP:
    name: str
    num_gts: int
    num_dets: int
    recall: float
    ap: float


@dataclass
class RotatedMAP:
    map: float                  # mean AP over classes that have ground truth
    iou_thr: float
    mode: str
    per_class: list[ClassAP]


def _rotated_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    import torch

    from detdeploy.models.rotated_nms import rotated_iou_matrix
    return rotated_iou_matrix(torch.as_tensor(boxes_a, dtype=torch.float32).reshape(-1, 5),
                              torch.as_tensor(boxes_b, dtype=torch.float32).reshape(-1, 5)
                              ).numpy()


def _image_tp_fp(det_boxes, det_scores, gt_boxes, gt_ignore, iou_thr):
    """MMRotate's `tpfp_default`: each detection, best first, takes the ground truth it overlaps
    most; at IoU >= iou_thr it is a hit if that box is not taken yet, a duplicate (false
    positive) if it is, and neither if the box is ignored; below, a false positive."""
    tp, fp = np.zeros(len(det_scores)), np.zeros(len(det_scores))
    if not len(gt_boxes):
        fp[:] = 1
        return tp, fp
    if not len(det_scores):
        return tp, fp
    iou = _rotated_iou(det_boxes, gt_boxes)
    best_iou, best_gt = iou.max(1), iou.argmax(1)
    covered = np.zeros(len(gt_boxes), bool)
    for i in np.argsort(-det_scores, kind='stable'):
        if best_iou[i] >= iou_thr:
            gt = best_gt[i]
            if gt_ignore[gt]:
                continue
            if covered[gt]:
                fp[i] = 1
            else:
                covered[gt], tp[i] = True, 1
        else:
            fp[i] = 1
    return tp, fp


def average_precision(recalls: np.ndarray, precisions: np.ndarray, mode: str = '11points'
                      ) -> float:
    """AP from recall and precision along the score-ranked detections (mmdet's rule)."""
    if mode == 'area':
        recall = np.concatenate([[0.0], recalls, [1.0]])
        precision = np.concatenate([[0.0], precisions, [0.0]])
        precision = np.maximum.accumulate(precision[::-1])[::-1]
        steps = np.flatnonzero(recall[1:] != recall[:-1])
        return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))
    if mode != '11points':
        raise ValueError(f'mode must be one of {AP_MODES}')
    total = 0.0
    for threshold in np.arange(0, 1 + 1e-3, 0.1):
        reached = precisions[recalls >= threshold]
        total += reached.max() if reached.size else 0.0
    return total / 11


def rotated_map(detections: Sequence[RotatedImage], ground_truth: Sequence[RotatedImage],
                class_names: Sequence[str], iou_thr: float = 0.5, mode: str = '11points'
                ) -> RotatedMAP:
    """Per-class AP of `detections` against `ground_truth` (the same images, in order)."""
    if len(detections) != len(ground_truth):
        raise ValueError('detections and ground truth must cover the same images')
    per_class = []
    for label, name in enumerate(class_names):
        tps, fps, scores, num_gts = [], [], [], 0
        for det, gt in zip(detections, ground_truth):
            det_mask, gt_mask = det.labels == label, gt.labels == label
            gt_ignore = (np.zeros(len(gt.labels), bool) if gt.ignore is None
                         else np.asarray(gt.ignore, bool))[gt_mask]
            num_gts += int((~gt_ignore).sum())
            det_scores = np.asarray(det.scores, np.float64)[det_mask]
            tp, fp = _image_tp_fp(det.boxes[det_mask], det_scores, gt.boxes[gt_mask], gt_ignore,
                                  iou_thr)
            tps.append(tp), fps.append(fp), scores.append(det_scores)
        scores = np.concatenate(scores)
        order = np.argsort(-scores, kind='stable')
        tp = np.cumsum(np.concatenate(tps)[order])
        fp = np.cumsum(np.concatenate(fps)[order])
        eps = np.finfo(np.float32).eps
        recalls = tp / max(num_gts, eps)
        precisions = tp / np.maximum(tp + fp, eps)
        ap = average_precision(recalls, precisions, mode) if len(scores) else 0.0
        per_class.append(ClassAP(name, num_gts, len(scores),
                                 float(recalls[-1]) if len(scores) else 0.0, ap))
    with_gts = [c.ap for c in per_class if c.num_gts > 0]
    return RotatedMAP(float(np.mean(with_gts)) if with_gts else 0.0, iou_thr, mode, per_class)
