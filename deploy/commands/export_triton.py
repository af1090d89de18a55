"""`detdeploy export-triton`: a Triton Inference Server model repository for an exported file."""
from __future__ import annotations

import click

from .common import max_pixels_option


@click.command('export-triton')
@click.argument('model', type=click.Path(exists=True, dir_okay=False))
@click.option('-o', '--output', 'repository', required=True, type=click.Path(file_okay=False),
              help='Model repository folder (created; other models in it are left alone).')
@click.option('--name', help='Ensemble name; the parts are NAME_preprocess, NAME_model and '
              'NAME_postprocess [default: the file name without suffix].')
@click.option('--max-batch', type=click.IntRange(min=1), help="max_batch_size [default: 8 for "
              "a dynamic-batch .onnx, the profile's maximum for an .engine, 1 for batch 1].")
@click.option('--queue-delay-us', type=click.IntRange(min=0), default=2000, show_default=True,
              help='Dynamic batching: how long Triton waits to fill a batch.')
@click.option('--overwrite', is_flag=True, help='Replace model folders of the same names.')
@max_pixels_option
def export_triton(model, repository, name, max_batch, queue_delay_us, overwrite,
                  max_pixels) -> None:
    """Write a Triton model repository for MODEL (.onnx from `detdeploy export`, or an .engine
    with its .json sidecar): the model (onnxruntime_onnx or tensorrt_plan), Python-backend
    preprocessing and post-processing that import detdeploy's numpy code, and an ensemble
    NAME taking an encoded image (IMAGE, bytes) and answering num_dets, boxes (original-image
    pixels), scores and labels, as `infer` does.

    max_batch_size and dynamic batching follow the file's batch axis; dims come from the graph
    or the sidecar. Each config.pbtxt is checked with Triton's protobuf when tritonclient is
    installed. Triton's Python backend needs detdeploy, numpy and Pillow in its environment.
    """
    from detdeploy.serving.triton import export_triton as write
    report = write(model, repository, name, max_batch, queue_delay_us, max_pixels or None,
                   overwrite)
    for part in report.models:
        click.echo(f'{report.repository / part}/config.pbtxt')
    click.echo(f'ensemble {report.ensemble}: max_batch_size {report.max_batch_size}, '
               + ('configs parsed with Triton\'s model_config protobuf' if report.validated else
                  'configs NOT checked (pip install --no-deps tritonclient to check them)'))
