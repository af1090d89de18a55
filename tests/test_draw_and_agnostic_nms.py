"""Drawings that tell the truth (the best label on top, labels inside the image) and
class-agnostic NMS: one box per object, the same in PyTorch and in the exported graph, carried by
the metadata (files without the flag read as per-class)."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch

from detdeploy.core.detections import ImageDetections
from detdeploy.core.metadata import ModelMetadata
from detdeploy.core.nms import NMSConfig
from detdeploy.export.exporter import export_postprocess
from detdeploy.export.graph import PostprocessGraph
from detdeploy.inference.draw import class_colour, draw_detections, label_box

CLASSES = ('square', 'triangle', 'circle')


def detections(rows, image_hw=(100, 120)) -> ImageDetections:
    """rows of (box, score, label), given best first as the pipeline returns them."""
    boxes = np.array([r[0] for r in rows], np.float32).reshape(-1, 4)
    return ImageDetections('x.png', image_hw, boxes, np.array([r[1] for r in rows], np.float32),
                           np.array([r[2] for r in rows], np.int64), CLASSES)


def label_pixels(canvas, box, text_wh_probe='square 0.80'):
    """The label rectangle of `box` and the colour of its top-left padding pixel."""
    from PIL import ImageDraw, ImageFont
    left, top, right, bottom = ImageDraw.Draw(canvas).textbbox(
        (0, 0), text_wh_probe, font=ImageFont.load_default())
    placed = label_box(box, (right - left, bottom - top), canvas.size)
    return placed, canvas.getpixel((placed[0], placed[1]))


@pytest.mark.parametrize('order', [1, -1])
def test_overlapping_labels_show_the_best_score(order):
    """One object labelled twice (RTMDet keeps several labels per anchor): whatever order they
    come in, the visible label is the highest score's (its class colour, drawn last)."""
    box = (30.0, 40.0, 80.0, 90.0)
    rows = [(box, 0.80, 0), (box, 0.33, 1)][::order]
    canvas = draw_detections(np.full((100, 120, 3), 255, np.uint8), detections(rows))
    placed, colour = label_pixels(canvas, box)
    assert colour == class_colour(0) != class_colour(1)
    # the text itself: the best label's rectangle holds exactly the pixels of 'square 0.80'
    # drawn alone, not those of 'triangle 0.33'
    def label_region(image):
        return np.asarray(image)[placed[1]:placed[3], placed[0]:placed[2]]
    alone = [draw_detections(np.full((100, 120, 3), 255, np.uint8), detections([row]))
             for row in sorted(rows, key=lambda row: -row[1])]
    assert np.array_equal(label_region(canvas), label_region(alone[0]))
    assert not np.array_equal(label_region(canvas), label_region(alone[1]))


@pytest.mark.parametrize('box', [(110.0, 50.0, 120.0, 70.0),    # at the right edge
                                 (0.0, 0.0, 20.0, 20.0),        # top-left: no room above
                                 (5.0, 95.0, 119.0, 100.0)])    # a sliver at the bottom
def test_labels_stay_inside_the_image(box):
    canvas = draw_detections(np.full((100, 120, 3), 255, np.uint8),
                             detections([(box, 0.8, 0)]))
    (left, top, right, bottom), colour = label_pixels(canvas, box)
    assert 0 <= left < right <= 120 and 0 <= top < bottom <= 100
    assert colour == class_colour(0)
    assert canvas.getpixel((right - 1, bottom - 1)) == class_colour(0)   # not cut off
    if box[1] > bottom - top:                      # room above: the label sits on the box
        assert bottom == int(box[1])


def test_nms_config_reads_files_without_the_flag_as_per_class():
    old = {'score_thr': 0.05, 'pre_top_k': 1000, 'iou_thr': 0.65, 'max_det': 100}
    assert NMSConfig.from_dict(old).class_agnostic is False
    assert NMSConfig.from_dict(old).to_dict() == old                 # per-class files unchanged
    agnostic = NMSConfig(class_agnostic=True)
    assert NMSConfig.from_dict(agnostic.to_dict()) == agnostic
    assert 'class-agnostic' in agnostic.describe()
    with pytest.raises(ValueError):
        NMSConfig.from_dict({**old, 'class_agnostic': 'yes'})


