"""RTMDet's training assigner and losses: hand-made cases, and agreement with MMDetection 3.3.0.

tests/data/training_reference.json holds inputs and MMDetection's outputs for its
DynamicSoftLabelAssigner, QualityFocalLoss, GIoULoss and RTMDetHead.loss_by_feat; it is written
by tools/make_training_reference.py (MMDetection is not a dependency and is never imported).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou

from conftest import DATA_DIR
from detdeploy.models.rtmdet.assigner import DynamicSoftLabelAssigner
from detdeploy.models.losses import giou_loss, quality_focal_loss
from detdeploy.models.rtmdet import RawOutputs
from detdeploy.models.rtmdet.loss import RTMDetLoss

STRIDES = (8, 16, 32)
IOU_ATOL = 1e-6
LOSS_RTOL = 1e-5


@pytest.fixture(scope='module')
def reference():
    return json.loads((DATA_DIR / 'training_reference.json').read_text())


def tensor(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def priors_for(height: int, width: int, num_classes: int = 6) -> torch.Tensor:
    """Our RTMDetLoss's priors [N, 4] for an input of this size (levels of ceil(size / stride))."""
    cls_scores = tuple(torch.zeros(1, num_classes, -(-height // s), -(-width // s))
                       for s in STRIDES)
    return RTMDetLoss(STRIDES).priors(RawOutputs(cls_scores, cls_scores))


def assert_close_rel(got: torch.Tensor, want: torch.Tensor, rtol: float = LOSS_RTOL,
                     atol: float = 1e-9) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol)


def background_qfl(logits: torch.Tensor) -> torch.Tensor:
    """sum over classes of BCE(x, 0) * sigmoid(x)^2, written out: BCE(x, 0) = log(1 + e^x)."""
    return (F.softplus(logits) * logits.sigmoid() ** 2).sum(-1)


# --- GIoU, by hand -----------------------------------------------------------------------------

def test_giou_identical_boxes_have_zero_loss():
    boxes = tensor([[0, 0, 10, 10], [3.5, -2, 40, 7.25]])
    assert torch.allclose(giou_loss(boxes, boxes.clone()), torch.zeros(2), atol=1e-7)


def test_giou_disjoint_boxes():
    # IoU 0, union 200, enclosing box 30 x 10 = 300: GIoU = -100 / 300, loss 4/3
    loss = giou_loss(tensor([[0, 0, 10, 10]]), tensor([[20, 0, 30, 10]]))
    assert loss.item() == pytest.approx(4 / 3, rel=1e-6)


def test_giou_nested_box():
    # IoU 16 / 100, enclosing box = union: loss 1 - 0.16
    loss = giou_loss(tensor([[0, 0, 10, 10]]), tensor([[2, 2, 6, 6]]))
    assert loss.item() == pytest.approx(0.84, rel=1e-6)
    assert giou_loss(tensor([[2, 2, 6, 6]]), tensor([[0, 0, 10, 10]])).item() == \
        pytest.approx(0.84, rel=1e-6)


# --- QFL, by hand ------------------------------------------------------------------------------

def test_qfl_background_point_is_sum_of_bce_times_sigmoid_squared():
    logits = tensor([[-3.0, 0.5, 2.0, -0.25], [7.0, -9.0, 0.0, 1.5]])
    loss = quality_focal_loss(logits, tensor([-1, -1], torch.long), tensor([0.7, 0.3]))
    want = [sum(math.log1p(math.exp(x)) * (1 / (1 + math.exp(-x))) ** 2 for x in row)
            for row in logits.tolist()]
    assert loss.tolist() == pytest.approx(want, rel=1e-6)


def test_qfl_positive_with_quality_equal_to_its_sigmoid_has_zero_loss_on_that_class():
    logits = tensor([[-1.0, 0.8, 2.5], [0.3, -2.0, -0.7]])
    labels = tensor([1, 0], torch.long)
    quality = logits[torch.arange(2), labels].sigmoid()
    loss = quality_focal_loss(logits, labels, quality)
    others = logits.clone()
    others[torch.arange(2), labels] = -float('inf')      # softplus * sigmoid^2 -> 0
    assert torch.allclose(loss, background_qfl(others), rtol=1e-6, atol=1e-12)
    # and the single-class case: exactly zero
    single = tensor([[0.37]])
    assert quality_focal_loss(single, tensor([0], torch.long), single[:, 0].sigmoid()).item() \
        == pytest.approx(0.0, abs=1e-12)


def test_qfl_labels_minus_one_and_at_least_c_are_background():
    logits = tensor([[-2.0, 1.0, 0.5], [3.0, -1.0, -4.0], [0.0, 0.0, 0.0]])
    quality = tensor([0.9, 0.5, 0.1])      # ignored for background points
    want = background_qfl(logits)
    for labels in ([-1, -1, -1], [3, 3, 3], [-1, 3, 7]):
        got = quality_focal_loss(logits, tensor(labels, torch.long), quality)
        assert torch.allclose(got, want, rtol=1e-6)
    mixed = quality_focal_loss(logits, tensor([2, -1, 3], torch.long), quality)
    assert torch.allclose(mixed[1:], want[1:], rtol=1e-6)
    assert not torch.allclose(mixed[:1], want[:1], rtol=1e-3)


# --- assigner, by hand -------------------------------------------------------------------------

def _single_level(height: int, width: int, stride: int = 8):
    ys, xs = torch.meshgrid(torch.arange(height // stride) * float(stride),
                            torch.arange(width // stride) * float(stride), indexing='ij')
    centres = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    priors = torch.cat([centres, torch.full((len(centres), 2), float(stride))], 1)
    return centres, priors


def test_assigner_one_box_only_assigns_points_inside_with_its_label():
    centres, priors = _single_level(80, 80)                        # 100 points, 0..72
    pred_boxes = torch.cat([centres - 14, centres + 18], 1)        # 32 x 32 around each point
    logits = torch.zeros(len(priors), 5)
    gt = tensor([[20.0, 20.0, 60.0, 52.0]])
    result = DynamicSoftLabelAssigner().assign(logits, pred_boxes, priors, gt,
                                               tensor([3], torch.long))
    inside = ((centres > gt[0, :2]) & (centres < gt[0, 2:])).all(1)
    assert 0 < inside.sum() < len(priors)
    positive = result.gt_index >= 0
    assert positive.any()
    assert not (positive & ~inside).any(), 'a point outside the only box was assigned'
    assert (result.gt_index[positive] == 0).all() and (result.labels[positive] == 3).all()
    assert (result.labels[~positive] == -1).all() and (result.ious[~positive] == 0).all()
    ious = box_iou(pred_boxes, gt)[:, 0]
    assert torch.allclose(result.ious[positive], ious[positive])
    # one box, no conflicts: exactly k = max(1, int(sum of the 13 best candidate IoUs)) points
    k = max(1, int(ious[inside].topk(min(13, int(inside.sum()))).values.sum()))
    assert int(positive.sum()) == k


def test_assigner_without_boxes_assigns_nothing():
    centres, priors = _single_level(64, 64)
    pred_boxes = torch.cat([centres - 10, centres + 10], 1)
    result = DynamicSoftLabelAssigner().assign(torch.randn(len(priors), 4), pred_boxes, priors,
                                               torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (result.gt_index == -1).all() and (result.labels == -1).all()
    assert (result.ious == 0).all()


def test_assigner_overlapping_boxes_give_each_point_at_most_one_box():
    centres, priors = _single_level(96, 96)
    pred_boxes = torch.cat([centres - 16, centres + 16], 1)
    logits = torch.full((len(priors), 4), -4.0)
    logits[:, 2] = 2.0                     # every point favours class 2
    gt = tensor([[10.0, 10.0, 70.0, 70.0], [12.0, 12.0, 72.0, 72.0]])
    labels = tensor([1, 2], torch.long)
    assigner = DynamicSoftLabelAssigner()
    result = assigner.assign(logits, pred_boxes, priors, gt, labels)
    positive = result.gt_index >= 0
    assert set(result.gt_index.unique().tolist()) <= {-1, 0, 1}
    assert (result.labels[positive] == labels[result.gt_index[positive]]).all()
    # alone, each box would take its own k points; together the shared ones go to one box only
    alone = [int((assigner.assign(logits, pred_boxes, priors, gt[j:j + 1], labels[j:j + 1])
                  .gt_index >= 0).sum()) for j in range(2)]
    assert int(positive.sum()) < sum(alone)
    # the box whose class the logits favour wins the shared points
    assert int((result.gt_index == 1).sum()) > int((result.gt_index == 0).sum())


def test_dynamic_k_matching_conflict_goes_to_the_cheaper_box():
    # 4 candidates x 2 boxes; IoUs give k = 2 for both; point 1 is among the two cheapest of both
    cost = tensor([[1.0, 9.0], [2.0, 1.5], [5.0, 1.0], [3.0, 8.0]])
    ious = tensor([[0.9, 0.1], [0.8, 0.7], [0.1, 0.9], [0.3, 0.4]])
    matching = DynamicSoftLabelAssigner()._dynamic_k_matching(cost, ious)
    matched_ious, matched_gt, foreground = matching
    assert foreground.tolist() == [True, True, True, False]
    assert matched_gt.tolist() == [0, 1, 1]
    assert torch.allclose(matched_ious, tensor([0.9, 0.7, 0.9]))


# --- against MMDetection 3.3.0 -----------------------------------------------------------------

def _assigner_inputs(case, num_classes):
    priors = priors_for(case['height'], case['width'], num_classes)
    return (tensor(case['logits']), tensor(case['pred_boxes']), priors,
            tensor(case['gt_boxes']).reshape(-1, 4), tensor(case['gt_labels'], torch.long))


def test_reference_file_is_mmdet_3_3_0(reference):
    assert reference['mmdet_version'] == '3.3.0'
    assert tuple(reference['strides']) == STRIDES
    names = [c['name'] for c in reference['assigner']]
    assert names == ['many_boxes', 'no_gt', 'good_preds', 'no_centre']


@pytest.mark.parametrize('index', range(4))
def test_assigner_matches_mmdet(reference, index):
    case = reference['assigner'][index]
    logits, pred_boxes, priors, gt_boxes, gt_labels = _assigner_inputs(case,
                                                                       reference['num_classes'])
    assert len(priors) == len(logits)
    result = DynamicSoftLabelAssigner(topk=13, soft_center_radius=3.0, iou_weight=3.0).assign(
        logits, pred_boxes, priors, gt_boxes, gt_labels)
    positive = (result.gt_index >= 0).nonzero().squeeze(1)
    assert positive.tolist() == case['positive']
    assert result.gt_index[positive].tolist() == case['gt_index']
    assert result.labels[positive].tolist() == case['labels']
    torch.testing.assert_close(result.ious[positive], tensor(case['ious']), atol=IOU_ATOL, rtol=0)
    background = result.gt_index < 0
    assert (result.labels[background] == -1).all() and (result.ious[background] == 0).all()


def test_mmdet_reference_covers_the_interesting_paths(reference):
    """The reference cases exercise what they are meant to: several points per box (dynamic
    k > 1), a box with no prior centre inside, and MMDetection's rule that a point inside one box
    may be assigned to another it lies outside of."""
    many = reference['assigner'][0]
    _, _, priors, gt_boxes, _ = _assigner_inputs(many, reference['num_classes'])
    centres = priors[many['positive'], :2]
    boxes = gt_boxes[many['gt_index']]
    inside_own = ((centres > boxes[:, :2]) & (centres < boxes[:, 2:])).all(1)
    assert not inside_own.all()
    good = reference['assigner'][2]
    assert max(good['gt_index'].count(j) for j in range(len(good['gt_labels']))) > 1


@pytest.mark.parametrize('index', range(4))
def test_qfl_matches_mmdet_on_assigner_targets(reference, index):
    case, expected = reference['assigner'][index], reference['qfl'][index]
    assert expected['name'] == case['name'] and expected['from_assigner']
    logits = tensor(case['logits'])
    num_points, num_classes = logits.shape
    for background in (num_classes, -1):     # MMDetection's convention, then ours
        labels = torch.full((num_points,), background, dtype=torch.long)
        quality = torch.zeros(num_points)
        labels[case['positive']] = tensor(case['labels'], torch.long)
        quality[case['positive']] = tensor(case['ious'])
        assert_close_rel(quality_focal_loss(logits, labels, quality), tensor(expected['loss']))


def test_qfl_matches_mmdet_wide_logits(reference):
    case = reference['qfl'][-1]
    assert case['name'] == 'wide'
    loss = quality_focal_loss(tensor(case['logits']), tensor(case['labels'], torch.long),
                              tensor(case['quality']))
    assert_close_rel(loss, tensor(case['loss']))


def test_giou_matches_mmdet(reference):
    case = reference['giou']
    loss = giou_loss(tensor(case['pred']), tensor(case['target']))
    assert_close_rel(loss, tensor(case['loss']), atol=1e-7)


def _rtmdet_inputs(case):
    def levels(key):
        return tuple(tensor(level['values']).reshape(level['shape']) for level in case[key])
    raw = RawOutputs(levels('cls_scores'), levels('bbox_preds'))
    boxes = [tensor(b).reshape(-1, 4) for b in case['gt_boxes']]
    labels = [tensor(lab, torch.long) for lab in case['gt_labels']]
    return raw, boxes, labels


@pytest.mark.parametrize('index', range(2))
def test_rtmdet_loss_matches_mmdet_loss_by_feat(reference, index):
    case = reference['rtmdet_loss'][index]
    raw, boxes, labels = _rtmdet_inputs(case)
    with torch.no_grad():
        losses = RTMDetLoss(tuple(case['strides']))(raw, boxes, labels)
    assert losses['loss_cls'].item() == pytest.approx(case['loss_cls'], rel=LOSS_RTOL)
    assert losses['loss_bbox'].item() == pytest.approx(case['loss_bbox'], rel=LOSS_RTOL, abs=1e-9)


# --- RTMDetLoss sanity -------------------------------------------------------------------------

def test_rtmdet_loss_finite_and_positive(reference):
    raw, boxes, labels = _rtmdet_inputs(reference['rtmdet_loss'][0])
    with torch.no_grad():
        losses = RTMDetLoss(STRIDES)(raw, boxes, labels)
    assert set(losses) == {'loss_cls', 'loss_bbox'}
    for value in losses.values():
        assert value.dim() == 0 and torch.isfinite(value) and value.item() > 0


def test_rtmdet_loss_image_without_boxes(reference):
    raw, _, _ = _rtmdet_inputs(reference['rtmdet_loss'][0])
    one = RawOutputs(tuple(t[1:] for t in raw.cls_scores), tuple(t[1:] for t in raw.bbox_preds))
    with torch.no_grad():
        losses = RTMDetLoss(STRIDES)(one, [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)])
    assert losses['loss_bbox'].item() == 0.0
    assert torch.isfinite(losses['loss_cls']) and losses['loss_cls'].item() > 0
    # no positives: the average factor clamps to 1, so loss_cls is the plain background QFL sum
    logits = torch.cat([s.permute(0, 2, 3, 1).reshape(-1, s.shape[1]) for s in one.cls_scores])
    assert losses['loss_cls'].item() == pytest.approx(background_qfl(logits).sum().item(), rel=1e-5)


def test_rtmdet_loss_zero_gt_batch_keeps_a_graph(reference):
    """A batch with no boxes still returns loss tensors attached to the head outputs (so a
    training step can call backward on it); no backward pass is run here."""
    raw, _, _ = _rtmdet_inputs(reference['rtmdet_loss'][0])
    raw = RawOutputs(tuple(t.clone().requires_grad_() for t in raw.cls_scores),
                     tuple(t.clone().requires_grad_() for t in raw.bbox_preds))
    empty = [torch.zeros(0, 4)] * 2
    losses = RTMDetLoss(STRIDES)(raw, empty, [torch.zeros(0, dtype=torch.long)] * 2)
    assert losses['loss_bbox'].requires_grad and losses['loss_cls'].requires_grad
    assert losses['loss_bbox'].item() == 0.0 and torch.isfinite(losses['loss_cls'])
