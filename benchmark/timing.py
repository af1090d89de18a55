"""The `detdeploy bench` pipeline: per-stage latency and throughput of `runtimes` backends,
measured in alternating rounds on images held in memory.

Times any `Backend` through the stages of `runtimes.pipeline.detect` one by one; returns every
sample as data. Printing, JSON and plots live in `report`; statistics in `stats`.
"""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from detdeploy.benchmark.stats import alternating_schedule, paired_ratios
from detdeploy.benchmark.system import load_average, system_info
from detdeploy.core.errors import DetdeployError
from detdeploy.core.memory import check_memory, image_batch_bytes
from detdeploy.runtimes.backend import IO_BINDING, Backend
from detdeploy.runtimes.pipeline import prepare_batch, require_detections, to_detections

STAGES = ('preprocess', 'inference', 'postprocess', 'end_to_end')
IO_BINDING_KEY = 'inference_io_binding'
MASK_PASTE_KEY = 'mask_paste'   # instance models: masks pasted into the image, within postprocess
MAX_SECONDS = 3600.0            # --seconds per configuration
MAX_IMAGES = 64                 # images decoded into memory from --images
GENERATED_SIZES_HW = ((480, 640), (640, 480), (427, 640), (640, 427), (360, 640), (512, 512),
                      (375, 500), (500, 375))          # typical COCO shapes
GPU_PROVIDERS = ('CUDAExecutionProvider', 'TensorrtExecutionProvider')
INFERENCE_METHODS = {'torch': 'model call incl. host<->device copies',
                     'ort': 'session.run incl. host<->device copies',
                     'trt': 'engine run incl. host<->device copies'}


@dataclass(eq=False)
class Entry:
    """One backend as shown in the tables: the model's display name, the backend, and notes for
    the header; shared by its batch sizes. What runs where comes from `backend.describe()`."""
    model: str                           # registry name or file name
    backend: Backend
    notes: list[str] = field(default_factory=list)
    description: dict = field(init=False)
    _bindings: dict = field(default_factory=dict, init=False)   # one per batch size, reused

    def __post_init__(self) -> None:
        if self.backend.metadata.has_nms:
            require_detections(self.backend)      # the postprocess stage makes detections
        self.description = self.backend.describe()
        if self.backend.fallback:
            self.notes.append(f'{self.model}: {self.backend.fallback}')
        static_batch = self.backend.metadata.batch
        if static_batch is not None:
            self.notes.append(f'{self.model} has a static batch of {static_batch}: other batch '
                              'sizes are padded or split into several runs')

    @property
    def device(self) -> str:
        return str(self.description['device'])

    @property
    def providers(self) -> list[str]:
        return list(self.description['providers'])

    @property
    def threads(self) -> dict:
        return dict(self.description['threads'])

    @property
    def weights(self) -> str:
        return str(self.description['weights'])

    @property
    def nms_mode(self) -> str:
        """torch (NMS in PyTorch, eager), or the file's: onnx, trt or none (raw outputs)."""
        return 'torch' if self.backend.name == 'torch' else self.backend.metadata.nms_mode

    @property
    def raw_outputs(self) -> bool:
        return not self.backend.metadata.has_nms

    @property
    def nms(self) -> dict | None:
        """The NMS settings the outputs were produced with; None without NMS or when the
        file does not say (a file from another tool)."""
        settings = self.backend.metadata.nms
        return settings.to_dict() if settings is not None and not self.raw_outputs else None

    @property
    def uses_io_binding(self) -> bool:
        """Inference-only is timed through an I/O binding when the backend has one and runs on a
        GPU (on the CPU a binding is the same as `run`)."""
        return self.backend.has(IO_BINDING) and self.providers[0] in GPU_PROVIDERS

    def binding_for(self, batch_size: int):
        if batch_size not in self._bindings:
            self._bindings[batch_size] = self.backend.io_binding()
        return self._bindings[batch_size]

    @property
    def inference_only_method(self) -> str:
        if self.uses_io_binding:
            return ('ONNX Runtime I/O binding: input copied to the device before the clock '
                    'starts, outputs left there')
        return INFERENCE_METHODS.get(self.backend.name, 'backend run incl. host<->device copies')


