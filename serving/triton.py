"""`detdeploy export-triton`: a Triton Inference Server model repository for an exported file: the
model (onnxruntime_onnx or tensorrt_plan), Python-backend pre- and post-processing models that
import detdeploy's numpy code, and an ensemble wiring them (encoded image in, detections in
original-image pixels out; instance models add each detection's mask as COCO RLE).

Writes text and copies the model file; runs no server. Each config.pbtxt is checked by parsing
it with Triton's own protobuf (`model_config_pb2`, shipped in tritonclient) when installed.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from detdeploy.core.errors import DetdeployError, OutputError
from detdeploy.core.fileio import atomic_write, make_output_dir, refuse_overwriting_inputs
from detdeploy.core.metadata import ModelMetadata
from detdeploy.runtimes.open import backend_for_file
from detdeploy.runtimes.preprocess import DEFAULT_MAX_PIXELS

IMAGE_INPUT = 'IMAGE'                   # the ensemble's input: one encoded image per batch row
RAW_FIELDS = ('num_dets', 'boxes', 'scores', 'labels', 'masks')   # the network's, in order
DEFAULT_MAX_BATCH = 8
DEFAULT_QUEUE_DELAY_US = 2000
TRITON_TYPES = {'FLOAT': 'TYPE_FP32', 'FLOAT16': 'TYPE_FP16', 'INT32': 'TYPE_INT32',
                'INT64': 'TYPE_INT64', 'float32': 'TYPE_FP32', 'int32': 'TYPE_INT32'}
TRT_PLUGIN_NOTE = (
    "# The plan ends in EfficientNMS_TRT, from TensorRT's own plugin library (libnvinfer_plugin,\n"
    "# shipped in Triton's containers). If Triton cannot find the plugin creator, start it\n"
    "# with LD_PRELOAD=libnvinfer_plugin.so.10 (Triton's way to load TensorRT plugins). The\n"
    '# plan must come from the TensorRT version of the Triton release that serves it, on the\n'
    '# same GPU model.\n')
MODEL_PY = '''"""Triton Python backend model written by `detdeploy export-triton`: detdeploy's
own {what} code, imported (not copied), so Triton gives the answers `detdeploy infer` gives.
The Python backend's environment needs detdeploy, numpy and Pillow (pip install --no-deps
detdeploy numpy pillow; instance models: pycocotools too; no torch or onnxruntime)."""
from detdeploy.serving.triton_python import {cls} as TritonPythonModel  # noqa: F401
'''


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a Triton model: dims without the batch axis, -1 where free."""
    name: str
    data_type: str                      # TYPE_FP32, TYPE_INT32, TYPE_STRING, ...
    dims: tuple[int, ...]

    def pbtxt(self) -> str:
        return (f'  {{ name: "{self.name}" data_type: {self.data_type} '
                f'dims: [ {", ".join(str(d) for d in self.dims)} ] }}')


@dataclass
class TritonModel:
    """One model folder: its config and the files in its version folder `1/`."""
    name: str
    config: str
    files: dict[str, Path | str] = field(default_factory=dict)   # name -> source file or text


@dataclass
class TritonRepoReport:
    repository: Path
    ensemble: str
    models: list[str]
    max_batch_size: int
    validated: bool                     # parsed with Triton's protobuf


@dataclass(frozen=True)
class ModelSignature:
    """What the model file takes and gives, from the ONNX graph or an engine's sidecar."""
    platform: str                       # onnxruntime_onnx or tensorrt_plan
    filename: str                       # model.onnx or model.plan
    input: TensorSpec                   # [3, H, W]
    outputs: tuple[TensorSpec, ...]     # num_dets [1], boxes [K, 4], scores [K], labels [K]
                                        # (instance models: and masks [K, h, w])
    max_batch_size: int                 # 0 never: a static-batch-1 file gives 1


def _onnx_signature(path: Path, metadata: ModelMetadata, max_batch: int | None
                    ) -> ModelSignature:
    from detdeploy.runtimes.model_file import load_onnx_graph
    import onnx
    graph = load_onnx_graph(path).graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]

    def spec(info) -> tuple[TensorSpec, int | None]:
        tensor = info.type.tensor_type
        dims = [d.dim_value if d.HasField('dim_value') else -1 for d in tensor.shape.dim]
        kind = onnx.TensorProto.DataType.Name(tensor.elem_type)
        if kind not in TRITON_TYPES:
            raise DetdeployError(f'{path}: {info.name} is {kind.lower()}, which this export '
                                 'does not map to a Triton type')
        return TensorSpec(info.name, TRITON_TYPES[kind], tuple(dims[1:])), dims[0]

    image, batch = spec(inputs[0])
    outputs = [spec(o)[0] for o in graph.output]
    return ModelSignature('onnxruntime_onnx', 'model.onnx', image, tuple(outputs),
                          _max_batch(metadata.batch, batch if batch > 0 else None, max_batch,
                                     path))


