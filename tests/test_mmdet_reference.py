"""Our RTMDet against numbers MMDetection 3.3.0 computed for the same weights and input.

The JSON files in tests/data were written by running MMDetection's own RTMDet (official config,
SyncBN as BN) on weights made by `randomize_detector` below; MMDetection is not a dependency.
"""
import json

import pytest
import torch

from conftest import DATA_DIR, assert_detections_agree, calibration_images, randomize_detector
from detdeploy.models import build_model
from detdeploy.models.rtmdet import EVAL_NMS


@pytest.fixture(scope='module', params=['tiny', 'm'])
def reference_run(request):
    size = request.param
    reference = json.loads((DATA_DIR / f'mmdet_rtmdet_{size}_reference.json').read_text())
    torch.manual_seed(0)
    model = randomize_detector(build_model(f'rtmdet-{size}'), seed=0)
    images = calibration_images(seed=7, count=1)[..., :256]          # 1x3x320x256
    with torch.no_grad():
        raw = model(images)
    detections = model.predict(images, EVAL_NMS)[0]
    return reference, raw, detections


def test_raw_head_outputs_within_1e4(reference_run):
    reference, raw, _ = reference_run
    for level, cls, box in zip(reference['levels'], raw.cls_scores, raw.bbox_preds):
        assert list(cls.shape) == level['cls_shape']
        cls_flat, box_flat = cls.flatten(), box.flatten()
        torch.testing.assert_close(cls_flat[level['cls_index']],
                                   torch.tensor(level['cls_values']), atol=1e-4, rtol=0)
        # boxes reach ~100 (distances in stride units on random weights): float32 kernels that
        # differ by CPU (oneDNN picks per ISA) move them by a few 1e-6 relatively
        torch.testing.assert_close(box_flat[level['box_index']],
                                   torch.tensor(level['box_values']), atol=1e-4, rtol=2e-5)
        assert cls_flat.double().sum().item() == pytest.approx(level['cls_sum'], rel=1e-5)
        assert cls_flat.double().abs().sum().item() == pytest.approx(level['cls_abs_sum'], rel=1e-5)
        assert box_flat.double().abs().sum().item() == pytest.approx(level['box_abs_sum'], rel=1e-5)


def test_same_final_detections(reference_run):
    """The same 300 detections. Matched by label and box, not by position: on another CPU the
    float32 kernels round differently, so two detections with near-equal scores may swap places
    (seen on AMD EPYC for m: the reference was made on another CPU), and one at the 300 cut may
    give way to its near-equal neighbour."""
    reference, _, detections = reference_run
    assert len(reference['det_scores']) == len(detections.scores) == 300
    theirs = (torch.tensor(reference['det_bboxes']), torch.tensor(reference['det_scores']),
              torch.tensor(reference['det_labels']))
    assert_detections_agree(tuple(detections), theirs, score_thr=0.001, box_atol=1e-3,
                            box_rtol=1e-5, score_atol=5e-5)
    # ties aside, the order is the same: scores descend identically
    torch.testing.assert_close(detections.scores, torch.tensor(reference['det_scores']),
                               atol=5e-5, rtol=0)
