"""Write tests/data/mmdet_mask_rcnn_r50_reference.json and mmdet_mask_rcnn_r50_masks.npz by
running MMDetection's own Mask R-CNN, and check that a checkpoint saved by detdeploy loads
strictly in MMDetection.

Not part of the package or CI. Needs MMDetection 3.3.0, mmengine and mmcv-lite outside the repo:
    PYTHONPATH=/tmp/mmref/site:tests .venv/bin/python tools/make_mmdet_reference_mask_rcnn.py
mmcv-lite has no compiled ops: tools/mmcv_lite_shim.py stands in for mmcv's NMS and RoIAlign
kernels. MMDetection's own Python code (RPN, RoI level mapping, box head, multiclass NMS, the
FCN mask head and its `_do_paste_mask`) runs unchanged. The weights, input and NMS settings
are tests/test_mask_rcnn.py's (imported from it): a 128x160 network input of a 256x320 image
(scale factor 0.5), the config's test_cfg with max_per_img 20.
"""
import copy
import json
import tempfile

import numpy as np
import torch

import mmcv_lite_shim

mmcv_lite_shim.install()

import mmdet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.structures.bbox import bbox2roi  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

from conftest import DATA_DIR  # noqa: E402
from detdeploy.models import get_spec, save_checkpoint  # noqa: E402
from test_mask_rcnn import (INPUT_HW, MAX_DETECTIONS, NAME, ORIGINAL_HW,  # noqa: E402
                            reference_input, synthetic_model)

SAMPLES = 61


def summary(tensor: torch.Tensor) -> dict:
    """Shape, sums and evenly spaced samples of a tensor: enough to catch any difference."""
    flat = tensor.flatten()
    index = torch.linspace(0, flat.numel() - 1, SAMPLES).long()
    return {'shape': list(tensor.shape), 'sum': flat.double().sum().item(),
            'abs_sum': flat.double().abs().sum().item(), 'index': index.tolist(),
            'values': flat[index].tolist()}


def main() -> None:
    register_all_modules()
    config = Config.fromfile(mmcv_lite_shim.config_path('mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'))
    config.model.backbone.init_cfg = None
    config.model.test_cfg.rcnn.max_per_img = MAX_DETECTIONS
    mm_model = MODELS.build(config.model).eval()

    torch.set_num_threads(1)          # as the tests run it: float sums then round the same
    ours = synthetic_model()
    mm_model.load_state_dict(ours.state_dict(), strict=True)

    images = reference_input()
    height, width = INPUT_HW
    scale = height / ORIGINAL_HW[0]
    # img_shape is the padded input: our graph clamps boxes to the network input's extent
    sample = DetDataSample(metainfo=dict(img_shape=INPUT_HW, ori_shape=ORIGINAL_HW,
                                         pad_shape=INPUT_HW, scale_factor=(scale, scale),
                                         batch_input_shape=INPUT_HW))
    rcnn_cfg = mm_model.roi_head.test_cfg
    with torch.no_grad():
        feats = mm_model.extract_feat(images)
        rpn_cls, rpn_reg = mm_model.rpn_head(feats)
        proposals = mm_model.rpn_head.predict(feats, [sample], rescale=False)[0]
        rois = bbox2roi([proposals.bboxes])
        bbox_results = mm_model.roi_head._bbox_forward(feats, rois)
        detections = mm_model.roi_head.predict_bbox(
            feats, [sample.metainfo], [copy.deepcopy(proposals)], rcnn_cfg, rescale=False)[0]
        mask_logits = mm_model.roi_head._mask_forward(
            feats, bbox2roi([detections.bboxes]))['mask_preds']
        count = len(detections.labels)
        mask_logits = mask_logits[torch.arange(count), detections.labels]
        pred = mm_model.predict(images, [sample], rescale=True)[0].pred_instances

        with tempfile.TemporaryDirectory() as folder:
            path = f'{folder}/mask.pth'
            save_checkpoint(path, ours, get_spec(NAME), get_spec(NAME).class_names)
            reloaded = MODELS.build(config.model).eval()
            load_checkpoint(reloaded, path, map_location='cpu', strict=True)
            again = reloaded.predict(images, [sample], rescale=True)[0].pred_instances
    same = all(torch.equal(getattr(again, key), getattr(pred, key))
               for key in ('bboxes', 'scores', 'labels', 'masks'))
    print(f'detdeploy checkpoint in mmengine load_checkpoint(strict=True): loaded; '
          f'predictions identical to the state-dict copy: {same}')
    assert torch.equal(pred.labels, detections.labels)

    about = (f'MMDetection {mmdet.__version__} mask-rcnn_r50_fpn_1x_coco (official config, '
             f'test_cfg.rcnn.max_per_img {MAX_DETECTIONS}; mmcv nms kernel ported to python, '
             'RoIAlign kernel = torchvision roi_align) on tests/test_mask_rcnn.py '
             'synthetic_model() weights, input reference_input() (128x160) of a 256x320 image '
             '(scale_factor 0.5), one torch thread. mask_logits: each detection\'s class '
             'channel; det_bboxes at the original scale; the npz holds the sigmoid 28x28 mask '
             'probabilities of each detection and MMDetection\'s pasted masks (>= 0.5, '
             'np.packbits along the width)')
    out = DATA_DIR / 'mmdet_mask_rcnn_r50_reference.json'
    out.write_text(json.dumps({
        'about': about,
        'rpn_cls_scores': [summary(t) for t in rpn_cls],
        'rpn_bbox_preds': [summary(t) for t in rpn_reg],
        'num_proposals': len(proposals.bboxes),
        'proposals': summary(proposals.bboxes),
        'cls_scores': summary(bbox_results['cls_score']),
        'bbox_preds': summary(bbox_results['bbox_pred']),
        'mask_logits': summary(mask_logits),
        'det_bboxes': [[round(v, 4) for v in row] for row in pred.bboxes.tolist()],
        'det_scores': pred.scores.tolist(), 'det_labels': pred.labels.tolist(),
        'saved_checkpoint_loads_strictly_and_predicts_the_same': same}))
    masks = DATA_DIR / 'mmdet_mask_rcnn_r50_masks.npz'
    np.savez_compressed(masks, mask_probabilities=mask_logits.sigmoid().numpy(),
                        pasted_masks=np.packbits(pred.masks.numpy(), axis=-1))
    print(f'wrote {out} and {masks}: {len(proposals.bboxes)} proposals, {count} detections, '
          f'pasted masks {tuple(pred.masks.shape)} covering '
          f'{pred.masks.float().mean((1, 2)).min():.3f}..{pred.masks.float().mean((1, 2)).max():.3f}')


if __name__ == '__main__':
    main()
