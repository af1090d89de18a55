"""RetinaNet's named sizes with MMDetection 3.3.0's hyper-parameters, preprocessing and NMS
presets (config `retinanet/retinanet_r50_fpn_1x_coco.py`)."""
from __future__ import annotations

from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig

from ..base import ModelSpec
from ..coco_classes import COCO_CLASSES
from .model import RetinaNet

EVAL_NMS = NMSConfig(score_thr=0.05, pre_top_k=1000, iou_thr=0.5, max_det=100)
"""MMDetection RetinaNet's test config: what its published mAP is measured with."""
DEPLOY_NMS = EVAL_NMS
"""The test config is already a deployment setting (score 0.05, 1000 per level, 100 out): no
cheaper preset is needed."""

PREPROCESSING = PreprocessConfig(input_size=(800, 1333), channel_order='rgb',
                                 mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375),
                                 pad_value=0.0, pad_fill='mean', resize='scale',
                                 pad='divisor', size_divisor=32)
"""Keep-ratio Resize to scale (1333, 800), BGR->RGB, ImageNet mean/std, padding to a multiple
of 32 with 0 after normalising (MMDetection's DetDataPreprocessor)."""

SPECS = (
    ModelSpec('retinanet-r50', RetinaNet, dict(depth=50), PREPROCESSING,
              {'eval': EVAL_NMS, 'deploy': DEPLOY_NMS}, COCO_CLASSES),
)
