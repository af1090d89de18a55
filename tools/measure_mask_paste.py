"""Paste cost and MMDetection agreement of `core.masks` (the figures in the README and the
issue-15 note): run by hand, `python tools/measure_mask_paste.py`; needs torch, not MMDetection
(its two mask code paths are reproduced in tests/test_mask_paste.py and imported from there).

Cost: best and median of 5 calls, one thread, for 100 detections: frame 'input' (RTMDet-Ins,
stride 8, 640x640 image and input) and frame 'box' (Mask R-CNN, 28x28, 1333x800 image), with
object-sized masks, large ones, and (frame input) every pixel foreground; each next to
MMDetection's own torch code on the same input, timed alternately (on a shared machine only
the ratio is meaningful).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
from test_mask_paste import (mmdet_paste_masks, mmdet_rtmdet_ins_masks,  # noqa: E402
                             random_boxes, smooth_logits)

from detdeploy.core.masks import paste_box_frame, paste_input_frame  # noqa: E402
from detdeploy.core.preprocessing import PreprocessConfig  # noqa: E402


def ellipses(rng, count: int, height: int, width: int, low: float, high: float) -> np.ndarray:
    """Probabilities of one elliptic object per mask, radii `low`..`high` of the side."""
    ys, xs = np.mgrid[0:height, 0:width]
    out = np.empty((count, height, width), np.float32)
    for index in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(low, high) * height, rng.uniform(low, high) * width
        logit = np.clip(8 * (1 - ((ys - cy) / ry) ** 2 - ((xs - cx) / rx) ** 2), -30, 30)
        out[index] = 1 / (1 + np.exp(-logit))
    return out


def cost_ms(call, reference, repeats: int = 5) -> str:
    """Ours and MMDetection's, alternately: medians and the median of per-pair ratios."""
    ours, theirs = [], []
    for _ in range(repeats):
        for call_now, times in ((call, ours), (reference, theirs)):
            started = time.perf_counter()
            call_now()
            times.append(1e3 * (time.perf_counter() - started))
    ratio = np.median(np.asarray(ours) / np.asarray(theirs))
    return (f'{np.median(ours):.1f} ms median (MMDetection torch: {np.median(theirs):.1f} ms; '
            f'ratio {ratio:.2f})')


def costs() -> None:
    rng = np.random.default_rng(0)
    for low, high, what in ((0.02, 0.15, 'objects'), (0.3, 0.6, 'large objects')):
        probabilities = ellipses(rng, 100, 80, 80, low, high)
        logits = torch.logit(torch.from_numpy(probabilities))
        print(f'input frame, 640x640, 100 dets, {what}:',
              cost_ms(lambda: paste_input_frame(probabilities, 8, (640, 640), (1.0, 1.0), 0.5),
                      lambda: mmdet_rtmdet_ins_masks(logits, 8, (640, 640), (1.0, 1.0), 0.5)))
    full = np.full((100, 80, 80), 0.9, np.float32)
    logits = torch.logit(torch.from_numpy(full))
    print('input frame, 640x640, 100 dets, every pixel foreground:',
          cost_ms(lambda: paste_input_frame(full, 8, (640, 640), (1.0, 1.0), 0.5),
                  lambda: mmdet_rtmdet_ins_masks(logits, 8, (640, 640), (1.0, 1.0), 0.5)))
    height, width = 800, 1333
    probabilities = ellipses(rng, 100, 28, 28, 0.3, 0.5)
    for low, high, what in ((0.02, 0.15, 'boxes 4-30% of the side'),
                            (0.3, 0.6, 'boxes 60-120% of the side')):
        cy, cx = rng.uniform(0, height, 100), rng.uniform(0, width, 100)
        ry, rx = rng.uniform(low, high, 100) * height / 2, rng.uniform(low, high, 100) * width / 2
        boxes = np.stack([cx - rx, cy - ry, cx + rx, cy + ry], 1).clip(
            0, [width, height, width, height]).astype(np.float32)
        print(f'box frame, 1333x800, 100 dets, {what}:',
              cost_ms(lambda: paste_box_frame(probabilities, boxes, (height, width), 0.5),
                      lambda: mmdet_paste_masks(torch.from_numpy(probabilities),
                                                torch.from_numpy(boxes), height, width, 0.5)))


def agreement() -> None:
    different = total = 0
    for original_hw, input_hw, stride, pad, amplitude in (
            ((37, 53), (64, 64), 8, 'fixed', 12.0), ((200, 120), (96, 128), 4, 'fixed', 30.0),
            ((75, 61), (64, 64), 8, 'divisor', 8.0), ((480, 640), (640, 640), 8, 'fixed', 10.0),
            ((427, 640), (640, 640), 8, 'fixed', 20.0)):
        rng = np.random.default_rng(sum(original_hw))
        config = PreprocessConfig(input_size=input_hw, pad=pad)
        resized = config.resized_size(original_hw)
        canvas = config.canvas_size(resized)
        scale_wh = (resized[1] / original_hw[1], resized[0] / original_hw[0])
        logits = smooth_logits(rng, 50, canvas[0] // stride, canvas[1] // stride, amplitude)
        ours = paste_input_frame(torch.from_numpy(logits).sigmoid().numpy(), stride, original_hw,
                                 scale_wh, 0.5)
        expected = mmdet_rtmdet_ins_masks(torch.from_numpy(logits), stride, original_hw,
                                          scale_wh, 0.5)
        if expected.shape != ours.shape:
            print(f'  {original_hw}: MMDetection returns {expected.shape[1:]} masks '
                  f'(its resize falls short), ours {ours.shape[1:]}; compared on its part')
        count = np.count_nonzero(ours[:, :expected.shape[1], :expected.shape[2]] != expected)
        different, total = different + count, total + expected.size
    print(f'input frame vs MMDetection: {different} of {total} pixels differ '
          f'({different / total:.1e})')
    different = total = 0
    for image_hw in ((90, 130), (61, 47), (480, 640), (800, 1333)):
        rng = np.random.default_rng(image_hw[0])
        probabilities = torch.from_numpy(smooth_logits(rng, 100, 28, 28, 12.0)).sigmoid()
        boxes = random_boxes(rng, 100, *image_hw)
        ours = paste_box_frame(probabilities.numpy(), boxes, image_hw, 0.5)
        expected = mmdet_paste_masks(probabilities, torch.from_numpy(boxes), *image_hw, 0.5)
        different += np.count_nonzero(ours != expected)
        total += expected.size
    print(f'box frame vs MMDetection: {different} of {total} pixels differ '
          f'({different / total:.1e})')


if __name__ == '__main__':
    torch.set_num_threads(1)
    agreement()
    costs()
