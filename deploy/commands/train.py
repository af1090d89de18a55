"""`detdeploy train`: train a registry detector on a COCO-format dataset (`training.trainer`).

Run it once per process; under `torchrun --nproc-per-node N` it trains with DDP (gloo on CPU,
NCCL on GPU) and only rank 0 writes.
"""
from __future__ import annotations

import math
import os
import sys

import click

from detdeploy.core.errors import DetdeployError

from .common import FiniteFloat


def _scale_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(','))
    except ValueError:
        raise DetdeployError(f"--scale-range '{text}': give two numbers, e.g. 0.5,2.0") from None
    if not (math.isfinite(high) and 0 < low <= high):
        raise DetdeployError(f"--scale-range '{text}': need finite numbers 0 < low <= high")
    return low, high


def _check_run_folder(out_dir: str, resume: bool, overwrite: bool) -> None:
    """A folder holding a run is continued (--resume) or replaced (--overwrite), never replaced
    by accident: its checkpoints may be hours of training."""
    from detdeploy.core.fileio import check_output_dir
    from detdeploy.training.trainer import BEST, LAST, LOG

    if resume and overwrite:
        raise DetdeployError('give --resume (continue the run) or --overwrite (start over), '
                             'not both')
    out = check_output_dir(out_dir)
    held = [name for name in (LAST, BEST, LOG) if (out / name).exists()]
    if held and not resume and not overwrite:
        raise DetdeployError(f'--out {out} already holds a run ({", ".join(held)}): pass '
                             '--resume to continue it, --overwrite to start over, or choose '
                             'another --out')


def _check_inputs(out_dir: str, train_ann: str, val_ann: str | None,
                  init_checkpoint: str | None, resume: bool) -> None:
    """Every file the run reads exists and is none of the files it writes."""
    from pathlib import Path

    from detdeploy.core.fileio import check_input_file, refuse_overwriting_inputs
    from detdeploy.training.trainer import BEST, CURVES, LAST, LOG

    if init_checkpoint:
        check_input_file(init_checkpoint, 'checkpoint')
    inputs = [('--train-ann', train_ann), ('--val-ann', val_ann)]
    if not resume:      # --resume reads last.pth and writes it again, on purpose
        inputs.append(('--checkpoint', init_checkpoint))
    refuse_overwriting_inputs([('--out', Path(out_dir) / name)
                               for name in (LAST, BEST, LOG, CURVES)], inputs)


@click.command()
@click.option('--model', 'model_name', default='rtmdet-tiny', show_default=True,
              help='Registry name: rtmdet-tiny, -s, -m, -l, -x; rtmdet-ins-tiny .. -x (instance '
              'masks: the annotation file needs segmentation); rotated-rtmdet-tiny, -s, -m, -l '
              '(on oriented boxes: make-dataset shapes --rotated).')
@click.option('--train-ann', required=True, type=click.Path(dir_okay=False),
              help='COCO instances JSON of the training set (class names come from it).')
@click.option('--train-images', required=True, type=click.Path(file_okay=False),
              help='Folder the training file names are relative to.')
@click.option('--val-ann', type=click.Path(dir_okay=False), help='COCO JSON of the val set.')
@click.option('--val-images', type=click.Path(file_okay=False), help='Val image folder.')
@click.option('--epochs', type=click.IntRange(min=1), default=12, show_default=True,
              help='Passes over the training set.')
@click.option('--batch', type=click.IntRange(min=1), default=8, show_default=True,
              help='Images per step per process.')
@click.option('--img-size', type=click.IntRange(min=32), default=320, show_default=True,
              help="Square training and network input side (a multiple of the model's size divisor, "
              '32 for RTMDet).')
@click.option('--out', 'out_dir', required=True, type=click.Path(file_okay=False),
              help='Run folder: last.pth, best.pth, log.jsonl, curves.png.')
@click.option('--resume', is_flag=True,
              help='Continue the run in --out exactly (model, optimizer, scheduler, EMA, epoch).')
@click.option('--overwrite', is_flag=True,
              help='Start a new run in an --out that holds one (its files are replaced); '
              'without it, such an --out is refused.')
@click.option('--checkpoint', 'init_checkpoint', type=click.Path(dir_okay=False),
              help='Initial weights (e.g. an MMDetection checkpoint); a classifier with another '
              'class count is left initialised.')
