"""Graph simplification with onnxsim, checked on a random input, never at the cost of the export.

If onnxsim fails, or the simplified graph answers differently from the exported one, the
exported graph is kept and the reason returned for a one-line warning.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

VERIFY_ATOL = 1e-4
# Node metadata the dynamo exporter writes and onnxsim drops; `detdeploy parity --per-layer` maps
# ONNX tensors to PyTorch modules with it. The (large) stack traces are not kept.
CARRIED_NODE_METADATA = ('pkg.torch.onnx.name_scopes', 'pkg.torch.onnx.class_hierarchy')


@dataclass
class SimplifyResult:
    model: onnx.ModelProto
    simplified: bool
    warning: str | None = None
    max_abs_diff: float | None = None     # simplified vs exported on a random input


def run_onnx(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=['CPUExecutionProvider'])
    return session.run(None, feeds)


def outputs_agree(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float | None:
    """Largest absolute difference, or None if shapes, dtypes or integer outputs differ."""
    largest = 0.0
    for ref, cand in zip(reference, candidate):
        if ref.shape != cand.shape or ref.dtype != cand.dtype:
            return None
        if np.issubdtype(ref.dtype, np.integer):
            if not np.array_equal(ref, cand):
                return None
        elif ref.size:
            largest = max(largest, float(np.abs(ref.astype(np.float64) - cand).max()))
    return largest


def carry_node_metadata(original: onnx.ModelProto, simplified: onnx.ModelProto) -> int:
    """Copy the exporter's module scopes onto the simplified nodes that onnxsim left unchanged
    (same op, inputs and outputs); nodes it fused or rewrote compute something else under the
    old names, so they get none. Returns the number of nodes annotated."""
    def key(node):
        return node.op_type, tuple(node.input), tuple(node.output)
    scopes = {key(node): [p for p in node.metadata_props if p.key in CARRIED_NODE_METADATA]
              for node in original.graph.node}
    annotated = 0
    for node in simplified.graph.node:
        carried = scopes.get(key(node))
        if carried and not node.metadata_props:
            node.metadata_props.extend(carried)
            annotated += 1
    return annotated


def simplify(model: onnx.ModelProto, sample_input: np.ndarray | None) -> SimplifyResult:
    """onnxsim's graph, if it runs and (given `sample_input`) matches the original on it."""
    import onnxsim
    try:
        simplified, _ = onnxsim.simplify(model, check_n=0)
        carry_node_metadata(model, simplified)
    except Exception as exc:  # onnxsim raises whatever its passes raise
        return SimplifyResult(model, False, f'onnxsim failed ({type(exc).__name__}: '
                                            f'{str(exc).splitlines()[0][:120] if str(exc) else ""})')
    if sample_input is None:
        return SimplifyResult(simplified, True)
    feeds = {model.graph.input[0].name: sample_input}
    difference = outputs_agree(run_onnx(model, feeds), run_onnx(simplified, feeds))
    if difference is None or difference > VERIFY_ATOL:
        detail = 'different outputs' if difference is None else f'max abs diff {difference:.2e}'
        return SimplifyResult(model, False, f'simplified graph disagrees on a random input '
                                            f'({detail})')
    return SimplifyResult(simplified, True, max_abs_diff=difference)
