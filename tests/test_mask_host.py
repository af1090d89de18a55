"""Host side of instance models with hand-made models whose outputs are known (the shapes
dataset's ground-truth masks, in both mask frames): `infer` writes COCO RLE that pycocotools
reads back as the masks and draws them; `eval`'s segm AP equals pycocotools run directly;
`parity` fails on perturbed mask probabilities; `bench` reports the mask paste."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import fake_metadata
from detdeploy.core.masks import MaskConfig
from detdeploy.core.nms import NMSConfig
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.evaluation.coco_eval import METRIC_NAMES, evaluate, load_coco
from detdeploy.runtimes.backend import Backend
from detdeploy.runtimes.pipeline import detect
from detdeploy.training.shapes import SHAPE_CLASSES, make_shapes_dataset

SIZE = 64
MAX_DET = 8
FRAMES = {'box': MaskConfig('box', size=28), 'input': MaskConfig('input', stride=4)}


@pytest.fixture(scope='module')
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('mask_shapes')
    make_shapes_dataset(out, train=0, val=3, size=SIZE, seed=5)
    return out


@pytest.fixture(scope='module')
def coco(shapes):
    return load_coco(shapes / 'annotations/instances_val.json')


def gt_mask(coco, ann) -> np.ndarray:
    return coco.annToMask(ann).astype(bool)


def mask_output(mask: np.ndarray, box_xyxy, config: MaskConfig) -> np.ndarray:
    """A ground-truth mask as the model would output it: frame box, 28x28 samples of its box;
    frame input, the mean over stride x stride blocks of the (unpadded, unscaled) input."""
    if config.frame == 'input':
        side = SIZE // config.stride
        # kept off 0.5, where a rounding difference would flip pixels along whole lines
        return 0.03 + 0.9 * mask.reshape(side, config.stride, side, config.stride).mean((1, 3))
    x1, y1, x2, y2 = box_xyxy
    size = config.size
    ys = np.clip(((np.arange(size) + 0.5) / size * (y2 - y1) + y1).astype(int), 0, SIZE - 1)
    xs = np.clip(((np.arange(size) + 0.5) / size * (x2 - x1) + x1).astype(int), 0, SIZE - 1)
    return mask[np.ix_(ys, xs)].astype(np.float32) * 0.9 + 0.05


def image_outputs(coco, image_id: int, config: MaskConfig, seed: int = 0):
    """One image's five NMS outputs (batch 1) made from its annotations: every shape with a
    made-up score, plus a false positive of another class."""
    rng = np.random.default_rng(seed + image_id)
    category_ids = sorted(coco.getCatIds())
    rows = []
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=image_id)):
        x, y, w, h = ann['bbox']
        box = np.clip([x, y, x + w, y + h] + rng.normal(0, 0.5, 4), 0, SIZE)
        mask = gt_mask(coco, ann)
        label = category_ids.index(ann['category_id'])
        rows.append((box, rng.uniform(0.4, 1.0), label, mask_output(mask, box, config)))
        rows.append((box, rng.uniform(0.05, 0.4), (label + 1) % len(category_ids),
                     mask_output(np.roll(mask, 5, axis=1), box, config)))
    rows.sort(key=lambda row: -row[1])
    rows = rows[:MAX_DET]
    mask_hw = (config.size,) * 2 if config.frame == 'box' else (SIZE // config.stride,) * 2
    num = np.array([[len(rows)]], np.int32)
    boxes = np.zeros((1, MAX_DET, 4), np.float32)
    scores = np.zeros((1, MAX_DET), np.float32)
    labels = np.full((1, MAX_DET), -1, np.int32)
    masks = np.zeros((1, MAX_DET, *mask_hw), np.float32)
    for k, (box, score, label, mask) in enumerate(rows):
        boxes[0, k], scores[0, k], labels[0, k], masks[0, k] = box, score, label, mask
    return num, boxes, scores, labels, masks


def instance_metadata(config: MaskConfig, **changes):
    return fake_metadata((SIZE, SIZE), SHAPE_CLASSES, task='instance', mask=config,
                         nms=NMSConfig(score_thr=0.05, pre_top_k=1000, iou_thr=0.6,
                                       max_det=MAX_DET), **changes)


class GroundTruthInstanceBackend(Backend):
    """Returns each image's `image_outputs`, in image order."""
    name = 'fake'

    def __init__(self, coco, config: MaskConfig):
        self.metadata = instance_metadata(config)
        self.queue = [image_outputs(coco, i, config) for i in sorted(coco.getImgIds())]

    def _run(self, batch):
        parts = [self.queue.pop(0) for _ in range(len(batch))]
        return [np.concatenate(column) for column in zip(*parts)]


