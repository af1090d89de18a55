"""`detdeploy eval` and `detdeploy.evaluation.coco_eval`: our mAP equals pycocotools run directly on the same
detections; CLI tables, exit codes and bad input."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from detdeploy.evaluation.coco_eval import METRIC_NAMES, evaluate
from conftest import fake_metadata
from detdeploy.runtimes.backend import Backend
from detdeploy.training.shapes import SHAPE_CLASSES, make_shapes_dataset

SIZE = 64


@pytest.fixture(scope='module')
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('eval_shapes')
    make_shapes_dataset(out, train=0, val=6, size=SIZE, seed=11)
    return out


class GroundTruthBackend(Backend):
    """Returns each image's ground-truth boxes, jittered, with made-up scores, in image order:
    a backend whose mAP is known to be high but not perfect."""
    name = 'fake'

    def __init__(self, coco, max_det: int = 20, seed: int = 0):
        self.metadata = fake_metadata((SIZE, SIZE), SHAPE_CLASSES)
        self.rng = np.random.default_rng(seed)
        self.queue = [coco.loadAnns(coco.getAnnIds(imgIds=i)) for i in sorted(coco.getImgIds())]
        self.category_ids = sorted(coco.getCatIds())
        self.max_det = max_det

    def _run(self, batch: np.ndarray):
        count = batch.shape[0]
        num = np.zeros((count, 1), np.int32)
        boxes = np.zeros((count, self.max_det, 4), np.float32)
        scores = np.zeros((count, self.max_det), np.float32)
        labels = np.zeros((count, self.max_det), np.int32)
        for index in range(count):
            anns = self.queue.pop(0)
            rows = []
            for ann in anns:
                x, y, w, h = ann['bbox']
                jitter = self.rng.normal(0, 0.06 * max(w, h), 4)
                rows.append(([x, y, x + w, y + h] + jitter, self.rng.uniform(0.3, 1.0),
                             self.category_ids.index(ann['category_id'])))
                # a false positive of another class
                rows.append(([x, y, x + w, y + h], self.rng.uniform(0.0, 0.5),
                             (self.category_ids.index(ann['category_id']) + 1) % 6))
            rows.sort(key=lambda r: -r[1])
            rows = rows[:self.max_det]
            num[index, 0] = len(rows)
            for k, (box, score, label) in enumerate(rows):
                boxes[index, k] = np.clip(box, 0, SIZE)
                scores[index, k], labels[index, k] = score, label
        return num, boxes, scores, labels


def test_evaluate_equals_pycocotools_run_directly(shapes):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    ann = shapes / 'annotations/instances_val.json'
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
    result = evaluate(GroundTruthBackend(coco), ann, shapes / 'val', batch_size=4)
    assert result.num_images == 6 and result.num_detections > 0
    assert 0.1 < result.metrics['AP'] < 0.99             # a real, imperfect score

    # the same detections, scored by pycocotools without our code in between
    backend = GroundTruthBackend(coco)
    detections = []
    for image_id in sorted(coco.getImgIds()):
        num, boxes, scores, labels = backend.run(np.zeros((1, 3, SIZE, SIZE), np.float32))
        for k in range(int(num[0, 0])):
            x1, y1, x2, y2 = (float(v) for v in boxes[0, k])
            if x2 > x1 and y2 > y1:
                detections.append({'image_id': image_id, 'bbox': [x1, y1, x2 - x1, y2 - y1],
                                   'score': float(scores[0, k]),
                                   'category_id': backend.category_ids[int(labels[0, k])]})
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(detections), 'bbox')
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    expected = dict(zip(METRIC_NAMES, evaluator.stats))
    for name in METRIC_NAMES:
        assert result.metrics[name] == pytest.approx(max(expected[name], 0.0), abs=1e-9), name


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, '-m', 'detdeploy', *map(str, args)],
                          capture_output=True, text=True, timeout=300, **kwargs)


def test_cli_eval_table_json_and_min_ap(shapes, tmp_path):
    ann, images = shapes / 'annotations/instances_val.json', shapes / 'val'
    report = tmp_path / 'eval.json'
    result = run_cli('eval', '--model', 'rtmdet-tiny', '--class-names', ','.join(SHAPE_CLASSES),
                     '--ann', ann, '--images', images, '--backend', 'torch,ort', '--json',
                     report, '--min-ap', '0.5')
    assert result.returncode == 1, result.stderr            # random weights: AP below the floor
    lines = result.stdout.splitlines()
    assert lines[0].split()[:7] == ['backend', *METRIC_NAMES]
    assert lines[1].split()[-4] == '(base)'
    assert lines[-1].startswith('FAIL: AP below --min-ap 0.5')
    assert 'random weights' in result.stderr and 'exporting rtmdet-tiny to ONNX' in result.stderr
    payload = json.loads(report.read_text())
    assert [r['images'] for r in payload['results']] == [6, 6]
    assert set(payload['results'][0]['metrics']) == set(METRIC_NAMES)


@pytest.mark.parametrize('args, message', [
    (['eval', '--ann', 'missing.json', '--images', '.'], 'annotation file missing.json does not'),
    (['eval', 'model.onnx', '--ann', 'ANN', '--images', '.'], 'model file not found: model.onnx'),
    (['eval', '--model', 'rtmdet-tiny', '--ann', 'ANN', '--images', 'IMAGES'],
     'has 6 categories but the model has 80 classes'),
    (['eval', '--ann', 'ANN', '--images', '.', '--backend', 'torch,tflite'], "--backend"),
    (['eval', '--ann', 'ANN', '--images', 'nowhere', '--model', 'rtmdet-tiny', '--class-names',
      ','.join(SHAPE_CLASSES)], 'image directory nowhere does not exist'),
])
def test_cli_eval_bad_input_exit_2(shapes, tmp_path, args, message):
    args = [str(shapes / 'annotations/instances_val.json') if a == 'ANN' else
            str(shapes / 'val') if a == 'IMAGES' else a for a in args]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2    # at most a model note, then the error
    assert 'Traceback' not in result.stderr