def _engine_signature(path: Path, max_batch: int | None) -> tuple[ModelSignature, ModelMetadata]:
    from detdeploy.core.tasks import output_schema
    from detdeploy.runtimes.tensorrt_common import read_sidecar
    sidecar = read_sidecar(path)
    metadata, build = sidecar.metadata, sidecar.build
    profile = build.batch_profile
    if profile.min > 1:
        raise DetdeployError(f'{path} takes batches of {profile.describe()}; Triton sends '
                             'batches from 1 up: rebuild with --min-batch 1')
    if max_batch is not None and max_batch > profile.max:
        raise DetdeployError(f'--max-batch {max_batch} is above the engine profile\'s maximum '
                             f'{profile.max} ({path})')
    shapes = build.hw_profile          # a side the profile lets vary is -1 for Triton
    height, width = (lo if lo == hi else -1 for lo, hi in zip(shapes.min, shapes.max))
    max_det = metadata.nms.max_det if metadata.nms else -1
    sizes = {'B': None, 'K': max_det, '1': 1, '4': 4, '5': 5, **_mask_sizes(metadata, height,
                                                                         width)}
    outputs = tuple(TensorSpec(name, TRITON_TYPES[f.dtype],
                               tuple(sizes.get(d, -1) for d in f.dims[1:]))
                    for name, f in zip(build.output_names,
                                       output_schema(metadata.task, metadata.nms_mode)))
    signature = ModelSignature('tensorrt_plan', 'model.plan',
                               TensorSpec(build.input_name, 'TYPE_FP32', (3, height, width)),
                               outputs, max_batch or profile.max)
    return signature, metadata


