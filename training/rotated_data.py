"""Training data for rotated detectors: a COCO-style file whose annotations carry oriented boxes
(`rbox`, `core.rotated_coco`), with the augmentation of `training.data` applied to rotated boxes
(keep-ratio random resize, random crop, horizontal flip, pad).

Boxes are [n, 5] (cx, cy, w, h, angle) in input pixels, le90. A crop keeps the boxes whose
centre stays in the window, whole (rotated boxes are not clipped, as in MMRotate). Mosaic and
mix-up are not offered for rotated data (MMRotate's DOTA configs do not use them either).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from detdeploy.core.coco import image_path, read_coco_file
from detdeploy.core.errors import DetdeployError
from detdeploy.core.rotated_coco import rotated_boxes

from .data import AugmentConfig, CocoDetectionDataset, CocoSet


def read_rotated_coco(ann_file: str | Path, image_dir: str | Path) -> CocoSet:
    """A rotated annotation file as a `CocoSet` whose boxes are [n, 5] rotated boxes; crowd
    boxes and boxes with a side under 1 px are left out."""
    ann_path, image_root = Path(ann_file), Path(image_dir)
    if not ann_path.exists() and not ann_path.is_symlink():
        raise DetdeployError(f'annotation file {ann_path} does not exist')
    coco = read_coco_file(ann_path)
    boxes_of = rotated_boxes(coco, str(ann_path))
    if not image_root.is_dir():
        raise DetdeployError(f'image directory {image_root} does not exist')
    categories = sorted(coco['categories'], key=lambda c: c['id'])
    label_of = {c['id']: index for index, c in enumerate(categories)}
    per_image: dict[int, list] = {image['id']: [] for image in coco['images']}
    for ann in coco['annotations']:
        box = boxes_of[ann['id']]
        if ann.get('iscrowd', 0) or box[2] < 1 or box[3] < 1:
            continue
        per_image[ann['image_id']].append((*box, label_of[ann['category_id']]))
    boxes, labels = [], []
    for image in coco['images']:
        rows = np.asarray(per_image[image['id']], dtype=np.float32).reshape(-1, 6)
        boxes.append(rows[:, :5].copy())
        labels.append(rows[:, 5].astype(np.int64))
    return CocoSet(tuple(c['name'] for c in categories), tuple(c['id'] for c in categories),
                   tuple(image_path(image_root, image['file_name']) for image in coco['images']),
                   tuple(image['id'] for image in coco['images']), tuple(boxes), tuple(labels))


def _norm_le90(angle: np.ndarray) -> np.ndarray:
    return np.remainder(angle + math.pi / 2, math.pi) - math.pi / 2


class RotatedDetectionDataset(CocoDetectionDataset):
    """Training samples: (normalised [3, S, S] tensor, rotated boxes [n, 5], labels [n])."""

    def __init__(self, data: CocoSet, augment: AugmentConfig, preprocess, seed: int = 0):
        if augment.mosaic_prob or augment.mixup_prob:
            raise DetdeployError('--mosaic and --mixup are for axis-aligned boxes; rotated '
                                 'training takes resize, crop and flip')
        super().__init__(data, augment, preprocess, seed)

    def _augmented(self, index: int, rng: np.random.Generator, allow_mixup: bool = True):
        cfg = self.augment
        image, boxes, labels, _ = self._load(index)       # no masks in rotated training
        scale = cfg.img_size / max(image.shape[:2]) * rng.uniform(*cfg.scale_range)
        height, width = image.shape[:2]
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
        # keep-ratio: x and y scales differ only by rounding; sides take their mean
        factor_x, factor_y = new_w / width, new_h / height
        boxes = boxes * np.array([factor_x, factor_y, (factor_x + factor_y) / 2,
                                  (factor_x + factor_y) / 2, 1], dtype=np.float32)
        size = cfg.img_size
        top = int(rng.integers(0, new_h - size + 1)) if new_h > size else 0
        left = int(rng.integers(0, new_w - size + 1)) if new_w > size else 0
        image = image[top:top + size, left:left + size]
        boxes = boxes - np.array([left, top, 0, 0, 0], dtype=np.float32)
        keep = ((boxes[:, 0] >= 0) & (boxes[:, 0] < image.shape[1]) & (boxes[:, 1] >= 0)
                & (boxes[:, 1] < image.shape[0]) & (boxes[:, 2] > cfg.min_box_side)
                & (boxes[:, 3] > cfg.min_box_side))
        boxes, labels = boxes[keep], labels[keep]
        if rng.random() < cfg.flip_prob:
            image = image[:, ::-1]
            boxes = boxes.copy()
            boxes[:, 0] = image.shape[1] - boxes[:, 0]
            boxes[:, 4] = _norm_le90(-boxes[:, 4])
        canvas = np.full((size, size, 3), int(self.preprocess.pad_value), np.uint8)
        canvas[:image.shape[0], :image.shape[1]] = image
        return canvas, boxes.astype(np.float32), labels, None
