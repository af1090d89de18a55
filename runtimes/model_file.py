"""Reading a model file's description out of an ONNX file, safely: the graph without its
weights, external-data checks, the detdeploy metadata (`core.metadata`), metadata for files
from other tools, and the check that the graph's input and outputs fit that description.

Needs onnx (imported when used), never torch; runs before any runtime opens the file.
"""
from __future__ import annotations

import os
from pathlib import Path, PureWindowsPath
from typing import Iterator

import numpy as np

from detdeploy.core.errors import DetdeployError, MetadataError, ModelFileError
from detdeploy.core.fileio import check_input_file
from detdeploy.core.metadata import FOREIGN_ARCH, ModelMetadata, ModelOverrides, apply_overrides
from detdeploy.core.preprocessing import PreprocessConfig, check_input_size
from detdeploy.core.tasks import DETECT, output_schema


def load_onnx_graph(path: str | Path):
    """The ONNX ModelProto of `path` without its weights' external data, after checking that
    any external data it references is safe and complete (`check_external_data`)."""
    import onnx
    path = Path(path)
    if path.is_dir():
        raise DetdeployError(f'{path} is a directory, not an ONNX model file')
    check_input_file(path, 'model file')
    if path.stat().st_size == 0:
        raise DetdeployError(f'{path} is empty, not an ONNX model')
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for files that are not ONNX
        raise DetdeployError(f'{path} is not an ONNX model ({type(exc).__name__})') from None
    if not model.graph.node and not model.graph.output:
        # protobuf parses many non-ONNX byte strings as an empty message
        raise DetdeployError(f'{path} is not an ONNX model (no graph)')
    check_external_data(model, path)
    return model


def read_onnx_metadata(path: str | Path) -> ModelMetadata:
    """The metadata of an ONNX file, without loading its weights."""
    model = load_onnx_graph(path)
    return ModelMetadata.from_props({p.key: p.value for p in model.metadata_props}, str(path))


def resolve_onnx_metadata(path: str | Path, overrides: ModelOverrides | None = None,
                          check_signature: bool = True) -> ModelMetadata:
    """What a runtime needs to run `path`: its detdeploy metadata with `overrides` applied, or,
    for a file without metadata whose outputs follow the four-output NMS layout, metadata made
    from the graph and the overrides (one line naming the flags still missing). Without
    `overrides` (a caller with no such flags), a file without metadata is refused. With
    `check_signature`, the graph's input and outputs must match the result."""
    model = load_onnx_graph(path)
    props = {p.key: p.value for p in model.metadata_props}
    if 'detdeploy_version' not in props and overrides is not None:
        metadata = foreign_metadata(model, Path(path), overrides)
    else:
        metadata = apply_overrides(ModelMetadata.from_props(props, str(path)),
                                   overrides or ModelOverrides(), str(path))
    if check_signature:
        check_graph_signature(model, metadata, str(path))
    return metadata


def _value_shape(info) -> list:
    """Dims of a graph input/output: ints where static, None where symbolic."""
    return [d.dim_value if d.HasField('dim_value') else None
            for d in info.type.tensor_type.shape.dim]


def _dtype_kind(elem_type: int) -> str:
    import onnx
    name = onnx.TensorProto.DataType.Name(elem_type)
    return 'f' if name in ('FLOAT', 'FLOAT16', 'DOUBLE', 'BFLOAT16') else (
        'i' if 'INT' in name else name.lower())


