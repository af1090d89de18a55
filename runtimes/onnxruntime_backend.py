"""The ONNX Runtime backend: runs a detdeploy ONNX file on CPU, CUDA or TensorRT providers.

Needs numpy and onnxruntime only (never torch). onnxruntime-gpu falls back to the CPU silently
when CUDA or TensorRT libraries or a GPU are missing; this backend reports the providers a
session really uses, and with `strict_device` refuses to fall back.
"""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detdeploy.errors import DetdeployError

from .metadata import ModelMetadata, ModelOverrides, resolve_onnx_metadata
from .preprocess import PreprocessConfig

DEVICE_PROVIDERS = {
    'cpu': ['CPUExecutionProvider'],
    'cuda': ['CUDAExecutionProvider', 'CPUExecutionProvider'],
    'tensorrt': ['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider'],
}
OPTIMIZATION_LEVELS = ('disable', 'basic', 'extended', 'all')


@dataclass(frozen=True)
class OrtOptions:
    device: str = 'cpu'                       # cpu, cuda or tensorrt
    device_id: int = 0
    threads: int | None = None                # intra-op threads; None: ONNX Runtime's default
    optimization: str = 'all'
    strict_device: bool = False               # fail instead of falling back to the CPU
    trt_fp16: bool = False
    trt_cache_dir: str | None = None          # engine and timing caches


def provider_list(options: OrtOptions) -> list:
    """Providers with their options, in ONNX Runtime's (name, options) form."""
    if options.device not in DEVICE_PROVIDERS:
        raise DetdeployError(f"unknown device '{options.device}': use "
                             f"{', '.join(DEVICE_PROVIDERS)}")
    providers = []
    for name in DEVICE_PROVIDERS[options.device]:
        settings: dict = {}
        if name == 'CUDAExecutionProvider':
            settings = {'device_id': options.device_id}
        elif name == 'TensorrtExecutionProvider':
            settings = {'device_id': options.device_id, 'trt_fp16_enable': options.trt_fp16}
            if options.trt_cache_dir:
                settings.update(trt_engine_cache_enable=True,
                                trt_engine_cache_path=options.trt_cache_dir,
                                trt_timing_cache_enable=True,
                                trt_timing_cache_path=options.trt_cache_dir)
        if options.strict_device and name == 'CPUExecutionProvider' and options.device != 'cpu':
            continue
        providers.append((name, settings))
    return providers


class OnnxRuntimeBackend:
    """Run a detdeploy ONNX file; one instance may be called from several threads at once
    (ONNX Runtime's `InferenceSession.run` is thread-safe and this class keeps no run state)."""

    name = 'ort'

    def __init__(self, path: str | Path, options: OrtOptions = OrtOptions(),
                 overrides: ModelOverrides | None = None, check_signature: bool = True):
        """`overrides`: class names and input size from the command line, and preprocessing
        for files without detdeploy metadata. `check_signature=False` skips the check that the
        graph's input and outputs fit the metadata (`detdeploy parity` reports those itself)."""
        import onnxruntime
        self.path = Path(path)
        # checks external data and the graph's signature before ONNX Runtime opens the file
        self.metadata: ModelMetadata = resolve_onnx_metadata(self.path, overrides,
                                                             check_signature)
        if options.optimization not in OPTIMIZATION_LEVELS:
            raise DetdeployError(f"unknown optimization level '{options.optimization}': use "
                                 f"{', '.join(OPTIMIZATION_LEVELS)}")
        session_options = onnxruntime.SessionOptions()
        session_options.graph_optimization_level = {
            'disable': onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
            'basic': onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            'extended': onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            'all': onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL}[options.optimization]
        if options.threads:
            session_options.intra_op_num_threads = options.threads
        if options.strict_device and options.device != 'cpu':
            session_options.add_session_config_entry('session.disable_cpu_ep_fallback', '1')
        requested = provider_list(options)
        # ONNX Runtime logs each provider it cannot load to stderr; what it fell back to is
        # reported once, below, instead.
        onnxruntime.set_default_logger_severity(4)
        session_options.log_severity_level = 4
        wanted = requested[0][0]
        try:
            # onnxruntime's Python layer prints a banner to stdout when a provider fails
            with contextlib.redirect_stdout(io.StringIO()):
                self.session = onnxruntime.InferenceSession(str(self.path), session_options,
                                                            providers=requested)
        except Exception as exc:  # ONNX Runtime raises its own exception types
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ''
            if options.strict_device:
                raise DetdeployError(f'--strict-device: {wanted} is not usable here '
                                     f'(ONNX Runtime: {first_line[:160]})') from None
            raise DetdeployError(f'ONNX Runtime cannot load {self.path}: '
                                 f'{first_line[:200]}') from None
        self.options = options
        self.providers = self.session.get_providers()
        self.fallback = None if wanted in self.providers else (
            f'{wanted} is not usable here; running on {", ".join(self.providers)}')
        if self.fallback and options.strict_device:
            raise DetdeployError(f'--strict-device: {self.fallback}')
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self.metadata.preprocess

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.metadata.class_names

    def describe(self) -> dict:
        return {'backend': self.name, 'path': str(self.path), 'providers': self.providers,
                'inputs': [(i.name, i.shape) for i in self.session.get_inputs()],
                'outputs': [(o.name, o.shape) for o in self.session.get_outputs()],
                'nms_mode': self.metadata.nms_mode, 'arch': self.metadata.arch}

    def _session_run(self, batch: np.ndarray) -> list[np.ndarray]:
        try:
            return self.session.run(None, {self.input_name: batch})
        except Exception as exc:  # ONNX Runtime raises its own exception types
            text = ' '.join(str(exc).split()) or type(exc).__name__
            raise DetdeployError(f'ONNX Runtime failed to run {self.path} on a batch of shape '
                                 f'{list(batch.shape)}: {text[:300]}') from None

    def run_raw(self, batch: np.ndarray) -> list[np.ndarray]:
        """The file's outputs for a batch, padding or splitting to a static batch size."""
        static = self.metadata.batch
        if static is None or len(batch) == static:
            return self._session_run(batch)
        pieces = []
        for start in range(0, len(batch), static):
            chunk = batch[start:start + static]
            used = len(chunk)
            if used < static:
                chunk = np.concatenate([chunk, np.zeros((static - used, *chunk.shape[1:]),
                                                        chunk.dtype)])
            pieces.append([out[:used] for out in self._session_run(chunk)])
        return [np.concatenate(parts) for parts in zip(*pieces)]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """num_dets, boxes, scores, labels for a preprocessed [B, 3, H, W] float32 batch."""
        if self.metadata.nms_mode == 'none':
            raise DetdeployError(f'{self.path} was exported with --nms none (raw outputs); '
                                 'detection needs a file exported with --nms onnx')
        height, width = batch.shape[2:]
        if self.metadata.dynamic_shape and (height % 32 or width % 32):
            raise DetdeployError(f'input {height}x{width}: sides must be multiples of 32')
        return tuple(self.run_raw(np.ascontiguousarray(batch, dtype=np.float32)))

    def io_binding(self) -> 'OrtIoBinding':
        """A reusable I/O binding on the device the session runs on (see OrtIoBinding)."""
        return OrtIoBinding(self)

    def run_bound(self, batch: np.ndarray) -> list[np.ndarray]:
        """`run_raw` through an I/O binding: the same outputs, as numpy arrays on the host."""
        binding = self.io_binding()
        binding.set_input(batch)
        binding.run()
        return binding.outputs()


