"""Write tests/data/mmrotate_rotated_training_reference.json: MMRotate 1.x's rotated RTMDet loss
(`RotatedRTMDetHead.loss_by_feat`, config rotated_rtmdet_tiny-3x-dota with 6 classes) on stored
raw head outputs, for tests/test_rotated_training.py.

Not part of the package or CI. Needs MMRotate 1.0.1, MMDetection 3.3.0, mmengine and mmcv-lite
outside the repo (see tools/make_mmrotate_reference.py), then:
    PYTHONPATH=/tmp/rot-site:/tmp/mmref/site:tools .venv/bin/python \
        tools/make_rotated_training_reference.py
mmcv-lite has no compiled ops. The two rotated IoUs MMRotate needs are given here with shapely's
float64 polygon intersection, so the reference shares no geometry code with detdeploy:
  - `box_iou_rotated` (the assigner's RBboxOverlaps2D), a kernel of the stub `mmcv._ext`;
  - `diff_iou_rotated_2d` (RotatedIoULoss), replaced in mmrotate's loss module (values only:
    the reference needs no gradient).
Everything else (the dynamic soft-label assigner, PseudoSampler, targets, QFL, weights, average
factors, le90 decoding and regularisation) is MMRotate's and MMDetection's own code. Inputs are
stored as float32-exact decimals.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import shapely
import torch

import mmcv_lite_shim

OUT = Path(__file__).resolve().parents[1] / 'tests' / 'data' / \
    'mmrotate_rotated_training_reference.json'
NUM_CLASSES = 6
SIDE = 64
STRIDES = (8, 16, 32)


def _polygons(boxes: np.ndarray):
    cx, cy, w, h, a = boxes.T
    along = np.stack([np.cos(a), np.sin(a)], 1) * (w / 2)[:, None]
    across = np.stack([-np.sin(a), np.cos(a)], 1) * (h / 2)[:, None]
    centre = np.stack([cx, cy], 1)
    corners = np.stack([centre - along - across, centre + along - across,
                        centre + along + across, centre - along + across], 1)
    return shapely.polygons(corners)


def shapely_iou(boxes1: np.ndarray, boxes2: np.ndarray, aligned: bool) -> np.ndarray:
    """IoU in float64; boxes without positive width and height have IoU 0."""
    p1, p2 = _polygons(boxes1), _polygons(boxes2)
    if not aligned:
        p1, p2 = p1[:, None], p2[None, :]
        a1, a2 = (boxes1[:, 2] * boxes1[:, 3])[:, None], (boxes2[:, 2] * boxes2[:, 3])[None]
        ok = ((boxes1[:, 2] > 0) & (boxes1[:, 3] > 0))[:, None] & \
            ((boxes2[:, 2] > 0) & (boxes2[:, 3] > 0))[None]
    else:
        a1, a2 = boxes1[:, 2] * boxes1[:, 3], boxes2[:, 2] * boxes2[:, 3]
        ok = (boxes1[:, 2] > 0) & (boxes1[:, 3] > 0) & (boxes2[:, 2] > 0) & (boxes2[:, 3] > 0)
    inter = shapely.area(shapely.intersection(p1, p2))
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = np.where(ok, inter / (a1 + a2 - inter), 0.0)
    return iou


def box_iou_rotated_kernel(bboxes1, bboxes2, ious, mode_flag, aligned):
    assert mode_flag == 0
    values = shapely_iou(bboxes1.double().numpy(), bboxes2.double().numpy(), aligned)
    ious.copy_(torch.as_tensor(values.reshape(-1), dtype=ious.dtype))


mmcv_lite_shim.install(box_iou_rotated=box_iou_rotated_kernel)

import mmrotate  # noqa: E402
import mmrotate.models.losses.rotated_iou_loss as rotated_iou_loss_module  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402
from mmrotate.registry import MODELS  # noqa: E402
from mmrotate.structures import RotatedBoxes  # noqa: E402
from mmrotate.utils import register_all_modules  # noqa: E402


def diff_iou_rotated_2d(box1, box2):
    """[1, N, 5] x [1, N, 5] -> [1, N] aligned IoU (shapely, float64)."""
    values = shapely_iou(box1[0].detach().double().numpy(), box2[0].detach().double().numpy(),
                         aligned=True)
    return torch.as_tensor(values, dtype=box1.dtype)[None]


rotated_iou_loss_module.diff_iou_rotated_2d = diff_iou_rotated_2d


def f32(array) -> np.ndarray:
    """Rounded to 6 decimals, then float32: what the test reads back exactly."""
    return np.round(np.asarray(array, np.float64), 6).astype(np.float32)


def make_case(rng: np.random.Generator, near: bool) -> dict:
    """Raw outputs of a batch of two SIDE x SIDE images (3 boxes, none) and the ground truth.
    `near`: distances and angles that decode close to the boxes (many IoUs > 0.5); otherwise
    initialisation-like small distances."""
    gt = [np.array([[20, 22, 24, 12, 0.4], [40, 40, 30, 18, -1.2], [44, 18, 14, 14, 0.0]]),
          np.zeros((0, 5))]
    labels = [np.array([1, 4, 2]), np.zeros(0, np.int64)]
    cls, box, ang = [], [], []
    for stride in STRIDES:
        size = SIDE // stride
        cls.append(f32(rng.normal(-2, 1.5, (2, NUM_CLASSES, size, size))))
        if near:
            dist = rng.uniform(4, 20, (2, 4, size, size))
            angle = rng.normal(0.2, 0.6, (2, 1, size, size))
        else:
            dist = rng.normal(0.5, 1.0, (2, 4, size, size)) * stride / 8
            angle = rng.normal(0, 0.01, (2, 1, size, size))
        box.append(f32(dist))
        ang.append(f32(angle))
    return {'gt_boxes': [f32(g).tolist() for g in gt], 'gt_labels': [lab.tolist() for lab in labels],
            'cls_scores': [c.tolist() for c in cls], 'bbox_preds': [b.tolist() for b in box],
            'angle_preds': [a.tolist() for a in ang]}


def main() -> None:
    register_all_modules()
    config = Config.fromfile(os.path.join(os.path.dirname(mmrotate.__file__), '.mim', 'configs',
                                          'rotated_rtmdet', 'rotated_rtmdet_tiny-3x-dota.py'))
    head_cfg = config.model.bbox_head
    head_cfg.num_classes = NUM_CLASSES
    head_cfg.norm_cfg = dict(type='BN')
    head_cfg.train_cfg = config.model.train_cfg
    head = MODELS.build(head_cfg)
    rng = np.random.default_rng(0)
    cases = []
    for name, near in (('near', True), ('init_like', False)):
        case = make_case(rng, near)
        gts = [InstanceData(bboxes=RotatedBoxes(torch.tensor(b, dtype=torch.float32).reshape(-1, 5)),
                            labels=torch.tensor(lab, dtype=torch.long))
               for b, lab in zip(case['gt_boxes'], case['gt_labels'])]
        metas = [dict(img_shape=(SIDE, SIDE), pad_shape=(SIDE, SIDE), batch_input_shape=(SIDE, SIDE))
                 for _ in gts]
        with torch.no_grad():
            losses = head.loss_by_feat([torch.tensor(c) for c in case['cls_scores']],
                                       [torch.tensor(b) for b in case['bbox_preds']],
                                       [torch.tensor(a) for a in case['angle_preds']], gts, metas)
        case['name'] = name
        case['loss_cls'] = float(sum(losses['loss_cls']))
        case['loss_bbox'] = float(sum(losses['loss_bbox']))
        cases.append(case)
        print(name, case['loss_cls'], case['loss_bbox'])
    about = (f'MMRotate {mmrotate.__version__} RotatedRTMDetHead.loss_by_feat, config '
             f'rotated_rtmdet_tiny-3x-dota (num_classes {NUM_CLASSES}, BN), rotated IoUs by '
             'shapely float64; batch of two 64x64 images (3 boxes, none); seed 0')
    OUT.write_text(json.dumps({'about': about, 'num_classes': NUM_CLASSES, 'side': SIDE,
                               'strides': list(STRIDES), 'cases': cases}))
    print(f'wrote {OUT} ({OUT.stat().st_size} bytes)')


if __name__ == '__main__':
    main()
