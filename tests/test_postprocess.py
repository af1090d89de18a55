"""Priors, decoding, candidate selection and NMS on hand-made inputs."""
import numpy as np
import pytest
import torch
import torchvision

from conftest import canonical
from detdeploy.core.nms import NMSConfig
from detdeploy.models.box_coders import distance2bbox
from detdeploy.models.nms import (DecodedOutputs, DetectionOutputs, batched_nms, batched_nms_op,
                                  select_candidates, split_detections)
from detdeploy.models.priors import grid_priors
from detdeploy.models.rtmdet import RawOutputs, decode_outputs


def test_grid_priors_row_major_offset_zero():
    priors = grid_priors([(2, 3), (1, 2)], (8, 16))
    assert priors.tolist() == [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8], [0, 0], [16, 0]]


def test_distance2bbox_decodes_and_clamps():
    points = torch.tensor([[8.0, 8.0]])
    distances = torch.tensor([[2.0, 3.0, 4.0, 5.0]])
    assert distance2bbox(points, distances).tolist() == [[6, 5, 12, 13]]
    assert distance2bbox(points, distances, (10, 11)).tolist() == [[6, 5, 11, 10]]
    assert distance2bbox(points, torch.tensor([[9.0, 9, 0, 0]]), (20, 20)).tolist() == [[0, 0, 8, 8]]


def test_decode_outputs_level_layout_sigmoid_and_clamp():
    cls = (torch.arange(2 * 3 * 2 * 2.0).reshape(2, 3, 2, 2), torch.zeros(2, 3, 1, 1))
    box = (torch.ones(2, 4, 2, 2), torch.full((2, 4, 1, 1), 50.0))
    boxes, scores, level_sizes = decode_outputs(RawOutputs(cls, box), (8, 16), (20, 30))
    assert scores.shape == (2, 5, 3) and boxes.shape == (2, 5, 4) and level_sizes == [4, 1]
    # anchor (y=0, x=1) of image 0 has logits cls[0][0, :, 0, 1], at prior (8, 0)
    assert scores[0, 1].tolist() == cls[0][0, :, 0, 1].sigmoid().tolist()
    assert boxes[0, 1].tolist() == [7, 0, 9, 1]
    assert boxes[1, 4].tolist() == [0, 0, 30, 20]             # clamped to (height 20, width 30)


def decoded(scores, level_sizes, boxes=None):
    scores = torch.tensor(scores)[None]
    if boxes is None:
        boxes = torch.tensor([[0.0, 0, 10, 10]]).expand(scores.shape[1], 4)
    return DecodedOutputs(torch.as_tensor(boxes)[None], scores, level_sizes)


def test_select_candidates_per_level_top_k_over_anchor_class_pairs():
    scores = [[0.5, 0.2], [0.0005, 0.9], [0.3, 0.4]]
    cands = select_candidates(decoded(scores, [2, 1]), score_thr=0.001, pre_top_k=2)
    # level 0 keeps its best two pairs (anchor 1 class 1, anchor 0 class 0); level 1 both classes
    assert cands.pair_index[0].tolist() == [3, 0, 5, 4]
    assert cands.labels[0].tolist() == [1, 0, 1, 0]
    assert cands.scores[0].tolist() == pytest.approx([0.9, 0.5, 0.4, 0.3])
    # strictly above the threshold, as MMDetection's filter_scores_and_topk; others get -1
    cands = select_candidates(decoded(scores, [2, 1]), score_thr=0.5, pre_top_k=10)
    assert cands.scores[0].tolist() == pytest.approx([0.9, -1, -1, -1, -1, -1])


def test_select_candidates_ties_in_index_order_and_zero_area_invalid():
    boxes = [[0.0, 0, 10, 10], [5, 5, 5, 9], [0, 0, 10, 10]]      # anchor 1 has zero width
    cands = select_candidates(decoded([[0.5], [0.7], [0.5]], [3], boxes), 0.1, pre_top_k=2)
    assert cands.pair_index[0].tolist() == [1, 0]          # the tie at 0.5 goes to anchor 0
    assert cands.scores[0].tolist() == pytest.approx([-1, 0.5])


