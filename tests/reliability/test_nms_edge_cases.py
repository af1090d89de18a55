"""Post-processing on hostile values: PyTorch (`detdeploy::batched_nms`) and the exported graph
(`--nms onnx` in ONNX Runtime) give identical outputs, and each edge case has a defined result.

The post-processing is exported alone (`PostprocessGraph`: scores and box distances in, the four
NMS outputs out), so NaN, inf, degenerate and duplicated boxes can be fed to both runtimes.
"""
import dataclasses

import numpy as np
import onnxruntime
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from detdeploy.export.exporter import export_postprocess
from detdeploy.export.graph import PostprocessGraph
from detdeploy.core.nms import NMSConfig
from detdeploy.models.priors import grid_priors

FEATURE_SIZES = [(8, 8), (4, 4), (2, 2)]     # a 64x64 input at strides 8, 16, 32
STRIDES = (8, 16, 32)
INPUT_HW = (64, 64)
NUM_CLASSES = 3
BATCH = 2
# IoU 0.6 rounds up in float32 (0.6000000238): the threshold where float32 and float64
# comparisons differ. Pre-top-k 20 is below every level's pair count but the last (12).
NMS = NMSConfig(score_thr=0.05, pre_top_k=20, iou_thr=0.6, max_det=30)
NUM_ANCHORS = sum(h * w for h, w in FEATURE_SIZES)
PRIORS = grid_priors(FEATURE_SIZES, STRIDES).numpy()          # [N, 2] (x, y)
LEVEL0 = FEATURE_SIZES[0][0] * FEATURE_SIZES[0][1]


class PostprocessRunner:
    """The same post-processing in PyTorch and in ONNX Runtime."""

    def __init__(self):
        self.graph = PostprocessGraph(FEATURE_SIZES, STRIDES, INPUT_HW, NMS).eval()
        model = export_postprocess(self.graph, NUM_CLASSES, batch=BATCH)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                    providers=['CPUExecutionProvider'])

    def torch(self, scores, distances):
        scores, distances = (torch.from_numpy(np.ascontiguousarray(a, np.float32))
                             for a in (scores, distances))
        with torch.no_grad():
            return [t.numpy() for t in self.graph(scores, distances)]

    def ort(self, scores, distances):
        return self.session.run(None, {'class_scores': scores, 'box_distances': distances})

    def both(self, scores, distances):
        """Outputs of both runtimes, checked identical (NaN equal to NaN); PyTorch's returned."""
        scores = np.ascontiguousarray(scores, np.float32)
        distances = np.ascontiguousarray(distances, np.float32)
        want, got = self.torch(scores, distances), self.ort(scores, distances)
        for name, a, b in zip(('num_dets', 'boxes', 'scores', 'labels'), want, got):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            np.testing.assert_array_equal(b, a, err_msg=f'{name}: ONNX Runtime vs PyTorch')
        return want


