"""The `detdeploy infer` pipeline: detections for image files, written as JSON and drawn PNGs.

Returns what it did as data; printing is the CLI's job.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from detdeploy.errors import DetdeployError
from detdeploy.fileio import atomic_write
from detdeploy.runtimes.draw import draw_detections
from detdeploy.runtimes.pipeline import Backend, detect

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff'}
PROGRESS_MIN_IMAGES = 8


@dataclass
class ImageReport:
    source: str
    num_detections: int
    num_shown: int
    json_path: Path | None
    png_path: Path | None


@dataclass
class InferReport:
    backend: str
    images: list[ImageReport] = field(default_factory=list)


def collect_images(paths: list[str | Path]) -> list[Path]:
    """Image files named directly, plus the image files (sorted) inside named directories."""
    images: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            images.extend(sorted(p for p in path.iterdir()
                                 if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            images.append(path)
        else:
            raise DetdeployError(f'no such image file or directory: {path}')
    if not images:
        raise DetdeployError(f'no images found in: {", ".join(str(p) for p in paths)}')
    return images


def _output_stems(images: list[Path]) -> list[str]:
    """One output name per image: its stem, numbered when two images share a stem."""
    seen: dict[str, int] = {}
    stems = []
    for image in images:
        count = seen.get(image.stem, 0)
        seen[image.stem] = count + 1
        stems.append(image.stem if count == 0 else f'{image.stem}_{count}')
    return stems


def run_infer(backend: Backend, image_paths: list[str | Path], out_dir: str | Path | None,
              score_thr: float | None = None, show_thr: float = 0.3,
              batch_size: int = 1) -> InferReport:
    """Detect on every image; with `out_dir`, write `<stem>.json` and `<stem>.png` per image.

    The JSON keeps every detection above `score_thr` (default: the model's own test
    threshold); the PNG draws those scoring at least `show_thr`.
    """
    images = collect_images(image_paths)
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise DetdeployError(f'cannot create output directory {out}: {exc.strerror}') from None
    report = InferReport(backend.name)
    results = detect(backend, images, batch_size, keep_images=out is not None)
    progress = tqdm(results, total=len(images), unit='img', disable=len(images) < PROGRESS_MIN_IMAGES)
    for stem, (detections, image_rgb) in zip(_output_stems(images), progress):
        if score_thr is not None:
            detections = detections.above(score_thr)
        shown = detections.above(show_thr)
        json_path = png_path = None
        if out is not None:
            json_path, png_path = out / f'{stem}.json', out / f'{stem}.png'
            with atomic_write(json_path, 'w') as handle:
                json.dump(detections.to_dict(), handle, indent=1)
            with atomic_write(png_path) as handle:
                draw_detections(image_rgb, shown).save(handle, format='PNG')
        report.images.append(ImageReport(detections.source, len(detections), len(shown),
                                         json_path, png_path))
    return report
