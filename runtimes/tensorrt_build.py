"""Build a TensorRT engine from a detdeploy ONNX file with the TensorRT 10 Python API, and write the
plan (unchanged, loadable by trtexec and Triton) plus its JSON sidecar (`model.engine.json`).

The optimization profile spans batch (`BatchProfile`) and, for files with dynamic height and
width (the divisor-padded families), every canvas their preprocessing produces
(`ShapeProfile.for_model`, or --min/--opt/--max-shape).

Imports tensorrt only inside `build_engine`; option checks and metadata need no GPU.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from detdeploy import __version__
from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import atomic_write, file_sha256
from detdeploy.core.metadata import ModelMetadata
from detdeploy.core.preprocessing import PreprocessConfig

from .model_file import resolve_onnx_metadata
from .preprocess import preprocess, read_image
from .tensorrt_common import (BatchProfile, EngineBuildInfo, EngineSidecar, ShapeProfile,
                              check_cuda_device, cuda_call, import_tensorrt, load_cudart,
                              sha256_bytes, tensorrt_major, write_sidecar)

PRECISIONS = ('fp32', 'fp16', 'int8', 'int8+fp16')
DEFAULT_CALIBRATION_BATCH = 8


@dataclass(frozen=True)
class BuildOptions:
    fp16: bool = False
    int8: bool = False
    calibration_images: tuple[Path, ...] = ()     # image files for the INT8 entropy calibrator
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    min_shape: tuple[int, int] | None = None      # H/W profile (dynamic-shape files only)
    opt_shape: tuple[int, int] | None = None
    max_shape: tuple[int, int] | None = None
    workspace_mb: int | None = None               # None: TensorRT's default (the GPU's memory)
    timing_cache: str | Path | None = None        # loaded if present, saved after the build
    device_id: int = 0
    overwrite: bool = True                        # False: refuse an existing engine or sidecar
    max_pixels: int | None = None                 # calibration images above this are refused

    @property
    def precision(self) -> str:
        if self.int8:
            return 'int8+fp16' if self.fp16 else 'int8'
        return 'fp16' if self.fp16 else 'fp32'


@dataclass
class BuildReport:
    engine_path: Path
    sidecar_path: Path
    size_bytes: int
    seconds: float
    sidecar: EngineSidecar
    timing_cache: Path | None = None
    timing_cache_loaded: bool = False
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BuildPlan:
    """What will be built, worked out before TensorRT is touched (so it is testable anywhere)."""
    metadata: ModelMetadata
    profile: BatchProfile
    input_hw: tuple[int, int]               # the profile's opt height and width
    calibration_batch: int | None
    shape_profile: ShapeProfile

    def input_shapes(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """min, opt and max of the input tensor, (batch, 3, height, width) each: what
        `IOptimizationProfile.set_shape` takes."""
        batch, hw = self.profile, self.shape_profile
        return ((batch.min, 3, *hw.min), (batch.opt, 3, *hw.opt), (batch.max, 3, *hw.max))

    def calibration_config(self) -> PreprocessConfig:
        """The preprocessing of INT8 calibration images: every image on one canvas, the
        profile's opt size (a calibration batch has one shape); `scale` resizing becomes `fit`
        inside it, so that a portrait image is not cut."""
        config = self.metadata.preprocess
        if self.shape_profile.static and config.pad == 'fixed':
            return config
        return replace(config, input_size=tuple(self.shape_profile.opt), pad='fixed',
                       resize='fit' if config.resize == 'scale' else config.resize)


def plan_build(onnx_path: str | Path, options: BuildOptions) -> BuildPlan:
    """Check the file and the options; one-line errors for anything that cannot work."""
    # external data inside the model's folder and complete; the graph fits its metadata
    metadata = resolve_onnx_metadata(onnx_path)
    if options.int8 and not options.calibration_images:
        raise DetdeployError('--int8 needs --calib-images DIR (a few hundred images like the '
                             'ones the model will see)')
    if options.calibration_images and not options.int8:
        raise DetdeployError('--calib-images is only used with --int8')
    # an unreadable image found inside TensorRT's calibration callback could not be reported
    # in one line: every image is read once here
    for image_path in options.calibration_images:
        read_image(image_path, max_pixels=options.max_pixels)
    if options.workspace_mb is not None and options.workspace_mb < 1:
        raise DetdeployError(f'--workspace {options.workspace_mb}: give megabytes, at least 1')
    profile = BatchProfile.for_model(metadata, options.min_batch, options.opt_batch,
                                     options.max_batch, source=str(onnx_path))
    shape_profile = ShapeProfile.for_model(metadata, options.min_shape, options.opt_shape,
                                           options.max_shape, source=str(onnx_path))
    calibration_batch = None
    if options.int8:
        calibration_batch = (metadata.batch if metadata.batch is not None else
                             max(profile.min, min(DEFAULT_CALIBRATION_BATCH, profile.max,
                                                  len(options.calibration_images))))
    return BuildPlan(metadata, profile, tuple(shape_profile.opt), calibration_batch,
                     shape_profile)


def _make_logger(trt):
    """A TensorRT logger that keeps errors (for one-line messages) and warnings (for the
    report) instead of printing them."""
    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            text = ' '.join(str(msg).split())
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(text)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(text)

    return CollectingLogger()


def _make_calibrator(trt, cudart, images: tuple[Path, ...], config: PreprocessConfig,
                     batch_size: int):
    """An entropy calibrator (TensorRT 10's IInt8EntropyCalibrator2) that feeds `images`,
    preprocessed as at inference time but on one canvas (`BuildPlan.calibration_config`), in
    full batches of `batch_size` (the image list is repeated to fill the last batch)."""
    height, width = config.input_size
    batch_bytes = batch_size * 3 * height * width * np.dtype(np.float32).itemsize
    count = -(-len(images) // batch_size) * batch_size
    ordered = [images[i % len(images)] for i in range(count)]

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.next_index = 0
            self.device_input = cuda_call(cudart, cudart.cudaMalloc(batch_bytes), 'cudaMalloc')

        def get_batch_size(self):
            return batch_size

        def get_batch(self, names):
            if self.next_index >= len(ordered):
                return None
            paths = ordered[self.next_index:self.next_index + batch_size]
            self.next_index += batch_size
            batch = np.ascontiguousarray(np.stack(
                [preprocess(read_image(path), config)[0] for path in paths]), dtype=np.float32)
            cuda_call(cudart, cudart.cudaMemcpy(
                self.device_input, batch.ctypes.data, batch.nbytes,
                cudart.cudaMemcpyKind.cudaMemcpyHostToDevice), 'cudaMemcpy')
            return [int(self.device_input)]

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache):
            return None

        def free(self):
            cudart.cudaFree(self.device_input)

    return EntropyCalibrator()


def _parse_onnx(trt, network, logger, onnx_path: Path) -> None:
    parser = trt.OnnxParser(network, logger)
    if parser.parse_from_file(str(onnx_path)):
        return
    errors = [' '.join(str(parser.get_error(i)).split()) for i in range(parser.num_errors)]
    first = errors[0] if errors else (logger.errors[-1] if logger.errors else 'no details')
    more = f' (+{len(errors) - 1} more)' if len(errors) > 1 else ''
    raise DetdeployError(f'TensorRT cannot parse {onnx_path}: {first}{more}')


def build_engine(onnx_path: str | Path, engine_path: str | Path,
                 options: BuildOptions = BuildOptions()) -> BuildReport:
    """Build `engine_path` and `engine_path`.json from a detdeploy ONNX file."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    plan = plan_build(onnx_path, options)
    trt = import_tensorrt()
    if tensorrt_major(trt) >= 11 and (options.fp16 or options.int8):
        raise DetdeployError(
            f'--fp16/--int8 use builder flags that TensorRT {trt.__version__} removed (11.x '
            "builds strongly typed networks only); install TensorRT 10: pip install "
            "'tensorrt>=10,<11'")
    cudart = load_cudart()
    device_name = check_cuda_device(options.device_id, cudart)
    started = time.perf_counter()
    logger = _make_logger(trt)
    trt.init_libnvinfer_plugins(logger, '')         # EfficientNMS_TRT for --nms trt files
    builder = trt.Builder(logger)
    network = builder.create_network(0)             # TensorRT 10: explicit batch is the only mode
    _parse_onnx(trt, network, logger, onnx_path)
    if network.num_inputs != 1:
        raise DetdeployError(f'{onnx_path} has {network.num_inputs} inputs; detdeploy files '
                             'have one (images)')
    input_name = network.get_input(0).name
    output_names = tuple(network.get_output(i).name for i in range(network.num_outputs))

    config = builder.create_builder_config()
    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mb << 20)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *plan.input_shapes())
    config.add_optimization_profile(profile)
    if options.fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    calibrator = None
    if options.int8:
        config.set_flag(trt.BuilderFlag.INT8)
        calibration_config = plan.calibration_config()
        calibrator = _make_calibrator(trt, cudart, options.calibration_images,
                                      calibration_config, plan.calibration_batch)
        config.int8_calibrator = calibrator
        calibration_shape = (plan.calibration_batch, 3, *calibration_config.input_size)
        calibration_profile = builder.create_optimization_profile()
        calibration_profile.set_shape(input_name, calibration_shape, calibration_shape,
                                      calibration_shape)
        config.set_calibration_profile(calibration_profile)

    cache_path = Path(options.timing_cache) if options.timing_cache else None
    cache_loaded = False
    warnings: list[str] = []
    if cache_path is not None:
        cache_bytes = cache_path.read_bytes() if cache_path.is_file() else b''
        timing_cache = config.create_timing_cache(cache_bytes)
        if timing_cache is None and cache_bytes:
            warnings.append(f'timing cache {cache_path} is unreadable by this TensorRT; '
                            'starting a new one')
            timing_cache = config.create_timing_cache(b'')
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
        cache_loaded = bool(cache_bytes) and not warnings

    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if serialized is None:
        detail = (' '.join(logger.errors[-1].split()) if logger.errors
                  else 'no details from TensorRT')
        raise DetdeployError(f'TensorRT could not build an engine from {onnx_path}: {detail}')
    plan_bytes = memoryview(serialized)
    # engine and sidecar are two renames: an interruption between them leaves a sidecar whose
    # sha256 does not match the engine, which `infer` refuses with "rebuild it"
    with atomic_write(engine_path, overwrite=options.overwrite) as handle:
        handle.write(plan_bytes)
    if cache_path is not None:
        with atomic_write(cache_path) as handle:
            handle.write(memoryview(config.get_timing_cache().serialize()))

    build = EngineBuildInfo(
        precision=options.precision, batch_profile=plan.profile, input_hw=plan.input_hw,
        input_name=input_name, output_names=output_names, tensorrt_version=trt.__version__,
        device_name=device_name, source_onnx=str(onnx_path),
        source_onnx_sha256=file_sha256(onnx_path), workspace_mb=options.workspace_mb,
        calibration_images=len(options.calibration_images) if options.int8 else None,
        detdeploy_version=__version__, shape_profile=plan.shape_profile)
    sidecar = EngineSidecar(plan.metadata, build, sha256_bytes(plan_bytes))
    written = write_sidecar(engine_path, sidecar, overwrite=options.overwrite)
    return BuildReport(engine_path, written, len(plan_bytes), time.perf_counter() - started,
                       sidecar, cache_path, cache_loaded, warnings + logger.warnings)
