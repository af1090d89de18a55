"""Which nodes of a detdeploy graph INT8 may touch: the network up to the raw head outputs that
the metadata names (`raw_outputs`), never the decoding and NMS after them; and that network's
nodes in layer groups (by the PyTorch module each came from) for sensitivity search.

Works on ModelProtos; no running, no quantizing here.
"""
from __future__ import annotations

from dataclasses import dataclass

import onnx

from detdeploy.core.errors import DetdeployError

NAME_SCOPES_KEY = 'pkg.torch.onnx.name_scopes'
WRAPPER_SCOPE = 'model.'           # the export wrapper holds the detector as `self.model`
UNSCOPED_PREFIX = 'head->'          # groups of nodes without scopes: named by what they feed


@dataclass
class GraphParts:
    network: list[str]              # node names from the input to the raw outputs
    postprocess: list[str]          # node names after them: decoding, NMS (kept float)
    groups: dict[str, list[str]]    # layer group -> its network nodes, in graph order


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed or duplicate-named nodes unique names (quantizers address nodes by name)."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f'{node.op_type}_{index}'
        seen.add(node.name)


def _module_path(node: onnx.NodeProto) -> str | None:
    """The innermost module the exporter recorded for a node (without the wrapper)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            scopes = [s for s in prop.value.strip('[]').replace("'", '').split(', ')
                      if s.startswith(WRAPPER_SCOPE)]
            return scopes[-1][len(WRAPPER_SCOPE):] if scopes else None
    return None


def group_key(module_path: str, depth: int = 2) -> str:
    """The first `depth` parts of a module path, `backbone.stage2.1.blocks.0.conv1` ->
    `backbone.stage2` at depth 2; an index right after them stays (`neck.top_down_blocks.0`,
    `bbox_head.rtm_cls.2`: lists of parallel modules)."""
    parts = module_path.split('.')
    keep = depth + 1 if len(parts) > depth and parts[depth].isdigit() else depth
    return '.'.join(parts[:keep])


def split_graph(model: onnx.ModelProto, raw_outputs: tuple[str, ...] | list[str],
                group_depth: int = 2) -> GraphParts:
    """The network (ancestors of the raw outputs), the post-processing (everything else), and
    the network's layer groups (module paths cut at `group_depth`). Nodes without module
    scopes (the exporter or a simplifier merged them) are grouped by the raw outputs they
    feed."""
    nodes = list(model.graph.node)
    producer = {name: index for index, node in enumerate(nodes) for name in node.output}
    missing = [name for name in raw_outputs if name not in producer]
    if not raw_outputs or missing:
        raise DetdeployError('the file names no raw head outputs in its metadata (exported by '
                             'an older detdeploy? export it again)' if not raw_outputs else
                             f'raw outputs {", ".join(missing)} named in the metadata are not '
                             'tensors of the graph')
    feeds: dict[int, set[str]] = {}         # node -> raw outputs that depend on it
    for raw in raw_outputs:
        stack = [producer[raw]]
        while stack:
            index = stack.pop()
            if raw in feeds.setdefault(index, set()):
                continue
            feeds[index].add(raw)
            stack.extend(producer[t] for t in nodes[index].input if t in producer)
    network = [nodes[i].name for i in sorted(feeds)]
    postprocess = [node.name for i, node in enumerate(nodes) if i not in feeds]
    groups: dict[str, list[str]] = {}
    for index in sorted(feeds):
        path = _module_path(nodes[index])
        key = (group_key(path, group_depth) if path
               else UNSCOPED_PREFIX + '+'.join(sorted(feeds[index])))
        groups.setdefault(key, []).append(nodes[index].name)
    return GraphParts(network, postprocess, groups)


def network_model(model: onnx.ModelProto, raw_outputs: tuple[str, ...] | list[str]
                  ) -> onnx.ModelProto:
    """A copy of `model` ending at the raw outputs (what calibration runs), shapes inferred
    so that calibrators see every tensor's type."""
    from onnx.utils import Extractor
    inputs = [i.name for i in model.graph.input
              if i.name not in {init.name for init in model.graph.initializer}]
    inferred = onnx.shape_inference.infer_shapes(model)
    network = Extractor(inferred).extract_model(inputs, list(raw_outputs))
    del network.metadata_props[:]
    return network
