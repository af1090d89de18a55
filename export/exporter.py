"""`detdeploy export`: a loaded detector -> one self-describing ONNX file.

Exports with PyTorch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`), translating the
NMS custom ops with onnxscript; simplifies with onnxsim (checked, with fallback); stores the
metadata runtimes need; checks the result with `onnx.checker`; writes atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch

import detdeploy
from detdeploy.errors import DetdeployError
from detdeploy.fileio import atomic_write
from detdeploy.models import DEPLOY_NMS, LoadedDetector, NMSConfig
from detdeploy.runtimes.metadata import ModelMetadata

from .graph import NMS_MODES, OUTPUT_NAMES, DetectorGraph, PostprocessGraph
from .onnx_nms import TRT_PLUGIN_DOMAINS, batched_nms_to_onnx, efficient_nms_translation
from .simplify import simplify

INPUT_NAME = 'images'
SIDE_MULTIPLE = 32          # the largest stride: input sides must be multiples of it
MAX_DYNAMIC_BATCH = 1024
MAX_DYNAMIC_SIDE = 4096
TRT_SLOW_SCORE_THR = 0.01   # EfficientNMS_TRT gets much slower below this


@dataclass(frozen=True)
class ExportOptions:
    nms_mode: str = 'onnx'
    nms: NMSConfig = DEPLOY_NMS
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


def validate_options(options: ExportOptions, input_hw: tuple[int, int]) -> None:
    if options.nms_mode not in NMS_MODES:
        raise DetdeployError(f"unknown NMS mode '{options.nms_mode}': use {', '.join(NMS_MODES)}")
    if any(side <= 0 or side % SIDE_MULTIPLE for side in input_hw):
        raise DetdeployError(f'input size {input_hw[0]}x{input_hw[1]}: both sides must be '
                             f'positive multiples of {SIDE_MULTIPLE}')
    if options.batch < 1:
        raise DetdeployError(f'batch must be at least 1, got {options.batch}')
    nms = options.nms
    for name, value in (('score threshold', nms.score_thr), ('IoU threshold', nms.iou_thr)):
        if not 0 <= value <= 1:
            raise DetdeployError(f'{name} must be in [0, 1], got {value}')
    if nms.pre_top_k < 1 or nms.max_det < 1:
        raise DetdeployError('pre-top-k and max-det must be at least 1')
    if options.trt_plugin_domain not in TRT_PLUGIN_DOMAINS:
        raise DetdeployError(f"TensorRT plugin domain must be one of {TRT_PLUGIN_DOMAINS}")


def _dynamic_shapes(options: ExportOptions) -> dict | None:
    axes = {}
    if options.dynamic_batch:
        axes[0] = torch.export.Dim('batch', min=1, max=MAX_DYNAMIC_BATCH)
    if options.dynamic_shape:
        blocks = MAX_DYNAMIC_SIDE // SIDE_MULTIPLE
        axes[2] = SIDE_MULTIPLE * torch.export.Dim('height_blocks', min=1, max=blocks)
        axes[3] = SIDE_MULTIPLE * torch.export.Dim('width_blocks', min=1, max=blocks)
    return {INPUT_NAME: axes} if axes else None


def _shape(value_info: onnx.ValueInfoProto) -> list:
    return [dim.dim_param or dim.dim_value for dim in value_info.type.tensor_type.shape.dim]


def _dynamo_export(module: torch.nn.Module, args: tuple, input_names: list[str],
                   output_names: list[str], dynamic_shapes: dict | None, opset: int | None,
                   trt_plugin_domain: str = 'TRT') -> onnx.ModelProto:
    """`torch.onnx.export(dynamo=True)` with detdeploy's NMS ops translated, quietly."""
    table = {
        torch.ops.detdeploy.batched_nms.default: batched_nms_to_onnx,
        torch.ops.detdeploy.efficient_nms.default: efficient_nms_translation(trt_plugin_domain),
    }
    # The exporter reports progress on stdout and warns about its own internals; keep the
    # command's output to our summary.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore')
        program = torch.onnx.export(
            module, args, dynamo=True, custom_translation_table=table,
            dynamic_shapes=dynamic_shapes, input_names=input_names, output_names=output_names,
            opset_version=opset, verbose=False)
    return program.model_proto


