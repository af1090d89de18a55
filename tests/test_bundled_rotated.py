"""The bundled rotated model (`rotated-rtmdet`: rotated-rtmdet-tiny trained on `make-dataset
shapes --rotated`): size, format, alias and card, its mAP floors on the held-out val set, and
ONNX Runtime (rotated NMS in the graph, eval preset) scoring within 0.002 of PyTorch."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_bundled_file
from detdeploy.evaluation.rotated_eval import evaluate_rotated
from detdeploy.models import load_detector
from detdeploy.models.bundled import ROTATED_FILE, bundled_checkpoint, bundled_description
from detdeploy.models.rotated_rtmdet import EVAL_NMS
from detdeploy.training.shapes import SHAPE_CLASSES, make_shapes_dataset

AP50_FLOOR = 0.70          # the floor (rotated IoU 0.5)
AP75_FLOOR = 0.70          # upright boxes already reach AP50 ~0.87 here: AP75 shows the angles
MAX_AP_DIFFERENCE = 0.002
VAL_IMAGES = 100          # the first 100 of the 300 (the demo's images); the card has all 300


@pytest.fixture(scope='module')
def val_set(tmp_path_factory) -> Path:
    """The first images of the training run's held-out val set (seed 0, 256x256, with `rbox`)."""
    out = tmp_path_factory.mktemp('rotated_val')
    make_shapes_dataset(out, train=0, val=VAL_IMAGES, size=256, seed=0, rotated=True)
    return out


@pytest.fixture(scope='module')
def detector():
    return load_detector('rotated-rtmdet', ROTATED_FILE)


@pytest.fixture(scope='module')
def torch_result(detector, val_set):
    from detdeploy.runtimes.torch_backend import TorchBackend
    return evaluate_rotated(TorchBackend(detector, nms=EVAL_NMS),
                            val_set / 'annotations/instances_val.json', val_set / 'val',
                            batch_size=8)


def test_bundled_rotated_file_alias_and_card(detector):
    assert bundled_checkpoint('rotated-rtmdet') == ROTATED_FILE
    assert bundled_checkpoint('rotated-rtmdet-tiny') is None       # sizes stay architectures
    assert 'rotated-rtmdet-tiny' in bundled_description('rotated-rtmdet')
    card = load_bundled_file(ROTATED_FILE)['meta']['detdeploy_model_card']
    assert card['train_config']['model'] == 'rotated-rtmdet-tiny'
    assert card['val_metrics_fp32_ema']['AP50'] >= AP50_FLOOR
    assert detector.spec.name == 'rotated-rtmdet-tiny' and detector.class_names == SHAPE_CLASSES
    assert detector.spec.preprocessing.input_size == (256, 256)
    assert detector.spec.preprocessing.channel_order == 'bgr'      # MMRotate keeps BGR


def test_bundled_rotated_map_floors(torch_result):
    assert torch_result.num_images == VAL_IMAGES
    assert torch_result.metrics['AP50'] >= AP50_FLOOR, torch_result.metrics
    assert torch_result.metrics['AP75'] >= AP75_FLOOR, torch_result.metrics


def test_onnx_eval_preset_matches_pytorch_rotated_ap(detector, val_set, torch_result, tmp_path):
    from detdeploy.export.exporter import ExportOptions, export_onnx
    from detdeploy.runtimes.open import open_model_file
    path = tmp_path / 'rotated_eval.onnx'
    export_onnx(detector, path, ExportOptions(nms_mode='onnx', nms=EVAL_NMS, dynamic_batch=True,
                                              simplify=False))
    ort_result = evaluate_rotated(open_model_file(path, 'ort'),
                                  val_set / 'annotations/instances_val.json', val_set / 'val',
                                  batch_size=8)
    for key in ('AP50', 'AP75', 'AP'):
        difference = abs(ort_result.metrics[key] - torch_result.metrics[key])
        assert difference <= MAX_AP_DIFFERENCE, (key, ort_result.metrics, torch_result.metrics)
