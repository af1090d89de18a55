"""The `detdeploy bench` pipeline: per-stage latency and throughput of detectors, measured in
alternating rounds on images held in memory.

Builds runners (one per model and backend) around the `runtimes` backends and times the stages
of `runtimes.pipeline.detect` one by one; returns every sample as data. Printing, JSON and
plots live in `bench_report`; statistics in `bench_stats`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from detdeploy.benchmark.stats import alternating_schedule, paired_ratios
from detdeploy.benchmark.system import load_average, system_info
from detdeploy.core.errors import DetdeployError
from detdeploy.runtimes.pipeline import prepare_batch, to_detections
from detdeploy.runtimes.preprocess import PreprocessConfig

STAGES = ('preprocess', 'inference', 'postprocess', 'end_to_end')
IO_BINDING_KEY = 'inference_io_binding'
MAX_IMAGES = 64                 # images decoded into memory from --images
GENERATED_SIZES_HW = ((480, 640), (640, 480), (427, 640), (640, 427), (360, 640), (512, 512),
                      (375, 500), (500, 375))          # typical COCO shapes
MODEL_FILE_BACKENDS = {'.onnx': 'ort', '.engine': 'trt', '.plan': 'trt'}
BACKENDS = ('torch', 'ort', 'trt')


@dataclass(eq=False)
class Runner:
    """One model on one backend and device, ready to time; shared by its batch sizes."""
    model: str                           # registry name or file name, as shown in the table
    backend: str                         # torch, ort or trt
    device: str
    run: Callable[[np.ndarray], tuple]   # preprocessed batch -> outputs, on the host
    preprocess_config: PreprocessConfig
    class_names: tuple[str, ...]
    nms_mode: str                        # torch (eager), onnx, trt or none (raw outputs)
    nms: dict | None
    providers: list[str]
    threads: dict
    weights: str
    sync: Callable[[], None] = lambda: None          # wait for the device before the clock
    # OnnxRuntimeBackend.io_binding (on a GPU provider): a binding with set_input(batch), run()
    io_binding: Callable[[], object] | None = None
    notes: list[str] = field(default_factory=list)
    _bindings: dict = field(default_factory=dict)       # one binding per batch size, reused

    def binding_for(self, batch_size: int):
        if batch_size not in self._bindings:
            self._bindings[batch_size] = self.io_binding()
        return self._bindings[batch_size]

    @property
    def raw_outputs(self) -> bool:
        return self.nms_mode == 'none'

    @property
    def inference_only_method(self) -> str:
        if self.io_binding is not None:
            return ('ONNX Runtime I/O binding: input copied to the device before the clock '
                    'starts, outputs left there')
        return {'torch': 'model call incl. host<->device copies',
                'ort': 'session.run incl. host<->device copies',
                'trt': 'engine run incl. host<->device copies'}[self.backend]


@dataclass
class ConfigResult:
    """Every sample of one (model, backend, device, batch), in milliseconds per batch."""
    label: str
    runner: Runner
    batch: int
    samples_ms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def input_shape(self) -> list[int]:
        return [self.batch, 3, *self.runner.preprocess_config.input_size]

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


def model_kind(model: str) -> str:
    """'ort' or 'trt' for model files (by suffix), 'torch' for registry names."""
    return MODEL_FILE_BACKENDS.get(Path(model).suffix.lower(), 'torch')


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(',') if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise DetdeployError(f"{flag} '{text}': give positive integers separated by commas")
    return tuple(dict.fromkeys(values))


def parse_backends(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(dict.fromkeys(part.strip().lower() for part in text.split(',') if part.strip()))
    unknown = [name for name in names if name not in BACKENDS]
    if not names or unknown:
        raise DetdeployError(f"--backend '{text}': choose from {', '.join(BACKENDS)}, "
                             'separated by commas')
    return names


def backends_for(model: str, requested: tuple[str, ...] | None) -> list[str]:
    """The backends a model runs on: a file's own backend; for a registry name, torch and
    (with an on-the-fly export) ort."""
    kind = model_kind(model)
    if kind != 'torch':
        if requested is not None and kind not in requested:
            raise DetdeployError(f"{model} runs on the {kind} backend, which --backend "
                                 f"{','.join(requested)} leaves out")
        return [kind]
    chosen = list(requested or ('torch',))
    if 'trt' in chosen:
        raise DetdeployError(f"--backend trt needs an .engine file, not the registry name "
                             f"'{model}' (build one with detdeploy build-engine)")
    return chosen


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


def resolve_input_size(config: PreprocessConfig, input_hw: tuple[int, int] | None
                       ) -> PreprocessConfig:
    return config if input_hw is None else dataclasses.replace(config, input_size=input_hw)


def torch_runner(detector, device: str, nms, input_hw: tuple[int, int] | None,
                 threads: int | None) -> Runner:
    """A registry model in PyTorch eager mode, post-processed by its own (eager) NMS."""
    import torch

    from detdeploy.runtimes.torch_backend import TorchBackend
    if threads:
        torch.set_num_threads(threads)
    config = resolve_input_size(detector.spec.preprocessing, input_hw)
    backend = TorchBackend(detector, nms=nms, device=device, preprocess_config=config)
    on_cuda = backend.device.type == 'cuda'
    return Runner(
        model=detector.spec.name, backend='torch', device=device, run=backend.run,
        preprocess_config=config, class_names=backend.class_names, nms_mode='torch',
        nms=nms.to_dict(), providers=[f'torch {backend.device}'],
        threads={'torch_intra_op': torch.get_num_threads(),
                 'torch_inter_op': torch.get_num_interop_threads()},
        weights=detector.source, sync=torch.cuda.synchronize if on_cuda else (lambda: None))


def ort_runner(path: str | Path, device: str, threads: int | None,
               input_hw: tuple[int, int] | None, display_name: str | None = None,
               overrides=None) -> Runner:
    """A detdeploy ONNX file in ONNX Runtime; `--nms none` files run without post-processing.
    `overrides` (`metadata.ModelOverrides`): class names, input size and, for files from other
    tools, preprocessing."""
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
    backend = OnnxRuntimeBackend(path, OrtOptions(device=device, threads=threads),
                                 overrides=overrides)
    metadata = backend.metadata
    config = metadata.preprocess
    if input_hw is not None and tuple(input_hw) != tuple(config.input_size):
        if not metadata.dynamic_shape:
            raise DetdeployError(f'{path} has a fixed {config.input_size[0]}x'
                                 f'{config.input_size[1]} input; --input-size '
                                 f'{input_hw[0]}x{input_hw[1]} needs a --dynamic-shape export')
        config = resolve_input_size(config, input_hw)
    notes = [f'{Path(path).name}: {backend.fallback}'] if backend.fallback else []
    if metadata.batch is not None:
        notes.append(f'{Path(path).name} has a static batch of {metadata.batch}: other batch '
                     'sizes are padded or split into several runs')
    run = backend.run_raw if metadata.nms_mode == 'none' else backend.run
    on_device = backend.providers[0] != 'CPUExecutionProvider'
    # Without the method (an older backend), inference-only is session.run with host copies.
    io_binding = getattr(backend, 'io_binding', None) if on_device else None
    session_options = backend.session.get_session_options()
    intra_op = session_options.intra_op_num_threads
    return Runner(
        model=display_name or Path(path).name, backend='ort', device=device, run=run,
        preprocess_config=config, class_names=backend.class_names, nms_mode=metadata.nms_mode,
        nms=None if metadata.nms_mode == 'none' else metadata.nms, providers=backend.providers,
        threads={'ort_intra_op': intra_op if intra_op else 'default (one per physical core)',
                 'ort_inter_op': session_options.inter_op_num_threads or 'default',
                 'ort_execution_mode': str(session_options.execution_mode).split('.')[-1]},
        weights=metadata.checkpoint, io_binding=io_binding, notes=notes)


def trt_runner(path: str | Path) -> Runner:
    """A TensorRT engine (`detdeploy.runtimes.tensorrt_backend`, imported only here)."""
    try:
        from detdeploy.runtimes.tensorrt_backend import TensorRTBackend
        backend = TensorRTBackend(path)
    except ImportError as exc:
        raise DetdeployError(f'cannot run TensorRT engine {path} here: {exc}') from None
    metadata = getattr(backend, 'metadata', None)
    return Runner(
        model=Path(path).name, backend='trt', device='cuda', run=backend.run,
        preprocess_config=backend.preprocess_config, class_names=backend.class_names,
        nms_mode=getattr(metadata, 'nms_mode', 'trt'), nms=getattr(metadata, 'nms', None),
        providers=['TensorRT'], threads={}, weights=getattr(metadata, 'checkpoint', 'unknown'))


def _batch_images(images: list[np.ndarray], names: list[str], round_index: int, batch: int
                  ) -> tuple[list[np.ndarray], list[str]]:
    """The images of one iteration: the same ones for every configuration of a round."""
    picks = [(round_index * batch + offset) % len(images) for offset in range(batch)]
    return [images[i] for i in picks], [names[i] for i in picks]


def time_iteration(runner: Runner, images: list[np.ndarray], names: list[str]
                   ) -> dict[str, float]:
    """One timed pass, image arrays in, rescaled detections out; milliseconds per stage."""
    clock = time.perf_counter
    runner.sync()
    started = clock()
    batch, metas = prepare_batch(images, runner.preprocess_config)
    prepared = clock()
    outputs = runner.run(batch)
    runner.sync()
    inferred = clock()
    if not runner.raw_outputs:
        to_detections(outputs, names, metas, runner.class_names)
    finished = clock()
    sample = {'preprocess': (prepared - started) * 1e3, 'inference': (inferred - prepared) * 1e3,
              'postprocess': (finished - inferred) * 1e3, 'end_to_end': (finished - started) * 1e3}
    if runner.io_binding is not None:
        binding = runner.binding_for(len(batch))
        binding.set_input(batch)
        runner.sync()
        bound_start = clock()
        binding.run()               # ONNX Runtime returns once the device has finished
        sample[IO_BINDING_KEY] = (clock() - bound_start) * 1e3
    return sample


def config_label(runner: Runner, batch: int) -> str:
    return f'{runner.model} {runner.backend}/{runner.device} b{batch}'


def run_benchmark(runners: list[Runner], batches: tuple[int, ...], images: list[np.ndarray],
                  names: list[str], images_description: str, warmup: int = 10,
                  iters: int | None = 100, seconds: float | None = None,
                  progress: Callable[[int], None] | None = None) -> BenchResult:
    """Time every (runner, batch) in alternating rounds: `warmup` untimed rounds, then `iters`
    rounds (or rounds for about `seconds` per configuration); one sample per configuration per
    round. `progress(round)` is called after each timed round."""
    if not runners:
        raise DetdeployError('nothing to benchmark: no models given')
    if not images:
        raise DetdeployError('no images to benchmark with')
    configs = [ConfigResult(config_label(runner, batch), runner, batch)
               for runner in runners for batch in batches]
    system = system_info()
    for _, index in alternating_schedule(len(configs), rounds=warmup):
        config = configs[index]
        time_iteration(config.runner, *_batch_images(images, names, 0, config.batch))
    started = time.perf_counter()
    schedule = (alternating_schedule(len(configs), rounds=iters) if seconds is None else
                alternating_schedule(len(configs), seconds=seconds * len(configs)))
    for round_index, index in schedule:
        config = configs[index]
        sample = time_iteration(config.runner,
                                *_batch_images(images, names, round_index, config.batch))
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
