"""FP16 copies of detdeploy ONNX files for GPU providers: the network in float16, the image
input, the outputs and the post-processing (decoding, NMS) kept float32.

Uses ONNX Runtime's float16 converter with the post-processing nodes blocked; checked with
`onnx.checker`; metadata precision fp16. No running here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import atomic_write

from .graph_parts import name_nodes, split_graph


@dataclass
class Fp16Report:
    path: Path
    size_bytes: int
    fp16_nodes: int                 # network nodes computing in float16
    float_nodes: int                # post-processing nodes kept float32
    casts: int                      # Cast nodes added at the float16 / float32 borders


def convert_to_fp16(model_path: str | Path, output_path: str | Path) -> Fp16Report:
    """Write an fp16 copy of the fp32 detdeploy file `model_path` to `output_path`."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from detdeploy.runtimes.model_file import read_onnx_metadata
    model_path, output_path = Path(model_path), Path(output_path)
    metadata = read_onnx_metadata(model_path)
    if metadata.precision != 'fp32':
        raise DetdeployError(f'{model_path} is {metadata.precision}; fp16 starts from an fp32 '
                             'export')
    model = onnx.load(str(model_path))
    name_nodes(model)
    parts = split_graph(model, metadata.raw_outputs)
    casts_before = sum(node.op_type == 'Cast' for node in model.graph.node)
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            converted = convert_float_to_float16(model, keep_io_types=True,
                                                 node_block_list=parts.postprocess)
    finally:
        logger.setLevel(level)
    _drop_repeated_casts(converted.graph)
    _drop_round_trips(converted.graph)
    _sort_topologically(converted.graph)
    # the converter's value infos call some float32 post-processing tensors float16
    del converted.graph.value_info[:]
    written = dataclasses.replace(metadata, precision='fp16')
    del converted.metadata_props[:]
    onnx.helper.set_model_props(converted, written.to_props())
    onnx.checker.check_model(converted, full_check=True)
    payload = converted.SerializeToString()
    with atomic_write(output_path) as handle:
        handle.write(payload)
    casts = sum(node.op_type == 'Cast' for node in converted.graph.node) - casts_before
    return Fp16Report(output_path, len(payload), len(parts.network), len(parts.postprocess),
                      casts)


def _drop_repeated_casts(graph: onnx.GraphProto) -> None:
    """The converter adds one Cast per blocked consumer of a tensor, all writing the same
    name; keep the first of such identical Casts (ONNX graphs assign each name once)."""
    seen: dict[str, onnx.NodeProto] = {}
    kept = []
    for node in graph.node:
        first = seen.get(node.output[0]) if node.output else None
        if first is not None and node.op_type == 'Cast' and first.op_type == 'Cast' \
                and list(first.input) == list(node.input) and first.attribute == node.attribute:
            continue
        seen.update({name: node for name in node.output})
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _drop_round_trips(graph: onnx.GraphProto) -> None:
    """Cast(float16) -> Cast(float) pairs between float32 post-processing nodes (the converter
    adds them around every blocked node) round values to float16 on the way: the second Cast
    becomes an Identity of the float32 source, and Casts nobody reads are removed."""
    producer = {name: node for node in graph.node for name in node.output}
    to_type = {node.name: onnx.helper.get_attribute_value(node.attribute[0])
               for node in graph.node if node.op_type == 'Cast'}
    for node in graph.node:
        first = producer.get(node.input[0]) if node.op_type == 'Cast' else None
        if (first is not None and first.op_type == 'Cast'
                and to_type[node.name] == onnx.TensorProto.FLOAT
                and to_type[first.name] == onnx.TensorProto.FLOAT16):
            source = producer.get(first.input[0])
            if source is None or source.op_type != 'Cast':
                node.op_type = 'Identity'
                del node.attribute[:]
                node.input[0] = first.input[0]
    while True:
        read = {name for node in graph.node for name in node.input} | \
            {output.name for output in graph.output}
        unused = [node for node in graph.node
                  if node.op_type == 'Cast' and not any(name in read for name in node.output)]
        if not unused:
            return
        for node in unused:
            graph.node.remove(node)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (the converter appends
    the Cast nodes it adds at the end)."""
    nodes = list(graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output}
    placed: set[int] = set()
    order: list[int] = []

    def place(index: int) -> None:
        stack = [(index, False)]
        while stack:
            current, expanded = stack.pop()
            if current in placed:
                continue
            if expanded:
                placed.add(current)
                order.append(current)
                continue
            stack.append((current, True))
            stack.extend((producer[name], False) for name in reversed(nodes[current].input)
                         if name in producer and producer[name] not in placed)

    for index in range(len(nodes)):
        place(index)
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
