"""COCO box mAP (and, for instance models, mask mAP) of any backend on a COCO-format dataset,
with pycocotools.

Detections come from the shared host pipeline (`runtimes.pipeline.detect`), so PyTorch, ONNX
Runtime and TensorRT are measured through the same preprocessing and rescaling. Labels map to
the annotation file's categories in id order; the model's class count must match.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from detdeploy.core.errors import DetdeployError

METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


@dataclass
class EvalResult:
    backend: str
    metrics: dict[str, float]
    num_images: int
    num_detections: int
    seconds: float
    warnings: list[str] = field(default_factory=list)
    segm_metrics: dict[str, float] | None = None    # instance models: iouType 'segm'


def load_coco(ann_file: str | Path):
    """A pycocotools COCO object of a checked file (`core.coco.read_coco_file`), quietly; a bad
    file is a one-line error naming the field."""
    from pycocotools.coco import COCO

    from detdeploy.core.coco import read_coco_file
    path = Path(ann_file)
    if not path.exists() and not path.is_symlink():
        raise DetdeployError(f'annotation file {path} does not exist')
    coco = COCO()
    coco.dataset = read_coco_file(path)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_metrics(coco, results: list[dict], iou_type: str = 'bbox') -> dict[str, float]:
    """COCOeval stats (`iou_type` 'bbox' or 'segm') for results in COCO results format (all
    images of `coco`). For 'segm' the rows' boxes are left out, as MMDetection's CocoMetric
    does: pycocotools would otherwise take a detection's area (small, medium, large) from its
    box rather than its mask."""
    from pycocotools.cocoeval import COCOeval
    if not results:
        return {name: 0.0 for name in METRIC_NAMES}
    if iou_type == 'segm':
        results = [{key: value for key, value in row.items() if key != 'bbox'}
                   for row in results]
    with contextlib.redirect_stdout(io.StringIO()):
        detections = coco.loadRes(results)
        evaluator = COCOeval(coco, detections, iou_type)
        evaluator.params.imgIds = sorted(coco.getImgIds())
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: max(float(value), 0.0) for name, value in zip(METRIC_NAMES, evaluator.stats)}


def check_dataset_for_model(coco, backend, ann_file: str | Path, image_dir: str | Path
                            ) -> tuple[list[int], list[str]]:
    """What every scorer (COCO boxes and masks, rotated) checks before running a model: the
    image folder exists, the categories are as many as the model's classes, there is ground
    truth. Returns the sorted category ids and warnings (names that differ: matched by index)."""
    if not Path(image_dir).is_dir():
        raise DetdeployError(f'image directory {Path(image_dir)} does not exist')
    category_ids = sorted(coco.getCatIds())
    if len(category_ids) != len(backend.class_names):
        raise DetdeployError(f'{ann_file} has {len(category_ids)} categories but the model has '
                             f'{len(backend.class_names)} classes')
    warnings = []
    names = [coco.cats[i]['name'] for i in category_ids]
    if list(names) != list(backend.class_names):
        warnings.append(f"class names differ from the annotation file's ({names[:3]}... vs "
                        f'{list(backend.class_names)[:3]}...); matching by index')
    if not coco.dataset['annotations']:
        raise DetdeployError(f'{ann_file} has no annotations (no ground truth): there is nothing '
                             'to score')
    return category_ids, warnings


def annotated_files(coco, image_ids: list[int], image_dir: str | Path) -> list[Path]:
    """The image file of each id, all of which must exist (a mAP over fewer images misleads)."""
    from detdeploy.core.coco import image_path
    files = [image_path(Path(image_dir), coco.imgs[i]['file_name']) for i in image_ids]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DetdeployError(f'{len(missing)} annotated images are missing, e.g. {missing[0]}')
    return files


def evaluate(backend, ann_file: str | Path, image_dir: str | Path, batch_size: int = 1,
             show_progress: bool = False, coco=None, max_pixels: int | None = None,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """Run `backend` over every image of the annotation file and score its detections. An
    unreadable image stops the evaluation (`ImageError`): an mAP over fewer images than the
    annotation file lists would not be comparable. `progress(1)` is called after each image
    (`show_progress`: a tqdm bar instead)."""
    from tqdm import tqdm

    from detdeploy.core.masks import encode_rle
    from detdeploy.runtimes.pipeline import detect

    if backend.metadata.task not in ('detect', 'instance'):
        raise DetdeployError(
            f"{backend.source}: eval scores COCO boxes and masks, the model's task is "
            f"'{backend.metadata.task}' (rotated models: "
            'detdeploy.evaluation.rotated_eval.evaluate_rotated, which `detdeploy eval` uses)')
    coco = coco or load_coco(ann_file)
    with_masks = backend.metadata.task == 'instance'
    if with_masks:
        unmasked = sum('segmentation' not in ann for ann in coco.dataset['annotations'])
        if unmasked:
            raise DetdeployError(f'{ann_file}: {unmasked} annotations have no segmentation; mask '
                                 'AP of an instance model needs every ground-truth mask')
    category_ids, warnings = check_dataset_for_model(coco, backend, ann_file, image_dir)
    image_ids = sorted(coco.getImgIds())
    files = annotated_files(coco, image_ids, image_dir)
    results = []
    start = time.perf_counter()
    stream = detect(backend, files, batch_size=batch_size, max_pixels=max_pixels)
    for image_id, (detections, _) in tqdm(zip(image_ids, stream), total=len(files),
                                          disable=not show_progress, unit='img'):
        if progress is not None:
            progress(1)
        rles = encode_rle(detections.masks) if with_masks else [None] * len(detections)
        for box, score, label, rle in zip(detections.boxes_xyxy_px, detections.scores,
                                          detections.labels, rles):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append({'image_id': image_id, 'category_id': category_ids[int(label)],
                            'bbox': [x1, y1, x2 - x1, y2 - y1], 'score': float(score)})
            if rle is not None:
                results[-1]['segmentation'] = rle
    seconds = time.perf_counter() - start
    return EvalResult(backend.name, coco_metrics(coco, results), len(files), len(results),
                      seconds, warnings,
                      coco_metrics(coco, results, 'segm') if with_masks else None)


def write_json(path: str | Path, payload: dict, overwrite: bool = True) -> None:
    from detdeploy.core.fileio import atomic_write
    with atomic_write(path, 'w', overwrite=overwrite) as handle:
        json.dump(payload, handle, indent=2)
