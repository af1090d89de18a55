"""Helpers of the input/output reliability tests: tiny hand-built ONNX detectors with the
four-output NMS layout (num_dets, boxes, scores, labels) in a few nodes, so no test pays for a
torch export; and ways to run the command line (in this process, or as a real process).

One detection per image: a fixed box, label 0, and a score that depends on the image (the
sigmoid of its mean), so batching, padding and splitting can be checked image by image.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from detdeploy.core.metadata import ModelMetadata
from conftest import fake_metadata

BOX_XYXY = [4.0, 8.0, 40.0, 48.0]          # network-input px
CLASS_NAMES = ('circle', 'square')


def metadata(batch: int | None = None, input_hw=(64, 64), dynamic_shape: bool = False,
             **changes) -> ModelMetadata:
    return fake_metadata(input_hw, CLASS_NAMES, batch=batch, dynamic_shape=dynamic_shape,
                         onnx_version=onnx.__version__, **changes)


def detector_model(batch: int | None = None, input_hw=(64, 64), dynamic_hw: bool = False,
                   with_metadata: bool = True, input_type=TensorProto.FLOAT,
                   output_names=('num_dets', 'boxes', 'scores', 'labels'),
                   meta: ModelMetadata | None = None) -> onnx.ModelProto:
    """The graph: images [B,3,H,W] -> num_dets [B,1] int32, boxes [B,1,4], scores [B,1],
    labels [B,1] int32."""
    dims = ['batch' if batch is None else batch, 3,
            *(['height', 'width'] if dynamic_hw else list(input_hw))]
    num_dets, boxes, scores, labels = output_names
    nodes = [
        helper.make_node('Cast', ['images'], ['images_f'], to=TensorProto.FLOAT),
        helper.make_node('Shape', ['images_f'], ['shape']),
        helper.make_node('Slice', ['shape', 'zero', 'one'], ['b']),
        helper.make_node('Concat', ['b', 'one'], ['b_1'], axis=0),
        helper.make_node('Concat', ['b', 'one', 'four'], ['b_1_4'], axis=0),
        helper.make_node('ConstantOfShape', ['b_1'], [num_dets],
                         value=numpy_helper.from_array(np.array([1], np.int32))),
        helper.make_node('Expand', ['box', 'b_1_4'], [boxes]),
        helper.make_node('ReduceMean', ['images_f', 'axes'], ['mean'], keepdims=0),
        helper.make_node('Sigmoid', ['mean'], ['score']),
        helper.make_node('Unsqueeze', ['score', 'one'], [scores]),
        helper.make_node('ConstantOfShape', ['b_1'], [labels],
                         value=numpy_helper.from_array(np.array([0], np.int32))),
    ]
    initializers = [
        numpy_helper.from_array(np.array([0], np.int64), 'zero'),
        numpy_helper.from_array(np.array([1], np.int64), 'one'),
        numpy_helper.from_array(np.array([4], np.int64), 'four'),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), 'axes'),
        numpy_helper.from_array(np.array([[BOX_XYXY]], np.float32), 'box'),
    ]
    batch_dim = 'batch' if batch is None else batch
    graph = helper.make_graph(
        nodes, 'synthetic_detector',
        [helper.make_tensor_value_info('images', input_type, dims)],
        [helper.make_tensor_value_info(num_dets, TensorProto.INT32, [batch_dim, 1]),
         helper.make_tensor_value_info(boxes, TensorProto.FLOAT, [batch_dim, 1, 4]),
         helper.make_tensor_value_info(scores, TensorProto.FLOAT, [batch_dim, 1]),
         helper.make_tensor_value_info(labels, TensorProto.INT32, [batch_dim, 1])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)],
                              producer_name='synthetic')
    model.ir_version = 8
    if with_metadata:
        meta = meta or metadata(batch=batch, input_hw=input_hw, dynamic_shape=dynamic_hw)
        helper.set_model_props(model, meta.to_props())
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def save_with_external_data(model: onnx.ModelProto, path: Path, location: str = 'weights.bin',
                            tensors: tuple[str, ...] = ('box',)) -> Path:
    """`path`, with the weights `tensors` in `location` next to it (onnx's external data
    helpers; shape constants stay inside, as ONNX Runtime's shape inference needs them)."""
    from onnx.external_data_helper import set_external_data
    for tensor in model.graph.initializer:
        if tensor.name in tensors:
            set_external_data(tensor, location)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1 << 30)
    return path


def edit_external_data(path: Path, tensor_name: str, drop: tuple[str, ...] = (),
                       **entries: str) -> Path:
    """Rewrite the external_data entries (location, offset, length) of one tensor in place."""
    model = onnx.load(str(path), load_external_data=False)
    [tensor] = [t for t in model.graph.initializer if t.name == tensor_name]
    values = {e.key: e.value for e in tensor.external_data if e.key not in drop}
    values.update(entries)
    del tensor.external_data[:]
    for key, value in values.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(path))
    return path


def two_output_model() -> onnx.ModelProto:
    """An MMDeploy-style end-to-end file: dets [B,K,5] and labels [B,K]; not our layout."""
    graph = helper.make_graph(
        [helper.make_node('Shape', ['images'], ['shape']),
         helper.make_node('Slice', ['shape', 'zero', 'one'], ['b']),
         helper.make_node('Concat', ['b', 'one', 'five'], ['b_1_5'], axis=0),
         helper.make_node('Concat', ['b', 'one'], ['b_1'], axis=0),
         helper.make_node('ConstantOfShape', ['b_1_5'], ['dets']),
         helper.make_node('ConstantOfShape', ['b_1'], ['labels'],
                          value=numpy_helper.from_array(np.array([0], np.int64)))],
        'mmdeploy_like',
        [helper.make_tensor_value_info('input', TensorProto.FLOAT, ['batch', 3, 64, 64])],
        [helper.make_tensor_value_info('dets', TensorProto.FLOAT, ['batch', 1, 5]),
         helper.make_tensor_value_info('labels', TensorProto.INT64, ['batch', 1])],
        [numpy_helper.from_array(np.array([0], np.int64), 'zero'),
         numpy_helper.from_array(np.array([1], np.int64), 'one'),
         numpy_helper.from_array(np.array([5], np.int64), 'five')])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)])
    model.ir_version = 8
    return model


def save_image(path: Path, height: int = 64, width: int = 64, seed: int = 0) -> Path:
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


# ---- running the command line ------------------------------------------------------------

DETDEPLOY = str(Path(sys.executable).parent / 'detdeploy')


def run_main(capsys, *args) -> tuple[int, str, str]:
    """`detdeploy ARGS` in this process (cheap: torch is already imported): exit code, stdout,
    stderr."""
    from detdeploy.cli import main
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_subprocess(*args, **kwargs) -> subprocess.CompletedProcess:
    """`detdeploy ARGS` as a user runs it: a real process with its own exit code."""
    return subprocess.run([DETDEPLOY, *map(str, args)], capture_output=True, text=True,
                          timeout=300, **kwargs)


def assert_one_line_error(code: int, err: str, message: str, exit_code: int = 2) -> None:
    """Exit code, exactly one line on stderr, the message in it, no traceback."""
    assert code == exit_code, err
    assert 'Traceback' not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith('error: '), err
    assert message in lines[0], err