@pytest.mark.parametrize('frame', ['box', 'input'])
def test_segm_eval_equals_pycocotools_run_directly(shapes, coco, frame):
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval
    ann = shapes / 'annotations/instances_val.json'
    result = evaluate(GroundTruthInstanceBackend(coco, FRAMES[frame]), ann, shapes / 'val',
                      batch_size=2, coco=coco)
    assert result.segm_metrics is not None
    assert 0.2 < result.segm_metrics['AP'] < 0.99 and 0.2 < result.metrics['AP'] < 0.99

    # the same masks, encoded and scored by pycocotools without our code in between
    image_ids = sorted(coco.getImgIds())
    files = [shapes / 'val' / coco.imgs[i]['file_name'] for i in image_ids]
    rows = []
    for image_id, (found, _) in zip(image_ids, detect(
            GroundTruthInstanceBackend(coco, FRAMES[frame]), files)):
        for k in range(len(found)):
            rle = mask_utils.encode(np.asfortranarray(found.masks[k].astype(np.uint8)))
            rows.append({'image_id': image_id, 'segmentation': rle,
                         'score': float(found.scores[k]),
                         'category_id': sorted(coco.getCatIds())[int(found.labels[k])]})
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes(rows), 'segm')
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    for name, value in zip(METRIC_NAMES, evaluator.stats):
        assert result.segm_metrics[name] == pytest.approx(max(value, 0.0), abs=1e-9), name


# ---- a hand-made ONNX instance model -------------------------------------------------------

def constant_onnx(path: Path, outputs, metadata) -> Path:
    """An ONNX graph returning `outputs` (batch-1 arrays) tiled to its input's batch, with
    `metadata`: the smallest model file the runtimes open as an instance model."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node('Shape', ['images'], ['shape']),
             helper.make_node('Slice', ['shape', 'zero', 'one'], ['batch'])]
    initializers = [numpy_helper.from_array(np.array([0], np.int64), 'zero'),
                    numpy_helper.from_array(np.array([1], np.int64), 'one')]
    graph_outputs = []
    for name, array in zip(('num_dets', 'boxes', 'scores', 'labels', 'masks'), outputs):
        initializers += [numpy_helper.from_array(array, f'{name}_value'),
                         numpy_helper.from_array(np.ones(array.ndim - 1, np.int64),
                                                 f'{name}_ones')]
        nodes += [helper.make_node('Concat', ['batch', f'{name}_ones'], [f'{name}_repeats'],
                                   axis=0),
                  helper.make_node('Tile', [f'{name}_value', f'{name}_repeats'], [name])]
        elem = TensorProto.INT32 if array.dtype == np.int32 else TensorProto.FLOAT
        graph_outputs.append(helper.make_tensor_value_info(name, elem,
                                                           ['B', *array.shape[1:]]))
    graph = helper.make_graph(nodes, 'constant_instance', [helper.make_tensor_value_info(
        'images', TensorProto.FLOAT, ['B', 3, SIZE, SIZE])], graph_outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
    model.ir_version = 8
    for key, value in metadata.to_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


class Done:
    def __init__(self, result):
        self.returncode, self.stdout = result.exit_code, result.stdout
        self.stderr = result.stderr + (repr(result.exception) if result.exception else '')


def run_cli(*args):
    """The command line in this process (a subprocess would import torch again: 10-30 s on a
    busy machine)."""
    from click.testing import CliRunner

    from detdeploy.cli import cli
    return Done(CliRunner().invoke(cli, [str(arg) for arg in args]))


@pytest.fixture(scope='module')
def instance_file(tmp_path_factory, coco):
    """Frame 'box' model returning the first image's outputs for any image."""
    config = FRAMES['box']
    return constant_onnx(tmp_path_factory.mktemp('instance_onnx') / 'instance.onnx',
                         image_outputs(coco, sorted(coco.getImgIds())[0], config),
                         instance_metadata(config))


