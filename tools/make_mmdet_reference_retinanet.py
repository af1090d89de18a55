"""Write tests/data/mmdet_retinanet_r50_reference.json by running MMDetection's own RetinaNet, and
check that a checkpoint saved by detdeploy loads strictly in MMDetection and predicts the same.

Not part of the package or CI. Needs MMDetection 3.3.0 outside the repo (see
tools/make_mmdet_reference.py):
    PYTHONPATH=/tmp/mmref/site:tests .venv/bin/python tools/make_mmdet_reference_retinanet.py
"""
import json
import tempfile
from pathlib import Path

import torch

import mmcv_lite_shim

mmcv_lite_shim.install()

import mmdet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

from conftest import DATA_DIR, calibration_images, randomize_detector  # noqa: E402
from detdeploy.models import build_model, get_spec, save_checkpoint  # noqa: E402
from detdeploy.models.retinanet import EVAL_NMS  # noqa: E402

HEIGHT, WIDTH = 256, 320        # multiples of 32: MMDetection's img_shape is the padded shape


def build_mmdet_model():
    config = Config.fromfile(mmcv_lite_shim.config_path('retinanet/retinanet_r50_fpn_1x_coco.py'))
    config.model.backbone.init_cfg = None
    return MODELS.build(config.model).eval()


def predict(model, images):
    sample = DetDataSample(metainfo=dict(img_shape=(HEIGHT, WIDTH), ori_shape=(HEIGHT, WIDTH),
                                         pad_shape=(HEIGHT, WIDTH), scale_factor=(1.0, 1.0),
                                         batch_input_shape=(HEIGHT, WIDTH)))
    with torch.no_grad():
        return model.predict(images, [sample], rescale=True)[0].pred_instances


def sampled(tensor, count):
    flat = tensor.flatten()
    index = torch.linspace(0, flat.numel() - 1, count).long()
    return {'shape': list(tensor.shape), 'sum': flat.double().sum().item(),
            'abs_sum': flat.double().abs().sum().item(), 'index': index.tolist(),
            'values': flat[index].tolist()}


def main() -> None:
    register_all_modules()
    mm_model = build_mmdet_model()
    torch.manual_seed(0)
    ours = randomize_detector(build_model('retinanet-r50'), seed=0)
    mm_model.load_state_dict(ours.state_dict(), strict=True)

    images = calibration_images(seed=7, count=1, size=WIDTH)[:, :, :HEIGHT].contiguous()
    with torch.no_grad():
        cls_scores, bbox_preds = mm_model.bbox_head(mm_model.extract_feat(images))
    pred = predict(mm_model, images)
    levels = [{'cls': sampled(cls, 97), 'box': sampled(box, 53)}
              for cls, box in zip(cls_scores, bbox_preds)]

    # a checkpoint written by detdeploy, loaded by mmengine (strict) into a fresh MMDetection model
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / 'retinanet_r50_detdeploy.pth'
        spec = get_spec('retinanet-r50')
        save_checkpoint(path, ours, spec, spec.class_names)
        fresh = build_mmdet_model()
        load_checkpoint(fresh, str(path), map_location='cpu', strict=True)
    from_checkpoint = predict(fresh, images)
    ours_pred = ours.predict(images, EVAL_NMS)[0]
    checkpoint_check = {
        'loads_strictly': True,
        'same_as_direct_load': bool(torch.equal(from_checkpoint.bboxes, pred.bboxes)
                                    and torch.equal(from_checkpoint.scores, pred.scores)
                                    and torch.equal(from_checkpoint.labels, pred.labels)),
        'detections': len(from_checkpoint.scores),
        'ours_detections': len(ours_pred.scores)}
    if len(ours_pred.scores) == len(pred.scores):
        checkpoint_check['max_score_diff_vs_ours'] = (
            ours_pred.scores - from_checkpoint.scores).abs().max().item()
        checkpoint_check['max_box_diff_vs_ours_px'] = (
            ours_pred.boxes - from_checkpoint.bboxes).abs().max().item()
        checkpoint_check['same_labels_as_ours'] = bool(
            torch.equal(ours_pred.labels, from_checkpoint.labels))
    print('checkpoint check:', checkpoint_check)

    about = (f'MMDetection {mmdet.__version__} RetinaNet-R50-FPN (official config '
             'retinanet_r50_fpn_1x_coco.py, mmcv nms kernel ported to python) run on weights from '
             'tests/conftest.py: torch.manual_seed(0); randomize_detector(build_model('
             '"retinanet-r50"), seed=0); input calibration_images(seed=7, count=1, size=320)'
             f'[:, :, :{HEIGHT}]; predict with img_shape ({HEIGHT}, {WIDTH}), scale_factor 1, '
             'test_cfg nms_pre 1000 score 0.05 iou 0.5 max 100. checkpoint_check: a checkpoint '
             'written by detdeploy save_checkpoint, loaded by mmengine load_checkpoint(strict=True)')
    out = DATA_DIR / 'mmdet_retinanet_r50_reference.json'
    out.write_text(json.dumps({
        'about': about, 'input_hw': [HEIGHT, WIDTH], 'levels': levels,
        'det_bboxes': [[round(v, 4) for v in row] for row in pred.bboxes.tolist()],
        'det_scores': pred.scores.tolist(), 'det_labels': pred.labels.tolist(),
        'checkpoint_check': checkpoint_check}))
    print(f'wrote {out}: {len(pred.scores)} detections')


if __name__ == '__main__':
    main()
