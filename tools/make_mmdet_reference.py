"""Write tests/data/mmdet_rtmdet_<size>_reference.json by running MMDetection's own RTMDet.

Not part of the package or CI. It needs MMDetection 3.3.0, mmengine and mmcv-lite installed
outside the repo, e.g.:
    .venv/bin/pip install --no-deps --target /tmp/mmref/site mmdet==3.3.0 mmengine mmcv-lite==2.1.0 \
        addict yapf termcolor rich pygments markdown-it-py mdurl opencv-python-headless \
        pycocotools shapely scipy terminaltables platformdirs
    PYTHONPATH=/tmp/mmref/site:tests .venv/bin/python tools/make_mmdet_reference.py tiny
mmcv-lite has no compiled ops; mmcv's Python `batched_nms` runs unchanged on a Python port of
its CPU NMS kernel (mmcv/ops/csrc/pytorch/cpu/nms.cpp): see tools/mmcv_lite_shim.py.
"""
import json
import sys

import torch

import mmcv_lite_shim

mmcv_lite_shim.install()

import mmdet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402

from conftest import DATA_DIR, calibration_images, randomize_detector  # noqa: E402
from detdeploy.models import build_model  # noqa: E402


def main(size: str) -> None:
    register_all_modules()
    config = Config.fromfile(mmcv_lite_shim.config_path(f'rtmdet/rtmdet_{size}_8xb32-300e_coco.py'))
    config.model.backbone.init_cfg = None
    mmcv_lite_shim.syncbn_to_bn(config.model)
    mm_model = MODELS.build(config.model).eval()

    torch.manual_seed(0)
    ours = randomize_detector(build_model(f'rtmdet-{size}'), seed=0)
    mm_model.load_state_dict(ours.state_dict(), strict=True)

    height, width = 320, 256
    images = calibration_images(seed=7, count=1)[..., :width]
    sample = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width),
                                         pad_shape=(height, width), scale_factor=(1.0, 1.0),
                                         batch_input_shape=(height, width)))
    with torch.no_grad():
        cls_scores, bbox_preds = mm_model.bbox_head(mm_model.extract_feat(images))
        pred = mm_model.predict(images, [sample], rescale=True)[0].pred_instances
    levels = []
    for cls, box in zip(cls_scores, bbox_preds):
        cls_flat, box_flat = cls.flatten(), box.flatten()
        cls_index = torch.linspace(0, cls_flat.numel() - 1, 97).long()
        box_index = torch.linspace(0, box_flat.numel() - 1, 53).long()
        levels.append({
            'cls_shape': list(cls.shape), 'cls_sum': cls_flat.double().sum().item(),
            'cls_abs_sum': cls_flat.double().abs().sum().item(),
            'cls_index': cls_index.tolist(), 'cls_values': cls_flat[cls_index].tolist(),
            'box_sum': box_flat.double().sum().item(),
            'box_abs_sum': box_flat.double().abs().sum().item(),
            'box_index': box_index.tolist(), 'box_values': box_flat[box_index].tolist()})
    about = (f'MMDetection {mmdet.__version__} RTMDet-{size} (official config, SyncBN->BN, mmcv '
             'nms kernel ported to python) run on weights from tests/conftest.py: '
             f'torch.manual_seed(0); randomize_detector(build_model("rtmdet-{size}"), seed=0); '
             'input calibration_images(seed=7, count=1)[..., :256]; predict with '
             'img_shape (320, 256), scale_factor 1, test_cfg score 0.001 nms_pre 30000 iou 0.65 '
             'max 300')
    out = DATA_DIR / f'mmdet_rtmdet_{size}_reference.json'
    out.write_text(json.dumps({
        'about': about, 'levels': levels,
        'det_bboxes': [[round(v, 4) for v in row] for row in pred.bboxes.tolist()],
        'det_scores': pred.scores.tolist(), 'det_labels': pred.labels.tolist()}))
    print(f'wrote {out}: {len(pred.scores)} detections')


if __name__ == '__main__':
    main(sys.argv[1])