@pytest.fixture(scope='module', autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test here runs PyTorch on one thread (tests/conftest.py)."""


@pytest.fixture(scope='module')
def runner():
    return PostprocessRunner()


def distances_for(boxes_xyxy):
    """Per-anchor distances that decode exactly to `boxes_xyxy` [B, N, 4] (small integers)."""
    boxes = np.asarray(boxes_xyxy, np.float32)
    return np.concatenate([PRIORS - boxes[..., :2], boxes[..., 2:] - PRIORS], -1)


def small_boxes():
    """A 4x4 box centred on every anchor's prior: boxes of one level never overlap."""
    return np.broadcast_to(np.concatenate([PRIORS - 2, PRIORS + 2], -1),
                           (BATCH, NUM_ANCHORS, 4)).copy()


def spread_scores(seed=0):
    """Distinct scores in (0.1, 0.9) for every (anchor, class) pair of both images."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.linspace(0.1, 0.9, BATCH * NUM_ANCHORS * NUM_CLASSES)).reshape(
        BATCH, NUM_ANCHORS, NUM_CLASSES).astype(np.float32)


def detections(outputs, image):
    """(boxes, scores, labels) of one image, padding removed."""
    count = int(outputs[0][image, 0])
    return outputs[1][image, :count], outputs[2][image, :count], outputs[3][image, :count]


def assert_padding(outputs):
    for image in range(BATCH):
        count = int(outputs[0][image, 0])
        assert (outputs[1][image, count:] == 0).all() and (outputs[2][image, count:] == 0).all()
        assert (outputs[3][image, count:] == -1).all()


def assert_same_outputs(a, b):
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_normal_inputs_agree(runner):
    outputs = runner.both(spread_scores(), distances_for(small_boxes()))
    assert outputs[0].tolist() == [[NMS.max_det]] * BATCH
    assert_padding(outputs)


def test_nan_scores_are_never_selected_and_take_no_pre_top_k_slot(runner):
    scores = spread_scores(1)
    scores[:, ::3] = np.nan                       # every third anchor, all classes
    outputs = runner.both(scores, distances_for(small_boxes()))
    # the same as if those pairs scored nothing: level 0 still yields its 20 best real pairs
    assert_same_outputs(outputs, runner.torch(np.nan_to_num(scores, nan=0.0),
                                              distances_for(small_boxes())))
    assert not np.isnan(outputs[2]).any() and outputs[0].tolist() == [[NMS.max_det]] * BATCH
    scores = np.full_like(scores, np.nan)
    scores[:, 5, 1] = 0.5                         # one real score among NaN
    outputs = runner.both(scores, distances_for(small_boxes()))
    assert outputs[0].tolist() == [[1], [1]] and outputs[3][:, 0].tolist() == [1, 1]
    outputs = runner.both(np.full_like(scores, np.nan), distances_for(small_boxes()))
    assert outputs[0].tolist() == [[0], [0]]
    assert_padding(outputs)


def test_score_extremes_and_the_strict_threshold(runner):
    scores = np.zeros((BATCH, NUM_ANCHORS, NUM_CLASSES), np.float32)
    scores[:, 0, 0] = np.inf          # not a probability; ranks first if it ever arrives
    scores[:, 1, 0] = -np.inf         # never selected
    scores[:, 2, 0] = NMS.score_thr   # equal to the threshold: not selected (strictly above)
    scores[:, 3, 0] = np.nextafter(np.float32(NMS.score_thr), np.float32(1))
    scores[:, 4, 0] = 1.0
    outputs = runner.both(scores, distances_for(small_boxes()))
    assert outputs[0].tolist() == [[3], [3]]
    assert outputs[2][0, :3].tolist() == [np.inf, 1.0, scores[0, 3, 0]]


def test_all_candidates_below_the_threshold_give_empty_padded_outputs(runner):
    scores = np.full((BATCH, NUM_ANCHORS, NUM_CLASSES), NMS.score_thr * 0.99, np.float32)
    outputs = runner.both(scores, distances_for(small_boxes()))
    assert outputs[0].tolist() == [[0], [0]]
    assert_padding(outputs)


def test_an_empty_image_next_to_a_full_one(runner):
    scores = spread_scores(2)
    scores[0] = 0.0
    outputs = runner.both(scores, distances_for(small_boxes()))
    assert outputs[0].tolist() == [[0], [NMS.max_det]]
    assert_padding(outputs)
    swapped = runner.both(scores[::-1], distances_for(small_boxes()))
    assert_same_outputs([t[0] for t in swapped], [t[1] for t in outputs])


def test_nan_box_coordinates_are_never_selected(runner):
    scores, boxes = spread_scores(3), small_boxes()
    distances = distances_for(boxes)
    bad = np.arange(0, NUM_ANCHORS, 4)
    distances[:, bad, 1] = np.nan                 # the top edge of every fourth anchor
    outputs = runner.both(scores, distances)
    # such a pair is dropped after the pre-top-k, like a box without area (as MMDetection
    # filters boxes after its top-k): the same result as zero-size boxes at those anchors
    zero = distances_for(boxes)
    zero[:, bad] = 0.0
    assert_same_outputs(outputs, runner.torch(scores, zero))
    assert not np.isnan(outputs[1]).any()


def test_infinite_distances_are_clamped_to_the_input(runner):
    scores, distances = spread_scores(4), distances_for(small_boxes())
    distances[:, ::2, 2] = np.inf                 # right edge to +inf -> clamped to width
    distances[:, 1::5, 0] = np.inf                # left edge to -inf -> clamped to 0
    outputs = runner.both(scores, distances)
    finite = distances.copy()
    finite[np.isinf(finite)] = 1e6
    assert_same_outputs(outputs, runner.torch(scores, finite))
    assert np.isfinite(outputs[1]).all() and outputs[1].max() == INPUT_HW[1]


def test_inverted_and_zero_area_boxes_are_dropped_not_reordered(runner):
    scores, boxes = spread_scores(5), small_boxes()
    inverted = boxes.copy()
    inverted[:, ::2] = boxes[:, ::2][..., [2, 1, 0, 3]]      # x1 > x2 on even anchors
    inverted[:, 1::4] = boxes[:, 1::4][..., [0, 3, 2, 1]]    # y1 > y2 on some odd ones
    outputs = runner.both(scores, distances_for(inverted))
    kept_anchors = {tuple(box) for box in outputs[1][0, :outputs[0][0, 0]].tolist()}
    proper = {tuple(box) for box in boxes[0].tolist()}
    assert kept_anchors <= proper and outputs[0][0, 0] > 0
    assert (outputs[1][..., 2] >= outputs[1][..., 0]).all()
    zero_width = boxes.copy()
    zero_width[..., 2] = zero_width[..., 0]
    outputs = runner.both(scores, distances_for(zero_width))
    assert outputs[0].tolist() == [[0], [0]]
    # wholly outside the input: empty once clamped
    outside = boxes + np.float32([80, 0, 80, 0])
    assert runner.both(scores, distances_for(outside))[0].tolist() == [[0], [0]]


def test_more_candidates_than_pre_top_k_keeps_each_levels_best(runner):
    scores = np.zeros((BATCH, NUM_ANCHORS, NUM_CLASSES), np.float32)
    scores[:, :LEVEL0] = spread_scores(6)[:, :LEVEL0]        # 192 valid pairs on level 0 only
    outputs = runner.both(scores, distances_for(small_boxes()))
    for image in range(BATCH):
        best = np.sort(scores[image, :LEVEL0].ravel())[::-1][:NMS.pre_top_k]
        assert detections(outputs, image)[1].tolist() == best.tolist()


def test_equal_scores_go_to_the_lower_index(runner):
    """Ties at the pre-top-k cut, in NMS and at the max-det cut: the lower (anchor, class)
    pair index first, in both runtimes."""
    scores = np.full((BATCH, NUM_ANCHORS, NUM_CLASSES), 0.5, np.float32)
    outputs = runner.both(scores, distances_for(small_boxes()))
    pairs = np.arange(NMS.pre_top_k)              # level 0's first 20 pairs, then level 1's
    boxes, _, labels = detections(outputs, 0)
    assert labels[:NMS.pre_top_k].tolist() == (pairs % NUM_CLASSES).tolist()
    np.testing.assert_array_equal(boxes[:NMS.pre_top_k:NUM_CLASSES], np.clip(
        small_boxes()[0, :NMS.pre_top_k // NUM_CLASSES + 1], 0, INPUT_HW[1]))


def test_identical_boxes_keep_one_per_class(runner):
    scores = spread_scores(7)
    same = np.broadcast_to(np.float32([10, 10, 30, 30]), (BATCH, NUM_ANCHORS, 4))
    outputs = runner.both(scores, distances_for(same))
    for image in range(BATCH):
        boxes, kept_scores, labels = detections(outputs, image)
        assert sorted(labels.tolist()) == list(range(NUM_CLASSES))
        assert (boxes == [10, 10, 30, 30]).all()
        # each class's best pair among all levels' pre-top-k candidates survives
        assert kept_scores.max() == scores[image].max()
    ties = np.full_like(scores, 0.5)
    outputs = runner.both(ties, distances_for(same))
    assert outputs[0].tolist() == [[NUM_CLASSES]] * BATCH


def test_iou_exactly_at_the_float32_threshold_is_kept(runner):
    """IoU 60/100 is float32(0.6): not above the float32 threshold, so kept, in both (as in
    mmcv's kernel); a slightly larger overlap is suppressed."""
    scores = np.zeros((BATCH, NUM_ANCHORS, NUM_CLASSES), np.float32)
    boxes = np.zeros((BATCH, NUM_ANCHORS, 4), np.float32)
    boxes[:, 0], boxes[:, 1] = [0, 0, 10, 10], [0, 0, 10, 6]      # IoU 0.6 exactly
    boxes[:, 2], boxes[:, 3] = [20, 20, 30, 30], [20, 20, 30, 26.5]   # IoU 0.65
    scores[:, :4, 0] = [0.9, 0.8, 0.7, 0.6]
    outputs = runner.both(scores, distances_for(boxes))
    assert detections(outputs, 0)[1].tolist() == pytest.approx([0.9, 0.8, 0.7])


def test_max_det_cut(runner):
    """The first `max_det` of what a larger max-det keeps, best first."""
    scores, distances = spread_scores(8), distances_for(small_boxes())
    outputs = runner.both(scores, distances)
    assert outputs[0].tolist() == [[NMS.max_det]] * BATCH
    uncut = PostprocessGraph(FEATURE_SIZES, STRIDES, INPUT_HW,
                             dataclasses.replace(NMS, max_det=1000))
    with torch.no_grad():
        everything = [t.numpy() for t in uncut(torch.from_numpy(scores),
                                                torch.from_numpy(distances))]
    assert (everything[0] > NMS.max_det).all()
    assert_same_outputs(outputs[1:], [t[:, :NMS.max_det] for t in everything[1:]])
    assert (np.diff(detections(outputs, 0)[1]) <= 0).all()


# Scores from a small pool (ties, the threshold itself, NaN); boxes from a small pool of
# integer corners (duplicates, zero-size, inverted, outside the input), NaN/inf sprinkled.
SCORE_POOL = [0.0, 0.01, NMS.score_thr, 0.06, 0.3, 0.5, 0.7, 0.9, 0.95, 1.0, np.nan]
CORNER = st.integers(-8, 72).map(float)


@st.composite
def hostile_inputs(draw):
    # fill=nothing(): every element drawn (by default most of an array is one fill value)
    scores = draw(arrays(np.float32, (BATCH, NUM_ANCHORS, NUM_CLASSES), fill=st.nothing(),
                         elements=st.one_of(st.sampled_from(SCORE_POOL),
                                            st.floats(0, 1, width=32))))
    corners = draw(st.lists(st.tuples(CORNER, CORNER, CORNER, CORNER), min_size=1,
                            max_size=12))
    # mostly proper boxes (x1 < x2, y1 < y2), so NMS has overlaps to resolve; the rest as
    # drawn: inverted or zero-size
    pool = []
    for x1, y1, x2, y2 in corners:
        if draw(st.integers(0, 4)):
            x1, x2, y1, y2 = min(x1, x2), max(x1, x2) + 1, min(y1, y2), max(y1, y2) + 1
        pool.append((x1, y1, x2, y2))
    choice = draw(arrays(np.int64, (BATCH, NUM_ANCHORS), elements=st.integers(0, len(pool) - 1),
                         fill=st.nothing()))
    distances = distances_for(np.asarray(pool, np.float32)[choice])
    special = draw(arrays(np.int8, distances.shape, fill=st.nothing(),
                          elements=st.sampled_from([0] * 60 + [1, 2, 3])))
    distances[special == 1] = np.nan
    distances[special == 2] = np.inf
    distances[special == 3] = -np.inf
    return scores, distances


@settings(max_examples=60, deadline=None, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(inputs=hostile_inputs())
def test_property_pytorch_and_onnx_runtime_identical(runner, inputs):
    scores, distances = inputs
    outputs = runner.both(scores, distances)           # asserts bit-identical outputs
    assert_padding(outputs)
    assert not np.isnan(outputs[2]).any() and not np.isnan(outputs[1]).any()
    valid = outputs[2][outputs[3] >= 0]
    assert (valid > NMS.score_thr).all()
    boxes = outputs[1][outputs[3] >= 0]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert boxes.min(initial=0) >= 0 and boxes.max(initial=0) <= INPUT_HW[1]


def test_sigmoid_of_extreme_logits():
    """The network's sigmoid in both runtimes: NaN stays NaN (then never selected, above),
    +-inf give exactly 1 and 0; finite logits agree within 2.5e-7 (not bit for bit: ONNX
    Runtime's Sigmoid is an approximation), so end-to-end comparisons keep a tolerance."""
    import onnx
    from onnx import TensorProto, helper
    node = helper.make_node('Sigmoid', ['x'], ['y'])
    graph = helper.make_graph([node], 'sigmoid', [helper.make_tensor_value_info(
        'x', TensorProto.FLOAT, [None])], [helper.make_tensor_value_info(
            'y', TensorProto.FLOAT, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18)], ir_version=9)
    onnx.checker.check_model(model)
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=['CPUExecutionProvider'])
    logits = np.concatenate([np.float32([np.nan, np.inf, -np.inf]),
                             np.linspace(-30, 30, 20001, dtype=np.float32)])
    got = session.run(None, {'x': logits})[0]
    want = torch.from_numpy(logits).sigmoid().numpy()
    assert np.isnan(got[0]) and np.isnan(want[0])
    assert got[1:3].tolist() == want[1:3].tolist() == [1.0, 0.0]
    np.testing.assert_allclose(got[3:], want[3:], atol=2.5e-7, rtol=0)
