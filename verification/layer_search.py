"""`detdeploy parity --per-layer`: the first ONNX node whose output diverges from PyTorch's.

Bisection over the mappable tensors (those the exporter's metadata ties to a PyTorch module),
in graph (topological) order, restricted to the ancestors of a failing raw output; each step
marks a few tensors as outputs of a pruned copy and compares them with the same modules'
outputs caught by forward hooks. A found node is confirmed by checking that its nearest mapped
inputs agree; if one does not, the search continues above it. The pruned runs are the ONNX
Runtime backend's `run_tensors`; comparison rules come from `compare`, graph structure from
`onnx_graph`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .compare import ArrayComparison, compare_arrays
from .onnx_graph import Graph, module_outputs_from_scopes, module_outputs_from_weights

if TYPE_CHECKING:
    from detdeploy.models import Detector
    from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend

PROBES_PER_STEP = 3          # tensors marked as outputs per bisection step (a 4-way split)


@dataclass
class TensorCheck:
    tensor: str
    module: str | None
    node: str
    op_type: str
    comparison: ArrayComparison

    def to_dict(self) -> dict:
        return {'tensor': self.tensor, 'module': self.module, 'node': self.node,
                'op_type': self.op_type, 'comparison': self.comparison.to_dict()}


@dataclass
class LayerDivergence:
    """Where the backend's graph first departs from PyTorch."""
    found: TensorCheck                       # the first diverging mapped tensor (or raw output)
    agreeing_inputs: list[TensorCheck]       # its nearest mapped inputs, all within tolerance
    suspect_nodes: list[dict]                # nodes between those inputs and it: name, op, weights
    mapping_source: str                      # 'node scopes' or 'weight names'
    mapped_tensors: int
    steps: int                               # pruned copies run
    image: str

    def to_dict(self) -> dict:
        values = asdict(self)
        values['found'] = self.found.to_dict()
        values['agreeing_inputs'] = [c.to_dict() for c in self.agreeing_inputs]
        return values


@dataclass
class _Search:
    graph: Graph
    backend: OnnxRuntimeBackend
    model: Detector
    images: np.ndarray                       # one preprocessed image, [1, 3, H, W]
    mapping: dict[str, str]                  # ONNX tensor -> module path
    atol: float
    rtol: float
    known: dict[str, TensorCheck] = field(default_factory=dict)

    def evaluate(self, tensors: list[str]) -> None:
        """Compare these tensors (those not yet known) in one pruned run and one hooked
        PyTorch forward."""
        import torch
        todo = [t for t in dict.fromkeys(tensors) if t not in self.known]
        if not todo:
            return
        got = self.backend.run_tensors(todo, self.images)
        caught: dict[str, torch.Tensor] = {}
        hooks = []
        for tensor in todo:
            module = self.model.get_submodule(self.mapping[tensor])
            hooks.append(module.register_forward_hook(
                # clone: in-place activations overwrite a BatchNorm's output after its hook ran
                lambda mod, args, out, name=tensor: caught.__setitem__(name, out.detach().clone())))
        try:
            with torch.no_grad():
                self.model(torch.from_numpy(self.images).to(_device(self.model)))
        finally:
            for hook in hooks:
                hook.remove()
        for tensor in todo:
            node = self.graph.nodes[self.graph.producer[tensor]]
            comparison = compare_arrays(got[tensor], caught[tensor].cpu().numpy(), self.atol,
                                        self.rtol, tensor)
            self.known[tensor] = TensorCheck(tensor, self.mapping[tensor], node.name,
                                             node.op_type, comparison)

    def fails(self, tensor: str) -> bool:
        return not self.known[tensor].comparison.passed


def _device(model: Detector):
    return next(model.parameters()).device


