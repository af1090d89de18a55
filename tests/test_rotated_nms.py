"""Rotated IoU and rotated NMS (models/rotated_nms.py) against an independent implementation:
shapely's exact polygon intersection in float64 and a transcription of mmcv's CPU
`nms_rotated` kernel (greedy, per class), on property-generated and hostile cases; and the
dynamo export of the NMS run by ONNX Runtime, equal to eager PyTorch."""
from __future__ import annotations

import contextlib
import io
import math
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from detdeploy.models.rotated_nms import rotated_box_corners, rotated_iou_matrix, rotated_nms

shapely = pytest.importorskip('shapely')
from shapely.geometry import Polygon  # noqa: E402

IOU_ATOL = 2e-5      # float32 clipping against float64 shapely, boxes of up to ~100 px


def iou_tolerance(boxes: np.ndarray) -> np.ndarray:
    """IOU_ATOL, plus what float32 corners cost thin boxes: a corner is off by about 1e-7 of the
    coordinates' magnitude, so an area by that times the perimeter, relative to the area."""
    magnitude = np.abs(boxes[:, :2]).max() + boxes[:, 2:4].max()
    perimeter, area = 2 * (boxes[:, 2] + boxes[:, 3]), boxes[:, 2] * boxes[:, 3]
    return IOU_ATOL + 2e-7 * magnitude * (perimeter[:, None] + perimeter[None]) / np.minimum(
        area[:, None], area[None])


def shapely_iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """The reference: float64 corners, shapely intersection areas."""
    def polygon(box):
        return Polygon(rotated_box_corners(torch.tensor(box, dtype=torch.float64)).numpy())
    polys_a, polys_b = [polygon(b) for b in boxes_a], [polygon(b) for b in boxes_b]
    out = np.zeros((len(polys_a), len(polys_b)))
    for i, pa in enumerate(polys_a):
        for j, pb in enumerate(polys_b):
            inter = pa.intersection(pb).area
            union = pa.area + pb.area - inter
            out[i, j] = inter / union if pa.area > 1e-14 and pb.area > 1e-14 else 0.0
    return out


def reference_nms(boxes, scores, labels, iou_thr):
    """mmcv's nms_rotated_cpu_kernel, per class: boxes by descending score (stable here), each
    kept box suppresses the later ones of its label it overlaps; IoU from shapely."""
    order = np.argsort(-scores, kind='stable')
    iou = shapely_iou_matrix(boxes, boxes)
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[position + 1:]:
            if labels[j] == labels[i] and iou[i, j] > iou_thr:
                suppressed[j] = True
    return np.array(keep, dtype=np.int64), iou


HOSTILE = np.array([
    [10, 10, 4, 2, 0.3], [10, 10, 4, 2, 0.3],                 # identical
    [10, 10, 4, 2, -math.pi / 2], [10, 10, 2, 4, 0.0],         # the same box two ways
    [10, 10, 4, 2, math.pi / 2 - 1e-7],                        # angle at the le90 edge
    [12, 10, 4, 2, 0.0], [16, 10, 4, 2, 0.0],                  # parallel edges, touching
    [10, 10, 1e-3, 1e-3, 0.1], [10, 10, 1e-3, 5, 0.2],         # tiny, sliver
    [10, 10, 4, 4, math.pi / 4], [10, 10, 4, 4, 0.0],          # octagon intersection
    [10, 11, 4, 2, 0.0], [10.5, 10, 3, 2, 0.0],                # shared edge lines, contained
    [1000, 1000, 40, 2, 1.2], [1000.0001, 1000, 40, 2, 1.2],   # far from the origin
    [10, 10, 40, 0.5, -1.5707], [10, 10, 40, 0.5, 1.5707],     # thin, nearly +-pi/2
], dtype=np.float32)