def test_infer_writes_rle_that_pycocotools_reads_back_and_draws_masks(shapes, coco,
                                                                      instance_file, tmp_path):
    from pycocotools import mask as mask_utils

    from detdeploy.runtimes.open import open_model_file
    first = shapes / 'val' / coco.imgs[sorted(coco.getImgIds())[0]]['file_name']
    out = tmp_path / 'out'
    done = run_cli('infer', instance_file, first, '--out', out, '--show-thr', '0.3')
    assert done.returncode == 0, done.stderr
    rows = json.loads((out / 'coco_results.json').read_text())
    expected, _ = next(detect(open_model_file(instance_file, 'ort'), [first]))
    assert len(rows) == len(expected) > 0
    for row, mask in zip(rows, expected.masks):
        assert isinstance(row['segmentation']['counts'], str)
        assert np.array_equal(mask_utils.decode(row['segmentation']).astype(bool), mask)
    per_image = json.loads((out / f'{first.stem}.json').read_text())['detections']
    assert [d['segmentation'] for d in per_image] == [r['segmentation'] for r in rows]

    # the PNG: the boxes-only drawing plus the masks, tinted, and nothing else changed
    from dataclasses import replace

    from detdeploy.inference.draw import draw_detections
    drawn = np.asarray(Image.open(out / f'{first.stem}.png').convert('RGB')).astype(int)
    original = np.asarray(Image.open(first).convert('RGB'))
    shown = expected.above(0.3)
    assert len(shown) and shown.masks.any()
    boxes_only = np.asarray(draw_detections(original, replace(shown, masks=None))).astype(int)
    tinted = np.abs(drawn - boxes_only).sum(2) > 0
    inside = shown.masks.any(0)
    decorated = np.abs(boxes_only - original.astype(int)).sum(2) > 0   # outlines, labels
    assert not tinted[~inside].any()
    assert tinted[inside & ~decorated].mean() > 0.99


def test_eval_cli_reports_segm_next_to_bbox(shapes, instance_file, tmp_path):
    report = tmp_path / 'eval.json'
    done = run_cli('eval', instance_file, '--ann', shapes / 'annotations/instances_val.json',
                   '--images', shapes / 'val', '--json', report)
    assert done.returncode == 0, done.stderr
    assert 'ort bbox' in done.stdout and 'ort segm' in done.stdout
    saved = json.loads(report.read_text())['results'][0]
    assert set(saved['segm_metrics']) == set(METRIC_NAMES)
    assert 0 < saved['segm_metrics']['AP'] < 1


def test_bench_reports_mask_paste_stage(instance_file, tmp_path):
    report = tmp_path / 'bench.json'
    done = run_cli('bench', instance_file, '--warmup', '0', '--iters', '2', '--json', report)
    assert done.returncode == 0, done.stderr
    assert 'mask paste (host, within postprocess)' in done.stdout
    config = json.loads(report.read_text())['configs'][0]
    assert len(config['samples_ms']['mask_paste']) == 2
    assert all(p <= q for p, q in zip(config['samples_ms']['mask_paste'],
                                      config['samples_ms']['postprocess']))


# ---- parity ----------------------------------------------------------------------------------

class FixedInstanceDetector(torch.nn.Module):
    """A PyTorch 'instance model' whose outputs are fixed arrays, through the `Detector`
    methods parity uses."""
    family, task = 'fixed', 'instance'

    def __init__(self, outputs, config: MaskConfig):
        super().__init__()
        self.outputs = [torch.from_numpy(a) for a in outputs]
        self.mask_config = config

    def predict_outputs(self, images, nms, nms_mode='onnx'):
        return tuple(a.repeat(len(images), *([1] * (a.ndim - 1))) for a in self.outputs)


