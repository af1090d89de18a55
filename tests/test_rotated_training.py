"""Rotated RTMDet training (models/rotated_rtmdet/loss.py, training/rotated_data.py) and rotated
`eval`, checked against independent computations:

- the whole loss (assigner, QFL, rotated IoU loss, average factors) against MMRotate 1.0.1's
  `RotatedRTMDetHead.loss_by_feat` with shapely IoUs (tests/data/mmrotate_rotated_training_
  reference.json, tools/make_rotated_training_reference.py);
- rotated IoU and the loss's IoU term against shapely, gradients against finite differences;
- the assigner's inside test against shapely; augmentation against mirrored corners;
- `detdeploy train --model rotated-rtmdet-tiny` and `detdeploy eval` end to end, eval's AP50
  equal to `rotated_map` run directly on the same detections.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import DATA_DIR
from detdeploy.models.rotated_nms import rotated_iou_pairs
from detdeploy.models.rotated_rtmdet.loss import (RotatedDynamicSoftLabelAssigner,
                                                  RotatedRTMDetLoss, regularize_le90,
                                                  rotated_iou_loss)
from detdeploy.models.rotated_rtmdet.model import RawOutputs

shapely = pytest.importorskip('shapely')
from shapely.geometry import Point, Polygon  # noqa: E402


def polygon(box) -> Polygon:
    cx, cy, w, h, a = (float(v) for v in box)
    along = np.array([math.cos(a), math.sin(a)]) * w / 2
    across = np.array([-math.sin(a), math.cos(a)]) * h / 2
    centre = np.array([cx, cy])
    return Polygon([centre - along - across, centre + along - across,
                    centre + along + across, centre - along + across])


def shapely_iou(a, b) -> float:
    pa, pb = polygon(a), polygon(b)
    inter = pa.intersection(pb).area
    return inter / (pa.area + pb.area - inter)


def random_pairs(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping pairs: the second box near the first, other size and angle."""
    rng = np.random.default_rng(seed)
    first = np.column_stack([rng.uniform(0, 100, (count, 2)), rng.uniform(4, 40, (count, 2)),
                             rng.uniform(-math.pi / 2, math.pi / 2, count)])
    second = first + np.column_stack([rng.normal(0, 4, (count, 2)), rng.normal(0, 4, (count, 2)),
                                      rng.normal(0, 0.5, count)])
    second[:, 2:4] = np.abs(second[:, 2:4]) + 1
    return (torch.tensor(first, dtype=torch.float64), torch.tensor(second, dtype=torch.float64))


@pytest.fixture(scope='module', autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope='module')
def reference():
    return json.loads((DATA_DIR / 'mmrotate_rotated_training_reference.json').read_text())


def raw_outputs(case, dtype=torch.float32) -> RawOutputs:
    return RawOutputs(*(tuple(torch.tensor(t, dtype=dtype) for t in case[key])
                        for key in ('cls_scores', 'bbox_preds', 'angle_preds')))


def ground_truth(case, dtype=torch.float32):
    return ([torch.tensor(b, dtype=dtype).reshape(-1, 5) for b in case['gt_boxes']],
            [torch.tensor(lab, dtype=torch.long) for lab in case['gt_labels']])


@pytest.mark.parametrize('index', [0, 1])
def test_loss_matches_mmrotate_loss_by_feat(reference, index):
    case = reference['cases'][index]
    assert 'MMRotate 1.0.1' in reference['about']
    losses = RotatedRTMDetLoss(tuple(reference['strides']))(raw_outputs(case), *ground_truth(case))
    assert float(losses['loss_cls']) == pytest.approx(case['loss_cls'], rel=1e-5)
    assert float(losses['loss_bbox']) == pytest.approx(case['loss_bbox'], rel=1e-5)
    assert case['loss_bbox'] > 0.1          # the case has matched boxes


def test_rotated_iou_and_loss_agree_with_shapely():
    first, second = random_pairs(200, seed=1)
    iou = rotated_iou_pairs(first, second)
    want = torch.tensor([shapely_iou(a, b) for a, b in zip(first, second)], dtype=torch.float64)
    assert (want > 0.05).float().mean() > 0.5
    torch.testing.assert_close(iou, want, atol=1e-9, rtol=0)
    loss = rotated_iou_loss(first.float(), second.float()).double()
    torch.testing.assert_close(loss, 1 - want.clamp(min=1e-6), atol=2e-5, rtol=0)
    # no positive width and height: IoU 0, the loss 1 (the deviation the module names)
    flipped = first.clone()
    flipped[:, 2] *= -1
    assert (rotated_iou_loss(flipped, second) == 1 - 1e-6).all()


def test_rotated_iou_gradients_match_finite_differences():
    first, second = random_pairs(12, seed=2)
    first.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda boxes: rotated_iou_pairs(boxes, second), (first,),
                                    eps=1e-6, atol=1e-5)


