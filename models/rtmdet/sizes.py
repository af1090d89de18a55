"""RTMDet's named sizes (tiny..x) with MMDetection 3.3.0's hyper-parameters, preprocessing and
NMS presets (configs `rtmdet_<size>_8xb32-300e_coco`)."""
from __future__ import annotations

from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig

from ..base import ModelSpec
from ..coco_classes import COCO_CLASSES
from .model import RTMDet

EVAL_NMS = NMSConfig(score_thr=0.001, pre_top_k=30000, iou_thr=0.65, max_det=300)
"""MMDetection RTMDet's test config: what its published mAP is measured with."""
DEPLOY_NMS = NMSConfig(score_thr=0.05, pre_top_k=1000, iou_thr=0.65, max_det=100)
"""Deployment defaults: fewer, surer candidates and a smaller output."""

PREPROCESSING = PreprocessConfig(input_size=(640, 640), channel_order='bgr',
                                 mean=(103.53, 116.28, 123.675), std=(57.375, 57.12, 58.395),
                                 pad_value=114.0, resize='fit', pad='fixed', size_divisor=32)

# name: deepen_factor, widen_factor, neck_channels, out_channels, num_csp_blocks, exp_on_reg
SIZES = {
    'rtmdet-tiny': (0.167, 0.375, (96, 192, 384), 96, 1, False),
    'rtmdet-s': (0.33, 0.5, (128, 256, 512), 128, 1, False),
    'rtmdet-m': (0.67, 0.75, (192, 384, 768), 192, 2, True),
    'rtmdet-l': (1.0, 1.0, (256, 512, 1024), 256, 3, True),
    'rtmdet-x': (1.33, 1.25, (320, 640, 1280), 320, 4, True),
}

SPECS = tuple(
    ModelSpec(name, RTMDet,
              dict(deepen_factor=deepen, widen_factor=widen, neck_channels=neck,
                   out_channels=out, num_csp_blocks=blocks, exp_on_reg=exp_on_reg),
              PREPROCESSING, {'eval': EVAL_NMS, 'deploy': DEPLOY_NMS}, COCO_CLASSES)
    for name, (deepen, widen, neck, out, blocks, exp_on_reg) in SIZES.items())
