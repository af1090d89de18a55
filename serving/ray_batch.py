"""`detdeploy batch-infer`: `infer`'s folder-to-COCO-results job on Ray Data. Actor workers read
and detect the images (each actor opens its own backend); the driver writes coco_results.json
(and a PNG per image if asked) in image order, each file atomically.

The detections equal `infer`'s (batches are grouped by padded size, as in `http_detect`); the
files are the same as `infer --out` writes, less the per-image JSON files.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detdeploy.core.errors import ImageError
from detdeploy.core.fileio import atomic_write, make_output_dir, refuse_existing
from detdeploy.inference.batch import (RESULTS_NAME, ImageReport, InferReport, SkippedImage,
                                       coco_rows, output_stems)
from detdeploy.runtimes.pipeline import require_detections
from detdeploy.runtimes.preprocess import DEFAULT_MAX_PIXELS, allow_pixels, read_image

from .http_detect import detect_by_canvas
from .ray_cluster import ModelToOpen, check_room, connect


@dataclass(frozen=True)
class BatchInferOptions:
    actors: int = 2
    batch: int = 4                      # images per actor call (and per forward pass at most)
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    score_thr: float | None = None
    show_thr: float = 0.3               # PNGs draw detections scoring above it
    png: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    overwrite: bool = True


def output_paths(out_dir: str | Path, images: list[Path], png: bool) -> list[Path]:
    """Every file `run_batch_infer` writes into `out_dir`."""
    out = Path(out_dir)
    return [out / f'{RESULTS_NAME}.json'] + ([out / f'{stem}.png' for stem in
                                              output_stems(images)] if png else [])


class DetectActor:
    """A Ray Data actor: rows (image_id, path) in, per image its COCO rows (JSON text), counts,
    PNG bytes if drawing, or the one-line reason it was unreadable."""

    def __init__(self, model: ModelToOpen, options: BatchInferOptions):
        allow_pixels(options.max_pixels)        # an actor is its own process: Pillow's limit
        self.backend = model.open()
        require_detections(self.backend)
        self.options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        from detdeploy.inference.draw import draw_detections
        ids = [int(i) for i in batch['image_id']]
        paths = [str(p) for p in batch['path']]
        sources = dict(zip(ids, (str(s) for s in batch['source'])))   # names as given
        images, readable, errors = {}, [], {}
        for image_id, path in zip(ids, paths):
            try:
                images[image_id] = read_image(path, max_pixels=self.options.max_pixels)
                readable.append(image_id)
            except ImageError as error:
                errors[image_id] = str(error)
        found = dict(zip(readable, detect_by_canvas(
            self.backend, [sources[i] for i in readable],
            [images[i] for i in readable]))) if readable else {}
        rows: dict[str, list] = {name: [] for name in
                                 ('image_id', 'source', 'coco', 'found', 'shown', 'png', 'error')}
        for image_id in ids:
            png = b''
            if image_id in errors:
                coco, count, shown = '[]', 0, 0
            else:
                detections = found[image_id].above(self.options.score_thr)
                visible = detections.above(self.options.show_thr)
                coco, count, shown = (json.dumps(coco_rows(image_id, detections)),
                                      len(detections), len(visible))
                if self.options.png:
                    png = _png_bytes(draw_detections(images[image_id], visible))
            for name, value in (('image_id', image_id), ('source', sources[image_id]),
                                ('coco', coco),
                                ('found', count), ('shown', shown), ('png', png),
                                ('error', errors.get(image_id, ''))):
                rows[name].append(value)
        return rows


def _png_bytes(image) -> bytes:
    import io
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


def run_batch_infer(model: ModelToOpen, images: list[Path], out_dir: str | Path,
                    options: BatchInferOptions, backend_name: str = 'ort',
                    address: str | None = None) -> InferReport:
    """Detect on `images` (from `inference.batch.collect_images`) across `options.actors`
    Ray actors and write `out_dir`/coco_results.json (+ `<stem>.png`), as `infer` does. Paths
    are resolved here: on a multi-machine cluster they must be readable at the same path on
    every node. Unreadable images are in `report.skipped`, the rest keep their positions as
    `image_id`s."""
    out = make_output_dir(out_dir)
    if not options.overwrite:
        refuse_existing(output_paths(out, images, options.png))
    ray = connect(address)
    if not address:
        check_room(ray, options.actors, options.cpus_per_actor, options.gpus_per_actor,
                   'actors')
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False        # the command prints per image itself
    context.print_on_execution_start = False
    logging.getLogger('ray.data').setLevel(logging.WARNING)
    items = [{'image_id': image_id, 'path': str(path.resolve()), 'source': str(path)}
             for image_id, path in enumerate(images)]
    dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / options.batch))
    detected = dataset.map_batches(
        DetectActor, fn_constructor_kwargs={'model': model, 'options': options},
        batch_size=options.batch, compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=options.cpus_per_actor,
        num_gpus=options.gpus_per_actor, batch_format='numpy')
    report = InferReport(backend_name, results_path=out / f'{RESULTS_NAME}.json')
    stems = output_stems(images)
    with atomic_write(report.results_path, 'w', overwrite=options.overwrite) as results_file:
        results_file.write('[')
        first = True
        for row in _in_order(detected.iter_rows()):
            if row['error']:
                report.skipped.append(SkippedImage(row['source'], row['error']))
                continue
            for coco in json.loads(row['coco']):
                results_file.write(('\n' if first else ',\n') + json.dumps(coco))
                first = False
            png_path = None
            if options.png:
                png_path = out / f'{stems[row["image_id"]]}.png'
                with atomic_write(png_path, overwrite=options.overwrite) as handle:
                    handle.write(row['png'])
            report.images.append(ImageReport(row['source'], row['found'], row['shown'], None,
                                             png_path))
        results_file.write('\n]\n')
    return report


def _in_order(rows):
    """Rows by image_id, 0, 1, 2, ...: actors finish out of order; a row waits here only until
    those before it arrive."""
    waiting, next_id = {}, 0
    for row in rows:
        waiting[int(row['image_id'])] = row
        while next_id in waiting:
            yield waiting.pop(next_id)
            next_id += 1
