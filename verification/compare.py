"""The comparison rules of `detdeploy parity`, in one place: tolerances, element-wise array
comparison (Polygraphy's semantics) and greedy detection matching with borderline handling.

Numbers in, verdicts out (dataclasses); no model running, reading or printing here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class Tolerances:
    """What counts as agreement.

    Arrays (raw outputs, intermediate tensors): an element fails only if |a - b| > `atol` AND
    |a - b| / |b| > `rtol`, b the PyTorch value (Polygraphy's element-wise rule).
    Matched detections: a box coordinate fails by the same rule with `box_atol_px`, `box_rtol`;
    a score fails if off by more than `score_atol`. Detections pair up when their labels are
    equal and their IoU is at least `match_iou`. An unmatched detection whose score lies within
    `borderline` of the score threshold or of the max-det cut is borderline, not a failure,
    unless more than `max_borderline_share` of a side's detections (and more than 2) are: ties
    at the cut reorder a few detections (13 % at most on saturated random-weight scores), not
    most of them.
    Masks of matched detections (instance models) fail if more than `mask_prob_max_share` of
    their probabilities (the `masks` output, same frame on both sides) differ by more than
    `mask_prob_atol`, or if their IoU at the original resolution is below `mask_min_iou` when
    their union holds at least `mask_iou_min_pixels` pixels (on smaller masks one flipped
    boundary pixel is already a few % of IoU; their probabilities are still checked). The
    share: float32 rounding in the dynamic convolutions of an ill-conditioned model moves a
    few probabilities near 0.5 (synthetic rtmdet-ins-tiny at 128 px, ONNX Runtime vs PyTorch:
    up to 0.78 % of a mask's 256 probabilities off by more than 2e-3, at most by 0.021, mask
    IoU >= 0.9966); a faulty mask head moves most of them.
    """
    atol: float
    rtol: float
    box_atol_px: float
    box_rtol: float
    score_atol: float
    borderline: float
    match_iou: float = 0.5
    max_borderline_share: float = 0.25
    rotated_box_scale: float = 2.5
    mask_prob_atol: float = 2e-3
    mask_prob_max_share: float = 0.01
    mask_min_iou: float = 0.95
    mask_iou_min_pixels: int = 64

    def box_atol_for(self, box_dim: int) -> float:
        """`box_atol_px` for xyxy boxes; rotated boxes (5 columns) get `rotated_box_scale` times
        it: an angle error moves a rotated box's centre by the angle error times its offset
        from the anchor point (measured fp32, random-weight rotated-rtmdet-tiny at 128 px, boxes
        up to 150 px: angle 3e-4 rad, coordinates 2.0e-2 px)."""
        return self.box_atol_px * (self.rotated_box_scale if box_dim == 5 else 1.0)

    def to_dict(self) -> dict:
        return asdict(self)


# fp32, measured with this project's random-weight rtmdet-tiny (ill-conditioned: logits up to
# 38, saturated scores), ONNX Runtime CPU vs PyTorch CPU, 16 generated images at 320 and 640:
# max |a-b| of logits 1.8e-3 (2.4e-3 in another run) and of distances 1.3e-2 px (on distances
# of 120 px); with rtol 1e-3 an atol of 3.5e-3 already passes every element. PyTorch float32
# itself is as far from a float64 run (logits 1.2e-3, distances 5.2e-3), so this is float32
# rounding, not the export.
# Detections: boxes within 5.6e-3 px, scores within 1.4e-5; a logit error of 1.8e-3 can move a
# sigmoid score by up to 4.5e-4, hence score_atol. A real fault is orders larger (one weight
# changed by 0.5 moves logits by up to 3.9). The defaults keep about 3x headroom.
# Masks: a probability is a sigmoid, so a logit error of 1.8e-3 moves it by at most 4.5e-4:
# mask_prob_atol 2e-3 keeps the same headroom; pixels that flip are those within that of the
# threshold after resampling, a sliver of the boundary (IoU >= 0.95 on masks of 64+ pixels).
# fp16/int8: not measurable here (no GPU): the usual orders of magnitude for these precisions
# (fp16 has a 1e-3 relative step; int8 calibration moves scores by a few hundredths).
TOLERANCE_PRESETS = {
    'fp32': Tolerances(atol=1e-2, rtol=1e-3, box_atol_px=2e-2, box_rtol=1e-4, score_atol=5e-4,
                       borderline=5e-4),
    'fp16': Tolerances(atol=5e-2, rtol=1e-2, box_atol_px=1.0, box_rtol=1e-2, score_atol=1e-2,
                       borderline=1e-2, mask_prob_atol=2e-2, mask_min_iou=0.9),
    'int8': Tolerances(atol=0.3, rtol=0.1, box_atol_px=4.0, box_rtol=5e-2, score_atol=5e-2,
                       borderline=5e-2, mask_prob_atol=0.1, mask_min_iou=0.8),
    # bf16 (OpenVINO's default on CPUs with AVX512_BF16/AMX): 8 significant bits, a 4e-3
    # relative step per operation, accumulated over the network. Measured with the bundled
    # rtmdet at 256 on 4 shapes images against ONNX Runtime fp32, three runs: matched boxes
    # within 0.23 px in one, 5.7 px (a 27 px box at the image edge) in another; a score near
    # the threshold moved by more than 0.03; raw box distances off by up to 2.33 (6.91 ->
    # 4.81). Hence looser boxes than int8's, raw 3.0 and 50 %.
    'bf16': Tolerances(atol=3.0, rtol=0.5, box_atol_px=8.0, box_rtol=0.1, score_atol=5e-2,
                       borderline=5e-2, mask_prob_atol=0.1, mask_min_iou=0.8),
}


def tolerances_for(precision: str | None) -> Tolerances:
    """The preset for a precision name (fp32, fp16, bf16, int8; a mix such as int8+fp16 or
    fp32+bf16 takes its coarsest part); fp32 if unknown."""
    name = (precision or 'fp32').lower()
    if 'int8' in name:
        return TOLERANCE_PRESETS['int8']
    if 'bf16' in name:
        return TOLERANCE_PRESETS['bf16']
    return TOLERANCE_PRESETS['fp16' if 'fp16' in name or 'half' in name else 'fp32']


# ---- arrays -------------------------------------------------------------------------------

@dataclass
class ArrayComparison:
    """One tensor (or an accumulation of several) compared element-wise."""
    name: str
    shape: list[int]
    max_abs_error: float
    max_rel_error: float
    worst_index: list[int]              # the failing element with the largest |a-b|, else the
    worst_got: float                    # element with the largest |a-b| overall
    worst_want: float
    failing: int
    total: int
    passed: bool

    @property
    def failing_share(self) -> float:
        return self.failing / self.total if self.total else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), 'failing_share': self.failing_share}


def compare_arrays(got: np.ndarray, want: np.ndarray, atol: float, rtol: float,
                   name: str = '') -> ArrayComparison:
    """`got` (the backend) against `want` (PyTorch) with Polygraphy's element-wise rule.

    NaN or inf where the other side differs counts as failing with infinite error; a shape
    mismatch fails every element.
    """
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        return ArrayComparison(name, list(want.shape), float('inf'), float('inf'), [], float('nan'),
                               float('nan'), max(got.size, want.size), max(got.size, want.size),
                               False)
    with np.errstate(invalid='ignore', divide='ignore'):
        abs_error = np.abs(got - want)
        same = (got == want) | (np.isnan(got) & np.isnan(want))
        abs_error = np.where(same, 0.0, np.nan_to_num(abs_error, nan=np.inf))
        rel_error = np.where(abs_error == 0, 0.0, abs_error / np.abs(want))
    failing_mask = (abs_error > atol) & (rel_error > rtol)
    failing = int(failing_mask.sum())
    if want.size == 0:
        return ArrayComparison(name, list(want.shape), 0.0, 0.0, [], 0.0, 0.0, 0, 0, True)
    ranked = np.where(failing_mask, abs_error, -1.0) if failing else abs_error
    flat = int(np.argmax(ranked))
    index = [int(i) for i in np.unravel_index(flat, want.shape)]
    return ArrayComparison(name, list(want.shape), float(abs_error.max()), float(rel_error.max()),
                           index, float(got.flat[flat]), float(want.flat[flat]), failing,
                           int(want.size), failing == 0)


def merge_comparisons(first: ArrayComparison | None, second: ArrayComparison,
                      image_index: int | None = None) -> ArrayComparison:
    """Accumulate comparisons of one tensor over images; `image_index` is put in front of the
    second's worst index (which then reads image, channel, y, x)."""
    if image_index is not None:
        second = dataclasses.replace(second, worst_index=[image_index, *second.worst_index])
    if first is None:
        return second
    take_second = (second.failing and not first.failing) or (
        bool(second.failing) == bool(first.failing) and second.max_abs_error > first.max_abs_error)
    worst = second if take_second else first
    return ArrayComparison(first.name, worst.shape, max(first.max_abs_error, second.max_abs_error),
                           max(first.max_rel_error, second.max_rel_error), worst.worst_index,
                           worst.worst_got, worst.worst_want, first.failing + second.failing,
                           first.total + second.total, first.passed and second.passed)


# ---- rows that come out of an NMS ---------------------------------------------------------

ROW_PAIRING_PX = 0.1
MAX_UNPAIRED_ROW_SHARE = 0.01
MIN_EXCUSED_UNPAIRED_ROWS = 2
TIE_IOU_SLACK = 1e-3
"""`pair_rows`: rows pair when every box coordinate agrees within `ROW_PAIRING_PX`. A side may
have up to `MAX_UNPAIRED_ROW_SHARE` of its rows (at least `MIN_EXCUSED_UNPAIRED_ROWS`) without a
partner, each explained by a tie of the NMS the rows come out of; more, or one unexplained,
fails the raw check. Measured with synthetic faster-rcnn-r50 at 128x160, ONNX Runtime vs
PyTorch: 0.4 % of the proposals unpaired on generated images, up to 0.5 % on flat shapes
images; a perturbed RPN weight unpairs most of them (and fails the RPN maps)."""


@dataclass
class RowPairing:
    """One image's rows of a `RawRowGroup` (`models.base`), paired by box between the backend
    and PyTorch. Rows of both sides count when their box has a positive extent (the rest is
    padding). An unpaired row is explained by a tie if its box overlaps a box of the other side
    by at least the NMS's IoU threshold (the two runtimes' NMS decided a near tie differently:
    one kept it, the other kept its neighbour, or a box that neighbour suppressed), or if it is
    among the last `budget` rows of its side while the other side reached the NMS's row cap (a
    tie at the cut pushed it below the other side's kept range)."""
    key: str
    image: str
    torch_rows: int
    backend_rows: int
    paired: int
    reordered: int            # paired rows at another position on the two sides
    unpaired_torch: int
    unpaired_backend: int
    unexplained: int
    budget: int
    torch_index: np.ndarray = field(repr=False)     # rows compared, in pairs (padding too)
    backend_index: np.ndarray = field(repr=False)

    @property
    def passed(self) -> bool:
        return not self.unexplained and max(self.unpaired_torch, self.unpaired_backend) <= \
            self.budget

    def to_dict(self) -> dict:
        return {'key': self.key, 'image': self.image, 'torch_rows': self.torch_rows,
                'backend_rows': self.backend_rows, 'paired': self.paired,
                'reordered': self.reordered,
                'unpaired_torch': self.unpaired_torch, 'unpaired_backend': self.unpaired_backend,
                'unexplained': self.unexplained, 'budget': self.budget, 'passed': self.passed}


def _box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes [N, 4] x [M, 4] in float64 (numpy: this room has no torch)."""
    a, b = np.asarray(boxes_a, np.float64), np.asarray(boxes_b, np.float64)
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).prod(-1)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.nan_to_num(inter / (area_a[:, None] + area_b[None, :] - inter))


def pair_rows(got_boxes: np.ndarray, want_boxes: np.ndarray, nms_iou: float, max_rows: int,
              key: str = '', image: str = '', pairing_px: float = ROW_PAIRING_PX,
              max_unpaired_share: float = MAX_UNPAIRED_ROW_SHARE) -> RowPairing:
    """Pair the backend's rows (`got_boxes` [N, 4] xyxy) with PyTorch's (`want_boxes`):
    one to one, closest first, boxes within `pairing_px` in every coordinate; padding rows
    (no positive extent) pair in order as far as both sides have them. See `RowPairing`."""
    got_boxes = np.nan_to_num(np.asarray(got_boxes, np.float64), nan=np.inf)
    want_boxes = np.asarray(want_boxes, np.float64)
    got_valid = np.flatnonzero((got_boxes[:, 2:] > got_boxes[:, :2]).all(1))
    want_valid = np.flatnonzero((want_boxes[:, 2:] > want_boxes[:, :2]).all(1))
    distance = np.abs(want_boxes[want_valid, None, :] - got_boxes[None, got_valid, :]).max(-1)
    close_want, close_got = np.nonzero(distance <= pairing_px)
    order = np.argsort(distance[close_want, close_got], kind='stable')
    want_taken = np.zeros(len(want_valid), bool)
    got_taken = np.zeros(len(got_valid), bool)
    pairs = []
    for i, j in zip(close_want[order], close_got[order]):
        if not want_taken[i] and not got_taken[j]:
            want_taken[i] = got_taken[j] = True
            pairs.append((int(want_valid[i]), int(got_valid[j])))
    pairs.sort()
    want_padding = np.setdiff1d(np.arange(len(want_boxes)), want_valid)
    got_padding = np.setdiff1d(np.arange(len(got_boxes)), got_valid)
    padding = min(len(want_padding), len(got_padding))
    torch_index = np.array([i for i, _ in pairs] + list(want_padding[:padding]), np.int64)
    backend_index = np.array([j for _, j in pairs] + list(got_padding[:padding]), np.int64)

    budget = max(MIN_EXCUSED_UNPAIRED_ROWS,
                 int(max_unpaired_share * max(len(want_valid), len(got_valid))))
    iou = _box_iou(want_boxes[want_valid], got_boxes[got_valid]) if len(want_valid) and \
        len(got_valid) else np.zeros((len(want_valid), len(got_valid)))
    at_tie = iou >= nms_iou - TIE_IOU_SLACK

    def explained(unpaired: np.ndarray, overlaps: np.ndarray, own: int, other: int) -> int:
        near_cut = (np.arange(own) >= own - budget) & (other >= max_rows)
        return int(np.count_nonzero(~(overlaps | near_cut)[unpaired]))

    want_unpaired, got_unpaired = np.flatnonzero(~want_taken), np.flatnonzero(~got_taken)
    unexplained = explained(want_unpaired, at_tie.any(1), len(want_valid), len(got_valid)) + \
        explained(got_unpaired, at_tie.any(0), len(got_valid), len(want_valid))
    return RowPairing(key, image, len(want_valid), len(got_valid), len(pairs),
                      sum(i != j for i, j in pairs), len(want_unpaired), len(got_unpaired), unexplained, budget, torch_index,
                      backend_index)


# ---- detections ---------------------------------------------------------------------------

MIN_EXCUSED_BORDERLINE = 2        # borderline detections per side always excused, however few


@dataclass
class DetectionSet:
    """One image's detections from one side, best first: boxes [K, 4] xyxy px (rotated models:
    [K, 5] cx, cy, w, h px and angle rad, matched by rotated IoU), scores, labels; instance
    models add the `masks` output's rows [K, h, w] and the masks they give in the original
    image [K, H, W] bool."""
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    mask_probabilities: np.ndarray | None = None
    masks: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)


@dataclass
class Unmatched:
    side: str                   # 'torch' or the backend's name
    label: int
    score: float
    box_xyxy_px: list[float]
    borderline: bool


@dataclass
class ImageMatch:
    """Detections of one image from PyTorch and the backend, matched."""
    source: str
    torch_count: int
    backend_count: int
    matched: int
    max_box_error_px: float
    max_score_error: float
    failed_pairs: int                   # matched, but box or score out of tolerance
    unmatched: list[Unmatched] = field(default_factory=list)
    too_many_borderline: bool = False   # borderline cases not excused (max_borderline_share)
    min_mask_iou: float | None = None           # instance models, over the matched pairs
    max_mask_prob_error: float | None = None
    failed_masks: int = 0                       # matched pairs whose masks are out of tolerance

    @property
    def status(self) -> str:
        if self.failed_pairs or self.failed_masks or any(not u.borderline
                                                          for u in self.unmatched):
            return 'FAIL'
        return 'borderline' if self.unmatched else 'ok'

    def to_dict(self) -> dict:
        return {**asdict(self), 'status': self.status}


def _iou_matrix(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """IoU of xyxy boxes [N, 4], or rotated IoU of (cx, cy, w, h, angle) boxes [N, 5]."""
    import torch
    from torchvision.ops import box_iou

    from detdeploy.models.rotated_nms import rotated_iou_matrix
    if not len(boxes_a) or not len(boxes_b):
        return np.zeros((len(boxes_a), len(boxes_b)))
    iou = rotated_iou_matrix if np.shape(boxes_a)[-1] == 5 else box_iou
    return iou(torch.as_tensor(boxes_a, dtype=torch.float64),
               torch.as_tensor(boxes_b, dtype=torch.float64)).numpy()


def compare_masks(got_probabilities: np.ndarray, want_probabilities: np.ndarray,
                  got_mask: np.ndarray, want_mask: np.ndarray, tol: Tolerances
                  ) -> tuple[float, float, bool]:
    """One matched pair's masks: (IoU at the original resolution, largest probability
    difference, passed) by `Tolerances`' mask rule. Two empty masks have an IoU of 1."""
    union = int(np.count_nonzero(got_mask | want_mask))
    iou = np.count_nonzero(got_mask & want_mask) / union if union else 1.0
    if np.shape(got_probabilities) != np.shape(want_probabilities):
        return float(iou), float('inf'), False
    difference = np.abs(np.asarray(got_probabilities, np.float64)
                        - np.asarray(want_probabilities, np.float64))
    difference = np.nan_to_num(difference, nan=np.inf)
    prob_error = float(difference.max()) if difference.size else 0.0
    off_share = float((difference > tol.mask_prob_atol).mean()) if difference.size else 0.0
    passed = off_share <= tol.mask_prob_max_share and (
        union < tol.mask_iou_min_pixels or iou >= tol.mask_min_iou)
    return float(iou), prob_error, passed


