"""The rotated NMS pair screen's sort and sweep (models/rotated_nms.py, issue 16): the pairs it
enumerates are exactly the same-image, same-label pairs whose enclosing boxes overlap in x,
counted by brute force in numpy, and the screened pairs are those of the dense N x N bound, on
property-generated and hostile inputs (several images and labels, invalid boxes, NaN and
infinite coordinates, coordinates beyond the sweep's clamp); the exported NMS on such inputs
equals eager PyTorch in ONNX Runtime."""
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detdeploy.models.rotated_nms import (SCREEN_MARGIN, SWEEP_LIMIT, _enclosing_half_extents,
                                          _sweep_candidates, candidate_pairs, rotated_nms)


def brute_force_pairs(boxes, labels, valid, iou_thr):
    """Every (image, i < j) pair of one label, both valid, whose dense bound exceeds the
    threshold, by a loop in float32 numpy (the enclosing extents from the library, which is
    not what is under test here). Returns a set of (image, i, j)."""
    half = (_enclosing_half_extents(torch.from_numpy(boxes)) * (1 + SCREEN_MARGIN)).numpy()
    factor = np.float32(iou_thr * (1 - SCREEN_MARGIN))
    found = set()
    with np.errstate(invalid='ignore', over='ignore'):
        area = boxes[..., 2] * boxes[..., 3]
        for image, i, j in zip(*np.nonzero(np.ones(labels.shape + labels.shape[1:]))):
            if i >= j or labels[image, i] != labels[image, j] or not (valid[image, i]
                                                                      and valid[image, j]):
                continue
            overlap = [np.maximum(half[image, i, axis] + half[image, j, axis] - np.abs(
                boxes[image, i, axis] - boxes[image, j, axis]), np.float32(0)) for axis in (0, 1)]
            bound = np.minimum(overlap[0] * overlap[1],
                               np.minimum(area[image, i], area[image, j]))
            if bound > (area[image, i] + area[image, j] - bound) * factor:
                found.add((int(image), int(i), int(j)))
    return found


coordinate = st.one_of(st.floats(0, 100), st.sampled_from(
    [float('nan'), float('inf'), -float('inf'), 3 * SWEEP_LIMIT, -3 * SWEEP_LIMIT, 50.0]))
size = st.one_of(st.floats(-2, 40), st.sampled_from([0.0, 1e-3, float('inf'), 4e6]))
box = st.tuples(coordinate, st.floats(0, 100), size, size,
                st.floats(-1.57, 1.57), st.integers(0, 2), st.booleans())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.tuples(st.integers(1, 3), st.integers(0, 14)).flatmap(lambda shape: st.lists(
    st.lists(box, min_size=shape[1], max_size=shape[1]), min_size=shape[0], max_size=shape[0])))
def test_screen_equals_the_dense_bound(images):
    count = len(images[0])
    rows = np.array([[b[:5] for b in image] for image in images], dtype=np.float32).reshape(
        len(images), count, 5)
    labels = np.array([[b[5] for b in image] for image in images], dtype=np.int64).reshape(
        len(images), count)
    valid = np.array([[b[6] for b in image] for image in images], dtype=bool).reshape(
        len(images), count)
    got = candidate_pairs(torch.from_numpy(rows), torch.from_numpy(labels),
                          torch.from_numpy(valid), 0.1).tolist()
    assert len(got) == len({tuple(pair) for pair in got})
    assert {tuple(pair) for pair in got} == brute_force_pairs(rows, labels, valid, 0.1)


def test_sweep_enumerates_only_overlapping_pairs_of_a_group():
    generator = np.random.default_rng(0)
    count = 3000
    left = generator.uniform(0, 10000, count).astype(np.float32)
    right = left + generator.uniform(0, 30, count).astype(np.float32)
    group = generator.integers(0, 15, count)
    a, b = _sweep_candidates(torch.from_numpy(left), torch.from_numpy(right),
                             torch.from_numpy(group))
    pairs = {tuple(sorted(p)) for p in zip(a[:-1].tolist(), b[:-1].tolist())}
    want = {(i, j) for i in range(count) for j in np.nonzero(
        (group == group[i]) & (np.maximum(left, left[i]) <= np.minimum(right, right[i])))[0]
        if i < j}
    assert len(a) == len(want) + 1 and pairs == want       # one spare pair at the end
    assert len(want) < count                               # linear here, not N x N


class NMSGraph(torch.nn.Module):
    def forward(self, boxes, scores, labels):
        return tuple(rotated_nms(boxes, scores, labels, 0.05, 0.1, 400))


@pytest.fixture(scope='module')
def nms_session():
    batch, count = torch.export.Dim('batch', min=1, max=64), torch.export.Dim('count', min=1)
    example = (torch.rand(2, 30, 5) * 20 + 1, torch.rand(2, 30), torch.randint(0, 3, (2, 30)))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore')
        model = torch.onnx.export(
            NMSGraph(), example, dynamo=True, input_names=['boxes', 'scores', 'labels'],
            dynamic_shapes={n: {0: batch, 1: count} for n in ('boxes', 'scores', 'labels')}
        ).model_proto
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {'', 'ai.onnx'}
    return ort.InferenceSession(model.SerializeToString(), providers=['CPUExecutionProvider'])


def hostile_candidates(batch: int, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    objects = torch.rand(batch, count // 8 + 1, 2, generator=generator) * 900
    owner = torch.randint(0, objects.shape[1], (batch, count), generator=generator)
    centres = objects.gather(1, owner[..., None].expand(-1, -1, 2))
    boxes = torch.cat([centres + torch.randn(batch, count, 2, generator=generator) * 3,
                       torch.rand(batch, count, 2, generator=generator) * 40 + 4,
                       (torch.rand(batch, count, 1, generator=generator) - 0.5) * math.pi], 2)
    if count >= 8:
        boxes[0, :4, 0] = torch.tensor([float('nan'), float('inf'), 5 * SWEEP_LIMIT,
                                        5 * SWEEP_LIMIT + 1])
        boxes[-1, -3:] = boxes[-1, -4]             # identical boxes
    scores = torch.rand(batch, count, generator=generator)
    labels = torch.randint(0, 15, (batch, count), generator=generator) * 7   # sparse label ids
    return boxes, scores, labels


@pytest.mark.parametrize('batch,count', [(1, 1500), (3, 300), (2, 1)])
def test_exported_sweep_nms_equals_eager(nms_session, batch, count):
    inputs = hostile_candidates(batch, count, seed=batch * 7 + count)
    want = [t.numpy() for t in NMSGraph()(*inputs)]
    got = nms_session.run(None, dict(zip(('boxes', 'scores', 'labels'),
                                         (t.numpy() for t in inputs))))
    for got_array, want_array in zip(got, want):
        np.testing.assert_array_equal(got_array, want_array)
