"""`detdeploy infer` end to end on generated images, and its exit codes for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detdeploy.runtimes.preprocess import preprocess, read_image

DETDEPLOY = str(Path(sys.executable).parent / 'detdeploy')


def run_cli(*args):
    return subprocess.run([DETDEPLOY, *map(str, args)], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope='module')
def infer_run(tmp_path_factory, tiny_checkpoint, image_dir):
    out = tmp_path_factory.mktemp('infer_out')
    result = run_cli('infer', '--model', 'rtmdet-tiny', '--checkpoint', tiny_checkpoint,
                     image_dir, '--out', out, '--batch', 2)
    return result, out


def test_infer_writes_json_and_png_per_image(infer_run, image_dir):
    result, out = infer_run
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        'coco_results.json', 'gray.json', 'gray.png', 'tall.json', 'tall.png', 'wide.json',
        'wide.png']
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith('nms: score > 0.05') and lines[-1].startswith(f'all detections (COCO results format): {out}/coco_results.json (image_id: position')
    assert 'random weights' not in result.stderr
    for stem in ('gray', 'tall', 'wide'):
        record = json.loads((out / f'{stem}.json').read_text())
        with Image.open(image_dir / f'{stem}.{"jpg" if stem == "wide" else "png"}') as source:
            width, height = source.size
        assert (record['height'], record['width']) == (height, width)
        with Image.open(out / f'{stem}.png') as drawn:
            assert drawn.size == (width, height) and drawn.mode == 'RGB'
        detections = record['detections']
        assert 0 < len(detections) <= 300
        scores = [d['score'] for d in detections]
        assert scores == sorted(scores, reverse=True) and min(scores) > 0.001
        for det in detections:
            x1, y1, x2, y2 = det['bbox_xyxy']
            assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
            assert 0 <= det['label'] < 80 and isinstance(det['label_name'], str)


def test_coco_results_hold_every_image_detection(infer_run):
    _, out = infer_run
    rows = json.loads((out / 'coco_results.json').read_text())
    for image_id, stem in enumerate(['gray', 'tall', 'wide']):        # the order of the run
        record = json.loads((out / f'{stem}.json').read_text())
        mine = [r for r in rows if r['image_id'] == image_id]
        assert {r['file_name'] for r in mine} == {record['image']}
        assert len(mine) == len(record['detections'])
        for row, det in zip(mine, record['detections']):
            x1, y1, x2, y2 = det['bbox_xyxy']
            assert row['bbox'] == pytest.approx([x1, y1, x2 - x1, y2 - y1], abs=2e-3)
            assert (row['score'], row['category_id'], row['category_name']) == (
                det['score'], det['label'], det['label_name'])


def test_infer_json_matches_model_predict(infer_run, image_dir, tiny_detector):
    """Boxes in the JSON equal the model's own detections divided by the resize scale, clamped
    to the image, without those that lie wholly in the padding.

    wide.jpg runs alone in its batch of the CLI run: batched convolutions round differently, which
    can reorder near-equal low scores."""
    _, out = infer_run
    image = read_image(image_dir / 'wide.jpg')
    tensor, meta = preprocess(image, tiny_detector.spec.preprocessing)
    dets = tiny_detector.model.predict(torch.from_numpy(tensor)[None],
                                       tiny_detector.spec.nms('deploy'))[0]
    boxes = dets.boxes / torch.tensor([meta.scale_wh * 2]).flatten()
    height, width = image.shape[:2]
    boxes[:, 0::2], boxes[:, 1::2] = boxes[:, 0::2].clamp(0, width), boxes[:, 1::2].clamp(0, height)
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    assert inside.sum() > 0
    record = json.loads((out / 'wide.json').read_text())['detections']
    assert [d['label'] for d in record] == dets.labels[inside].tolist()
    # the CLI process runs PyTorch on the physical cores' thread count: sums round differently
    np.testing.assert_allclose([d['score'] for d in record], dets.scores[inside].numpy(), atol=3e-6)
    np.testing.assert_allclose([d['bbox_xyxy'] for d in record], boxes[inside].numpy(), atol=2e-3)


def test_score_thr_and_show_thr(tmp_path, tiny_checkpoint, image_dir, infer_run):
    _, full_out = infer_run
    result = run_cli('infer', '--checkpoint', tiny_checkpoint, image_dir / 'wide.jpg',
                     '--score-thr', 0.3, '--show-thr', 0.35, '--out', tmp_path)
    assert result.returncode == 0, result.stderr
    full = json.loads((full_out / 'wide.json').read_text())['detections']
    kept = json.loads((tmp_path / 'wide.json').read_text())['detections']
    assert kept == [d for d in full if d['score'] > 0.3]
    shown = sum(d['score'] > 0.35 for d in full)
    assert f'{len(kept)} detections, {shown} at score > 0.35' in result.stdout


def test_nms_preset_eval_for_registry_models(image_dir):
    result = run_cli('infer', '--model', 'rtmdet-tiny', image_dir / 'gray.png', '--nms-preset',
                     'eval')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        'nms: score > 0.001, pre-top-k 30000 per level, IoU 0.65, max 300 per image')


def test_random_weights_are_announced(image_dir):
    result = run_cli('infer', '--model', 'rtmdet-tiny', image_dir / 'gray.png')
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        'note: no --checkpoint given, rtmdet-tiny uses random weights (detections are meaningless)']
    assert result.stdout.splitlines()[1].startswith(f'{image_dir / "gray.png"}: ')


@pytest.mark.parametrize('args, message', [
    (['infer', 'missing.jpg'], 'error: no such image file or directory: missing.jpg'),
    (['infer', '--model', 'rtmdet-xl', 'IMG'], "error: unknown model 'rtmdet-xl': did you mean"),
    (['infer', '--checkpoint', 'nope.pth', 'IMG'], 'error: checkpoint not found: nope.pth'),
    (['infer', '--score-thr', '1.5', 'IMG'], "Invalid value for '--score-thr'"),
    (['infer', '--device', 'cuda', 'IMG'], "error: device 'cuda' requested but PyTorch sees no"),
])
def test_bad_input_exit_code_2_one_line(args, message, image_dir):
    if '--device' in args and torch.cuda.is_available():
        pytest.skip('this machine has a GPU, so --device cuda is valid')
    result = run_cli(*[image_dir / 'gray.png' if arg == 'IMG' else arg for arg in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert 'Traceback' not in result.stderr
    if message.startswith('error:'):
        assert len(result.stderr.strip().splitlines()) == 1


def test_wrong_checkpoint_is_one_line(tiny_checkpoint, image_dir):
    result = run_cli('infer', '--model', 'rtmdet-m', '--checkpoint', tiny_checkpoint, image_dir)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f'error: checkpoint {tiny_checkpoint} does not fit rtmdet-m: ')
    debug = run_cli('--debug', 'infer', '--model', 'rtmdet-m', '--checkpoint', tiny_checkpoint,
                    image_dir)
    assert debug.returncode != 0 and 'Traceback' in debug.stderr
