"""`detdeploy build-engine`: a TensorRT engine, plus its JSON sidecar, from a detdeploy ONNX file.

A thin command: options are checked and the engine built by `detdeploy.runtimes.tensorrt_build`.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from detdeploy.core.errors import DetdeployError

from .common import apply_max_pixels, max_pixels_option, no_overwrite_option, parse_input_size

MAX_WARNINGS_SHOWN = 3


def parse_shape(text: str | None, flag: str) -> tuple[int, int] | None:
    """640 or HEIGHTxWIDTH, as --input-size."""
    try:
        return parse_input_size(text)
    except DetdeployError:
        raise DetdeployError(f"{flag} '{text}': give one side (640) or HEIGHTxWIDTH "
                             '(800x1344)') from None


@click.command('build-engine')
@click.argument('onnx_path', metavar='MODEL.onnx', type=click.Path(dir_okay=False))
@click.option('-o', '--output', type=click.Path(dir_okay=False),
              help='Engine file [default: MODEL.engine]; its metadata goes to OUTPUT.json.')
@click.option('--fp16', is_flag=True, help='Allow FP16 kernels (TensorRT 10 builder flag).')
@click.option('--int8', is_flag=True, help='Allow INT8 kernels, calibrated on --calib-images.')
@click.option('--calib-images', type=click.Path(exists=False),
              help='Directory (or image file) for INT8 entropy calibration.')
@click.option('--min-batch', type=click.IntRange(min=1), help='Batch profile minimum [1].')
@click.option('--opt-batch', type=click.IntRange(min=1),
              help='Batch size TensorRT tunes for [--min-batch].')
@click.option('--max-batch', type=click.IntRange(min=1),
              help='Batch profile maximum [max(8, --opt-batch)]; larger batches are split.')
@click.option('--min-shape', help='Smallest input HxW of a dynamic-shape file (multiples of its '
              'size divisor) [padded to a divisor: one divisor per side; else the input size].')
@click.option('--opt-shape', help='Input HxW TensorRT tunes for [the input size, rounded up to '
              'the divisor].')
@click.option('--max-shape', help='Largest input HxW [every canvas the preprocessing makes: '
              'the long side rounded up on both sides for scale resizing].')
@click.option('--workspace', 'workspace_mb', type=click.IntRange(min=1),
              help="Builder workspace limit in MB [TensorRT's default: the GPU's memory].")
@click.option('--timing-cache', type=click.Path(dir_okay=False),
              help='Timing cache file: loaded if present, saved after the build.')
@click.option('--device-id', type=click.IntRange(min=0), default=0, show_default=True,
              help='CUDA device to build for.')
@max_pixels_option
@no_overwrite_option
def build_engine(onnx_path, output, fp16, int8, calib_images, min_batch, opt_batch, max_batch,
                 min_shape, opt_shape, max_shape, workspace_mb, timing_cache, device_id,
                 max_pixels, no_overwrite) -> None:
    """Build a TensorRT engine from an ONNX file made by `detdeploy export`.

    The engine is a plain TensorRT plan (trtexec and Triton load it); classes, preprocessing and
    build facts go to a JSON file next to it (model.engine -> model.engine.json), which
    `detdeploy infer model.engine` needs.
    """
    from detdeploy.core.fileio import (check_input_file, check_output_file,
                                       refuse_overwriting_inputs)
    from detdeploy.runtimes.tensorrt_build import BuildOptions
    from detdeploy.runtimes.tensorrt_build import build_engine as build
    from detdeploy.runtimes.tensorrt_common import sidecar_path

    check_input_file(onnx_path, 'model file')
    output = output or str(Path(onnx_path).with_suffix('.engine'))
    if os.path.realpath(output) == os.path.realpath(onnx_path):
        raise DetdeployError(f'-o {output} would replace the ONNX file it is built from; give '
                             'another name (e.g. MODEL.engine)')
    check_output_file(output, overwrite=not no_overwrite, flag='-o')
    check_output_file(sidecar_path(output), overwrite=not no_overwrite)
    if timing_cache:
        check_output_file(timing_cache, flag='--timing-cache')
    images: tuple[Path, ...] = ()
    if calib_images:
        from detdeploy.inference.batch import collect_images
        images = tuple(collect_images([calib_images]))
    refuse_overwriting_inputs(
        [('-o', output), ('-o (its sidecar)', sidecar_path(output))]
        + ([('--timing-cache', timing_cache)] if timing_cache else []),
        [('MODEL.onnx', onnx_path)] + [('--calib-images', path) for path in images])
    options = BuildOptions(fp16=fp16, int8=int8, calibration_images=images, min_batch=min_batch,
                           opt_batch=opt_batch, max_batch=max_batch,
                           min_shape=parse_shape(min_shape, '--min-shape'),
                           opt_shape=parse_shape(opt_shape, '--opt-shape'),
                           max_shape=parse_shape(max_shape, '--max-shape'),
                           workspace_mb=workspace_mb,
                           timing_cache=timing_cache, device_id=device_id,
                           overwrite=not no_overwrite, max_pixels=apply_max_pixels(max_pixels))
    report = build(onnx_path, output, options)
    build_info = report.sidecar.build
    if report.warnings:
        for warning in report.warnings[:MAX_WARNINGS_SHOWN]:
            click.echo(f'warning: {warning}', err=True)
        if len(report.warnings) > MAX_WARNINGS_SHOWN:
            click.echo(f'warning: ... {len(report.warnings) - MAX_WARNINGS_SHOWN} more from '
                       'TensorRT', err=True)
    click.echo(f'wrote {report.engine_path} ({report.size_bytes / 1e6:.1f} MB, '
               f'{build_info.precision}, TensorRT {build_info.tensorrt_version}, '
               f'{build_info.device_name}) in {report.seconds:.1f} s')
    click.echo(f'  metadata: {report.sidecar_path}')
    click.echo(f'  batch: {build_info.batch_profile.describe()}; height x width: '
               f'{build_info.hw_profile.describe()}')
    if report.timing_cache is not None:
        state = 'loaded and updated' if report.timing_cache_loaded else 'new'
        click.echo(f'  timing cache: {report.timing_cache} ({state})')
