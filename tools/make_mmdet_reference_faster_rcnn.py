"""Write tests/data/mmdet_faster_rcnn_<r50|r101>_reference.json by running MMDetection's own
Faster R-CNN, and check that a checkpoint saved by detdeploy loads strictly in MMDetection.

Not part of the package or CI. Needs MMDetection 3.3.0, mmengine and mmcv-lite outside the repo
(see tools/make_mmdet_reference.py):
    PYTHONPATH=/tmp/mmref/site:tests .venv/bin/python tools/make_mmdet_reference_faster_rcnn.py r50
mmcv-lite has no compiled ops: tools/mmcv_lite_shim.py stands in for mmcv's NMS kernel (a Python
port) and its RoIAlign kernel (torchvision's roi_align, the same algorithm). MMDetection's own
Python code (RPN proposals, RoI level mapping, box head, multiclass NMS) runs unchanged.
"""
import json
import sys
import tempfile

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

from conftest import DATA_DIR, calibration_images, randomize_detector  # noqa: E402
from detdeploy.models import build_model, get_spec, save_checkpoint  # noqa: E402

HEIGHT, WIDTH = 256, 320
SAMPLES = 61
CALIBRATION_PROPOSALS = 100
"""Proposals per image while `randomize_detector` calibrates (tests/test_faster_rcnn.py does the
same): the RoI head on 1000 would make the calibration the slowest part of the tests."""


def summary(tensor: torch.Tensor) -> dict:
    """Shape, sums and evenly spaced samples of a tensor: enough to catch any difference."""
    flat = tensor.flatten()
    index = torch.linspace(0, flat.numel() - 1, SAMPLES).long()
    return {'shape': list(tensor.shape), 'sum': flat.double().sum().item(),
            'abs_sum': flat.double().abs().sum().item(), 'index': index.tolist(),
            'values': flat[index].tolist()}


def test_input() -> torch.Tensor:
    """The reference input: a calibration image cropped to HEIGHT x WIDTH (normalised)."""
    return calibration_images(seed=7, count=1, size=WIDTH)[:, :, :HEIGHT, :WIDTH].contiguous()


def main(depth: str) -> None:
    register_all_modules()
    config = Config.fromfile(mmcv_lite_shim.config_path(f'faster_rcnn/faster-rcnn_{depth}_fpn_1x_coco.py'))
    config.model.backbone.init_cfg = None
    mm_model = MODELS.build(config.model).eval()

    torch.set_num_threads(1)          # as the tests run it: float sums then round the same
    torch.manual_seed(0)
    name = f'faster-rcnn-{depth}'
    ours = build_model(name)
    ours.num_proposals = CALIBRATION_PROPOSALS
    randomize_detector(ours, seed=0)
    ours.num_proposals = 1000
    mm_model.load_state_dict(ours.state_dict(), strict=True)

    images = test_input()
    # img_shape is the padded input: our graph clamps boxes to the network input's extent
    sample = DetDataSample(metainfo=dict(img_shape=(HEIGHT, WIDTH), ori_shape=(HEIGHT, WIDTH),
                                         pad_shape=(HEIGHT, WIDTH), scale_factor=(1.0, 1.0),
                                         batch_input_shape=(HEIGHT, WIDTH)))
    with torch.no_grad():
        feats = mm_model.extract_feat(images)
        rpn_cls, rpn_reg = mm_model.rpn_head(feats)
        proposals = mm_model.rpn_head.predict(feats, [sample], rescale=False)[0]
        rois = bbox2roi([proposals.bboxes])
        bbox_results = mm_model.roi_head._bbox_forward(feats, rois)
        pred = mm_model.predict(images, [sample], rescale=True)[0].pred_instances

        # a checkpoint saved by detdeploy, loaded strictly by mmengine, predicts the same
        with tempfile.TemporaryDirectory() as folder:
            path = f'{folder}/{depth}.pth'
            save_checkpoint(path, ours, get_spec(name), get_spec(name).class_names)
            reloaded = MODELS.build(config.model).eval()
            load_checkpoint(reloaded, path, map_location='cpu', strict=True)
            again = reloaded.predict(images, [sample], rescale=True)[0].pred_instances
    same = (torch.equal(again.bboxes, pred.bboxes) and torch.equal(again.scores, pred.scores)
            and torch.equal(again.labels, pred.labels))
    print(f'detdeploy checkpoint in mmengine load_checkpoint(strict=True): loaded; '
          f'predictions identical to the state-dict copy: {same}')

    about = (f'MMDetection {mmdet.__version__} faster-rcnn_{depth}_fpn (official config; mmcv nms '
             'kernel ported to python, RoIAlign kernel = torchvision roi_align) on weights from '
             f'tests/conftest.py: torch.manual_seed(0); model = build_model("{name}"); '
             f'model.num_proposals = {CALIBRATION_PROPOSALS}; randomize_detector(model, seed=0); '
             'model.num_proposals = 1000; one torch thread; input calibration_images(seed=7, count=1, size={WIDTH})[:, :, :{HEIGHT}]; '
             f'img_shape ({HEIGHT}, {WIDTH}), scale_factor 1, the config test_cfg')
    out = DATA_DIR / f'mmdet_faster_rcnn_{depth}_reference.json'
    out.write_text(json.dumps({
        'about': about,
        'rpn_cls_scores': [summary(t) for t in rpn_cls],
        'rpn_bbox_preds': [summary(t) for t in rpn_reg],
        'num_proposals': len(proposals.bboxes),
        'proposals': summary(proposals.bboxes), 'proposal_scores': summary(proposals.scores),
        'cls_scores': summary(bbox_results['cls_score']),
        'bbox_preds': summary(bbox_results['bbox_pred']),
        'det_bboxes': [[round(v, 4) for v in row] for row in pred.bboxes.tolist()],
        'det_scores': pred.scores.tolist(), 'det_labels': pred.labels.tolist(),
        'saved_checkpoint_loads_strictly_and_predicts_the_same': same}))
    print(f'wrote {out}: {len(proposals.bboxes)} proposals, {len(pred.scores)} detections')


if __name__ == '__main__':
    main(sys.argv[1])
