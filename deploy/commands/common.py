"""Options and helpers shared by the CLI commands: model loading, class names, devices."""
from __future__ import annotations

import math
import os
from pathlib import Path

import click

from detdeploy.core.errors import DetdeployError

DEFAULT_MODEL = 'rtmdet'


class FiniteFloat(click.FloatRange):
    """The type of every float flag: a finite number within its range. click's FloatRange lets
    NaN through any range (NaN compares false with every bound) and infinity through an open
    one; a threshold of NaN would pass every check it guards."""
    name = 'finite number'

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f'{value!r} is not a finite number', param, ctx)
        return number


class ThreadCount(click.IntRange):
    """--threads: at least 1; more than the machine's cores works but only adds contention,
    so it is said once on stderr."""
    name = 'thread count'

    def __init__(self):
        super().__init__(min=1)

    def convert(self, value, param, ctx):
        threads = super().convert(value, param, ctx)
        cores = os.cpu_count() or 1
        if threads > cores:
            click.echo(f'warning: --threads {threads} is more than the {cores} CPU cores here: '
                       'the threads compete for them (slower, not faster)', err=True)
        return threads


def pytorch_model_options(command):
    """--model, --checkpoint, --class-names and --trust-checkpoint, for commands that load a
    PyTorch model."""
    command = click.option('--class-names', help=(
        'Class names, comma-separated or a text file with one per line; overrides the '
        "checkpoint's (and, without a checkpoint, sets the number of classes)."))(command)
    command = click.option('--trust-checkpoint', is_flag=True, help=(
        'Allow checkpoints that need arbitrary unpickling (only for trusted files).'))(command)
    command = click.option('--checkpoint', type=click.Path(dir_okay=False), help=(
        'MMDetection-format or plain state-dict checkpoint (.pth), or a published one by name, '
        'downloaded once into ~/.cache/detdeploy (sha256 checked): mmdet:rtmdet-tiny-coco, '
        'mmdet:rtmdet-s-coco, -m-, -l-, -x-coco.'))(command)
    return click.option('--model', 'model_name', help=(
        'Registry name: rtmdet (= rtmdet-tiny, the default), rtmdet-s, -m, -l, -x, '
        'retinanet-r50, faster-rcnn-r50, faster-rcnn-r101, mask-rcnn-r50 (instance masks), '
        'yolov3-mobilenetv2-320, -416, '
        'rotated-rtmdet (= rotated-rtmdet-tiny, the bundled rotated shapes model), '
        'rotated-rtmdet-s, -m, -l (oriented boxes), rtmdet-ins (= rtmdet-ins-tiny, the bundled '
        'shapes model), rtmdet-ins-s, -m, -l, -x (instance masks).'))(command)


def weight_inputs(checkpoint: str | None, class_names: str | None) -> list[tuple[str, str]]:
    """The files --checkpoint and --class-names read, for `refuse_overwriting_inputs`."""
    inputs = [('--checkpoint', checkpoint)] if checkpoint else []
    if class_names and Path(class_names).is_file():
        inputs.append(('--class-names', class_names))
    return inputs


def parse_class_names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    path = Path(text)
    if path.is_file():
        try:
            lines = path.read_text(encoding='utf-8').splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DetdeployError(f'--class-names {text}: cannot read it as a text file with one '
                                 f'name per line ({type(exc).__name__})') from None
        names = [line.strip() for line in lines if line.strip()]
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
    from detdeploy.models.bundled import bundled_checkpoint, bundled_description
    from detdeploy.models.named_checkpoints import is_checkpoint_name
    if is_checkpoint_name(checkpoint):
        model_name, checkpoint = _named_checkpoint(model_name, checkpoint)
    bundled = bundled_checkpoint(model_name) if checkpoint is None and not class_names else None
    detector = load_detector(model_name or DEFAULT_MODEL, checkpoint or bundled,
                             parse_class_names(class_names), trust=trust_checkpoint)
    if bundled is not None:
        click.echo(f'note: no --checkpoint given, using {bundled_description(model_name)}',
                   err=True)
    elif checkpoint is None:
        click.echo(f'note: no --checkpoint given, {detector.spec.name} {purpose}', err=True)
    return detector


def _named_checkpoint(model_name: str | None, name: str) -> tuple[str, str]:
    """(the model to build, the local file) for a checkpoint name: downloaded into the cache
    with a progress bar (or lines), or found there."""
    from detdeploy.core.progress import Progress
    from detdeploy.models.named_checkpoints import cache_dir, fetch, lookup
    from detdeploy.models.registry import get_spec
    entry = lookup(name)
    if model_name not in (None, DEFAULT_MODEL) and get_spec(model_name).name != entry.arch:
        raise DetdeployError(f'--checkpoint {name} is for {entry.arch}, not --model {model_name}')
    if not (cache_dir() / entry.file_name).is_file():
        click.echo(f'downloading {name} from {entry.url} into {cache_dir()}', err=True)
    with Progress(f'download {name}', unit='bytes', interval_s=5) as progress:
        def report(done: int, total: int | None) -> None:
            progress.total = total
            progress.update(done - progress.done)
            if progress.bar is not None:
                progress.bar.total = total
        path = fetch(entry, progress=report)
    return entry.arch, str(path)


