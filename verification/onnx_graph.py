"""ONNX graph structure for `detdeploy parity --per-layer`: producer and consumer indexes over an
exported detector's graph, and the map from its tensors to the PyTorch modules they came from.

Works on the in-memory ModelProto (its weights are not needed); running tensors of the graph is
the ONNX Runtime backend's `run_tensors`. No comparison logic here.
"""
from __future__ import annotations

import ast

import onnx

NAME_SCOPES_KEY = 'pkg.torch.onnx.name_scopes'
WRAPPER_SCOPE = 'model'                # DetectorGraph holds the detector as `self.model`


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
