"""RTMDet-Ins (tiny..x): instance segmentation on RTMDet, with its mask kernels and prototypes,
its named sizes and presets."""
from .model import RawOutputs, RTMDetIns, RTMDetInsSepBNHead, dynamic_mask_logits
from .sizes import DEPLOY_NMS, EVAL_NMS, SPECS

__all__ = ['DEPLOY_NMS', 'EVAL_NMS', 'RTMDetIns', 'RTMDetInsSepBNHead', 'RawOutputs', 'SPECS',
           'dynamic_mask_logits']
