"""ONNX graph surgery for `detdeploy parity`: find the raw head tensors of an exported detector,
run any set of its tensors as outputs in a pruned temporary copy, and map tensors to the
PyTorch modules they came from.

Works on the in-memory ModelProto; the user's file is never modified. No comparison logic here.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from detdeploy.core.errors import DetdeployError
from detdeploy.runtimes.onnxruntime_backend import OrtOptions, provider_list

NAME_SCOPES_KEY = 'pkg.torch.onnx.name_scopes'
WRAPPER_SCOPE = 'model'                # DetectorGraph holds the RTMDet as `self.model`
NHWC_PERM = [0, 2, 3, 1]


def load_model(path: str | Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # protobuf raises several types for files that are not ONNX
        raise DetdeployError(f'{path} is not an ONNX model ({type(exc).__name__})') from None


@dataclass
class RawTensors:
    """Names of the per-level raw head tensors in the graph, level order: class logits
    [B, C, H, W] and box distances in px [B, 4, H, W] (what `RTMDet.forward` returns)."""
    cls_scores: list[str]
    bbox_preds: list[str]

    def named(self) -> list[tuple[str, str]]:
        """(report name, ONNX tensor name) pairs: cls_scores[0], ..., bbox_preds[0], ..."""
        return ([(f'cls_scores[{i}]', t) for i, t in enumerate(self.cls_scores)] +
                [(f'bbox_preds[{i}]', t) for i, t in enumerate(self.bbox_preds)])


class Graph:
    """Producer/consumer indexes over a ModelProto's main graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.nodes = list(model.graph.node)
        self.initializers = {init.name for init in model.graph.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.output:
                self.producer[name] = index
            for name in node.input:
                self.consumers.setdefault(name, []).append(index)
        self.input_names = [i.name for i in model.graph.input if i.name not in self.initializers]

    def produced_by(self, tensor: str, op_type: str) -> onnx.NodeProto | None:
        index = self.producer.get(tensor)
        if index is None or self.nodes[index].op_type != op_type:
            return None
        return self.nodes[index]

    def ancestor_nodes(self, tensors: list[str]) -> set[int]:
        """Indexes of every node the given tensors depend on."""
        seen: set[int] = set()
        stack = [self.producer[t] for t in tensors if t in self.producer]
        while stack:
            index = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            stack.extend(self.producer[t] for t in self.nodes[index].input if t in self.producer)
        return seen

    def weights_of(self, index: int) -> list[str]:
        return [name for name in self.nodes[index].input if name in self.initializers]


def find_raw_tensors(graph: Graph) -> RawTensors | None:
    """The head outputs, found by what decoding does with them: per level a Transpose to NHWC
    and a Reshape to [B, H*W, ·], the levels concatenated; the concatenation that goes into a
    Sigmoid holds the class logits, the other the box distances. Independent of node names, of
    what the simplifier fused, and of the NMS mode."""
    found: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op_type != 'Concat' or len(node.input) < 2:
            continue
        levels = []
        for name in node.input:
            reshape = graph.produced_by(name, 'Reshape')
            transpose = reshape and graph.produced_by(reshape.input[0], 'Transpose')
            perm = transpose and [list(a.ints) for a in transpose.attribute if a.name == 'perm']
            if not transpose or perm != [NHWC_PERM]:
                break
            levels.append(transpose.input[0])
        else:
            consumers = [graph.nodes[i].op_type for i in graph.consumers.get(node.output[0], [])]
            kind = 'cls' if consumers == ['Sigmoid'] else 'reg'
            if kind in found:
                return None     # ambiguous: not a graph detdeploy exported
            found[kind] = levels
    if set(found) != {'cls', 'reg'} or len(found['cls']) != len(found['reg']):
        return None
    return RawTensors(found['cls'], found['reg'])


def with_outputs(model: onnx.ModelProto, tensors: list[str]) -> bytes:
    """A serialized copy of `model` whose outputs are `tensors`, pruned to the nodes they need
    (so post-processing, and any TensorRT plugin node, is dropped)."""
    graph = Graph(model)
    keep = graph.ancestor_nodes(tensors)
    needed = {name for index in keep for name in graph.nodes[index].input}
    types = {info.name: info.type.tensor_type.elem_type
             for info in (*model.graph.value_info, *model.graph.output)}
    copy = onnx.ModelProto()
    copy.ir_version = model.ir_version
    copy.opset_import.extend(model.opset_import)
    copy.graph.name = model.graph.name
    copy.graph.node.extend(graph.nodes[i] for i in sorted(keep))
    copy.graph.initializer.extend(i for i in model.graph.initializer if i.name in needed)
    copy.graph.input.extend(i for i in model.graph.input if i.name in graph.input_names)
    copy.graph.output.extend(onnx.helper.make_tensor_value_info(
        name, types.get(name, onnx.TensorProto.FLOAT), None) for name in tensors)
    return copy.SerializeToString()


class TensorRunner:
    """Runs pruned copies of a model on the backend's ONNX Runtime providers, feeding batches
    padded to the file's static batch size if it has one."""

    def __init__(self, model: onnx.ModelProto, options: OrtOptions, static_batch: int | None):
        self.model = model
        self.options = options
        self.static_batch = static_batch
        self.sessions_created = 0

    def run(self, tensors: list[str], batch: np.ndarray) -> dict[str, np.ndarray]:
        import onnxruntime
        session_options = onnxruntime.SessionOptions()
        session_options.log_severity_level = 4
        if self.options.threads:
            session_options.intra_op_num_threads = self.options.threads
        session = onnxruntime.InferenceSession(with_outputs(self.model, tensors), session_options,
                                               providers=provider_list(self.options))
        self.sessions_created += 1
        input_name = session.get_inputs()[0].name
        used = len(batch)
        results: list[list[np.ndarray]] = []
        step = self.static_batch or used
        for start in range(0, used, step):
            chunk = np.ascontiguousarray(batch[start:start + step], dtype=np.float32)
            count = len(chunk)
            if self.static_batch and count < self.static_batch:
                chunk = np.concatenate([chunk, np.zeros((self.static_batch - count,
                                                         *chunk.shape[1:]), np.float32)])
            results.append([out[:count] for out in session.run(tensors, {input_name: chunk})])
        return {name: np.concatenate([part[i] for part in results])
                for i, name in enumerate(tensors)}


# ---- ONNX tensor -> PyTorch module --------------------------------------------------------

def node_module(node: onnx.NodeProto) -> list[str] | None:
    """Module paths (outermost first, without the wrapper's `model.`) the exporter recorded
    for a node, or None if it has no scope metadata."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # scopes: ['', 'model', 'model.backbone', ..., <op name>]
            prefix = WRAPPER_SCOPE + '.'
            return [s[len(prefix):] for s in scopes[:-1] if s.startswith(prefix)]
    return None


def module_outputs_from_scopes(graph: Graph) -> dict[str, str]:
    """Tensor -> module path, from the exporter's node scopes: a module's output is the output
    of its last node (graph order) when some node outside the module consumes it. Of the
    modules ending at one tensor (a ConvModule and its activation) the innermost is named."""
    last_node: dict[str, int] = {}
    scopes_of: dict[int, set[str]] = {}
    for index, node in enumerate(graph.nodes):
        paths = node_module(node)
        if paths:
            scopes_of[index] = set(paths)
            for path in paths:
                last_node[path] = index
    graph_outputs = {o.name for o in graph.model.graph.output}
    mapping: dict[str, str] = {}
    for path, index in last_node.items():
        node = graph.nodes[index]
        if len(node.output) != 1:
            continue
        tensor = node.output[0]
        leaves = tensor in graph_outputs or any(
            path not in scopes_of.get(c, set()) for c in graph.consumers.get(tensor, []))
        if leaves and len(path) > len(mapping.get(tensor, '')):
            mapping[tensor] = path
    return mapping


def module_outputs_from_weights(graph: Graph, module_names: set[str],
                                has_bn: set[str]) -> dict[str, str]:
    """Tensor -> module path for files without scope metadata: Conv nodes whose weight keeps
    its PyTorch name (`model.<path>.weight`). A ConvModule's conv has its BatchNorm folded in
    by the exporter, so its output is the `bn` module's (`has_bn`: parents with a `bn`)."""
    mapping = {}
    prefix = WRAPPER_SCOPE + '.'
    for index, node in enumerate(graph.nodes):
        if node.op_type != 'Conv' or len(node.input) < 2:
            continue
        weight = node.input[1]
        if not (weight.startswith(prefix) and weight.endswith('.weight')):
            continue
        path = weight[len(prefix):-len('.weight')]
        if path not in module_names:
            continue
        parent, _, leaf = path.rpartition('.')
        consumers = [graph.nodes[i].op_type for i in graph.consumers.get(node.output[0], [])]
        if leaf == 'conv' and parent in has_bn and consumers != ['BatchNormalization']:
            path = f'{parent}.bn'
        mapping[node.output[0]] = path
    return mapping
