"""Shared fixtures: spec paths, deterministic test weights and generated images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detdeploy.core.metadata import ModelMetadata
from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.models.synthetic_weights import (  # noqa: F401  (re-exported to the tests)
    calibration_images, make_image, randomize_detector)

SPEC_DIR = Path(__file__).resolve().parent / 'data' / 'spec'     # copies of ../shared/spec
DATA_DIR = Path(__file__).resolve().parent / 'data'


def fake_metadata(input_hw=(64, 64), class_names=('a', 'b'), **changes) -> ModelMetadata:
    """Metadata for test backends and hand-made model files: a 4-output NMS detector."""
    values = dict(
        arch='rtmdet-tiny', class_names=tuple(class_names),
        preprocess=PreprocessConfig(input_size=tuple(input_hw)), nms_mode='onnx',
        nms=NMSConfig(score_thr=0.05, pre_top_k=1000, iou_thr=0.65, max_det=1), batch=None,
        dynamic_shape=False, opset=17, detdeploy_version='0.1.0', torch_version='',
        onnx_version='', checkpoint='synthetic', checkpoint_sha256=None)
    values.update(changes)
    return ModelMetadata(**values)


def canonical(boxes, scores, labels):
    """Rows ordered by score, then label and box: the order of exactly equal scores is
    unspecified (mmcv's NMS sorts unstably, torchvision's stably)."""
    rows = sorted(zip((-torch.as_tensor(scores)).tolist(), torch.as_tensor(labels).tolist(),
                      torch.as_tensor(boxes).tolist()))
    return ([-r[0] for r in rows], [r[1] for r in rows], torch.tensor([r[2] for r in rows]))


def assert_detections_agree(got, want, score_thr, box_atol=1e-3, box_rtol=5e-5,
                            score_atol=1e-5, borderline=1e-4):
    """Two detection sets of one image, (boxes [K, 4], scores [K], labels [K]) each, agree.

    Detections are matched by label and box (near-equal scores may swap places): a box
    coordinate fails only if off by more than `box_atol` px and by more than `box_rtol`
    relatively (Polygraphy's rule). A detection may go unmatched only if borderline: its score
    within `borderline` of its side's lowest (the max-det cut) or of `score_thr`.
    """
    got_boxes, got_scores, got_labels = (np.asarray(t) for t in got)
    want_boxes, want_scores, want_labels = (np.asarray(t) for t in want)
    unused = set(range(len(want_scores)))
    unmatched_got = []
    for box, score, label in zip(got_boxes, got_scores, got_labels):
        options = [j for j in unused if want_labels[j] == label and np.allclose(
            want_boxes[j], box, atol=box_atol, rtol=box_rtol)]
        if not options:
            unmatched_got.append(score)
            continue
        best = min(options, key=lambda j: abs(want_scores[j] - score))
        unused.remove(best)
        assert abs(score - want_scores[best]) <= score_atol
    for scores, unmatched in ((got_scores, unmatched_got),
                              (want_scores, [want_scores[j] for j in unused])):
        for score in unmatched:
            assert (score - scores.min() <= borderline or score - score_thr <= borderline), \
                f'unmatched detection with score {score}'
        assert len(unmatched) <= max(2, len(scores) // 20)


def reference_outputs(detector, images: np.ndarray, nms_mode: str, nms) -> list[np.ndarray]:
    """What an exported graph must compute, from the PyTorch module it is traced from."""
    from detdeploy.export.graph import DetectorGraph
    graph = DetectorGraph(detector.model, nms_mode, nms).eval()
    with torch.no_grad():
        return [t.numpy() for t in graph(torch.from_numpy(images))]


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
    from detdeploy.models import load_detector
    from detdeploy.models.rtmdet import DEPLOY_NMS
    path = tmp_path_factory.mktemp('onnx') / 'tiny_dynamic.onnx'
    report = export_onnx(load_detector('rtmdet-tiny', tiny_checkpoint), path,
                         ExportOptions(nms_mode='onnx', nms=DEPLOY_NMS, dynamic_batch=True,
                                       input_hw=(320, 320)))
    return path, report


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Commands run in-process (`bench`, `infer --threads`) set PyTorch's process-wide thread
    count; put it back after each test. Random-weight outputs move by up to 4e-4 between one
    and two threads, so a leaked count breaks the MMDetection/MMRotate reference tests."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def one_torch_thread():
    """PyTorch on one thread for a module: on a busy 2-core machine its pool of two is far
    slower (rtmdet-tiny at 64x96: 0.5-1.9 s per image, against 0.09 s on one). Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='session')
def shapes256(tmp_path_factory):
    """A small shapes dataset at 256 px (the bundled model's size): 8 train, 4 val images."""
    from detdeploy.training.shapes import make_shapes_dataset
    folder = tmp_path_factory.mktemp('shapes256')
    make_shapes_dataset(folder, train=8, val=4, size=256, seed=0)
    return folder


@pytest.fixture(scope='session')
def bundled_onnx_256(tmp_path_factory):
    """The bundled (trained) rtmdet exported at 256x256, deploy preset, batch 1: exported once."""
    from detdeploy.export.exporter import ExportOptions, export_onnx
    from detdeploy.models import load_detector
    from detdeploy.models.bundled import bundled_checkpoint
    detector = load_detector('rtmdet', bundled_checkpoint('rtmdet'))
    path = tmp_path_factory.mktemp('bundled256') / 'rtmdet256.onnx'
    export_onnx(detector, path, ExportOptions(input_hw=(256, 256)))
    return path


def load_bundled_file(path: Path) -> dict:
    """A shipped checkpoint, checked as every bundled model must be: small (<= 20 MB), float
    weights in fp16, no training state, a model card; returns the loaded checkpoint."""
    assert path.stat().st_size <= 20 * 1024 * 1024
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    floats = [v for v in checkpoint['state_dict'].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    assert 'train_state' not in checkpoint
    assert 'detdeploy_model_card' in checkpoint['meta']
    return checkpoint


def rtmdet_ins_reference_images():
    """MMDetection 3.3.0's RTMDet-Ins tiny reference (tools/make_mmdet_reference_rtmdet_ins.py):
    per image, its stride-8 probabilities, its original-size masks, original size and scale."""
    stored = np.load(DATA_DIR / 'mmdet_rtmdet_ins_tiny_reference.npz')
    for image in range(2):
        probabilities = stored[f'image{image}/probabilities']
        shape = tuple(int(v) for v in stored[f'image{image}/masks_shape'])
        expected = np.unpackbits(stored[f'image{image}/masks_packed'])[:np.prod(shape)]
        expected = expected.reshape(shape).astype(bool)[:len(probabilities)]
        original_hw = tuple(int(v) for v in stored[f'image{image}/ori_shape'])
        scale_wh = tuple(float(v) for v in stored[f'image{image}/scale_factor'])
        yield probabilities, expected, original_hw, scale_wh
