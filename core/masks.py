"""How an instance model's `masks` output is framed, as data: the contract between the model
families (which fill it in), the exporter (which stores it in the metadata) and the host code
that turns mask probabilities into per-detection masks at the original image size.

Two frames:
- `input`: each detection's mask covers the whole padded network input at `stride` input
  pixels per mask pixel (RTMDet-Ins: its prototype's stride, 8); masks are [B, K, H/stride,
  W/stride] probabilities.
- `box`: each detection's mask covers its own box, `size` x `size` probabilities (Mask R-CNN:
  28 x 28 of the detection's class), pasted into the image on the host.
A pixel belongs to a detection when its probability, resampled to the original image, passes
`threshold` (MMDetection's `mask_thr_binary`, 0.5) as MMDetection compares it: frame 'input'
strictly above (RTMDet-Ins: `sigmoid(logit) > thr`), frame 'box' at or above (FCNMaskHead:
`pasted >= thr`). `paste_masks` below does the resampling, with numpy only.
"""
from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

MASK_FRAMES = ('input', 'box')


@dataclass(frozen=True)
class MaskConfig:
    frame: str                  # 'input' or 'box'
    stride: int | None = None   # frame 'input': input pixels per mask pixel
    size: int | None = None     # frame 'box': mask side (28)
    threshold: float = 0.5      # binary threshold on the resampled probability

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_dict(cls, values: dict) -> 'MaskConfig':
        if not isinstance(values, dict):
            raise TypeError(f'must be a JSON object, got {type(values).__name__}')
        stride, size = values.get('stride'), values.get('size')
        return cls(frame=str(values['frame']), stride=None if stride is None else int(stride),
                   size=None if size is None else int(size),
                   threshold=float(values.get('threshold', 0.5)))

    def problem(self) -> str | None:
        """What makes these values unusable, or None."""
        if self.frame not in MASK_FRAMES:
            return f"frame '{self.frame}' is not one of {', '.join(MASK_FRAMES)}"
        if self.frame == 'input' and not (self.stride and self.stride >= 1):
            return 'frame input needs a stride of at least 1'
        if self.frame == 'box' and not (self.size and self.size >= 1):
            return 'frame box needs a size of at least 1'
        if not (math.isfinite(self.threshold) and 0 <= self.threshold < 1):
            return f'threshold must be a number in [0, 1), got {self.threshold}'
        return None

    def describe(self) -> str:
        if self.frame == 'input':
            return (f'masks cover the padded input at stride {self.stride}; foreground: '
                    f'probability > {self.threshold:g} after resampling to the image')
        return (f'{self.size}x{self.size} masks cover each detection box; foreground: '
                f'probability > {self.threshold:g} after pasting into the image')


# --- From a model's mask output to masks in the original image (numpy only) -----------------
#
# Both frames resample separably: a bilinear resampling along one axis is a matrix whose rows
# hold at most two (chained: four) taps, so a mask's resampled values are
# `rows_matrix @ mask @ cols_matrix.T`. Only where a detection can be foreground is computed.
# Frame 'box': its box (as MMDetection does on CPU); detections are sorted by box size and
# resampled in chunks padded to the chunk's largest box. Frame 'input': the image is cut into
# tiles, each reading a few source pixels; bilinear weights are non-negative and sum to 1, so
# a tile whose source block is all above (below) the threshold is all foreground
# (background), and only tiles along a mask's contour are resampled.

import numpy as np  # noqa: E402  (kept below the contract above, which needs no numpy)

PROBABILITY_CLIP = 1e-7     # probabilities are clipped into [c, 1 - c] before their logit
CHUNK_BYTES = 64 * 2 ** 20  # float32 working set of one chunk of regions
TILE = 32                   # frame input: output tile side, pixels


