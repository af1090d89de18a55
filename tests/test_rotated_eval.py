"""DOTA-style rotated mAP (evaluation/rotated_eval.py) on hand-computed cases: hits, duplicates,
misses, ignored (difficult) ground truth, the le90 angle edge, both AP modes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from detdeploy.evaluation.rotated_eval import RotatedImage, average_precision, rotated_map

SQUARE_A = [10, 10, 10, 10, 0.0]
SQUARE_B = [50, 50, 10, 10, 0.0]


def image(boxes, labels, scores=None, ignore=None):
    return RotatedImage(np.array(boxes, np.float32).reshape(-1, 5), np.array(labels, np.int64),
                        None if scores is None else np.array(scores, np.float32),
                        None if ignore is None else np.array(ignore, bool))


def test_hits_duplicates_and_misses_by_hand():
    gt = image([SQUARE_A, SQUARE_B], [0, 0])
    # by score: A exactly (hit), a far box (miss), A again (duplicate), B turned by 45 degrees
    # (IoU sqrt(2)/2: hit). Recall .5 .5 .5 1, precision 1 .5 1/3 .5.
    det = image([SQUARE_A, [100, 100, 5, 5, 0], SQUARE_A, [50, 50, 10, 10, math.pi / 4]],
                [0, 0, 0, 0], [0.9, 0.8, 0.7, 0.6])
    voc07 = rotated_map([det], [gt], ['square'])
    assert voc07.map == pytest.approx((6 * 1 + 5 * 0.5) / 11)
    assert voc07.per_class[0].num_gts == 2 and voc07.per_class[0].recall == 1.0
    area = rotated_map([det], [gt], ['square'], mode='area')
    assert area.map == pytest.approx(0.5 * 1 + 0.5 * 0.5)


def test_threshold_rotation_ignore_and_classes_without_ground_truth():
    gt = image([[0, 0, 20, 10, 0.0], [40, 0, 10, 10, 0.0], [80, 0, 10, 30, math.pi / 2 - 1e-6],
                [120, 0, 10, 10, 0.0]], [0, 0, 0, 1], ignore=[False, False, False, True])
    det = image([[0, 0, 20, 10, math.pi / 2],      # the box turned upright: IoU 1/3, a miss
                 [44, 0, 10, 10, 0.0],             # IoU 60/140 < 0.5: a miss
                 [80, 0, 10, 30, -math.pi / 2],    # the same box at the other le90 edge: a hit
                 [120, 0, 10, 10, 0.0],            # on an ignored box: neither
                 [200, 0, 5, 5, 0.0]],             # class 2 has no ground truth
                [0, 0, 0, 1, 2], [0.9, 0.8, 0.7, 0.6, 0.5])
    result = rotated_map([det], [gt], ['a', 'b', 'c'])
    a, b, c = result.per_class
    # class a: miss, miss, hit -> recall 1/3 at precision 1/3
    assert a.num_gts == 3 and a.recall == pytest.approx(1 / 3)
    assert a.ap == pytest.approx(4 * (1 / 3) / 11)
    assert b.num_gts == 0 and b.ap == 0.0 and c.num_gts == 0
    assert result.map == pytest.approx(a.ap)          # only classes with ground truth count


def test_images_are_pooled_per_class_and_empty_images():
    gts = [image([SQUARE_A], [0]), image(np.zeros((0, 5)), []), image([SQUARE_B], [0])]
    dets = [image([SQUARE_A], [0], [0.5]), image([SQUARE_A], [0], [0.9]),
            image(np.zeros((0, 5)), [], [])]
    # pooled by score: 0.9 (image 2, no ground truth: a miss), 0.5 (a hit); one box never found
    result = rotated_map(dets, gts, ['square'], mode='area')
    assert result.per_class[0].recall == 0.5
    assert result.map == pytest.approx(0.5 * 0.5)


def test_average_precision_modes():
    recalls, precisions = np.array([0.2, 0.4, 0.4, 0.8]), np.array([1.0, 1.0, 0.67, 0.8])
    assert average_precision(recalls, precisions, 'area') == pytest.approx(0.4 * 1 + 0.4 * 0.8)
    assert average_precision(recalls, precisions) == pytest.approx((5 * 1 + 4 * 0.8) / 11)
    with pytest.raises(ValueError):
        average_precision(recalls, precisions, 'coco')


def test_coco_eval_refuses_rotated_models(tmp_path):
    from conftest import fake_metadata
    from detdeploy.core.errors import DetdeployError
    from detdeploy.evaluation.coco_eval import evaluate
    from detdeploy.runtimes.backend import Backend

    class RotatedFile(Backend):
        name = 'fake'
        metadata = fake_metadata(task='rotated')
    with pytest.raises(DetdeployError, match="task is 'rotated'.*evaluate_rotated"):
        evaluate(RotatedFile(), tmp_path / 'ann.json', tmp_path)
