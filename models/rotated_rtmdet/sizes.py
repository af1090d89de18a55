"""Rotated RTMDet's named sizes (tiny..l) with MMRotate 1.x's hyper-parameters, preprocessing and
NMS presets (configs `rotated_rtmdet_<size>-3x-dota`), and DOTA's 15 class names."""
from __future__ import annotations

from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig

from ..base import ModelSpec
from .model import RotatedRTMDet

DOTA_CLASSES = ('plane', 'baseball-diamond', 'bridge', 'ground-track-field', 'small-vehicle',
                'large-vehicle', 'ship', 'tennis-court', 'basketball-court', 'storage-tank',
                'soccer-ball-field', 'roundabout', 'harbor', 'swimming-pool', 'helicopter')

EVAL_NMS = NMSConfig(score_thr=0.05, pre_top_k=2000, iou_thr=0.1, max_det=2000)
"""MMRotate's test config: what its published DOTA mAP is measured with."""
DEPLOY_NMS = NMSConfig(score_thr=0.1, pre_top_k=1000, iou_thr=0.1, max_det=300)
"""Deployment defaults: the rotated NMS screens pairs of the candidates above the score
threshold, so a higher threshold and fewer candidates keep its quadratic part small."""

PREPROCESSING = PreprocessConfig(input_size=(1024, 1024), channel_order='bgr',
                                 mean=(103.53, 116.28, 123.675), std=(57.375, 57.12, 58.395),
                                 pad_value=114.0, resize='fit', pad='fixed', size_divisor=32)

# name: deepen_factor, widen_factor, neck_channels, out_channels, num_csp_blocks, exp_on_reg
# (m and l inherit exp_on_reg=True from rotated_rtmdet_l-3x-dota.py; tiny and s set False)
SIZES = {
    'rotated-rtmdet-tiny': (0.167, 0.375, (96, 192, 384), 96, 1, False),
    'rotated-rtmdet-s': (0.33, 0.5, (128, 256, 512), 128, 1, False),
    'rotated-rtmdet-m': (0.67, 0.75, (192, 384, 768), 192, 2, True),
    'rotated-rtmdet-l': (1.0, 1.0, (256, 512, 1024), 256, 3, True),
}

SPECS = tuple(
    ModelSpec(name, RotatedRTMDet,
              dict(deepen_factor=deepen, widen_factor=widen, neck_channels=neck,
                   out_channels=out, num_csp_blocks=blocks, exp_on_reg=exp_on_reg),
              PREPROCESSING, {'eval': EVAL_NMS, 'deploy': DEPLOY_NMS}, DOTA_CLASSES)
    for name, (deepen, widen, neck, out, blocks, exp_on_reg) in SIZES.items())
