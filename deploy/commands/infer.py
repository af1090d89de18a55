"""`detdeploy infer`: detect objects in images with a PyTorch model or an exported file."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from detdeploy.core.errors import DetdeployError

from .common import (FiniteFloat, ThreadCount, apply_max_pixels, foreign_model_options, load_model,
                     max_pixels_option, model_overrides, nms_line, no_overwrite_option,
                     parse_input_size, pytorch_model_options, refuse_weight_flags,
                     split_model_and_images, torch_device, weight_inputs)


@click.command()
@click.argument('inputs', nargs=-1, required=True, metavar='[MODEL] IMAGES_DIRS_GLOBS_VIDEOS...')
@pytorch_model_options
@click.option('--backend', type=click.Choice(['auto', 'torch', 'ort', 'trt', 'openvino',
                                            'openvino-f32', 'openvino-bf16']), default='auto',
              show_default=True, help='auto: ort for .onnx files, trt for .engine files, torch '
              "for registry names; openvino runs .onnx files at the CPU's default precision "
              '(bf16 where the CPU has it), openvino-f32 / -bf16 at that precision.')
@click.option('--device', help='torch: cpu, cuda, cuda:N; ort: cpu, cuda, cuda:N, tensorrt; trt: '
              'cuda, cuda:N (always a GPU) [default: cpu; trt: cuda].')
@click.option('--device-id', type=click.IntRange(min=0),
              help='ort (cuda, tensorrt) and trt: CUDA device [default: 0, or N of cuda:N].')
@click.option('--strict-device', is_flag=True,
              help='ort: fail instead of falling back to the CPU when --device is unusable.')
@click.option('--threads', type=ThreadCount(), help='ort: intra-op threads.')
@click.option('--trt-fp16', is_flag=True,
              help='ort --device tensorrt: let the TensorRT provider use FP16.')
@click.option('--trt-cache-dir', type=click.Path(file_okay=False),
              help='ort --device tensorrt: engine and timing cache directory.')
@click.option('--out', 'out_dir', type=click.Path(file_okay=False),
              help='Write <image>.json, <image>.png and coco_results.json here; without it, '
              'print a summary only.')
@click.option('--nms-preset', type=click.Choice(['deploy', 'eval']), default='deploy',
              show_default=True, help="Registry models: the model's NMS settings, as `export "
              "--nms-preset` (a file carries its own, fixed at export).")
@click.option('--agnostic-nms', is_flag=True, help='Registry models: class-agnostic NMS (one '
              'box per object); a file has it when exported with `export --agnostic-nms`.')
@click.option('--score-thr', type=FiniteFloat(0, 1),
              help='Keep detections scoring strictly above this, as the NMS score threshold '
              "does (default: all the model returns).")
@click.option('--recursive', '-r', is_flag=True,
              help='Search folders and their subfolders for images (and videos).')
@click.option('--ann', 'ann_file', type=click.Path(dir_okay=False),
              help="COCO annotation file listing the images: coco_results.json then uses its "
              'image_id and category_id, so pycocotools scores it against that dataset '
              '[default: image_id = position in this run, category_id = class index, from 0].')
@click.option('--show-thr', type=FiniteFloat(0, 1), default=0.3, show_default=True,
              help='Draw detections scoring strictly above this in the PNGs.')
@click.option('--batch', 'batch_size', type=click.IntRange(min=1), default=1, show_default=True,
              help='Images per forward pass.')
@click.option('--input-size', help="Network input, 640 or HxW (multiples of the model's size "
              'divisor, 32 for RTMDet): registry models and --dynamic-shape files [default: '
              "the model's or the file's].")
@foreign_model_options
@max_pixels_option
@no_overwrite_option
def infer(inputs, model_name, checkpoint, class_names, trust_checkpoint, backend, device,
          device_id, strict_device, threads, trt_fp16, trt_cache_dir, out_dir, nms_preset,
          agnostic_nms, score_thr, recursive, ann_file, show_thr, batch_size, input_size, mean,
          std, channel_order, pad_value, max_pixels, no_overwrite) -> None:
    """Detect objects in images with a registry model (PyTorch), an exported .onnx file (ONNX
    Runtime) or a TensorRT .engine from `detdeploy build-engine`.

    MODEL is a .onnx or .engine file or a registry name; without it, --model or rtmdet-tiny.
    A registry model and its exported file give the same detections with default flags: both
    use the model's deploy NMS preset (a file's settings are those it was exported with).
    An .onnx file from another tool runs if its outputs are num_dets, boxes, scores, labels;
    give its classes and preprocessing (--class-names, --mean, --std, --channel-order).
    An image that cannot be read is skipped with a warning; the run then exits with code 2.

    Inputs: image files, folders (with --recursive, their subfolders too), quoted globs
    ('imgs/*.png', 'data/**/*.jpg') and video files (.mp4, .avi, .mov, .mkv, .webm: decoded with
    PyAV; with --out, written back as <name>.mp4 with the boxes drawn and <name>.json per frame).
    """
    from detdeploy.core.fileio import check_output_dir, refuse_existing, refuse_overwriting_inputs
    from detdeploy.inference.batch import SkippedImage, collect_images, output_paths, run_infer
    from detdeploy.runtimes.open import backend_for_file, is_model_file, open_model_file

    from detdeploy.inference.video import is_video, run_video

    model, images = split_model_and_images(inputs, model_name)
    all_inputs = collect_images(images, recursive=recursive, video=True)
    video_paths = [path for path in all_inputs if is_video(path)]
    image_paths = [path for path in all_inputs if not is_video(path)]
    if ann_file is not None and video_paths:
        raise DetdeployError('--ann matches image files to a COCO annotation file; it does not '
                             f'take videos ({video_paths[0]})')
    video_stems = _video_stems(video_paths, image_paths)
    if out_dir is not None:
        check_output_dir(out_dir)
        planned = (output_paths(out_dir, image_paths) if image_paths else []) + [
            Path(out_dir) / f'{stem}.{suffix}' for stem in video_stems
            for suffix in ('mp4', 'json')]
        refuse_overwriting_inputs(
            [('--out', path) for path in planned],
            [('video' if is_video(path) else 'image', path) for path in all_inputs]
            + [('model', model)]
            + [('--ann', ann_file)] + weight_inputs(checkpoint, class_names))
        if no_overwrite:            # before a model is loaded
            refuse_existing(planned)
    limit = apply_max_pixels(max_pixels)
    is_file = is_model_file(model)
    if backend == 'torch' or (backend == 'auto' and not is_file):
        if is_file:
            raise DetdeployError(f'--backend torch needs a registry name, got {model}')
        given = model_overrides(mean=mean, std=std, channel_order=channel_order,
                                pad_value=pad_value).preprocessing_flags()
        if given:
            raise DetdeployError(f'{", ".join(given)}: only for .onnx files from other tools; '
                                 f'{model} has its own preprocessing')
        from detdeploy.models.registry import get_spec
        from detdeploy.runtimes.torch_backend import TorchBackend
        device = torch_device(device or 'cpu')
        input_hw = parse_input_size(input_size)
        get_spec(model).preprocessing.with_input_size(input_hw)    # before loading any weights
        detector = load_model(model, checkpoint, class_names, trust_checkpoint,
                              'uses random weights (detections are meaningless)')
        config = detector.spec.preprocessing.with_input_size(input_hw)
        nms = dataclasses.replace(detector.spec.nms(nms_preset), class_agnostic=agnostic_nms)
        runner = TorchBackend(detector, nms=nms, device=device, preprocess_config=config)
    else:
        if not is_file:
            raise DetdeployError(f"--backend {backend} needs an .onnx or .engine file, got "
                                 f"'{model}'")
        refuse_weight_flags(model, checkpoint, trust_checkpoint)
        chosen = backend_for_file(model, backend)
        device, device_id = _file_device(chosen, device, device_id)
        runner = open_model_file(model, chosen, device=device, device_id=device_id,
                                 threads=threads, strict_device=strict_device,
                                 trt_fp16=trt_fp16, trt_cache_dir=trt_cache_dir,
                                 overrides=model_overrides(class_names, input_size, mean, std,
                                                           channel_order, pad_value))
        if runner.fallback:
            click.echo(f'warning: {runner.fallback}', err=True)
        file_nms = runner.metadata.nms
        if agnostic_nms and not (file_nms and file_nms.class_agnostic):
            raise DetdeployError(f'--agnostic-nms: {model} has per-class NMS in its graph; '
                                 'export it with `detdeploy export --agnostic-nms`')
    click.echo(nms_line(runner.metadata))
    ids = None
    if ann_file is not None:
        from detdeploy.inference.coco_ids import dataset_ids
        ids = dataset_ids(ann_file, image_paths, runner.class_names)
        for warning in ids.warnings:
            click.echo(f'warning: {warning}', err=True)
    from detdeploy.core.progress import Progress
    for video, stem in zip(video_paths, video_stems):
        with Progress(f'infer {video}', unit='frames') as progress:
            result = run_video(runner, video, Path(out_dir) if out_dir else None, stem,
                               score_thr, show_thr, batch_size, overwrite=not no_overwrite,
                               progress=progress.update)
        written = f' -> {result.video_path}, {result.json_path}' if result.video_path else ''
        click.echo(f'{video}: {result.frames} frames, {result.detections} detections, '
                   f'{result.shown} at score > {show_thr:g}, {result.milliseconds:.0f} ms'
                   f'{written}')
    if not image_paths:
        return
    # lines every 10 s off a terminal, for long runs only: the image lines follow anyway
    with Progress('infer', total=len(image_paths), final_line=False,
                  interval_s=10 if len(image_paths) >= 8 else float('inf')) as progress:
        report = run_infer(runner, image_paths, out_dir, score_thr, show_thr, batch_size,
                           max_pixels=limit, overwrite=not no_overwrite, ids=ids,
                           progress=progress.update)
    for event in sorted(report.images + report.skipped, key=lambda event: event.position):
        if isinstance(event, SkippedImage):
            click.echo(f'warning: {event.reason}; skipped', err=True)
        else:
            click.echo(image_line(event, show_thr))
    if report.results_path:
        click.echo(f'all detections (COCO results format): {report.results_path} '
                   f'({report.ids_note})')
    if report.skipped:
        raise DetdeployError(f'{len(report.skipped)} of {len(image_paths)} images could not be '
                             'read (warnings above); the others were processed')


def _video_stems(videos: list[Path], images: list[Path]) -> list[str]:
    """Output names of videos: their stems, numbered where an image or video has it."""
    taken = {image.stem for image in images} | {'coco_results'}
    stems = []
    for video in videos:
        stem, count = video.stem, 1
        while stem in taken:
            stem, count = f'{video.stem}_{count}', count + 1
        taken.add(stem)
        stems.append(stem)
    return stems


def image_line(image, show_thr: float) -> str:
    """`a.png: 3 square, 1 circle (91 detections, 4 at score > 0.3), 12 ms -> a.json, a.png`"""
    shown = ', '.join(f'{count} {name}' for name, count in image.shown_per_class.items())
    written = f' -> {image.json_path}, {image.png_path}' if image.json_path else ''
    return (f'{image.source}: {shown or "nothing"} ({image.num_detections} detections, '
            f'{image.num_shown} at score > {show_thr:g}), {image.milliseconds:.0f} ms{written}')


def _file_device(backend: str, device: str | None, device_id: int | None) -> tuple[str, int]:
    """--device and --device-id for ONNX Runtime or TensorRT: `cuda:N` sets the device id."""
    name, _, index = (device or ('cuda' if backend == 'trt' else 'cpu')).partition(':')
    if index:
        if name != 'cuda' or not index.isdigit():
            raise DetdeployError(f"unknown device '{device}': use cpu, cuda, cuda:N or tensorrt")
        if device_id is not None and device_id != int(index):
            raise DetdeployError(f'--device {device} and --device-id {device_id} disagree')
        device_id = int(index)
    if backend == 'trt' and name not in ('cuda', 'tensorrt'):
        raise DetdeployError(f"a TensorRT engine runs on an NVIDIA GPU only, not --device "
                             f"'{device}'; for the CPU run the .onnx file with ONNX Runtime")
    return name, device_id or 0
