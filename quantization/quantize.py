"""`detdeploy quantize`: a float detdeploy ONNX file -> a static INT8 QDQ file with the
post-processing in float, and, with an accuracy target, the most sensitive layer groups too.

The pipeline: calibrate once on the network part (`calibration`), quantize with those ranges
(`qdq`), check against the target (`accuracy`), keep the worst groups float until it holds,
write the file with its metadata (precision int8 and how it was made). Returns a report.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx

from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import atomic_write
from detdeploy.core.metadata import ModelMetadata

from .accuracy import DetectionProbe, RawOutputProbe
from .calibration import CalibrationOptions, CalibrationReader, collect_ranges, select_images
from .graph_parts import name_nodes, network_model, split_graph
from .qdq import float_nodes, quantize_qdq, target_types

POSTPROCESS_REASON = 'post-processing (decoding, NMS): always float'
HEAD_OUTPUT_REASON = 'produces a raw head output: kept float so scores and boxes keep full ' \
                     'resolution'
USER_REASON = 'excluded by --exclude'
SENSITIVE_REASON = 'sensitive: kept float to meet the accuracy target'
PROBE_BATCHES = 8               # images for the raw-output error (sensitivity ranking)


@dataclass(frozen=True)
class QuantizeOptions:
    calibration: CalibrationOptions = CalibrationOptions()
    target: str = 'cpu'
    max_ap_drop: float | None = None        # accuracy target: AP drop on the probe images
    max_output_error: float | None = None   # accuracy target: raw output noise-to-signal
    probe_images: int = 32                  # images the AP drop is measured on
    ann_file: str | None = None             # real labels for the AP probe (else pseudo labels)
    ann_images: str | None = None
    exclude: tuple[str, ...] = ()           # node or layer-group names kept float
    group_depth: int = 2                    # layer groups: module paths cut at this depth
    threads: int | None = None


@dataclass
class FloatPart:
    """Nodes left in float, and why."""
    name: str                       # layer group, or a description
    nodes: list[str]
    reason: str
    sensitivity: float | None = None    # raw output error when only this group is quantized

    def to_dict(self) -> dict:
        return {'name': self.name, 'nodes': len(self.nodes), 'reason': self.reason,
                'sensitivity': self.sensitivity}


@dataclass
class SearchStep:
    float_groups: list[str]
    output_error: float
    ap: float | None
    ap_drop: float | None


@dataclass
class QuantizeReport:
    path: Path
    size_bytes: int
    method: str
    target: str
    activation_type: str
    weight_type: str
    calibration_images: int
    quantized_nodes: int            # network nodes behind Q/DQ
    network_nodes: int
    float_parts: list[FloatPart]
    float_node_names: list[str]     # every node that stayed float (in the metadata)
    output_error: float
    float_ap: float | None
    ap: float | None
    ap_labels: str | None           # 'annotations' or 'pseudo labels from the float model'
    target_met: bool | None         # None: no target given
    steps: list[SearchStep] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _float_input(path: Path) -> tuple[onnx.ModelProto, ModelMetadata]:
    from detdeploy.runtimes.model_file import read_onnx_metadata
    metadata = read_onnx_metadata(path)
    if metadata.precision != 'fp32':
        raise DetdeployError(f'{path} is already {metadata.precision} (metadata precision); '
                             'quantize the fp32 export')
    if not metadata.has_nms:
        raise DetdeployError(f'{path} was exported with --nms none; quantize a file with the '
                             'NMS in the graph (--nms onnx)')
    model = onnx.load(str(path))
    name_nodes(model)
    return model, metadata


def _resolve_exclusions(names: tuple[str, ...], groups: dict[str, list[str]],
                        network: list[str]) -> list[str]:
    nodes = []
    for name in names:
        if name in groups:
            nodes += groups[name]
        elif name in network:
            nodes.append(name)
        else:
            raise DetdeployError(f"--exclude '{name}' is neither a layer group nor a network "
                                 f"node (groups: {', '.join(list(groups)[:8])}, ...)")
    return nodes


def quantize_file(model_path: str | Path, image_paths: list[Path], output_path: str | Path,
                  options: QuantizeOptions = QuantizeOptions(),
                  progress: Callable[[str], None] | None = None) -> QuantizeReport:
    """Quantize `model_path` with calibration images from `image_paths` into `output_path`."""
    started = time.perf_counter()
    say = progress or (lambda text: None)
    model_path, output_path = Path(model_path), Path(output_path)
    options.calibration.check()
    types = target_types(options.target)
    model, metadata = _float_input(model_path)
    parts = split_graph(model, metadata.raw_outputs, options.group_depth)
    producers = {out: node.name for node in model.graph.node for out in node.output}
    head_outputs = [producers[name] for name in metadata.raw_outputs]
    float_parts = [FloatPart('post-processing', parts.postprocess, POSTPROCESS_REASON),
                   FloatPart('raw head output convolutions', head_outputs, HEAD_OUTPUT_REASON)]
    if options.exclude:
        float_parts.append(FloatPart(', '.join(options.exclude), _resolve_exclusions(
            options.exclude, parts.groups, parts.network), USER_REASON))
    calibration = dataclasses.replace(options.calibration,
                                      symmetric=types.symmetric_activations)
    chosen = select_images(image_paths, calibration.size)
    input_name = next(i.name for i in model.graph.input)

    with tempfile.TemporaryDirectory(prefix='detdeploy_quantize_') as temp:
        temp = Path(temp)
        network_path = temp / 'network.onnx'
        onnx.save(network_model(model, metadata.raw_outputs), network_path)
        say(f'calibrating ({calibration.method}) on {len(chosen)} images')
        reader = CalibrationReader(chosen, metadata, input_name)
        ranges = collect_ranges(network_path, reader, calibration, temp)

        def build(extra_float: list[str] = (), only: list[str] | None = None):
            fixed = [n for part in float_parts for n in part.nodes]
            return quantize_qdq(model, ranges, ranges.calibration_method, options.target,
                                nodes_to_quantize=only,
                                nodes_to_exclude=fixed + list(extra_float))

        probe_batches = [batch for _, batch in zip(range(PROBE_BATCHES), reader.batches())]
        raw_probe = RawOutputProbe(model, list(metadata.raw_outputs), probe_batches,
                                   options.threads)
        detection_probe = None
        if options.max_ap_drop is not None:
            say('measuring the float model on the probe images')
            detection_probe = DetectionProbe(
                model_path, select_images(image_paths, options.probe_images), options.threads,
                options.ann_file, options.ann_images)

        def measure(candidate: onnx.ModelProto, float_groups: list[str]) -> SearchStep:
            error = raw_probe.error(candidate)
            ap = drop = None
            if detection_probe is not None:
                candidate_path = temp / 'candidate.onnx'
                onnx.save(candidate, candidate_path)
                ap = detection_probe.ap(candidate_path)
                drop = detection_probe.float_ap - ap
            return SearchStep(list(float_groups), error, ap, drop)

        def meets(step: SearchStep) -> bool:
            return ((options.max_ap_drop is None or step.ap_drop <= options.max_ap_drop)
                    and (options.max_output_error is None
                         or step.output_error <= options.max_output_error))

        quantized = build()
        steps = [measure(quantized, [])]
        has_target = options.max_ap_drop is not None or options.max_output_error is not None
        sensitivity: dict[str, float] = {}
        if has_target and not meets(steps[-1]):
            fixed = {n for part in float_parts for n in part.nodes}
            groups = {name: [n for n in nodes if n not in fixed]
                      for name, nodes in parts.groups.items()}
            groups = {name: nodes for name, nodes in groups.items() if nodes}
            for index, (name, nodes) in enumerate(groups.items(), start=1):
                say(f'sensitivity {index}/{len(groups)}: {name}')
                sensitivity[name] = raw_probe.error(build(only=nodes))
            kept: list[str] = []
            for name in sorted(sensitivity, key=sensitivity.get, reverse=True):
                kept.append(name)
                say(f'keeping {len(kept)} group(s) float: ...{name}')
                quantized = build([n for g in kept for n in groups[g]])
                steps.append(measure(quantized, kept))
                if meets(steps[-1]):
                    break
            float_parts += [FloatPart(name, groups[name], SENSITIVE_REASON, sensitivity[name])
                            for name in kept]
        final = steps[-1]

    network = set(parts.network)
    still_float = float_nodes(quantized, [n for n in parts.network])
    all_float = [n for part in float_parts for n in part.nodes]
    quantization = {
        'method': calibration.method, 'target': options.target,
        'activations': types.activations, 'weights': types.weights,
        'per_channel_weights': types.per_channel,
        'symmetric_activations': types.symmetric_activations,
        'calibration_images': len(chosen),
        'float_parts': [part.to_dict() for part in float_parts],
        'float_nodes': all_float,
        'output_error': final.output_error,
    }
    if calibration.method == 'entropy':
        quantization['bins'] = [calibration.num_bins, calibration.num_quantized_bins]
    if calibration.method == 'percentile':
        quantization['percentile'] = calibration.percentile
    if final.ap_drop is not None:
        quantization['probe_ap_drop'] = final.ap_drop
    written = dataclasses.replace(metadata, precision='int8', quantization=quantization)
    del quantized.metadata_props[:]
    onnx.helper.set_model_props(quantized, written.to_props())
    onnx.checker.check_model(quantized)
    payload = quantized.SerializeToString()
    with atomic_write(output_path) as handle:
        handle.write(payload)
    return QuantizeReport(
        path=output_path, size_bytes=len(payload), method=calibration.method,
        target=options.target, activation_type=types.activations,
        weight_type=types.weights, calibration_images=len(chosen),
        quantized_nodes=len(network) - len(still_float), network_nodes=len(network),
        float_parts=float_parts, float_node_names=all_float, output_error=final.output_error,
        float_ap=detection_probe.float_ap if detection_probe else None, ap=final.ap,
        ap_labels=None if detection_probe is None else (
            'annotations' if detection_probe.real_labels else 'pseudo labels from the float '
            'model'),
        target_met=meets(final) if has_target else None, steps=steps,
        sensitivity=sensitivity, seconds=time.perf_counter() - started)


def write_report(report: QuantizeReport, path: str | Path, overwrite: bool = True) -> None:
    """The report as JSON, written atomically."""
    import json
    payload = {
        'path': str(report.path), 'method': report.method, 'target': report.target,
        'activations': report.activation_type, 'weights': report.weight_type,
        'calibration_images': report.calibration_images,
        'quantized_nodes': report.quantized_nodes, 'network_nodes': report.network_nodes,
        'output_error': report.output_error, 'float_ap': report.float_ap, 'ap': report.ap,
        'ap_labels': report.ap_labels, 'target_met': report.target_met,
        'float_parts': [dict(part.to_dict(), node_names=part.nodes)
                        for part in report.float_parts],
        'sensitivity': report.sensitivity,
        'steps': [dataclasses.asdict(step) for step in report.steps],
        'seconds': report.seconds}
    with atomic_write(path, 'w', overwrite=overwrite) as handle:
        json.dump(payload, handle, indent=2)
