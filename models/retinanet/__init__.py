"""RetinaNet (ResNet-50 FPN): the model, its named size and presets."""
from .model import RawOutputs, RetinaNet, decode_outputs
from .sizes import DEPLOY_NMS, EVAL_NMS, SPECS

__all__ = ['DEPLOY_NMS', 'EVAL_NMS', 'RawOutputs', 'RetinaNet', 'SPECS', 'decode_outputs']
