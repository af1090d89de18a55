"""`make-dataset shapes --rotated`: every shape's oriented box (`rbox`, le90) holds the drawn
polygon tightly, checked with shapely (containment, every side touching, and for convex shapes
the area of shapely's minimum rotated rectangle); the images and other fields are unchanged."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from detdeploy.training.shapes import SHAPE_CLASSES, ShapesConfig, make_shapes_dataset, render_image

shapely = pytest.importorskip('shapely')
from shapely.geometry import LineString, Polygon  # noqa: E402


def corners(box) -> np.ndarray:
    """The box's four corners, written here from the definition (centre +- half sides along the
    angle's axes), not with the project's corner code."""
    cx, cy, w, h, angle = box
    along = np.array([math.cos(angle), math.sin(angle)]) * w / 2
    across = np.array([-math.sin(angle), math.cos(angle)]) * h / 2
    centre = np.array([cx, cy])
    return np.array([centre - along - across, centre + along - across,
                     centre + along + across, centre - along + across])


@pytest.fixture(scope='module')
def objects():
    config = ShapesConfig(size=128)
    found = []
    for index in range(40):
        found += render_image(3, 'train', index, config)[1]
    return found


def test_boxes_are_le90(objects):
    boxes = np.array([o['rbox'] for o in objects])
    assert len(boxes) > 100
    assert (boxes[:, 2] >= boxes[:, 3] * (1 - 1e-9)).all()
    assert (boxes[:, 4] >= -math.pi / 2).all() and (boxes[:, 4] < math.pi / 2).all()


def test_polygons_fit_tightly(objects):
    kinds = set()
    for obj in objects:
        kind = SHAPE_CLASSES[obj['category_id'] - 1]
        if obj['polygon'] is None:
            continue
        kinds.add(kind)
        box, shape = Polygon(corners(obj['rbox'])), Polygon(obj['polygon'])
        scale = obj['rbox'][2]
        assert box.buffer(1e-9 * scale).contains(shape), kind
        for start, end in zip(corners(obj['rbox']), np.roll(corners(obj['rbox']), -1, 0)):
            assert LineString([start, end]).distance(shape.exterior) < 1e-9 * scale, kind
        if kind in ('square', 'triangle', 'hexagon'):
            # convex regular shapes: no smaller rotated rectangle holds them
            assert box.area == pytest.approx(shape.minimum_rotated_rectangle.area, rel=1e-9)
        # symmetric shapes take the frame nearest angle 0 (square and cross: within 45 deg)
        limit = {'square': math.pi / 4, 'cross': math.pi / 4, 'triangle': math.pi / 6,
                 'hexagon': math.pi / 6, 'star': math.pi / 10}[kind]
        assert abs(obj['rbox'][4]) <= limit + 1e-9, kind
    assert kinds == set(SHAPE_CLASSES) - {'circle'}


def test_circles_are_their_square_at_angle_zero(objects):
    circles = [o for o in objects if o['polygon'] is None]
    assert circles
    for obj in circles:
        x, y, w, h = obj['bbox']
        assert obj['rbox'] == pytest.approx([x + w / 2, y + h / 2, w, h, 0.0], abs=0.01)


def test_rotated_flag_only_adds_rbox(tmp_path):
    plain = make_shapes_dataset(tmp_path / 'plain', 2, 1, size=64, seed=5)
    rotated = make_shapes_dataset(tmp_path / 'rot', 2, 1, size=64, seed=5, rotated=True)
    for split in ('train', 'val'):
        a, b = json.loads(plain[split].read_text()), json.loads(rotated[split].read_text())
        assert 'rbox' in b['info'] and 'rbox' not in a['info']
        assert all('rbox' not in ann for ann in a['annotations'])
        assert [{k: v for k, v in ann.items() if k != 'rbox'} for ann in b['annotations']] \
            == a['annotations']
        objects = [o for i in range(len(a['images'])) for o in render_image(5, split, i,
                                                                           ShapesConfig(size=64))[1]]
        np.testing.assert_allclose([ann['rbox'] for ann in b['annotations']],
                                   [o['rbox'] for o in objects], atol=1e-3)
        for index in range(len(a['images'])):
            name = f'{index:06d}.png'
            assert (tmp_path / 'plain' / split / name).read_bytes() == \
                (tmp_path / 'rot' / split / name).read_bytes()
