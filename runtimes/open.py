"""Open an exported model file with the right backend: `.onnx` -> ONNX Runtime (or OpenVINO
when asked: `openvino`, `openvino-f32`, `openvino-bf16`), `.engine` or `.plan` -> TensorRT.
Never imports torch; imports onnxruntime, openvino or tensorrt only for the backend chosen.
"""
from __future__ import annotations

from pathlib import Path

from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import check_input_file

ONNX_SUFFIXES = ('.onnx',)
ENGINE_SUFFIXES = ('.engine', '.plan')
OPENVINO_BACKENDS = ('openvino', 'openvino-f32', 'openvino-bf16')   # precision hint in the name
FILE_BACKENDS = ('auto', 'ort', 'trt', *OPENVINO_BACKENDS)
BACKENDS = ('torch', 'ort', 'trt', *OPENVINO_BACKENDS)


def is_model_file(text: str | Path) -> bool:
    return str(text).lower().endswith(ONNX_SUFFIXES + ENGINE_SUFFIXES)


def backend_for_file(path: str | Path, backend: str = 'auto') -> str:
    """'ort' or 'trt' for a model file and a requested backend (auto picks by suffix)."""
    name = str(path).lower()
    kind = 'ort' if name.endswith(ONNX_SUFFIXES) else 'trt' if name.endswith(ENGINE_SUFFIXES) \
        else None
    if backend not in FILE_BACKENDS:
        raise DetdeployError(f"backend '{backend}' does not run model files: use "
                             f"{', '.join(FILE_BACKENDS)}")
    if kind is None:
        raise DetdeployError(f'{path}: model files end in .onnx (ONNX Runtime) or .engine/.plan '
                             '(TensorRT)')
    if backend == 'auto' or backend == kind:
        return kind
    if backend in OPENVINO_BACKENDS:
        if kind != 'ort':
            raise DetdeployError(f'--backend {backend} needs an .onnx file, got {path}')
        return backend
    if backend == 'trt':
        raise DetdeployError(f'--backend trt needs a TensorRT engine, got {path}: build one with '
                             f'`detdeploy build-engine {path} -o MODEL.engine`, or run the file '
                             'with --backend ort --device tensorrt')
    raise DetdeployError(f'--backend ort needs an .onnx file, got {path}')


def open_model_file(path: str | Path, backend: str = 'auto', *, device: str = 'cpu',
                    device_id: int = 0, threads: int | None = None, strict_device: bool = False,
                    optimization: str = 'all', trt_fp16: bool = False,
                    trt_cache_dir: str | None = None, overrides=None,
                    check_signature: bool = True):
    """An OnnxRuntimeBackend or a TensorRTBackend for `path`.

    ONNX Runtime takes every option; a TensorRT engine always runs on CUDA device `device_id`,
    and the other options do not apply to it. `overrides` (a `metadata.ModelOverrides`): class
    names, input size, and preprocessing for ONNX files without detdeploy metadata; an engine
    takes only class names. `check_signature=False`: an ONNX graph whose input and outputs do
    not fit its metadata is opened anyway (`detdeploy parity` reports that itself)."""
    chosen = backend_for_file(path, backend)
    if Path(path).is_dir():
        raise DetdeployError(f'{path} is a directory, not a model file')
    if chosen in OPENVINO_BACKENDS:
        if device != 'cpu':
            raise DetdeployError(f"--backend {chosen} runs on the CPU here, not --device "
                                 f"'{device}'")
        from .openvino_backend import OpenVinoBackend, precision_hint
        return OpenVinoBackend(path, precision_hint(chosen), threads=threads,
                               overrides=overrides, check_signature=check_signature)
    if chosen == 'ort':
        from .onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
        return OnnxRuntimeBackend(path, OrtOptions(
            device=device, device_id=device_id, threads=threads, optimization=optimization,
            strict_device=strict_device, trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir),
            overrides=overrides, check_signature=check_signature)
    check_input_file(path, 'engine file')
    if overrides is not None and (overrides.input_size or overrides.preprocessing_flags()):
        raise DetdeployError('--input-size, --mean, --std, --channel-order and --pad-value do '
                             'not apply to a TensorRT engine: its sidecar fixes them')
    from .tensorrt_backend import TensorRTBackend
    engine = TensorRTBackend(path, device_id=device_id)
    if overrides is not None and overrides.class_names is not None:
        engine.rename_classes(overrides.class_names)
    return engine


def model_kind(model: str) -> str:
    """'ort' or 'trt' for model files (by suffix), 'torch' for registry names."""
    return backend_for_file(model) if is_model_file(model) else 'torch'


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
    if kind == 'ort' and requested is not None and any(b in OPENVINO_BACKENDS for b in requested):
        return [b for b in requested if b == 'ort' or b in OPENVINO_BACKENDS]
    if kind != 'torch':
        if requested is not None and kind not in requested:
            raise DetdeployError(f"{model} runs on the {kind} backend, which --backend "
                                 f"{','.join(requested)} leaves out")
        return [kind]
    chosen = list(requested or ('torch',))
    openvino = [b for b in chosen if b in OPENVINO_BACKENDS]
    if openvino:
        raise DetdeployError(f"--backend {openvino[0]} runs .onnx files: export '{model}' first "
                             '(detdeploy export)')
    if 'trt' in chosen:
        raise DetdeployError(f"--backend trt needs an .engine file, not the registry name "
                             f"'{model}' (build one with detdeploy build-engine)")
    return chosen
