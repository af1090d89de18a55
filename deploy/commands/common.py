"""Options and helpers shared by the CLI commands: model loading, class names, devices."""
from __future__ import annotations

from pathlib import Path

import click

from detdeploy.errors import DetdeployError

DEFAULT_MODEL = 'rtmdet'


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
    """The detector. Without a checkpoint, `rtmdet` (the default) is the bundled shapes model and
    the sized names have random weights; either way one line says which."""
    from detdeploy.models import load_detector
    from detdeploy.models.bundled import DESCRIPTION, bundled_checkpoint
    bundled = bundled_checkpoint(model_name) if checkpoint is None and not class_names else None
    detector = load_detector(model_name or DEFAULT_MODEL, checkpoint or bundled,
                             parse_class_names(class_names), trust=trust_checkpoint)
    if bundled is not None:
        click.echo(f'note: no --checkpoint given, using {DESCRIPTION}', err=True)
    elif checkpoint is None:
        click.echo(f'note: no --checkpoint given, {detector.spec.name} {purpose}', err=True)
    return detector


def split_model_and_images(inputs: tuple[str, ...], model_name: str | None
                           ) -> tuple[str, list[str]]:
    """MODEL IMAGES... or IMAGES... (with --model or the default model)."""
    def names_a_model(text: str) -> bool:
        if text.lower().endswith(('.onnx', '.engine', '.plan')):
            return True
        from detdeploy.models.registry import model_names    # imports torch: not for files
        return text.lower() in model_names()

    if model_name is None and inputs and names_a_model(inputs[0]):
        model, images = inputs[0], list(inputs[1:])
    else:
        model, images = model_name or DEFAULT_MODEL, list(inputs)
    if not images:
        raise DetdeployError('no images given: detdeploy infer [MODEL] IMAGES_OR_DIRS...')
    return model, images


def torch_device(device: str) -> str:
    import torch
    if device.startswith('cuda') and not torch.cuda.is_available():
        raise DetdeployError(f"device '{device}' requested but PyTorch sees no CUDA GPU")
    try:
        torch.device(device)
    except RuntimeError:
        raise DetdeployError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    return device
