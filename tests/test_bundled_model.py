"""The bundled default model (rtmdet-tiny trained on shapes): size, format, how commands pick it,
its mAP floor on the held-out val set, ONNX Runtime (eval preset) vs PyTorch AP, and `infer`
giving the same detections for the model and its exported file with default flags."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import assert_detections_agree, load_bundled_file
from detdeploy.evaluation.coco_eval import evaluate, load_coco
from detdeploy.models import load_detector
from detdeploy.models.bundled import BUNDLED_FILE, bundled_checkpoint
from detdeploy.models.rtmdet import EVAL_NMS
from detdeploy.training.shapes import SHAPE_CLASSES, make_shapes_dataset

MAP_FLOOR = 0.60
MAX_AP_DIFFERENCE = 0.002


@pytest.fixture(scope='module')
def val_set(tmp_path_factory) -> Path:
    """The bundled model's held-out val set: seed 0, 300 images of 256x256 (README)."""
    out = tmp_path_factory.mktemp('bundled_val')
    make_shapes_dataset(out, train=0, val=300, size=256, seed=0)
    return out


@pytest.fixture(scope='module')
def detector():
    return load_detector('rtmdet', BUNDLED_FILE)


@pytest.fixture(scope='module')
def torch_result(detector, val_set):
    from detdeploy.runtimes.torch_backend import TorchBackend
    ann = val_set / 'annotations/instances_val.json'
    return evaluate(TorchBackend(detector, nms=EVAL_NMS), ann, val_set / 'val', batch_size=8,
                    coco=load_coco(ann))


def test_bundled_file_is_small_fp16_and_loads_safely():
    checkpoint = load_bundled_file(BUNDLED_FILE)
    card = checkpoint['meta']['detdeploy_model_card']
    assert card['train_config']['img_size'] == 256
    assert tuple(checkpoint['meta']['dataset_meta']['classes']) == SHAPE_CLASSES


def test_rtmdet_without_checkpoint_means_the_bundled_model(detector):
    assert bundled_checkpoint('rtmdet') == BUNDLED_FILE
    assert bundled_checkpoint(None) == BUNDLED_FILE
    assert bundled_checkpoint('rtmdet-tiny') is None            # sizes stay architectures
    assert detector.class_names == SHAPE_CLASSES
    assert detector.spec.name == 'rtmdet-tiny'
    assert detector.spec.preprocessing.input_size == (256, 256)


def test_commands_say_they_use_the_bundled_model(val_set, tmp_path):
    image = val_set / 'val/000000.png'
    done = subprocess.run([sys.executable, '-m', 'detdeploy', 'infer', str(image)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [
        'note: no --checkpoint given, using the bundled rtmdet-tiny shapes model '
        '(6 classes, 256x256)']
    assert 'detections' in done.stdout


def test_bundled_model_map_floor(torch_result):
    assert torch_result.num_images == 300
    assert torch_result.metrics['AP'] >= MAP_FLOOR, torch_result.metrics


def test_onnx_eval_preset_matches_pytorch_ap(detector, val_set, torch_result, tmp_path):
    from detdeploy.export.exporter import ExportOptions, export_onnx
    from detdeploy.runtimes.open import open_model_file
    path = tmp_path / 'bundled_eval.onnx'
    export_onnx(detector, path, ExportOptions(nms_mode='onnx', nms=EVAL_NMS, dynamic_batch=True))
    ann = val_set / 'annotations/instances_val.json'
    ort_result = evaluate(open_model_file(path, 'ort'), ann, val_set / 'val', batch_size=8,
                          coco=load_coco(ann))
    difference = abs(ort_result.metrics['AP'] - torch_result.metrics['AP'])
    assert difference <= MAX_AP_DIFFERENCE, (ort_result.metrics, torch_result.metrics)


def test_registry_model_and_its_export_infer_the_same(tmp_path):
    """`infer rtmdet` (PyTorch) and `infer` on the file `detdeploy export` writes, every flag
    left at its default, give the same detections: both use the model's deploy NMS preset."""
    make_shapes_dataset(tmp_path / 'data', train=0, val=6, size=256, seed=5)
    images, model_file = tmp_path / 'data' / 'val', tmp_path / 'rtmdet.onnx'

    def cli(*args):
        done = subprocess.run([sys.executable, '-m', 'detdeploy', *map(str, args)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    cli('export', '-o', model_file)
    torch_lines = cli('infer', images, '--out', tmp_path / 'torch')
    ort_lines = cli('infer', model_file, images, '--out', tmp_path / 'ort')
    assert torch_lines[0] == ort_lines[0] == (
        'nms: score > 0.05, pre-top-k 1000 per level, IoU 0.65, max 100 per image')
    by_image = {}
    for side in ('torch', 'ort'):
        for row in json.loads((tmp_path / side / 'coco_results.json').read_text()):
            x, y, w, h = row['bbox']
            by_image.setdefault(row['file_name'].split('/')[-1], {}).setdefault(
                side, []).append(([x, y, x + w, y + h], row['score'], row['category_id']))
    assert sum(len(sides.get('torch', [])) for sides in by_image.values()) >= 6
    for sides in by_image.values():
        got, want = ([np.array([row[i] for row in sides.get(side, [])]) for i in range(3)]
                     for side in ('ort', 'torch'))
        assert_detections_agree(got, want, score_thr=0.05, box_atol=1e-2)