@dataclass
class ConfigResult:
    """Every sample of one (model, backend, device, batch), in milliseconds per batch."""
    label: str
    entry: Entry
    batch: int
    samples_ms: dict[str, list[float]] = field(default_factory=dict)
    fed_shapes: Counter = field(default_factory=Counter)   # (B, 3, H, W) -> timed rounds

    @property
    def input_shapes(self) -> list[tuple[list[int], int]]:
        """The network input shapes actually fed in the timed rounds, most rounds first, with
        their round counts: one shape for a fixed-size model; for one padded to its size divisor
        (RetinaNet, Faster R-CNN, YOLOv3) each batch's own canvas, which follows the images."""
        return [(list(shape), count) for shape, count in
                sorted(self.fed_shapes.items(), key=lambda item: (-item[1], item[0]))]

    @property
    def input_shape(self) -> list[int]:
        """The shape fed in most rounds (before any round: the model's configured size)."""
        shapes = self.input_shapes
        if shapes:
            return shapes[0][0]
        return [self.batch, 3, *self.entry.backend.preprocess_config.input_size]

    def describe_input(self) -> str:
        """`1x3x800x1088` or, when rounds fed several shapes, each with its round count."""
        shapes = self.input_shapes
        if len(shapes) <= 1:
            return 'x'.join(map(str, self.input_shape))
        return ', '.join(f"{'x'.join(map(str, shape))} ({count} rounds)"
                         for shape, count in shapes)

    @property
    def inference_only_key(self) -> str:
        return IO_BINDING_KEY if IO_BINDING_KEY in self.samples_ms else 'inference'


@dataclass
class BenchResult:
    system: dict
    settings: dict
    configs: list[ConfigResult]
    load_average_end: list[float] | None = None
    seconds: float = 0.0

    def ratios(self, index: int, key: str) -> np.ndarray:
        """Per-round time-per-image ratios of config `index` to the first (the baseline)."""
        row, baseline = self.configs[index], self.configs[0]
        baseline_key = key if key != 'inference_only' else baseline.inference_only_key
        row_key = key if key != 'inference_only' else row.inference_only_key
        return paired_ratios(row.samples_ms[row_key], row.batch,
                             baseline.samples_ms[baseline_key], baseline.batch)


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(',') if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise DetdeployError(f"{flag} '{text}': give positive integers separated by commas")
    return tuple(dict.fromkeys(values))


def check_batch_memory(max_batch: int, input_sizes: list[tuple[int, int]],
                       images: int | None = None) -> None:
    """Refuse a --batch whose network input (at the largest input size) and generated images
    cannot fit in memory, before any image is made."""
    count = images if images is not None else max(len(GENERATED_SIZES_HW), max_batch)
    largest = max((h * w for h, w in input_sizes), default=0)
    per_image = sum(3 * h * w for h, w in GENERATED_SIZES_HW) // len(GENERATED_SIZES_HW)
    check_memory(max_batch * image_batch_bytes(1, 1, largest) + count * per_image,
                 f'--batch {max_batch}')


