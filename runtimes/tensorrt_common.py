"""What the TensorRT builder and backend share that needs neither TensorRT nor a GPU: the lazy
`tensorrt` and CUDA imports with one-line errors, the batch and height/width profiles, the
engine's JSON sidecar.

Nothing here imports tensorrt or CUDA at module import time, so it is tested on CPU-only machines.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import atomic_write
from detdeploy.core.metadata import ModelMetadata
from detdeploy.core.preprocessing import check_input_size

INSTALL_HINT = "pip install 'detdeploy[tensorrt]' on a machine with an NVIDIA GPU"
SIDECAR_FORMAT = 'detdeploy-engine'
SIDECAR_VERSION = 1
DEFAULT_MAX_BATCH = 8
MAX_PROFILE_SIDE = 4096         # the exporter's largest dynamic side (export.exporter)


class TensorRTUnavailable(DetdeployError):
    """TensorRT, CUDA Python or a usable NVIDIA GPU is missing."""


def import_tensorrt():
    """The `tensorrt` module, or a one-line error saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        # the wheel is there but its libraries (libnvinfer) are not, or it is not installed
        if getattr(exc, 'name', None) == 'tensorrt' or 'No module named' in str(exc) or \
                'import of tensorrt halted' in str(exc):
            raise TensorRTUnavailable(f'TensorRT is not installed: {INSTALL_HINT}') from None
        raise TensorRTUnavailable(f'TensorRT cannot be loaded ({_first_line(exc)}): '
                                  f'{INSTALL_HINT}') from None
    except OSError as exc:
        raise TensorRTUnavailable(f"TensorRT's libraries cannot be loaded ({_first_line(exc)}): "
                                  f'{INSTALL_HINT}') from None
    return tensorrt


def tensorrt_major(trt) -> int:
    return int(str(trt.__version__).split('.')[0])


def load_cudart():
    """CUDA Python's runtime module (`cuda.bindings.runtime`, older releases `cuda.cudart`)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise TensorRTUnavailable(
                f"CUDA Python (cuda-bindings) is not installed: {INSTALL_HINT}") from None
    return cudart


def cuda_call(cudart, result, what: str):
    """Unpack a CUDA Python result tuple, turning an error code into a one-line error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise DetdeployError(f'CUDA error in {what}: {cuda_error_text(cudart, err)}')
    return values[0] if len(values) == 1 else tuple(values)


def cuda_error_text(cudart, err) -> str:
    name = cudart.cudaGetErrorName(err)[1]
    text = cudart.cudaGetErrorString(err)[1]
    decode = lambda value: value.decode() if isinstance(value, bytes) else str(value)  # noqa: E731
    return f'{decode(name)}: {decode(text)}'


def check_cuda_device(device_id: int, cudart=None) -> str:
    """Select CUDA device `device_id` for this thread and return its name; a one-line error when
    the machine has no usable NVIDIA GPU or driver."""
    cudart = cudart or load_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        raise TensorRTUnavailable(f'no usable NVIDIA GPU: CUDA reports '
                                  f'{cuda_error_text(cudart, err)}')
    if count == 0:
        raise TensorRTUnavailable('no usable NVIDIA GPU: CUDA sees no device')
    if not 0 <= device_id < count:
        raise DetdeployError(f'--device-id {device_id}: this machine has {count} CUDA '
                             f'device{"s" if count > 1 else ""} (0..{count - 1})')
    cuda_call(cudart, cudart.cudaSetDevice(device_id), 'cudaSetDevice')
    properties = cuda_call(cudart, cudart.cudaGetDeviceProperties(device_id),
                           'cudaGetDeviceProperties')
    name = properties.name
    return (name.decode(errors='replace') if isinstance(name, bytes) else str(name)).strip('\0 ')


def _first_line(exc: BaseException) -> str:
    """The runtime's whole reason on one line (its cause often comes last: never cut)."""
    text = ' '.join(str(exc).split())
    return text or type(exc).__name__


