"""Mask R-CNN R50-FPN (`mask-rcnn-r50`): MMDetection's keys, agreement with numbers MMDetection
computed (tests/data/mmdet_mask_rcnn_r50_reference.json and _masks.npz, written by
tools/make_mmdet_reference_mask_rcnn.py): raw outputs, detections, each detection's 28x28 mask
probabilities and the masks pasted into the original image; the exported graph in ONNX Runtime
(dynamic batch and shape, masks equal to PyTorch's), and the `trt` mode's ONNX.

Small inputs, synthetic weights and at most 20 detections per image (the mask head costs about
1 GFLOP per detection); the network is exported once (`onnx` mode), the `trt` mode on the part
after the RoI head alone.
"""
from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (DATA_DIR, SPEC_DIR, assert_detections_agree, calibration_images,
                      randomize_detector)
from detdeploy.core.masks import MaskConfig
from detdeploy.export.exporter import ExportOptions, _dynamo_export, export_onnx
from detdeploy.models import get_spec, load_detector, save_checkpoint
from detdeploy.models.faster_rcnn import DEPLOY_NMS, EVAL_NMS, RawOutputs
from detdeploy.models.mask_rcnn import MaskRawOutputs
from detdeploy.runtimes.model_file import read_onnx_metadata

NAME = 'mask-rcnn-r50'
INPUT_HW = (128, 160)
"""The network input of the reference and the export (a 256x320 image at scale 0.5)."""
ORIGINAL_HW = (256, 320)
MAX_DETECTIONS = 20
REFERENCE_NMS = dataclasses.replace(EVAL_NMS, max_det=MAX_DETECTIONS)
"""MMDetection's test_cfg with max_per_img 20 (the reference script sets the same)."""
EXPORT_NMS = dataclasses.replace(DEPLOY_NMS, max_det=MAX_DETECTIONS)
EXPORT_PROPOSALS = 200
"""The exported graph's RPN proposals (MMDetection's test_cfg: 1000): the box head costs ~13 MFLOP
per proposal, so this is what ONNX Runtime and PyTorch spend most of the ORT test on."""
CALIBRATION_PROPOSALS = 100
CALIBRATION_NMS = dataclasses.replace(DEPLOY_NMS, max_det=10)
MIN_MASK_IOU = 0.99


CALIBRATION = DATA_DIR / 'mask_rcnn_r50_synthetic_calibration.npz'


def synthetic_model(num_classes: int | None = None, measure: bool = False,
                    record: dict | None = None):
    """`randomize_detector` weights as the reference script makes them: seed 0, calibrated with
    100 proposals and 10 detections per image (the heads on more would dominate the time).
    Unless `measure`, the calibration passes (over a minute of R50 forwards here) are replayed
    from what tools/make_mask_rcnn_synthetic_calibration.py stored, which gives the same
    weights (that tool checks it; the agreement tests below would fail otherwise)."""
    torch.manual_seed(0)
    model = get_spec(NAME).build(num_classes)
    model.num_proposals, model.forward_nms = CALIBRATION_PROPOSALS, CALIBRATION_NMS
    measured = None
    if not measure:
        with np.load(CALIBRATION) as stored:
            measured = {key: torch.from_numpy(stored[key]) for key in stored.files}
    randomize_detector(model, seed=0, measured=measured, record=record)
    model.num_proposals, model.forward_nms = 1000, DEPLOY_NMS
    return model


def reference_input() -> torch.Tensor:
    """A calibration image cropped to INPUT_HW (normalised)."""
    return calibration_images(seed=7, count=1, size=max(INPUT_HW))[
        :, :, :INPUT_HW[0], :INPUT_HW[1]].contiguous()


