"""`detdeploy make-dataset shapes`: write the synthetic COCO-format shapes dataset."""
from __future__ import annotations

import sys

import click

from .common import no_overwrite_option


@click.command('make-dataset')
@click.argument('kind', type=click.Choice(['shapes']))
@click.option('--out', 'out_dir', required=True, type=click.Path(file_okay=False),
              help='Dataset folder: train/, val/ and annotations/instances_{train,val}.json.')
@click.option('--train', type=click.IntRange(min=0), default=1000, show_default=True,
              help='Training images.')
@click.option('--val', type=click.IntRange(min=0), default=100, show_default=True,
              help='Validation images.')
@click.option('--size', type=click.IntRange(min=64), default=320, show_default=True,
              help='Image side in pixels (square images).')
@click.option('--seed', type=int, default=0, show_default=True,
              help='Same seed, same dataset, byte for byte.')
@click.option('--rotated', is_flag=True,
              help="Also write each shape's exact oriented box as the annotation's `rbox`: [cx, "
              'cy, w, h, angle] px and radians, le90 (for rotated models: train, eval). '
              'Images and every other field are the same as without it.')
@no_overwrite_option
def make_dataset(kind, out_dir, train, val, size, seed, rotated, no_overwrite) -> None:
    """Write a synthetic detection dataset (KIND: shapes) in COCO format.

    Existing files of the same names are replaced, each atomically (--no-overwrite refuses).
    Six classes (circle, square, triangle, star, hexagon, cross) in varied sizes, colours and
    rotations, partly overlapping, among unlabelled clutter on textured backgrounds. With
    --rotated, annotations also carry oriented boxes (a circle's is its square at angle 0).
    """
    from detdeploy.core.fileio import check_output_dir, refuse_existing
    from detdeploy.training.shapes import make_shapes_dataset

    out = check_output_dir(out_dir)
    if no_overwrite:
        counts = {'train': train, 'val': val}
        refuse_existing([out / 'annotations' / f'instances_{split}.json'
                         for split, count in counts.items() if count] +
                        [out / split / f'{index:06d}.png'
                         for split, count in counts.items() for index in range(count)])
    written = make_shapes_dataset(out_dir, train, val, size=size, seed=seed,
                                  show_progress=sys.stderr.isatty(), rotated=rotated)
    for split, path in written.items():
        count = train if split == 'train' else val
        click.echo(f'{split}: {count} images in {path.parent.parent / split}, annotations {path}')
