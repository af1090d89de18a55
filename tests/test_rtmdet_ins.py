"""RTMDet-Ins tiny..x: MMDetection's keys and strict checkpoints, agreement with numbers
MMDetection computed (tests/data/mmdet_rtmdet_ins_tiny_reference.npz, written by
tools/make_mmdet_reference_rtmdet_ins.py): raw head outputs, detections, stride-8 mask
probabilities and masks at the original resolution; the graph with masks inside in ONNX Runtime
(dynamic batch and shape, no cross-talk), and the NMS modes it refuses.

Small inputs and synthetic weights; the network is exported once.
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from conftest import DATA_DIR, SPEC_DIR, calibration_images, randomize_detector
from detdeploy.cli import main
from detdeploy.core.errors import DetdeployError
from detdeploy.core.masks import MaskConfig
from detdeploy.export.exporter import ExportOptions, export_onnx
from detdeploy.models import get_spec, load_detector, save_checkpoint
from detdeploy.models.rtmdet_ins import DEPLOY_NMS, EVAL_NMS
from detdeploy.runtimes.onnxruntime_backend import OnnxRuntimeBackend
from detdeploy.runtimes.torch_backend import TorchBackend

SIZES = ('tiny', 's', 'm', 'l', 'x')
REFERENCE_HW = (128, 160)
EXPORT_HW = (128, 160)
REFERENCE = DATA_DIR / 'mmdet_rtmdet_ins_tiny_reference.npz'


def spec_keys(file_name: str) -> dict[str, tuple]:
    rows = [line.rstrip('\n').split('\t') for line in (SPEC_DIR / file_name).open()
            if not line.startswith('#')]
    return {key: (tuple(json.loads(shape.replace('(', '[').replace(',)', ']').replace(')', ']'))),
                  dtype) for key, shape, dtype in rows}


def synthetic_model(num_classes: int | None = None):
    """The reference script's weights: `randomize_detector` with seed 0."""
    torch.manual_seed(0)
    return randomize_detector(get_spec('rtmdet-ins-tiny').build(num_classes), seed=0)


def images(seed: int, count: int, height: int, width: int) -> torch.Tensor:
    return calibration_images(seed=seed, count=count, size=max(height, width))[
        :, :, :height, :width].contiguous()


