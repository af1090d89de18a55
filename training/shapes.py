"""A synthetic detection dataset anyone can make: coloured shapes on textured backgrounds, in
COCO format (`detdeploy make-dataset shapes`).

Six classes of filled shapes, rotated, in varied sizes and colours, partly overlapping, among
unlabelled clutter (strokes, small specks) on noisy gradient backgrounds. Boxes are the tight
boxes of each whole shape (amodal, like COCO's); instance masks (`segmentation`, COCO RLE) are
the visible part of each shape (later shapes cover earlier ones, as in COCO), and `area` is the
mask's. Every image depends only on (seed, split, index), so a dataset is the same for a seed
whatever else changes.

With `rotated`, each annotation also gets `rbox`: the shape's exact oriented box (`oriented_box`),
[cx, cy, w, h, angle] in pixels and radians, le90 (w >= h, angle in [-pi/2, pi/2)). Computing it
draws no random numbers, so the images and every other field are the same as without it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from detdeploy.core.errors import DetdeployError
from detdeploy.core.memory import check_memory
from detdeploy.core.fileio import atomic_write

SHAPE_CLASSES = ('circle', 'square', 'triangle', 'star', 'hexagon', 'cross')
SUPERSAMPLE = 2                 # drawn at 2x and downsampled: smooth edges
SPLIT_IDS = {'train': 1, 'val': 2}
ROTATED_FORMAT = ('[cx, cy, w, h, angle]: centre, width, height in pixels, angle in radians '
                  '(le90: w >= h, angle in [-pi/2, pi/2), x right, y down)')
SYMMETRY = {'square': 4, 'triangle': 3, 'star': 5, 'hexagon': 6, 'cross': 4}
"""Rotations (2 pi / n) that map each polygonal shape onto itself."""


@dataclass(frozen=True)
class ShapesConfig:
    size: int = 320                     # images are size x size
    min_objects: int = 1
    max_objects: int = 8
    min_side: float = 0.06              # shape extent as a fraction of the image side
    max_side: float = 0.40
    max_overlap: float = 0.35           # largest share of an earlier box a new box may cover
    clutter: int = 10                   # unlabelled strokes and specks per image (at most)


def _polygon(kind: str, radius: float, angle: float) -> np.ndarray:
    """Vertices (x, y) around the origin for a polygonal shape of circumradius `radius`."""
    if kind == 'square':
        corners = [math.pi / 4 + k * math.pi / 2 for k in range(4)]
        points = [(math.cos(a), math.sin(a)) for a in corners]
    elif kind == 'triangle':
        points = [(math.cos(a), math.sin(a)) for a in
                  (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif kind == 'hexagon':
        points = [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)]
    elif kind == 'star':
        points = [((1.0 if k % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                   (1.0 if k % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5))
                  for k in range(10)]
    elif kind == 'cross':
        arm = 0.3
        half = [(arm, 1), (arm, arm), (1, arm), (1, -arm), (arm, -arm), (arm, -1)]
        points = half + [(-x, -y) for x, y in half]
        points = [(x / math.hypot(1, arm), y / math.hypot(1, arm)) for x, y in points]
    else:
        raise ValueError(kind)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return radius * np.asarray(points) @ rotation.T


def _le90(width: float, height: float, angle: float) -> tuple[float, float, float]:
    """(w, h, angle) with w >= h and angle in [-pi/2, pi/2), as MMRotate's le90. Sides equal to
    float precision (squares) are not swapped, so every frame of a square keeps its own angle."""
    if height > width * (1 + 1e-9):
        width, height, angle = height, width, angle + math.pi / 2
    angle = (angle + math.pi / 2) % math.pi - math.pi / 2
    return width, height, (angle if angle < math.pi / 2 else -math.pi / 2)


def oriented_box(kind: str, vertices: np.ndarray | None, centre: np.ndarray, radius: float,
                 rotation: float) -> list[float]:
    """The exact oriented box of a shape as drawn: [cx, cy, w, h, angle], le90.

    A polygon's box is its tight box in the shape's own frame (the frame it was rotated from),
    so every side touches the shape. Symmetric shapes have several such frames (a triangle's
    three edges, a hexagon's three vertex axes...): the one whose le90 angle is nearest 0 is
    taken, so equal-looking shapes get equal boxes. A circle has no orientation: its box is the
    square of side 2 r at angle 0.
    """
    if vertices is None:
        return [float(centre[0]), float(centre[1]), 2 * radius, 2 * radius, 0.0]
    best = None
    for turn in range(SYMMETRY[kind]):
        frame = rotation + turn * 2 * math.pi / SYMMETRY[kind]
        cos, sin = math.cos(frame), math.sin(frame)
        relative = vertices - centre
        along = relative @ np.array([cos, sin])               # coordinates in the frame
        across = relative @ np.array([-sin, cos])
        mid_a, mid_c = (along.max() + along.min()) / 2, (across.max() + across.min()) / 2
        width, height, angle = _le90(float(np.ptp(along)), float(np.ptp(across)), frame)
        box = [float(centre[0] + cos * mid_a - sin * mid_c),
               float(centre[1] + sin * mid_a + cos * mid_c), width, height, angle]
        if best is None or abs(angle) < abs(best[4]) - 1e-12:
            best = box
    return best


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A noisy two-colour gradient with soft blotches."""
    base = rng.integers(0, 256, (2, 3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    image = base[0] * (1 - ramp[..., None]) + base[1] * ramp[..., None]
    blotches = rng.normal(0, 1, (size // 16 + 1, size // 16 + 1, 3)).astype(np.float32)
    blotches = np.asarray(Image.fromarray(((blotches * 20) + 128).clip(0, 255).astype(np.uint8))
                          .resize((size, size), Image.BICUBIC), np.float32) - 128
    noise = rng.normal(0, rng.uniform(3, 14), (size, size, 3)).astype(np.float32)
    return Image.fromarray((image + blotches + noise).clip(0, 255).astype(np.uint8))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _contrasting_colour(rng: np.random.Generator, behind: tuple[int, int, int],
                        min_distance: float = 80.0) -> tuple[int, int, int]:
    """A random colour at least `min_distance` (RGB Euclidean) from what lies behind it."""
    colour = _colour(rng)
    for _ in range(20):
        if math.dist(colour, behind[:3]) >= min_distance:
            break
        colour = _colour(rng)
    return colour


def _overlap_too_much(box: np.ndarray, boxes: list[np.ndarray], limit: float) -> bool:
    for other in boxes:
        iw = min(box[2], other[2]) - max(box[0], other[0])
        ih = min(box[3], other[3]) - max(box[1], other[1])
        if iw > 0 and ih > 0:
            inter = iw * ih
            smaller = min((box[2] - box[0]) * (box[3] - box[1]),
                          (other[2] - other[0]) * (other[3] - other[1]))
            if inter / smaller > limit:
                return True
    return False


def _visible_masks(shapes: list[tuple[np.ndarray | None, np.ndarray]], big: int, size: int
                   ) -> list[np.ndarray]:
    """[size, size] bool masks of the visible part of each shape, in drawing order: each shape
    drawn at the supersampled size, minus the shapes drawn after it, then a pixel is the
    shape's where it covers at least half of the pixel."""
    masks = []
    for vertices, box in shapes:
        layer = Image.new('L', (big, big), 0)
        if vertices is None:
            ImageDraw.Draw(layer).ellipse(box.tolist(), fill=255)
        else:
            ImageDraw.Draw(layer).polygon([tuple(p) for p in vertices], fill=255)
        masks.append(np.asarray(layer) > 0)
    visible = []
    for index, mask in enumerate(masks):
        covered = np.logical_or.reduce(masks[index + 1:]) if index + 1 < len(masks) else False
        small = Image.fromarray(((mask & ~covered) * 255).astype(np.uint8)).resize(
            (size, size), Image.BOX)
        visible.append(np.asarray(small) >= 128)
    return visible


def render_image(seed: int, split: str, index: int, config: ShapesConfig = ShapesConfig()
                 ) -> tuple[Image.Image, list[dict]]:
    """One image and its objects ({'bbox': [x, y, w, h], 'category_id': 1-based, 'mask':
    [size, size] bool, the visible part, 'rbox': [cx, cy, w, h, angle] le90, 'polygon':
    [V, 2] vertices or None for a circle})."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    size, big = config.size, config.size * SUPERSAMPLE
    canvas = _background(rng, size).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(0, config.clutter + 1))):      # unlabelled clutter
        if rng.random() < 0.5:
            points = rng.uniform(0, big, (int(rng.integers(2, 4)), 2))
            draw.line([tuple(p) for p in points], fill=_colour(rng),
                      width=int(rng.integers(1, 4)) * SUPERSAMPLE)
        else:
            centre, radius = rng.uniform(0, big, 2), rng.uniform(1, 4) * SUPERSAMPLE
            draw.ellipse([*(centre - radius), *(centre + radius)], fill=_colour(rng))
    boxes: list[np.ndarray] = []
    objects, shapes = [], []
    wanted = int(rng.integers(config.min_objects, config.max_objects + 1))
    for _ in range(wanted * 4):                                     # tries
        if len(objects) == wanted:
            break
        label = int(rng.integers(0, len(SHAPE_CLASSES)))
        kind = SHAPE_CLASSES[label]
        radius = rng.uniform(config.min_side, config.max_side) * big / 2
        if kind == 'circle':
            vertices, rotation = None, 0.0
            half = np.array([radius, radius])
        else:
            rotation = rng.uniform(0, 2 * math.pi)
            vertices = _polygon(kind, radius, rotation)
            half = None
        low = vertices.min(0) if vertices is not None else -half
        high = vertices.max(0) if vertices is not None else half
        centre = np.array([rng.uniform(-low[0], big - high[0]), rng.uniform(-low[1], big - high[1])])
        box = np.concatenate([centre + low, centre + high])
        if _overlap_too_much(box, boxes, config.max_overlap):
            continue
        fill = _contrasting_colour(rng, canvas.getpixel((int(centre[0]), int(centre[1]))))
        if vertices is None:
            draw.ellipse(box.tolist(), fill=fill)
        else:
            draw.polygon([tuple(p) for p in vertices + centre], fill=fill)
        if rng.random() < 0.3:                                      # an outline in another colour
            width = int(rng.integers(1, 3)) * SUPERSAMPLE
            if vertices is None:
                draw.ellipse(box.tolist(), outline=_colour(rng), width=width)
            else:
                draw.polygon([tuple(p) for p in vertices + centre], outline=_colour(rng),
                             width=width)
        boxes.append(box)
        shapes.append((None if vertices is None else vertices + centre, box))
        x1, y1, x2, y2 = (box / SUPERSAMPLE).tolist()
        rbox = oriented_box(kind, None if vertices is None else vertices + centre, centre,
                            radius, rotation)
        objects.append({'bbox': [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                        'category_id': label + 1,
                        'rbox': [v / SUPERSAMPLE for v in rbox[:4]] + [rbox[4]],
                        'polygon': None if vertices is None else (vertices + centre) / SUPERSAMPLE})
    for obj, mask in zip(objects, _visible_masks(shapes, big, size)):
        obj['mask'] = mask
    image = canvas.resize((size, size), Image.BOX)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return image, objects


def write_split(out_dir: Path, split: str, count: int, seed: int, config: ShapesConfig,
                progress=None, rotated: bool = False) -> Path:
    """Write `count` images to out_dir/split/ and out_dir/annotations/instances_<split>.json
    (`rotated`: with each annotation's `rbox`)."""
    from pycocotools import mask as mask_utils
    image_dir = out_dir / split
    image_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'annotations').mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image, objects = render_image(seed, split, index, config)
        file_name = f'{index:06d}.png'
        with atomic_write(image_dir / file_name) as handle:
            image.save(handle, format='PNG')
        images.append({'id': index + 1, 'file_name': file_name, 'height': config.size,
                       'width': config.size})
        for obj in objects:
            rle = mask_utils.encode(np.asfortranarray(obj['mask'].astype(np.uint8)))
            annotations.append({'id': len(annotations) + 1, 'image_id': index + 1,
                                'category_id': obj['category_id'], 'bbox': obj['bbox'],
                                'area': float(mask_utils.area(rle)), 'iscrowd': 0,
                                'segmentation': {'size': [int(v) for v in rle['size']],
                                                 'counts': rle['counts'].decode('ascii')}})
            if rotated:
                annotations[-1]['rbox'] = [round(v, 3) for v in obj['rbox'][:4]] + [
                    round(obj['rbox'][4], 6)]
        if progress is not None:
            progress.update(1)
    info = {'description': f'detdeploy shapes, split {split}, seed {seed}', 'version': '1',
            'image_size': config.size}
    if rotated:
        info['rbox'] = ROTATED_FORMAT
    coco = {
        'info': info,
        'licenses': [],
        'images': images,
        'annotations': annotations,
        'categories': [{'id': i + 1, 'name': name, 'supercategory': 'shape'}
                       for i, name in enumerate(SHAPE_CLASSES)],
    }
    ann_path = out_dir / 'annotations' / f'instances_{split}.json'
    with atomic_write(ann_path, 'w') as handle:
        json.dump(coco, handle)
    return ann_path


def make_shapes_dataset(out_dir: str | Path, train: int, val: int, size: int = 320,
                        seed: int = 0, show_progress: bool = False, rotated: bool = False
                        ) -> dict[str, Path]:
    """The whole dataset; returns the annotation file of each split (`rotated`: annotations
    also carry `rbox`, the oriented box)."""
    if train < 0 or val < 0 or train + val == 0:
        raise DetdeployError('make-dataset needs --train and/or --val image counts above 0')
    if size < 64:
        raise DetdeployError(f'--size {size}: images must be at least 64 pixels')
    # per image: float32 noise (3 channels) and coordinate grids (2), the 2x drawing canvas
    check_memory(size * size * (3 * 4 + 2 * 4 + 3 * SUPERSAMPLE ** 2),
                 f'--size {size} ({size}x{size} images)')
    out = Path(out_dir)
    config = ShapesConfig(size=size)
    written = {}
    from tqdm import tqdm
    with tqdm(total=train + val, disable=not show_progress, unit='img') as progress:
        for split, count in (('train', train), ('val', val)):
            if count:
                written[split] = write_split(out, split, count, seed, config, progress,
                                             rotated)
    return written
