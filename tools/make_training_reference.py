"""Write tests/data/training_reference.json: RTMDet's training assigner and losses as computed
by MMDetection 3.3.0, for tests/test_training_losses.py.

Not part of the package or CI, and the project never imports MMDetection. To regenerate, install
MMDetection outside the repo and run this script from the repo root:
    nice .venv/bin/pip install --no-deps --target /tmp/mmref/site mmdet==3.3.0 mmengine \
        mmcv-lite==2.1.0 addict yapf termcolor rich pygments markdown-it-py mdurl \
        opencv-python-headless shapely terminaltables platformdirs pyyaml six
    PYTHONPATH=/tmp/mmref/site nice .venv/bin/python tools/make_training_reference.py
(mmcv-lite 2.2 fails mmdet 3.3.0's version check, hence 2.1.0.) mmcv-lite has no compiled ops:
`mmcv._ext` is stubbed (nothing here calls a kernel), and so is scipy if it is not installed.

Everything is seeded, so a rerun writes the same file. Inputs are stored as float32-exact
decimals (rounded, then cast to float32 before MMDetection sees them; the test casts the same
decimals to float32), outputs to 9 significant digits. Cases:
  - assigner: DynamicSoftLabelAssigner (topk 13, soft_center_radius 3, iou_weight 3) on four
    images, C = 6: "many_boxes" (5 boxes, two heavily overlapping, one with no prior centre
    inside, one with edges on prior centres), "no_gt" (0 boxes), "good_preds" (6 boxes,
    predictions near their boxes so dynamic k > 1), "no_centre" (one box containing no prior
    centre: the no-valid-candidate exit). Positives stored sparsely: point, box, label, IoU.
  - qfl: QualityFocalLoss(use_sigmoid, beta 2, reduction 'none') per point on the assigner's
    targets of each image (background label = C, MMDetection's convention), plus a "wide" case
    with logits in [-12, 12] and random qualities.
  - giou: GIoULoss(reduction 'none') on hand-picked pairs (identical, disjoint, nested,
    touching, degenerate, inverted) and random ones.
  - rtmdet_loss: RTMDetHead.loss_by_feat (QFL weight 1, GIoU weight 2, DynamicSoftLabelAssigner,
    PseudoSampler, allowed_border -1) on raw head outputs for a batch of two 64x64 images (one
    with 3 boxes, one with none), twice: plausible distances and initialisation-like near-zero
    (partly negative) distances.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'training_reference.json'
NUM_CLASSES = 6
STRIDES = (8, 16, 32)


# --- MMDetection without compiled ops ------------------------------------------------------

def _missing_kernel(name):
    if name.startswith('__'):
        raise AttributeError(name)

    def fail(*args, **kwargs):
        raise NotImplementedError(f'mmcv._ext.{name} is not available (mmcv-lite)')
    return fail


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _missing_kernel
        return module

    def exec_module(self, module):
        pass


class _StubScipy(importlib.abc.MetaPathFinder):
    """scipy is only needed by assigners not used here (Hungarian matching)."""
    def find_spec(self, fullname, path, target=None):
        if fullname == 'scipy' or fullname.startswith('scipy.'):
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


def import_mmdet():
    ext = types.ModuleType('mmcv._ext')
    ext.__getattr__ = _missing_kernel        # mmcv.ops checks every kernel exists at import
    sys.modules['mmcv._ext'] = ext
    try:
        import scipy.optimize  # noqa: F401
    except ImportError:
        sys.meta_path.insert(0, _StubScipy())
    import mmdet
    from mmdet.utils import register_all_modules
    register_all_modules()
    assert mmdet.__version__ == '3.3.0', mmdet.__version__
    return mmdet


# --- storage helpers -------------------------------------------------------------------------

def f32(array, decimals: int) -> torch.Tensor:
    """Round to `decimals`, cast to float32: what both sides use as the input."""
    rounded = np.round(np.asarray(array, dtype=np.float64), decimals)
    return torch.from_numpy(rounded.astype(np.float32))


def as_list(tensor: torch.Tensor, decimals: int):
    """Inputs: decimals that cast back to exactly the float32 values used."""
    values = np.round(tensor.double().numpy(), decimals)
    assert np.array_equal(values.astype(np.float32), tensor.numpy()), 'not float32-exact'
    return values.tolist()


def out_list(tensor: torch.Tensor):
    """Outputs: 9 significant digits (float32 round-trips)."""
    return [float(f'{v:.9g}') for v in tensor.double().reshape(-1).tolist()]


def priors_for(height: int, width: int) -> torch.Tensor:
    """[N, 4] (x, y, stride, stride), offset 0, levels concatenated (MlvlPointGenerator)."""
    rows = []
    for stride in STRIDES:
        h, w = -(-height // stride), -(-width // stride)
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32) * stride,
                                torch.arange(w, dtype=torch.float32) * stride, indexing='ij')
        s = torch.full((h * w,), float(stride))
        rows.append(torch.stack([xx.reshape(-1), yy.reshape(-1), s, s], 1))
    return torch.cat(rows)


# --- cases -------------------------------------------------------------------------------------

def make_assigner_case(name, rng, height, width, gt_boxes, gt_labels, good_preds=False):
    priors = priors_for(height, width)
    n = len(priors)
    gt_boxes = f32(np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4), 2)
    gt_labels = torch.as_tensor(gt_labels, dtype=torch.long).reshape(-1)
    centres = priors[:, :2].numpy().astype(np.float64)
    stride = priors[:, 2:3].numpy().astype(np.float64)
    distances = np.exp(rng.normal(np.log(2.5 * stride), 0.6, size=(n, 4)))
    boxes = np.concatenate([centres - distances[:, :2], centres + distances[:, 2:]], 1)
    logits = rng.normal(-3.0, 1.5, size=(n, NUM_CLASSES))
    for box, label in zip(gt_boxes.numpy().astype(np.float64), gt_labels.tolist()):
        inside = ((centres[:, 0] > box[0]) & (centres[:, 0] < box[2])
                  & (centres[:, 1] > box[1]) & (centres[:, 1] < box[3]))
        logits[inside, label] += rng.uniform(0, 4, size=inside.sum())
        if good_preds:
            size = np.array([box[2] - box[0], box[3] - box[1]] * 2)
            boxes[inside] = box + rng.normal(0, 0.08, size=(inside.sum(), 4)) * size
    return dict(name=name, height=height, width=width,
                logits=f32(logits, 3), pred_boxes=f32(boxes, 2), priors=priors,
                gt_boxes=gt_boxes, gt_labels=gt_labels)


def assigner_cases(rng):
    return [
        make_assigner_case('many_boxes', rng, 128, 160, [
            [10.3, 14.7, 70.2, 90.9],      # large
            [18.0, 20.5, 75.4, 95.1],      # overlaps the first heavily, another class
            [9.0, 9.0, 14.5, 14.5],        # between the stride-8 centres 8 and 16: none inside
            [96.0, 32.0, 128.0, 64.0],     # edges on prior centres (strict inside test)
            [110.6, 70.2, 158.9, 127.0],
        ], [2, 5, 0, 3, 2]),
        make_assigner_case('no_gt', rng, 96, 96, np.zeros((0, 4)), []),
        make_assigner_case('good_preds', rng, 128, 128, [
            [4.2, 6.1, 60.3, 50.8], [40.5, 30.2, 120.7, 110.4], [70.1, 5.3, 101.9, 37.6],
            [0.0, 80.0, 40.0, 127.5], [50.3, 55.5, 66.8, 71.2], [8.8, 100.2, 120.1, 126.9],
        ], [0, 1, 4, 1, 5, 3], good_preds=True),
        make_assigner_case('no_centre', rng, 64, 64, [[33.0, 41.0, 38.5, 46.0]], [4]),
    ]


def run_assigner(mmdet_assigner, case):
    from mmengine.structures import InstanceData
    pred = InstanceData(priors=case['priors'], bboxes=case['pred_boxes'], scores=case['logits'])
    gt = InstanceData(bboxes=case['gt_boxes'], labels=case['gt_labels'])
    result = mmdet_assigner.assign(pred, gt)
    positive = (result.gt_inds > 0).nonzero().squeeze(1)
    assert ((result.labels >= 0) == (result.gt_inds > 0)).all()
    return positive, result.gt_inds[positive] - 1, result.labels[positive], \
        result.max_overlaps[positive]


def giou_pairs(rng):
    hand = [
        ([0, 0, 10, 10], [0, 0, 10, 10]),        # identical
        ([0, 0, 10, 10], [20, 0, 30, 10]),       # disjoint
        ([0, 0, 10, 10], [2, 2, 6, 6]),          # nested
        ([0, 0, 10, 10], [10, 0, 20, 10]),       # touching
        ([0, 0, 10, 10], [5, 5, 15, 15]),        # partial
        ([0, 0, 0, 10], [0, 0, 10, 10]),         # zero-width prediction
        ([5, 5, 5, 5], [5, 5, 5, 5]),            # both degenerate (eps clamps)
        ([6, 6, 4, 4], [0, 0, 10, 10]),          # inverted prediction (near-zero distances)
        ([3.5, 1.25, 2.5, 9.75], [1, 1, 8, 8]),  # inverted in x only
    ]
    pred = [p for p, _ in hand]
    target = [t for _, t in hand]
    for _ in range(55):
        t = rng.uniform(0, 100, 2)
        t = np.concatenate([t, t + rng.uniform(1, 60, 2)])
        p = t + rng.normal(0, 12, 4)
        pred.append(p.tolist())
        target.append(t.tolist())
    return f32(pred, 2), f32(target, 2)


def rtmdet_loss_cases(rng, mmdet_head_cls):
    head = mmdet_head_cls(
        num_classes=NUM_CLASSES, in_channels=8, stacked_convs=1, feat_channels=8,
        norm_cfg=dict(type='BN'),                 # layers unused: only loss_by_feat runs
        anchor_generator=dict(type='MlvlPointGenerator', offset=0, strides=list(STRIDES)),
        bbox_coder=dict(type='DistancePointBBoxCoder'),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        train_cfg=dict(assigner=dict(type='DynamicSoftLabelAssigner', topk=13),
                       allowed_border=-1, pos_weight=-1, debug=False))
    from mmengine.structures import InstanceData
    gt_boxes = [f32([[4.5, 6.0, 40.25, 30.5], [20.0, 18.75, 60.5, 62.0],
                     [44.0, 2.0, 63.0, 21.5]], 2),
                f32(np.zeros((0, 4)), 2)]
    gt_labels = [torch.tensor([1, 4, 1]), torch.zeros(0, dtype=torch.long)]
    cases = []
    for name in ('plausible', 'init_like'):
        cls_scores, bbox_preds = [], []
        for stride in STRIDES:
            size = 64 // stride
            cls_scores.append(f32(rng.normal(-2.5, 1.5, (2, NUM_CLASSES, size, size)), 3))
            if name == 'plausible':
                distances = np.exp(rng.normal(np.log(2 * stride), 0.6, (2, 4, size, size)))
                bbox_preds.append(f32(distances, 2))
            else:
                bbox_preds.append(f32(rng.normal(0, 0.2, (2, 4, size, size)), 3))
        batch_gt = [InstanceData(bboxes=b, labels=lab) for b, lab in zip(gt_boxes, gt_labels)]
        metas = [dict(img_shape=(64, 64), pad_shape=(64, 64), batch_input_shape=(64, 64))] * 2
        losses = head.loss_by_feat(cls_scores, bbox_preds, batch_gt, metas)
        cases.append(dict(
            name=name, height=64, width=64, strides=list(STRIDES),
            cls_scores=[dict(shape=list(t.shape), values=as_list(t.reshape(-1), 3))
                        for t in cls_scores],
            bbox_preds=[dict(shape=list(t.shape), values=as_list(t.reshape(-1), 3))
                        for t in bbox_preds],
            gt_boxes=[as_list(b, 2) for b in gt_boxes],
            gt_labels=[lab.tolist() for lab in gt_labels],
            loss_cls=float(f'{sum(losses["loss_cls"]).item():.9g}'),
            loss_bbox=float(f'{sum(losses["loss_bbox"]).item():.9g}')))
    return cases


def main() -> None:
    mmdet = import_mmdet()
    from mmdet.models.dense_heads.rtmdet_head import RTMDetHead
    from mmdet.models.losses.gfocal_loss import QualityFocalLoss
    from mmdet.models.losses.iou_loss import GIoULoss
    from mmdet.models.task_modules.assigners.dynamic_soft_label_assigner import \
        DynamicSoftLabelAssigner

    rng = np.random.default_rng(20240611)
    assigner = DynamicSoftLabelAssigner(soft_center_radius=3.0, topk=13, iou_weight=3.0)
    qfl = QualityFocalLoss(use_sigmoid=True, beta=2.0, reduction='none', loss_weight=1.0)
    giou = GIoULoss(reduction='none', loss_weight=1.0)

    reference = dict(mmdet_version=mmdet.__version__, num_classes=NUM_CLASSES,
                     strides=list(STRIDES), assigner=[], qfl=[], giou={}, rtmdet_loss=[])
    with torch.no_grad():
        for case in assigner_cases(rng):
            positive, gt_index, labels, ious = run_assigner(assigner, case)
            # QFL on the assigner's targets: MMDetection's background label is C
            full_labels = torch.full((len(case['priors']),), NUM_CLASSES, dtype=torch.long)
            full_labels[positive] = labels
            quality = torch.zeros(len(case['priors']))
            quality[positive] = ious
            qfl_loss = qfl(case['logits'], (full_labels, quality))
            reference['assigner'].append(dict(
                name=case['name'], height=case['height'], width=case['width'],
                logits=as_list(case['logits'], 3), pred_boxes=as_list(case['pred_boxes'], 2),
                gt_boxes=as_list(case['gt_boxes'], 2), gt_labels=case['gt_labels'].tolist(),
                positive=positive.tolist(), gt_index=gt_index.tolist(), labels=labels.tolist(),
                ious=out_list(ious)))
            reference['qfl'].append(dict(name=case['name'], from_assigner=True,
                                         loss=out_list(qfl_loss)))

        logits = f32(rng.uniform(-12, 12, (64, NUM_CLASSES)), 3)
        labels = torch.from_numpy(rng.integers(0, NUM_CLASSES + 1, 64))   # C = background
        quality = f32(rng.uniform(0, 1, 64), 4)
        reference['qfl'].append(dict(
            name='wide', from_assigner=False, logits=as_list(logits, 3), labels=labels.tolist(),
            quality=as_list(quality, 4), loss=out_list(qfl(logits, (labels, quality)))))

        pred, target = giou_pairs(rng)
        reference['giou'] = dict(pred=as_list(pred, 2), target=as_list(target, 2),
                                 loss=out_list(giou(pred, target)))

    reference['rtmdet_loss'] = rtmdet_loss_cases(rng, RTMDetHead)
    OUT.write_text(json.dumps(reference, separators=(',', ':')) + '\n')
    print(f'wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB)')
    for case in reference['assigner']:
        print(f"  assigner {case['name']}: {len(case['logits'])} points, "
              f"{len(case['gt_labels'])} boxes, {len(case['positive'])} positives")
    for case in reference['rtmdet_loss']:
        print(f"  rtmdet_loss {case['name']}: cls {case['loss_cls']}, bbox {case['loss_bbox']}")


if __name__ == '__main__':
    main()