def test_iou_hostile_cases_match_shapely():
    got = rotated_iou_matrix(torch.from_numpy(HOSTILE), torch.from_numpy(HOSTILE)).numpy()
    want = shapely_iou_matrix(HOSTILE.astype(np.float64), HOSTILE.astype(np.float64))
    assert (np.abs(got - want) <= iou_tolerance(HOSTILE)).all()
    assert got.max() <= 1.0
    assert got[0, 1] == pytest.approx(1.0, abs=1e-6) and got[2, 3] == pytest.approx(1.0, abs=1e-6)
    assert got[5, 6] == 0.0                       # touching along an edge: no area
    assert got[9, 10] == pytest.approx(math.sqrt(2) / 2, abs=1e-5)
    # a sliver thinner than float32 resolves at its position has (almost) no area: IoU about 0, not NaN
    sliver = torch.tensor([[10, 10, 1e-8, 5, 0.2], [10, 10, 4, 2, 0.0]])
    sliver_iou = rotated_iou_matrix(sliver, sliver)[0]
    assert torch.isfinite(sliver_iou).all() and sliver_iou.max() < 1e-6


box_strategy = st.tuples(
    st.floats(0, 60), st.floats(0, 60), st.floats(0.01, 40), st.floats(0.01, 40),
    st.one_of(st.floats(-math.pi / 2, math.pi / 2, exclude_max=True),
              st.sampled_from([-math.pi / 2, 0.0, math.pi / 4, math.pi / 2 - 1e-6])))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(box_strategy, min_size=1, max_size=12))
def test_iou_matches_shapely(boxes):
    boxes = np.array(boxes, dtype=np.float32)
    # pairs sharing the box, rotated copies and shifted copies: the cases clipping finds hard
    boxes = np.concatenate([boxes, boxes + [0.5, 0, 0, 0, 0], boxes * [1, 1, 1, 1, -1]])
    got = rotated_iou_matrix(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy()
    want = shapely_iou_matrix(boxes.astype(np.float64), boxes.astype(np.float64))
    assert (np.abs(got - want) <= iou_tolerance(boxes)).all()


def nms_one_image(boxes, scores, labels, iou_thr, score_thr=0.0, max_det=1000):
    outputs = rotated_nms(torch.from_numpy(boxes)[None], torch.from_numpy(scores)[None],
                          torch.from_numpy(labels)[None], score_thr, iou_thr, max_det)
    count = int(outputs.num_dets[0, 0])
    return outputs.boxes[0, :count].numpy(), outputs.scores[0, :count].numpy(), \
        outputs.labels[0, :count].numpy()


clustered_boxes = st.lists(
    st.tuples(st.integers(0, 3), st.floats(-4, 4), st.floats(-4, 4), st.floats(4, 30),
              st.floats(4, 30), st.floats(-math.pi / 2, math.pi / 2, exclude_max=True),
              st.floats(0.01, 1), st.integers(0, 2)),
    min_size=1, max_size=40)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(clustered_boxes, st.sampled_from([0.1, 0.5, 0.7]))
def test_nms_matches_mmcv_kernel_on_shapely_iou(rows, iou_thr):
    centres = np.array([[20, 20], [40, 25], [25, 45], [60, 60]], dtype=np.float32)
    boxes = np.array([[*(centres[c] + [dx, dy]), w, h, a] for c, dx, dy, w, h, a, _, _ in rows],
                     dtype=np.float32)
    scores = np.array([r[6] for r in rows], dtype=np.float32)
    labels = np.array([r[7] for r in rows], dtype=np.int64)
    keep, iou = reference_nms(boxes, scores, labels, iou_thr)
    assume(not np.any(np.abs(iou - iou_thr) < 1e-4))          # no threshold ties in float32
    assume(len(np.unique(scores)) == len(scores))
    got_boxes, got_scores, got_labels = nms_one_image(boxes, scores, labels, iou_thr)
    np.testing.assert_array_equal(got_boxes, boxes[keep])
    np.testing.assert_array_equal(got_scores, scores[keep])
    np.testing.assert_array_equal(got_labels, labels[keep])


def test_nms_hostile_cases():
    scores = np.linspace(0.9, 0.1, len(HOSTILE)).astype(np.float32)
    labels = np.zeros(len(HOSTILE), dtype=np.int64)
    for iou_thr in (0.1, 0.5, 0.99):
        keep, _ = reference_nms(HOSTILE, scores, labels, iou_thr)
        got_boxes, _, _ = nms_one_image(HOSTILE, scores, labels, iou_thr)
        np.testing.assert_array_equal(got_boxes, HOSTILE[keep])
    # per class: the identical box of another label survives; a chain a > b > c keeps a and c
    boxes = np.array([[0, 0, 10, 10, 0], [0, 0, 10, 10, 0], [6, 0, 10, 10, 0],
                      [12, 0, 10, 10, 0]], dtype=np.float32)
    got_boxes, _, got_labels = nms_one_image(
        boxes, np.array([0.9, 0.8, 0.7, 0.6], np.float32), np.array([0, 1, 0, 0]), 0.2)
    np.testing.assert_array_equal(got_boxes, boxes[[0, 1, 3]])
    np.testing.assert_array_equal(got_labels, [0, 1, 0])


def test_nms_score_threshold_max_det_and_padding():
    boxes = np.array([[i * 50, 0, 10, 10, 0] for i in range(6)], dtype=np.float32)
    scores = np.array([0.9, 0.05, 0.8, 0.7, 0.06, 0.6], np.float32)
    outputs = rotated_nms(torch.from_numpy(boxes)[None], torch.from_numpy(scores)[None],
                          torch.zeros(1, 6, dtype=torch.int64), 0.05, 0.1, 3)
    assert outputs.num_dets.tolist() == [[3]]
    np.testing.assert_array_equal(outputs.scores[0].numpy(), scores[[0, 2, 3]])
    none = rotated_nms(torch.from_numpy(boxes)[None], torch.zeros(1, 6), torch.zeros(1, 6).long(),
                       0.05, 0.1, 4)
    assert none.num_dets.tolist() == [[0]] and none.labels.tolist() == [[-1] * 4]
    assert not none.boxes.any()


class NMSGraph(torch.nn.Module):
    def forward(self, boxes, scores, labels):
        return tuple(rotated_nms(boxes, scores, labels, 0.05, 0.1, 50))


@pytest.fixture(scope='module')
def nms_session():
    batch = torch.export.Dim('batch', min=1, max=64)
    count = torch.export.Dim('count', min=1, max=100000)
    example = (torch.rand(2, 30, 5) * 20 + 1, torch.rand(2, 30), torch.randint(0, 3, (2, 30)))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore')
        program = torch.onnx.export(
            NMSGraph(), example, dynamo=True, input_names=['boxes', 'scores', 'labels'],
            dynamic_shapes={name: {0: batch, 1: count} for name in ('boxes', 'scores', 'labels')})
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {'', 'ai.onnx'}
    return ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])


