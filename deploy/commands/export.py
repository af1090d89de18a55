"""`detdeploy export`: PyTorch detector to ONNX with NMS inside the graph."""
from __future__ import annotations

import click

from detdeploy.core.errors import DetdeployError

from .common import (DEFAULT_MODEL, FiniteFloat, load_model, no_overwrite_option, parse_input_size,
                     pytorch_model_options, weight_inputs)


@click.command()
@pytorch_model_options
@click.option('-o', '--output', type=click.Path(dir_okay=False),
              help='Output file [default: <model>.onnx, the --model name as given: rtmdet.onnx '
              'for the default model].')
@click.option('--nms', 'nms_mode', type=click.Choice(['onnx', 'trt', 'none']), default='onnx',
              show_default=True, help='onnx: standard NonMaxSuppression; trt: EfficientNMS_TRT '
              'plugin; none: per-anchor boxes and scores.')
@click.option('--nms-preset', type=click.Choice(['deploy', 'eval']), default='deploy',
              show_default=True, help='deploy: score 0.05, pre-top-k 1000, IoU 0.65, max-det 100; '
              "eval: the model's test config (0.001, 30000, 0.65, 300).")
@click.option('--score-thr', type=FiniteFloat(0, 1), help='Override the preset.')
@click.option('--iou-thr', type=FiniteFloat(0, 1), help='Override the preset.')
@click.option('--pre-top-k', type=click.IntRange(min=1),
              help='Override the preset: (anchor, class) pairs kept per pyramid level.')
@click.option('--max-det', type=click.IntRange(min=1), help='Override the preset.')
@click.option('--agnostic-nms', is_flag=True, help='Class-agnostic NMS: boxes of different '
              'classes suppress each other too, so one object keeps one box (one label).')
@click.option('--batch', type=click.IntRange(min=1), default=1, show_default=True,
              help='Static batch size.')
@click.option('--dynamic-batch', is_flag=True, help='Symbolic batch axis (overrides --batch).')
@click.option('--dynamic-shape', is_flag=True,
              help="Symbolic height and width (multiples of the model's size divisor).")
@click.option('--input-size', help='Network input: 640 or HEIGHTxWIDTH [default: the model\'s].')
@click.option('--opset', type=click.IntRange(min=18), help="ONNX opset [default: the exporter's].")
@click.option('--no-simplify', is_flag=True, help='Skip onnxsim.')
@click.option('--trt-plugin-domain', type=click.Choice(['TRT', 'trt.plugins']), default='TRT',
              show_default=True, help="EfficientNMS_TRT node domain: TRT for TensorRT's parser, "
              "trt.plugins for ONNX Runtime's TensorRT provider.")
@click.option('--fp16', is_flag=True, help='Network in float16 for GPU providers (ONNX Runtime '
              'CUDA/TensorRT); image input, outputs and NMS stay float32.')
@no_overwrite_option
def export(model_name, checkpoint, class_names, trust_checkpoint, output, nms_mode, nms_preset,
           score_thr, iou_thr, pre_top_k, max_det, agnostic_nms, batch, dynamic_batch,
           dynamic_shape, input_size, opset, no_simplify, trt_plugin_domain, fp16,
           no_overwrite) -> None:
    """Export a detector to ONNX with NMS inside the graph."""
    import dataclasses

    from detdeploy.core.fileio import check_output_file, refuse_overwriting_inputs
    from detdeploy.export.exporter import ExportOptions, check_opset, export_onnx
    from detdeploy.models.registry import get_spec

    input_hw = parse_input_size(input_size)
    # before minutes of tracing: the name is known, the folder writable, no file refused
    get_spec(model_name or DEFAULT_MODEL)          # an unknown name fails here, in one line
    output = output or f'{(model_name or DEFAULT_MODEL).lower()}.onnx'
    check_output_file(output, overwrite=not no_overwrite, flag='-o')
    refuse_overwriting_inputs([('-o', output)], weight_inputs(checkpoint, class_names))
    check_opset(opset)
    get_spec(model_name or DEFAULT_MODEL).preprocessing.with_input_size(input_hw)
    detector = load_model(model_name, checkpoint, class_names, trust_checkpoint,
                          'is exported with random weights')
    overrides = {'score_thr': score_thr, 'iou_thr': iou_thr, 'pre_top_k': pre_top_k,
                 'max_det': max_det, 'class_agnostic': agnostic_nms or None}
    nms = dataclasses.replace(detector.spec.nms(nms_preset),
                              **{k: v for k, v in overrides.items() if v is not None}).check()
    options = ExportOptions(nms_mode=nms_mode, nms=nms, batch=batch, dynamic_batch=dynamic_batch,
                            dynamic_shape=dynamic_shape, input_hw=input_hw, opset=opset,
                            simplify=not no_simplify, trt_plugin_domain=trt_plugin_domain)
    if fp16 and nms_mode != 'onnx':
        raise DetdeployError('--fp16 needs --nms onnx (the float32 NMS graph it keeps)')
    from detdeploy.core.progress import Progress
    with Progress(f'export {output}') as progress:
        if fp16:
            report = _export_fp16(detector, output, options, stage=progress.stage)
        else:
            report = export_onnx(detector, output, options, stage=progress.stage)
    for warning in report.warnings:
        click.echo(f'warning: {warning}', err=True)
    click.echo(f'wrote {report.path} ({report.size_bytes / 1e6:.1f} MB, opset {report.opset}) '
               f'in {report.seconds:.1f} s')
    for kind, tensors in (('input ', report.inputs), ('output', report.outputs)):
        for name, shape in tensors:
            click.echo(f'  {kind} {name} {shape}')
    simplified = (f'{report.nodes_final} after onnxsim' if report.simplified
                  else 'not simplified')
    click.echo(f'  nodes: {report.nodes_exported} exported, {simplified}')
    if nms_mode != 'none':
        click.echo(f'  nms: {nms_mode}, {nms.describe()}')
    if fp16:
        click.echo('  precision: fp16 network; input, outputs and NMS float32')


def _export_fp16(detector, output, options, stage=None):
    """The float32 export next to `output`, then its fp16 copy at `output`."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from detdeploy.export.exporter import export_onnx
    from detdeploy.quantization.fp16 import convert_to_fp16
    with tempfile.TemporaryDirectory(prefix='.detdeploy_fp32_', dir=Path(output).parent) as temp:
        report = export_onnx(detector, Path(temp) / 'fp32.onnx', options, stage=stage)
        converted = convert_to_fp16(report.path, output)
    return dataclasses.replace(report, path=converted.path, size_bytes=converted.size_bytes)
