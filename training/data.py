"""COCO-format detection data for training: reading annotation files and RTMDet's training
augmentation (keep-ratio random resize, random crop, flip, pad; mosaic and mix-up as options).

Augmentation randomness comes from (seed, epoch, index) only, so a resumed run sees exactly the
images an uninterrupted one would. Network tensors are normalised as the model's
`PreprocessConfig` says, the same as at inference.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from detdeploy.core.coco import image_path, read_coco_file
from detdeploy.core.errors import DetdeployError
from detdeploy.runtimes.preprocess import PreprocessConfig, read_image


@dataclass(frozen=True)
class CocoSet:
    """An annotation file's images, boxes (xyxy, float32) and 0-based labels."""
    class_names: tuple[str, ...]
    category_ids: tuple[int, ...]          # COCO category id of each label
    files: tuple[Path, ...]
    image_ids: tuple[int, ...]
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]


def read_coco(ann_file: str | Path, image_dir: str | Path) -> CocoSet:
    """Read a COCO instances file; crowd boxes and boxes under 1 px are left out."""
    ann_path, image_root = Path(ann_file), Path(image_dir)
    if not ann_path.exists() and not ann_path.is_symlink():
        raise DetdeployError(f'annotation file {ann_path} does not exist')
    coco = read_coco_file(ann_path)
    categories = sorted(coco['categories'], key=lambda c: c['id'])
    images = coco['images']
    annotations = coco['annotations']
    if not image_root.is_dir():
        raise DetdeployError(f'image directory {image_root} does not exist')
    label_of = {c['id']: index for index, c in enumerate(categories)}
    per_image: dict[int, list] = {image['id']: [] for image in images}
    for ann in annotations:
        x, y, w, h = ann['bbox']
        if ann.get('iscrowd', 0) or w < 1 or h < 1 or ann['image_id'] not in per_image:
            continue
        per_image[ann['image_id']].append((x, y, x + w, y + h, label_of[ann['category_id']]))
    boxes, labels = [], []
    for image in images:
        rows = np.asarray(per_image[image['id']], dtype=np.float32).reshape(-1, 5)
        boxes.append(rows[:, :4].copy())
        labels.append(rows[:, 4].astype(np.int64))
    return CocoSet(tuple(c['name'] for c in categories), tuple(c['id'] for c in categories),
                   tuple(image_path(image_root, image['file_name']) for image in images),
                   tuple(image['id'] for image in images), tuple(boxes), tuple(labels))


@dataclass(frozen=True)
class AugmentConfig:
    img_size: int = 320
    scale_range: tuple[float, float] = (0.5, 2.0)   # random resize around the fitting scale
    flip_prob: float = 0.5
    mosaic_prob: float = 0.0
    mixup_prob: float = 0.0
    min_box_side: float = 1.0                        # px after cropping


def _resize(image: np.ndarray, boxes: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    height, width = image.shape[:2]
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    factors = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
    return resized, boxes * factors


def _crop(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, size: int,
          rng: np.random.Generator, min_side: float):
    """A random size x size window (smaller if the image is); boxes clipped, tiny ones dropped."""
    height, width = image.shape[:2]
    top = int(rng.integers(0, height - size + 1)) if height > size else 0
    left = int(rng.integers(0, width - size + 1)) if width > size else 0
    image = image[top:top + size, left:left + size]
    boxes = boxes - np.array([left, top, left, top], dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image.shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image.shape[0])
    keep = ((boxes[:, 2] - boxes[:, 0]) > min_side) & ((boxes[:, 3] - boxes[:, 1]) > min_side)
    return image, boxes[keep], labels[keep]


class CocoDetectionDataset(torch.utils.data.Dataset):
    """Training samples: (normalised [3, S, S] tensor, boxes [n, 4] xyxy, labels [n])."""

    def __init__(self, data: CocoSet, augment: AugmentConfig, preprocess: PreprocessConfig,
                 seed: int = 0):
        self.data = data
        self.augment = augment
        self.preprocess = preprocess
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.data.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (read_image(self.data.files[index]), self.data.boxes[index].copy(),
                self.data.labels[index].copy())

    def _mosaic(self, index: int, rng: np.random.Generator):
        """Four images around a random centre of a 2S x 2S canvas, each fitted into S x S."""
        size = self.augment.img_size
        canvas = np.full((2 * size, 2 * size, 3), int(self.preprocess.pad_value), np.uint8)
        cx, cy = (int(v) for v in rng.uniform(0.5 * size, 1.5 * size, 2))
        indices = [index, *rng.integers(0, len(self), 3)]
        all_boxes, all_labels = [], []
        for corner, item in enumerate(indices):
            image, boxes, labels = self._load(int(item))
            image, boxes = _resize(image, boxes, size / max(image.shape[:2]))
            h, w = image.shape[:2]
            x0 = cx - w if corner in (0, 2) else cx
            y0 = cy - h if corner in (0, 1) else cy
            # paste the part that falls on the canvas
            cx0, cy0 = max(x0, 0), max(y0, 0)
            cx1, cy1 = min(x0 + w, 2 * size), min(y0 + h, 2 * size)
            canvas[cy0:cy1, cx0:cx1] = image[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
            shifted = boxes + np.array([x0, y0, x0, y0], dtype=np.float32)
            shifted[:, 0::2] = shifted[:, 0::2].clip(cx0, cx1)
            shifted[:, 1::2] = shifted[:, 1::2].clip(cy0, cy1)
            all_boxes.append(shifted)
            all_labels.append(labels)
        return canvas, np.concatenate(all_boxes), np.concatenate(all_labels)

    def _augmented(self, index: int, rng: np.random.Generator, allow_mixup: bool = True):
        cfg = self.augment
        if cfg.mosaic_prob and rng.random() < cfg.mosaic_prob:
            image, boxes, labels = self._mosaic(index, rng)
            fit = 1.0                   # the 2S canvas, as MMDetection resizes around 2S
        else:
            image, boxes, labels = self._load(index)
            fit = cfg.img_size / max(image.shape[:2])
        image, boxes = _resize(image, boxes, fit * rng.uniform(*cfg.scale_range))
        image, boxes, labels = _crop(image, boxes, labels, cfg.img_size, rng, cfg.min_box_side)
        if rng.random() < cfg.flip_prob:
            image = image[:, ::-1]
            width = image.shape[1]
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]],
                             axis=1) if len(boxes) else boxes
        canvas = np.full((cfg.img_size, cfg.img_size, 3), int(self.preprocess.pad_value), np.uint8)
        canvas[:image.shape[0], :image.shape[1]] = image
        if allow_mixup and cfg.mixup_prob and rng.random() < cfg.mixup_prob:
            other, other_boxes, other_labels = self._augmented(
                int(rng.integers(0, len(self))), rng, allow_mixup=False)
            canvas = ((canvas.astype(np.float32) + other.astype(np.float32)) / 2).astype(np.uint8)
            boxes = np.concatenate([boxes, other_boxes])
            labels = np.concatenate([labels, other_labels])
        return canvas, boxes.astype(np.float32), labels

    def normalise(self, image_rgb: np.ndarray) -> torch.Tensor:
        image = image_rgb[:, :, ::-1] if self.preprocess.channel_order == 'bgr' else image_rgb
        image = (image.astype(np.float32) - np.asarray(self.preprocess.mean, np.float32)) \
            / np.asarray(self.preprocess.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, boxes, labels = self._augmented(index, rng)
        return self.normalise(image), torch.from_numpy(boxes), torch.from_numpy(labels)


def collate(samples):
    images, boxes, labels = zip(*samples)
    return torch.stack(images), list(boxes), list(labels)
