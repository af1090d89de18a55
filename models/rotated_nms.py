"""Rotated boxes in plain PyTorch: exact rotated IoU (convex polygon clipping) and per-class greedy
rotated NMS, written so that the dynamo exporter turns the same code into standard ONNX ops.

No custom op: one traceable implementation serves eager PyTorch and the graph (ONNX has no
rotated NMS; an onnxscript translation would be a second copy of the geometry). Boxes are
(cx, cy, w, h, angle) in pixels and radians, le90; corners follow mmcv's `box_iou_rotated`.
Not here: decoding a head's outputs into boxes (the family's job) and host-side drawing.
"""
from __future__ import annotations

import torch
from torch._higher_order_ops import while_loop

from detdeploy.core.nms import NMSConfig
from detdeploy.core.tasks import NMS_MODES

from .nms import DecodedOutputs, DetectionOutputs, _top_k_lower_index_first, select_candidates

POLYGON_SLOTS = 8
"""Vertices a clipped polygon can hold: two convex quadrilaterals meet in at most 8."""
MIN_BOX_AREA = 1e-14
"""Boxes with a smaller area have IoU 0 with everything, as in mmcv's kernel."""
SCREEN_MARGIN = 1e-3
"""Relative slack of the cheap upper-bound screen, so that it never drops a pair whose exact
float32 IoU would exceed the threshold."""
SWEEP_LIMIT = 1e6
"""The pair sweep clamps x to +-this (px) in its sort keys and gives each (image, label) group a
key span of 4 * SWEEP_LIMIT, all in float64."""


def rotated_box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 5] (cx, cy, w, h, angle) -> [..., 4, 2] corners, counter-clockwise in (x, y) for
    positive w and h, in mmcv's order."""
    cx, cy, width, height, angle = boxes.unbind(-1)
    cos_half, sin_half = angle.cos() * 0.5, angle.sin() * 0.5
    x0 = cx - sin_half * height - cos_half * width
    y0 = cy + cos_half * height - sin_half * width
    x1 = cx + sin_half * height - cos_half * width
    y1 = cy - cos_half * height - sin_half * width
    corners = [(x0, y0), (x1, y1), (2 * cx - x0, 2 * cy - y0), (2 * cx - x1, 2 * cy - y1)]
    return torch.stack([torch.stack(point, -1) for point in corners], -2)


def _following(values: torch.Tensor) -> torch.Tensor:
    """Each polygon slot's successor along dim 1, cyclically (`roll(-1, 1)`, which cannot be
    traced when the pair count is data-dependent)."""
    return torch.cat([values[:, 1:], values[:, :1]], 1)


def _preceding(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values[:, -1:], values[:, :-1]], 1)


def _clip_by_half_plane(polygon: torch.Tensor, start: torch.Tensor, direction: torch.Tensor
                        ) -> torch.Tensor:
    """One Sutherland-Hodgman step: [P, V, 2] convex polygons (repeated vertices allowed) clipped
    to the left of the lines through `start` [P, 2] along `direction` [P, 2].

    Each edge emits its start vertex if inside (and not a repeat of the previous one) and its
    crossing point if it strictly crosses the line; the emitted points are packed into V slots,
    the last one repeated. A polygon wholly outside becomes V copies of one point (area 0).
    """
    slots = polygon.shape[1]
    relative = polygon - start[:, None]
    side = direction[:, None, 0] * relative[..., 1] - direction[:, None, 1] * relative[..., 0]
    following, side_following = _following(polygon), _following(side)
    preceding = _preceding(polygon)
    repeated = (polygon[..., 0] == preceding[..., 0]) & (polygon[..., 1] == preceding[..., 1])
    emit_vertex = (side >= 0) & ~repeated
    crossing = ((side > 0) & (side_following < 0)) | ((side < 0) & (side_following > 0))
    fraction = side / torch.where(crossing, side - side_following, torch.ones_like(side))
    crossing_point = polygon + fraction[..., None] * (following - polygon)
    candidates = torch.stack([polygon, crossing_point], 2).reshape(-1, 2 * slots, 2)
    emitted = torch.stack([emit_vertex, crossing], 2).reshape(-1, 2 * slots).long()
    rank = emitted.cumsum(1)
    wanted = torch.minimum(torch.arange(slots, device=polygon.device)[None],
                           rank[:, -1:] - 1).clamp(min=0)
    # the candidate index of the (wanted + 1)-th emitted point (candidate 0 if none is): each
    # emitted candidate writes its index at its rank, the rest into a spare slot
    destination = torch.where((emitted > 0) & (rank <= slots), rank - 1, slots)
    emitted_index = torch.zeros_like(rank[:, :slots + 1]).scatter(
        1, destination, torch.arange(2 * slots, device=polygon.device).expand_as(destination))
    source = emitted_index.gather(1, wanted)
    return torch.stack([candidates[..., 0].gather(1, source),
                        candidates[..., 1].gather(1, source)], -1)


