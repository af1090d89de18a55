"""The `detdeploy parity` pipeline: does an exported model give the PyTorch model's answers?

Checks the file's metadata against the PyTorch model, runs the same preprocessed images through
PyTorch and the backend and matches their detections, compares the raw head outputs before NMS
and, on request, bisects the graph for the first diverging layer. Returns a `ParityReport`;
comparison rules live in `parity_compare`, printing in the CLI command.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import atomic_write
from detdeploy.runtimes.model_file import ModelMetadata
from detdeploy.runtimes.pipeline import prepare_batch
from detdeploy.runtimes.preprocess import PreprocessConfig, read_image

from .layer_search import LayerDivergence, find_first_divergence
from .compare import (ArrayComparison, DetectionSet, ImageMatch, Tolerances,
                             compare_arrays, match_detections, merge_comparisons,
                             tolerances_for)

RANDOM_IMAGE_SIZES = ((480, 640), (640, 427), (320, 320), (200, 500), (375, 500), (64, 96))
# What each output of the four-output layout must be: dtype kind and rank ('f' float, 'i' int).
LAYOUT_ENTRY = re.compile(r'(\w+) \[([^\]]*)\] (float32|int32|int64)')


@dataclass
class ParityOptions:
    backend: str = 'ort'                  # 'ort' or 'trt'
    device: str = 'cpu'                   # the backend's device
    torch_device: str = 'cpu'
    tolerances: Tolerances | None = None  # None: the preset for the file's precision
    per_layer: bool = False
    batch_size: int | None = None         # None: the file's static batch, else 4


@dataclass
class MetadataIssue:
    """A way the file's self-description disagrees with the PyTorch model it came from."""
    field: str
    file_value: object
    expected: object
    explanation: str


@dataclass
class ParityReport:
    model_file: str
    backend: str
    providers: list[str]
    arch: str
    checkpoint: str
    precision: str
    nms_mode: str
    nms: dict
    input_size: list[int]
    tolerances: Tolerances
    metadata_issues: list[MetadataIssue] = field(default_factory=list)
    images: list[ImageMatch] = field(default_factory=list)
    raw_by_image: list[dict[str, ArrayComparison]] = field(default_factory=list)
    raw: dict[str, ArrayComparison] = field(default_factory=dict)     # over all images
    raw_tensor_names: dict[str, str] = field(default_factory=dict)    # report name -> ONNX
    notes: list[str] = field(default_factory=list)
    layer: LayerDivergence | None = None

    @property
    def failures(self) -> list[str]:
        """One line per reason the check fails; empty when it passes."""
        reasons = [f'metadata: {issue.explanation}' for issue in self.metadata_issues]
        failed_images = [m for m in self.images if m.status == 'FAIL']
        if failed_images:
            reasons.append(f'detections differ on {len(failed_images)} of {len(self.images)} '
                           f'images ({", ".join(Path(m.source).name for m in failed_images[:3])}'
                           f'{", ..." if len(failed_images) > 3 else ""})')
        bad_raw = [name for name, c in self.raw.items() if not c.passed]
        if bad_raw:
            worst = max((self.raw[n] for n in bad_raw), key=lambda c: c.failing_share)
            reasons.append(f'raw outputs differ: {", ".join(bad_raw)} (up to '
                           f'{100 * worst.failing_share:.3g} % of elements out of tolerance, '
                           f'max abs error {worst.max_abs_error:.3g})')
        if self.layer:
            found = self.layer.found
            reasons.append(f'first diverging layer: {found.node} ({found.op_type}) -> '
                           f'{found.module or "unmapped tensor " + found.tensor}')
        return reasons

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            'verdict': 'PASS' if self.passed else 'FAIL', 'failures': self.failures,
            'model_file': self.model_file, 'backend': self.backend,
            'providers': self.providers, 'arch': self.arch, 'checkpoint': self.checkpoint,
            'precision': self.precision, 'nms_mode': self.nms_mode, 'nms': self.nms,
            'input_size': self.input_size, 'tolerances': self.tolerances.to_dict(),
            'metadata_issues': [dataclasses.asdict(i) for i in self.metadata_issues],
            'images': [m.to_dict() for m in self.images],
            'raw_outputs': {name: {'onnx_tensor': self.raw_tensor_names.get(name), **c.to_dict()}
                            for name, c in self.raw.items()},
            'raw_outputs_by_image': [{n: c.to_dict() for n, c in per.items()}
                                     for per in self.raw_by_image],
            'per_layer': self.layer.to_dict() if self.layer else None,
            'notes': self.notes,
        }


