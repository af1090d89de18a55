"""COCO-format detection data for training: reading annotation files and RTMDet's training
augmentation (keep-ratio random resize, random crop, flip, pad; mosaic and mix-up as options).
For instance models each object's mask (`segmentation`) goes through the same steps, resized
nearest-neighbour as MMDetection's `BitmapMasks`.

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
    # per image, the kept annotations' masks as compressed COCO RLE (with_masks only)
    masks: tuple[tuple[dict, ...], ...] | None = None


def _as_rle(segmentation, height: int, width: int, where: str) -> dict:
    """A compressed RLE of a COCO `segmentation` (polygons, RLE with string or list counts)."""
    from pycocotools import mask as mask_utils
    try:
        if isinstance(segmentation, list):
            if not segmentation:
                return mask_utils.encode(np.zeros((height, width, 1), np.uint8, order='F'))[0]
            return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        if isinstance(segmentation, dict) and list(segmentation.get('size', [])) != [height, width]:
            raise ValueError(f"size {segmentation.get('size')} is not the image's "
                             f'{[height, width]}')
        if isinstance(segmentation, dict) and isinstance(segmentation.get('counts'), list):
            return mask_utils.frPyObjects(segmentation, height, width)
        if isinstance(segmentation, dict) and isinstance(segmentation.get('counts'), str):
            return {'size': [height, width], 'counts': segmentation['counts'].encode('ascii')}
        raise ValueError('must be polygons or an RLE object')
    except (ValueError, TypeError, IndexError, UnicodeEncodeError) as exc:
        raise DetdeployError(f'{where}: segmentation: {str(exc).splitlines()[0]}') from None


def read_coco(ann_file: str | Path, image_dir: str | Path, with_masks: bool = False) -> CocoSet:
    """Read a COCO instances file; crowd boxes and boxes under 1 px are left out. `with_masks`:
    every kept annotation must have a `segmentation` (instance models train on it)."""
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
    image_hw = {image['id']: (image.get('height'), image.get('width')) for image in images}
    masks_of: dict[int, list] = {image['id']: [] for image in images}
    for index, ann in enumerate(annotations):
        x, y, w, h = ann['bbox']
        if ann.get('iscrowd', 0) or w < 1 or h < 1 or ann['image_id'] not in per_image:
            continue
        per_image[ann['image_id']].append((x, y, x + w, y + h, label_of[ann['category_id']]))
        if with_masks:
            where = f'{ann_path}: annotations[{index}]'
            if 'segmentation' not in ann:
                raise DetdeployError(f'{where}: no segmentation (instance models train on masks)')
            height, width = image_hw[ann['image_id']]
            if not (isinstance(height, int) and isinstance(width, int) and height > 0
                    and width > 0):
                raise DetdeployError(f'{where}: its image has no height/width (needed to read '
                                     'the segmentation)')
            masks_of[ann['image_id']].append(_as_rle(ann['segmentation'], height, width, where))
    boxes, labels = [], []
    for image in images:
        rows = np.asarray(per_image[image['id']], dtype=np.float32).reshape(-1, 5)
        boxes.append(rows[:, :4].copy())
        labels.append(rows[:, 4].astype(np.int64))
    masks = tuple(tuple(masks_of[image['id']]) for image in images) if with_masks else None
    return CocoSet(tuple(c['name'] for c in categories), tuple(c['id'] for c in categories),
                   tuple(image_path(image_root, image['file_name']) for image in images),
                   tuple(image['id'] for image in images), tuple(boxes), tuple(labels), masks)


@dataclass(frozen=True)
class AugmentConfig:
    img_size: int = 320
    scale_range: tuple[float, float] = (0.5, 2.0)   # random resize around the fitting scale
    flip_prob: float = 0.5
    mosaic_prob: float = 0.0
    mixup_prob: float = 0.0
    min_box_side: float = 1.0                        # px after cropping


def _resize(image: np.ndarray, boxes: np.ndarray, scale: float, masks: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    height, width = image.shape[:2]
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))
    factors = np.array([new_w / width, new_h / height] * 2, dtype=np.float32)
    return resized, boxes * factors, None if masks is None else _resize_masks(masks, new_h, new_w)


def _resize_masks(masks: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """[n, H, W] -> [n, new_h, new_w], nearest neighbour at pixel centres (the same geometry as
    the image's bilinear resize)."""
    height, width = masks.shape[1:]
    rows = np.minimum(((np.arange(new_h) + 0.5) * height / new_h).astype(np.int64), height - 1)
    cols = np.minimum(((np.arange(new_w) + 0.5) * width / new_w).astype(np.int64), width - 1)
    return masks[:, rows][:, :, cols]


def _crop(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, size: int,
          rng: np.random.Generator, min_side: float, masks: np.ndarray | None = None):
    """A random size x size window (smaller if the image is); boxes clipped, tiny ones dropped
    (with their masks)."""
    height, width = image.shape[:2]
    top = int(rng.integers(0, height - size + 1)) if height > size else 0
    left = int(rng.integers(0, width - size + 1)) if width > size else 0
    image = image[top:top + size, left:left + size]
    boxes = boxes - np.array([left, top, left, top], dtype=np.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image.shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image.shape[0])
    keep = ((boxes[:, 2] - boxes[:, 0]) > min_side) & ((boxes[:, 3] - boxes[:, 1]) > min_side)
    if masks is not None:
        masks = masks[keep, top:top + size, left:left + size]
    return image, boxes[keep], labels[keep], masks


def _decode_masks(rles: tuple[dict, ...], height: int, width: int) -> np.ndarray:
    """[n, H, W] bool of compressed RLEs."""
    from pycocotools import mask as mask_utils
    if not rles:
        return np.zeros((0, height, width), bool)
    return np.ascontiguousarray(mask_utils.decode(list(rles)).transpose(2, 0, 1).astype(bool))


class CocoDetectionDataset(torch.utils.data.Dataset):
    """Training samples: (normalised [3, S, S] tensor, boxes [n, 4] xyxy, labels [n]), and masks
    [n, S, S] bool after them when the set was read `with_masks`."""

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

    @property
    def with_masks(self) -> bool:
        return self.data.masks is not None

    def _load(self, index: int):
        """image, boxes, labels, masks (None without masks)."""
        image = read_image(self.data.files[index])
        masks = None
        if self.with_masks:
            masks = _decode_masks(self.data.masks[index], *image.shape[:2])
            if masks.shape[1:] != image.shape[:2]:
                raise DetdeployError(f'{self.data.files[index]}: the image is '
                                     f'{image.shape[1]}x{image.shape[0]}, its masks '
                                     f'{masks.shape[2]}x{masks.shape[1]}')
        return image, self.data.boxes[index].copy(), self.data.labels[index].copy(), masks

    def _mosaic(self, index: int, rng: np.random.Generator):
        """Four images around a random centre of a 2S x 2S canvas, each fitted into S x S."""
        size = self.augment.img_size
        canvas = np.full((2 * size, 2 * size, 3), int(self.preprocess.pad_value), np.uint8)
        cx, cy = (int(v) for v in rng.uniform(0.5 * size, 1.5 * size, 2))
        indices = [index, *rng.integers(0, len(self), 3)]
        all_boxes, all_labels, all_masks = [], [], []
        for corner, item in enumerate(indices):
            image, boxes, labels, masks = self._load(int(item))
            image, boxes, masks = _resize(image, boxes, size / max(image.shape[:2]), masks)
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
            if masks is not None:
                pasted = np.zeros((len(masks), 2 * size, 2 * size), bool)
                pasted[:, cy0:cy1, cx0:cx1] = masks[:, cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
                all_masks.append(pasted)
        return (canvas, np.concatenate(all_boxes), np.concatenate(all_labels),
                np.concatenate(all_masks) if self.with_masks else None)

    def _augmented(self, index: int, rng: np.random.Generator, allow_mixup: bool = True):
        cfg = self.augment
        if cfg.mosaic_prob and rng.random() < cfg.mosaic_prob:
            image, boxes, labels, masks = self._mosaic(index, rng)
            fit = 1.0                   # the 2S canvas, as MMDetection resizes around 2S
        else:
            image, boxes, labels, masks = self._load(index)
            fit = cfg.img_size / max(image.shape[:2])
        image, boxes, masks = _resize(image, boxes, fit * rng.uniform(*cfg.scale_range), masks)
        image, boxes, labels, masks = _crop(image, boxes, labels, cfg.img_size, rng,
                                            cfg.min_box_side, masks)
        if rng.random() < cfg.flip_prob:
            image = image[:, ::-1]
            width = image.shape[1]
            boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]],
                             axis=1) if len(boxes) else boxes
            masks = None if masks is None else masks[:, :, ::-1]
        canvas = np.full((cfg.img_size, cfg.img_size, 3), int(self.preprocess.pad_value), np.uint8)
        canvas[:image.shape[0], :image.shape[1]] = image
        if masks is not None:
            padded = np.zeros((len(masks), cfg.img_size, cfg.img_size), bool)
            padded[:, :masks.shape[1], :masks.shape[2]] = masks
            masks = padded
        if allow_mixup and cfg.mixup_prob and rng.random() < cfg.mixup_prob:
            other, other_boxes, other_labels, other_masks = self._augmented(
                int(rng.integers(0, len(self))), rng, allow_mixup=False)
            canvas = ((canvas.astype(np.float32) + other.astype(np.float32)) / 2).astype(np.uint8)
            boxes = np.concatenate([boxes, other_boxes])
            labels = np.concatenate([labels, other_labels])
            masks = None if masks is None else np.concatenate([masks, other_masks])
        return canvas, boxes.astype(np.float32), labels, masks

    def normalise(self, image_rgb: np.ndarray) -> torch.Tensor:
        image = image_rgb[:, :, ::-1] if self.preprocess.channel_order == 'bgr' else image_rgb
        image = (image.astype(np.float32) - np.asarray(self.preprocess.mean, np.float32)) \
            / np.asarray(self.preprocess.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, boxes, labels, masks = self._augmented(index, rng)
        sample = (self.normalise(image), torch.from_numpy(boxes), torch.from_numpy(labels))
        return sample if masks is None else (*sample, torch.from_numpy(masks))


def collate(samples):
    """(images [B, 3, S, S], boxes, labels[, masks]) with per-image lists after the images."""
    images, *per_image = zip(*samples)
    return (torch.stack(images), *(list(values) for values in per_image))