class ArrayBackend(Backend):
    name = 'fake'

    def __init__(self, outputs, metadata):
        self.outputs, self.metadata = outputs, metadata

    def describe(self):
        return {'providers': []}

    def _run(self, batch):
        return [np.repeat(a, len(batch), 0) for a in self.outputs]


@pytest.mark.parametrize('frame', ['box', 'input'])
def test_parity_fails_on_perturbed_mask_probabilities(coco, frame, tmp_path):
    from detdeploy.commands.parity import format_report
    from detdeploy.models.base import ModelSpec
    from detdeploy.models.checkpoint import LoadedDetector
    from detdeploy.verification.parity import ParityOptions, run_parity, write_report
    config = FRAMES[frame]
    outputs = image_outputs(coco, sorted(coco.getImgIds())[1], config)
    metadata = instance_metadata(config, arch='fixed-instance')
    spec = ModelSpec('fixed-instance', FixedInstanceDetector, {},
                     PreprocessConfig(input_size=(SIZE, SIZE)), {'deploy': metadata.nms},
                     SHAPE_CLASSES)
    detector = LoadedDetector(FixedInstanceDetector(outputs, config), spec, SHAPE_CLASSES,
                              'synthetic')
    images = [(f'image_{i}', np.full((SIZE, SIZE + 16 * i, 3), 90, np.uint8)) for i in range(2)]

    def check(masks):
        backend = ArrayBackend((*outputs[:4], masks), metadata)
        return run_parity('fixture.onnx', backend, detector, images, ParityOptions())

    # a float32 backend's difference: logits off by 2e-3 (fp32 preset: 1.8e-3 measured)
    logits = np.log(outputs[4]) - np.log1p(-outputs[4])
    same = check((1 / (1 + np.exp(-(logits + 2e-3)))).astype(np.float32))
    assert same.passed, same.failures
    assert all(m.min_mask_iou > 0.97 and m.max_mask_prob_error < 1e-3 for m in same.images)

    perturbed = outputs[4].copy()
    perturbed[0, 0] = 1 - perturbed[0, 0]      # one detection's mask turned inside out
    report = check(perturbed)
    assert not report.passed
    assert any(f.startswith('masks differ on 2 of 2 images') for f in report.failures)
    assert not any(f.startswith('detections differ') for f in report.failures)
    assert all(m.failed_masks == 1 and m.max_mask_prob_error > 0.2 for m in report.images)
    text = '\n'.join(format_report(report))
    assert 'masks of matched detections' in text and 'FAIL: masks differ' in text
    write_report(report, tmp_path / 'parity.json')
    saved = json.loads((tmp_path / 'parity.json').read_text())
    assert saved['verdict'] == 'FAIL' and saved['images'][0]['failed_masks'] == 1
    assert saved['images'][0]['min_mask_iou'] < 0.9


def test_compare_masks_excuses_a_few_probabilities_near_the_contour_only():
    from detdeploy.verification.compare import TOLERANCE_PRESETS, compare_masks
    tol = TOLERANCE_PRESETS['fp32']
    rng = np.random.default_rng(0)
    want = rng.uniform(0, 1, (28, 28)).astype(np.float32)
    mask = np.zeros((50, 50), bool)
    mask[10:30, 10:30] = True
    few, many = want.copy(), want.copy()
    few.flat[:7] += 0.02                     # 0.9 % of the probabilities
    many.flat[:40] += 0.02                   # 5 %
    assert compare_masks(few, want, mask, mask, tol)[2]
    assert not compare_masks(many, want, mask, mask, tol)[2]
    shrunk = mask.copy()
    shrunk[10:13] = False                    # IoU 0.85
    iou, error, passed = compare_masks(want, want, shrunk, mask, tol)
    assert iou == pytest.approx(0.85) and error == 0 and not passed
