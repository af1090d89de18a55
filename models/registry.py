"""The named models detdeploy knows: per-size hyper-parameters, input size and preprocessing.

Values are those of MMDetection 3.3.0's official RTMDet configs (rtmdet_<size>_8xb32-300e_coco).
`build_model` is the only place that turns a name into a module.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from detdeploy.errors import UnknownModelError
from detdeploy.runtimes.preprocess import PreprocessConfig

from .coco_classes import COCO_CLASSES
from .postprocess import EVAL_NMS, NMSConfig
from .rtmdet import RTMDet


@dataclass(frozen=True)
class ModelSpec:
    name: str
    deepen_factor: float
    widen_factor: float
    neck_channels: tuple[int, int, int]
    out_channels: int
    num_csp_blocks: int
    exp_on_reg: bool
    preprocessing: PreprocessConfig = field(default_factory=PreprocessConfig)
    test_nms: NMSConfig = EVAL_NMS
    class_names: tuple[str, ...] = COCO_CLASSES


MODEL_SPECS = {spec.name: spec for spec in (
    ModelSpec('rtmdet-tiny', 0.167, 0.375, (96, 192, 384), 96, 1, exp_on_reg=False),
    ModelSpec('rtmdet-s', 0.33, 0.5, (128, 256, 512), 128, 1, exp_on_reg=False),
    ModelSpec('rtmdet-m', 0.67, 0.75, (192, 384, 768), 192, 2, exp_on_reg=True),
    ModelSpec('rtmdet-l', 1.0, 1.0, (256, 512, 1024), 256, 3, exp_on_reg=True),
    ModelSpec('rtmdet-x', 1.33, 1.25, (320, 640, 1280), 320, 4, exp_on_reg=True),
)}
ALIASES = {'rtmdet': 'rtmdet-tiny'}


def model_names() -> list[str]:
    return list(MODEL_SPECS) + list(ALIASES)


def get_spec(name: str) -> ModelSpec:
    """The spec for a registry name or alias; unknown names get the closest suggestion."""
    key = ALIASES.get(name.lower(), name.lower())
    if key in MODEL_SPECS:
        return MODEL_SPECS[key]
    close = difflib.get_close_matches(name.lower(), model_names(), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ''
    raise UnknownModelError(f"unknown model '{name}': {hint}known: {', '.join(model_names())}")


def build_model(name: str, num_classes: int | None = None) -> RTMDet:
    """A randomly initialised model of the named size, in eval mode."""
    spec = get_spec(name)
    model = RTMDet(spec.deepen_factor, spec.widen_factor, spec.neck_channels, spec.out_channels,
                   spec.num_csp_blocks, spec.exp_on_reg,
                   num_classes=num_classes or len(spec.class_names))
    return model.eval()