def split_model_and_images(inputs: tuple[str, ...], model_name: str | None
                           ) -> tuple[str, list[str]]:
    """MODEL IMAGES... or IMAGES... (with --model or the default model)."""
    def names_a_model(text: str) -> bool:
        from detdeploy.runtimes.open import is_model_file
        if is_model_file(text):
            return True
        from detdeploy.models.registry import model_names  # imports torch: not for files
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


def no_overwrite_option(command):
    """--no-overwrite, for every command that writes files."""
    return click.option('--no-overwrite', is_flag=True, help=(
        'Refuse to replace existing output files [default: replace them atomically].'))(command)


def max_pixels_option(command):
    """--max-pixels, for commands that read image files."""
    from detdeploy.runtimes.preprocess import DEFAULT_MAX_PIXELS
    return click.option('--max-pixels', type=click.IntRange(min=0), default=DEFAULT_MAX_PIXELS,
                        show_default=True, help=(
        'Refuse image files with more pixels than this, checked from the header before '
        'decoding (decompression bombs); 0 = no limit.'))(command)


def apply_max_pixels(max_pixels: int) -> int | None:
    """Let `read_image`'s limit, not Pillow's process-wide one, decide; None = no limit."""
    from detdeploy.runtimes.preprocess import allow_pixels
    allow_pixels(max_pixels)
    return max_pixels or None


def foreign_model_options(command):
    """--input-size, --mean, --std, --channel-order, --pad-value: what an ONNX file without
    detdeploy metadata cannot say about itself (with --class-names from pytorch_model_options)."""
    command = click.option('--pad-value', type=FiniteFloat(), help=(
        'ONNX files from other tools: raw pixel value of the padding [default: 114].'))(command)
    command = click.option('--channel-order', type=click.Choice(['rgb', 'bgr']), help=(
        'ONNX files from other tools: channel order the network expects.'))(command)
    command = click.option('--std', help=(
        'ONNX files from other tools: per-channel std, in --channel-order (e.g. 255,255,255).'
        ))(command)
    command = click.option('--mean', help=(
        'ONNX files from other tools: per-channel mean, in --channel-order (e.g. 0,0,0).'
        ))(command)
    return command


def parse_input_size(text: str | None) -> tuple[int, int] | None:
    """640 or HEIGHTxWIDTH; the size divisor is checked where the size is used
    (`PreprocessConfig.with_input_size`)."""
    if text is None:
        return None
    parts = text.lower().split('x')
    try:
        sides = [int(part) for part in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2):
        raise DetdeployError(f"--input-size '{text}': give one side (640) or HEIGHTxWIDTH "
                             '(480x640)')
    return (sides[0], sides[-1])


def _parse_triple(text: str | None, flag: str) -> tuple[float, float, float] | None:
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(','))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise DetdeployError(f"{flag} '{text}': give three numbers, e.g. 0,0,0")
    return values


def model_overrides(class_names: str | None = None, input_size: str | None = None,
                    mean: str | None = None, std: str | None = None,
                    channel_order: str | None = None, pad_value: float | None = None):
    """The `ModelOverrides` for a model file from the command line's flags."""
    from detdeploy.runtimes.model_file import ModelOverrides
    return ModelOverrides(class_names=parse_class_names(class_names),
                          input_size=parse_input_size(input_size),
                          mean=_parse_triple(mean, '--mean'), std=_parse_triple(std, '--std'),
                          channel_order=channel_order, pad_value=pad_value)


def refuse_weight_flags(model: str, checkpoint: str | None, trust_checkpoint: bool) -> None:
    """--checkpoint and --trust-checkpoint load PyTorch weights: they do nothing for a file."""
    if checkpoint or trust_checkpoint:
        flag = '--checkpoint' if checkpoint else '--trust-checkpoint'
        raise DetdeployError(f'{flag} is for registry models; {model} carries its own weights')


def export_for_ort(detector, nms, preset: str, temp_dir: Path,
                   input_hw: tuple[int, int] | None = None) -> Path:
    """`export.exporter.export_for_runtime`, saying so in one line."""
    from detdeploy.export.exporter import export_for_runtime
    shape = ', dynamic shape' if detector.spec.preprocessing.pad == 'divisor' else ''
    click.echo(f'exporting {detector.spec.name} to ONNX for the ort backend '
               f'(--nms onnx, {preset} preset, dynamic batch{shape})', err=True)
    return export_for_runtime(detector, temp_dir, nms, input_hw)


def nms_line(metadata) -> str:
    """The line a command prints to say which NMS settings produced its detections."""
    if not metadata.has_nms:
        return f'nms: none in {metadata.arch} (raw outputs)'
    if metadata.nms is None:
        return f'nms: in the graph of {metadata.arch}, settings unknown (made by another tool)'
    return f'nms: {metadata.nms.describe()}'