def test_nms_op_per_class_threshold_max_det_and_padding():
    boxes = torch.tensor([[[40.0, 40, 60, 60], [42, 40, 62, 60], [40, 40, 60, 60],
                           [195, 195, 205, 205], [0, 0, 5, 5]]]).repeat(2, 1, 1)
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, -1.0], [0.1, 0.1, 0.1, 0.1, 0.1]])
    labels = torch.tensor([[0, 0, 1, 2, 2], [0, 0, 0, 0, 0]])
    num_dets, out_boxes, out_scores, out_labels = batched_nms_op(boxes, scores, labels, 0.05, 0.5, 4)
    # image 0: box 1 is suppressed by box 0 (same class, IoU 0.82); box 2 overlaps but is class 1
    assert num_dets.tolist() == [[3], [3]] and num_dets.dtype == torch.int32
    assert out_labels[0].tolist() == [0, 1, 2, -1] and out_labels.dtype == torch.int32
    assert out_scores[0].tolist() == pytest.approx([0.9, 0.7, 0.6, 0])
    assert out_boxes[0].tolist() == [[40, 40, 60, 60], [40, 40, 60, 60], [195, 195, 205, 205],
                                     [0, 0, 0, 0]]
    # image 1: all tie at 0.1; NMS keeps the lowest index of each overlapping group
    assert out_boxes[1, :3].tolist() == [[40, 40, 60, 60], [195, 195, 205, 205], [0, 0, 5, 5]]
    top1 = split_detections(DetectionOutputs(*batched_nms_op(boxes, scores, labels, 0.05, 0.5, 1)))
    assert [d.scores.tolist() for d in top1] == [pytest.approx([0.9]), pytest.approx([0.1])]


def test_batched_nms_matches_torchvision():
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(500, 2, generator=generator) * 600
    boxes = torch.cat([xy, xy + 5 + torch.rand(500, 2, generator=generator) * 80], dim=1)
    scores = torch.rand(500, generator=generator)
    labels = torch.randint(0, 5, (500,), generator=generator)
    ours = batched_nms(boxes, scores, labels, 0.5)
    per_class = torch.cat([torch.nonzero(labels == c)[:, 0][
        torchvision.ops.nms(boxes[labels == c], scores[labels == c], 0.5)] for c in range(5)])
    assert ours.tolist() == per_class[scores[per_class].argsort(descending=True)].tolist()
    assert batched_nms(boxes[:0], scores[:0], labels[:0], 0.5).numel() == 0


def test_predict_matches_a_loop_reference(tiny_detector):
    """Candidate selection and decoding against a plain per-anchor loop written here.

    IoU threshold 1 turns NMS off: per-class NMS with coordinate offsets (mmcv's way) and without
    (torchvision's loop above 1000 boxes) can round an IoU to either side of the threshold, so
    NMS is compared on its own in test_batched_nms_matches_torchvision.
    """
    model = tiny_detector.model
    images = torch.from_numpy(np.random.default_rng(3).normal(size=(1, 3, 128, 96)).astype('f4'))
    cfg = NMSConfig(score_thr=0.2, pre_top_k=50, iou_thr=1.0, max_det=1000)
    dets = model.predict(images, cfg)[0]

    with torch.no_grad():
        raw = model(images)
    candidates = []
    for cls, box, stride in zip(raw.cls_scores, raw.bbox_preds, model.strides):
        level = []
        probs = cls.sigmoid()          # whole-tensor sigmoid: per-element calls round differently
        _, num_classes, height, width = cls.shape
        for y in range(height):
            for x in range(width):
                for c in range(num_classes):
                    score = probs[0, c, y, x].item()
                    if score > cfg.score_thr:
                        level.append((score, np.float32(x * stride), np.float32(y * stride),
                                      box[0, :, y, x].numpy(), c))
        level.sort(key=lambda item: -item[0])
        candidates += level[:cfg.pre_top_k]
    kept_boxes, kept_scores, kept_labels = [], [], []     # float32 arithmetic, as the model
    for score, px, py, (left, top, right, bottom), label in candidates:
        x1, y1 = min(max(px - left, 0), 96), min(max(py - top, 0), 128)
        x2, y2 = min(max(px + right, 0), 96), min(max(py + bottom, 0), 128)
        if x2 > x1 and y2 > y1:
            kept_boxes.append([x1, y1, x2, y2]), kept_scores.append(score), kept_labels.append(label)
    boxes, scores = torch.tensor(kept_boxes), torch.tensor(kept_scores)
    labels = torch.tensor(kept_labels)
    order = torch.arange(len(scores))
    assert len(order) > 50

    ours, ref = canonical(*dets), canonical(boxes[order], scores[order], labels[order])
    assert ours[1] == ref[1]
    assert ours[0] == pytest.approx(ref[0], abs=1e-6)
    torch.testing.assert_close(ours[2], ref[2], atol=1e-4, rtol=0)