@click.option('--lr', type=FiniteFloat(min=0, min_open=True),
              help='Peak AdamW learning rate [default: 0.004 x total batch / 256, MMDetection].')
@click.option('--weight-decay', type=FiniteFloat(min=0), default=0.05, show_default=True,
              help='AdamW weight decay (none on norms and biases).')
@click.option('--warmup-iters', type=click.IntRange(min=0), default=1000, show_default=True,
              help='Linear warm-up steps.')
@click.option('--val-interval', type=click.IntRange(min=1), default=1, show_default=True,
              help='Epochs between val evaluations.')
@click.option('--scale-range', default='0.5,2.0', show_default=True,
              help='Random resize range around the fitting scale.')
@click.option('--mosaic', 'mosaic_prob', type=FiniteFloat(0, 1), default=0.0,
              show_default=True, help='Probability of a 4-image mosaic.')
@click.option('--mixup', 'mixup_prob', type=FiniteFloat(0, 1), default=0.0,
              show_default=True, help='Probability of mixing in a second image.')
@click.option('--workers', type=click.IntRange(min=0), default=0, show_default=True,
              help='Data-loading processes per training process.')
@click.option('--seed', type=int, default=0, show_default=True,
              help='Seeds weights, data order and augmentation.')
@click.option('--max-iters-per-epoch', type=click.IntRange(min=1),
              help='Cut every epoch short (quick checks).')
def train(model_name, train_ann, train_images, val_ann, val_images, epochs, batch, img_size,
          out_dir, resume, overwrite, init_checkpoint, lr, weight_decay, warmup_iters, val_interval,
          scale_range, mosaic_prob, mixup_prob, workers, seed, max_iters_per_epoch) -> None:
    """Train a detector the way MMDetection trains RTMDet: dynamic soft-label assignment,
    quality focal + GIoU losses, AdamW with warm-up and flat-then-cosine decay, EMA weights for
    evaluation and checkpoints. RTMDet-Ins adds MMDetection's dice mask loss and validates
    with segm AP too. Rotated models train as MMRotate does (rotated IoU in the
    assigner, rotated IoU loss, le90 angles) on annotations with oriented boxes (`rbox`), and
    are evaluated with DOTA-style rotated mAP."""
    from detdeploy.models.registry import get_spec
    from detdeploy.training.trainer import TrainConfig, Trainer

    spec = get_spec(model_name)                     # unknown names: one line, with a suggestion
    _check_run_folder(out_dir, resume, overwrite)
    if bool(val_ann) != bool(val_images):
        raise DetdeployError('give --val-ann and --val-images together')
    spec.preprocessing.with_input_size((img_size, img_size), '--img-size')
    _check_inputs(out_dir, train_ann, val_ann, init_checkpoint, resume)
    world = int(os.environ.get('WORLD_SIZE', '1'))             # set by torchrun
    config = TrainConfig(
        model=model_name, train_ann=train_ann, train_images=train_images, out=out_dir,
        val_ann=val_ann, val_images=val_images, epochs=epochs, batch=batch, img_size=img_size,
        lr=lr if lr is not None else 0.004 * batch * world / 256, weight_decay=weight_decay,
        warmup_iters=warmup_iters, val_interval=val_interval, workers=workers, seed=seed,
        mosaic_prob=mosaic_prob, mixup_prob=mixup_prob, scale_range=_scale_range(scale_range),
        max_iters_per_epoch=max_iters_per_epoch, init_checkpoint=init_checkpoint)
    trainer = Trainer(config, resume=resume, show_progress=sys.stderr.isatty(), echo=click.echo)
    if trainer.dist.is_main:
        click.echo(f'training {trainer.spec.name} on {len(trainer.dataset)} images, '
                   f'{len(trainer.class_names)} classes, {trainer.dist.world_size} process(es), '
                   f'epoch {trainer.epoch + 1} of {epochs}, {trainer.iters_per_epoch} steps each')
    summary = trainer.fit()
    if trainer.dist.is_main:
        kind = 'segm AP' if trainer.instance else 'AP'
        best = f', best val {kind} {trainer.best_ap:.3f}' if trainer.best_ap >= 0 else ''
        click.echo(f'done: {out_dir}/last.pth and best.pth{best}')
    return summary
