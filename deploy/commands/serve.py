"""`detdeploy serve`: an exported model behind an HTTP endpoint on Ray Serve (the `serve` extra)."""
from __future__ import annotations

import click

from detdeploy.runtimes.open import FILE_BACKENDS

from .common import (FiniteFloat, apply_max_pixels, foreign_model_options, max_pixels_option,
                     model_overrides)


def model_file_options(command):
    """--backend, --device, --device-id, --threads: how each Ray worker opens the file."""
    command = click.option('--threads', type=click.IntRange(min=1), help=(
        'ort and openvino: threads per worker [default: the CPUs reserved per worker, '
        'rounded up].'))(command)
    command = click.option('--device-id', type=click.IntRange(min=0), default=0,
                           show_default=True, help='ort (cuda) and trt: CUDA device.')(command)
    command = click.option('--device', type=click.Choice(['cpu', 'cuda', 'tensorrt']),
                           default='cpu', show_default=True, help='ort: execution provider '
                           '(a .engine always runs on CUDA).')(command)
    command = click.option('--backend', type=click.Choice(FILE_BACKENDS),
                           default='auto', show_default=True, help=(
                               'auto: ort for .onnx, trt for .engine; openvino (-f32, -bf16: '
                               'its precision hint) runs an .onnx file with OpenVINO on the '
                               'CPU.'))(command)
    command = click.option('--class-names', help=(
        'Class names, comma-separated or a text file with one per line (files from other '
        "tools; renames a detdeploy file's classes)."))(command)
    command = click.option('--input-size', help=(
        '--dynamic-shape files and files from other tools: network input, 640 or HxW.'))(command)
    command = click.option('--gpus', 'gpus_per_worker', type=FiniteFloat(min=0), help=(
        'GPUs Ray reserves for each replica or actor (fractions share one) [default: 1 for '
        '--device cuda/tensorrt and .engine files, else 0].'))(command)
    return click.option('--address', help=(
        "Join this Ray cluster ('auto': the one `ray start` runs here; or HOST:PORT) instead "
        'of starting a local one on 127.0.0.1.'))(command)


def gpus_for(model: str, backend: str, device: str, given: float | None) -> float:
    """GPUs each Ray worker reserves: what was given, else one when the model runs on a GPU
    (Ray then points each worker's CUDA_VISIBLE_DEVICES at its own)."""
    if given is not None:
        return given
    on_gpu = device != 'cpu' or backend == 'trt' or str(model).lower().endswith(
        ('.engine', '.plan'))
    return 1.0 if on_gpu else 0.0


def model_to_open(model, backend, device, device_id, threads, cpus, class_names, input_size,
                  mean, std, channel_order, pad_value):
    """The `ModelToOpen` workers get, after opening it once here: a bad file or flag is a
    one-line error before any worker starts. Returns it with the backend opened here."""
    import math

    from detdeploy.serving.ray_cluster import ModelToOpen
    target = ModelToOpen(str(model), backend, device, device_id,
                         threads or max(1, math.ceil(cpus)),
                         model_overrides(class_names, input_size, mean, std, channel_order,
                                         pad_value))
    return target, target.open()


@click.command()
@click.argument('model', type=click.Path(exists=True, dir_okay=False))
@click.option('--host', default='127.0.0.1', show_default=True,
              help='Address to listen on; 0.0.0.0 opens the endpoint to the network.')
@click.option('--port', type=click.IntRange(1, 65535), default=8000, show_default=True,
              help='HTTP port of the endpoint.')
@click.option('--replicas', type=click.IntRange(min=1), default=1, show_default=True,
              help='Copies of the model, each its own Ray actor and session.')
@click.option('--cpus-per-replica', type=FiniteFloat(min=0, min_open=True), default=1.0,
              show_default=True, help='CPUs Ray reserves for each replica.')
@click.option('--max-batch', type=click.IntRange(min=1), help='Largest dynamic batch '
              "[default: a static-batch file's own size, else 8].")
@click.option('--batch-wait-ms', type=FiniteFloat(min=0), default=10.0, show_default=True,
              help='How long a replica waits to fill a batch.')
@click.option('--max-bytes', type=click.IntRange(min=1), default=20 * 1024 * 1024,
              show_default=True, help='Largest request body (413 above it).')
@click.option('--score-thr', type=FiniteFloat(0, 1),
              help='Answer with detections scoring strictly above this [default: all].')
@model_file_options
@foreign_model_options
@max_pixels_option
def serve(model, host, port, replicas, cpus_per_replica, max_batch, batch_wait_ms, max_bytes,
          score_thr, address, gpus_per_worker, class_names, input_size, backend, device,
          device_id, threads, mean, std, channel_order, pad_value, max_pixels) -> None:
    """Serve an exported MODEL (.onnx on ONNX Runtime or OpenVINO, or .engine where TensorRT
    is installed) over HTTP on Ray Serve, until Ctrl-C or SIGTERM (then requests in flight
    finish and it exits 0).

    POST /detect with the image as the body (image/* or application/octet-stream) or as the
    'image' file of a multipart form: the answer is the JSON `infer` writes per image. GET
    /health describes the model. Bad uploads get 4xx (400 undecodable, 413 too large, 415
    wrong content type) with a one-line JSON error; failures a 500 without a traceback.
    Needs the serve extra: pip install 'detdeploy[serve]'.
    """
    from detdeploy.serving.ray_cluster import import_ray
    import_ray()                                    # the extra's one-line error, early
    from detdeploy.serving.ray_serve import ServeOptions, batch_size_for, serve_until_signal
    limit = apply_max_pixels(max_pixels)
    target, opened = model_to_open(model, backend, device, device_id, threads,
                                     cpus_per_replica, class_names, input_size, mean, std,
                                     channel_order, pad_value)
    metadata = opened.metadata
    options = ServeOptions(host, port, replicas, cpus_per_replica,
                           gpus_for(model, backend, device, gpus_per_worker), max_batch,
                           batch_wait_ms, max_bytes, limit, score_thr)
    batch = batch_size_for(metadata, max_batch, model)

    def ready(url: str) -> None:
        click.echo(f'serving {model} ({metadata.arch}, {replicas} replica'
                   f'{"s" if replicas > 1 else ""}, batches of up to {batch}, wait '
                   f'{batch_wait_ms:g} ms)')
        click.echo(f'POST {url}/detect  GET {url}/health  (Ctrl-C stops)')

    report = serve_until_signal(target, options, metadata, address, on_ready=ready)
    click.echo(f'stopped ({report.stopped_by})')
