"""Mask probabilities -> original-size masks (`core.masks`), against MMDetection's own code
reproduced here in torch: RTMDet-Ins's two `F.interpolate` calls on logits, and Mask R-CNN's
`_do_paste_mask` (`grid_sample`) with its CPU box-region crop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import rtmdet_ins_reference_images
from detdeploy.core.masks import paste_box_frame, paste_input_frame
from detdeploy.core.preprocessing import PreprocessConfig

# Disagreement allowed between our numpy resampling and torch's float32 one: pixels whose value
# lies within rounding of the threshold (and, frame input, logits beyond the probability clip).
MAX_DIFFERENT_FRACTION = 1e-4


def mmdet_rtmdet_ins_masks(logits: torch.Tensor, stride: int, ori_hw, scale_factor_wh,
                           threshold: float) -> np.ndarray:
    """`RTMDetInsHead._bbox_mask_post_process`'s mask lines (rescale=True), MMDetection 3.3.0."""
    scale_factor = [1 / s for s in scale_factor_wh]
    mask_logits = F.interpolate(logits.unsqueeze(0), scale_factor=stride, mode='bilinear')
    ori_h, ori_w = ori_hw
    mask_logits = F.interpolate(
        mask_logits, size=[math.ceil(mask_logits.shape[-2] * scale_factor[0]),
                           math.ceil(mask_logits.shape[-1] * scale_factor[1])],
        mode='bilinear', align_corners=False)[..., :ori_h, :ori_w]
    return (mask_logits.sigmoid().squeeze(0) > threshold).numpy()


def mmdet_paste_masks(probabilities: torch.Tensor, boxes: torch.Tensor, img_h: int, img_w: int,
                      threshold: float) -> np.ndarray:
    """`FCNMaskHead._predict_by_feat_single` on CPU (one detection per chunk, skip_empty) with
    `_do_paste_mask`, MMDetection 3.3.0."""
    result = torch.zeros(len(boxes), img_h, img_w, dtype=torch.bool)
    for index in range(len(boxes)):
        masks, box = probabilities[index:index + 1, None], boxes[index:index + 1]
        x0_int, y0_int = torch.clamp(box.min(dim=0).values.floor()[:2] - 1,
                                     min=0).to(dtype=torch.int32)
        x1_int = torch.clamp(box[:, 2].max().ceil() + 1, max=img_w).to(dtype=torch.int32)
        y1_int = torch.clamp(box[:, 3].max().ceil() + 1, max=img_h).to(dtype=torch.int32)
        x0, y0, x1, y1 = torch.split(box, 1, dim=1)
        img_y = torch.arange(y0_int, y1_int).to(torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int).to(torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        img_x[torch.isinf(img_x)] = 0
        img_y[torch.isinf(img_y)] = 0
        gx = img_x[:, None, :].expand(1, img_y.size(1), img_x.size(1))
        gy = img_y[:, :, None].expand(1, img_y.size(1), img_x.size(1))
        pasted = F.grid_sample(masks.float(), torch.stack([gx, gy], dim=3),
                               align_corners=False)[:, 0]
        result[index, y0_int:y1_int, x0_int:x1_int] = pasted[0] >= threshold
    return result.numpy()


def smooth_logits(rng, count: int, height: int, width: int, amplitude: float) -> np.ndarray:
    """Blob-like logit maps (sums of a few Gaussian bumps), some saturating past the clip."""
    ys, xs = np.mgrid[0:height, 0:width]
    maps = np.full((count, height, width), -amplitude / 2, dtype=np.float64)
    for index in range(count):
        for _ in range(3):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            sigma = rng.uniform(0.8, max(height, width) / 3)
            maps[index] += amplitude * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * sigma ** 2))
    return maps.astype(np.float32)


