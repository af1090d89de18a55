"""Batch inference for `detdeploy infer`: detections for image files, written as JSON and PNGs.

Returns what it did as data; printing is the CLI's job.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from detdeploy.core.detections import ImageDetections
from detdeploy.core.errors import DetdeployError
from detdeploy.core.fileio import (atomic_write, check_input_file, make_output_dir,
                                   refuse_existing)
from detdeploy.core.masks import encode_rle
from detdeploy.inference.coco_ids import CocoIds, run_order_ids
from detdeploy.inference.draw import draw_detections
from detdeploy.runtimes.backend import Backend
from detdeploy.runtimes.pipeline import detect
from detdeploy.runtimes.preprocess import DEFAULT_MAX_PIXELS

RESULTS_NAME = 'coco_results'       # <out>/coco_results.json: all images, COCO results format
IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff'}


@dataclass
class ImageReport:
    source: str
    num_detections: int
    num_shown: int
    json_path: Path | None
    png_path: Path | None
    position: int = 0                   # in the run's images
    shown_per_class: dict[str, int] = field(default_factory=dict)    # above show_thr, most first
    milliseconds: float = 0.0           # read to files written; a batch's time shared evenly


@dataclass
class SkippedImage:
    source: str
    reason: str                         # the one-line ImageError message
    position: int = 0                   # in the run's images


@dataclass
class InferReport:
    backend: str
    images: list[ImageReport] = field(default_factory=list)
    skipped: list[SkippedImage] = field(default_factory=list)     # unreadable images
    results_path: Path | None = None
    ids_note: str = ''                  # how coco_results.json's ids were assigned


GLOB_CHARACTERS = set('*?[')


def _folder_files(folder: Path, recursive: bool, suffixes: set[str]) -> list[Path]:
    try:
        entries = sorted(folder.rglob('*') if recursive else folder.iterdir())
    except OSError as exc:
        raise DetdeployError(f'cannot list image directory {folder}: {exc.strerror}') from None
    return [p for p in entries if p.suffix.lower() in suffixes and p.is_file()]


def collect_images(paths: list[str | Path], recursive: bool = False,
                   video: bool = False) -> list[Path]:
    """Image files named directly, the image files (sorted) inside named directories (and
    their subdirectories with `recursive`), and the matches of glob patterns (`'imgs/*.png'`,
    `'data/**/*.jpg'`, quoted so that the shell leaves them to us), in the order given. With
    `video`, video files (`inference.video.VIDEO_SUFFIXES`) count as inputs too."""
    from detdeploy.inference.video import VIDEO_SUFFIXES
    suffixes = IMAGE_SUFFIXES | (VIDEO_SUFFIXES if video else set())
    images: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists() and not path.is_symlink() and GLOB_CHARACTERS & set(str(raw)):
            matches = sorted(Path(match) for match in glob.glob(str(raw), recursive=True))
            files = [m for m in matches if m.is_file() and m.suffix.lower() in suffixes]
            for folder in (m for m in matches if m.is_dir()):
                files.extend(_folder_files(folder, recursive, suffixes))
            if not files:
                raise DetdeployError(f'no images match {raw}')
            images.extend(files)
        elif path.is_dir():
            images.extend(_folder_files(path, recursive, suffixes))
        elif path.exists() or path.is_symlink():
            images.append(check_input_file(path, 'image'))    # not a FIFO, device or loop
        else:
            raise DetdeployError(f'no such image file or directory: {path}')
    if not images:
        raise DetdeployError(f'no images found in: {", ".join(str(p) for p in paths)}'
                             + ('' if recursive else ' (--recursive searches subfolders)'))
    return images


def output_stems(images: list[Path]) -> list[str]:
    """One output name per image: its stem, numbered when two images share a stem."""
    seen: dict[str, int] = {RESULTS_NAME: 1}
    stems = []
    for image in images:
        count = seen.get(image.stem, 0)
        seen[image.stem] = count + 1
        stems.append(image.stem if count == 0 else f'{image.stem}_{count}')
    return stems


def output_paths(out_dir: str | Path, images: list[Path]) -> list[Path]:
    """Every file `run_infer` writes into `out_dir` for `images`."""
    out = Path(out_dir)
    return [out / f'{RESULTS_NAME}.json'] + [out / f'{stem}.{suffix}'
                                             for stem in output_stems(images)
                                             for suffix in ('json', 'png')]


def coco_rows(image_id: int, detections: ImageDetections, ids: CocoIds | None = None
              ) -> list[dict]:
    """Detections in COCO's results format (bbox x, y, w, h in original pixels), plus the
    image file and class name; `ids` maps class indices to category ids (default: the index).
    Instance models add each mask as COCO RLE under `segmentation` (`core.masks.encode_rle`)."""
    category_id = ids.category_id if ids is not None else int
    rows = [{'image_id': image_id, 'file_name': detections.source,
             'bbox': [round(float(x1), 3), round(float(y1), 3), round(float(x2 - x1), 3),
                      round(float(y2 - y1), 3)],
             'score': round(float(score), 6), 'category_id': category_id(int(label)),
             'category_name': detections.label_name(int(label))}
            for (x1, y1, x2, y2), score, label in zip(detections.boxes_xyxy_px,
                                                      detections.scores, detections.labels)]
    if detections.masks is not None:
        for row, rle in zip(rows, encode_rle(detections.masks)):
            row['segmentation'] = rle
    return rows


def run_infer(backend: Backend, images: list[Path], out_dir: str | Path | None,
              score_thr: float | None = None, show_thr: float = 0.3, batch_size: int = 1,
              max_pixels: int | None = DEFAULT_MAX_PIXELS, overwrite: bool = True,
              ids: CocoIds | None = None, progress: Callable[[int], None] | None = None
              ) -> InferReport:
    """Detect on every image (from `collect_images`). With `out_dir`, write `<stem>.json` and
    `<stem>.png` per image and `coco_results.json` for all of them, each file atomically.

    The JSON files keep every detection scoring strictly above `score_thr` (default: all the
    model returns); the PNG draws those scoring above `show_thr` (`core.nms`'s rule). An image that cannot be read
    (not an image, truncated, above `max_pixels`) is skipped and listed in `report.skipped`;
    `coco_results.json` takes its ids from `ids` (`coco_ids.dataset_ids`: a dataset's), by
    default the images' positions in `images` and the class indices. Without `overwrite`,
    existing output files are refused before anything runs. `progress(1)` after each image.
    """
    out = make_output_dir(out_dir) if out_dir is not None else None
    if out is not None and not overwrite:
        refuse_existing(output_paths(out, images))
    ids = ids or run_order_ids(len(images))
    report = InferReport(backend.name, ids_note=ids.note)
    stems = output_stems(images)

    def skip(source, error, position) -> None:
        report.skipped.append(SkippedImage(str(source), str(error), position))

    with contextlib.ExitStack() as stack:
        results_file = None
        if out is not None:
            report.results_path = out / f'{RESULTS_NAME}.json'
            # Streamed, so memory stays flat over many images; renamed into place at the end.
            results_file = stack.enter_context(
                atomic_write(report.results_path, 'w', overwrite=overwrite))
            results_file.write('[')
        readable = _SourceTracker(images)
        results = detect(backend, readable, batch_size, keep_images=out is not None,
                         max_pixels=max_pixels, on_unreadable=readable.skip(skip))
        first_row = True
        step_started = time.perf_counter()
        for detections, image_rgb in results:
            position = readable.next_done()
            stem = stems[position]
            if score_thr is not None:
                detections = detections.above(score_thr)
            shown = detections.above(show_thr)
            json_path = png_path = None
            if out is not None:
                json_path, png_path = out / f'{stem}.json', out / f'{stem}.png'
                with atomic_write(json_path, 'w', overwrite=overwrite) as handle:
                    json.dump(detections.to_dict(), handle, indent=1)
                with atomic_write(png_path, overwrite=overwrite) as handle:
                    draw_detections(image_rgb, shown).save(handle, format='PNG')
                for row in coco_rows(ids.image_ids[position], detections, ids):
                    results_file.write(('\n' if first_row else ',\n') + json.dumps(row))
                    first_row = False
            now = time.perf_counter()
            report.images.append(ImageReport(
                detections.source, len(detections), len(shown), json_path, png_path, position,
                count_per_class(shown), 1000 * (now - step_started)))
            step_started = now
            if progress is not None:
                progress(1)
        if results_file is not None:
            results_file.write('\n]\n')
    _share_batch_time(report.images, batch_size)
    return report


def count_per_class(detections: ImageDetections) -> dict[str, int]:
    """Detections per class name, the most frequent first (ties by name)."""
    counts = collections.Counter(detections.label_name(int(label)) for label in detections.labels)
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def _share_batch_time(images: list[ImageReport], batch_size: int) -> None:
    """A batch's images arrive together, the first carrying the batch's time: share it."""
    by_batch = collections.defaultdict(list)
    for image in images:
        by_batch[image.position // batch_size].append(image)
    for members in by_batch.values():
        shared = sum(image.milliseconds for image in members) / len(members)
        for image in members:
            image.milliseconds = shared


class _SourceTracker:
    """Iterates the image paths for `detect` and pairs its results back with their positions:
    `detect` reads a whole batch (reporting the unreadable images, in order) before yielding
    that batch's results, one per readable image, in order."""

    def __init__(self, images: list[Path]):
        self.images = images
        self.unreported_skips: collections.deque = collections.deque()
        self.cursor = 0
        self.last_skip = -1

    def __iter__(self):
        return iter(self.images)

    def skip(self, callback):
        def on_unreadable(source, error) -> None:
            start = max(self.cursor, self.last_skip + 1)
            position = next(i for i in range(start, len(self.images))
                            if self.images[i] is source)
            self.last_skip = position
            self.unreported_skips.append(source)
            callback(source, error, position)
        return on_unreadable

    def next_done(self) -> int:
        """The position in `images` of the next result `detect` yields."""
        while self.unreported_skips and self.images[self.cursor] is self.unreported_skips[0]:
            self.unreported_skips.popleft()
            self.cursor += 1
        self.cursor += 1
        return self.cursor - 1