def paste_masks(probabilities: torch.Tensor, boxes: torch.Tensor, image_hw: tuple[int, int],
                threshold: float = 0.5) -> torch.Tensor:
    """MMDetection's `_do_paste_mask` as its CPU path runs it (one detection at a time, only
    the pixels around the box), then `>= threshold`: masks [K, 28, 28] of boxes [K, 4] xyxy
    image px -> [K, H, W] bool."""
    height, width = image_hw
    pasted = torch.zeros(len(boxes), height, width, dtype=torch.bool)
    for index, (mask, box) in enumerate(zip(probabilities, boxes)):
        x0_int, y0_int = (box[:2].floor() - 1).clamp(min=0).to(torch.int32).tolist()
        x1_int = int((box[2].ceil() + 1).clamp(max=width))
        y1_int = int((box[3].ceil() + 1).clamp(max=height))
        x0, y0, x1, y1 = box.tolist()
        img_y = torch.arange(y0_int, y1_int).to(torch.float32) + 0.5
        img_x = torch.arange(x0_int, x1_int).to(torch.float32) + 0.5
        img_y = (img_y - y0) / (y1 - y0) * 2 - 1
        img_x = (img_x - x0) / (x1 - x0) * 2 - 1
        grid = torch.stack([img_x[None, :].expand(len(img_y), -1),
                            img_y[:, None].expand(-1, len(img_x))], 2)
        sampled = F.grid_sample(mask[None, None].float(), grid[None], align_corners=False)
        pasted[index, y0_int:y1_int, x0_int:x1_int] = sampled[0, 0] >= threshold
    return pasted


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def spec_keys(file_name: str) -> dict[str, tuple]:
    rows = [line.rstrip('\n').split('\t') for line in (SPEC_DIR / file_name).open()
            if not line.startswith('#')]
    return {key: tuple(json.loads(shape.replace('(', '[').replace(',)', ']').replace(')', ']')))
            for key, shape, _ in rows}


def test_replayed_calibration_gives_the_measured_weights():
    """`randomize_detector(measured=...)` (what `synthetic_model` uses) equals measuring, shown
    on a small model of the same code path (rtmdet-tiny: BN statistics, predictor spreads)."""
    def build():
        torch.manual_seed(0)
        return get_spec('rtmdet-tiny').build(3)
    record = {}
    measured = randomize_detector(build(), seed=4, record=record).state_dict()
    replayed = randomize_detector(build(), seed=4, measured=record).state_dict()
    assert any(key.endswith('output_spread') for key in record)
    for key, value in measured.items():
        assert torch.equal(replayed[key], value), key


def test_state_dict_keys_and_shapes_are_mmdetections():
    model = get_spec(NAME).build()
    assert ({k: tuple(v.shape) for k, v in model.state_dict().items()}
            == spec_keys('keys_mask_rcnn_r50_fpn.txt'))
    assert model.task == 'instance'
    assert model.mask_config == MaskConfig('box', size=28, threshold=0.5)


# --- agreement with MMDetection 3.3.0 ---------------------------------------------------------

@pytest.fixture(scope='module')
def synthetic(one_torch_thread):
    return synthetic_model()


@pytest.fixture(scope='module')
def reference_run(synthetic):
    reference = json.loads((DATA_DIR / 'mmdet_mask_rcnn_r50_reference.json').read_text())
    arrays = np.load(DATA_DIR / 'mmdet_mask_rcnn_r50_masks.npz')
    with torch.no_grad():
        raw = synthetic.forward_for(reference_input(), REFERENCE_NMS, 'onnx')
        outputs = synthetic.postprocess(raw, INPUT_HW, REFERENCE_NMS, 'onnx')
    return reference, arrays, raw, outputs


def assert_summary_close(tensor: torch.Tensor, summary: dict, atol: float = 1e-4) -> None:
    assert list(tensor.shape) == summary['shape']
    flat = tensor.flatten()
    torch.testing.assert_close(flat[summary['index']], torch.tensor(summary['values']),
                               atol=atol, rtol=2e-5)
    assert flat.double().abs().sum().item() == pytest.approx(summary['abs_sum'], rel=1e-5)


