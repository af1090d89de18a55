"""The named models detdeploy knows: every family's size table, joined into one dict of names.

A new family adds its `SPECS` here. `get_spec` is the only place that turns a name into a spec;
`ModelSpec.build` turns a spec into a module.
"""
from __future__ import annotations

import difflib

from detdeploy.core.errors import UnknownModelError

from .base import Detector, ModelSpec
from .faster_rcnn import SPECS as FASTER_RCNN_SPECS
from .mask_rcnn import SPECS as MASK_RCNN_SPECS
from .retinanet import SPECS as RETINANET_SPECS
from .rotated_rtmdet import SPECS as ROTATED_RTMDET_SPECS
from .rtmdet import SPECS as RTMDET_SPECS
from .rtmdet_ins import SPECS as RTMDET_INS_SPECS
from .yolov3 import SPECS as YOLOV3_SPECS

MODEL_SPECS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    *RTMDET_SPECS,
    *FASTER_RCNN_SPECS,
    *MASK_RCNN_SPECS,
    *RETINANET_SPECS,
    *YOLOV3_SPECS,
    *ROTATED_RTMDET_SPECS,
    *RTMDET_INS_SPECS,
)}
ALIASES = {'rtmdet': 'rtmdet-tiny', 'rtmdet-ins': 'rtmdet-ins-tiny',
           'rotated-rtmdet': 'rotated-rtmdet-tiny'}


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


def build_model(name: str, num_classes: int | None = None) -> Detector:
    """A randomly initialised model of the named size, in eval mode."""
    return get_spec(name).build(num_classes)
