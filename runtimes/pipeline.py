"""Host-side detection loop shared by every backend: read, preprocess, batch, run, rescale.

Images are streamed in batches, so memory stays bounded however many files there are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np

from .detections import ImageDetections
from .preprocess import PreprocessConfig, preprocess, read_image, rescale_boxes


class Backend(Protocol):
    name: str
    preprocess_config: PreprocessConfig
    class_names: tuple[str, ...]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """num_dets [B, 1], boxes [B, K, 4] (network-input px), scores [B, K], labels [B, K]."""


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def detect(backend: Backend, sources: Iterable[str | Path | np.ndarray], batch_size: int = 1,
           keep_images: bool = False) -> Iterator[tuple[ImageDetections, np.ndarray | None]]:
    """Yield (detections, RGB image if `keep_images`) per source, in order."""
    config = backend.preprocess_config
    for chunk in _batches(list(sources), batch_size):
        images = [read_image(source) for source in chunk]
        prepared = [preprocess(image, config) for image in images]
        batch = np.stack([tensor for tensor, _ in prepared])
        num_dets, batch_boxes, batch_scores, batch_labels = backend.run(batch)
        for index, (source, image, (_, meta)) in enumerate(zip(chunk, images, prepared)):
            count = int(num_dets[index, 0])
            boxes, scores, labels = (batch_boxes[index, :count], batch_scores[index, :count],
                                     batch_labels[index, :count])
            name = str(source) if not isinstance(source, np.ndarray) else '<array>'
            boxes = rescale_boxes(boxes, meta)
            # The network clamps to its padded input; a box lying wholly in the padding is
            # empty once clamped to the image, and is dropped.
            inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            detections = ImageDetections(name, meta.original_hw, boxes[inside],
                                         scores[inside].astype(np.float32),
                                         labels[inside].astype(np.int64), backend.class_names)
            yield detections, image if keep_images else None