@dataclass(frozen=True)
class BatchProfile:
    """The batch sizes an engine accepts (TensorRT optimization profile on the batch axis)."""
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if self.min < 1:
            raise DetdeployError(f'--min-batch {self.min}: must be at least 1')
        if self.max < self.min:
            raise DetdeployError(f'--max-batch {self.max} is below --min-batch {self.min}')
        if not self.min <= self.opt <= self.max:
            raise DetdeployError(f'--opt-batch {self.opt} must lie between --min-batch '
                                 f'{self.min} and --max-batch {self.max}')

    @classmethod
    def for_model(cls, metadata: ModelMetadata, min_batch: int | None = None,
                  opt_batch: int | None = None, max_batch: int | None = None,
                  source: str = 'the model') -> 'BatchProfile':
        """The profile for a file: its own batch if static; else the given sizes, defaulting
        to min 1, opt = min, max = max(8, opt)."""
        if metadata.batch is not None:
            static = metadata.batch
            given = {f'--{k}-batch': v for k, v in
                     (('min', min_batch), ('opt', opt_batch), ('max', max_batch))
                     if v is not None and v != static}
            if given:
                raise DetdeployError(
                    f'{source} has a static batch of {static}, so {", ".join(given)} cannot '
                    'differ from it; export with --dynamic-batch for a batch range')
            return cls(static, static, static)
        low = min_batch or 1
        opt = opt_batch or low
        return cls(low, opt, max_batch or max(DEFAULT_MAX_BATCH, opt))

    def describe(self) -> str:
        if self.min == self.max:
            return f'static batch {self.max}'
        return f'min {self.min}, opt {self.opt}, max {self.max}'


