"""`detdeploy quantize`: a float detdeploy ONNX file -> static INT8 (QDQ) with calibration
images, post-processing kept float, optionally guided by an accuracy target."""
from __future__ import annotations

from pathlib import Path

import click

from detdeploy.core.errors import DetdeployError

from .common import FiniteFloat, ThreadCount, no_overwrite_option


@click.command()
@click.argument('model_file', type=click.Path(dir_okay=False))
@click.option('--calib-images', 'calib_dir', required=True,
              help='Folder of calibration images (preprocessed as inference does, from the '
              "file's metadata).")
@click.option('-o', '--output', type=click.Path(dir_okay=False),
              help='Output file [default: <model>_int8.onnx].')
@click.option('--calib-size', type=click.IntRange(min=1), default=100, show_default=True,
              help='Calibration images, spread evenly over the sorted folder.')
@click.option('--method', type=click.Choice(['minmax', 'percentile', 'entropy']),
              default='minmax', show_default=True, help='How activation ranges are chosen.')
@click.option('--target', type=click.Choice(['cpu', 'tensorrt']), default='cpu',
              show_default=True, help='cpu: U8 activations, S8 per-channel weights (ONNX '
              'Runtime, OpenVINO); tensorrt: symmetric S8 activations and weights, zero point 0 '
              '(TensorRT 10 explicit quantization).')
@click.option('--max-ap-drop', type=FiniteFloat(min=0),
              help='Accuracy target: keep the most sensitive layer groups float until the AP '
              'drop on the probe images is at most this.')
@click.option('--max-output-error', type=FiniteFloat(min=0),
              help='Accuracy target: raw head outputs\' noise-to-signal ratio at most this.')
@click.option('--probe-images', type=click.IntRange(min=1), default=32, show_default=True,
              help='Calibration images the AP drop is measured on (pseudo labels: the float '
              "model's detections above 0.3), unless --ann is given.")
@click.option('--ann', 'ann_file', type=click.Path(dir_okay=False),
              help='COCO annotations to measure the AP drop with instead (with --ann-images).')
@click.option('--ann-images', type=click.Path(file_okay=False),
              help='Folder the --ann file names are relative to.')
@click.option('--exclude', help='Comma-separated layer groups or node names to keep float.')
@click.option('--group-depth', type=click.IntRange(min=1), default=2, show_default=True,
              help='Layer groups for the sensitivity search: module paths cut at this depth '
              '(1: backbone, neck, head parts; 2: backbone.stage1, ...).')
@click.option('--bins', type=click.IntRange(min=2), default=2048, show_default=True,
              help='percentile, entropy: histogram bins.')
@click.option('--percentile', type=FiniteFloat(0, 100, min_open=True), default=99.999,
              show_default=True, help='percentile: the share of values the range covers.')
@click.option("--threads", type=ThreadCount(), help="ONNX Runtime intra-op threads.")
@click.option('--json', 'json_path', type=click.Path(dir_okay=False),
              help='Write the report (float parts, sensitivity, search steps) here.')
@no_overwrite_option
def quantize(model_file, calib_dir, output, calib_size, method, target, max_ap_drop,
             max_output_error, probe_images, ann_file, ann_images, exclude, group_depth, bins,
             percentile, threads, json_path, no_overwrite) -> None:
    """Quantize MODEL_FILE (a float detdeploy .onnx) to static INT8 in QDQ form."""
    from detdeploy.core.fileio import check_output_file, refuse_overwriting_inputs
    from detdeploy.inference.batch import collect_images
    from detdeploy.quantization.calibration import CalibrationOptions
    from detdeploy.quantization.quantize import QuantizeOptions, quantize_file

    model = Path(model_file)
    if not model.is_file():
        raise DetdeployError(f'model file not found: {model}')
    output = Path(output or model.with_name(f'{model.stem}_int8.onnx'))
    refuse_overwriting_inputs([('-o', output)] + ([('--json', json_path)] if json_path else []),
                              [('model', model), ('--ann', ann_file)])
    calib = Path(calib_dir)
    if not calib.is_dir():
        raise DetdeployError(f'--calib-images {calib}: no such directory')
    images = collect_images([calib]) if any(calib.iterdir()) else []
    if (ann_file is None) != (ann_images is None):
        raise DetdeployError('--ann and --ann-images go together')
    if ann_file is not None and max_ap_drop is None:
        raise DetdeployError('--ann measures the AP drop for --max-ap-drop; give that too')
    check_output_file(output, overwrite=not no_overwrite, flag='-o')
    if json_path:
        check_output_file(json_path, overwrite=not no_overwrite, flag='--json')
    if not images:
        raise DetdeployError(f'--calib-images {calib} has no images')
    options = QuantizeOptions(
        calibration=CalibrationOptions(method=method, size=calib_size, num_bins=bins,
                                       percentile=percentile),
        target=target, max_ap_drop=max_ap_drop, max_output_error=max_output_error,
        probe_images=probe_images, ann_file=ann_file, ann_images=ann_images,
        exclude=tuple(n.strip() for n in (exclude or '').split(',') if n.strip()),
        group_depth=group_depth,
        threads=threads)
    report = quantize_file(model, images, output, options,
                           progress=lambda text: click.echo(text, err=True))
    click.echo(f'wrote {report.path} ({report.size_bytes / 1e6:.1f} MB) in {report.seconds:.0f} s:'
               f' int8 ({report.activation_type} activations, {report.weight_type} per-channel '
               f'weights, target {report.target}), {report.method} on '
               f'{report.calibration_images} images')
    click.echo(f'  network nodes quantized: {report.quantized_nodes} of {report.network_nodes}; '
               f'raw output error (noise/signal) {report.output_error:.4f}')
    if report.ap is not None:
        click.echo(f'  probe AP ({report.ap_labels}): float {report.float_ap:.4f}, int8 '
                   f'{report.ap:.4f}, drop {report.float_ap - report.ap:+.4f}')
    click.echo('  kept float:')
    for part in report.float_parts:
        sensitivity = '' if part.sensitivity is None else f', sensitivity {part.sensitivity:.4f}'
        click.echo(f'    {part.name} ({len(part.nodes)} nodes{sensitivity}): {part.reason}')
    if json_path:
        from detdeploy.quantization.quantize import write_report
        write_report(report, json_path, overwrite=not no_overwrite)
        click.echo(f'report: {json_path}')
    if report.target_met is False:
        click.echo('warning: the accuracy target is not met even with every layer group float',
                   err=True)
