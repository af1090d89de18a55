"""The torch-free contract: preprocessing policies as data, output schemas per task, metadata
validation and its older forms, the score-threshold rule, and declared backend capabilities."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import fake_metadata
from detdeploy.core.detections import ImageDetections
from detdeploy.core.errors import DetdeployError, MetadataError
from detdeploy.core.metadata import ModelMetadata
from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.core.tasks import describe_layout, output_names, output_schema
from detdeploy.runtimes.backend import INTERMEDIATE_TENSORS, IO_BINDING, Backend
from detdeploy.runtimes.preprocess import batch_canvas_size, preprocess


def test_mmdetection_scale_policy_and_divisor_padding():
    """RetinaNet/Faster R-CNN's `Resize(scale=(1333, 800), keep_ratio=True)` then `Pad(
    size_divisor=32)`, worked out by hand from mmcv's `rescale_size`: the long side may not pass
    1333 nor the short side 800."""
    config = PreprocessConfig(input_size=(800, 1333), resize='scale', pad='divisor')
    assert config.resized_size((480, 640)) == (800, 1067)      # short side binds: 800/480
    assert config.resized_size((300, 1000)) == (400, 1333)     # long side binds: 1333/1000
    assert config.resized_size((640, 480)) == (1067, 800)      # the rule ignores orientation
    assert config.canvas_size((800, 1067)) == (800, 1088)
    images = [np.zeros((480, 640, 3), np.uint8), np.zeros((640, 480, 3), np.uint8)]
    assert batch_canvas_size(images, config) == (1088, 1088)
    tensor, meta = preprocess(images[0], config, (1088, 1088))
    assert tensor.shape == (3, 1088, 1088) and meta.resized_hw == (800, 1067)


def test_fit_stretch_and_pixel_scale():
    fit = PreprocessConfig(input_size=(320, 320))
    assert fit.resized_size((480, 640)) == (240, 320) and fit.canvas_size((240, 320)) == (320, 320)
    stretch = PreprocessConfig(input_size=(320, 320), resize='stretch')
    assert stretch.resized_size((480, 640)) == (320, 320)
    yolo = PreprocessConfig(input_size=(32, 32), channel_order='rgb', mean=(0, 0, 0),
                            std=(1, 1, 1), pad_value=0, pixel_scale=1 / 255)
    tensor, _ = preprocess(np.full((32, 32, 3), 255, np.uint8), yolo)
    np.testing.assert_allclose(tensor, 1.0, rtol=1e-6)


def test_input_size_is_replaced_in_one_place_against_the_size_divisor():
    config = PreprocessConfig(input_size=(640, 640), size_divisor=64)
    assert config.with_input_size(None) is config
    assert config.with_input_size((128, 192)).input_size == (128, 192)
    with pytest.raises(DetdeployError, match='--input-size 96x96: both sides must be positive '
                                             'multiples of 64'):
        config.with_input_size((96, 96))


@pytest.mark.parametrize('values, problem', [
    (dict(resize='crop'), "resize 'crop'"), (dict(pad='mirror'), "pad 'mirror'"),
    (dict(size_divisor=0), 'size_divisor 0'), (dict(input_size=(100, 100)), 'not a multiple'),
    (dict(mean=(math.nan, 0, 0)), 'finite'), (dict(pixel_scale=math.inf), 'finite'),
    (dict(std=(1, 0, 1)), 'above 0')])
def test_preprocessing_problems(values, problem):
    assert problem in PreprocessConfig(**values).problem()


def test_output_schemas_per_task():
    assert output_names('detect', 'onnx') == ('num_dets', 'boxes', 'scores', 'labels')
    assert output_names('detect', 'none') == ('boxes', 'scores')
    assert output_names('instance', 'onnx')[-1] == 'masks'
    assert output_schema('instance', 'onnx')[-1].dims == ('B', 'K', 'H', 'W')
    assert output_schema('rotated', 'onnx')[1].dims == ('B', 'K', '5')
    with pytest.raises(ValueError, match="no output schema for task 'rotated' with NMS mode"):
        output_schema('rotated', 'trt')        # no TensorRT plugin does rotated NMS
    assert describe_layout('detect', 'onnx').startswith(
        'num_dets [B,1] int32 valid rows per image; boxes [B,K,4] float32 xyxy')


def test_metadata_round_trip_and_older_files():
    metadata = fake_metadata(raw_outputs=('cls_scores.0',), precision='fp16')
    props = metadata.to_props()
    assert ModelMetadata.from_props(props) == metadata
    old = {k: v for k, v in props.items() if k not in ('family', 'task', 'precision',
                                                         'raw_outputs')}
    restored = ModelMetadata.from_props(old)
    assert (restored.family, restored.task, restored.precision, restored.raw_outputs) == (
        'rtmdet', 'detect', 'fp32', ())


@pytest.mark.parametrize('key, value, message', [
    ('task', 'segment', "task 'segment' is not one of detect, instance, rotated"),
    ('nms', '{"score_thr": NaN, "pre_top_k": 1, "iou_thr": 0.5, "max_det": 1}',
     'nms: score_thr must be a number in [0, 1], got nan'),
    ('class_names', '"person"', 'class_names: class_names is a str, not a list'),
    ('precision', 'fp8', "precision 'fp8' is not one of"),
    ('nms_mode', 'trt', None)])
def test_metadata_is_validated_in_one_place(key, value, message):
    props = {**fake_metadata(task='rotated' if key == 'nms_mode' else 'detect').to_props(),
             key: value}
    if message is None:
        message = "task 'rotated' has no outputs defined for nms_mode 'trt'"
    with pytest.raises(MetadataError, match=message.replace('[', r'\[').replace(']', r'\]')):
        ModelMetadata.from_props(props, 'm.onnx')


def test_score_threshold_means_strictly_above():
    detections = ImageDetections('x', (10, 10), np.zeros((3, 4), np.float32),
                                 np.array([0.3, 0.05, 0.0501], np.float32),
                                 np.array([0, 1, 2]), ('a', 'b', 'c'))
    assert detections.above(0.05).labels.tolist() == [0, 2]
    assert len(detections.above(None)) == 3
    assert NMSConfig(score_thr=0.05).describe().startswith('score > 0.05')


def test_capabilities_are_declared_not_probed():
    class Minimal(Backend):
        name = 'minimal'
        metadata = fake_metadata()

        def _run(self, batch):
            return [batch.sum(axis=(1, 2, 3))]

    backend = Minimal()
    assert not backend.has(IO_BINDING) and not backend.has(INTERMEDIATE_TENSORS)
    with pytest.raises(DetdeployError, match='the minimal backend has no I/O binding'):
        backend.io_binding()
    with pytest.raises(DetdeployError, match='sides must be multiples of 32'):
        backend.run(np.zeros((1, 3, 64, 80), np.float32))
    assert backend.run(np.ones((2, 3, 32, 32), np.float32))[0].tolist() == [3072, 3072]
