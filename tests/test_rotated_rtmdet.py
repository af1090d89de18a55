"""Rotated RTMDet: MMRotate's keys and shapes (strict loading), agreement with MMRotate's own
implementation on a stored reference (tools/make_mmrotate_reference.py), the exported file run
by ONNX Runtime against PyTorch on a mixed batch, the host side (rescaled rotated boxes, JSON
corners, drawing) and parity catching a perturbed weight."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import DATA_DIR, SPEC_DIR, calibration_images, make_image, randomize_detector
from detdeploy.core.detections import rotated_box_corners
from detdeploy.models import DetectionOutputs, build_model, load_detector
from detdeploy.models.rotated_nms import rotated_iou_matrix
from detdeploy.models.rotated_rtmdet import EVAL_NMS

SIZES = ('tiny', 's', 'm', 'l')


def spec_shapes(size: str) -> dict[str, tuple[int, ...]]:
    rows = [line.split('\t') for line in
            (SPEC_DIR / f'keys_rotated_rtmdet_{size}.txt').read_text().splitlines()
            if line and not line.startswith('#')]
    return {key: tuple(int(v) for v in shape.strip('()').split(',') if v.strip())
            for key, shape, _ in rows}


@pytest.mark.parametrize('size', SIZES)
def test_keys_and_shapes_match_mmrotate(size):
    model = build_model(f'rotated-rtmdet-{size}')
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == spec_shapes(size)
    model.load_state_dict(model.state_dict(), strict=True)
    assert model.num_classes == 15 and model.task == 'rotated'


@pytest.fixture(scope='module')
def reference_detector():
    """The weights the stored MMRotate reference was made with (see its 'about')."""
    torch.manual_seed(0)
    detector = load_detector('rotated-rtmdet-tiny')
    randomize_detector(detector.model, seed=0)
    return detector


def canonical_rows(boxes, scores, labels):
    order = np.lexsort((np.asarray(boxes)[:, 0], np.asarray(labels), -np.asarray(scores)))
    return np.asarray(boxes)[order], np.asarray(scores)[order], np.asarray(labels)[order]


def test_agrees_with_mmrotate(reference_detector, one_torch_thread):
    reference = json.loads((DATA_DIR / 'mmrotate_rotated_rtmdet_tiny_reference.json').read_text())
    side = reference['input_side']
    images = calibration_images(seed=7, count=1)[..., :side, :side]
    model = reference_detector.model
    with torch.no_grad():
        raw = model.named_raw_outputs(model(images))
        outputs = DetectionOutputs(*model.predict_outputs(images, EVAL_NMS))
    for level in reference['raw']:
        tensor = raw[level['name']]
        assert list(tensor.shape) == level['shape']
        values = tensor.flatten()[level['index']].double().numpy()
        # 1e-4, relative for the box distances of tens of pixels: float32 sums in another
        # order (another CPU) move a distance of 38.85 by 1.07e-4 (2.7e-6 relative)
        np.testing.assert_allclose(values, level['values'], rtol=1e-5, atol=1e-4)
        assert tensor.double().sum().item() == pytest.approx(level['sum'], rel=1e-5, abs=1e-2)

    count = int(outputs.num_dets[0, 0])
    got = canonical_rows(outputs.boxes[0, :count].numpy(), outputs.scores[0, :count].numpy(),
                         outputs.labels[0, :count].numpy())
    want = canonical_rows(np.array(reference['det_bboxes']), np.array(reference['det_scores']),
                          np.array(reference['det_labels']))
    assert count == len(want[1]) > 50
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    np.testing.assert_allclose(got[0], want[0], atol=1e-3, rtol=1e-5)


@pytest.fixture(scope='module')
def exported(tmp_path_factory, reference_detector):
    from detdeploy.export.exporter import ExportOptions, export_onnx
    path = tmp_path_factory.mktemp('rotated') / 'rotated_tiny.onnx'
    export_onnx(reference_detector, path, ExportOptions(
        nms_mode='onnx', nms=EVAL_NMS, dynamic_batch=True, input_hw=(128, 128)))
    return path


def test_export_runs_in_onnxruntime_equal_to_pytorch(exported, reference_detector):
    import onnx

    from conftest import reference_outputs
    from detdeploy.runtimes.open import open_model_file
    from detdeploy.runtimes.pipeline import prepare_batch

    model = onnx.load(str(exported))
    assert {node.domain for node in model.graph.node} <= {'', 'ai.onnx'}
    assert 'Loop' in {node.op_type for node in model.graph.node}
    backend = open_model_file(exported)
    assert backend.metadata.task == 'rotated'
    # a mixed batch: two different scenes and a blank one (no detections)
    images = [make_image(128, 128, 11), make_image(96, 128, 12), np.full((128, 128, 3), 114,
                                                                         np.uint8)]
    batch, _ = prepare_batch(images, backend.preprocess_config)
    got = backend.run(batch)
    want = reference_outputs(reference_detector, batch, 'onnx', EVAL_NMS)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[0][0, 0] > 10
    for index in range(len(images)):
        count = int(want[0][index, 0])
        np.testing.assert_array_equal(got[3][index, :count], want[3][index, :count])
        np.testing.assert_allclose(got[2][index, :count], want[2][index, :count], atol=5e-5)
        np.testing.assert_allclose(got[1][index, :count], want[1][index, :count], atol=2e-3,
                                   rtol=1e-5)


def test_detections_json_and_drawing(exported):
    from detdeploy.inference.draw import draw_detections
    from detdeploy.runtimes.open import open_model_file
    from detdeploy.runtimes.pipeline import detect, prepare_batch

    backend = open_model_file(exported)
    image = make_image(256, 200, 13)           # resized by 0.5 into the 128x128 input
    (detections, kept), = list(detect(backend, [image], keep_images=True))
    assert len(detections) and detections.rotated_boxes.shape == (len(detections), 5)
    row = detections.to_dict()['detections'][0]
    corners = rotated_box_corners(np.array(row['rotated_box']))[0]
    np.testing.assert_allclose(row['corners'], corners, atol=2e-3)
    box = detections.boxes_xyxy_px[0]
    np.testing.assert_allclose(box, [*corners.min(0), *corners.max(0)], atol=2e-3)
    # boxes are in original pixels: twice the network's
    # arrays given to `detect` are BGR (as OpenCV reads), `prepare_batch` takes RGB
    network_outputs = backend.run(prepare_batch([image[..., ::-1]], backend.preprocess_config)[0])
    np.testing.assert_allclose(detections.rotated_boxes[0, :4], network_outputs[1][0, 0, :4] * 2,
                               rtol=1e-5)
    drawn = np.asarray(draw_detections(kept, detections))
    assert drawn.shape == image.shape and (drawn != image).any()


def test_parity_catches_a_perturbed_weight(exported, reference_detector):
    import copy

    from detdeploy.runtimes.open import open_model_file
    from detdeploy.verification.parity import run_parity

    images = [('a', make_image(128, 128, 21)), ('b', make_image(128, 96, 22))]
    backend = open_model_file(exported, check_signature=False)
    report = run_parity(exported, backend, reference_detector, images)
    assert report.passed, report.failures
    assert report.images and all(image.matched > 5 for image in report.images)

    changed = copy.deepcopy(reference_detector)
    with torch.no_grad():
        changed.model.bbox_head.rtm_ang[0].weight[0, 3] += 0.5
    report = run_parity(exported, backend, changed, images)
    assert not report.passed
    assert any("angle_preds.0" in failure for failure in report.failures)


def test_rotated_iou_matching_pairs_rotated_detections():
    from detdeploy.verification.compare import TOLERANCE_PRESETS, DetectionSet, match_detections
    boxes = np.array([[50, 50, 40, 10, 0.5], [80, 20, 10, 10, 0.0]])
    want = DetectionSet(boxes, np.array([0.9, 0.8]), np.array([1, 2]))
    turned = boxes + [[0, 0, 0, 0, 0.3], [0, 0, 0, 0, 0]]      # same place, turned by 0.3 rad
    got = DetectionSet(turned, np.array([0.9, 0.8]), np.array([1, 2]))
    match = match_detections(want, got, TOLERANCE_PRESETS['fp32'], 0.05, None)
    assert match.matched == 2 and match.failed_pairs == 1 and match.status == 'FAIL'
    assert rotated_iou_matrix(torch.tensor(boxes), torch.tensor(turned))[0, 0] < 0.6


def test_nms_modes_of_a_rotated_model(reference_detector):
    from detdeploy.core.errors import DetdeployError
    from detdeploy.export.exporter import ExportOptions, validate_options
    model = reference_detector.model
    with torch.no_grad():
        raw = model(torch.zeros(1, 3, 64, 64))
        boxes, scores = model.postprocess(raw, (64, 64), EVAL_NMS, 'none')
    assert boxes.shape == (1, 64 + 16 + 4, 5) and scores.shape == (1, 84, 15)
    assert (boxes[..., 4] >= -math.pi / 2).all() and (boxes[..., 4] < math.pi / 2).all()
    with pytest.raises(ValueError, match="'onnx' and 'none'"):
        model.postprocess(raw, (64, 64), EVAL_NMS, 'trt')
    with pytest.raises(DetdeployError, match='--nms trt is not available for rotated models'):
        validate_options(ExportOptions(nms_mode='trt', nms=EVAL_NMS), (64, 64), 'rotated', 32)
