"""Write tests/data/mmdet_yolov3_mobilenetv2_reference.json by running MMDetection's own
YOLOv3-MobileNetV2 (the 320 and 416 configs), and record that a checkpoint saved by detdeploy
loads strictly in MMDetection and predicts the same.

Not part of the package or CI; needs MMDetection 3.3.0 outside the repo (see
tools/make_mmdet_reference.py):
    PYTHONPATH=/tmp/mmref/site:tests .venv/bin/python tools/make_mmdet_reference_yolov3.py
"""
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
import mmcv_lite_shim  # noqa: E402

mmcv_lite_shim.install()

import mmdet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

from conftest import DATA_DIR, calibration_images, randomize_detector  # noqa: E402
from detdeploy.models import build_model, get_spec, save_checkpoint  # noqa: E402
from detdeploy.models.yolov3 import EVAL_NMS  # noqa: E402

CONFIG = 'yolo/yolov3_mobilenetv2_8xb24-320-300e_coco.py'
NAME = 'yolov3-mobilenetv2-320'
CONFIG_416 = 'yolo/yolov3_mobilenetv2_8xb24-ms-416-300e_coco.py'


def build_mmdet(config_file=CONFIG):
    config = Config.fromfile(mmcv_lite_shim.config_path(config_file))
    config.model.backbone.init_cfg = None
    mmcv_lite_shim.syncbn_to_bn(config.model)
    return MODELS.build(config.model).eval()


def mmdet_predict(mm_model, images, height, width):
    sample = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width),
                                         pad_shape=(height, width), scale_factor=(1.0, 1.0),
                                         batch_input_shape=(height, width)))
    with torch.no_grad():
        return mm_model.predict(images, [sample], rescale=True)[0].pred_instances


def reference_record(mm_model, ours, images, height, width):
    """MMDetection's prediction maps (sampled) and final detections for `images`, plus how far
    ours are from them (printed)."""
    with torch.no_grad():
        (pred_maps,) = mm_model.bbox_head(mm_model.extract_feat(images))
        raw_err = max((a - b).abs().max().item() for a, b in zip(ours(images).pred_maps, pred_maps))
    print(f'{width}: max prediction-map diff {raw_err:.2e}')
    pred = mmdet_predict(mm_model, images, height, width)
    levels = []
    for pred_map in pred_maps:
        flat = pred_map.flatten()
        index = torch.linspace(0, flat.numel() - 1, 197).long()
        levels.append({'shape': list(pred_map.shape), 'sum': flat.double().sum().item(),
                       'abs_sum': flat.double().abs().sum().item(),
                       'index': index.tolist(), 'values': flat[index].tolist()})
    compare('ours vs MMDetection', ours.predict(images, EVAL_NMS)[0], pred)
    return pred, {'input_hw': [height, width], 'levels': levels,
                  'det_bboxes': [[round(v, 4) for v in row] for row in pred.bboxes.tolist()],
                  'det_scores': pred.scores.tolist(), 'det_labels': pred.labels.tolist()}


def main() -> None:
    register_all_modules()
    mm_model = build_mmdet()
    torch.manual_seed(0)
    ours = randomize_detector(build_model(NAME), seed=0)
    mm_model.load_state_dict(ours.state_dict(), strict=True)
    height, width = 256, 320
    images = calibration_images(seed=7, count=1)[..., :height, :]
    pred, record = reference_record(mm_model, ours, images, height, width)

    # A checkpoint file written by detdeploy, loaded strictly by mmengine into a fresh model.
    ours_det = ours.predict(images, EVAL_NMS)[0]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'yolov3_ours.pth')
        save_checkpoint(path, ours, get_spec(NAME), get_spec(NAME).class_names)
        fresh = build_mmdet()
        load_checkpoint(fresh, path, map_location='cpu', strict=True)
        print('mmengine load_checkpoint(strict=True) of our checkpoint: ok')
        reloaded = mmdet_predict(fresh, images, height, width)
    compare('ours vs MMDetection loading our checkpoint', ours_det, reloaded)
    count = min(len(ours_det.scores), len(reloaded.scores))
    checkpoint_check = {
        'loads_strictly': True,
        'same_as_direct_load': bool(torch.equal(reloaded.bboxes, pred.bboxes)
                                    and torch.equal(reloaded.scores, pred.scores)
                                    and torch.equal(reloaded.labels, pred.labels)),
        'same_labels_as_ours': bool(len(ours_det.scores) == len(reloaded.scores) and torch.equal(
            ours_det.labels[:count], reloaded.labels[:count])),
        'max_box_diff_vs_ours_px': (ours_det.boxes[:count] - reloaded.bboxes[:count]
                                    ).abs().max().item(),
        'max_score_diff_vs_ours': (ours_det.scores[:count] - reloaded.scores[:count]
                                   ).abs().max().item()}

    # The 416 config (other anchors): same weights recipe, a 320x416 input.
    mm_416 = build_mmdet(CONFIG_416)
    torch.manual_seed(0)
    ours_416 = randomize_detector(build_model('yolov3-mobilenetv2-416'), seed=0)
    mm_416.load_state_dict(ours_416.state_dict(), strict=True)
    images_416 = calibration_images(seed=7, count=1, size=416)[..., :320, :]
    _, record_416 = reference_record(mm_416, ours_416, images_416, 320, 416)

    about = (f'MMDetection {mmdet.__version__} YOLOv3-MobileNetV2 (official configs {CONFIG} and, '
             f'under config_416, {CONFIG_416}; mmcv nms kernel ported to python) run on weights '
             'from tests/conftest.py: torch.manual_seed(0); randomize_detector(build_model(NAME), '
             f'seed=0); input calibration_images(seed=7, count=1)[..., :{height}, :] (416: '
             'calibration_images(seed=7, count=1, size=416)[..., :320, :]); predict with img_shape '
             'the input size, scale_factor 1, test_cfg conf_thr 0.005 nms_pre 1000 score 0.05 '
             'iou 0.45 max 100. checkpoint_check: a checkpoint written by detdeploy '
             'save_checkpoint, loaded by mmengine load_checkpoint(strict=True) into a fresh '
             'MMDetection model, predicting on the 320 input')
    out = DATA_DIR / 'mmdet_yolov3_mobilenetv2_reference.json'
    out.write_text(json.dumps({'about': about, **record, 'checkpoint_check': checkpoint_check,
                               'config_416': record_416}))
    print(f'wrote {out}: {len(pred.scores)} detections (320), '
          f'{len(record_416["det_scores"])} (416)')


def compare(title, ours, theirs):
    count = min(len(ours.scores), len(theirs.scores))
    labels_equal = torch.equal(ours.labels[:count], theirs.labels[:count])
    score_err = (ours.scores[:count] - theirs.scores[:count]).abs().max().item()
    box_err = (ours.boxes[:count] - theirs.bboxes[:count]).abs().max().item()
    print(f'{title}: {len(ours.scores)} vs {len(theirs.scores)} detections, labels equal '
          f'{labels_equal}, max score diff {score_err:.2e}, max box diff {box_err:.2e} px')


if __name__ == '__main__':
    main()
