"""Write tests/data/training_reference_rtmdet_ins.json: RTMDet-Ins's training losses as computed
by MMDetection 3.3.0's `RTMDetInsSepBNHead.loss_by_feat`, for tests/test_training_rtmdet_ins.py.

Not part of the package or CI, and the project never imports MMDetection. With MMDetection
installed as tools/make_training_reference.py says, run from the repo root:
    PYTHONPATH=/tmp/mmref/site nice .venv/bin/python tools/make_training_reference_rtmdet_ins.py

The head is the tiny config's loss (QFL weight 1, GIoU weight 2, DiceLoss weight 2 eps 5e-6
reduction mean, mask_loss_stride 4, DynamicSoftLabelAssigner top-k 13, 8 prototypes, 3 dynamic
convs of 8 channels: 169 kernel parameters per point); only `loss_by_feat` runs, on stored raw
outputs for a batch of two 64x64 images with masks at the input size. Two cases:
  - "one_empty": 3 boxes with masks (an ellipse, a triangle, a rectangle partly covered by the
    triangle) in image 0, none in image 1;
  - "both": 2 boxes in each image, one of them with an empty mask (fully covered, as a crop can
    leave it) and one touching the border.
To keep the file small, kernel predictions are zero except at the positive points (MMDetection's
own assignment, which does not depend on kernels), stored sparsely: image, point, values.
Inputs are float32-exact decimals, masks packed bits (np.packbits, hex), outputs 9 digits.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_training_reference import as_list, f32, import_mmdet  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'training_reference_rtmdet_ins.json'
NUM_CLASSES = 6
STRIDES = (8, 16, 32)
SIZE = 64
NUM_PARAMS = 169


def draw_masks(shapes: list[tuple[str, list[float]]]) -> np.ndarray:
    """[G, SIZE, SIZE] bool: each shape drawn, later shapes covering earlier ones."""
    layers = []
    for kind, coords in shapes:
        image = Image.new('L', (SIZE, SIZE), 0)
        draw = ImageDraw.Draw(image)
        if kind == 'ellipse':
            draw.ellipse(coords, fill=1)
        elif kind == 'polygon':
            draw.polygon([tuple(coords[i:i + 2]) for i in range(0, len(coords), 2)], fill=1)
        elif kind == 'rect':
            draw.rectangle(coords, fill=1)
        layers.append(np.asarray(image, bool))
    visible = [layer & ~np.logical_or.reduce(layers[i + 1:] or [np.zeros_like(layer)])
               for i, layer in enumerate(layers)]
    return np.stack(visible) if visible else np.zeros((0, SIZE, SIZE), bool)


def pack(masks: np.ndarray) -> str:
    return np.packbits(masks.astype(np.uint8).reshape(-1)).tobytes().hex()


CASES = {
    'one_empty': [
        ([[4.5, 6.0, 40.25, 30.5], [20.0, 18.75, 60.5, 62.0], [44.0, 2.0, 63.0, 21.5]], [1, 4, 1],
         [('ellipse', [5, 6, 40, 30]), ('polygon', [20, 62, 40, 19, 60, 62]),
          ('rect', [44, 2, 63, 21])]),
        ([], [], []),
    ],
    'both': [
        ([[2.0, 30.0, 30.5, 63.5], [36.25, 8.5, 58.0, 28.75]], [0, 3],
         [('ellipse', [2, 30, 30, 63]), ('polygon', [36, 8, 58, 8, 47, 28])]),
        ([[10.0, 10.0, 50.0, 50.0], [24.0, 24.0, 40.0, 40.0]], [5, 2],
         [('rect', [24, 24, 40, 40]), ('rect', [10, 10, 50, 50])]),   # the first fully covered
    ],
}


def main() -> None:
    mmdet = import_mmdet()
    from mmdet.models.dense_heads.rtmdet_ins_head import RTMDetInsSepBNHead
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData

    head = RTMDetInsSepBNHead(
        num_classes=NUM_CLASSES, in_channels=8, stacked_convs=1, feat_channels=8,
        norm_cfg=dict(type='BN'),                 # layers unused: only loss_by_feat runs
        anchor_generator=dict(type='MlvlPointGenerator', offset=0, strides=list(STRIDES)),
        bbox_coder=dict(type='DistancePointBBoxCoder'),
        loss_cls=dict(type='QualityFocalLoss', use_sigmoid=True, beta=2.0, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=2.0),
        loss_mask=dict(type='DiceLoss', loss_weight=2.0, eps=5e-6, reduction='mean'),
        train_cfg=dict(assigner=dict(type='DynamicSoftLabelAssigner', topk=13),
                       allowed_border=-1, pos_weight=-1, debug=False))
    assert head.num_gen_params == NUM_PARAMS and head.mask_loss_stride == 4

    rng = np.random.default_rng(20261202)
    reference = dict(mmdet_version=mmdet.__version__, num_classes=NUM_CLASSES,
                     strides=list(STRIDES), size=SIZE, num_params=NUM_PARAMS, cases=[])
    metas = [dict(img_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE),
                  batch_input_shape=(SIZE, SIZE))] * 2
    for name, images in CASES.items():
        gt_boxes = [f32(np.asarray(b, np.float64).reshape(-1, 4), 2) for b, _, _ in images]
        gt_labels = [torch.as_tensor(lab, dtype=torch.long) for _, lab, _ in images]
        gt_masks = [draw_masks(shapes) for _, _, shapes in images]

        def gt_instances():
            return [InstanceData(bboxes=b, labels=lab, masks=BitmapMasks(m, SIZE, SIZE))
                    for b, lab, m in zip(gt_boxes, gt_labels, gt_masks)]

        cls_scores, bbox_preds, zero_kernels = [], [], []
        for stride in STRIDES:
            side = SIZE // stride
            logits = rng.normal(-2.5, 1.5, (2, NUM_CLASSES, side, side))
            cls_scores.append(f32(logits, 3))
            distances = np.exp(rng.normal(np.log(2 * stride), 0.6, (2, 4, side, side)))
            bbox_preds.append(f32(distances, 2))
            zero_kernels.append(torch.zeros(2, NUM_PARAMS, side, side))
        mask_feat = f32(rng.normal(0, 1, (2, 8, SIZE // 8, SIZE // 8)), 3)

        # positives: MMDetection's own assignment (kernels play no part in it)
        flat_cls = torch.cat([s.permute(0, 2, 3, 1).reshape(2, -1, NUM_CLASSES)
                              for s in cls_scores], 1)
        anchors, valid = head.get_anchors([s.shape[-2:] for s in cls_scores], metas, device='cpu')
        from mmdet.structures.bbox import distance2bbox
        flat_boxes = torch.cat([distance2bbox(a.reshape(-1, 4), b.permute(0, 2, 3, 1)
                                              .reshape(2, -1, 4))
                                for a, b in zip(anchors[0], bbox_preds)], 1)
        batch_gt = gt_instances()
        for gt in batch_gt:
            gt.masks = gt.masks.to_tensor(dtype=torch.bool, device='cpu')
        *_, sampling = head.get_targets(flat_cls, flat_boxes, anchors, valid, batch_gt, metas)
        level_sizes = [(SIZE // s) ** 2 for s in STRIDES]
        kernels_sparse = []
        for image, result in enumerate(sampling):
            for point in result.pos_inds.tolist():
                values = f32(rng.normal(0, 0.5, NUM_PARAMS), 3)
                level = int(np.searchsorted(np.cumsum(level_sizes), point, side='right'))
                offset = point - sum(level_sizes[:level])
                side = SIZE // STRIDES[level]
                zero_kernels[level][image, :, offset // side, offset % side] = values
                kernels_sparse.append(dict(image=image, point=point, values=as_list(values, 3)))

        losses = head.loss_by_feat(cls_scores, bbox_preds, zero_kernels, mask_feat,
                                   gt_instances(), metas)
        reference['cases'].append(dict(
            name=name,
            cls_scores=[dict(shape=list(t.shape), values=as_list(t.reshape(-1), 3))
                        for t in cls_scores],
            bbox_preds=[dict(shape=list(t.shape), values=as_list(t.reshape(-1), 2))
                        for t in bbox_preds],
            mask_feat=dict(shape=list(mask_feat.shape), values=as_list(mask_feat.reshape(-1), 3)),
            kernels=kernels_sparse,
            gt_boxes=[as_list(b, 2) for b in gt_boxes],
            gt_labels=[lab.tolist() for lab in gt_labels],
            gt_masks=[dict(count=len(m), bits=pack(m)) for m in gt_masks],
            positives=[len(r.pos_inds) for r in sampling],
            loss_cls=float(f'{sum(losses["loss_cls"]).item():.9g}'),
            loss_bbox=float(f'{sum(losses["loss_bbox"]).item():.9g}'),
            loss_mask=float(f'{losses["loss_mask"].item():.9g}')))
    OUT.write_text(json.dumps(reference, separators=(',', ':')) + '\n')
    print(f'wrote {OUT} ({OUT.stat().st_size / 1024:.0f} KB)')
    for case in reference['cases']:
        print(f"  {case['name']}: positives {case['positives']}, cls {case['loss_cls']}, "
              f"bbox {case['loss_bbox']}, mask {case['loss_mask']}")


if __name__ == '__main__':
    main()