def _axis_weights(source_positions: np.ndarray, source_len: int, zero_padding: bool
                  ) -> np.ndarray:
    """[n, source_len] bilinear weights of sampling positions (in source pixel units, pixel
    centres at integers). `zero_padding`: taps outside the source contribute nothing
    (`grid_sample`'s padding 'zeros'); otherwise PyTorch's `interpolate`: a position below 0
    is clamped to 0 and the upper tap is clamped to the last pixel."""
    positions = np.asarray(source_positions, dtype=np.float64)
    if not zero_padding:
        positions = np.maximum(positions, 0.0)
    lower = np.floor(positions).astype(np.int64)
    upper_weight = positions - lower
    weights = np.zeros((len(positions), source_len), dtype=np.float64)
    rows = np.arange(len(positions))
    # each of the two passes hits a position at most once, so `+=` needs no `np.add.at`;
    # clamped taps may coincide across the passes, whose weights then add up
    for taps, tap_weight in ((lower, 1.0 - upper_weight), (lower + 1, upper_weight)):
        if zero_padding:
            inside = (taps >= 0) & (taps < source_len)
            weights[rows[inside], taps[inside]] += tap_weight[inside]
        else:
            weights[rows, np.clip(taps, 0, source_len - 1)] += tap_weight
    return weights


def _interpolate_weights(source_len: int, target_len: int, scale: float | None = None
                         ) -> np.ndarray:
    """[target_len, source_len]: PyTorch's `F.interpolate(mode='bilinear',
    align_corners=False)` along one axis; `scale` is the source step per target pixel
    (default source_len / target_len, as when a size is given)."""
    step = source_len / target_len if scale is None else scale
    return _axis_weights((np.arange(target_len) + 0.5) * step - 0.5, source_len, False)


@functools.lru_cache(maxsize=64)
def input_frame_weights(mask_len: int, stride: int, original_len: int, inverse_scale: float
                        ) -> np.ndarray:
    """[original_len, mask_len]: RTMDet-Ins's resampling of one axis of a mask logit map
    (`RTMDetInsHead._bbox_mask_post_process` with rescale): upsampled by `stride` to the
    padded input, that resized to ceil(padded * inverse_scale) (both bilinear,
    align_corners False), cropped to the original image. Rows past the resized map (when the
    ceil falls short of the original size) are all zero."""
    padded_len = mask_len * stride
    upsample = _interpolate_weights(mask_len, padded_len, 1.0 / stride)
    rescaled_len = math.ceil(padded_len * inverse_scale)
    rescale = _interpolate_weights(padded_len, rescaled_len)
    combined = (rescale @ upsample)[:original_len]
    if len(combined) < original_len:
        combined = np.concatenate([combined, np.zeros((original_len - len(combined), mask_len))])
    combined.flags.writeable = False      # cached: shared by every call with these sizes
    return combined


def box_frame_weights(box_start: np.ndarray, box_end: np.ndarray, mask_size: int,
                      pixels: np.ndarray) -> np.ndarray:
    """[K, n, mask_size]: Mask R-CNN's paste along one axis (`_do_paste_mask`: `grid_sample`
    of each mask over its box, align_corners False, zeros outside) at image pixels [K, n]:
    pixel centre p + 0.5 samples mask position (p + 0.5 - start) / (end - start) * size - 0.5
    (a box of zero length samples the mask's centre, as MMDetection's inf -> 0)."""
    start = np.asarray(box_start, dtype=np.float64)[:, None]
    length = np.asarray(box_end, dtype=np.float64)[:, None] - start
    centres = np.asarray(pixels, dtype=np.float64) + 0.5
    relative = np.divide(centres - start, length, out=np.full(centres.shape, 0.5),
                         where=length != 0)
    positions = relative * mask_size - 0.5
    return _axis_weights(positions.ravel(), mask_size, True).reshape(*centres.shape, mask_size)


