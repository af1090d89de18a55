"""`detdeploy export`: a loaded detector -> one self-describing ONNX file.

Exports with PyTorch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`), translating the
NMS custom ops with onnxscript; simplifies with onnxsim (checked, with fallback); stores the
metadata runtimes need; checks the result with `onnx.checker`; writes atomically.

Input shape, one rule for every family:
- A model padded to a fixed size (RTMDet: a square `input_size`) exports at that size; height
  and width are dynamic only with `dynamic_shape`.
- A model padded to a multiple of its size divisor (RetinaNet, Faster R-CNN, YOLOv3: as
  MMDetection's DetDataPreprocessor pads each batch to its own multiple) always exports with
  dynamic height and width, whatever `dynamic_shape` says (a note tells when it was off): a
  fixed-shape graph would need the host to pad to one size, which changes the outputs near the
  padded border. The metadata's `input_size` is the resize scale (`--input-size`, default the
  model's), not a canvas; the trace runs at the canvas that scale gives, but at least
  `MIN_DIVISOR_TRACE_BLOCKS` divisors per side, so that no pyramid level has one row or column
  (the tracer would fix such a size to 1 for every input).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import onnx
import torch

import detdeploy
from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import atomic_write
from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import check_input_size
from detdeploy.core.tasks import DETECT, NMS_MODES, has_schema, output_names
from detdeploy.models import LoadedDetector

from .graph import DetectorGraph, PostprocessGraph
from .onnx_nms import (TRT_PLUGIN_DOMAINS, batched_nms_index_to_onnx, batched_nms_to_onnx,
                       efficient_nms_translation)
from .simplify import simplify

INPUT_NAME = 'images'
MIN_OPSET = 18                  # the dynamo exporter's first opset
MAX_DYNAMIC_BATCH = 1024
MAX_DYNAMIC_SIDE = 4096
TRT_SLOW_SCORE_THR = 0.01   # EfficientNMS_TRT gets much slower below this
MIN_DIVISOR_TRACE_BLOCKS = 8  # trace side of divisor-padded models, in size divisors (P7 >= 2)


@dataclass(frozen=True)
class ExportOptions:
    nms_mode: str = 'onnx'
    nms: NMSConfig | None = None                 # default: the model's deploy preset
    batch: int = 1
    dynamic_batch: bool = False
    dynamic_shape: bool = False
    input_hw: tuple[int, int] | None = None      # default: the model's input size
    opset: int | None = None                     # default: the exporter's
    simplify: bool = True
    trt_plugin_domain: str = 'TRT'


@dataclass
class ExportReport:
    path: Path
    size_bytes: int
    opset: int
    inputs: list[tuple[str, list]]
    outputs: list[tuple[str, list]]
    nodes_exported: int
    nodes_final: int
    simplified: bool
    seconds: float
    warnings: list[str] = field(default_factory=list)


def validate_options(options: ExportOptions, input_hw: tuple[int, int], task: str,
                     size_divisor: int) -> None:
    if options.nms_mode not in NMS_MODES:
        raise DetdeployError(f"unknown NMS mode '{options.nms_mode}': use {', '.join(NMS_MODES)}")
    if not has_schema(task, options.nms_mode):
        modes = [mode for mode in NMS_MODES if has_schema(task, mode)]
        raise DetdeployError(f"--nms {options.nms_mode} is not available for {task} models: "
                             f"use --nms {' or '.join(modes)}")
    check_input_size(tuple(input_hw), size_divisor, 'input size')
    if options.batch < 1:
        raise DetdeployError(f'batch must be at least 1, got {options.batch}')
    options.nms.check()
    check_opset(options.opset)
    if options.trt_plugin_domain not in TRT_PLUGIN_DOMAINS:
        raise DetdeployError(f"TensorRT plugin domain must be one of {TRT_PLUGIN_DOMAINS}")


def max_opset() -> int:
    """The newest opset torch's exporter writes (its version converter fails beyond it)."""
    from torch.onnx import _constants
    return int(getattr(_constants, 'ONNX_MAX_OPSET', MIN_OPSET))


def check_opset(opset: int | None) -> None:
    """An opset the exporter writes (None: its default), or a one-line error."""
    if opset is not None and not MIN_OPSET <= opset <= max_opset():
        raise DetdeployError(f'--opset {opset} is not supported: the exporter writes opsets '
                             f'{MIN_OPSET} to {max_opset()}')


