"""Write tests/data/mmrotate_rotated_rtmdet_tiny_reference.json by running MMRotate's own rotated
RTMDet on random weights.

Not part of the package or CI. It needs MMRotate 1.x (`mmrotate-dev` on the registry), MMDetection
3.3.0, mmengine and mmcv-lite installed outside the repo, e.g.:
    .venv/bin/pip install --no-deps --target /tmp/rot-site mmrotate-dev==1.0.1 mmdet==3.3.0 \
        mmengine mmcv-lite==2.1.0 addict yapf termcolor rich pygments markdown-it-py mdurl \
        opencv-python-headless pycocotools shapely scipy terminaltables platformdirs pyyaml six
    PYTHONPATH=/tmp/rot-site:tests .venv/bin/python tools/make_mmrotate_reference.py tiny
mmcv-lite has no compiled ops: mmcv's `nms_rotated` runs on `nms_rotated_kernel` below, a Python
port of mmcv's CPU kernel (mmcv/ops/csrc/pytorch/cpu/nms_rotated.cpp) with shapely's float64
polygon intersection for the IoU, so the reference shares no code with detdeploy's rotated NMS.
"""
import json
import os
import sys

import numpy as np
import shapely
import torch

import mmcv_lite_shim


def _polygons(boxes: np.ndarray):
    """(cx, cy, w, h, angle) rows -> shapely polygons, corners as mmcv's get_rotated_vertices."""
    cx, cy, w, h, a = boxes.T
    cos_half, sin_half = np.cos(a) * 0.5, np.sin(a) * 0.5
    x0, y0 = cx - sin_half * h - cos_half * w, cy + cos_half * h - sin_half * w
    x1, y1 = cx + sin_half * h - cos_half * w, cy - cos_half * h - sin_half * w
    corners = np.stack([np.stack([x0, y0], 1), np.stack([x1, y1], 1),
                        np.stack([2 * cx - x0, 2 * cy - y0], 1),
                        np.stack([2 * cx - x1, 2 * cy - y1], 1)], 1)
    return shapely.polygons(corners)


def nms_rotated_kernel(dets, scores, order, dets_sorted, labels, iou_threshold, multi_label):
    """mmcv 2.x nms_rotated_cpu: boxes by descending score, each kept box suppresses every
    later one whose IoU with it is >= the threshold (the CPU kernel's comparison)."""
    boxes = dets[:, :5].double().numpy()
    polygons = _polygons(boxes)
    areas = boxes[:, 2] * boxes[:, 3]
    order = scores.sort(0, descending=True)[1].numpy()
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for position, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[position + 1:]
        rest = rest[~suppressed[rest]]
        if not len(rest):
            continue
        inter = shapely.area(shapely.intersection(polygons[i], polygons[rest]))
        iou = inter / (areas[i] + areas[rest] - inter)
        iou[(areas[rest] < 1e-14) | (areas[i] < 1e-14)] = 0
        suppressed[rest[iou >= iou_threshold]] = True
    return torch.as_tensor(np.array(keep, dtype=np.int64))


mmcv_lite_shim.install(nms_rotated=nms_rotated_kernel)

import mmrotate  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmrotate.registry import MODELS  # noqa: E402
from mmrotate.utils import register_all_modules  # noqa: E402

from conftest import DATA_DIR, calibration_images, randomize_detector  # noqa: E402
from detdeploy.models import build_model  # noqa: E402

SIDE = 128


def main(size: str) -> None:
    register_all_modules()
    config = Config.fromfile(os.path.join(os.path.dirname(mmrotate.__file__), '.mim', 'configs',
                                          'rotated_rtmdet', f'rotated_rtmdet_{size}-3x-dota.py'))
    config.model.backbone.init_cfg = None
    mmcv_lite_shim.syncbn_to_bn(config.model)
    mm_model = MODELS.build(config.model).eval()

    torch.manual_seed(0)
    ours = randomize_detector(build_model(f'rotated-rtmdet-{size}'), seed=0)
    mm_model.load_state_dict(ours.state_dict(), strict=True)

    images = calibration_images(seed=7, count=1)[..., :SIDE, :SIDE]
    sample = DetDataSample(metainfo=dict(img_shape=(SIDE, SIDE), ori_shape=(SIDE, SIDE),
                                         pad_shape=(SIDE, SIDE), scale_factor=(1.0, 1.0),
                                         batch_input_shape=(SIDE, SIDE)))
    with torch.no_grad():
        raw = mm_model.bbox_head(mm_model.extract_feat(images))
        pred = mm_model.predict(images, [sample], rescale=True)[0].pred_instances
    levels = []
    for kind, tensors in zip(('cls_scores', 'bbox_preds', 'angle_preds'), raw):
        for level, tensor in enumerate(tensors):
            flat = tensor.flatten()
            index = torch.linspace(0, flat.numel() - 1, 61).long()
            levels.append({'name': f'{kind}.{level}', 'shape': list(tensor.shape),
                           'sum': flat.double().sum().item(),
                           'abs_sum': flat.double().abs().sum().item(),
                           'index': index.tolist(), 'values': flat[index].tolist()})
    about = (f'MMRotate {mmrotate.__version__} rotated RTMDet-{size} (official config, SyncBN->BN, '
             'mmcv nms_rotated CPU kernel ported to python with shapely IoU) on weights from '
             f'tests/conftest.py: torch.manual_seed(0); randomize_detector(build_model('
             f'"rotated-rtmdet-{size}"), seed=0); input calibration_images(seed=7, count=1)'
             f'[..., :{SIDE}, :{SIDE}]; predict with img_shape ({SIDE}, {SIDE}), scale_factor 1, '
             'test_cfg score 0.05 nms_pre 2000 rotated iou 0.1 max 2000')
    out = DATA_DIR / f'mmrotate_rotated_rtmdet_{size}_reference.json'
    out.write_text(json.dumps({
        'about': about, 'input_side': SIDE, 'raw': levels,
        'det_bboxes': [[round(v, 5) for v in row] for row in torch.as_tensor(pred.bboxes).tolist()],
        'det_scores': pred.scores.tolist(), 'det_labels': pred.labels.tolist()}))
    print(f'wrote {out}: {len(pred.scores)} detections')


if __name__ == '__main__':
    main(sys.argv[1])