def _support_ranges(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per target pixel (row of `weights`), the first and last source index it reads
    (first > last when it reads none)."""
    nonzero = weights != 0
    any_tap = nonzero.any(1)
    first = np.where(any_tap, nonzero.argmax(1), weights.shape[1])
    last = np.where(any_tap, weights.shape[1] - 1 - nonzero[:, ::-1].argmax(1), -1)
    return first, last


def _resample_regions(values: np.ndarray, row_weights, col_weights, row_ranges, col_ranges,
                      image_hw: tuple[int, int], cutoff: float, inclusive: bool) -> np.ndarray:
    """[K, H, W] bool: `row_weights(k_indices, rows)` @ values[k] @ `col_weights(...)`.T
    compared with `cutoff` (>= if `inclusive`), computed inside each detection's
    [row_ranges) x [col_ranges) only; the rest is False."""
    from .memory import check_memory
    count = len(values)
    height, width = image_hw
    check_memory(count * height * width, f'{count} masks of {height}x{width} pixels')
    masks = np.zeros((count, height, width), dtype=bool)
    row_start, row_stop = row_ranges
    col_start, col_stop = col_ranges
    heights, widths = row_stop - row_start, col_stop - col_start
    order = [k for k in np.argsort(heights * widths, kind='stable') if heights[k] and widths[k]]
    position = 0
    while position < len(order):
        # grow the chunk while its padded float32 working set stays under the budget
        end = position + 1
        tall, wide = int(heights[order[position]]), int(widths[order[position]])
        while end < len(order):
            tall = max(tall, int(heights[order[end]]))
            wide = max(wide, int(widths[order[end]]))
            if (end + 1 - position) * tall * wide * 4 * 3 > CHUNK_BYTES:
                break
            end += 1
        chunk = np.asarray(order[position:end])
        position = end
        tall, wide = int(heights[chunk].max()), int(widths[chunk].max())
        # padded regions start early enough to stay inside the image; the pixels they add
        # are computed as truly as the rest, then masked to each detection's own range
        top = np.minimum(row_start[chunk], height - tall)
        left = np.minimum(col_start[chunk], width - wide)
        rows = top[:, None] + np.arange(tall)[None, :]
        cols = left[:, None] + np.arange(wide)[None, :]
        row_matrix, col_matrix = row_weights(chunk, rows), col_weights(chunk, cols)
        source = values[chunk]
        source_h, source_w = source.shape[1:]
        # the cheaper association of row_matrix @ source @ col_matrix.T
        if tall * source_w * (source_h + wide) <= wide * source_h * (source_w + tall):
            resampled = (row_matrix @ source) @ col_matrix.transpose(0, 2, 1)
        else:
            resampled = row_matrix @ (source @ col_matrix.transpose(0, 2, 1))
        inside = resampled >= cutoff if inclusive else resampled > cutoff
        # each detection's own range, copied by slices (fancy-index scatter is 40x slower)
        for offset, k in enumerate(chunk):
            r0, r1, c0, c1 = row_start[k], row_stop[k], col_start[k], col_stop[k]
            masks[k, r0:r1, c0:c1] = inside[offset, r0 - top[offset]:r1 - top[offset],
                                            c0 - left[offset]:c1 - left[offset]]
    return masks


def paste_input_frame(probabilities: np.ndarray, stride: int, original_hw: tuple[int, int],
                      scale_wh: tuple[float, float], threshold: float) -> np.ndarray:
    """[K, h, w] mask probabilities over the padded network input (frame 'input') -> [K, H, W]
    bool masks of the original image, as RTMDet-Ins in MMDetection: the logits (recovered from
    the probabilities, clipped) upsampled by `stride`, resized by 1 / scale, cropped to the
    original size, then sigmoid > threshold. `scale_wh` is MMDetection's scale_factor
    (resized / original, per axis); MMDetection resizes the height by the inverse of the
    *width* scale and vice versa, and so does this."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    count, mask_h, mask_w = probabilities.shape
    height, width = original_hw
    if count == 0:
        return np.zeros((0, height, width), dtype=bool)
    clipped = np.clip(probabilities, np.float32(PROBABILITY_CLIP),
                      np.float32(1 - PROBABILITY_CLIP))
    logits = np.log(clipped)
    logits -= np.log1p(-clipped)
    cutoff = math.log(threshold / (1 - threshold)) if threshold > 0 else -math.inf
    rows_matrix = input_frame_weights(mask_h, stride, height, 1 / scale_wh[0])
    cols_matrix = input_frame_weights(mask_w, stride, width, 1 / scale_wh[1])
    return _resample_tiles(logits, probabilities > threshold, rows_matrix, cols_matrix,
                           original_hw, cutoff)


def _tile_sources(weights: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                            int]:
    """Per output tile of `tile` pixels along one axis: the first source index it reads,
    the number it reads, whether it has pixels reading none (beyond MMDetection's crop), and
    the largest number read by a tile."""
    first, last = _support_ranges(weights)
    tiles = -(-len(weights) // tile)
    lows, counts, tapless = (np.zeros(tiles, np.int64), np.zeros(tiles, np.int64),
                             np.zeros(tiles, bool))
    for index in range(tiles):
        part = slice(index * tile, (index + 1) * tile)
        reads = first[part] <= last[part]
        tapless[index] = not reads.all()
        if reads.any():
            lows[index] = first[part][reads].min()
            counts[index] = last[part][reads].max() - lows[index] + 1
    return lows, counts, tapless, max(int(counts.max()), 1)


def _resample_tiles(logits: np.ndarray, above: np.ndarray, rows_matrix: np.ndarray,
                    cols_matrix: np.ndarray, image_hw: tuple[int, int], cutoff: float
                    ) -> np.ndarray:
    """[K, H, W] bool: rows_matrix @ logits[k] @ cols_matrix.T > cutoff, by output tiles of
    TILE x TILE pixels, each reading a small block of the source: a tile whose block holds no
    source pixel above the threshold is background, one whose block is all above is
    foreground (bilinear weights are non-negative and sum to 1), and only the others, along
    the masks' contours, are computed."""
    from .memory import check_memory
    count, mask_h, mask_w = logits.shape
    height, width = image_hw
    row_low, row_count, row_tapless, block_h = _tile_sources(rows_matrix, TILE)
    col_low, col_count, col_tapless, block_w = _tile_sources(cols_matrix, TILE)
    tiles_y, tiles_x = len(row_low), len(col_low)
    check_memory(2 * count * tiles_y * tiles_x * TILE * TILE,
                 f'{count} masks of {height}x{width} pixels')
    # weights per tile over its block; rows past the image and block columns past the
    # source are zero (the source is padded to match)
    row_blocks = np.zeros((tiles_y, TILE, block_h), np.float32)
    for index in range(tiles_y):
        part = rows_matrix[index * TILE:(index + 1) * TILE,
                           row_low[index]:row_low[index] + block_h]
        row_blocks[index, :part.shape[0], :part.shape[1]] = part
    col_blocks = np.zeros((tiles_x, TILE, block_w), np.float32)
    for index in range(tiles_x):
        part = cols_matrix[index * TILE:(index + 1) * TILE,
                           col_low[index]:col_low[index] + block_w]
        col_blocks[index, :part.shape[0], :part.shape[1]] = part
    # source pixels above the threshold per (detection, tile block), by a summed-area table
    table = np.zeros((count, mask_h + 1, mask_w + 1), np.int32)
    table[:, 1:, 1:] = above.cumsum(1, dtype=np.int32).cumsum(2, dtype=np.int32)
    top, bottom = row_low[:, None], (row_low + row_count)[:, None]
    left, right = col_low[None, :], (col_low + col_count)[None, :]
    above_in_block = (table[:, bottom, right] - table[:, top, right] - table[:, bottom, left]
                      + table[:, top, left])
    block_size = row_count[:, None] * col_count[None, :]
    full = (above_in_block == block_size) & ~row_tapless[:, None] & ~col_tapless[None, :]
    mixed = (above_in_block > 0) & ~full
    tiled = np.zeros((count, tiles_y, TILE, tiles_x, TILE), dtype=bool)
    full_k, full_y, full_x = np.nonzero(full)
    tiled[full_k, full_y, :, full_x, :] = True
    padded = np.zeros((count, mask_h + block_h, mask_w + block_w), np.float32)
    padded[:, :mask_h, :mask_w] = logits
    mixed_k, mixed_y, mixed_x = np.nonzero(mixed)
    per_chunk = max(1, CHUNK_BYTES // (4 * TILE * (2 * TILE + block_h + block_w)))
    for start in range(0, len(mixed_k), per_chunk):
        k = mixed_k[start:start + per_chunk]
        y, x = mixed_y[start:start + per_chunk], mixed_x[start:start + per_chunk]
        block_rows = row_low[y][:, None, None] + np.arange(block_h)[None, :, None]
        block_cols = col_low[x][:, None, None] + np.arange(block_w)[None, None, :]
        blocks = padded[k[:, None, None], block_rows, block_cols]
        resampled = (row_blocks[y] @ blocks) @ col_blocks[x].transpose(0, 2, 1)
        tiled[k, y, :, x, :] = resampled > cutoff
    masks = np.ascontiguousarray(
        tiled.reshape(count, tiles_y * TILE, tiles_x * TILE)[:, :height, :width])
    # pixels reading no source (past MMDetection's crop) are background at any threshold
    for weights, axis in ((rows_matrix, 1), (cols_matrix, 2)):
        first, last = _support_ranges(weights)
        if (first > last).any():
            index = [slice(None)] * 3
            index[axis] = first > last
            masks[tuple(index)] = False
    return masks


def paste_box_frame(probabilities: np.ndarray, boxes_xyxy_px: np.ndarray,
                    original_hw: tuple[int, int], threshold: float) -> np.ndarray:
    """[K, s, s] mask probabilities, each over its detection's box (frame 'box'), and [K, 4]
    boxes in original-image pixels -> [K, H, W] bool masks, as Mask R-CNN in MMDetection
    (`FCNMaskHead._predict_by_feat_single` on CPU): bilinear paste (`grid_sample`,
    align_corners False, zeros outside the mask) within the box's pixel range widened by one
    pixel, foreground where the pasted probability is >= threshold."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    boxes = np.asarray(boxes_xyxy_px, dtype=np.float64).reshape(-1, 4)
    count, size = len(probabilities), probabilities.shape[-1]
    height, width = original_hw
    if count == 0:
        return np.zeros((0, height, width), dtype=bool)
    x0, y0, x1, y1 = boxes.T
    # MMDetection's skip_empty region (one detection per chunk on CPU)
    col_start = np.clip(np.floor(x0) - 1, 0, width).astype(np.int64)
    col_stop = np.clip(np.ceil(x1) + 1, 0, width).astype(np.int64)
    row_start = np.clip(np.floor(y0) - 1, 0, height).astype(np.int64)
    row_stop = np.clip(np.ceil(y1) + 1, 0, height).astype(np.int64)

    def row_weights(chunk, rows):
        return box_frame_weights(y0[chunk], y1[chunk], size, rows).astype(np.float32)

    def col_weights(chunk, cols):
        return box_frame_weights(x0[chunk], x1[chunk], size, cols).astype(np.float32)

    return _resample_regions(probabilities, row_weights, col_weights,
                             (row_start, np.maximum(row_stop, row_start)),
                             (col_start, np.maximum(col_stop, col_start)),
                             original_hw, threshold, inclusive=True)


def paste_masks(probabilities: np.ndarray, config: MaskConfig, boxes_xyxy_px: np.ndarray,
                original_hw: tuple[int, int], scale_wh: tuple[float, float]) -> np.ndarray:
    """One image's `masks` output rows [K, h, w] -> [K, H, W] bool masks of the original
    image, as `config` frames them; `boxes_xyxy_px` are the detections' boxes in original
    pixels (frame 'box'), `scale_wh` the preprocessing's resized / original (frame 'input')."""
    if config.frame == 'input':
        return paste_input_frame(probabilities, config.stride, original_hw, scale_wh,
                                 config.threshold)
    return paste_box_frame(probabilities, boxes_xyxy_px, original_hw, config.threshold)


def encode_rle(masks: np.ndarray) -> list[dict]:
    """[K, H, W] bool masks -> COCO RLE per mask (`pycocotools.mask.encode`), `counts` as a
    str so the result is JSON: {'size': [H, W], 'counts': '...'}."""
    from pycocotools import mask as mask_utils
    masks = np.asarray(masks, dtype=bool)
    if not len(masks):
        return []
    encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [{'size': [int(side) for side in rle['size']], 'counts': rle['counts'].decode('ascii')}
            for rle in encoded]
