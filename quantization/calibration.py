"""Calibration: images preprocessed exactly as inference preprocesses them (the file's own
metadata, `runtimes.pipeline.prepare_batch`), and activation ranges collected from them.

Drives ONNX Runtime's calibrators directly, a few images at a time: `quantize_static` neither
passes the histogram bin options through (its Entropy result equals MinMax) nor bounds memory.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from detdeploy.core.errors import DetdeployError
from detdeploy.core.metadata import ModelMetadata
from detdeploy.runtimes.pipeline import prepare_batch
from detdeploy.runtimes.preprocess import read_image

METHODS = ('minmax', 'percentile', 'entropy')
IMAGES_PER_PASS = 4             # images run through the calibrator at once (bounds memory)


@dataclass(frozen=True)
class CalibrationOptions:
    method: str = 'minmax'
    size: int = 100                     # images used (spread evenly over the folder)
    symmetric: bool = False             # zero-centred ranges (TensorRT's S8 activations)
    num_bins: int = 2048                # histogram bins (percentile, entropy)
    num_quantized_bins: int = 128       # entropy: candidate thresholds span num_bins / 2 ..
    percentile: float = 99.999

    def check(self) -> 'CalibrationOptions':
        if self.method not in METHODS:
            raise DetdeployError(f"calibration method '{self.method}': use "
                                 f"{', '.join(METHODS)}")
        if self.size < 1:
            raise DetdeployError(f'--calib-size {self.size}: give at least 1 image')
        if self.method == 'entropy' and self.num_bins <= self.num_quantized_bins:
            raise DetdeployError(f'entropy calibration needs more histogram bins ({self.num_bins})'
                                 f' than quantized bins ({self.num_quantized_bins}): with as '
                                 'many it has one candidate threshold and equals minmax')
        if not 0 < self.percentile <= 100:
            raise DetdeployError(f'percentile {self.percentile} is not in (0, 100]')
        return self


def select_images(paths: list[Path], size: int) -> list[Path]:
    """`size` of `paths` spread evenly over the sorted list (all of them if fewer)."""
    paths = sorted(paths)
    if len(paths) <= size:
        return paths
    picks = np.linspace(0, len(paths) - 1, size).round().astype(int)
    return [paths[i] for i in picks]


class CalibrationReader:
    """ONNX Runtime's `CalibrationDataReader` protocol (`get_next` -> {input: batch} or None)
    over image files, preprocessed as `detect` preprocesses them for this model: one image
    per batch, or the file's static batch (the last batch padded by repeating images)."""

    def __init__(self, paths: list[Path], metadata: ModelMetadata, input_name: str):
        if not paths:
            raise DetdeployError('no calibration images')
        self.paths = list(paths)
        self.metadata = metadata
        self.input_name = input_name
        self.batch_size = metadata.batch or 1
        self._batches = self.batches()

    def batches(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.paths), self.batch_size):
            chunk = self.paths[start:start + self.batch_size]
            chunk += [chunk[i % len(chunk)] for i in range(self.batch_size - len(chunk))]
            batch, _ = prepare_batch([read_image(path) for path in chunk],
                                     self.metadata.preprocess)
            yield batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self._batches = self.batches()

    def __len__(self) -> int:
        return -(-len(self.paths) // self.batch_size)


class _Slice:
    """At most `count` batches of a reader: one pass of the calibrator."""

    def __init__(self, reader: CalibrationReader, count: int):
        self.reader, self.left = reader, count

    def get_next(self):
        if self.left <= 0:
            return None
        self.left -= 1
        return self.reader.get_next()


def collect_ranges(model_path: str | Path, reader: CalibrationReader,
                   options: CalibrationOptions, work_dir: str | Path,
                   op_types: list[str] | None = None):
    """Activation ranges (ONNX Runtime `TensorsData`) of every float tensor that `op_types`
    nodes (None: all) of `model_path` read or write, over the reader's images, by
    `options.method`; histograms and minima/maxima accumulate over passes of a few images."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    method = {'minmax': CalibrationMethod.MinMax, 'percentile': CalibrationMethod.Percentile,
              'entropy': CalibrationMethod.Entropy}[options.method]
    settings = {'symmetric': options.symmetric}
    if options.method != 'minmax':
        settings['num_bins'] = options.num_bins
    if options.method == 'entropy':
        settings['num_quantized_bins'] = options.num_quantized_bins
    if options.method == 'percentile':
        settings['percentile'] = options.percentile
    with contextlib.redirect_stdout(io.StringIO()):     # the calibrators print progress
        calibrator = create_calibrator(
            Path(model_path), op_types or [],
            augmented_model_path=str(Path(work_dir) / 'augmented.onnx'),
            calibrate_method=method, providers=['CPUExecutionProvider'], extra_options=settings)
        reader.rewind()
        for _ in range(0, len(reader), IMAGES_PER_PASS):
            calibrator.collect_data(_Slice(reader, IMAGES_PER_PASS))
        return calibrator.compute_data()