FEATURE_SIZES, STRIDES, INPUT_HW = [(8, 8), (4, 4), (2, 2)], (8, 16, 32), (64, 64)


def two_labels_per_object() -> tuple[np.ndarray, np.ndarray]:
    """Scores [1, N, 3] and distances [1, N, 4]: three objects, each found by two neighbouring
    anchors of level 0, each anchor scoring two classes (0.9/0.6 and 0.8/0.5)."""
    num_anchors = sum(h * w for h, w in FEATURE_SIZES)
    scores = np.zeros((1, num_anchors, 3), np.float32)
    distances = np.full((1, num_anchors, 4), 0.5, np.float32)
    for first, (best, other) in zip((9, 27, 45), ((0, 1), (1, 2), (2, 0))):
        for anchor, top in ((first, 0.9), (first + 1, 0.8)):
            scores[0, anchor, best], scores[0, anchor, other] = top, top - 0.3
            distances[0, anchor] = 10.0         # 20 px boxes, 8 px apart: IoU 0.43
    return scores, distances


def test_agnostic_nms_keeps_one_box_per_object_in_pytorch_and_onnx():
    """Per-class NMS keeps each object twice (two labels); class-agnostic keeps its best box
    and label only, and the exported graph gives exactly PyTorch's outputs."""
    scores, distances = two_labels_per_object()
    inputs = (torch.from_numpy(scores), torch.from_numpy(distances))
    settings = dict(score_thr=0.05, pre_top_k=50, iou_thr=0.3, max_det=20)
    with torch.no_grad():
        per_class = PostprocessGraph(FEATURE_SIZES, STRIDES, INPUT_HW,
                                     NMSConfig(**settings)).eval()(*inputs)
        graph = PostprocessGraph(FEATURE_SIZES, STRIDES, INPUT_HW,
                                 NMSConfig(**settings, class_agnostic=True)).eval()
        want = [t.numpy() for t in graph(*inputs)]
    assert int(per_class[0][0, 0]) == 6
    count = int(want[0][0, 0])
    assert count == 3
    assert sorted(want[3][0, :count].tolist()) == [0, 1, 2]
    np.testing.assert_allclose(want[2][0, :count], 0.9)
    session = onnxruntime.InferenceSession(
        export_postprocess(graph, 3).SerializeToString(), providers=['CPUExecutionProvider'])
    got = session.run(None, {'class_scores': scores, 'box_distances': distances})
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def test_agnostic_nms_is_in_the_metadata_and_the_pytorch_backend(tiny_detector):
    from conftest import fake_metadata
    from detdeploy.runtimes.torch_backend import TorchBackend
    nms = NMSConfig(class_agnostic=True)
    props = fake_metadata(nms=nms).to_props()
    assert json.loads(props['nms'])['class_agnostic'] is True
    assert ModelMetadata.from_props(props).nms == nms
    assert TorchBackend(tiny_detector, nms=nms).metadata.nms.class_agnostic


def test_infer_agnostic_nms_on_the_bundled_model(image_dir, tmp_path, capsys, one_torch_thread):
    from detdeploy.cli import main as cli_main
    with pytest.raises(SystemExit) as exit_:
        cli_main(['infer', 'rtmdet', str(image_dir / 'wide.jpg'), '--agnostic-nms',
                  '--out', str(tmp_path)])
    stdout = capsys.readouterr().out
    assert exit_.value.code in (0, None) and 'IoU 0.65 class-agnostic' in stdout
    rows = json.loads((tmp_path / 'wide.json').read_text())['detections']
    import torchvision
    boxes = torch.tensor([row['bbox_xyxy'] for row in rows])
    assert len(rows) > 1
    assert float(torchvision.ops.box_iou(boxes, boxes).fill_diagonal_(0).max()) <= 0.65 + 1e-3