def test_raw_outputs_within_1e4(reference_run):
    reference, _, raw, _ = reference_run
    box = raw.box
    for level in range(5):
        assert_summary_close(box.rpn_cls_scores[level], reference['rpn_cls_scores'][level])
        assert_summary_close(box.rpn_bbox_preds[level], reference['rpn_bbox_preds'][level])
    count = reference['num_proposals']
    assert_summary_close(box.proposals[0, :count], reference['proposals'])
    assert box.proposals[0, count:].abs().max() == 0 if count < 1000 else True
    assert_summary_close(box.cls_scores[0, :count], reference['cls_scores'])
    assert_summary_close(box.bbox_preds[0, :count], reference['bbox_preds'])
    detections = len(reference['det_scores'])
    assert_summary_close(raw.mask_logits[0, :detections], reference['mask_logits'])


def test_same_detections_and_mask_probabilities_as_mmdetection(reference_run):
    """Detections in MMDetection's order (the same NMS), boxes at the original scale (x2)."""
    reference, arrays, _, (num_dets, boxes, scores, labels, masks) = reference_run
    count = int(num_dets[0, 0])
    assert count == len(reference['det_scores']) == MAX_DETECTIONS
    assert labels[0, :count].tolist() == reference['det_labels']
    torch.testing.assert_close(scores[0, :count], torch.tensor(reference['det_scores']),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(boxes[0, :count] * 2, torch.tensor(reference['det_bboxes']),
                               atol=1e-2, rtol=0)
    want = torch.from_numpy(arrays['mask_probabilities'])
    torch.testing.assert_close(masks[0, :count], want, atol=1e-4, rtol=0)
    # non-trivial masks: each covers part of its 28x28 box, none all or nothing
    foreground = (want >= 0.5).float().mean((1, 2))
    assert 0.05 < foreground.min() and foreground.max() < 0.95


def test_pasted_masks_match_mmdetections_at_the_original_resolution(reference_run):
    reference, arrays, _, (num_dets, boxes, _, _, masks) = reference_run
    count = int(num_dets[0, 0])
    theirs = np.unpackbits(arrays['pasted_masks'], axis=-1)[..., :ORIGINAL_HW[1]]
    theirs = torch.from_numpy(theirs.astype(bool))
    assert theirs.shape == (count, *ORIGINAL_HW)
    ours = paste_masks(masks[0, :count], boxes[0, :count] * 2, ORIGINAL_HW)
    ious = [mask_iou(a, b) for a, b in zip(ours, theirs)]
    assert min(ious) >= MIN_MASK_IOU, ious
    assert all(m.sum() > 0 for m in theirs)


def test_saved_checkpoint_loaded_strictly_by_mmdetection_predicted_the_same():
    reference = json.loads((DATA_DIR / 'mmdet_mask_rcnn_r50_reference.json').read_text())
    assert reference['saved_checkpoint_loads_strictly_and_predicts_the_same'] is True


# --- NMS modes ------------------------------------------------------------------------------------

class MaskPostprocess(nn.Module):
    """The RoI head's raw outputs and the FPN levels -> one NMS mode's outputs (the part that
    differs by mode: the final NMS and the mask head on its detections)."""

    def __init__(self, model, nms, nms_mode):
        super().__init__()
        self.model, self.nms, self.nms_mode = model, nms, nms_mode

    def forward(self, p2, p3, p4, p5, proposals, cls_scores, bbox_preds):
        box = RawOutputs((), (), proposals, cls_scores, bbox_preds)
        raw = MaskRawOutputs(box, (p2, p3, p4, p5), None, '', (), torch.empty(0))
        return self.model.postprocess(raw, INPUT_HW, self.nms, self.nms_mode)


@pytest.fixture(scope='module')
def head_inputs(reference_run):
    """The reference image's RoI head outputs and FPN levels twice, the second copy with its
    proposals past 300 as padding rows (an image with fewer proposals) and its features
    halved: a batch of 2 whose images differ."""
    raw = reference_run[2]
    feats = tuple(torch.cat([f, f * 0.5]) for f in raw.feats[:4])
    proposals = raw.box.proposals.repeat(2, 1, 1)
    proposals[1, 300:] = 0
    return (*feats, proposals, raw.box.cls_scores.repeat(2, 1, 1),
            raw.box.bbox_preds.repeat(2, 1, 1))


def test_trt_mode_gives_the_onnx_modes_detections_and_masks(synthetic, head_inputs):
    with torch.no_grad():
        onnx_mode = MaskPostprocess(synthetic, EXPORT_NMS, 'onnx')(*head_inputs)
        trt_mode = MaskPostprocess(synthetic, EXPORT_NMS, 'trt')(*head_inputs)
    for a, b in zip(onnx_mode, trt_mode):
        assert torch.equal(a, b)
    assert onnx_mode[0].min() > 0 and onnx_mode[4].shape[-2:] == (28, 28)


def test_trt_mode_exports_and_checks(synthetic, head_inputs):
    graph = MaskPostprocess(synthetic, EXPORT_NMS, 'trt').eval()
    names = ['p2', 'p3', 'p4', 'p5', 'proposals', 'cls_scores', 'bbox_preds']
    batch = torch.export.Dim('batch', min=1, max=64)
    exported = _dynamo_export(graph, head_inputs, names,
                              ['num_dets', 'boxes', 'scores', 'labels', 'masks'],
                              {name: {0: batch} for name in names}, None)
    onnx.checker.check_model(exported, full_check=True)
    [plugin] = [node for node in exported.graph.node if node.op_type == 'EfficientNMS_TRT']
    assert plugin.domain == 'TRT'
    # the mask head reads the plugin's boxes and labels
    assert {'RoiAlign', 'ConvTranspose'} <= {node.op_type for node in exported.graph.node}


# --- the whole graph in ONNX Runtime --------------------------------------------------------------

@pytest.fixture(scope='module')
def exported(tmp_path_factory, synthetic):
    """mask-rcnn-r50 (synthetic weights) exported once, not simplified: --nms onnx, 200 RPN
    proposals, at most 20 detections, dynamic batch and shape, traced at 128x160."""
    folder = tmp_path_factory.mktemp('mask_rcnn')
    spec = get_spec(NAME)
    checkpoint = folder / 'mask.pth'
    small = dataclasses.replace(spec, preprocessing=spec.preprocessing.with_input_size(INPUT_HW))
    save_checkpoint(checkpoint, synthetic, small, spec.class_names)
    detector = load_detector(NAME, checkpoint)
    detector.model.num_proposals = EXPORT_PROPOSALS
    path = folder / 'mask.onnx'
    started = time.perf_counter()
    report = export_onnx(detector, path, ExportOptions(nms_mode='onnx', nms=EXPORT_NMS,
                                                       dynamic_batch=True, input_hw=INPUT_HW,
                                                       simplify=False))
    print(f'export took {time.perf_counter() - started:.0f} s')
    return synthetic, detector, path, report


def test_checkpoint_round_trip_is_strict(exported):
    """save_checkpoint -> load_detector (strict) gives the same weights and the mask config."""
    synthetic, detector, _, _ = exported
    assert detector.model.num_classes == 80
    for key, value in synthetic.state_dict().items():
        assert torch.equal(detector.model.state_dict()[key], value), key
    assert detector.metadata(DEPLOY_NMS).mask == synthetic.mask_config


def test_export_is_checked_and_states_its_masks(exported):
    _, _, path, report = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert not {node.op_type for node in model.graph.node} & {'Loop', 'If'}
    assert [name for name, _ in report.outputs] == ['num_dets', 'boxes', 'scores', 'labels',
                                                   'masks']
    assert report.outputs[-1][1][2:] == [28, 28]
    metadata = read_onnx_metadata(path)
    assert metadata.task == 'instance'
    assert metadata.mask == MaskConfig('box', size=28, threshold=0.5)
    assert {'mask_rois', 'mask_logits'} <= set(metadata.raw_outputs)


def test_onnx_runtime_matches_pytorch_masks_on_a_mixed_batch(exported):
    """Batch of 2 at 128x192 (not the traced size): a full image and a 96x128 one padded with
    0. ONNX Runtime equals PyTorch: the same detections (parity's fp32 tolerances), and the
    masks of each detection within 1e-4 of PyTorch's mask head on that detection's box (ONNX
    Runtime's boxes differ by ~1e-3 px, which moves the 28x28 probabilities by up to ~2e-4);
    each image equals its batch-1 run."""
    _, detector, path, _ = exported
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    batch = calibration_images(seed=5, count=2, size=192)[:, :, :128, :192].contiguous()
    batch[1, :, 96:, :] = 0
    batch[1, :, :, 128:] = 0
    model = detector.model
    with torch.no_grad():
        raw = model.forward_for(batch, EXPORT_NMS, 'onnx')
        want = model.postprocess(raw, (128, 192), EXPORT_NMS, 'onnx')
    got = session.run(None, {'images': batch.numpy()})
    single = session.run(None, {'images': batch[1:].numpy()})
    with torch.no_grad():
        at_ort_boxes = model.roi_head.mask_logits(
            raw.feats, torch.from_numpy(got[1]), torch.from_numpy(got[3])).sigmoid()
    for image in range(2):
        count = int(got[0][image, 0])
        assert count == int(want[0][image, 0]) > 0
        ours = tuple(torch.from_numpy(o[image, :count]) for o in got[1:4])
        assert_detections_agree(ours, tuple(w[image, :count] for w in want[1:4]),
                                score_thr=EXPORT_NMS.score_thr, box_atol=0.02, box_rtol=1e-4,
                                score_atol=5e-4, borderline=5e-4)
        np.testing.assert_allclose(got[4][image, :count], at_ort_boxes[image, :count].numpy(),
                                   atol=1e-4, rtol=0)
        for row in range(count):     # and PyTorch's own detection's mask, by label and box
            [match] = [j for j in range(count) if int(want[3][image, j]) == got[3][image, row]
                       and np.allclose(want[1][image, j].numpy(), got[1][image, row], atol=0.02)]
            np.testing.assert_allclose(got[4][image, row], want[4][image, match].numpy(),
                                       atol=5e-4, rtol=0)
        assert np.all(got[4][image, count:] == 0)
    count = int(single[0][0, 0])
    assert count == int(got[0][1, 0])
    np.testing.assert_allclose(single[4][0, :count], got[4][1, :count], atol=1e-5, rtol=0)


def test_parity_pairs_mask_rows_by_detection_box():
    """`paired_raw_outputs`: mask rows follow the final NMS, so they pair by `mask_rois` (near
    ties reorder, other NMS settings keep other detections); padding rows never pair."""
    model = get_spec(NAME).build(num_classes=2)
    rng = np.random.default_rng(0)
    boxes = np.concatenate([rng.uniform(0, 50, (5, 2)), rng.uniform(60, 120, (5, 2))], 1)
    boxes = boxes.astype(np.float32)
    logits = rng.normal(size=(5, 28, 28)).astype(np.float32)
    want = {'mask_rois': np.concatenate([boxes, np.zeros((3, 4), np.float32)]),
            'mask_logits': np.concatenate([logits, np.zeros((3, 28, 28), np.float32)])}
    order = [1, 0, 2, 3]        # a near tie swapped, the last detection cut by max_det
    got = {'mask_rois': np.concatenate([boxes[order] + 0.01, np.zeros((4, 4), np.float32)]),
           'mask_logits': np.concatenate([logits[order], np.ones((4, 28, 28), np.float32)])}
    got_rows, want_rows, note = model.paired_raw_outputs(got, want)
    assert 'mask rows compared for the 4 detections both sides kept (of 5)' in note
    np.testing.assert_array_equal(got_rows['mask_logits'], want_rows['mask_logits'])
    got['mask_logits'][0] += 1          # a different mask head: still paired, and differs
    got_rows, want_rows, _ = model.paired_raw_outputs(got, want)
    assert np.abs(got_rows['mask_logits'] - want_rows['mask_logits']).max() == pytest.approx(1)