def random_candidates(generator, batch, count, low_scores=False):
    boxes = torch.cat([torch.rand(batch, count, 2, generator=generator) * 100,
                       torch.rand(batch, count, 2, generator=generator) * 30 + 0.5,
                       (torch.rand(batch, count, 1, generator=generator) - 0.5) * math.pi], 2)
    scores = torch.rand(batch, count, generator=generator) * (0.05 if low_scores else 1)
    labels = torch.randint(0, 3, (batch, count), generator=generator)
    return boxes, scores, labels


@pytest.mark.parametrize('batch,count,low_scores', [(1, 1, False), (3, 200, False),
                                                     (2, 40, True), (1, 7, False)])
def test_exported_nms_equals_eager(nms_session, batch, count, low_scores):
    generator = torch.Generator().manual_seed(batch * 1000 + count)
    inputs = random_candidates(generator, batch, count, low_scores)
    if count == 7:                     # hostile: identical boxes, one per label and repeated
        inputs[0][:] = torch.tensor([10.0, 10, 4, 2, math.pi / 2 - 1e-7])
    want = [t.numpy() for t in NMSGraph()(*inputs)]
    got = nms_session.run(None, dict(zip(('boxes', 'scores', 'labels'),
                                         (t.numpy() for t in inputs))))
    for got_array, want_array in zip(got, want):
        np.testing.assert_array_equal(got_array, want_array)
