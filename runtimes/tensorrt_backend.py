"""The TensorRT backend: runs an engine from `detdeploy build-engine` on an NVIDIA GPU, with the
same interface as the ONNX Runtime backend; the engine's metadata comes from its JSON sidecar.

Needs tensorrt, CUDA Python (cuda-bindings) and numpy; never torch. Imported lazily by the CLI.
"""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np

from detdeploy.core.errors import DetdeployError
from detdeploy.core.metadata import ModelMetadata

from .backend import Backend, run_in_chunks
from .tensorrt_common import (EngineSidecar, check_cuda_device, check_engine_matches, cuda_call,
                              import_tensorrt, load_cudart, read_sidecar, sidecar_path)


class _ExecutionSlot:
    """One execution context with its own CUDA stream and device buffers; used by one thread."""

    def __init__(self, backend: 'TensorRTBackend'):
        self.backend = backend
        self.cudart = backend._cudart
        self.context = backend.engine.create_execution_context()
        if self.context is None:
            raise DetdeployError(f'TensorRT cannot create an execution context for '
                                 f'{backend.path} (out of GPU memory?)')
        self.stream = cuda_call(self.cudart, self.cudart.cudaStreamCreate(), 'cudaStreamCreate')
        self.buffers: dict[str, tuple[int, int]] = {}          # name -> (device pointer, bytes)

    def _device_buffer(self, name: str, nbytes: int) -> int:
        pointer, capacity = self.buffers.get(name, (0, 0))
        if nbytes > capacity:
            if pointer:
                cuda_call(self.cudart, self.cudart.cudaFree(pointer), 'cudaFree')
            pointer = cuda_call(self.cudart, self.cudart.cudaMalloc(max(nbytes, 1)), 'cudaMalloc')
            self.buffers[name] = (pointer, nbytes)
            self.context.set_tensor_address(name, pointer)
        return pointer

    def execute(self, batch: np.ndarray) -> list[np.ndarray]:
        cudart, backend = self.cudart, self.backend
        host_to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        device_to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if not self.context.set_input_shape(backend.input_name, tuple(batch.shape)):
            raise DetdeployError(f'the engine rejects input shape {tuple(batch.shape)} '
                                 f'(profile: {backend.sidecar.build.batch_profile.describe()})')
        pointer = self._device_buffer(backend.input_name, batch.nbytes)
        cuda_call(cudart, cudart.cudaMemcpyAsync(pointer, batch.ctypes.data, batch.nbytes,
                                                 host_to_device, self.stream), 'cudaMemcpyAsync')
        outputs = []
        for name, dtype in zip(backend.output_names, backend.output_dtypes):
            host = np.empty(tuple(self.context.get_tensor_shape(name)), dtype)
            self._device_buffer(name, host.nbytes)
            outputs.append(host)
        if not self.context.execute_async_v3(int(self.stream)):
            raise DetdeployError(f'TensorRT failed to run {backend.path}')
        for name, host in zip(backend.output_names, outputs):
            cuda_call(cudart, cudart.cudaMemcpyAsync(host.ctypes.data, self.buffers[name][0],
                                                     host.nbytes, device_to_host, self.stream),
                      'cudaMemcpyAsync')
        cuda_call(cudart, cudart.cudaStreamSynchronize(self.stream), 'cudaStreamSynchronize')
        return outputs

    def close(self) -> None:
        for pointer, _ in self.buffers.values():
            self.cudart.cudaFree(pointer)
        self.buffers.clear()
        self.cudart.cudaStreamDestroy(self.stream)


class TensorRTBackend(Backend):
    """Run a detdeploy TensorRT engine. Thread-safe: each calling thread gets its own execution
    context, CUDA stream and buffers (created on its first call); the engine is shared."""

    name = 'trt'

    def __init__(self, engine_path: str | Path, device_id: int = 0):
        self.path = Path(engine_path)
        if not self.path.is_file():
            raise DetdeployError(f'engine file not found: {self.path}')
        self.sidecar: EngineSidecar = read_sidecar(self.path)
        self.metadata: ModelMetadata = self.sidecar.metadata
        self.device_id = device_id
        trt = import_tensorrt()
        self._cudart = load_cudart()
        self.device_name = check_cuda_device(device_id, self._cudart)
        engine_bytes = self.path.read_bytes()
        check_engine_matches(self.sidecar, engine_bytes, self.path, trt.__version__)
        logger = trt.Logger(trt.Logger.ERROR)
        trt.init_libnvinfer_plugins(logger, '')  # engines with EfficientNMS_TRT need the plugins
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise DetdeployError(f'TensorRT {trt.__version__} cannot load {self.path} (built for '
                                 'another GPU or TensorRT build?): rebuild it with '
                                 '`detdeploy build-engine`')
        build = self.sidecar.build
        self.input_name = build.input_name
        self.output_names = list(build.output_names)
        self.output_dtypes = [np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                              for name in self.output_names]
        self.max_batch = int(self.engine.get_tensor_profile_shape(self.input_name, 0)[2][0])
        self.static_batch = self.metadata.batch
        self._local = threading.local()
        self._slots: list[_ExecutionSlot] = []
        self._slots_lock = threading.Lock()

    def rename_classes(self, names: tuple[str, ...]) -> None:
        """Class names from the command line instead of the sidecar's (same count)."""
        if len(names) != len(self.metadata.class_names):
            raise DetdeployError(f'--class-names gives {len(names)} names but {self.path} has '
                                 f'{len(self.metadata.class_names)} classes')
        self.metadata = dataclasses.replace(self.metadata, class_names=tuple(names))

    @property
    def source(self) -> str:
        return str(self.path)

    def describe(self) -> dict:
        build = self.sidecar.build
        return {'backend': self.name, 'path': str(self.path),
                'sidecar': str(sidecar_path(self.path)),
                'device': f'cuda:{self.device_id} ({self.device_name})',
                'tensorrt_version': build.tensorrt_version, 'precision': build.precision,
                'batch_profile': build.batch_profile.describe(),
                'shape_profile': build.hw_profile.describe(),
                'inputs': [(self.input_name, ['batch', 3, *build.input_hw])],
                'outputs': [(name, list(self.engine.get_tensor_shape(name)))
                            for name in self.output_names],
                'providers': ['TensorRT'], 'threads': {}, 'weights': self.metadata.checkpoint,
                'nms_mode': self.metadata.nms_mode, 'arch': self.metadata.arch}

    def _slot(self) -> _ExecutionSlot:
        slot = getattr(self._local, 'slot', None)
        if slot is None:
            # the current CUDA device is per-thread state
            cuda_call(self._cudart, self._cudart.cudaSetDevice(self.device_id), 'cudaSetDevice')
            slot = self._local.slot = _ExecutionSlot(self)
            with self._slots_lock:
                self._slots.append(slot)
        return slot

    def synchronize(self) -> None:
        """Nothing queued outlives a run: each run waits for its stream."""

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        """The engine's outputs for a batch: split above the profile's max batch, padded to a
        static batch."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        height, width = batch.shape[2:]
        problem = self.sidecar.build.hw_profile.problem((height, width))
        if problem:
            raise DetdeployError(f'input {height}x{width}: {problem} ({self.path})')
        slot = self._slot()
        return run_in_chunks(batch, self.max_batch, self.static_batch,
                             lambda chunk: slot.execute(np.ascontiguousarray(chunk)))

    def close(self) -> None:
        """Free every thread's device buffers and streams (the backend is unusable after)."""
        with self._slots_lock:
            for slot in self._slots:
                slot.close()
            self._slots.clear()