def _round_up(side: int, divisor: int) -> int:
    return -(-side // divisor) * divisor


def _hw_text(hw) -> str:
    return f'{hw[0]}x{hw[1]}'


@dataclass(frozen=True)
class ShapeProfile:
    """The network input heights and widths an engine accepts (the H/W part of TensorRT's
    optimization profile): every side a multiple of `divisor` between `min` and `max`, kernels
    tuned for `opt`. A file with a fixed input has min == opt == max."""
    min: tuple[int, int]
    opt: tuple[int, int]
    max: tuple[int, int]
    divisor: int = 1

    @property
    def static(self) -> bool:
        return self.min == self.max

    def problem(self, hw) -> str | None:
        """Why an input of `hw` (height, width) does not fit, or None."""
        height, width = hw
        if self.static:
            return None if (height, width) == self.max else \
                f'this engine was built for {_hw_text(self.max)} only'
        if height % self.divisor or width % self.divisor:
            return f'sides must be multiples of {self.divisor}'
        if not (self.min[0] <= height <= self.max[0] and self.min[1] <= width <= self.max[1]):
            return (f'outside the engine\'s profile (min {_hw_text(self.min)}, max '
                    f'{_hw_text(self.max)}); rebuild with a larger --max-shape')
        return None

    def describe(self) -> str:
        if self.static:
            return f'fixed {_hw_text(self.max)}'
        return (f'min {_hw_text(self.min)}, opt {_hw_text(self.opt)}, max {_hw_text(self.max)} '
                f'(multiples of {self.divisor})')

    def to_dict(self) -> dict:
        return {'min': list(self.min), 'opt': list(self.opt), 'max': list(self.max),
                'divisor': self.divisor}

    @classmethod
    def from_dict(cls, values: dict) -> 'ShapeProfile':
        return cls(tuple(values['min']), tuple(values['opt']), tuple(values['max']),
                   int(values.get('divisor', 1)))

    @classmethod
    def for_model(cls, metadata: ModelMetadata, min_hw: tuple[int, int] | None = None,
                  opt_hw: tuple[int, int] | None = None, max_hw: tuple[int, int] | None = None,
                  source: str = 'the model') -> 'ShapeProfile':
        """The H/W profile for a file, from its metadata unless flags give sides.

        - Fixed height and width: that size only; flags cannot differ from it.
        - Padded to a multiple of its size divisor (RetinaNet, Faster R-CNN, YOLOv3): every
          canvas the preprocessing can produce. opt is the input size rounded up to the
          divisor (800x1344 for the (1333, 800) scale, 320x320 for YOLOv3-320); max covers
          every orientation: for `scale` resizing the long side rounded up on both sides
          (1344x1344), for `fit` the input size rounded up; min is one divisor per side (a
          very long thin image).
        - A dynamic-shape file padded to a fixed size: that size unless flags widen it.
        """
        config = metadata.preprocess
        divisor = config.size_divisor
        given = {'--min-shape': min_hw, '--opt-shape': opt_hw, '--max-shape': max_hw}
        if not metadata.dynamic_shape:
            fixed = tuple(config.input_size)
            differing = [flag for flag, hw in given.items()
                         if hw is not None and tuple(hw) != fixed]
            if differing:
                raise DetdeployError(
                    f'{source} has a fixed input of {_hw_text(fixed)}, so {", ".join(differing)} '
                    'cannot differ from it; export with --dynamic-shape for a range of sizes')
            return cls(fixed, fixed, fixed, divisor)
        for flag, hw in given.items():
            if hw is not None:
                check_input_size(tuple(hw), divisor, flag)
                if max(hw) > MAX_PROFILE_SIDE:
                    raise DetdeployError(f'{flag} {_hw_text(hw)}: the exported graph takes '
                                         f'sides up to {MAX_PROFILE_SIDE}')
        natural = tuple(_round_up(side, divisor) for side in config.input_size)
        if config.pad == 'divisor' and config.resize == 'scale':
            longest = _round_up(max(config.input_size), divisor)
            default_max, default_min = (longest, longest), (divisor, divisor)
        elif config.pad == 'divisor' and config.resize == 'fit':
            default_max, default_min = natural, (divisor, divisor)
        else:                   # a fixed canvas, or a stretch to the input size
            default_max = default_min = natural
        low = tuple(min_hw) if min_hw is not None else default_min
        high = tuple(max_hw) if max_hw is not None else default_max
        if opt_hw is not None:
            opt = tuple(opt_hw)
        else:                   # the natural size, moved inside a range the flags narrowed
            opt = tuple(min(max(n, lo), hi) for n, lo, hi in zip(natural, low, high))
        if max_hw is None:      # a larger --opt/--min-shape widens the default maximum
            high = tuple(max(h, o, lo) for h, o, lo in zip(high, opt, low))
        if min_hw is None:
            low = tuple(min(lo, o, h) for lo, o, h in zip(low, opt, high))
        for side in (0, 1):
            if not low[side] <= opt[side] <= high[side]:
                raise DetdeployError(
                    f'--opt-shape {_hw_text(opt)} must lie between --min-shape {_hw_text(low)} '
                    f'and --max-shape {_hw_text(high)} on each side')
        return cls(low, opt, high, divisor)


@dataclass(frozen=True)
class EngineBuildInfo:
    """How an engine was built; stored in its sidecar."""
    precision: str                      # fp32, fp16, int8 or int8+fp16
    batch_profile: BatchProfile
    input_hw: tuple[int, int]           # the profile's height and width
    input_name: str
    output_names: tuple[str, ...]       # in the ONNX file's order
    tensorrt_version: str
    device_name: str
    source_onnx: str
    source_onnx_sha256: str
    workspace_mb: int | None
    calibration_images: int | None
    detdeploy_version: str
    # H/W range; None (sidecars written before profiles over H/W): input_hw only
    shape_profile: ShapeProfile | None = None

    @property
    def hw_profile(self) -> ShapeProfile:
        return self.shape_profile or ShapeProfile(*(tuple(self.input_hw),) * 3)

    def to_dict(self) -> dict:
        values = asdict(self)
        values['input_hw'] = list(self.input_hw)
        values['output_names'] = list(self.output_names)
        values['shape_profile'] = (None if self.shape_profile is None
                                   else self.shape_profile.to_dict())
        return values

    @classmethod
    def from_dict(cls, values: dict) -> 'EngineBuildInfo':
        values = dict(values)
        values['batch_profile'] = BatchProfile(**values['batch_profile'])
        values['input_hw'] = tuple(values['input_hw'])
        values['output_names'] = tuple(values['output_names'])
        if values.get('shape_profile') is not None:
            values['shape_profile'] = ShapeProfile.from_dict(values['shape_profile'])
        return cls(**values)


@dataclass(frozen=True)
class EngineSidecar:
    """`model.engine.json`: the ONNX file's metadata plus build facts. The plan file itself stays
    a plain TensorRT plan, so trtexec and Triton load it unchanged."""
    metadata: ModelMetadata
    build: EngineBuildInfo
    engine_sha256: str

    def to_json(self) -> str:
        return json.dumps({'format': SIDECAR_FORMAT, 'format_version': SIDECAR_VERSION,
                           'engine_sha256': self.engine_sha256,
                           'build': self.build.to_dict(),
                           'metadata': self.metadata.to_props()}, indent=1) + '\n'

    @classmethod
    def from_json(cls, text: str, source: str) -> 'EngineSidecar':
        try:
            values = json.loads(text)
        except ValueError as exc:
            raise DetdeployError(f'{source} is not valid JSON ({exc})') from None
        if not isinstance(values, dict) or values.get('format') != SIDECAR_FORMAT:
            raise DetdeployError(f'{source} is not a detdeploy engine sidecar')
        if values.get('format_version') != SIDECAR_VERSION:
            raise DetdeployError(f'{source} has sidecar format version '
                                 f'{values.get("format_version")}; this detdeploy reads '
                                 f'{SIDECAR_VERSION}: rebuild the engine')
        metadata = ModelMetadata.from_props(values.get('metadata', {}), source)
        try:
            build = EngineBuildInfo.from_dict(values['build'])
            return cls(metadata, build, str(values['engine_sha256']))
        except (KeyError, TypeError, ValueError) as exc:
            raise DetdeployError(f'{source} has incomplete build facts ({exc})') from None


def sidecar_path(engine_path: str | Path) -> Path:
    """`model.engine` -> `model.engine.json`."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + '.json')


def write_sidecar(engine_path: str | Path, sidecar: EngineSidecar, overwrite: bool = True
                  ) -> Path:
    path = sidecar_path(engine_path)
    with atomic_write(path, 'w', overwrite=overwrite) as handle:
        handle.write(sidecar.to_json())
    return path


def read_sidecar(engine_path: str | Path) -> EngineSidecar:
    """The sidecar of an engine file; one-line errors for a missing or foreign one."""
    engine_path = Path(engine_path)
    path = sidecar_path(engine_path)
    if not path.is_file():
        raise DetdeployError(
            f'{path} not found: an engine needs the JSON file `detdeploy build-engine` writes '
            f'next to it (classes, preprocessing, NMS); rebuild with `detdeploy build-engine '
            f'MODEL.onnx -o {engine_path}` or copy the .json along with the engine')
    return EngineSidecar.from_json(path.read_text(), str(path))


def check_engine_matches(sidecar: EngineSidecar, engine_bytes: bytes, engine_path: Path,
                         tensorrt_version: str) -> None:
    """Refuse an engine that is not the one its sidecar describes, or that was built by another
    TensorRT version (plans are not portable across versions)."""
    if sha256_bytes(engine_bytes) != sidecar.engine_sha256:
        raise DetdeployError(f'{sidecar_path(engine_path)} describes a different engine than '
                             f'{engine_path} (sha256 differs): rebuild both with '
                             '`detdeploy build-engine`')
    if sidecar.build.tensorrt_version != tensorrt_version:
        raise DetdeployError(
            f'{engine_path} was built with TensorRT {sidecar.build.tensorrt_version}, this is '
            f'TensorRT {tensorrt_version}: rebuild it here with `detdeploy build-engine '
            f'{sidecar.build.source_onnx} -o {engine_path}`')


def sha256_bytes(data) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()
