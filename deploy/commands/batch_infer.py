"""`detdeploy batch-infer`: `infer`'s folder-to-COCO-results job across Ray Data actors (the
`serve` extra)."""
from __future__ import annotations

import click

from .common import (FiniteFloat, apply_max_pixels, foreign_model_options, max_pixels_option,
                     no_overwrite_option)
from .serve import gpus_for, model_file_options, model_to_open


@click.command('batch-infer')
@click.argument('model', type=click.Path(exists=True, dir_okay=False))
@click.argument('images', nargs=-1, required=True)
@click.option('-o', '--out', 'out_dir', required=True, type=click.Path(file_okay=False),
              help='Write coco_results.json (and <image>.png with --png) here.')
@click.option('--actors', type=click.IntRange(min=1), default=2, show_default=True,
              help='Ray actors, each with its own copy of the model.')
@click.option('--cpus-per-actor', type=FiniteFloat(min=0, min_open=True), default=1.0,
              show_default=True, help='CPUs Ray reserves for each actor.')
@click.option('--batch', 'batch_size', type=click.IntRange(min=1), default=4, show_default=True,
              help='Images per actor call (forward passes hold at most this many).')
@click.option('--png', is_flag=True, help='Also draw <image>.png per image (as infer --out).')
@click.option('--score-thr', type=FiniteFloat(0, 1),
              help='Keep detections scoring strictly above this [default: all].')
@click.option('--show-thr', type=FiniteFloat(0, 1), default=0.3, show_default=True,
              help='Draw detections scoring strictly above this in the PNGs.')
@model_file_options
@foreign_model_options
@max_pixels_option
@no_overwrite_option
def batch_infer(model, images, out_dir, actors, cpus_per_actor, batch_size, png, score_thr,
                show_thr, address, gpus_per_worker, class_names, input_size, backend, device,
                device_id, threads, mean, std, channel_order, pad_value, max_pixels,
                no_overwrite) -> None:
    """Detect objects in IMAGES (files and folders) with an exported MODEL on Ray Data: the
    images are read and detected by --actors workers, and one coco_results.json (as `infer
    --out` writes it, same detections) is written atomically; --png adds the drawn images.

    A separate command rather than `infer --engine ray`: it runs exported files only, and its
    flags (actors, CPUs, cluster address) are not infer's. On a cluster (--address), the image
    paths must be readable at the same place on every node. Unreadable images are skipped
    with a warning and the run exits with code 2.
    Needs the serve extra: pip install 'detdeploy[serve]'.
    """
    from detdeploy.core.errors import DetdeployError
    from detdeploy.core.fileio import check_output_dir, refuse_existing, refuse_overwriting_inputs
    from detdeploy.inference.batch import collect_images
    from detdeploy.serving.ray_cluster import import_ray
    image_paths = collect_images(images)
    check_output_dir(out_dir)
    import_ray()
    from detdeploy.serving.ray_batch import BatchInferOptions, output_paths, run_batch_infer
    refuse_overwriting_inputs([('--out', path) for path in output_paths(out_dir, image_paths, png)],
                              [('image', path) for path in image_paths] + [('model', model)])
    if no_overwrite:                # before a model is loaded
        refuse_existing(output_paths(out_dir, image_paths, png))
    limit = apply_max_pixels(max_pixels)
    target, opened = model_to_open(model, backend, device, device_id, threads, cpus_per_actor,
                                     class_names, input_size, mean, std, channel_order,
                                     pad_value)
    options = BatchInferOptions(actors, batch_size, cpus_per_actor,
                                gpus_for(model, backend, device, gpus_per_worker), score_thr,
                                show_thr, png, limit, overwrite=not no_overwrite)
    report = run_batch_infer(target, image_paths, out_dir, options,
                             backend_name=opened.name, address=address)
    for image in report.images:
        drawn = f' -> {image.png_path}' if image.png_path else ''
        click.echo(f'{image.source}: {image.num_detections} detections, '
                   f'{image.num_shown} at score > {show_thr:g}{drawn}')
    for skipped in report.skipped:
        click.echo(f'warning: {skipped.reason}; skipped', err=True)
    click.echo(f'all detections (COCO results format): {report.results_path}')
    if report.skipped:
        raise DetdeployError(f'{len(report.skipped)} of {len(image_paths)} images could not be '
                             'read (warnings above); the others were processed')