def usable_mapping(graph: Graph, model: Detector) -> tuple[dict[str, str], str]:
    """Mappable tensors: module outputs the file records, whose module exists in the PyTorch
    model, returns one tensor and runs exactly once per forward (shared or reused modules,
    such as the head's shared convs or the neck's upsample, are ambiguous)."""
    import torch
    names = {name for name, _ in model.named_modules(remove_duplicate=False)}
    mapping = module_outputs_from_scopes(graph)
    source = 'node scopes'
    if not mapping:
        has_bn = {name for name, module in model.named_modules(remove_duplicate=False)
                  if isinstance(getattr(module, 'bn', None), torch.nn.BatchNorm2d)}
        mapping = module_outputs_from_weights(graph, names, has_bn)
        source = 'weight names'
    mapping = {t: p for t, p in mapping.items() if p in names}
    paths = set(mapping.values())
    calls: dict[str, int] = {}
    shapes_ok: set[str] = set()
    hooks = []
    for path in paths:
        def count(mod, args, out, path=path):
            calls[path] = calls.get(path, 0) + 1
            if isinstance(out, torch.Tensor):
                shapes_ok.add(path)
        hooks.append(model.get_submodule(path).register_forward_hook(count))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, 64, 64, device=_device(model)))
    finally:
        for hook in hooks:
            hook.remove()
    duplicated = {p for p in paths if list(mapping.values()).count(p) > 1}
    return ({t: p for t, p in mapping.items()
             if calls.get(p) == 1 and p in shapes_ok and p not in duplicated}, source)


def _nearest_mapped_inputs(graph: Graph, tensor: str, mapped: set[str]) -> list[str]:
    """Mapped tensors reachable upwards from `tensor` without passing another mapped one."""
    found, seen = [], set()
    stack = list(graph.nodes[graph.producer[tensor]].input)
    while stack:
        name = stack.pop()
        if name in seen or name not in graph.producer:
            continue
        seen.add(name)
        if name in mapped:
            found.append(name)
        else:
            stack.extend(graph.nodes[graph.producer[name]].input)
    return sorted(found, key=lambda t: graph.producer[t])


def find_first_divergence(graph: Graph, backend: OnnxRuntimeBackend, model: Detector,
                          images: np.ndarray, failing_raw: tuple[str, ArrayComparison],
                          atol: float, rtol: float, image_name: str = '') -> LayerDivergence:
    """Bisect from a failing raw output (graph tensor name, its comparison) to the first
    diverging mapped tensor; `backend` runs `graph`'s file."""
    sessions_before = backend.tensor_sessions_created
    mapping, source = usable_mapping(graph, model)
    search = _Search(graph, backend, model, images, mapping, atol, rtol)
    raw_name, raw_comparison = failing_raw
    raw_node = graph.nodes[graph.producer[raw_name]]
    search.known[raw_name] = TensorCheck(raw_name, mapping.get(raw_name), raw_node.name,
                                         raw_node.op_type, raw_comparison)
    order = sorted(mapping, key=lambda t: graph.producer[t])
    mapped = set(mapping)
    target = raw_name
    while True:
        ancestors = graph.ancestor_nodes([target])
        candidates = [t for t in order if graph.producer[t] in ancestors and t != target]
        low, high = -1, len(candidates)          # candidates[low] agrees, candidates[high] fails
        while high - low > 1:
            span = high - low
            probes = sorted({low + max(1, span * k // (PROBES_PER_STEP + 1))
                             for k in range(1, PROBES_PER_STEP + 1)} - {high})
            search.evaluate([candidates[p] for p in probes])
            for probe in probes:
                if search.fails(candidates[probe]):
                    high = probe
                    break
                low = probe
        first = candidates[high] if high < len(candidates) else target
        inputs = _nearest_mapped_inputs(graph, first, mapped)
        search.evaluate(inputs)
        failing_inputs = [t for t in inputs if search.fails(t)]
        if not failing_inputs:
            break
        target = failing_inputs[0]
    agreeing = [search.known[t] for t in inputs]
    above = graph.ancestor_nodes(inputs) if inputs else set()
    suspects = sorted(graph.ancestor_nodes([first]) - above)
    return LayerDivergence(
        search.known[first], agreeing,
        [{'node': graph.nodes[i].name, 'op_type': graph.nodes[i].op_type,
          'weights': graph.weights_of(i)} for i in suspects],
        source, len(mapping), backend.tensor_sessions_created - sessions_before, image_name)