def trace_to_onnx(graph: DetectorGraph, example: torch.Tensor, options: ExportOptions
                  ) -> onnx.ModelProto:
    """The dynamo export of `graph`, with detdeploy's NMS ops translated."""
    return _dynamo_export(graph, (example,), [INPUT_NAME], list(OUTPUT_NAMES[options.nms_mode]),
                          _dynamic_shapes(options), options.opset, options.trt_plugin_domain)


def export_postprocess(graph: PostprocessGraph, num_classes: int, batch: int = 1,
                       opset: int | None = None) -> onnx.ModelProto:
    """The post-processing alone as ONNX, unsimplified and without metadata: inputs `class_scores`
    [batch, N, num_classes] and `box_distances` [batch, N, 4], the four `onnx`-mode outputs."""
    example = (torch.rand(batch, graph.num_anchors, num_classes),
               torch.rand(batch, graph.num_anchors, 4) * 16)
    model = _dynamo_export(graph, example, ['class_scores', 'box_distances'],
                           list(OUTPUT_NAMES['onnx']), None, opset)
    onnx.checker.check_model(model, full_check=True)
    return model


def export_onnx(detector: LoadedDetector, output_path: str | Path,
                options: ExportOptions = ExportOptions()) -> ExportReport:
    """Export `detector` to `output_path` and return what was written."""
    started = time.perf_counter()
    output_path = Path(output_path)
    if not output_path.parent.is_dir():
        raise DetdeployError(f'output directory does not exist: {output_path.parent}')
    input_hw = options.input_hw or detector.spec.preprocessing.input_size
    validate_options(options, input_hw)
    notes = []
    if options.nms_mode == 'trt' and options.nms.score_thr < TRT_SLOW_SCORE_THR:
        notes.append(f'score threshold {options.nms.score_thr} is below {TRT_SLOW_SCORE_THR}: '
                     'EfficientNMS_TRT gets much slower there')

    graph = DetectorGraph(detector.model, options.nms_mode, options.nms).eval()
    # A batch-1 example would let the tracer specialise a dynamic batch axis to 1.
    example_batch = 2 if options.dynamic_batch else options.batch
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(example_batch, 3, *input_hw, generator=generator)
    model = trace_to_onnx(graph, example, options)
    nodes_exported = len(model.graph.node)

    simplified = False
    if options.simplify:
        # ONNX Runtime cannot run the TensorRT plugin, so a `trt` graph is simplified unchecked.
        sample = None if options.nms_mode == 'trt' else example.numpy()
        result = simplify(model, sample)
        model, simplified = result.model, result.simplified
        if result.warning:
            notes.append(f'not simplified: {result.warning}; kept the exported graph')

    processing = detector.spec.preprocessing
    processing = dataclasses.replace(processing, input_size=tuple(input_hw))
    opset = next(o.version for o in model.opset_import if o.domain in ('', 'ai.onnx'))
    metadata = ModelMetadata(
        arch=detector.spec.name, class_names=detector.class_names, preprocess=processing,
        nms_mode=options.nms_mode, nms=options.nms.to_dict(),
        batch=None if options.dynamic_batch else options.batch,
        dynamic_shape=options.dynamic_shape, opset=opset,
        detdeploy_version=detdeploy.__version__, torch_version=torch.__version__,
        onnx_version=onnx.__version__, checkpoint=detector.source,
        checkpoint_sha256=detector.checkpoint_sha256,
        trt_plugin_domain=options.trt_plugin_domain if options.nms_mode == 'trt' else None)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata.to_props())
    model.doc_string = f'{detector.spec.name} exported by detdeploy {detdeploy.__version__}'
    onnx.checker.check_model(model, full_check=True)

    payload = model.SerializeToString()
    with atomic_write(output_path) as handle:
        handle.write(payload)
    return ExportReport(
        path=output_path, size_bytes=len(payload), opset=opset,
        inputs=[(i.name, _shape(i)) for i in model.graph.input],
        outputs=[(o.name, _shape(o)) for o in model.graph.output],
        nodes_exported=nodes_exported, nodes_final=len(model.graph.node),
        simplified=simplified, seconds=time.perf_counter() - started, warnings=notes)