def _dynamic_shapes(options: ExportOptions, size_divisor: int) -> dict | None:
    axes = {}
    if options.dynamic_batch:
        axes[0] = torch.export.Dim('batch', min=1, max=MAX_DYNAMIC_BATCH)
    if options.dynamic_shape:
        blocks = MAX_DYNAMIC_SIDE // size_divisor
        axes[2] = size_divisor * torch.export.Dim('height_blocks', min=1, max=blocks)
        axes[3] = size_divisor * torch.export.Dim('width_blocks', min=1, max=blocks)
    return {INPUT_NAME: axes} if axes else None


def _shape(value_info: onnx.ValueInfoProto) -> list:
    return [dim.dim_param or dim.dim_value for dim in value_info.type.tensor_type.shape.dim]


def _dynamo_export(module: torch.nn.Module, args: tuple, input_names: list[str],
                   output_names: list[str], dynamic_shapes: dict | None, opset: int | None,
                   trt_plugin_domain: str = 'TRT') -> onnx.ModelProto:
    """`torch.onnx.export(dynamo=True)` with detdeploy's NMS ops translated, quietly."""
    table = {
        torch.ops.detdeploy.batched_nms.default: batched_nms_to_onnx,
        torch.ops.detdeploy.batched_nms_index.default: batched_nms_index_to_onnx,
        torch.ops.detdeploy.efficient_nms.default: efficient_nms_translation(trt_plugin_domain),
    }
    # The exporter reports progress on stdout and warns about its own internals (onnx_ir logs
    # one for an empty attribute list in the rotated NMS graph); keep the command's output to
    # our summary.
    ir_logger = logging.getLogger('onnx_ir')
    level = ir_logger.level
    ir_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter('ignore')
            program = torch.onnx.export(
                module, args, dynamo=True, custom_translation_table=table,
                dynamic_shapes=dynamic_shapes, input_names=input_names,
                output_names=output_names, opset_version=opset, verbose=False)
    finally:
        ir_logger.setLevel(level)
    return program.model_proto