def _graph_inputs(model) -> list:
    initializers = {init.name for init in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _describe_outputs(model) -> str:
    return ', '.join(f'{o.name} {_shape_text(_value_shape(o))} '
                     f'{_elem_name(o.type.tensor_type.elem_type)}' for o in model.graph.output)


def _shape_text(shape: list) -> str:
    return '[' + ','.join('?' if d is None else str(d) for d in shape) + ']'


def _elem_name(elem_type: int) -> str:
    import onnx
    return onnx.TensorProto.DataType.Name(elem_type).lower()


def _outputs_follow(model, schema) -> bool:
    """The graph's outputs have the schema's count, element kinds and ranks."""
    outputs = list(model.graph.output)
    return len(outputs) == len(schema) and all(
        _dtype_kind(o.type.tensor_type.elem_type) == field.kind
        and len(_value_shape(o)) == field.rank for o, field in zip(outputs, schema))


def foreign_metadata(model, path: Path, overrides: ModelOverrides) -> ModelMetadata:
    """Metadata for an ONNX file made by another tool: the graph gives the batch and, if static,
    the input size; the command line gives class names and preprocessing."""
    source = str(path)
    if not _outputs_follow(model, output_schema(DETECT, 'onnx')):
        raise MetadataError(
            f'{source} has no detdeploy metadata and its outputs ({_describe_outputs(model)}) '
            'are not the four-output NMS layout detdeploy runs (num_dets [B,1] int, boxes '
            '[B,K,4] float, scores [B,K] float, labels [B,K] int); export the model with '
            '`detdeploy export`')
    inputs = _graph_inputs(model)
    shape = _value_shape(inputs[0]) if len(inputs) == 1 else []
    static_hw = tuple(shape[2:4]) if len(shape) == 4 and None not in shape[2:4] else None
    missing = [flag for flag, value in (('--class-names', overrides.class_names),
                                        ('--mean', overrides.mean), ('--std', overrides.std),
                                        ('--channel-order', overrides.channel_order))
               if value is None]
    if static_hw is None and overrides.input_size is None:
        missing.append('--input-size')
    if missing:
        raise MetadataError(
            f'{source} has no detdeploy metadata (made by another tool?): to run it, give '
            f'{", ".join(missing)} (its preprocessing and classes), or export the model with '
            '`detdeploy export`')
    input_size = tuple(overrides.input_size or static_hw)
    if overrides.input_size is not None and static_hw and tuple(static_hw) != input_size:
        raise DetdeployError(f'{source} takes a fixed {static_hw[0]}x{static_hw[1]} input; '
                             f'--input-size {input_size[0]}x{input_size[1]} does not fit it')
    if static_hw is None:       # its strides are unknown: the usual largest stride, 32
        check_input_size(input_size, PreprocessConfig().size_divisor)
    overrides.check()
    opset = next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), 0)
    batch = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
    metadata = ModelMetadata(
        arch=FOREIGN_ARCH, class_names=tuple(overrides.class_names),
        preprocess=PreprocessConfig(
            input_size=input_size, channel_order=overrides.channel_order,
            mean=tuple(overrides.mean), std=tuple(overrides.std),
            pad_value=114.0 if overrides.pad_value is None else float(overrides.pad_value)),
        nms_mode='onnx', nms=None, batch=batch, dynamic_shape=static_hw is None, opset=opset,
        detdeploy_version='', torch_version='', onnx_version='',
        checkpoint=f'unknown (made by {model.producer_name or "another tool"})',
        checkpoint_sha256=None)
    problem = metadata.problem()        # e.g. static dims too large for this machine
    if problem:
        raise ModelFileError(f'{source}: its graph and flags do not describe a usable model: '
                             f'{problem}')
    return metadata


def check_graph_signature(model, metadata: ModelMetadata, source: str) -> None:
    """The graph's input and outputs fit `metadata`: one float32 input [B, 3, H, W] with the
    metadata's batch and input size where the graph fixes them, and the outputs of its layout
    (names for detdeploy files: runtimes read outputs by position)."""
    inputs = _graph_inputs(model)
    if len(inputs) != 1:
        raise ModelFileError(f'{source} has {len(inputs)} inputs '
                             f'({", ".join(i.name for i in inputs) or "none"}); detdeploy runs '
                             'models with one image input [B,3,H,W] float32')
    image_input = inputs[0]
    shape = _value_shape(image_input)
    elem = image_input.type.tensor_type.elem_type
    if _elem_name(elem) != 'float':
        raise ModelFileError(f"{source}: input '{image_input.name}' is {_elem_name(elem)}, but "
                             'runtimes feed float32 images')
    if len(shape) != 4 or shape[1] not in (None, 3):
        raise ModelFileError(f"{source}: input '{image_input.name}' has shape "
                             f'{_shape_text(shape)}, not [B,3,H,W]')
    batch = shape[0]
    if batch is not None and metadata.batch is None:
        raise ModelFileError(f'{source}: the metadata says the batch is dynamic but the graph '
                             f"input '{image_input.name}' takes a batch of {batch}")
    if batch is not None and metadata.batch is not None and batch != metadata.batch:
        raise ModelFileError(f'{source}: the metadata says batch {metadata.batch} but the graph '
                             f"input '{image_input.name}' takes {batch}")
    graph_hw = shape[2:4]
    want = tuple(metadata.preprocess.input_size)
    for side, (got, wanted) in zip(('height', 'width'), zip(graph_hw, want)):
        if got is not None and got != wanted:
            raise ModelFileError(
                f'{source}: the metadata says input {want[0]}x{want[1]} but the graph input '
                f"'{image_input.name}' is {_shape_text(shape)} ({side} {got})")
    schema = output_schema(metadata.task, metadata.nms_mode)
    layout = ', '.join(f'{field.name} {"int" if field.kind == "i" else "float"} rank '
                       f'{field.rank}' for field in schema)
    if not _outputs_follow(model, schema):
        raise ModelFileError(f'{source}: outputs ({_describe_outputs(model)}) do not match the '
                             f'layout its metadata states ({layout})')
    if not metadata.has_nms:        # per-anchor scores [B, N, C]: C is the class count
        classes = _value_shape(model.graph.output[len(schema) - 1])[-1]
        if classes is not None and classes != len(metadata.class_names):
            raise ModelFileError(f'{source}: its graph scores {classes} classes but its metadata '
                                 f'names {len(metadata.class_names)}')
    names = [o.name for o in model.graph.output]
    if metadata.arch != FOREIGN_ARCH and names != [field.name for field in schema]:
        raise ModelFileError(f'{source}: outputs are ({", ".join(names)}) but its metadata '
                             f'layout is ({", ".join(f.name for f in schema)}): runtimes '
                             'read outputs by position')