def _polygon_area(polygon: torch.Tensor) -> torch.Tensor:
    """Shoelace area of [P, V, 2] counter-clockwise polygons."""
    following = _following(polygon)
    cross = polygon[..., 0] * following[..., 1] - following[..., 0] * polygon[..., 1]
    return cross.sum(-1) * 0.5


def rotated_iou_pairs(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """IoU of [P, 5] boxes with [P, 5] boxes, pair by pair: box a clipped by the four edges of
    box b (exact convex polygon intersection). Coordinates are taken relative to the pair's
    mid-centre first, as mmcv does, to keep float32 precision."""
    shift = (boxes_a[:, :2] + boxes_b[:, :2]) * 0.5
    offset = torch.cat([shift, torch.zeros_like(boxes_a[:, 2:])], 1)
    corners_a = rotated_box_corners(boxes_a - offset)
    corners_b = rotated_box_corners(boxes_b - offset)
    polygon = torch.cat([corners_a] + [corners_a[:, 3:]] * (POLYGON_SLOTS - 4), 1)
    edges_b = _following(corners_b) - corners_b
    for edge in range(4):
        polygon = _clip_by_half_plane(polygon, corners_b[:, edge], edges_b[:, edge])
    area_a = boxes_a[:, 2] * boxes_a[:, 3]
    area_b = boxes_b[:, 2] * boxes_b[:, 3]
    # float32 corners of a thin box carry an error relative to w * h: never above either area
    intersection = torch.minimum(_polygon_area(polygon).clamp(min=0),
                                 torch.minimum(area_a, area_b))
    union = area_a + area_b - intersection
    has_area = (area_a >= MIN_BOX_AREA) & (area_b >= MIN_BOX_AREA) & (union > 0)
    return torch.where(has_area, intersection / torch.where(has_area, union,
                                                              torch.ones_like(union)),
                       torch.zeros_like(union))


def rotated_iou_matrix(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """[N, 5] x [M, 5] -> [N, M] rotated IoU (every pair; for evaluation and matching)."""
    count_a, count_b = boxes_a.shape[0], boxes_b.shape[0]
    pairs_a = boxes_a[:, None].expand(-1, count_b, -1).reshape(-1, 5)
    pairs_b = boxes_b[None].expand(count_a, -1, -1).reshape(-1, 5)
    return rotated_iou_pairs(pairs_a, pairs_b).reshape(count_a, count_b)


def _enclosing_half_extents(boxes: torch.Tensor) -> torch.Tensor:
    """[..., 5] -> [..., 2] half width and height of each box's axis-aligned enclosing box."""
    cos, sin = boxes[..., 4].cos().abs(), boxes[..., 4].sin().abs()
    width, height = boxes[..., 2], boxes[..., 3]
    return torch.stack([cos * width + sin * height, sin * width + cos * height], -1) * 0.5


def _ascending_order(values: torch.Tensor) -> torch.Tensor:
    """Indices that sort a 1-D tensor ascending, equal values in index order (a stable sort)."""
    return _top_k_lower_index_first(-values, values.shape[0])[1]


def _sweep_candidates(left: torch.Tensor, right: torch.Tensor, group: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """[M] x intervals and group ids -> (a, b) [T + 1] index pairs, a != b: every pair of one
    group whose intervals overlap (`left_b <= right_a` after sorting by left), plus one spare
    pair at the end (to be masked) that keeps the list non-empty. Cost O(M log M + T).

    Entries are sorted by the key (group, left) and each one's window holds the entries after it
    whose left is at most its right, found by one merged sort of all lefts and rights; the
    variable-length windows are laid end to end and each pair finds its row by a cumulative
    count (a scatter of row starts), so nothing of size M x M or M x window is ever built.
    """
    entries = left.shape[0]
    # One float64 key per group: the clamp and the rounding are monotone, so a pair that
    # overlaps keeps `key_left_b <= key_right_a` (a superset: the caller screens it exactly).
    base = group.to(torch.float64) * (4 * SWEEP_LIMIT)
    key_left = base + left.clamp(-SWEEP_LIMIT, SWEEP_LIMIT).to(torch.float64)
    key_right = base + right.clamp(-SWEEP_LIMIT, SWEEP_LIMIT).to(torch.float64)
    order = _ascending_order(key_left)
    # lefts before rights at equal keys, so a window includes a left equal to its right
    events = _ascending_order(torch.cat([key_left[order], key_right[order]]))
    lefts_so_far = (events < entries).long().cumsum(0)
    window_end = torch.zeros_like(lefts_so_far).scatter(0, events, lefts_so_far)[entries:]
    position = torch.arange(entries, device=left.device)
    window = (window_end - position - 1).clamp(min=0)
    starts = window.cumsum(0) - window
    total = window.sum().item()
    torch._check(total >= 0)
    row_starts_so_far = torch.zeros(total + 1, dtype=torch.long, device=left.device).index_add(
        0, starts, torch.ones_like(starts)).cumsum(0)
    row = row_starts_so_far - 1
    partner = (row + 1 + torch.arange(total + 1, device=left.device) - starts[row]).clamp(
        max=entries - 1)
    return order[row], order[partner]


def candidate_pairs(boxes: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                    iou_thr: float) -> torch.Tensor:
    """[B, N] boxes sorted best first -> [P, 3] (image, i, j), i < j: the pairs of valid boxes of
    one label whose IoU may exceed `iou_thr`, in no particular order.

    The screen bounds the intersection by that of the enclosing axis-aligned boxes (slightly
    enlarged) and by the smaller area; pairs it drops cannot reach the threshold. It is applied
    only to the pairs of one image and label whose enclosing boxes overlap along x, found by a
    sort and sweep (`_sweep_candidates`), not to all N x N pairs.
    """
    batch, count = boxes.shape[:2]
    half = _enclosing_half_extents(boxes) * (1 + SCREEN_MARGIN)
    left, right = boxes[..., 0] - half[..., 0], boxes[..., 0] + half[..., 0]
    # one spare entry (never in a window) keeps every list below non-empty
    def flat(values: torch.Tensor, spare: float | int = 0) -> torch.Tensor:
        values = values.reshape(batch * count, *values.shape[2:])
        return torch.cat([values, values.new_full((1, *values.shape[1:]), spare)])
    in_sweep = flat(valid & ~(left.isnan() | right.isnan()), False)
    flat_labels = flat(labels)
    label_offset = flat_labels - flat_labels.min()
    labels_per_image = label_offset.max() + 1
    image = flat(torch.arange(batch, device=boxes.device)[:, None].expand(batch, count))
    index = flat(torch.arange(count, device=boxes.device)[None].expand(batch, count))
    # left of everything else of its (last) group, right below its left: an empty window
    group = torch.where(in_sweep, image * labels_per_image + label_offset,
                        batch * labels_per_image)
    left = torch.where(in_sweep, flat(left), torch.full_like(flat(left), 1.5 * SWEEP_LIMIT))
    right = torch.where(in_sweep, flat(right), torch.full_like(flat(right), -1.5 * SWEEP_LIMIT))
    a, b = _sweep_candidates(left, right, group)
    is_pair = torch.arange(a.shape[0], device=boxes.device) < a.shape[0] - 1

    flat_boxes, flat_half = flat(boxes), flat(half)

    def overlap(axis: int) -> torch.Tensor:
        extent = flat_half[:, axis]
        centre = flat_boxes[:, axis]
        return (extent[a] + extent[b] - (centre[a] - centre[b]).abs()).clamp(min=0)
    area = flat_boxes[:, 2] * flat_boxes[:, 3]
    bound = torch.minimum(overlap(0) * overlap(1), torch.minimum(area[a], area[b]))
    union = area[a] + area[b] - bound
    may_suppress = (bound > union * (iou_thr * (1 - SCREEN_MARGIN))) & is_pair
    a, b = a[may_suppress], b[may_suppress]
    return torch.stack([image[a], torch.minimum(index[a], index[b]),
                        torch.maximum(index[a], index[b])], 1)


def greedy_keep(num_boxes: int, suppressor: torch.Tensor, suppressed: torch.Tensor
                ) -> torch.Tensor:
    """Greedy NMS on a suppression graph: box j is dropped when a kept box i < j overlaps it
    (edges `suppressor[e]` -> `suppressed[e]`, flat indices); returns keep [num_boxes] bool.

    Iterates keep <- not any(keep[i] for edges i -> j) from all-kept until nothing changes. The
    greedy answer is the only fixed point, and after t rounds every box whose chain of
    suppressors is shorter than t is final, so this is exactly greedy, in as many rounds as the
    longest suppression chain (a few on real detections). Exported as one ONNX `Loop`.
    """
    def not_done(keep, changed):
        return changed.clone()

    def round_(keep, changed):
        hits = torch.zeros(keep.shape[0], dtype=torch.float32, device=keep.device).index_add(
            0, suppressed, keep[suppressor].float())
        new_keep = hits == 0
        return new_keep, (new_keep != keep).any()

    # one spare box, never suppressed: ONNX Runtime reduces an empty tensor to an empty one, so
    # `changed` of zero boxes would never turn false
    state = (torch.ones(num_boxes + 1, dtype=torch.bool, device=suppressor.device),
             torch.ones((), dtype=torch.bool, device=suppressor.device))
    if torch.compiler.is_exporting():
        return while_loop(not_done, round_, state)[0][:num_boxes]
    while bool(state[1]):
        state = round_(*state)
    return state[0][:num_boxes]


def rotated_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                score_thr: float, iou_thr: float, max_det: int, class_agnostic: bool = False
                ) -> DetectionOutputs:
    """Candidates [B, M, 5], [B, M], [B, M] -> the four NMS outputs padded to `max_det`: per
    image, candidates scoring above `score_thr`, per-class greedy rotated NMS (a box is dropped
    when its float32 IoU with a kept, better box of its label exceeds `iou_thr`; with
    `class_agnostic`, of any label), the best `max_det`. Equal scores rank the lower candidate
    index first."""
    batch = boxes.shape[0]
    sorted_scores, order = _top_k_lower_index_first(scores, scores.shape[1])
    valid = sorted_scores > score_thr
    # Only candidates above the threshold take part: cut every image's list at the batch's
    # longest, so the pair screen is quadratic in the boxes that count, not in M.
    num_valid = valid.sum(1).max().item()
    torch._check(num_valid >= 0)
    torch._check(num_valid <= scores.shape[1])
    order, sorted_scores, valid = order[:, :num_valid], sorted_scores[:, :num_valid], \
        valid[:, :num_valid]
    # one zero row past the candidates: what the spare pair and padding rows point at
    sorted_boxes = torch.cat([boxes.gather(1, order[..., None].expand(batch, num_valid, 5)),
                              boxes.new_zeros(batch, 1, 5)], 1)
    sorted_labels = torch.cat([labels.gather(1, order), labels.new_zeros(batch, 1)], 1)

    # One extra pair (row 0 with itself, masked out) keeps the pair list non-empty: ONNX
    # Runtime's ReduceSum returns an empty input unreduced, which breaks the clipping's shapes.
    pair_labels = torch.zeros_like(sorted_labels) if class_agnostic else sorted_labels
    pairs = torch.cat([candidate_pairs(sorted_boxes[:, :-1], pair_labels[:, :-1], valid,
                                       iou_thr),
                       order.new_zeros(1, 3)])
    image, first, second = pairs.unbind(1)
    iou = rotated_iou_pairs(sorted_boxes[image, first], sorted_boxes[image, second])
    is_pair = torch.arange(pairs.shape[0], device=pairs.device) < pairs.shape[0] - 1
    overlapping = (iou > torch.tensor(iou_thr, dtype=torch.float32)) & is_pair
    flat_first = (image * num_valid + first)[overlapping]
    flat_second = (image * num_valid + second)[overlapping]
    keep = greedy_keep(batch * num_valid, flat_first, flat_second).reshape(batch, num_valid)

    kept_scores = torch.where(keep & valid, sorted_scores, torch.full_like(sorted_scores, -1.0))
    padded = torch.cat([kept_scores, kept_scores.new_full((batch, max_det), -1.0)], 1)
    top_scores, top_index = _top_k_lower_index_first(padded, max_det)
    is_detection = top_scores > -0.5
    rows = top_index.clamp(max=num_valid)
    out_boxes = sorted_boxes.gather(1, rows[..., None].expand(batch, max_det, 5))
    out_labels = sorted_labels.gather(1, rows)
    return DetectionOutputs(
        is_detection.sum(1, keepdim=True).to(torch.int32),
        torch.where(is_detection[..., None], out_boxes, torch.zeros_like(out_boxes)),
        torch.where(is_detection, top_scores, torch.zeros_like(top_scores)),
        torch.where(is_detection, out_labels, torch.full_like(out_labels, -1)).to(torch.int32))


def rotated_has_area(boxes: torch.Tensor) -> torch.Tensor:
    """Rotated boxes with positive width and height (MMRotate's `min_bbox_size=0` rule)."""
    return (boxes[..., 2] > 0) & (boxes[..., 3] > 0)


def rotated_dense_outputs(decoded: DecodedOutputs, nms: NMSConfig, nms_mode: str
                          ) -> tuple[torch.Tensor, ...]:
    """A dense rotated head's decoded outputs (boxes [B, N, 5]) -> the `rotated` task's outputs
    for `nms_mode` (`core.tasks`): `onnx` the four NMS outputs, `none` per-anchor boxes and
    scores. There is no `trt` mode: no TensorRT plugin does rotated NMS."""
    if nms_mode not in NMS_MODES or nms_mode == 'trt':
        raise ValueError("rotated models have NMS modes 'onnx' and 'none'")
    if nms_mode == 'none':
        return decoded.boxes, decoded.scores
    candidates = select_candidates(decoded, nms.score_thr, nms.pre_top_k, rotated_has_area)
    return tuple(rotated_nms(candidates.boxes, candidates.scores, candidates.labels,
                             nms.score_thr, nms.iou_thr, nms.max_det, nms.class_agnostic))
