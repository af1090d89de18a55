"""Shared fixtures: spec paths, deterministic test weights and generated images."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from detdeploy.models.synthetic_weights import (  # noqa: F401  (re-exported to the tests)
    calibration_images, make_image, randomize_detector)

SPEC_DIR = Path(__file__).resolve().parent / 'data' / 'spec'     # copies of ../shared/spec
DATA_DIR = Path(__file__).resolve().parent / 'data'


def canonical(boxes, scores, labels):
    """Rows ordered by score, then label and box: the order of exactly equal scores is
    unspecified (mmcv's NMS sorts unstably, torchvision's stably)."""
    rows = sorted(zip((-torch.as_tensor(scores)).tolist(), torch.as_tensor(labels).tolist(),
                      torch.as_tensor(boxes).tolist()))
    return ([-r[0] for r in rows], [r[1] for r in rows], torch.tensor([r[2] for r in rows]))


@pytest.fixture(scope='session')
def tiny_detector():
    from detdeploy.models import load_detector
    torch.manual_seed(0)
    detector = load_detector('rtmdet-tiny')
    randomize_detector(detector.model)
    return detector


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory, tiny_detector):
    from detdeploy.models import save_checkpoint
    path = tmp_path_factory.mktemp('ckpt') / 'rtmdet_tiny_test.pth'
    save_checkpoint(path, tiny_detector.model, tiny_detector.spec, tiny_detector.class_names)
    return path


@pytest.fixture(scope='session')
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp('images')
    Image.fromarray(make_image(300, 400, 0)).save(folder / 'wide.jpg', quality=95)
    Image.fromarray(make_image(500, 333, 1)).save(folder / 'tall.png')
    Image.fromarray(make_image(64, 64, 2)[:, :, 0]).save(folder / 'gray.png')
    return folder


@pytest.fixture(scope='session')
def tiny_onnx(tmp_path_factory, tiny_checkpoint):
    """rtmdet-tiny exported once: --nms onnx, deploy preset, dynamic batch, 320x320 input."""
    from detdeploy.export.exporter import ExportOptions, export_onnx
    from detdeploy.models import DEPLOY_NMS, load_detector
    path = tmp_path_factory.mktemp('onnx') / 'tiny_dynamic.onnx'
    report = export_onnx(load_detector('rtmdet-tiny', tiny_checkpoint), path,
                         ExportOptions(nms_mode='onnx', nms=DEPLOY_NMS, dynamic_batch=True,
                                       input_hw=(320, 320)))
    return path, report