# ---- external data ------------------------------------------------------------------------

def _all_tensors(model) -> Iterator:
    """Every TensorProto of the model: initializers and tensor attributes, in all subgraphs."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField('t'):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField('g'):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)


def _tensor_nbytes(tensor) -> int | None:
    """Bytes of a tensor's raw data, from its dims and type; None where not fixed (strings)."""
    import onnx
    count = 1
    for dim in tensor.dims:
        count *= dim
    name = onnx.TensorProto.DataType.Name(tensor.data_type)
    if name == 'STRING' or name == 'UNDEFINED':
        return None
    if name in ('INT4', 'UINT4', 'FLOAT4E2M1'):
        return (count + 1) // 2
    try:
        return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    except (KeyError, TypeError, ValueError):
        return None


def check_external_data(model, path: str | Path) -> None:
    """Refuse external data that a loader would read from outside the model's directory (an
    absolute path, `..`, or a symlink leading out), that is missing, or whose offset and length
    do not fit the file or the tensor. Called before any session or parser opens the file."""
    import onnx
    path = Path(path)
    base = path.parent.resolve()
    for tensor in _all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        name = tensor.name or '(unnamed)'
        location = info.get('location', '')
        if not location:
            raise ModelFileError(f"{path}: tensor '{name}' has external data without a location")
        if '\x00' in location:
            raise ModelFileError(f"{path}: tensor '{name}' has an external data location with a "
                                 f'NUL byte ({location!r}): not a file name')
        if (os.path.isabs(location) or PureWindowsPath(location).is_absolute()
                or location.startswith(('/', '\\')) or PureWindowsPath(location).drive):
            raise ModelFileError(f"{path}: tensor '{name}' reads its data from the absolute path "
                                 f'{location}; external data must lie in the model\'s directory '
                                 '(refused: a model file could otherwise read any file)')
        try:
            target = (base / location).resolve()
        except (RuntimeError, OSError) as exc:      # a symlink loop
            raise ModelFileError(f"{path}: the external data file {location} of tensor '{name}' "
                                 f'cannot be resolved ({exc})') from None
        if not target.is_relative_to(base):
            raise ModelFileError(f"{path}: tensor '{name}' reads its data from {location}, "
                                 f"outside the model's directory {base} (refused: a model file "
                                 'could otherwise read any file)')
        if not target.exists():
            raise ModelFileError(f"{path}: the external data file {location} of tensor '{name}' "
                                 f'is missing (looked for {target}); keep it next to the model')
        if not target.is_file():
            raise ModelFileError(f"{path}: the external data file {location} of tensor '{name}' "
                                 f'is not a regular file ({target})')
        size = target.stat().st_size
        try:
            offset = int(info.get('offset', 0))
            length = int(info['length']) if 'length' in info else None
        except ValueError:
            raise ModelFileError(f"{path}: tensor '{name}' has a non-numeric external data "
                                 'offset or length') from None
        expected = _tensor_nbytes(tensor)
        if offset < 0 or (length is not None and length < 0):
            raise ModelFileError(f"{path}: tensor '{name}' has a negative external data offset "
                                 'or length')
        if length is not None and offset + length > size:
            raise ModelFileError(f"{path}: tensor '{name}' reads bytes {offset}..{offset + length}"
                                 f' of {location}, which has {size}: the data file is truncated '
                                 'or belongs to another model')
        available = length if length is not None else size - offset
        if expected is not None and available != expected:
            raise ModelFileError(f"{path}: tensor '{name}' needs {expected} bytes "
                                 f'({list(tensor.dims)} {_elem_name(tensor.data_type)}) but its '
                                 f'external data in {location} is {available} bytes '
                                 f'(offset {offset}{"" if length is None else f", length {length}"})')