def test_loss_gradients_reach_distances_and_angles(reference):
    """d loss / d raw outputs (distances and angle) at matched points by autograd equals central
    finite differences, with the assignment fixed (the assigner sees detached predictions, as
    in MMRotate)."""
    case = reference['cases'][0]
    raw = raw_outputs(case, torch.float64)
    boxes, labels = ground_truth(case, torch.float64)
    loss = RotatedRTMDetLoss(tuple(reference['strides']))
    logits, decoded, priors = loss.decode(raw)
    fixed = loss.targets(logits, decoded, priors, boxes, labels)
    loss.targets = lambda *args: fixed
    points = fixed[0][:len(priors)].ge(0).nonzero().squeeze(1)[:4]
    level_0 = raw.bbox_preds[0].shape[-2] * raw.bbox_preds[0].shape[-1]
    points = points[points < level_0]                  # points of the finest level
    assert len(points) >= 2
    width = raw.bbox_preds[0].shape[-1]

    def total(delta):                                  # delta [k, 5]: distances and angle
        rows, cols = points // width, points % width
        image = torch.zeros(len(points), dtype=torch.long)
        bbox = raw.bbox_preds[0].index_put(
            (image[:, None], torch.arange(4)[None], rows[:, None], cols[:, None]),
            raw.bbox_preds[0][0, :, rows, cols].T + delta[:, :4])
        angle = raw.angle_preds[0].index_put(
            (image, torch.zeros_like(image), rows, cols),
            raw.angle_preds[0][0, 0, rows, cols] + delta[:, 4])
        out = loss(RawOutputs(raw.cls_scores, (bbox, *raw.bbox_preds[1:]),
                              (angle, *raw.angle_preds[1:])), boxes, labels)
        return out['loss_cls'] + out['loss_bbox']
    delta = torch.zeros(len(points), 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(total, (delta,), eps=1e-6, atol=1e-7)
    grad, = torch.autograd.grad(total(delta), delta)
    assert (grad[:, :4].abs().sum(1) > 0).all() and (grad[:, 4].abs() > 0).all()


def test_assigner_inside_test_agrees_with_shapely():
    rng = np.random.default_rng(3)
    boxes = torch.tensor([[30, 30, 40, 10, 0.6], [60, 40, 20, 20, -1.0], [20, 60, 30, 6, 1.5]],
                         dtype=torch.float32)
    points = torch.tensor(rng.uniform(0, 80, (400, 2)), dtype=torch.float32)
    inside = RotatedDynamicSoftLabelAssigner().points_inside(points, boxes)
    for g, box in enumerate(boxes):
        shrunk = polygon(box.tolist()).buffer(-0.01, join_style=2)
        want = [shrunk.covers(Point(*p)) for p in points.tolist()]
        assert inside[:, g].tolist() == want
    assert inside.any(0).all()


def test_regularize_le90_keeps_the_box():
    boxes = torch.tensor([[0, 0, 4, 9, 0.3], [0, 0, 9, 4, 1.6], [0, 0, 5, 5, -1.0]])
    regular = regularize_le90(boxes)
    assert (regular[:, 2] >= regular[:, 3]).all()
    assert ((regular[:, 4] >= -math.pi / 2) & (regular[:, 4] < math.pi / 2)).all()
    for a, b in zip(boxes, regular):
        assert shapely_iou(a, b) == pytest.approx(1.0, abs=1e-6)


@pytest.fixture(scope='module')
def rotated_set(tmp_path_factory):
    from detdeploy.training.shapes import make_shapes_dataset
    root = tmp_path_factory.mktemp('rotated_shapes')
    written = make_shapes_dataset(root, 4, 3, size=128, seed=2, rotated=True)
    return root, written


def test_flip_and_resize_move_rotated_boxes_with_the_image(rotated_set):
    from detdeploy.core.preprocessing import PreprocessConfig
    from detdeploy.training.data import AugmentConfig
    from detdeploy.training.rotated_data import RotatedDetectionDataset, read_rotated_coco
    root, written = rotated_set
    data = read_rotated_coco(written['train'], root / 'train')
    assert data.boxes[0].shape[1] == 5
    augment = AugmentConfig(img_size=256, scale_range=(1.0, 1.0), flip_prob=1.0)
    dataset = RotatedDetectionDataset(data, augment, PreprocessConfig(input_size=(256, 256)))
    _, boxes, labels, _ = dataset._augmented(0, np.random.default_rng(0))
    original = data.boxes[0]
    assert len(boxes) == len(original) and (labels == data.labels[0]).all()
    for before, after in zip(original, boxes):
        # the original box scaled 2x and mirrored in x: the same polygon
        mirrored = polygon(before.tolist())
        mirrored = shapely.affinity.scale(mirrored, xfact=-2, yfact=2, origin=(0, 0))
        mirrored = shapely.affinity.translate(mirrored, xoff=256)
        assert mirrored.symmetric_difference(polygon(after.tolist())).area < 1e-3 * mirrored.area


def test_mosaic_is_refused_for_rotated_data(rotated_set):
    from detdeploy.core.errors import DetdeployError
    from detdeploy.core.preprocessing import PreprocessConfig
    from detdeploy.training.data import AugmentConfig
    from detdeploy.training.rotated_data import RotatedDetectionDataset, read_rotated_coco
    root, written = rotated_set
    data = read_rotated_coco(written['train'], root / 'train')
    with pytest.raises(DetdeployError, match='--mosaic'):
        RotatedDetectionDataset(data, AugmentConfig(mosaic_prob=0.5), PreprocessConfig())


def test_axis_aligned_annotations_are_refused(tmp_path):
    from detdeploy.core.errors import DetdeployError
    from detdeploy.training.rotated_data import read_rotated_coco
    from detdeploy.training.shapes import make_shapes_dataset
    written = make_shapes_dataset(tmp_path, 1, 0, size=64, seed=0)
    with pytest.raises(DetdeployError, match=r'no oriented boxes .*--rotated'):
        read_rotated_coco(written['train'], tmp_path / 'train')


@pytest.fixture(scope='module')
def trained(rotated_set, tmp_path_factory):
    """Two training steps from the bundled RTMDet-tiny weights, through the CLI."""
    from detdeploy.cli import cli as main
    from detdeploy.models.bundled import BUNDLED_FILE
    root, written = rotated_set
    out = tmp_path_factory.mktemp('rotated_run')
    result = CliRunner().invoke(main, [
        'train', '--model', 'rotated-rtmdet-tiny', '--train-ann', str(written['train']),
        '--train-images', str(root / 'train'), '--val-ann', str(written['val']),
        '--val-images', str(root / 'val'), '--epochs', '1', '--batch', '2',
        '--img-size', '128', '--warmup-iters', '2', '--lr', '0.0005',
        '--checkpoint', str(BUNDLED_FILE), '--out', str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_rotated_model_through_the_cli(trained):
    out, output = trained
    assert 'training rotated-rtmdet-tiny on 4 images, 6 classes' in output
    assert 'val AP' in output
    rows = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    val = rows[-1]['summary']['val']
    assert set(val) == {'AP50', 'AP75', 'AP'} and 0 <= val['AP'] <= val['AP50'] <= 1
    checkpoint = torch.load(out / 'last.pth', weights_only=True, map_location='cpu')
    assert 'bbox_head.rtm_ang.0.weight' in checkpoint['state_dict']


def test_eval_of_a_rotated_model_equals_rotated_map(trained, rotated_set, tmp_path):
    from detdeploy.cli import cli as main
    from detdeploy.evaluation.rotated_eval import RotatedImage, rotated_map
    from detdeploy.models import load_detector
    from detdeploy.runtimes.pipeline import detect
    from detdeploy.runtimes.torch_backend import TorchBackend
    out, _ = trained
    root, written = rotated_set
    report = tmp_path / 'eval.json'
    result = CliRunner().invoke(main, ['eval', 'rotated-rtmdet-tiny', '--checkpoint',
                                       str(out / 'last.pth'), '--ann', str(written['val']),
                                       '--images', str(root / 'val'), '--json', str(report)])
    assert result.exit_code == 0, result.output
    assert 'AP50    AP75      AP' in result.output and 'AP50 per class' in result.output
    got = json.loads(report.read_text())['results'][0]

    # the same detections, scored by rotated_map directly on boxes read from the file
    detector = load_detector('rotated-rtmdet-tiny', str(out / 'last.pth'))
    backend = TorchBackend(detector, nms=detector.spec.nms('eval'))
    coco = json.loads(written['val'].read_text())
    images = sorted(coco['images'], key=lambda image: image['id'])
    found = [RotatedImage(d.rotated_boxes, d.labels, d.scores) for d, _ in
             detect(backend, [root / 'val' / image['file_name'] for image in images])]
    truth = []
    for image in images:
        anns = [a for a in coco['annotations'] if a['image_id'] == image['id']]
        truth.append(RotatedImage(np.array([a['rbox'] for a in anns]).reshape(-1, 5),
                                  np.array([a['category_id'] - 1 for a in anns])))
    names = [c['name'] for c in sorted(coco['categories'], key=lambda c: c['id'])]
    direct = rotated_map(found, truth, names)
    assert got['metrics']['AP50'] == pytest.approx(direct.map, abs=1e-12)
    assert got['ap50_per_class'] == pytest.approx(
        {c.name: c.ap for c in direct.per_class if c.num_gts}, abs=1e-12)
    assert got['detections'] == sum(len(f.scores) for f in found)
    assert 0 < direct.map <= 1


def test_eval_refuses_a_dataset_without_oriented_boxes(trained, tmp_path):
    from detdeploy.cli import cli as main
    from detdeploy.core.errors import DetdeployError
    from detdeploy.training.shapes import make_shapes_dataset
    out, _ = trained
    written = make_shapes_dataset(tmp_path, 0, 1, size=64, seed=0)
    result = CliRunner().invoke(main, ['eval', 'rotated-rtmdet-tiny', '--checkpoint',
                                       str(out / 'last.pth'), '--ann', str(written['val']),
                                       '--images', str(tmp_path / 'val')])
    # a DetdeployError: `detdeploy` prints its one line and exits 2 (tests/test_cli_*)
    assert isinstance(result.exception, DetdeployError)
    assert 'carry no oriented boxes' in str(result.exception)
