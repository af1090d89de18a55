"""Check that a `detdeploy train` checkpoint loads in MMDetection 3.3.0 (mmengine's
`load_checkpoint`, strict) and that MMDetection's predictions on shapes val images equal ours.

Not part of the package or CI; needs MMDetection installed outside the repo (see
tools/make_mmdet_reference.py, plus scipy):
    PYTHONPATH=/tmp/mmref/site:tests .venv/bin/python tools/check_checkpoint_in_mmdet.py \
        RUN/best.pth [VAL_IMAGE_DIR]
"""
import os
import sys
sys.path.insert(0, os.path.dirname(__file__))
import mmcv_lite_shim  # noqa: E402

mmcv_lite_shim.install()
import numpy as np, torch
import mmdet
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmdet.utils import register_all_modules
from mmengine.config import Config
from mmengine.runner import load_checkpoint
from detdeploy.models import load_detector
from detdeploy.models.rtmdet import EVAL_NMS
from detdeploy.runtimes.torch_backend import TorchBackend
from detdeploy.runtimes.pipeline import detect
from detdeploy.runtimes.preprocess import read_image, preprocess

ckpt = sys.argv[1]
register_all_modules()
cfg = Config.fromfile(os.path.join(os.path.dirname(mmdet.__file__), '.mim', 'configs', 'rtmdet', 'rtmdet_tiny_8xb32-300e_coco.py'))
cfg.model.backbone.init_cfg = None
cfg.model.bbox_head.num_classes = 6
mmcv_lite_shim.syncbn_to_bn(cfg.model)
mm = MODELS.build(cfg.model).eval()
info = load_checkpoint(mm, ckpt, map_location='cpu', strict=True)
print('mmengine load_checkpoint strict: ok; meta classes', info['meta']['dataset_meta']['classes'])
ours = load_detector('rtmdet-tiny', ckpt)
backend = TorchBackend(ours, nms=EVAL_NMS)
val_dir = sys.argv[2] if len(sys.argv) > 2 else 'shapes256/val'
files = sorted(os.listdir(val_dir))[:5]
worst = 0
for name in files:
    path = os.path.join(val_dir, name)
    det, _ = next(detect(backend, [path]))
    tensor, meta = preprocess(read_image(path), backend.preprocess_config)
    h, w = meta.resized_hw
    sample = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=meta.original_hw, pad_shape=tuple(tensor.shape[1:]), scale_factor=(meta.scale_wh[0], meta.scale_wh[1]), batch_input_shape=tuple(tensor.shape[1:])))
    with torch.no_grad():
        pred = mm.predict(torch.from_numpy(tensor)[None], [sample], rescale=True)[0].pred_instances
    n = min(len(det.scores), len(pred.scores))
    same_labels = np.array_equal(det.labels[:n], pred.labels.numpy()[:n])
    score_err = np.abs(det.scores[:n] - pred.scores.numpy()[:n]).max()
    box_err = np.abs(det.boxes_xyxy_px[:n] - pred.bboxes.numpy()[:n]).max()
    worst = max(worst, box_err)
    print(f'{name}: ours {len(det.scores)} mmdet {len(pred.scores)} labels equal {same_labels} max score err {score_err:.2e} max box err {box_err:.2e} px; top-3 scores {det.scores[:3].round(3)}')
