"""DOTA-style mean average precision of rotated detections: VOC AP per class at a rotated IoU
threshold (0.5), as MMRotate's `DOTAMetric` / `eval_rbbox_map` compute it.

`rotated_map` is numbers in, numbers out. `evaluate_rotated` runs a backend over a COCO-style
file whose annotations carry `rbox` (`core.rotated_coco`) and scores it at IoU 0.5, 0.75 and
0.5:0.95. Rotated IoU is `detdeploy.models.rotated_nms` (imported when called, so this module
loads without torch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

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


def _image_tp_fp(iou, det_scores, gt_ignore, iou_thr):
    """MMRotate's `tpfp_default` on the [D, G] IoU of an image's detections and ground truth of
    one class: each detection, best first, takes the ground truth it overlaps most; at IoU >=
    iou_thr it is a hit if that box is not taken yet, a duplicate (false positive) if it is,
    and neither if the box is ignored; below, a false positive."""
    tp, fp = np.zeros(len(det_scores)), np.zeros(len(det_scores))
    if not iou.shape[1]:
        fp[:] = 1
        return tp, fp
    if not len(det_scores):
        return tp, fp
    best_iou, best_gt = iou.max(1), iou.argmax(1)
    covered = np.zeros(iou.shape[1], bool)
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
    return rotated_maps(detections, ground_truth, class_names, (iou_thr,), mode)[0]


def rotated_maps(detections: Sequence[RotatedImage], ground_truth: Sequence[RotatedImage],
                 class_names: Sequence[str], iou_thrs: Sequence[float], mode: str = '11points'
                 ) -> list[RotatedMAP]:
    """`rotated_map` at each of `iou_thrs`, computing every IoU once."""
    if len(detections) != len(ground_truth):
        raise ValueError('detections and ground truth must cover the same images')
    per_class = {thr: [] for thr in iou_thrs}
    for label, name in enumerate(class_names):
        tps, fps = {thr: [] for thr in iou_thrs}, {thr: [] for thr in iou_thrs}
        scores, num_gts = [], 0
        for det, gt in zip(detections, ground_truth):
            det_mask, gt_mask = det.labels == label, gt.labels == label
            gt_ignore = (np.zeros(len(gt.labels), bool) if gt.ignore is None
                         else np.asarray(gt.ignore, bool))[gt_mask]
            num_gts += int((~gt_ignore).sum())
            det_scores = np.asarray(det.scores, np.float64)[det_mask]
            iou = (_rotated_iou(det.boxes[det_mask], gt.boxes[gt_mask])
                   if det_mask.any() and gt_mask.any()
                   else np.zeros((int(det_mask.sum()), int(gt_mask.sum()))))
            for thr in iou_thrs:
                tp, fp = _image_tp_fp(iou, det_scores, gt_ignore, thr)
                tps[thr].append(tp), fps[thr].append(fp)
            scores.append(det_scores)
        scores = np.concatenate(scores)
        for thr in iou_thrs:
            per_class[thr].append(_class_ap(name, scores, tps[thr], fps[thr], num_gts, mode))
    results = []
    for thr in iou_thrs:
        with_gts = [c.ap for c in per_class[thr] if c.num_gts > 0]
        results.append(RotatedMAP(float(np.mean(with_gts)) if with_gts else 0.0, thr, mode,
                                  per_class[thr]))
    return results


def _class_ap(name, scores, tps, fps, num_gts, mode) -> ClassAP:
    """One class's AP from its detections pooled over images."""
    order = np.argsort(-scores, kind='stable')
    tp = np.cumsum(np.concatenate(tps)[order])
    fp = np.cumsum(np.concatenate(fps)[order])
    eps = np.finfo(np.float32).eps
    recalls = tp / max(num_gts, eps)
    precisions = tp / np.maximum(tp + fp, eps)
    ap = average_precision(recalls, precisions, mode) if len(scores) else 0.0
    return ClassAP(name, num_gts, len(scores), float(recalls[-1]) if len(scores) else 0.0, ap)


ROTATED_METRIC_NAMES = ('AP50', 'AP75', 'AP')
"""AP50 = DOTA's mAP at rotated IoU 0.5 (what MMRotate reports); AP75 at 0.75; AP = the mean
over 0.5:0.05:0.95 (DOTAMetric with those `iou_thrs`)."""
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


@dataclass
class RotatedEvalResult:
    backend: str
    metrics: dict[str, float]           # ROTATED_METRIC_NAMES
    per_class: list[ClassAP]            # at IoU 0.5
    num_images: int
    num_detections: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


def ground_truth(coco, ann_file: str | Path) -> tuple[list[int], list[RotatedImage]]:
    """Image ids in order and each image's oriented boxes (`rbox`, crowd boxes ignored) from a
    pycocotools COCO object of a rotated annotation file."""
    from detdeploy.core.rotated_coco import rotated_boxes

    boxes_of = rotated_boxes(coco.dataset, str(ann_file))
    category_ids = sorted(coco.getCatIds())
    label_of = {cat: index for index, cat in enumerate(category_ids)}
    image_ids = sorted(coco.getImgIds())
    truth = []
    for image_id in image_ids:
        anns = coco.imgToAnns.get(image_id, [])
        truth.append(RotatedImage(
            np.array([boxes_of[a['id']] for a in anns], np.float64).reshape(-1, 5),
            np.array([label_of[a['category_id']] for a in anns], np.int64),
            ignore=np.array([bool(a.get('iscrowd', 0)) for a in anns], bool)))
    return image_ids, truth


def evaluate_rotated(backend, ann_file: str | Path, image_dir: str | Path, batch_size: int = 1,
                     coco=None, max_pixels: int | None = None,
                     progress: Callable[[int], None] | None = None) -> RotatedEvalResult:
    """Run a rotated model's `backend` over every image of a rotated annotation file and score
    its oriented detections DOTA-style (VOC 11-point AP per class, as MMRotate's DOTAMetric)."""
    from detdeploy.core.errors import DetdeployError
    from detdeploy.evaluation.coco_eval import annotated_files, check_dataset_for_model, load_coco
    from detdeploy.runtimes.pipeline import detect

    if backend.metadata.task != 'rotated':
        raise DetdeployError(f"{backend.source}: rotated evaluation needs a rotated model, its "
                             f"task is '{backend.metadata.task}'")
    coco = coco or load_coco(ann_file)
    category_ids, warnings = check_dataset_for_model(coco, backend, ann_file, image_dir)
    names = [coco.cats[i]['name'] for i in category_ids]
    image_ids, truth = ground_truth(coco, ann_file)
    files = annotated_files(coco, image_ids, image_dir)
    found = []
    start = time.perf_counter()
    for detections, _ in detect(backend, files, batch_size=batch_size, max_pixels=max_pixels):
        if progress is not None:
            progress(1)
        found.append(RotatedImage(detections.rotated_boxes.astype(np.float64),
                                  detections.labels.astype(np.int64),
                                  detections.scores.astype(np.float64)))
    seconds = time.perf_counter() - start
    maps = rotated_maps(found, truth, names, IOU_THRESHOLDS)
    by_thr = {m.iou_thr: m for m in maps}
    metrics = {'AP50': by_thr[0.5].map, 'AP75': by_thr[0.75].map,
               'AP': float(np.mean([m.map for m in maps]))}
    return RotatedEvalResult(backend.name, metrics, by_thr[0.5].per_class, len(files),
                             sum(len(f.scores) for f in found), seconds, warnings)
