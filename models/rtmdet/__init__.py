"""RTMDet (tiny..x): the model, its named sizes and presets, and its training loss."""
from .model import RawOutputs, RTMDet, decode_outputs
from .sizes import DEPLOY_NMS, EVAL_NMS, SPECS

__all__ = ['DEPLOY_NMS', 'EVAL_NMS', 'RTMDet', 'RawOutputs', 'SPECS', 'decode_outputs']
