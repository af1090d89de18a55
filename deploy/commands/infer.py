"""`detdeploy infer`: detect objects in images with a PyTorch model or an exported file."""
from __future__ import annotations

import click

from detdeploy.errors import DetdeployError

from .common import load_model, pytorch_model_options, split_model_and_images, torch_device


@click.command()
@click.argument('inputs', nargs=-1, required=True, metavar='[MODEL] IMAGES_OR_DIRS...')
@pytorch_model_options
@click.option('--backend', type=click.Choice(['auto', 'torch', 'ort']), default='auto',
              show_default=True, help='auto: ort for .onnx files, torch for registry names.')
@click.option('--device', default='cpu', show_default=True,
              help='torch: cpu, cuda, cuda:N; ort: cpu, cuda, tensorrt.')
@click.option('--strict-device', is_flag=True,
              help='ort: fail instead of falling back to the CPU when --device is unusable.')
@click.option('--threads', type=click.IntRange(min=1), help='ort: intra-op threads.')
@click.option('--out', 'out_dir', type=click.Path(file_okay=False),
              help='Write <image>.json, <image>.png and coco_results.json here; without it, '
              'print a summary only.')
@click.option('--score-thr', type=click.FloatRange(0, 1),
              help="Keep detections scoring at least this (default: all the model returns).")
@click.option('--show-thr', type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help='Draw detections scoring at least this in the PNGs.')
@click.option('--batch', 'batch_size', type=click.IntRange(min=1), default=1, show_default=True,
              help='Images per forward pass.')
def infer(inputs, model_name, checkpoint, class_names, trust_checkpoint, backend, device,
          strict_device, threads, out_dir, score_thr, show_thr, batch_size) -> None:
    """Detect objects in images with a registry model (PyTorch) or an exported .onnx file.

    MODEL is a .onnx file from `detdeploy export` or a registry name; without it, --model
    or rtmdet-tiny.
    """
    from detdeploy.infer import collect_images, run_infer

    model, images = split_model_and_images(inputs, model_name)
    image_paths = collect_images(images)
    is_file = model.lower().endswith('.onnx')
    chosen = backend if backend != 'auto' else ('ort' if is_file else 'torch')
    if chosen == 'ort':
        if not is_file:
            raise DetdeployError(f"--backend ort needs an .onnx file, got '{model}'")
        from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend, OrtOptions
        runner = OnnxRuntimeBackend(model, OrtOptions(device=device, threads=threads,
                                                      strict_device=strict_device))
        if runner.fallback:
            click.echo(f'warning: {runner.fallback}', err=True)
    else:
        if is_file:
            raise DetdeployError(f'--backend torch needs a registry name, got {model}')
        from detdeploy.runtimes.torch_backend import TorchBackend
        device = torch_device(device)
        detector = load_model(model, checkpoint, class_names, trust_checkpoint,
                              'uses random weights (detections are meaningless)')
        runner = TorchBackend(detector, device=device)
    report = run_infer(runner, image_paths, out_dir, score_thr, show_thr, batch_size)
    for image in report.images:
        written = f' -> {image.json_path}, {image.png_path}' if image.json_path else ''
        click.echo(f'{image.source}: {image.num_detections} detections, '
                   f'{image.num_shown} at score >= {show_thr:g}{written}')
    if report.results_path:
        click.echo(f'all detections (COCO results format): {report.results_path}')