def match_detections(want: DetectionSet, got: DetectionSet, tol: Tolerances, score_thr: float,
                     max_det: int | None, source: str = '', backend_name: str = 'backend'
                     ) -> ImageMatch:
    """Greedy matching, highest PyTorch score first: each PyTorch detection takes the unmatched
    backend detection of its label with the highest IoU (at least `tol.match_iou`).

    Unmatched detections are borderline if their score is within `tol.borderline` of
    `score_thr`, or of the max-det cut (the lowest score of a side that returned `max_det`).
    A pair whose boxes disagree while both scores are borderline is two different detections
    at the cut (each one's true partner fell below it on the other side): both count as
    unmatched borderline detections, not as a failed pair.
    """
    iou = _iou_matrix(want.boxes, got.boxes)
    free = np.ones(len(got), dtype=bool)
    pairs = []
    for i in np.argsort(-np.asarray(want.scores, dtype=np.float64), kind='stable'):
        candidates = free & (got.labels == want.labels[i]) & (iou[i] >= tol.match_iou)
        if candidates.any():
            j = int(np.argmax(np.where(candidates, iou[i], -1.0)))
            free[j] = False
            pairs.append((int(i), j))
    full_sides = [s for s in (want, got) if max_det is not None and len(s) >= max_det and len(s)]
    cut = max((float(np.min(s.scores)) for s in full_sides), default=None)

    def is_borderline(score: float) -> bool:
        near_thr = score - score_thr <= tol.borderline
        near_cut = cut is not None and score - cut <= tol.borderline
        return bool(near_thr or near_cut)

    box_errors, score_errors, failed, kept_pairs = [0.0], [0.0], 0, []
    for i, j in pairs:
        box = compare_arrays(got.boxes[j], want.boxes[i], tol.box_atol_for(want.boxes.shape[-1]),
                             tol.box_rtol)
        score_error = abs(float(got.scores[j]) - float(want.scores[i]))
        if not box.passed and is_borderline(float(want.scores[i])) and \
                is_borderline(float(got.scores[j])):
            # two different detections at the cut, each of whose partner fell below it
            free[j] = True
            continue
        kept_pairs.append((i, j))
        box_errors.append(box.max_abs_error)
        score_errors.append(score_error)
        failed += int(not box.passed or score_error > tol.score_atol)
    matched_want = {i for i, _ in kept_pairs}
    mask_ious, mask_errors, failed_masks = [], [], 0
    if want.masks is not None and got.masks is not None:
        for i, j in kept_pairs:
            iou, prob_error, passed = compare_masks(
                got.mask_probabilities[j], want.mask_probabilities[i], got.masks[j],
                want.masks[i], tol)
            mask_ious.append(iou)
            mask_errors.append(prob_error)
            failed_masks += int(not passed)

    unmatched = [Unmatched('torch', int(want.labels[i]), float(want.scores[i]),
                           [float(v) for v in want.boxes[i]], is_borderline(float(want.scores[i])))
                 for i in range(len(want)) if i not in matched_want]
    unmatched += [Unmatched(backend_name, int(got.labels[j]), float(got.scores[j]),
                            [float(v) for v in got.boxes[j]], is_borderline(float(got.scores[j])))
                  for j in np.flatnonzero(free)]
    too_many = any(
        sum(u.borderline for u in unmatched if u.side == side) >
        max(MIN_EXCUSED_BORDERLINE, tol.max_borderline_share * count)
        for side, count in (('torch', len(want)), (backend_name, len(got))))
    if too_many:
        for entry in unmatched:
            entry.borderline = False
    with_masks = want.masks is not None and got.masks is not None
    return ImageMatch(source, len(want), len(got), len(kept_pairs), max(box_errors),
                      max(score_errors), failed, unmatched, too_many,
                      min(mask_ious, default=1.0) if with_masks else None,
                      max(mask_errors, default=0.0) if with_masks else None, failed_masks)