def write_report(report: ParityReport, path: str | Path, overwrite: bool = True) -> None:
    """The full report as JSON, written atomically."""
    text = json.dumps(_strict_json(report.to_dict()), indent=2, default=_json_value,
                      allow_nan=False)
    with atomic_write(path, 'w', overwrite=overwrite) as handle:
        handle.write(text + '\n')


def _strict_json(value):
    """NaN and infinities (a broken file's outputs) as the strings 'nan', 'inf', '-inf': JSON
    has no literal for them."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return str(float(value))
    return value


def _json_value(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f'not JSON serialisable: {type(value).__name__}')


# ---- images -------------------------------------------------------------------------------

def random_images(count: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """`count` generated RGB images of assorted sizes (landscape, portrait, square, tiny)."""
    from detdeploy.models.synthetic_weights import make_image
    if count < 1:
        raise DetdeployError(f'--random needs at least 1 image, got {count}')
    return [(f'random_{i}', make_image(*RANDOM_IMAGE_SIZES[i % len(RANDOM_IMAGE_SIZES)],
                                       seed + i)) for i in range(count)]


def file_images(paths: list[Path], max_pixels: int | None = None
                ) -> list[tuple[str, np.ndarray]]:
    """Every image read; an unreadable one stops the check (a partial comparison would pass
    on fewer images than asked for)."""
    return [(str(path), read_image(path, max_pixels=max_pixels)) for path in paths]


# ---- metadata -----------------------------------------------------------------------------

def check_metadata(metadata: ModelMetadata, detector, output_layout: str | None,
                   outputs: list[tuple[str, str, int]] | None,
                   input_hw: tuple | None) -> list[MetadataIssue]:
    """What in the file's metadata (and its declared outputs) disagrees with the PyTorch model.

    `outputs`: the file's outputs in order as (name, dtype kind 'f'/'i', rank), when known;
    `input_hw`: the graph input's static (height, width), when known.
    """
    issues = []
    spec_pre: PreprocessConfig = detector.spec.preprocessing
    file_pre = metadata.preprocess
    name = detector.spec.name
    if metadata.arch != name:
        issues.append(MetadataIssue('arch', metadata.arch, name, (
            f"file says arch '{metadata.arch}' but it is compared with {name}")))
    if file_pre.channel_order != spec_pre.channel_order:
        issues.append(MetadataIssue('preprocess.channel_order', file_pre.channel_order,
                                    spec_pre.channel_order, (
            f'channel order is {file_pre.channel_order.upper()} in the file but {name} was '
            f'trained on {spec_pre.channel_order.upper()}: runtimes would feed red and blue '
            'swapped')))
    for key in ('mean', 'std'):
        got, want = getattr(file_pre, key), getattr(spec_pre, key)
        if not np.allclose(got, want, rtol=1e-6, atol=1e-6):
            issues.append(MetadataIssue(f'preprocess.{key}', list(got), list(want), (
                f'preprocess {key} {_fmt(got)} in the file differs from {name}\'s {_fmt(want)}: '
                'runtimes would normalise images differently from PyTorch')))
    if abs(file_pre.pad_value - spec_pre.pad_value) > 1e-6:
        issues.append(MetadataIssue('preprocess.pad_value', file_pre.pad_value,
                                    spec_pre.pad_value, (
            f'pad value {file_pre.pad_value:g} in the file, {spec_pre.pad_value:g} for {name}')))
    if input_hw and all(isinstance(s, int) for s in input_hw) and \
            tuple(input_hw) != tuple(file_pre.input_size):
        issues.append(MetadataIssue('preprocess.input_size', list(file_pre.input_size),
                                    list(input_hw), (
            f'metadata input size {_hw(file_pre.input_size)} but the graph takes '
            f'{_hw(input_hw)}')))
    if tuple(metadata.class_names) != tuple(detector.class_names):
        differ = [i for i, (a, b) in enumerate(zip(metadata.class_names, detector.class_names))
                  if a != b]
        where = (f'{len(metadata.class_names)} names vs {len(detector.class_names)}'
                 if len(metadata.class_names) != len(detector.class_names) else
                 f'{len(differ)} differ, first at {differ[0]}: '
                 f"'{metadata.class_names[differ[0]]}' vs '{detector.class_names[differ[0]]}'")
        issues.append(MetadataIssue('class_names', list(metadata.class_names),
                                    list(detector.class_names),
                                    f'class names differ from the checkpoint\'s ({where})'))
    if outputs is not None and output_layout:
        expected = [(n, 'f' if t.startswith('float') else 'i', len(dims.split(',')))
                    for n, dims, t in LAYOUT_ENTRY.findall(output_layout)]
        if expected and [o[0] for o in outputs] != [e[0] for e in expected]:
            issues.append(MetadataIssue('outputs', [o[0] for o in outputs],
                                        [e[0] for e in expected], (
                f'outputs are ({", ".join(o[0] for o in outputs)}) but the layout in the '
                f'metadata is ({", ".join(e[0] for e in expected)}): runtimes read outputs by '
                'position')))
        elif expected and [o[1:] for o in outputs] != [e[1:] for e in expected]:
            wrong = [o[0] for o, e in zip(outputs, expected) if o[1:] != e[1:]]
            issues.append(MetadataIssue('outputs', outputs, expected, (
                f'outputs {", ".join(wrong)} do not have the type and rank the metadata '
                'layout gives')))
    return issues


def _fmt(values) -> str:
    return '(' + ', '.join(f'{v:g}' for v in values) + ')'


def _hw(size) -> str:
    return f'{size[0]}x{size[1]}'


# ---- the pipeline -------------------------------------------------------------------------

def _make_backend(model_file: Path, options: ParityOptions):
    if options.backend == 'ort':
        from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
        # a graph that does not fit its metadata is reported by check_metadata, not refused
        return OnnxRuntimeBackend(model_file, OrtOptions(device=options.device),
                                  check_signature=False)
    if options.backend == 'trt':
        try:
            from detdeploy.runtimes.tensorrt_backend import TensorRTBackend
        except ImportError:
            raise DetdeployError('the TensorRT backend is not available in this installation '
                                 '(detdeploy.runtimes.tensorrt_backend)') from None
        return TensorRTBackend(model_file)
    raise DetdeployError(f"unknown backend '{options.backend}': use ort or trt")


def _precision(backend) -> str:
    """fp32 unless the backend (a TensorRT engine's sidecar) says otherwise."""
    sidecar = getattr(backend, 'sidecar', None)
    build = getattr(sidecar, 'build', None)
    return str(getattr(build, 'precision', None) or getattr(backend, 'precision', None) or 'fp32')


def _onnx_outputs(model) -> list[tuple[str, str, int]]:
    import onnx
    outputs = []
    for info in model.graph.output:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        outputs.append((info.name, 'f' if np.issubdtype(dtype, np.floating) else 'i',
                        len(info.type.tensor_type.shape.dim)))
    return outputs


def _static_input_hw(model) -> tuple | None:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    sides = tuple(d.dim_value if d.HasField('dim_value') else None for d in dims[2:4])
    return sides if len(sides) == 2 and None not in sides else None


def _detection_set(outputs, index: int) -> DetectionSet:
    num_dets, boxes, scores, labels = outputs
    count = int(num_dets[index, 0])
    return DetectionSet(np.asarray(boxes[index, :count], np.float64),
                        np.asarray(scores[index, :count], np.float64),
                        np.asarray(labels[index, :count], np.int64))


def run_parity(model_file: str | Path, detector, images: list[tuple[str, np.ndarray]],
               options: ParityOptions = ParityOptions()) -> ParityReport:
    """Compare `model_file` (run by the chosen backend) with `detector` (PyTorch) on `images`
    (name, RGB uint8 array)."""
    import torch

    from detdeploy.models import NMSConfig
    from detdeploy.runtimes.torch_backend import TorchBackend

    from .onnx_graph import Graph, TensorRunner, find_raw_tensors, load_model

    model_file = Path(model_file)
    backend = _make_backend(model_file, options)
    metadata: ModelMetadata = backend.metadata
    precision = _precision(backend)
    tol = options.tolerances or tolerances_for(precision)
    onnx_model = load_model(model_file) if options.backend == 'ort' else None

    output_layout, outputs, input_hw = metadata.output_layout, None, None
    if onnx_model is not None:
        props = {p.key: p.value for p in onnx_model.metadata_props}
        output_layout = props.get('output_layout', output_layout)
        outputs, input_hw = _onnx_outputs(onnx_model), _static_input_hw(onnx_model)
    else:
        outputs = [tuple(o) for o in getattr(backend, 'output_signature', [])] or None
    issues = check_metadata(metadata, detector, output_layout, outputs, input_hw)

    report = ParityReport(
        str(model_file), backend.name, list(getattr(backend, 'providers', []) or []),
        detector.spec.name, detector.source, precision, metadata.nms_mode, dict(metadata.nms),
        list(metadata.preprocess.input_size), tol, issues)

    # Both sides get the PyTorch model's preprocessing at the file's input size: this compares
    # the networks; a preprocessing difference in the metadata is reported above.
    config = dataclasses.replace(detector.spec.preprocessing,
                                 input_size=tuple(metadata.preprocess.input_size))
    nms = NMSConfig(**metadata.nms)
    reference = TorchBackend(detector, nms=nms, device=options.torch_device,
                             preprocess_config=config)
    compare_detections = metadata.nms_mode != 'none' and not any(
        i.field == 'outputs' for i in issues)
    if metadata.nms_mode == 'none':
        report.notes.append('the file has no NMS (--nms none): only raw outputs are compared')
    elif not compare_detections:
        report.notes.append('detections not compared: the outputs do not follow the layout')

    graph = raw_tensors = runner = None
    if onnx_model is not None:
        from detdeploy.runtimes.onnxruntime_backend import OrtOptions
        graph = Graph(onnx_model)
        raw_tensors = find_raw_tensors(graph)
        runner = TensorRunner(onnx_model, OrtOptions(device=options.device), metadata.batch)
        if raw_tensors is None:
            report.notes.append('raw outputs not compared: the head tensors were not found '
                                '(not a graph detdeploy exported)')
        else:
            report.raw_tensor_names = dict(raw_tensors.named())
    else:
        report.notes.append('raw outputs and --per-layer need the ONNX file: a TensorRT engine '
                            'exposes only its outputs (compare the ONNX file with --backend ort)')

    batch_size = options.batch_size or metadata.batch or 4
    batches_by_image: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch, _ = prepare_batch([image for _, image in chunk], config)
        batches_by_image.extend(batch[i:i + 1] for i in range(len(chunk)))
        if compare_detections:
            want = reference.run(batch)
            got = backend.run(batch)
            for index, (name, _) in enumerate(chunk):
                report.images.append(match_detections(
                    _detection_set(want, index), _detection_set(got, index), tol,
                    nms.score_thr, nms.max_det, name, backend.name))
        if raw_tensors is not None:
            named = raw_tensors.named()
            got_raw = runner.run([t for _, t in named], batch)
            with torch.no_grad():
                want_raw = detector.model(torch.from_numpy(batch).to(options.torch_device))
            want_by_name = {f'cls_scores[{i}]': t for i, t in enumerate(want_raw.cls_scores)}
            want_by_name.update({f'bbox_preds[{i}]': t for i, t in enumerate(want_raw.bbox_preds)})
            for index in range(len(chunk)):
                per_image = {}
                for name, tensor in named:
                    comparison = compare_arrays(got_raw[tensor][index],
                                                want_by_name[name][index].cpu().numpy(),
                                                tol.atol, tol.rtol, name)
                    per_image[name] = comparison
                    report.raw[name] = merge_comparisons(report.raw.get(name), comparison,
                                                         image_index=start + index)
                report.raw_by_image.append(per_image)

    if options.per_layer and raw_tensors is not None:
        failing = [(i, name) for i, per in enumerate(report.raw_by_image)
                   for name, c in per.items() if not c.passed]
        if failing:
            image_index = failing[0][0]
            # the earliest failing raw tensor of that image, in graph order
            order = {name: graph.producer[t] for name, t in raw_tensors.named()}
            name = min((n for i, n in failing if i == image_index), key=order.get)
            report.layer = find_first_divergence(
                graph, runner, detector.model, batches_by_image[image_index],
                (report.raw_tensor_names[name], report.raw_by_image[image_index][name]),
                tol.atol, tol.rtol, images[image_index][0])
        else:
            report.notes.append('--per-layer: raw outputs agree, nothing to search'
                                + ('' if report.passed else
                                   ' (the difference arises after the heads: decoding or NMS)'))
    return report
