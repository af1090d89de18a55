"""RTMDet-Ins's named sizes (tiny..x) with MMDetection 3.3.0's hyper-parameters, preprocessing
and NMS presets (configs `rtmdet-ins_<size>_8xb32-300e_coco`, x: `_8xb16-`)."""
from __future__ import annotations

from detdeploy.core.nms import NMSConfig

from ..base import ModelSpec
from ..coco_classes import COCO_CLASSES
from ..rtmdet.sizes import PREPROCESSING
from .model import RTMDetIns

EVAL_NMS = NMSConfig(score_thr=0.05, pre_top_k=1000, iou_thr=0.6, max_det=100)
"""MMDetection RTMDet-Ins's test config (nms_pre 1000, score 0.05, NMS IoU 0.6, 100 per image):
what its published mask AP is measured with."""
DEPLOY_NMS = EVAL_NMS
"""The test config is already a deployment one; it differs from RTMDet's deploy preset only in
the NMS IoU (0.6, not 0.65)."""

# name: deepen_factor, widen_factor, neck_channels, out_channels, num_csp_blocks
# (the head has no exp_on_reg: RTMDet-Ins boxes are ReLU(rtm_reg) * stride at every size)
SIZES = {
    'rtmdet-ins-tiny': (0.167, 0.375, (96, 192, 384), 96, 1),
    'rtmdet-ins-s': (0.33, 0.5, (128, 256, 512), 128, 1),
    'rtmdet-ins-m': (0.67, 0.75, (192, 384, 768), 192, 2),
    'rtmdet-ins-l': (1.0, 1.0, (256, 512, 1024), 256, 3),
    'rtmdet-ins-x': (1.33, 1.25, (320, 640, 1280), 320, 4),
}

SPECS = tuple(
    ModelSpec(name, RTMDetIns,
              dict(deepen_factor=deepen, widen_factor=widen, neck_channels=neck,
                   out_channels=out, num_csp_blocks=blocks),
              PREPROCESSING, {'eval': EVAL_NMS, 'deploy': DEPLOY_NMS}, COCO_CLASSES)
    for name, (deepen, widen, neck, out, blocks) in SIZES.items())
