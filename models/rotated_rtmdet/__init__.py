"""Rotated RTMDet (tiny..l): the model, its named sizes and presets (MMRotate 1.x, DOTA)."""
from .model import RawOutputs, RotatedRTMDet, decode_outputs
from .sizes import DEPLOY_NMS, DOTA_CLASSES, EVAL_NMS, SPECS

__all__ = ['DEPLOY_NMS', 'DOTA_CLASSES', 'EVAL_NMS', 'RawOutputs', 'RotatedRTMDet', 'SPECS',
           'decode_outputs']