def mask_iou(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per mask [K, H, W] bool; two empty masks agree (1)."""
    inter = (got & want).sum((1, 2))
    union = (got | want).sum((1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def matched_rows(got, want, box_atol=0.02, score_atol=5e-4) -> list[tuple[int, int]]:
    """Rows of two runtimes' (boxes, scores, labels) of one image that are the same detection:
    equal label, boxes within `box_atol` px, scores within `score_atol` (near-equal scores may
    come out in either order); each row of `want` used once, the closest score first."""
    pairs, unused = [], set(range(len(want[1])))
    for row, (box, score, label) in enumerate(zip(*got)):
        options = [j for j in unused
                   if want[2][j] == label and abs(want[1][j] - score) <= score_atol
                   and np.allclose(want[0][j], box, atol=box_atol, rtol=0)]
        if options:
            best = min(options, key=lambda j: abs(want[1][j] - score))
            unused.remove(best)
            pairs.append((row, best))
    return pairs


def masks_at_original_size(probabilities: torch.Tensor, stride: int,
                           scale_factor: tuple[float, float], original_hw: tuple[int, int]
                           ) -> np.ndarray:
    """MMDetection's `_bbox_mask_post_process` (rescale=True) on our probabilities [K, h, w]:
    back to logits, bilinear upsampling by the stride, bilinear resizing by 1 / scale_factor
    (sizes rounded up), cropped to the original image, logit > 0 (probability > 0.5)."""
    p = probabilities.double().clamp(1e-30, 1 - 1e-16)
    logits = (p.log() - (-p).log1p())[None]
    logits = F.interpolate(logits, scale_factor=stride, mode='bilinear')
    size = [math.ceil(logits.shape[-2] / scale_factor[0]),
            math.ceil(logits.shape[-1] / scale_factor[1])]    # MMDetection's (w, h) order
    logits = F.interpolate(logits, size=size, mode='bilinear', align_corners=False)
    return (logits[0, :, :original_hw[0], :original_hw[1]] > 0).numpy()


@pytest.mark.parametrize('size', SIZES)
def test_state_dict_keys_shapes_and_dtypes_are_mmdetections(size):
    with torch.device('meta'):           # no memory, no init: x builds in a second
        model = get_spec(f'rtmdet-ins-{size}').build()
    ours = {key: (tuple(value.shape), str(value.dtype).removeprefix('torch.'))
            for key, value in model.state_dict().items()}
    assert ours == spec_keys(f'keys_rtmdet_ins_{size}.txt')
    # MMDetection appends cls_convs to reg_convs: one module list under two names
    assert model.bbox_head.reg_convs is model.bbox_head.cls_convs


def test_checkpoint_round_trip_is_strict_and_keeps_weights(tmp_path):
    spec = get_spec('rtmdet-ins-tiny')
    torch.manual_seed(1)
    model = spec.build(num_classes=3)
    path = tmp_path / 'three.pth'
    save_checkpoint(path, model, spec, ('a', 'b', 'c'))
    loaded = load_detector('rtmdet-ins-tiny', path)
    assert loaded.model.num_classes == 3 and loaded.class_names == ('a', 'b', 'c')
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    assert loaded.model.task == 'instance'
    assert loaded.model.mask_config == MaskConfig('input', stride=8, threshold=0.5)
    metadata = loaded.metadata(DEPLOY_NMS, 'onnx')
    assert metadata.mask == MaskConfig('input', stride=8, threshold=0.5)
    assert (DEPLOY_NMS.score_thr, DEPLOY_NMS.pre_top_k, DEPLOY_NMS.iou_thr,
            DEPLOY_NMS.max_det) == (0.05, 1000, 0.6, 100)


# --- agreement with MMDetection 3.3.0 ---------------------------------------------------------

@pytest.fixture(scope='module')
def reference_run(one_torch_thread):
    reference = dict(np.load(REFERENCE))
    model = synthetic_model()
    inputs = images(7, 2, *REFERENCE_HW)
    resized_width = round(float(reference['image1/scale_factor'][0])
                          * int(reference['image1/ori_shape'][1]))
    inputs[1, :, :, resized_width:] = 0          # as the reference script pads image 1
    with torch.no_grad():
        raw = model(inputs)
        outputs = model.postprocess(raw, REFERENCE_HW, EVAL_NMS, 'onnx')
    return reference, model, raw, outputs


def test_raw_head_outputs_within_1e4(reference_run):
    reference, model, raw, _ = reference_run
    for name, tensor in model.named_raw_outputs(raw).items():
        assert list(tensor.shape) == reference[f'{name}/shape'].tolist(), name
        flat = tensor.flatten()
        np.testing.assert_allclose(flat[reference[f'{name}/index']].numpy(),
                                   reference[f'{name}/values'], atol=1e-4, rtol=0, err_msg=name)
        assert flat.double().abs().sum().item() == pytest.approx(
            float(reference[f'{name}/abs_sum']), rel=1e-5)


def test_same_detections_as_mmdetection(reference_run):
    reference, _, _, (num_dets, boxes, scores, labels, _) = reference_run
    for image in range(2):
        count = int(num_dets[image, 0])
        assert count == len(reference[f'image{image}/scores']) == 100
        assert labels[image, :count].tolist() == reference[f'image{image}/labels'].tolist()
        np.testing.assert_allclose(scores[image, :count].numpy(),
                                   reference[f'image{image}/scores'], atol=1e-5, rtol=0)
        np.testing.assert_allclose(boxes[image, :count].numpy(),
                                   reference[f'image{image}/boxes'], atol=1e-2, rtol=0)
        # MMDetection's rescaled boxes: ours divided by the scale factor (w, h)
        scale_w, scale_h = reference[f'image{image}/scale_factor']
        rescaled = boxes[image, :count].numpy() / np.array([scale_w, scale_h] * 2)
        np.testing.assert_allclose(rescaled, reference[f'image{image}/boxes_rescaled'],
                                   atol=1e-2, rtol=0)


def test_stride_8_mask_probabilities_within_1e4(reference_run):
    reference, _, _, outputs = reference_run
    masks = outputs[4]
    assert masks.shape == (2, 100, REFERENCE_HW[0] // 8, REFERENCE_HW[1] // 8)
    for image in range(2):
        want = reference[f'image{image}/probabilities']        # the first 25 detections
        np.testing.assert_allclose(masks[image, :len(want)].numpy(), want, atol=1e-4, rtol=0)


def test_masks_at_the_original_resolution_agree_with_mmdetection(reference_run):
    """Mask IoU >= 0.99 for every detection, and the synthetic masks are not trivial."""
    reference, _, _, (num_dets, _, _, _, masks) = reference_run
    areas = []
    for image in range(2):
        count = int(num_dets[image, 0])
        shape = tuple(reference[f'image{image}/masks_shape'])
        want = np.unpackbits(reference[f'image{image}/masks_packed'],
                             count=int(np.prod(shape))).reshape(shape).astype(bool)
        got = masks_at_original_size(masks[image, :count], 8,
                                     tuple(reference[f'image{image}/scale_factor']),
                                     tuple(reference[f'image{image}/ori_shape']))
        assert got.shape == want.shape
        assert mask_iou(got, want).min() >= 0.99
        areas.append(want.reshape(count, -1).mean(1))
    areas = np.concatenate(areas)
    assert ((areas > 0.02) & (areas < 0.98)).mean() > 0.5      # most masks have edges


def test_saved_checkpoint_loaded_strictly_by_mmdetection_predicted_the_same():
    """Recorded by the reference script: mmengine's load_checkpoint(strict=True) of a file from
    `save_checkpoint`, and identical boxes and masks to the weights copied in memory."""
    assert bool(np.load(REFERENCE)['saved_checkpoint_loads_strictly_and_predicts_the_same'])


# --- NMS modes ----------------------------------------------------------------------------------

def _run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize('nms_mode, says', [
    ('trt', 'EfficientNMS_TRT does not say which candidates it kept'),
    ('none', 'not available for instance models')])
def test_trt_and_none_modes_are_refused_in_one_line(tmp_path, capsys, nms_mode, says):
    detector = load_detector('rtmdet-ins-tiny')
    with pytest.raises(DetdeployError, match=says):
        export_onnx(detector, tmp_path / 'x.onnx', ExportOptions(nms_mode=nms_mode))
    code, out, err = _run_cli(capsys, 'export', '--model', 'rtmdet-ins-tiny', '--nms', nms_mode,
                              '-o', tmp_path / 'x.onnx')
    # (a note that the weights are random comes first: no --checkpoint)
    error = err.strip().splitlines()[-1]
    assert code == 2 and error.startswith('error: --nms') and 'use --nms onnx' in error, err
    assert not (tmp_path / 'x.onnx').exists()


# --- the graph in ONNX Runtime ------------------------------------------------------------------

@pytest.fixture(scope='module')
def exported(tmp_path_factory, one_torch_thread):
    """rtmdet-ins-tiny (synthetic weights) exported once, not simplified: --nms onnx, deploy
    preset, dynamic batch, 128x160. (A dynamic shape too costs ~50 % more tracing time, about
    20 s here: checked by hand, see the issue note.)"""
    folder = tmp_path_factory.mktemp('rtmdet_ins')
    spec = get_spec('rtmdet-ins-tiny')
    checkpoint = folder / 'ins.pth'
    save_checkpoint(checkpoint, synthetic_model(), spec, spec.class_names)
    detector = load_detector('rtmdet-ins-tiny', checkpoint)
    path = folder / 'ins.onnx'
    report = export_onnx(detector, path, ExportOptions(
        nms_mode='onnx', nms=DEPLOY_NMS, dynamic_batch=True, input_hw=EXPORT_HW,
        simplify=False))
    return detector, path, report


def test_export_is_one_checked_graph_whose_metadata_frames_the_masks(exported):
    _, path, report = exported
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert {'NonMaxSuppression', 'TopK', 'MatMul', 'Sigmoid'} <= ops and not ops & {'Loop', 'If'}
    props = {prop.key: prop.value for prop in model.metadata_props}
    assert props['task'] == 'instance'
    assert json.loads(props['mask']) == {'frame': 'input', 'stride': 8, 'threshold': 0.5}
    names = [name for name, _ in report.outputs]
    assert names == ['num_dets', 'boxes', 'scores', 'labels', 'masks']
    assert dict(report.outputs)['masks'] == ['batch', 100, 16, 20]


def test_onnx_runtime_masks_match_pytorch_on_a_mixed_batch_without_cross_talk(exported):
    """Batch of 2: the reference script's two images, the second 128x77 padded with 0. ONNX
    Runtime's detections and masks equal PyTorch's (masks within 1e-4, padding rows 0), and
    each image's outputs equal its batch-1 run. (Mask logits here are within +-10; on images
    where untrained kernels make them reach hundreds, float32 rounding moves probabilities
    more.)"""
    detector, path, _ = exported
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    batch = images(7, 2, *EXPORT_HW)
    batch[1, :, :, 77:] = 0
    with torch.no_grad():
        want = [t.numpy() for t in detector.model.predict_outputs(batch, DEPLOY_NMS)]
    got = session.run(None, {'images': batch.numpy()})
    assert got[4].shape == (2, 100, 16, 20)
    singles = [session.run(None, {'images': batch[i:i + 1].numpy()}) for i in range(2)]
    for image in range(2):
        count = int(got[0][image, 0])
        assert count == int(want[0][image, 0]) > 0
        pairs = matched_rows([o[image, :count] for o in got[1:4]],
                             [w[image, :count] for w in want[1:4]])
        assert len(pairs) == count          # near-tied scores may swap rows, nothing else
        for row, want_row in pairs:
            np.testing.assert_allclose(got[4][image, row], want[4][image, want_row], atol=1e-4,
                                       rtol=0)
        assert not got[4][image, count:].any()
        single = singles[image]
        assert int(single[0][0, 0]) == count
        pairs = matched_rows([o[image, :count] for o in got[1:4]],
                             [o[0, :count] for o in single[1:4]], box_atol=1e-3, score_atol=1e-5)
        assert len(pairs) == count
        for row, single_row in pairs:
            np.testing.assert_allclose(got[4][image, row], single[4][0, single_row], atol=1e-5,
                                       rtol=0)


def test_backends_return_the_five_instance_outputs(exported):
    detector, path, _ = exported
    batch = images(3, 1, *EXPORT_HW).numpy()
    from_file = OnnxRuntimeBackend(path).run(batch)
    from_torch = TorchBackend(detector).run(batch)
    for outputs in (from_file, from_torch):
        assert [o.shape for o in outputs] == [(1, 1), (1, 100, 4), (1, 100), (1, 100),
                                              (1, 100, 16, 20)]
    np.testing.assert_allclose(from_file[4], from_torch[4], atol=1e-4, rtol=0)



def test_parity_catches_a_perturbed_mask_branch_weight(exported):
    """`parity` of the exported file against its own weights passes; against weights where one
    bias of the prototype projection (the mask branch only: boxes and scores do not read it)
    moved by 1, it fails on the masks, naming them (mask IoU and probability difference), and
    not on the detections."""
    import copy

    from detdeploy.models.synthetic_weights import make_image
    from detdeploy.runtimes.open import open_model_file
    from detdeploy.verification.parity import run_parity

    detector, path, _ = exported
    images = [('a', make_image(*EXPORT_HW, 700)), ('b', make_image(96, 200, 701))]
    backend = open_model_file(path, check_signature=False)
    same = run_parity(path, backend, detector, images)
    assert same.passed, same.failures
    assert all(m.matched > 5 and m.min_mask_iou > 0.95 for m in same.images)

    changed = copy.deepcopy(detector)
    with torch.no_grad():
        changed.model.bbox_head.mask_head.projection.bias[0] += 1.0
    report = run_parity(path, backend, changed, images)
    assert not report.passed
    assert not any(f.startswith('detections differ') for f in report.failures), report.failures
    [masks] = [f for f in report.failures if f.startswith('masks differ')]
    assert 'lowest mask IoU' in masks and 'largest probability difference' in masks
    assert any(m.failed_masks for m in report.images)
    assert any('mask_feat' in f for f in report.failures)       # the raw prototypes too
