"""The tasks a detdeploy model does and, per task and NMS mode, the outputs of its graph.

This is the one description of a model file's outputs: the exporter names its outputs from it,
runtimes check graphs against it and read outputs by its positions, parity compares by it, and
the metadata's human-readable `output_layout` is written from it. Values only, no execution.
"""
from __future__ import annotations

from dataclasses import dataclass

DETECT, INSTANCE, ROTATED = 'detect', 'instance', 'rotated'
TASKS = (DETECT, INSTANCE, ROTATED)
"""detect: axis-aligned boxes; instance: boxes and per-detection masks; rotated: oriented boxes."""

NMS_MODES = ('onnx', 'trt', 'none')
"""onnx: NMS in the graph from standard operators; trt: TensorRT's EfficientNMS_TRT plugin;
none: per-anchor decoded outputs, no NMS (for host-side NMS or inspection)."""


@dataclass(frozen=True)
class OutputField:
    """One graph output: its name, element type and dims (symbols: B batch, K max detections,
    N anchors, C classes, H/W mask size)."""
    name: str
    dtype: str                  # 'int32' or 'float32'
    dims: tuple[str, ...]
    meaning: str

    @property
    def kind(self) -> str:
        """'i' for integer outputs, 'f' for floating point."""
        return 'i' if self.dtype.startswith('int') else 'f'

    @property
    def rank(self) -> int:
        return len(self.dims)

    def describe(self) -> str:
        return f'{self.name} [{",".join(self.dims)}] {self.dtype} {self.meaning}'.strip()


_NUM_DETS = OutputField('num_dets', 'int32', ('B', '1'), 'valid rows per image')
_SCORES = OutputField('scores', 'float32', ('B', 'K'), '')
_LABELS = OutputField('labels', 'int32', ('B', 'K'), '')
_BOXES = OutputField('boxes', 'float32', ('B', 'K', '4'), 'xyxy network-input px')
_ROTATED_BOXES = OutputField('boxes', 'float32', ('B', 'K', '5'),
                             'cx,cy,w,h network-input px, angle rad in [-pi/2,pi/2) (le90)')
_MASKS = OutputField('masks', 'float32', ('B', 'K', 'H', 'W'),
                     'mask probabilities per detection (size and frame in the metadata)')
_ANCHOR_BOXES = OutputField('boxes', 'float32', ('B', 'N', '4'), 'xyxy network-input px per anchor')
_ANCHOR_ROTATED = OutputField('boxes', 'float32', ('B', 'N', '5'),
                              'cx,cy,w,h,angle network-input px per anchor')
_ANCHOR_SCORES = OutputField('scores', 'float32', ('B', 'N', 'C'), 'class scores per anchor')

_SCHEMAS: dict[tuple[str, str], tuple[OutputField, ...]] = {
    (DETECT, 'onnx'): (_NUM_DETS, _BOXES, _SCORES, _LABELS),
    (DETECT, 'trt'): (_NUM_DETS, _BOXES, _SCORES, _LABELS),
    (DETECT, 'none'): (_ANCHOR_BOXES, _ANCHOR_SCORES),
    (INSTANCE, 'onnx'): (_NUM_DETS, _BOXES, _SCORES, _LABELS, _MASKS),
    (INSTANCE, 'trt'): (_NUM_DETS, _BOXES, _SCORES, _LABELS, _MASKS),
    (ROTATED, 'onnx'): (_NUM_DETS, _ROTATED_BOXES, _SCORES, _LABELS),
    (ROTATED, 'none'): (_ANCHOR_ROTATED, _ANCHOR_SCORES),
}
PADDING_NOTE = 'rows past num_dets are padding (0 boxes and scores, label -1)'


def has_schema(task: str, nms_mode: str) -> bool:
    return (task, nms_mode) in _SCHEMAS


def output_schema(task: str, nms_mode: str) -> tuple[OutputField, ...]:
    """The outputs, in order, of a graph of `task` exported with `nms_mode`."""
    try:
        return _SCHEMAS[(task, nms_mode)]
    except KeyError:
        modes = [mode for (t, mode) in _SCHEMAS if t == task]
        raise ValueError(f"no output schema for task '{task}' with NMS mode '{nms_mode}' "
                         f"(modes of this task: {', '.join(modes) or 'none'})") from None


def output_names(task: str, nms_mode: str) -> tuple[str, ...]:
    return tuple(field.name for field in output_schema(task, nms_mode))


def has_nms(nms_mode: str) -> bool:
    """Whether a graph of this mode ends in NMS (padded detections) or per-anchor outputs."""
    return nms_mode != 'none'


def describe_layout(task: str, nms_mode: str) -> str:
    """The schema as one line of text, stored in the metadata for people reading the file."""
    text = '; '.join(field.describe() for field in output_schema(task, nms_mode))
    if nms_mode == 'trt':
        text += ' (EfficientNMS_TRT)'
    return f'{text}; {PADDING_NOTE}' if has_nms(nms_mode) else f'{text}; no NMS'
