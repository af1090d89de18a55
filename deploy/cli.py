"""The `detdeploy` command line: thin click commands that parse, call a pipeline, and print.

User errors (`DetdeployError`) become one line on stderr and exit code 2; `--debug` shows the
traceback instead. Exit codes: 0 ok, 1 a check failed, 2 bad input.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from detdeploy import __version__
from detdeploy.errors import DetdeployError

EXIT_BAD_INPUT = 2
DEFAULT_MODEL = 'rtmdet'


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--debug', is_flag=True, help='Show full tracebacks for errors.')
@click.version_option(__version__, prog_name='detdeploy')
def cli(debug: bool) -> None:
    """Export PyTorch detectors to ONNX / TensorRT and check them against PyTorch."""


def pytorch_model_options(command):
    """--model, --checkpoint, --class-names and --trust-checkpoint, for commands that load a
    PyTorch model."""
    command = click.option('--class-names', help=(
        'Class names, comma-separated or a text file with one per line; overrides the '
        "checkpoint's (and, without a checkpoint, sets the number of classes)."))(command)
    command = click.option('--trust-checkpoint', is_flag=True, help=(
        'Allow checkpoints that need arbitrary unpickling (only for trusted files).'))(command)
    command = click.option('--checkpoint', type=click.Path(dir_okay=False), help=(
        'MMDetection-format or plain state-dict checkpoint (.pth).'))(command)
    return click.option('--model', 'model_name', help=(
        'Registry name: rtmdet (= rtmdet-tiny, the default), rtmdet-s, -m, -l, -x.'))(command)


def parse_class_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [name.strip() for name in text.split(',') if name.strip()]
    if not names:
        raise DetdeployError(f"--class-names '{text}' names no classes")
    return tuple(names)


def load_model(model_name: str, checkpoint: str | None, class_names: str | None,
               trust_checkpoint: bool, purpose: str):
    """The detector; without a checkpoint, say in one line that its weights are random."""
    from detdeploy.models import load_detector
    detector = load_detector(model_name or DEFAULT_MODEL, checkpoint,
                             parse_class_names(class_names), trust=trust_checkpoint)
    if checkpoint is None:
        click.echo(f'note: no --checkpoint given, {detector.spec.name} {purpose}', err=True)
    return detector


def split_model_and_images(inputs: tuple[str, ...], model_name: str | None
                           ) -> tuple[str, list[str]]:
    """MODEL IMAGES... or IMAGES... (with --model or the default model)."""
    def names_a_model(text: str) -> bool:
        if text.lower().endswith('.onnx'):
            return True
        from detdeploy.models.registry import model_names    # imports torch: not for .onnx
        return text.lower() in model_names()

    if model_name is None and inputs and names_a_model(inputs[0]):
        model, images = inputs[0], list(inputs[1:])
    else:
        model, images = model_name or DEFAULT_MODEL, list(inputs)
    if not images:
        raise DetdeployError('no images given: detdeploy infer [MODEL] IMAGES_OR_DIRS...')
    return model, images


@cli.command()
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
        device = _torch_device(device)
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


def _parse_input_size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = text.lower().split('x')
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise DetdeployError(f"--input-size '{text}': give one side (640) or HEIGHTxWIDTH (480x640)")
    return (sides[0], sides[-1])


@cli.command()
@pytorch_model_options
@click.option('-o', '--output', type=click.Path(dir_okay=False),
              help='Output file [default: <model>.onnx].')
@click.option('--nms', 'nms_mode', type=click.Choice(['onnx', 'trt', 'none']), default='onnx',
              show_default=True, help='onnx: standard NonMaxSuppression; trt: EfficientNMS_TRT '
              'plugin; none: per-anchor boxes and scores.')
@click.option('--nms-preset', type=click.Choice(['deploy', 'eval']), default='deploy',
              show_default=True, help='deploy: score 0.05, pre-top-k 1000, IoU 0.65, max-det 100; '
              "eval: the model's test config (0.001, 30000, 0.65, 300).")
@click.option('--score-thr', type=click.FloatRange(0, 1), help='Override the preset.')
@click.option('--iou-thr', type=click.FloatRange(0, 1), help='Override the preset.')
@click.option('--pre-top-k', type=click.IntRange(min=1),
              help='Override the preset: (anchor, class) pairs kept per pyramid level.')
@click.option('--max-det', type=click.IntRange(min=1), help='Override the preset.')
@click.option('--batch', type=click.IntRange(min=1), default=1, show_default=True,
              help='Static batch size.')
@click.option('--dynamic-batch', is_flag=True, help='Symbolic batch axis (overrides --batch).')
@click.option('--dynamic-shape', is_flag=True,
              help='Symbolic height and width (multiples of 32).')
@click.option('--input-size', help='Network input: 640 or HEIGHTxWIDTH [default: the model\'s].')
@click.option('--opset', type=click.IntRange(min=18), help="ONNX opset [default: the exporter's].")
@click.option('--no-simplify', is_flag=True, help='Skip onnxsim.')
@click.option('--trt-plugin-domain', type=click.Choice(['TRT', 'trt.plugins']), default='TRT',
              show_default=True, help="EfficientNMS_TRT node domain: TRT for TensorRT's parser, "
              "trt.plugins for ONNX Runtime's TensorRT provider.")
def export(model_name, checkpoint, class_names, trust_checkpoint, output, nms_mode, nms_preset,
           score_thr, iou_thr, pre_top_k, max_det, batch, dynamic_batch, dynamic_shape, input_size,
           opset, no_simplify, trt_plugin_domain) -> None:
    """Export a detector to ONNX with NMS inside the graph."""
    import dataclasses

    from detdeploy.export.exporter import ExportOptions, export_onnx
    from detdeploy.models import DEPLOY_NMS, EVAL_NMS

    input_hw = _parse_input_size(input_size)
    nms = EVAL_NMS if nms_preset == 'eval' else DEPLOY_NMS
    overrides = {'score_thr': score_thr, 'iou_thr': iou_thr, 'pre_top_k': pre_top_k,
                 'max_det': max_det}
    nms = dataclasses.replace(nms, **{k: v for k, v in overrides.items() if v is not None})
    detector = load_model(model_name, checkpoint, class_names, trust_checkpoint,
                          'is exported with random weights')
    options = ExportOptions(nms_mode=nms_mode, nms=nms, batch=batch, dynamic_batch=dynamic_batch,
                            dynamic_shape=dynamic_shape, input_hw=input_hw, opset=opset,
                            simplify=not no_simplify, trt_plugin_domain=trt_plugin_domain)
    report = export_onnx(detector, output or f'{detector.spec.name}.onnx', options)
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
        click.echo(f'  nms: {nms_mode}, score > {nms.score_thr:g}, top {nms.pre_top_k} pairs per '
                   f'level, IoU {nms.iou_thr:g}, max {nms.max_det} per image')


def _torch_device(device: str) -> str:
    import torch
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise DetdeployError(f"device '{device}' requested but PyTorch sees no CUDA GPU")
    try:
        torch.device(device)
    except RuntimeError:
        raise DetdeployError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    return device


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning user errors into a one-line message and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    try:
        code = cli.main(args=args, prog_name='detdeploy', standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo('aborted', err=True)
        code = 130
    except DetdeployError as exc:
        if '--debug' in args:
            raise
        click.echo(f'error: {exc}', err=True)
        code = EXIT_BAD_INPUT
    sys.exit(code if isinstance(code, int) else 0)
