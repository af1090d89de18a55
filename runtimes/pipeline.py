"""Host-side detection loop shared by every backend: read, preprocess, batch, run, rescale
(and, for instance models, paste the masks into the original image with `core.masks`).

Images are streamed in batches, so memory stays bounded however many files there are.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from detdeploy.core.detections import ImageDetections, check_outputs, enclosing_boxes
from detdeploy.core.errors import DetdeployError, ImageError
from detdeploy.core.masks import MaskConfig, paste_masks
from detdeploy.core.memory import check_memory, image_batch_bytes
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.core.tasks import DETECT, INSTANCE, ROTATED

from .backend import Backend
from .preprocess import (DEFAULT_MAX_PIXELS, ImageMeta, batch_canvas_size, preprocess_into,
                         read_image, rescale_boxes, rescale_rotated_boxes)


def require_detections(backend: Backend) -> None:
    """Detections need a model whose graph ends in NMS, of a task this host code handles."""
    metadata = backend.metadata
    if not metadata.has_nms:
        raise DetdeployError(f'{backend.source} was exported with '
                             '--nms none (raw outputs); detection needs a file exported with '
                             '--nms onnx')
    if metadata.task not in (DETECT, ROTATED, INSTANCE):
        raise DetdeployError(f"{metadata.arch}: turning '{metadata.task}' outputs into "
                             'detections is not implemented (boxes, masks, rotated boxes only)')


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def prepare_batch(images_rgb: list[np.ndarray], config: PreprocessConfig
                  ) -> tuple[np.ndarray, list[ImageMeta]]:
    """Stage 1: RGB images -> one [B, 3, H, W] float32 network batch and each image's geometry."""
    canvas_hw = batch_canvas_size(images_rgb, config)
    batch = np.empty((len(images_rgb), 3, *canvas_hw), dtype=np.float32)
    metas = [preprocess_into(image, config, slot) for image, slot in zip(images_rgb, batch)]
    return batch, metas


def to_detections(outputs: tuple[np.ndarray, ...], names: list[str], metas: list[ImageMeta],
                  class_names: tuple[str, ...], source: str = 'the model',
                  mask_config: MaskConfig | None = None,
                  timings_ms: dict[str, float] | None = None) -> list[ImageDetections]:
    """Stage 3: a backend's NMS outputs -> detections in original-image pixels. The outputs
    are checked first (`core.detections.check_outputs`: counts, label range, finite values);
    `source` names the model in that error. Rotated boxes ([B, K, 5]) are rescaled as such,
    with their enclosing boxes as `boxes_xyxy_px`. Instance outputs (a fifth, `masks`) need
    `mask_config` (the file's `metadata.mask`) and give each detection its mask at the
    original size; the time spent pasting is added to `timings_ms['mask_paste']` if given."""
    task = (INSTANCE if len(outputs) == 5 else
            ROTATED if outputs[1].shape[-1] == 5 else DETECT)
    if task == INSTANCE and mask_config is None:
        raise DetdeployError(f'{source}: instance outputs need the mask settings of the '
                             "model's metadata (mask)")
    check_outputs(outputs, task, 'onnx', len(class_names), source)
    num_dets, batch_boxes, batch_scores, batch_labels = outputs[:4]
    results = []
    for index, (name, meta) in enumerate(zip(names, metas)):
        count = int(num_dets[index, 0])
        boxes, scores, labels = (batch_boxes[index, :count], batch_scores[index, :count],
                                 batch_labels[index, :count])
        if boxes.shape[-1] == 5:
            rotated = rescale_rotated_boxes(boxes, meta)
            results.append(ImageDetections(name, meta.original_hw, enclosing_boxes(rotated),
                                           scores.astype(np.float32), labels.astype(np.int64),
                                           class_names, rotated_boxes=rotated))
            continue
        boxes = rescale_boxes(boxes, meta)
        # The network clamps to its padded input; a box lying wholly in the padding is
        # empty once clamped to the image, and is dropped.
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        masks = None
        if task == INSTANCE:
            started = time.perf_counter()
            masks = paste_masks(outputs[4][index, :count][inside], mask_config, boxes[inside],
                                meta.original_hw, meta.scale_wh)
            if timings_ms is not None:
                timings_ms['mask_paste'] = (timings_ms.get('mask_paste', 0.0)
                                            + 1e3 * (time.perf_counter() - started))
        results.append(ImageDetections(name, meta.original_hw, boxes[inside],
                                       scores[inside].astype(np.float32),
                                       labels[inside].astype(np.int64), class_names, masks))
    return results


def source_name(source: str | Path | np.ndarray) -> str:
    return str(source) if not isinstance(source, np.ndarray) else '<array>'


def detect(backend: Backend, sources: Iterable[str | Path | np.ndarray], batch_size: int = 1,
           keep_images: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
           on_unreadable: Callable[[str | Path | np.ndarray, ImageError], None] | None = None
           ) -> Iterator[tuple[ImageDetections, np.ndarray | None]]:
    """Yield (detections, RGB image if `keep_images`) per source, in order.

    Per batch: read, `prepare_batch`, `backend.run`, `to_detections` (the stages that
    `detdeploy bench` times one by one). An image that cannot be read raises `ImageError`, or,
    with `on_unreadable`, is passed to it with the error and skipped."""
    require_detections(backend)
    config = backend.preprocess_config
    sources = list(sources)
    images_per_pass = min(batch_size, len(sources))
    check_memory(image_batch_bytes(images_per_pass, *config.input_size),
                 f'a batch of {images_per_pass} images at {config.input_size[0]}x'
                 f'{config.input_size[1]} (--batch)')
    for chunk in _batches(sources, batch_size):
        readable, images = [], []
        for source in chunk:
            try:
                images.append(read_image(source, max_pixels=max_pixels))
            except ImageError as error:
                if on_unreadable is None:
                    raise
                on_unreadable(source, error)
                continue
            readable.append(source)
        if not readable:
            continue
        batch, metas = prepare_batch(images, config)
        outputs = backend.run(batch)
        detections = to_detections(outputs, [source_name(s) for s in readable], metas,
                                   backend.class_names, backend.source, backend.metadata.mask)
        for image, image_detections in zip(images, detections):
            yield image_detections, image if keep_images else None