def _mask_sizes(metadata: ModelMetadata, height: int, width: int) -> dict[str, int]:
    """The masks output's H and W as its mask frame gives them (-1 where the input side
    varies): frame 'box' size x size, frame 'input' the input side / stride."""
    mask = metadata.mask
    if mask is None:
        return {}
    if mask.frame == 'box':
        return {'H': mask.size, 'W': mask.size}
    return {'H': height // mask.stride if height > 0 else -1,
            'W': width // mask.stride if width > 0 else -1}


def _max_batch(metadata_batch: int | None, graph_batch: int | None, requested: int | None,
               path: Path) -> int:
    static = graph_batch or metadata_batch
    if static is None:
        return requested or DEFAULT_MAX_BATCH
    if static != 1:
        raise DetdeployError(f'{path} has a static batch of {static}; Triton batches requests '
                             'itself: export with --dynamic-batch (or --batch 1)')
    if requested not in (None, 1):
        raise DetdeployError(f'{path} has a static batch of 1, so --max-batch {requested} '
                             'cannot apply; export with --dynamic-batch')
    return 1


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace('\\', '\\\\').replace('"', '\\"').replace('\n', '\\n') + '"'


def _parameters(values: dict[str, str]) -> str:
    return ''.join(f'parameters {{ key: {_quote(key)} '
                   f'value {{ string_value: {_quote(value)} }} }}\n'
                   for key, value in values.items())


def _io_block(kind: str, specs) -> str:
    return f'{kind} [\n' + ',\n'.join(spec.pbtxt() for spec in specs) + '\n]\n'


def _batching(max_batch_size: int, queue_delay_us: int) -> str:
    if max_batch_size <= 1:
        return ''
    return (f'dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n')


def plan_repository(model_path: str | Path, name: str, max_batch: int | None = None,
                    queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS,
                    python_instances: int = 1) -> tuple[list[TritonModel], int]:
    """The four model folders for `model_path` (an .onnx with detdeploy metadata, or an
    .engine with its sidecar), named `name` (the ensemble), `name_preprocess`, `name_model`
    and `name_postprocess`; and their max_batch_size."""
    if not re.fullmatch(r'[A-Za-z0-9][A-Za-z0-9_.-]*', name):
        raise DetdeployError(f"--name '{name}': use letters, digits, '_', '-' and '.' "
                             '(it names folders in the repository)')
    path = Path(model_path)
    if backend_for_file(path) == 'ort':
        from detdeploy.runtimes.model_file import resolve_onnx_metadata
        metadata = resolve_onnx_metadata(path)
        _check_servable(metadata, path)
        signature = _onnx_signature(path, metadata, max_batch)
    else:
        signature, metadata = _engine_signature(path, max_batch)
        _check_servable(metadata, path)
    batch = signature.max_batch_size
    num_dets, boxes, scores, labels = signature.outputs[:4]
    height, width = signature.input.dims[1:]
    pre, net, post = f'{name}_preprocess', f'{name}_model', f'{name}_postprocess'
    image = TensorSpec(IMAGE_INPUT, 'TYPE_STRING', (1,))
    image_hw = TensorSpec('image_hw', 'TYPE_INT32', (2,))
    scale_wh = TensorSpec('scale_wh', 'TYPE_FP32', (2,))
    pixels = TensorSpec('images', 'TYPE_FP32', (3, height, width))
    # what the ensemble answers: the model's outputs, boxes mapped to original-image pixels;
    # instance models: each detection's mask at the original size as COCO RLE counts
    answer = (TensorSpec('num_dets', 'TYPE_INT32', num_dets.dims),
              TensorSpec('boxes', 'TYPE_FP32', boxes.dims),
              TensorSpec('scores', 'TYPE_FP32', scores.dims),
              TensorSpec('labels', 'TYPE_INT32', labels.dims))
    post_parameters = {'class_names': json.dumps(list(metadata.class_names))}
    if metadata.mask is not None:
        answer += (TensorSpec('segmentation', 'TYPE_STRING', scores.dims),)
        post_parameters['mask'] = json.dumps(metadata.mask.to_dict())
    raw = tuple(TensorSpec(spec.name, spec.data_type, spec.dims) for spec in signature.outputs)
    # the post-processing model's inputs, by position: raw_num_dets ... (raw_masks)
    post_inputs = tuple(TensorSpec(f'raw_{field}', spec.data_type, spec.dims)
                        for field, spec in zip(RAW_FIELDS, raw))
    python_group = f'instance_group [ {{ kind: KIND_CPU count: {python_instances} }} ]\n'
    preprocess_json = json.dumps(metadata.preprocess.to_dict())
    models = [
        TritonModel(pre, (
            f'name: "{pre}"\nbackend: "python"\nmax_batch_size: {batch}\n'
            + _io_block('input', [image]) + _io_block('output', [pixels, image_hw, scale_wh])
            + _batching(batch, queue_delay_us) + python_group
            + _parameters({'preprocess': preprocess_json,
                           'max_pixels': str(max_pixels or 0)})),
            {'model.py': MODEL_PY.format(what='preprocessing', cls='PreprocessModel')}),
        TritonModel(net, (
            (TRT_PLUGIN_NOTE if metadata.nms_mode == 'trt' else '')
            + f'name: "{net}"\nplatform: "{signature.platform}"\nmax_batch_size: {batch}\n'
            f'default_model_filename: "{signature.filename}"\n'
            + _io_block('input', [signature.input]) + _io_block('output', raw)
            + _batching(batch, queue_delay_us)), {signature.filename: path}),
        TritonModel(post, (
            f'name: "{post}"\nbackend: "python"\nmax_batch_size: {batch}\n'
            + _io_block('input', [*post_inputs, image_hw, scale_wh])
            + _io_block('output', answer) + _batching(batch, queue_delay_us) + python_group
            + _parameters({'preprocess': preprocess_json, **post_parameters})),
            {'model.py': MODEL_PY.format(
                what='post-processing (boxes back to image pixels, masks pasted)',
                cls='PostprocessModel')}),
    ]

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        maps = ''.join(f' input_map {{ key: {_quote(k)} value: {_quote(v)} }}'
                       for k, v in inputs.items())
        maps += ''.join(f' output_map {{ key: {_quote(k)} value: {_quote(v)} }}'
                        for k, v in outputs.items())
        return f'    {{ model_name: {_quote(model)} model_version: -1{maps} }}'

    steps = [
        step(pre, {IMAGE_INPUT: IMAGE_INPUT},
             {'images': 'preprocessed', 'image_hw': 'image_hw', 'scale_wh': 'scale_wh'}),
        step(net, {signature.input.name: 'preprocessed'},
             {spec.name: f'net_{spec.name}' for spec in raw}),
        step(post, {**{p.name: f'net_{r.name}' for p, r in zip(post_inputs, raw)},
                    'image_hw': 'image_hw', 'scale_wh': 'scale_wh'},
             {spec.name: spec.name for spec in answer}),
    ]
    models.append(TritonModel(name, (
        f'name: "{name}"\nplatform: "ensemble"\nmax_batch_size: {batch}\n'
        + _io_block('input', [image]) + _io_block('output', answer)
        + 'ensemble_scheduling {\n  step [\n' + ',\n'.join(steps) + '\n  ]\n}\n'
        + _parameters({'class_names': json.dumps(list(metadata.class_names)),
                       'arch': metadata.arch})), {}))
    return models, batch


def _check_servable(metadata: ModelMetadata, path: Path) -> None:
    if not metadata.has_nms:
        raise DetdeployError(f'{path} was exported with --nms none (raw outputs); the Triton '
                             'ensemble needs a file exported with --nms onnx (or an engine)')
    if metadata.task not in ('detect', 'instance'):
        raise DetdeployError(f"{path}: a Triton repository for '{metadata.task}' models is not "
                             'implemented yet (boxes and instance masks only)')
    if metadata.nms_mode == 'trt' and path.suffix.lower() == '.onnx':
        raise DetdeployError(f'{path} ends in the EfficientNMS_TRT plugin, which ONNX Runtime '
                             f'cannot run: build an engine (detdeploy build-engine {path}) and '
                             'export-triton the .engine')


def write_repository(models: list[TritonModel], repository: str | Path,
                     overwrite: bool = False) -> list[Path]:
    """Each model folder into `repository`: config.pbtxt and `1/<files>`, every file written
    atomically. An existing model folder is refused unless `overwrite`."""
    root = make_output_dir(repository, '-o')
    existing = [m.name for m in models if (root / m.name).exists()]
    if existing and not overwrite:
        raise OutputError(f'{root}: model folder {existing[0]} exists; remove it, choose '
                          'another --name, or give --overwrite')
    written = []
    for model in models:
        version = root / model.name / '1'
        version.mkdir(parents=True, exist_ok=True)
        written.append(_write_text(root / model.name / 'config.pbtxt', model.config))
        for filename, source in model.files.items():
            target = version / filename
            if isinstance(source, Path):
                with atomic_write(target) as handle, open(source, 'rb') as original:
                    shutil.copyfileobj(original, handle, 1 << 20)
                written.append(target)
            else:
                written.append(_write_text(target, source))
    return written


def _outputs(models: list[TritonModel], repository: Path) -> list[tuple[str, Path]]:
    """Every file `write_repository` will write, as (-o, path) pairs."""
    return [('-o', path) for model in models for path in
             [repository / model.name / 'config.pbtxt',
              *(repository / model.name / '1' / filename for filename in model.files)]]


def _inputs(model_path: str | Path, models: list[TritonModel]) -> list[tuple[str, Path]]:
    """The files the repository is made from: MODEL, an engine's sidecar, and every file
    copied into it."""
    from detdeploy.runtimes.tensorrt_common import sidecar_path
    inputs = [('MODEL', Path(model_path))]
    if Path(model_path).suffix != '.onnx':
        inputs.append(('MODEL (its sidecar)', sidecar_path(model_path)))
    inputs += [('MODEL', source) for model in models for source in model.files.values()
               if isinstance(source, Path)]
    return inputs


def _write_text(path: Path, text: str) -> Path:
    with atomic_write(path, 'w') as handle:
        handle.write(text)
    return path


def model_config_module():
    """tritonclient's generated `model_config_pb2`, loaded from its file: importing it as
    `tritonclient.grpc.model_config_pb2` would need the grpc extra (which pins protobuf < 7).
    None when tritonclient is not installed."""
    spec = importlib.util.find_spec('tritonclient')
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / 'grpc' / 'model_config_pb2.py'
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location('detdeploy_triton_model_config_pb2',
                                                         path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def parse_config(text: str, source: str = 'config.pbtxt', pb2=None):
    """A `ModelConfig` message from config.pbtxt text, strictly (an unknown field or a bad
    value is a one-line DetdeployError)."""
    from google.protobuf import text_format
    pb2 = pb2 or model_config_module()
    if pb2 is None:
        raise DetdeployError('tritonclient is not installed: pip install --no-deps tritonclient '
                             '(for its model_config_pb2)')
    try:
        return text_format.Parse(text, pb2.ModelConfig())
    except text_format.ParseError as exc:
        raise DetdeployError(f'{source} is not a valid Triton model config: {exc}') from None


def export_triton(model_path: str | Path, repository: str | Path, name: str | None = None,
                  max_batch: int | None = None, queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, overwrite: bool = False
                  ) -> TritonRepoReport:
    """`plan_repository`, each config checked with Triton's protobuf where available, then
    `write_repository`."""
    name = name or Path(model_path).stem.replace('.', '_')
    models, batch = plan_repository(model_path, name, max_batch, queue_delay_us, max_pixels)
    refuse_overwriting_inputs(_outputs(models, Path(repository)), _inputs(model_path, models))
    pb2 = model_config_module()
    if pb2 is not None:
        for model in models:
            parse_config(model.config, f'{model.name}/config.pbtxt', pb2)
    write_repository(models, repository, overwrite)
    return TritonRepoReport(Path(repository), name, [m.name for m in models], batch,
                            pb2 is not None)