def generated_images(count: int) -> list[np.ndarray]:
    """Deterministic RGB images of typical COCO sizes: colour blocks on noise."""
    images = []
    for index in range(count):
        height, width = GENERATED_SIZES_HW[index % len(GENERATED_SIZES_HW)]
        rng = np.random.default_rng(index)
        image = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
        for _ in range(6):
            top, left = rng.integers(0, height - 40), rng.integers(0, width - 40)
            bottom = top + rng.integers(20, height // 2)
            right = left + rng.integers(20, width // 2)
            image[top:bottom, left:right] = rng.integers(60, 255, 3, dtype=np.uint8)
        images.append(image)
    return images


def load_images(folder: str | Path | None, max_batch: int,
                max_pixels: int | None = None) -> tuple[list[np.ndarray], list[str], str]:
    """Images decoded once into memory, their names, and a description for the header."""
    if folder is None:
        check_batch_memory(max_batch, [])
        count = max(len(GENERATED_SIZES_HW), max_batch)
        sizes = sorted({f'{w}x{h}' for h, w in GENERATED_SIZES_HW[:count]})
        return (generated_images(count), ['<generated>'] * count,
                f'{count} generated images ({", ".join(sizes)}), decoded once and kept in '
                'memory: no disk I/O or decoding is timed')
    from detdeploy.inference.batch import collect_images
    from detdeploy.runtimes.preprocess import read_image
    if not Path(folder).is_dir():
        raise DetdeployError(f'--images {folder}: not a directory')
    paths = collect_images([folder])[:max(MAX_IMAGES, max_batch)]
    images = [read_image(path, max_pixels=max_pixels) for path in paths]
    return (images, [str(path) for path in paths],
            f'{len(images)} images from {folder} (sorted, at most {max(MAX_IMAGES, max_batch)}), '
            'decoded once and kept in memory: no disk I/O or decoding is timed')


def _batch_images(images: list[np.ndarray], names: list[str], round_index: int, batch: int
                  ) -> tuple[list[np.ndarray], list[str]]:
    """The images of one iteration: the same ones for every configuration of a round."""
    picks = [(round_index * batch + offset) % len(images) for offset in range(batch)]
    return [images[i] for i in picks], [names[i] for i in picks]


def time_iteration(entry: Entry, images: list[np.ndarray], names: list[str]
                   ) -> tuple[dict[str, float], tuple[int, ...]]:
    """One timed pass, image arrays in, rescaled detections out: milliseconds per stage, and
    the shape of the network input that was fed."""
    clock = time.perf_counter
    backend = entry.backend
    backend.synchronize()
    started = clock()
    batch, metas = prepare_batch(images, backend.preprocess_config)
    prepared = clock()
    outputs = backend.run(batch)
    backend.synchronize()
    inferred = clock()
    host_stages: dict[str, float] = {}
    if not entry.raw_outputs:
        to_detections(outputs, names, metas, backend.class_names, backend.source,
                      backend.metadata.mask, host_stages)
    finished = clock()
    sample = {'preprocess': (prepared - started) * 1e3, 'inference': (inferred - prepared) * 1e3,
              'postprocess': (finished - inferred) * 1e3, 'end_to_end': (finished - started) * 1e3}
    if backend.metadata.mask is not None and not entry.raw_outputs:
        # instance models: the host's mask paste, a part of postprocess
        sample[MASK_PASTE_KEY] = host_stages.get(MASK_PASTE_KEY, 0.0)
    if entry.uses_io_binding:
        binding = entry.binding_for(len(batch))
        binding.set_input(batch)
        backend.synchronize()
        bound_start = clock()
        binding.run()               # ONNX Runtime returns once the device has finished
        sample[IO_BINDING_KEY] = (clock() - bound_start) * 1e3
    return sample, tuple(int(side) for side in batch.shape)


def config_label(entry: Entry, batch: int) -> str:
    return f'{entry.model} {entry.backend.name}/{entry.device} b{batch}'


def run_benchmark(entries: list[Entry], batches: tuple[int, ...], images: list[np.ndarray],
                  names: list[str], images_description: str, warmup: int = 10,
                  iters: int | None = 100, seconds: float | None = None,
                  progress: Callable[[int], None] | None = None) -> BenchResult:
    """Time every (entry, batch) in alternating rounds: `warmup` untimed rounds, then `iters`
    rounds (or rounds for about `seconds` per configuration); one sample per configuration per
    round. `progress(round)` is called after each timed round."""
    if not entries:
        raise DetdeployError('nothing to benchmark: no models given')
    if not images:
        raise DetdeployError('no images to benchmark with')
    if seconds is not None and not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise DetdeployError(f'--seconds {seconds}: give a number of seconds above 0 and at '
                             f'most {MAX_SECONDS:g} per configuration')
    check_batch_memory(max(batches), [entry.backend.preprocess_config.input_size
                                      for entry in entries], len(images))
    configs = [ConfigResult(config_label(entry, batch), entry, batch)
               for entry in entries for batch in batches]
    system = system_info()
    for _, index in alternating_schedule(len(configs), rounds=warmup):
        config = configs[index]
        time_iteration(config.entry, *_batch_images(images, names, 0, config.batch))
    started = time.perf_counter()
    schedule = (alternating_schedule(len(configs), rounds=iters) if seconds is None else
                alternating_schedule(len(configs), seconds=seconds * len(configs)))
    for round_index, index in schedule:
        config = configs[index]
        sample, fed_shape = time_iteration(
            config.entry, *_batch_images(images, names, round_index, config.batch))
        config.fed_shapes[fed_shape] += 1
        for key, value in sample.items():
            config.samples_ms.setdefault(key, []).append(value)
        if progress is not None and index == len(configs) - 1:
            progress(round_index)
    elapsed = time.perf_counter() - started
    settings = {'warmup_rounds': warmup, 'rounds': len(configs[0].samples_ms['end_to_end']),
                'iters': iters, 'seconds_per_config': seconds, 'images': images_description,
                'schedule': 'alternating rounds: every configuration once per round, '
                            'in table order',
                'timer': 'time.perf_counter, device synchronised before each reading'}
    return BenchResult(system, settings, configs, load_average(), elapsed)
