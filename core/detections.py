"""Per-image detection results in original-image pixels, as numpy arrays, and their JSON form.

One type for every task: boxes always (axis-aligned; for rotated models the enclosing boxes),
plus masks for instance models and oriented boxes for rotated ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelFileError
from .masks import encode_rle
from .nms import keep_above
from .tasks import has_nms, output_schema


def rotated_box_corners(boxes: np.ndarray) -> np.ndarray:
    """[K, 5] (cx, cy, w, h, angle rad) -> [K, 4, 2] corner points (x, y), in mmcv's order."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    cx, cy, width, height, angle = boxes.T
    cos_half, sin_half = np.cos(angle) * 0.5, np.sin(angle) * 0.5
    x0, y0 = cx - sin_half * height - cos_half * width, cy + cos_half * height - sin_half * width
    x1, y1 = cx + sin_half * height - cos_half * width, cy - cos_half * height - sin_half * width
    return np.stack([np.stack([x0, y0], -1), np.stack([x1, y1], -1),
                     np.stack([2 * cx - x0, 2 * cy - y0], -1),
                     np.stack([2 * cx - x1, 2 * cy - y1], -1)], 1)


def enclosing_boxes(rotated_boxes: np.ndarray) -> np.ndarray:
    """[K, 5] rotated boxes -> [K, 4] xyxy boxes enclosing them."""
    corners = rotated_box_corners(rotated_boxes)
    return np.concatenate([corners.min(1), corners.max(1)], 1).astype(np.float32)


@dataclass
class ImageDetections:
    """Detections of one image, best first; boxes are xyxy in original-image pixels."""
    source: str
    image_hw: tuple[int, int]
    boxes_xyxy_px: np.ndarray           # [K, 4] float32
    scores: np.ndarray                  # [K] float32
    labels: np.ndarray                  # [K] int64
    class_names: tuple[str, ...]
    masks: np.ndarray | None = None             # [K, H, W] bool at the original image size
    rotated_boxes: np.ndarray | None = None     # [K, 5] cx, cy, w, h px, angle rad (le90)

    def __len__(self) -> int:
        return len(self.scores)

    def select(self, keep: np.ndarray) -> 'ImageDetections':
        """The detections where the boolean mask `keep` is true, in order."""
        return ImageDetections(
            self.source, self.image_hw, self.boxes_xyxy_px[keep], self.scores[keep],
            self.labels[keep], self.class_names,
            None if self.masks is None else self.masks[keep],
            None if self.rotated_boxes is None else self.rotated_boxes[keep])

    def above(self, score_thr: float | None) -> 'ImageDetections':
        """The detections scoring strictly above `score_thr` (`core.nms`'s rule); None: all."""
        return self.select(keep_above(self.scores, score_thr))

    def label_name(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def to_dict(self) -> dict:
        """JSON form; rotated models add `rotated_box` (cx, cy, w, h px, angle rad, le90) and
        its 4 `corners` (x, y) per row; instance models the mask as COCO RLE, `segmentation`."""
        rows = [{'bbox_xyxy': [round(float(v), 3) for v in box], 'score': round(float(score), 6),
                 'label': int(label), 'label_name': self.label_name(int(label))}
                for box, score, label in zip(self.boxes_xyxy_px, self.scores, self.labels)]
        if self.rotated_boxes is not None:
            for row, rotated in zip(rows, self.rotated_boxes):
                row['rotated_box'] = [round(float(v), 6 if i == 4 else 3)
                                      for i, v in enumerate(rotated)]
                row['corners'] = [[round(float(x), 3), round(float(y), 3)]
                                  for x, y in rotated_box_corners(rotated)[0]]
        if self.masks is not None:
            for row, rle in zip(rows, encode_rle(self.masks)):
                row['segmentation'] = rle
        return {'image': self.source, 'height': int(self.image_hw[0]),
                'width': int(self.image_hw[1]), 'detections': rows}


def check_outputs(outputs, task: str, nms_mode: str, num_classes: int, source: str) -> None:
    """A model's outputs for one batch are what its schema promises, or a one-line error naming
    `source` and the output: the right count, dtypes and batch; for NMS layouts `num_dets`
    within 0..K and, in the valid rows, labels within the classes and finite boxes and scores.
    A model that breaks these would otherwise give wrapped labels or NaN boxes downstream."""
    schema = output_schema(task, nms_mode)
    if len(outputs) != len(schema):
        raise ModelFileError(f'{source} returned {len(outputs)} outputs, its layout has '
                             f'{len(schema)} ({", ".join(f.name for f in schema)})')
    for field, array in zip(schema, outputs):
        if np.ndim(array) != field.rank:
            raise ModelFileError(f'{source}: output {field.name} has shape '
                                 f'{list(np.shape(array))}, not rank {field.rank}')
        kind = np.asarray(array).dtype.kind
        if (field.kind == 'i') != (kind in 'iu'):
            raise ModelFileError(f'{source}: output {field.name} is {np.asarray(array).dtype}, '
                                 f'not {field.dtype}')
    if len({len(array) for array in outputs}) != 1:
        raise ModelFileError(f'{source}: outputs disagree on the batch size '
                             f'({", ".join(str(len(a)) for a in outputs)})')
    if not has_nms(nms_mode):
        return
    num_dets, boxes, scores, labels = outputs[:4]
    rows = scores.shape[1]
    counts = num_dets[:, 0]
    if counts.size and (counts.min() < 0 or counts.max() > rows):
        bad = int(counts[(counts < 0) | (counts > rows)][0])
        raise ModelFileError(f'{source}: output num_dets is {bad}, outside 0..{rows} (the rows '
                             'of boxes, scores and labels)')
    valid = np.arange(rows)[None, :] < counts[:, None]
    valid_labels = labels[valid]
    if valid_labels.size and (valid_labels.min() < 0 or valid_labels.max() >= num_classes):
        bad = int(valid_labels[(valid_labels < 0) | (valid_labels >= num_classes)][0])
        raise ModelFileError(f'{source}: output labels holds {bad}, outside the model\'s '
                             f'{num_classes} classes (0..{num_classes - 1}); its class names '
                             'do not fit the graph')
    for name, values in (('boxes', boxes[valid]), ('scores', scores[valid])):
        if not np.isfinite(values).all():
            raise ModelFileError(f'{source}: output {name} holds non-finite values (NaN or '
                                 'infinity) in detections it reports as valid')
