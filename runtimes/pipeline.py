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

    def run(self, batch: np.ndarray, clamp_hw: list[tuple[int, int]]
            ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]: ...


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
        outputs = backend.run(batch, [meta.resized_hw for _, meta in prepared])
        for source, image, (_, meta), (boxes, scores, labels) in zip(
                chunk, images, prepared, outputs):
            name = str(source) if not isinstance(source, np.ndarray) else '<array>'
            detections = ImageDetections(name, meta.original_hw, rescale_boxes(boxes, meta),
                                         scores.astype(np.float32), labels.astype(np.int64),
                                         backend.class_names)
            yield detections, image if keep_images else None
