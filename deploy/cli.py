"""The `detdeploy` command line: thin click commands that parse, call a pipeline, and print.

User errors (`DetdeployError`) become one line on stderr and exit code 2; `--debug` shows the
traceback instead. Exit codes: 0 ok, 1 a check failed, 2 bad input.
"""
from __future__ import annotations

import sys

import click

from detdeploy import __version__
from detdeploy.errors import DetdeployError

EXIT_BAD_INPUT = 2


@click.group(context_settings={'help_option_names': ['-h', '--help']})
@click.option('--debug', is_flag=True, help='Show full tracebacks for errors.')
@click.version_option(__version__, prog_name='detdeploy')
def cli(debug: bool) -> None:
    """Export PyTorch detectors to ONNX / TensorRT and check them against PyTorch."""


@cli.command()
@click.argument('images', nargs=-1, required=True)
@click.option('--model', 'model_name', default='rtmdet', show_default=True,
              help='Registry name: rtmdet (= rtmdet-tiny), rtmdet-s, -m, -l, -x.')
@click.option('--checkpoint', type=click.Path(dir_okay=False),
              help='MMDetection-format or plain state-dict checkpoint (.pth).')
@click.option('--trust-checkpoint', is_flag=True,
              help='Allow checkpoints that need arbitrary unpickling (only for trusted files).')
@click.option('--out', 'out_dir', type=click.Path(file_okay=False),
              help='Write <image>.json and <image>.png here; without it, print a summary only.')
@click.option('--score-thr', type=click.FloatRange(0, 1),
              help="Keep detections above this score (default: the model's test config, 0.001).")
@click.option('--show-thr', type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help='Draw detections scoring at least this in the PNGs.')
@click.option('--batch', 'batch_size', type=click.IntRange(min=1), default=1, show_default=True,
              help='Images per forward pass.')
@click.option('--device', default='cpu', show_default=True, help='PyTorch device (cpu, cuda, cuda:1).')
def infer(images, model_name, checkpoint, trust_checkpoint, out_dir, score_thr, show_thr,
          batch_size, device) -> None:
    """Detect objects in IMAGES (files or directories) with the PyTorch model."""
    from detdeploy.infer import collect_images, run_infer
    from detdeploy.models import load_detector
    from detdeploy.runtimes.torch_backend import TorchBackend

    image_paths = collect_images(list(images))
    device = _torch_device(device)
    detector = load_detector(model_name, checkpoint, trust=trust_checkpoint)
    if checkpoint is None:
        click.echo(f'note: no --checkpoint given, {detector.spec.name} uses random weights '
                   '(detections are meaningless)', err=True)
    backend = TorchBackend(detector, device=device)
    report = run_infer(backend, image_paths, out_dir, score_thr, show_thr, batch_size)
    for image in report.images:
        written = f' -> {image.json_path}, {image.png_path}' if image.json_path else ''
        click.echo(f'{image.source}: {image.num_detections} detections, '
                   f'{image.num_shown} at score >= {show_thr:g}{written}')


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
