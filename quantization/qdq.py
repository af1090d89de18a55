"""Static INT8 in QDQ form with ONNX Runtime's quantizer, from ranges already collected
(`calibration.collect_ranges`), so one calibration serves many quantizations (sensitivity).

Targets: `cpu` U8 activations, S8 per-channel weights (the combination ONNX Runtime's x86 CPU
provider fuses into QLinearConv on VNNI); `tensorrt` symmetric S8 activations and weights, zero
points 0 (TensorRT 10's explicit quantization). No calibration, no metadata here.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx

from detdeploy.core.errors import DetdeployError

TARGETS = ('cpu', 'tensorrt')


@dataclass(frozen=True)
class TargetTypes:
    activations: str                # 'uint8' or 'int8'
    weights: str
    symmetric_activations: bool
    per_channel: bool = True


TARGET_TYPES = {
    'cpu': TargetTypes('uint8', 'int8', symmetric_activations=False),
    'tensorrt': TargetTypes('int8', 'int8', symmetric_activations=True),
}


def target_types(target: str) -> TargetTypes:
    if target not in TARGET_TYPES:
        raise DetdeployError(f"--target '{target}': use {', '.join(TARGETS)}")
    return TARGET_TYPES[target]


def quantize_qdq(model: onnx.ModelProto, ranges, method, target: str,
                 nodes_to_quantize: list[str] | None = None,
                 nodes_to_exclude: list[str] | None = None,
                 op_types: list[str] | None = None) -> onnx.ModelProto:
    """`model` with Q/DQ pairs around the nodes it may quantize: `nodes_to_quantize` (None:
    all) less `nodes_to_exclude`. `ranges` is the calibrators' `TensorsData`, `method` its
    `CalibrationMethod` (ONNX Runtime checks they agree)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import save_tensors_data
    types = target_types(target)
    quant_type = {'uint8': QuantType.QUInt8, 'int8': QuantType.QInt8}
    extra = {'ActivationSymmetric': types.symmetric_activations, 'WeightSymmetric': True}
    if target == 'tensorrt':
        # TensorRT wants every quantized tensor behind its own Q/DQ pair
        extra['DedicatedQDQPair'] = True
    with tempfile.TemporaryDirectory(prefix='detdeploy_qdq_') as temp:
        source, cache, output = (Path(temp) / name for name in
                                 ('model.onnx', 'ranges.json', 'quantized.onnx'))
        onnx.save(model, source)
        save_tensors_data(ranges, cache)
        logger = logging.getLogger()
        level = logger.level
        logger.setLevel(logging.ERROR)     # "consider pre-processing" warnings on every call
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_static(
                    str(source), str(output), calibration_data_reader=None,
                    calibrate_method=method, calibration_cache_path=str(cache),
                    quant_format=QuantFormat.QDQ, per_channel=types.per_channel,
                    activation_type=quant_type[types.activations],
                    weight_type=quant_type[types.weights],
                    nodes_to_quantize=list(nodes_to_quantize or []),
                    nodes_to_exclude=list(nodes_to_exclude or []),
                    op_types_to_quantize=list(op_types or []), extra_options=extra)
        finally:
            logger.setLevel(level)
        return onnx.load(output)


def float_nodes(quantized: onnx.ModelProto, candidates: list[str]) -> list[str]:
    """Of `candidates` (node names), those still computing in float: a node runs quantized
    when it reads a dequantized tensor, has no float weight, and its outputs are quantized
    again (DequantizeLinear -> node -> QuantizeLinear, what runtimes fuse into INT8 kernels)."""
    nodes = list(quantized.graph.node)
    dequantized = {node.output[0] for node in nodes if node.op_type == 'DequantizeLinear'}
    requantized = {node.input[0] for node in nodes if node.op_type == 'QuantizeLinear'}
    float_weights = {init.name for init in quantized.graph.initializer
                     if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    by_name = {node.name: node for node in nodes}

    def runs_quantized(node: onnx.NodeProto) -> bool:
        return (any(name in dequantized for name in node.input)
                and not any(name in float_weights for name in node.input)
                and all(name in requantized for name in node.output))

    return [name for name in candidates if name in by_name and not runs_quantized(by_name[name])]
