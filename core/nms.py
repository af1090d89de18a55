"""NMS settings as data, and the one meaning of a score threshold.

`score_thr` keeps detections scoring strictly above it, as MMDetection's `filter_scores_and_topk`
does; the same rule applies in the graph, in PyTorch and to `--score-thr` on the command line.
The presets (a family's `eval` and `deploy` values) live with each family's spec.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import DetdeployError

MAX_PRE_TOP_K = 1_000_000      # per pyramid level; MMDetection's largest preset is 30,000
MAX_DETECTIONS = 100_000       # per image
NMS_PRESETS = ('deploy', 'eval')
"""deploy: fewer, surer candidates and a small output (the default of export, infer, bench);
eval: the family's test config, what its published mAP is measured with (the default of eval)."""


@dataclass(frozen=True)
class NMSConfig:
    """Post-processing settings.

    `pre_top_k` keeps the best (anchor, class) pairs per pyramid level, `score_thr` those
    scoring strictly above it; per-class NMS at `iou_thr` (with `class_agnostic`, boxes of
    different classes suppress each other too: one box per object); at most `max_det` per image.
    `objectness_thr` is for families with an objectness output (YOLOv3's `conf_thr`): anchors
    whose objectness is below it are dropped first; 0 drops none, and families without
    objectness ignore it.
    """
    score_thr: float = 0.05
    pre_top_k: int = 1000
    iou_thr: float = 0.65
    max_det: int = 100
    class_agnostic: bool = False
    objectness_thr: float = 0.0

    def to_dict(self) -> dict:
        """The settings as a dict; `class_agnostic` and `objectness_thr` only when set, so that
        the metadata of per-class families without objectness reads as before."""
        values = asdict(self)
        if not self.class_agnostic:
            del values['class_agnostic']
        if not self.objectness_thr:
            del values['objectness_thr']
        return values

    @classmethod
    def from_dict(cls, values: dict) -> 'NMSConfig':
        """From `to_dict`'s form; settings written without `class_agnostic` (older files) are
        per-class, without `objectness_thr` (added later) 0."""
        if not isinstance(values, dict):
            raise TypeError(f'must be a JSON object, got {type(values).__name__}')
        agnostic = values.get('class_agnostic', False)
        if not isinstance(agnostic, bool):
            raise ValueError(f'class_agnostic must be true or false, got {agnostic!r}')
        return cls(score_thr=float(values['score_thr']), pre_top_k=int(values['pre_top_k']),
                   iou_thr=float(values['iou_thr']), max_det=int(values['max_det']),
                   class_agnostic=agnostic,
                   objectness_thr=float(values.get('objectness_thr', 0.0)))

    def problem(self) -> str | None:
        """What makes these values unusable, or None."""
        for name, value in (('score_thr', self.score_thr), ('iou_thr', self.iou_thr),
                            ('objectness_thr', self.objectness_thr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= 1):
                return f'{name} must be a number in [0, 1], got {value}'
        for name, value, most in (('pre_top_k', self.pre_top_k, MAX_PRE_TOP_K),
                                  ('max_det', self.max_det, MAX_DETECTIONS)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                return f'{name} must be an integer from 1 to {most}, got {value}'
        return None

    def check(self) -> 'NMSConfig':
        problem = self.problem()
        if problem:
            raise DetdeployError(f'NMS settings: {problem}')
        return self

    def describe(self) -> str:
        """One line for commands to print: which settings produced the detections."""
        objectness = (f'objectness >= {self.objectness_thr:g}, ' if self.objectness_thr > 0
                      else '')
        return (f'{objectness}score > {self.score_thr:g}, pre-top-k {self.pre_top_k} per level, '
                f'IoU {self.iou_thr:g}{" class-agnostic" if self.class_agnostic else ""}, '
                f'max {self.max_det} per image')


def keep_above(scores, score_thr: float | None):
    """The mask of scores kept by `score_thr` (strictly above it); None keeps all."""
    return scores > (-math.inf if score_thr is None else score_thr)