def trace_to_onnx(graph: DetectorGraph, example: torch.Tensor, options: ExportOptions,
                  raw_names: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The dynamo export of `graph`, with detdeploy's NMS ops translated; with `raw_names`
    (`graph.expose_raw`), the raw outputs are graph outputs too, under those names."""
    return _dynamo_export(graph, (example,), [INPUT_NAME], graph.output_names(raw_names),
                          _dynamic_shapes(options, graph.model.size_divisor), options.opset,
                          options.trt_plugin_domain)


def _drop_outputs(model: onnx.ModelProto, names: tuple[str, ...]) -> None:
    """Remove graph outputs by name; the tensors stay in the graph under those names."""
    kept = [output for output in model.graph.output if output.name not in names]
    del model.graph.output[:]
    model.graph.output.extend(kept)


def export_postprocess(graph: PostprocessGraph, num_classes: int, batch: int = 1,
                       opset: int | None = None) -> onnx.ModelProto:
    """The post-processing alone as ONNX, unsimplified and without metadata: inputs `class_scores`
    [batch, N, num_classes] and `box_distances` [batch, N, 4], the four `onnx`-mode outputs."""
    example = (torch.rand(batch, graph.num_anchors, num_classes),
               torch.rand(batch, graph.num_anchors, 4) * 16)
    model = _dynamo_export(graph, example, ['class_scores', 'box_distances'],
                           list(output_names(DETECT, 'onnx')), None, opset)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(detector: LoadedDetector, output_path: str | Path,
                options: ExportOptions = ExportOptions(),
                stage: Callable[[str], None] | None = None) -> ExportReport:
    """Export `detector` to `output_path` and return what was written; `stage(name)` is called
    as each long step starts (tracing, simplifying, checking, writing)."""
    stage = stage or (lambda name: None)
    started = time.perf_counter()
    output_path = Path(output_path)
    if not output_path.parent.is_dir():
        raise DetdeployError(f'output directory does not exist: {output_path.parent}')
    model_module = detector.model
    input_hw = options.input_hw or detector.spec.preprocessing.input_size
    if options.nms is None:
        options = dataclasses.replace(options, nms=detector.spec.nms('deploy'))
    notes = []
    processing = detector.spec.preprocessing
    scale_hw = tuple(input_hw)
    if processing.pad == 'divisor':
        # The host pads each batch to its own multiple of the divisor (MMDetection's
        # pad_size_divisor), so the graph must take any such size; `input_hw` is the resize
        # scale, and the trace runs at the canvas it gives, but never so small that a pyramid
        # level has one row or column: the tracer would fix such a size to 1 for every input.
        if not options.dynamic_shape:
            notes.append(f'{detector.spec.name} pads each image to a multiple of '
                         f'{processing.size_divisor}: exported with dynamic height and width')
            options = dataclasses.replace(options, dynamic_shape=True)
        input_hw = tuple(max(side, MIN_DIVISOR_TRACE_BLOCKS * model_module.size_divisor)
                         for side in processing.canvas_size(scale_hw))
    if options.nms_mode in NMS_MODES:
        model_module.check_nms_mode(options.nms_mode)
    validate_options(options, input_hw, model_module.task, model_module.size_divisor)
    processing = processing.with_input_size(scale_hw)
    if options.nms_mode == 'trt' and options.nms.score_thr < TRT_SLOW_SCORE_THR:
        notes.append(f'score threshold {options.nms.score_thr} is below {TRT_SLOW_SCORE_THR}: '
                     'EfficientNMS_TRT gets much slower there')

    graph = DetectorGraph(model_module, options.nms_mode, options.nms, expose_raw=True).eval()
    # A batch-1 example would let the tracer specialise a dynamic batch axis to 1.
    example_batch = 2 if options.dynamic_batch else options.batch
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(example_batch, 3, *input_hw, generator=generator)
    # The raw outputs are graph outputs while tracing and simplifying, so that the tensors keep
    # their names (`cls_scores.0`, ...) for parity; then they are inner tensors again.
    raw_names = model_module.raw_output_names
    stage('tracing the model (torch.onnx dynamo export)')
    model = trace_to_onnx(graph, example, options, raw_names)
    nodes_exported = len(model.graph.node)

    simplified = False
    if options.simplify:
        # ONNX Runtime cannot run the TensorRT plugin, so a `trt` graph is simplified unchecked.
        sample = None if options.nms_mode == 'trt' else example.numpy()
        stage('simplifying (onnxsim, then checked against the exported graph)')
        result = simplify(model, sample)
        model, simplified = result.model, result.simplified
        if result.warning:
            notes.append(f'not simplified: {result.warning}; kept the exported graph')

    _drop_outputs(model, raw_names)
    opset = next(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))
    if options.opset is not None and opset != options.opset:
        raise DetdeployError(f'--opset {options.opset} was asked for but the exporter wrote '
                             f'opset {opset}; nothing written')
    metadata = detector.metadata(
        options.nms, options.nms_mode, processing, precision='fp32', raw_outputs=raw_names,
        batch=None if options.dynamic_batch else options.batch,
        dynamic_shape=options.dynamic_shape, opset=opset, onnx_version=onnx.__version__,
        trt_plugin_domain=options.trt_plugin_domain if options.nms_mode == 'trt' else None)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata.to_props())
    model.doc_string = f'{detector.spec.name} exported by detdeploy {detdeploy.__version__}'
    stage('checking (onnx.checker, full)')
    onnx.checker.check_model(model, full_check=True)

    stage('writing')
    payload = model.SerializeToString()
    with atomic_write(output_path) as handle:
        handle.write(payload)
    return ExportReport(
        path=output_path, size_bytes=len(payload), opset=opset,
        inputs=[(i.name, _shape(i)) for i in model.graph.input],
        outputs=[(o.name, _shape(o)) for o in model.graph.output],
        nodes_exported=nodes_exported, nodes_final=len(model.graph.node),
        simplified=simplified, seconds=time.perf_counter() - started, warnings=notes)


def export_for_runtime(detector: LoadedDetector, folder: str | Path, nms: NMSConfig,
                       input_hw: tuple[int, int] | None = None) -> Path:
    """A registry model exported into `folder` (NMS in the graph, dynamic batch; dynamic shape
    for a model padded to its size divisor, by `export_onnx`'s rule), so that `bench`, `eval`
    and `infer` can run the same weights on ONNX Runtime."""
    path = Path(folder) / f'{detector.spec.name}.onnx'
    export_onnx(detector, path, ExportOptions(nms_mode='onnx', nms=nms, dynamic_batch=True,
                                              input_hw=input_hw))
    return path
