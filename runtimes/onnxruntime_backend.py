"""The ONNX Runtime backend: runs a detdeploy ONNX file on CPU, CUDA or TensorRT providers.

Needs numpy and onnxruntime only (never torch). onnxruntime-gpu falls back to the CPU silently
when CUDA or TensorRT libraries or a GPU are missing; this backend reports the providers a
session really uses, and with `strict_device` refuses to fall back.
"""
from __future__ import annotations

import contextlib
import io
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detdeploy.core.errors import DetdeployError
from detdeploy.core.metadata import ModelMetadata, ModelOverrides

from .backend import INTERMEDIATE_TENSORS, IO_BINDING, Backend, run_in_chunks
from .model_file import load_onnx_graph, resolve_onnx_metadata

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


def error_line(exc: BaseException, limit: int = 300) -> str:
    """ONNX Runtime's message on one line, shortened at a word boundary, never mid-word."""
    text = str(exc).strip()
    return textwrap.shorten(text.splitlines()[0], limit, placeholder=' ...') if text else ''


class OnnxRuntimeBackend(Backend):
    """Run a detdeploy ONNX file; one instance may be called from several threads at once
    (ONNX Runtime's `InferenceSession.run` is thread-safe and this class keeps no run state)."""

    name = 'ort'
    capabilities = frozenset({IO_BINDING, INTERMEDIATE_TENSORS})

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
            first_line = error_line(exc)
            if options.strict_device:
                raise DetdeployError(f'--strict-device: {wanted} is not usable here '
                                     f'(ONNX Runtime: {first_line})') from None
            raise DetdeployError(f'ONNX Runtime cannot load {self.path}: '
                                 f'{first_line}') from None
        self.options = options
        self.providers = self.session.get_providers()
        self.fallback = None if wanted in self.providers else (
            f'{wanted} is not usable here; running on {", ".join(self.providers)}')
        if self.fallback and options.strict_device:
            raise DetdeployError(f'--strict-device: {self.fallback}')
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._graph = None                  # the ONNX graph, loaded for `run_tensors`
        self.tensor_sessions_created = 0

    @property
    def source(self) -> str:
        return str(self.path)

    def describe(self) -> dict:
        session_options = self.session.get_session_options()
        intra_op = session_options.intra_op_num_threads
        return {'backend': self.name, 'path': str(self.path), 'device': self.options.device,
                'providers': self.providers,
                'threads': {'ort_intra_op': intra_op or 'default (one per physical core)',
                            'ort_inter_op': session_options.inter_op_num_threads or 'default',
                            'ort_execution_mode':
                                str(session_options.execution_mode).split('.')[-1]},
                'weights': self.metadata.checkpoint,
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

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        """The file's outputs for a batch, padding or splitting to a static batch size."""
        return run_in_chunks(batch, None, self.metadata.batch, self._session_run)

    def run_tensors(self, names: list[str], batch: np.ndarray) -> dict[str, np.ndarray]:
        """Any named tensors of the graph for a batch, from a copy of the graph pruned to
        what they need (so post-processing, and any TensorRT plugin node, is left out)."""
        import onnxruntime
        session_options = onnxruntime.SessionOptions()
        session_options.log_severity_level = 4
        if self.options.threads:
            session_options.intra_op_num_threads = self.options.threads
        if self._graph is None:
            self._graph = load_onnx_graph(self.path)
            import onnx
            onnx.external_data_helper.load_external_data_for_model(self._graph,
                                                                   str(self.path.parent))
        session = onnxruntime.InferenceSession(graph_with_outputs(self._graph, names),
                                               session_options,
                                               providers=provider_list(self.options))
        self.tensor_sessions_created += 1
        input_name = session.get_inputs()[0].name
        outputs = run_in_chunks(np.ascontiguousarray(batch, dtype=np.float32), None,
                                self.metadata.batch,
                                lambda chunk: session.run(names, {input_name: chunk}))
        return dict(zip(names, outputs))

    def io_binding(self) -> 'OrtIoBinding':
        """A reusable I/O binding on the device the session runs on (see OrtIoBinding)."""
        return OrtIoBinding(self)

    def run_bound(self, batch: np.ndarray) -> list[np.ndarray]:
        """`run` through an I/O binding: the same outputs, as numpy arrays on the host."""
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


def graph_with_outputs(model, tensors: list[str]) -> bytes:
    """A serialized copy of `model` whose outputs are `tensors`, pruned to the nodes they need."""
    import onnx
    producer = {name: index for index, node in enumerate(model.graph.node)
                for name in node.output}
    keep, todo = set(), [producer[name] for name in tensors if name in producer]
    while todo:
        index = todo.pop()
        if index in keep:
            continue
        keep.add(index)
        todo.extend(producer[name] for name in model.graph.node[index].input if name in producer)
    needed = {name for index in keep for name in model.graph.node[index].input}
    types = {info.name: info.type.tensor_type.elem_type
             for info in (*model.graph.value_info, *model.graph.output)}
    copy = onnx.ModelProto()
    copy.ir_version = model.ir_version
    copy.opset_import.extend(model.opset_import)
    copy.graph.name = model.graph.name
    copy.graph.node.extend(model.graph.node[i] for i in sorted(keep))
    copy.graph.initializer.extend(i for i in model.graph.initializer if i.name in needed)
    initializers = {i.name for i in model.graph.initializer}
    copy.graph.input.extend(i for i in model.graph.input if i.name not in initializers)
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(
        name, types.get(name, onnx.TensorProto.FLOAT), None) for name in tensors)
    return copy.SerializeToString()
