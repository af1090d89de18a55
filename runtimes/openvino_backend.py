"""The OpenVINO backend: runs a detdeploy ONNX file (FP32 or QDQ INT8) on OpenVINO's CPU plugin,
read directly from the ONNX file, with an inference precision hint (f32, bf16, or the runtime's
default: bf16 on CPUs with AVX512_BF16 or AMX, else f32).

Needs numpy and openvino only (the optional extra `detdeploy[openvino]`), never torch. Reports
the precision, device and threads the compiled model really uses.
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from detdeploy.core.errors import DetdeployError
from detdeploy.core.metadata import ModelMetadata, ModelOverrides

from .backend import INTERMEDIATE_TENSORS, Backend, run_in_chunks
from .model_file import resolve_onnx_metadata

PRECISION_HINTS = ('f32', 'bf16')
BACKEND_NAMES = ('openvino', 'openvino-f32', 'openvino-bf16')


def precision_hint(backend_name: str) -> str | None:
    """`openvino` -> None (the runtime's default), `openvino-f32` -> 'f32', ..."""
    if backend_name not in BACKEND_NAMES:
        raise DetdeployError(f"unknown OpenVINO backend '{backend_name}': use "
                             f"{', '.join(BACKEND_NAMES)}")
    return backend_name.partition('-')[2] or None


def _declared_output_dtypes(path: Path) -> list[np.dtype]:
    import onnx

    from .model_file import load_onnx_graph
    return [np.dtype(onnx.helper.tensor_dtype_to_np_dtype(output.type.tensor_type.elem_type))
            for output in load_onnx_graph(path).graph.output]


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise DetdeployError("the openvino backend needs OpenVINO: pip install "
                             "'detdeploy[openvino]' (or pip install openvino)") from None
    return openvino


class OpenVinoBackend(Backend):
    """Run a detdeploy ONNX file with OpenVINO; one instance may be called from several threads
    (each thread gets its own infer request of the one compiled model)."""

    name = 'openvino'
    capabilities = frozenset({INTERMEDIATE_TENSORS})

    def __init__(self, path: str | Path, precision: str | None = None, threads: int | None = None,
                 overrides: ModelOverrides | None = None, check_signature: bool = True):
        """`precision`: 'f32', 'bf16' or None (the CPU plugin's default for this CPU)."""
        openvino = _import_openvino()
        if precision is not None and precision not in PRECISION_HINTS:
            raise DetdeployError(f"OpenVINO precision '{precision}': use "
                                 f"{', '.join(PRECISION_HINTS)}")
        self.path = Path(path)
        self.metadata: ModelMetadata = resolve_onnx_metadata(self.path, overrides,
                                                             check_signature)
        self.output_dtypes = _declared_output_dtypes(self.path)
        self.requested_precision = precision
        self.threads = threads
        self.core = openvino.Core()
        self.config = {'PERFORMANCE_HINT': 'LATENCY'}
        if precision is not None:
            self.config['INFERENCE_PRECISION_HINT'] = precision
        if threads:
            self.config['INFERENCE_NUM_THREADS'] = threads
        try:
            self.model = self.core.read_model(str(self.path))
            self.compiled = self.core.compile_model(self.model, 'CPU', self.config)
        except RuntimeError as exc:
            first_line = next((line for line in str(exc).splitlines() if line.strip()), '')
            raise DetdeployError(f'OpenVINO cannot compile {self.path}: '
                                 f'{first_line.strip()[:200]}') from None
        self.precision = self.compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()
        self.name = f'openvino-{self.precision}'
        self.version = openvino.get_version()
        self._local = threading.local()
        self._tensor_models: dict[tuple[str, ...], object] = {}

    @property
    def source(self) -> str:
        return str(self.path)

    def describe(self) -> dict:
        return {'backend': self.name, 'path': str(self.path), 'device': 'cpu',
                'providers': [f'OpenVINO CPU plugin ({self.precision})'],
                'precision': self.metadata.precision if self.precision == 'f32'
                else f'{self.metadata.precision}+{self.precision}',
                'inference_precision': self.precision,
                'threads': {'openvino_inference_num_threads':
                            int(self.compiled.get_property('INFERENCE_NUM_THREADS'))},
                'openvino_version': self.version, 'weights': self.metadata.checkpoint,
                'inputs': [(i.any_name, str(i.partial_shape)) for i in self.compiled.inputs],
                'outputs': [(o.any_name, str(o.partial_shape)) for o in self.compiled.outputs],
                'nms_mode': self.metadata.nms_mode, 'arch': self.metadata.arch}

    def _request(self):
        request = getattr(self._local, 'request', None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def _infer(self, compiled, request, batch: np.ndarray) -> list[np.ndarray]:
        try:
            results = request.infer({0: batch})
        except RuntimeError as exc:
            text = ' '.join(str(exc).split())
            raise DetdeployError(f'OpenVINO failed to run {self.path} on a batch of shape '
                                 f'{list(batch.shape)}: {text[:300]}') from None
        return [np.array(results[output]) for output in compiled.outputs]

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        outputs = run_in_chunks(batch, None, self.metadata.batch,
                                lambda chunk: self._infer(self.compiled, self._request(), chunk))
        # OpenVINO may change integer widths (i64 -> i32); give the file's declared types
        return [out.astype(dtype, copy=False) for out, dtype in zip(outputs, self.output_dtypes)]

    def run_tensors(self, names: list[str], batch: np.ndarray) -> dict[str, np.ndarray]:
        """Named tensors of the graph, from the model with those tensors added as outputs
        (compiled once per set of names, at the same precision)."""
        key = tuple(names)
        if key not in self._tensor_models:
            model = self.core.read_model(str(self.path))
            try:
                model.add_outputs(list(names))
            except RuntimeError as exc:
                raise DetdeployError(f'OpenVINO: tensors {", ".join(names)} are not in '
                                     f'{self.path} ({str(exc).splitlines()[0][:120]})') from None
            self._tensor_models[key] = self.core.compile_model(model, 'CPU', self.config)
        compiled = self._tensor_models[key]
        request = compiled.create_infer_request()
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        outputs = run_in_chunks(batch, None, self.metadata.batch,
                                lambda chunk: self._infer(compiled, request, chunk))
        by_name = {}
        for output, value in zip(compiled.outputs, outputs):
            for name in output.names:
                by_name[name] = value
        return {name: by_name[name] for name in names}