class OrtIoBinding:
    """ONNX Runtime I/O binding for one caller: `set_input` copies a batch to the session's device
    once (an OrtValue there), `run` may then be repeated, and the outputs stay bound on the device
    until `outputs()` copies them to the host. On the CPU provider everything lives in host
    memory and the results equal `run_raw`. One binding per thread; the backend is shared.

    A static-batch file takes at most its batch size per input; smaller batches are zero-padded
    and the padding's outputs dropped."""

    def __init__(self, backend: OnnxRuntimeBackend):
        import onnxruntime
        self._onnxruntime = onnxruntime
        self.backend = backend
        gpu = backend.providers[0] in ('CUDAExecutionProvider', 'TensorrtExecutionProvider')
        self.device = 'cuda' if gpu else 'cpu'
        self.device_id = backend.options.device_id if gpu else 0
        self.binding = backend.session.io_binding()
        self.used = 0
        self._input = None          # keeps the bound OrtValue alive

    def set_input(self, batch: np.ndarray) -> None:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        static = self.backend.metadata.batch
        self.used = len(batch)
        if static is not None and self.used != static:
            if self.used > static:
                raise DetdeployError(f'{self.backend.path} has a static batch of {static}; an '
                                     f'I/O binding takes at most that, got {self.used}')
            batch = np.concatenate([batch, np.zeros((static - self.used, *batch.shape[1:]),
                                                    batch.dtype)])
        self._input = self._onnxruntime.OrtValue.ortvalue_from_numpy(batch, self.device,
                                                                    self.device_id)
        self.binding.bind_ortvalue_input(self.backend.input_name, self._input)
        # Outputs bound before hold the last run's shapes; a new batch size needs fresh ones,
        # which ONNX Runtime allocates on the device at the next run.
        self.binding.clear_binding_outputs()
        for name in self.backend.output_names:
            self.binding.bind_output(name, self.device, self.device_id)

    def run(self) -> None:
        """One inference on the bound input; outputs stay on the device."""
        if self._input is None:
            raise DetdeployError('OrtIoBinding.run: call set_input first')
        self.backend.session.run_with_iobinding(self.binding)

    def output_values(self) -> list:
        """The outputs as OrtValues on the device (no copy)."""
        return self.binding.get_outputs()

    def outputs(self) -> list[np.ndarray]:
        """The outputs of the last run, copied to the host, without any padding rows."""
        return [array[:self.used] for array in self.binding.copy_outputs_to_cpu()]