@pytest.mark.parametrize('original_hw,input_hw,stride,pad,amplitude,threshold', [
    ((37, 53), (64, 64), 8, 'fixed', 12.0, 0.5),
    # saturated probabilities (p == 1.0); MMDetection's masks come out a row short here
    ((200, 120), (96, 128), 4, 'fixed', 30.0, 0.5),
    ((200, 120), (96, 128), 4, 'fixed', 10.0, 0.3),
    ((75, 61), (64, 64), 8, 'divisor', 8.0, 0.5),
    ((64, 64), (64, 64), 8, 'fixed', 8.0, 0.5),
])
def test_input_frame_matches_rtmdet_ins(original_hw, input_hw, stride, pad, amplitude,
                                        threshold):
    rng = np.random.default_rng(sum(original_hw) + stride)
    config = PreprocessConfig(input_size=input_hw, pad=pad)
    resized = config.resized_size(original_hw)
    canvas = config.canvas_size(resized)
    scale_wh = (resized[1] / original_hw[1], resized[0] / original_hw[0])
    logits = smooth_logits(rng, 24, canvas[0] // stride, canvas[1] // stride, amplitude)
    probabilities = torch.from_numpy(logits).sigmoid().numpy()      # what the file holds
    ours = paste_input_frame(probabilities, stride, original_hw, scale_wh, threshold)
    expected = mmdet_rtmdet_ins_masks(torch.from_numpy(logits), stride, original_hw,
                                      scale_wh, threshold)
    assert ours.shape == (24, *original_hw) and ours.dtype == bool
    assert expected.any() and (~expected).any()
    # where MMDetection's masks fall short of the image, ours are background
    assert not ours[:, expected.shape[1]:].any() and not ours[:, :, expected.shape[2]:].any()
    different = np.count_nonzero(ours[:, :expected.shape[1], :expected.shape[2]] != expected)
    assert different / expected.size <= MAX_DIFFERENT_FRACTION, different


def test_input_frame_other_threshold_and_empty():
    rng = np.random.default_rng(3)
    logits = smooth_logits(rng, 8, 8, 8, 10.0)
    probabilities = torch.from_numpy(logits).sigmoid().numpy()
    for threshold in (0.3, 0.8):
        ours = paste_input_frame(probabilities, 8, (50, 64), (1.0, 1.0), threshold)
        expected = mmdet_rtmdet_ins_masks(torch.from_numpy(logits), 8, (50, 64),
                                          (1.0, 1.0), threshold)
        assert np.count_nonzero(ours != expected) / expected.size <= MAX_DIFFERENT_FRACTION
    assert paste_input_frame(np.zeros((0, 8, 8), np.float32), 8, (50, 64), (1, 1),
                             0.5).shape == (0, 50, 64)


def random_boxes(rng, count: int, height: int, width: int) -> np.ndarray:
    x0, y0 = rng.uniform(-5, width - 2, count), rng.uniform(-5, height - 2, count)
    w, h = rng.uniform(0.3, width * 0.8, count), rng.uniform(0.3, height * 0.8, count)
    boxes = np.stack([x0, y0, x0 + w, y0 + h], 1)
    boxes[:3] = [[0, 0, width, height], [10.5, 3.5, 20.5, 30.5], [2, 2, 2.6, 40]]  # edges, tiny
    # clamped to the image as the pipeline's boxes are; a box left empty is pushed in
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height - 1)
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.25)
    return boxes.astype(np.float32)


@pytest.mark.parametrize('image_hw,threshold', [((90, 130), 0.5), ((61, 47), 0.5),
                                                ((80, 80), 0.3)])
def test_box_frame_matches_mask_rcnn_paste(image_hw, threshold):
    rng = np.random.default_rng(image_hw[0])
    probabilities = torch.from_numpy(smooth_logits(rng, 40, 28, 28, 12.0)).sigmoid()
    boxes = random_boxes(rng, 40, *image_hw)
    ours = paste_box_frame(probabilities.numpy(), boxes, image_hw, threshold)
    expected = mmdet_paste_masks(probabilities, torch.from_numpy(boxes), *image_hw, threshold)
    assert ours.shape == (40, *image_hw) and expected.any()
    different = np.count_nonzero(ours != expected)
    assert different / expected.size <= MAX_DIFFERENT_FRACTION, different


def test_box_frame_chunks_agree_with_one_chunk(monkeypatch):
    """Splitting into many small chunks (a tiny budget) changes nothing."""
    import detdeploy.core.masks as masks_module
    rng = np.random.default_rng(7)
    probabilities = torch.from_numpy(smooth_logits(rng, 30, 28, 28, 12.0)).sigmoid().numpy()
    boxes = random_boxes(rng, 30, 70, 90)
    whole = paste_box_frame(probabilities, boxes, (70, 90), 0.5)
    monkeypatch.setattr(masks_module, 'CHUNK_BYTES', 1)
    assert np.array_equal(paste_box_frame(probabilities, boxes, (70, 90), 0.5), whole)


def test_input_frame_reproduces_mmdetections_stored_rtmdet_ins_masks():
    """MMDetection 3.3.0's own original-size masks (tools/make_mmdet_reference_rtmdet_ins.py:
    RTMDet-Ins tiny, synthetic weights, 128x160 input from 100x125 and 150x90 images) from its
    stride-8 probabilities: every pixel equal."""
    for probabilities, expected, original_hw, scale_wh in rtmdet_ins_reference_images():
        ours = paste_input_frame(probabilities, 8, original_hw, scale_wh, 0.5)
        assert expected.any() and np.array_equal(ours, expected)
