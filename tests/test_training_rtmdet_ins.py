"""Training RTMDet-Ins: its loss against MMDetection 3.3.0's `loss_by_feat` on stored tensors,
the dice loss by hand, masks carried through the augmentations, and initialisation from RTMDet
weights.

tests/data/training_reference_rtmdet_ins.json is written by
tools/make_training_reference_rtmdet_ins.py (MMDetection is never imported here).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATA_DIR, load_bundled_file, rtmdet_ins_reference_images
from detdeploy.core.preprocessing import PreprocessConfig
from detdeploy.models.losses import dice_loss
from detdeploy.models.rtmdet_ins import RawOutputs, dynamic_mask_logits
from detdeploy.models.rtmdet_ins.loss import RTMDetInsLoss
from detdeploy.training.data import AugmentConfig, CocoDetectionDataset, collate, read_coco

LOSS_RTOL = 1e-4


@pytest.fixture(scope='module')
def reference():
    return json.loads((DATA_DIR / 'training_reference_rtmdet_ins.json').read_text())


def _tensor(entry) -> torch.Tensor:
    return torch.tensor(entry['values'], dtype=torch.float32).reshape(entry['shape'])


def _unpack_masks(entry, size: int) -> torch.Tensor:
    bits = np.unpackbits(np.frombuffer(bytes.fromhex(entry['bits']), np.uint8))
    count = entry['count']
    return torch.from_numpy(bits[:count * size * size].reshape(count, size, size).astype(bool))


def reference_inputs(reference, case):
    size, num_params = reference['size'], reference['num_params']
    cls_scores = tuple(_tensor(level) for level in case['cls_scores'])
    bbox_preds = tuple(_tensor(level) for level in case['bbox_preds'])
    kernels = [torch.zeros(s.shape[0], num_params, *s.shape[-2:]) for s in cls_scores]
    level_sizes = [s.shape[-2] * s.shape[-1] for s in cls_scores]
    for entry in case['kernels']:
        point, level = entry['point'], 0
        while point >= level_sizes[level]:
            point -= level_sizes[level]
            level += 1
        width = cls_scores[level].shape[-1]
        kernels[level][entry['image'], :, point // width, point % width] = torch.tensor(
            entry['values'])
    raw = RawOutputs(cls_scores, bbox_preds, tuple(kernels), _tensor(case['mask_feat']))
    boxes = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in case['gt_boxes']]
    labels = [torch.tensor(lab, dtype=torch.long) for lab in case['gt_labels']]
    masks = [_unpack_masks(entry, size) for entry in case['gt_masks']]
    return raw, boxes, labels, masks


# --- against MMDetection 3.3.0 -----------------------------------------------------------------

def test_reference_is_mmdet_3_3_0(reference):
    assert reference['mmdet_version'] == '3.3.0'
    assert [c['name'] for c in reference['cases']] == ['one_empty', 'both']
    # the cases exercise an image without boxes, positives in both images, an empty gt mask
    assert reference['cases'][0]['positives'][1] == 0
    assert min(reference['cases'][1]['positives']) > 0
    _, _, _, masks = reference_inputs(reference, reference['cases'][1])
    assert (masks[1].flatten(1).sum(1) == 0).any()


@pytest.mark.parametrize('index', range(2))
def test_rtmdet_ins_loss_matches_mmdet_loss_by_feat(reference, index):
    case = reference['cases'][index]
    raw, boxes, labels, masks = reference_inputs(reference, case)
    with torch.no_grad():
        losses = RTMDetInsLoss(tuple(reference['strides']))(raw, boxes, labels, masks)
    assert set(losses) == {'loss_cls', 'loss_bbox', 'loss_mask'}
    for key in ('loss_cls', 'loss_bbox', 'loss_mask'):
        assert losses[key].item() == pytest.approx(case[key], rel=LOSS_RTOL), key
    positives = [int((a.gt_index >= 0).sum()) for a in RTMDetInsLoss(
        tuple(reference['strides'])).targets(raw, boxes, labels).assignments]
    assert positives == case['positives']


# --- by hand ------------------------------------------------------------------------------------

def test_dice_loss_by_hand():
    target = torch.zeros(1, 4, 4)
    target[0, 1:3, 1:3] = 1
    # a (near) perfect prediction: probabilities ~1 inside, ~0 outside
    perfect = (target * 2 - 1) * 30
    assert dice_loss(perfect, target).item() == pytest.approx(1 - 8 / (8 + 1e-5), abs=1e-6)
    # logits 0 everywhere: p = 0.5; 2 * (4 * 0.5) / (16 * 0.25 + 4 + 2 eps)
    half = torch.zeros(1, 4, 4)
    assert dice_loss(half, target).item() == pytest.approx(1 - 4 / (8 + 1e-5), rel=1e-6)
    # an empty target pushes every probability to 0: loss 1 unless the prediction is empty
    assert dice_loss(half, torch.zeros(1, 4, 4)).item() == pytest.approx(1.0, rel=1e-5)


def test_mask_logits_equal_grouped_convolutions_written_out():
    """The model's dynamic 1x1 convs (which the loss uses) as MMDetection writes them: a
    grouped conv2d over all instances."""
    generator = torch.Generator().manual_seed(0)
    feat = torch.randn(8, 6, 5, generator=generator)
    kernels = torch.randn(3, 169, generator=generator) * 0.5
    points = torch.tensor([[8.0, 16.0], [24.0, 0.0], [32.0, 32.0]])
    strides = torch.tensor([8.0, 16.0, 32.0])
    got = dynamic_mask_logits(feat[None], kernels[None], points[None], strides[None], 8,
                              [80, 64, 8], [8, 8, 1])[0]
    ys, xs = torch.meshgrid(torch.arange(6) * 8.0, torch.arange(5) * 8.0, indexing='ij')
    grid = torch.stack([xs.reshape(-1), ys.reshape(-1)], 1)
    relative = ((points[:, None] - grid[None]).permute(0, 2, 1)
                / (strides[:, None, None] * 8)).reshape(3, 2, 6, 5)
    x = torch.cat([relative, feat[None].repeat(3, 1, 1, 1)], 1).reshape(1, -1, 6, 5)
    w0, w1, w2, b0, b1, b2 = torch.split(kernels, [80, 64, 8, 8, 8, 1], dim=1)
    x = torch.relu(torch.nn.functional.conv2d(x, w0.reshape(24, 10, 1, 1), b0.reshape(24),
                                              groups=3))
    x = torch.relu(torch.nn.functional.conv2d(x, w1.reshape(24, 8, 1, 1), b1.reshape(24),
                                              groups=3))
    want = torch.nn.functional.conv2d(x, w2.reshape(3, 8, 1, 1), b2.reshape(3), groups=3)
    torch.testing.assert_close(got, want.reshape(3, 6, 5), rtol=1e-5, atol=1e-5)


def test_no_positive_gives_zero_mask_loss_attached_to_the_mask_branch(reference):
    raw, _, _, _ = reference_inputs(reference, reference['cases'][0])
    raw = RawOutputs(raw.cls_scores, raw.bbox_preds,
              tuple(k.clone().requires_grad_() for k in raw.kernel_preds),
              raw.mask_feat.clone().requires_grad_())
    empty = [torch.zeros(0, 4)] * 2
    losses = RTMDetInsLoss((8, 16, 32))(raw, empty, [torch.zeros(0, dtype=torch.long)] * 2,
                                        [torch.zeros(0, 64, 64, dtype=torch.bool)] * 2)
    assert losses['loss_mask'].item() == 0.0
    losses['loss_mask'].backward()
    assert raw.mask_feat.grad is not None and raw.kernel_preds[0].grad is not None


# --- masks through the augmentations --------------------------------------------------------------

COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0))


def _coco_with_masks(root: Path, count: int = 6, size: int = 96) -> Path:
    """Images of solid coloured ellipses and rectangles on black, one colour per class, some
    overlapping (the later one covers), with their visible masks as RLE."""
    from PIL import Image, ImageDraw
    from pycocotools import mask as mask_utils
    rng = np.random.default_rng(5)
    (root / 'images').mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        canvas = Image.new('RGB', (size + 16 * index, size), (0, 0, 0))   # varied sizes
        width = canvas.width
        shapes = []
        for label in rng.permutation(4)[:3]:
            x0, y0 = rng.uniform(0, width - 30), rng.uniform(0, size - 30)
            x1, y1 = x0 + rng.uniform(14, 30), y0 + rng.uniform(14, 30)
            shapes.append((int(label), [round(v) for v in (x0, y0, x1, y1)]))
        layers = []
        for label, box in shapes:
            layer = Image.new('L', canvas.size, 0)
            draw_on = (ImageDraw.Draw(layer), ImageDraw.Draw(canvas))
            for draw, fill in zip(draw_on, (1, COLOURS[label])):
                (draw.ellipse if label % 2 else draw.rectangle)(box, fill=fill)
            layers.append(np.asarray(layer, bool))
        canvas.save(root / 'images' / f'{index}.png')
        images.append({'id': index + 1, 'file_name': f'{index}.png', 'height': size,
                       'width': width})
        for j, (label, box) in enumerate(shapes):
            visible = layers[j] & ~np.logical_or.reduce(layers[j + 1:] or [layers[j] & False])
            if not visible.any():
                continue
            ys, xs = np.nonzero(visible)
            rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
            annotations.append({
                'id': len(annotations) + 1, 'image_id': index + 1, 'category_id': label + 1,
                'bbox': [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
                         float(ys.max() + 1 - ys.min())],
                'area': float(visible.sum()), 'iscrowd': 0,
                'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()}})
    ann = root / 'instances.json'
    ann.write_text(json.dumps({'images': images, 'annotations': annotations, 'categories': [
        {'id': i + 1, 'name': f'c{i}'} for i in range(4)]}))
    return ann


def _eroded(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 4 neighbours are in the mask too."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[[0, -1]] = False
    inner[:, [0, -1]] = False
    return inner


@pytest.mark.parametrize('mosaic, mixup', [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)])
def test_augmented_masks_stay_aligned_with_boxes_and_pixels(tmp_path, mosaic, mixup):
    ann = _coco_with_masks(tmp_path)
    data = read_coco(ann, tmp_path / 'images', with_masks=True)
    assert [len(m) for m in data.masks] == [len(b) for b in data.boxes]
    preprocess = PreprocessConfig(input_size=(80, 80), mean=(0, 0, 0), std=(1, 1, 1),
                                  channel_order='rgb', pad_value=0)
    augment = AugmentConfig(img_size=80, scale_range=(0.5, 2.0), flip_prob=0.5,
                            mosaic_prob=mosaic, mixup_prob=mixup)
    dataset = CocoDetectionDataset(data, augment, preprocess, seed=0)
    checked = 0
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            image, boxes, labels, masks = dataset[index]
            assert masks.dtype == torch.bool and masks.shape == (len(boxes), 80, 80)
            pixels = image.permute(1, 2, 0).numpy()
            for box, label, mask in zip(boxes.numpy(), labels.tolist(), masks.numpy()):
                if mask.sum() < 12:
                    continue
                ys, xs = np.nonzero(mask)
                # the mask lies in its box, up to the rounding of two nearest-neighbour
                # resizes (mosaic's fit, then the random scale of up to 2x)
                assert xs.min() >= box[0] - 2 and xs.max() + 1 <= box[2] + 2
                assert ys.min() >= box[1] - 2 and ys.max() + 1 <= box[3] + 2
                if mixup:
                    continue        # blended pixels: only the geometry is checked
                # and its interior on pixels of its object's colour (the antialiased resize
                # blends up to two pixels at the edges when it shrinks 4x)
                interior = _eroded(_eroded(mask))
                if interior.sum() < 16:
                    continue
                colour = np.asarray(COLOURS[label], np.float32)
                close = np.abs(pixels[interior] - colour).max(1) < 60
                assert close.mean() > 0.95, (epoch, index, label, close.mean())
                checked += 1
    assert checked > 20 or mixup


def test_collate_keeps_masks_per_image(tmp_path):
    ann = _coco_with_masks(tmp_path, count=2)
    data = read_coco(ann, tmp_path / 'images', with_masks=True)
    dataset = CocoDetectionDataset(data, AugmentConfig(img_size=64), PreprocessConfig(
        input_size=(64, 64)))
    images, boxes, labels, masks = collate([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 64, 64) and len(masks) == 2
    assert [len(m) for m in masks] == [len(b) for b in boxes]
    # without masks the samples are the detection ones
    plain = CocoDetectionDataset(read_coco(ann, tmp_path / 'images'), AugmentConfig(img_size=64),
                                 PreprocessConfig(input_size=(64, 64)))
    assert len(plain[0]) == 3 and len(collate([plain[0], plain[1]])) == 3


def test_read_coco_with_masks_refuses_a_missing_segmentation(tmp_path):
    from detdeploy.core.errors import DetdeployError
    ann = _coco_with_masks(tmp_path, count=1)
    coco = json.loads(ann.read_text())
    del coco['annotations'][0]['segmentation']
    ann.write_text(json.dumps(coco))
    read_coco(ann, tmp_path / 'images')                  # boxes only: fine
    with pytest.raises(DetdeployError, match=r'annotations\[0\]: no segmentation'):
        read_coco(ann, tmp_path / 'images', with_masks=True)


# --- the trainer ----------------------------------------------------------------------------------

SIZE = 64


@pytest.fixture(scope='module')
def shapes(tmp_path_factory) -> Path:
    from detdeploy.training.shapes import make_shapes_dataset
    out = tmp_path_factory.mktemp('shapes_ins')
    make_shapes_dataset(out, train=8, val=3, size=SIZE, seed=3)
    return out


def _config(shapes: Path, out: Path, **changes):
    from detdeploy.training.trainer import TrainConfig
    values = dict(model='rtmdet-ins-tiny',
                  train_ann=str(shapes / 'annotations/instances_train.json'),
                  train_images=str(shapes / 'train'), out=str(out), epochs=1, batch=2,
                  img_size=SIZE, lr=0.002, warmup_iters=1, log_interval=1, seed=1,
                  max_iters_per_epoch=1)
    values.update(changes)
    return TrainConfig(**values)


def test_init_from_rtmdet_takes_its_weights_and_leaves_the_mask_branches(tmp_path):
    """RTMDet weights into RTMDet-Ins: backbone, neck, class and box predictors are RTMDet's;
    the tower that RTMDet-Ins shares between classes and boxes (`reg_convs` is `cls_convs`)
    takes RTMDet's box tower; the kernel and prototype branches keep their initialisation."""
    from detdeploy.models import build_model, get_spec, save_checkpoint
    from detdeploy.training.trainer import _load_init
    torch.set_num_threads(1)                     # conftest restores the count after the test
    torch.manual_seed(0)
    rtmdet = build_model('rtmdet-tiny', num_classes=6)
    with torch.no_grad():
        for value in rtmdet.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value))          # tell every tensor apart
    path = tmp_path / 'rtmdet.pth'
    save_checkpoint(path, rtmdet, get_spec('rtmdet-tiny'), tuple('abcdef'))
    source = rtmdet.state_dict()

    torch.manual_seed(1)
    model = build_model('rtmdet-ins-tiny', num_classes=6)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    skipped = _load_init(model, str(path))
    loaded = model.state_dict()
    head = 'bbox_head.'
    for key, value in loaded.items():
        if key.startswith(('backbone.', 'neck.', head + 'rtm_cls.', head + 'rtm_reg.')):
            assert torch.equal(value, source[key]), key
        elif key.startswith((head + 'cls_convs.', head + 'reg_convs.')):
            assert torch.equal(value, source[key.replace('cls_convs', 'reg_convs')]), key
        else:
            assert key.startswith((head + 'kernel_convs.', head + 'rtm_kernel.',
                                   head + 'mask_head.')), key
            assert torch.equal(value, fresh[key]), key
            assert key in skipped
    assert all(k.startswith((head + 'kernel_convs.', head + 'rtm_kernel.', head + 'mask_head.'))
               for k in skipped)


def test_instance_training_steps_validation_checkpoint_and_resume(shapes, tmp_path):
    from detdeploy.models import load_detector
    from detdeploy.training.trainer import LAST, Trainer
    torch.set_num_threads(1)                     # conftest restores the count after the test
    val = dict(val_ann=str(shapes / 'annotations/instances_val.json'),
               val_images=str(shapes / 'val'))
    trainer = Trainer(_config(shapes, tmp_path, **val), show_progress=False)
    assert trainer.instance and trainer.dataset.with_masks
    summary = trainer.fit()
    assert summary['loss_mask'] > 0 and np.isfinite(summary['loss'])
    assert summary['loss'] == pytest.approx(
        summary['loss_cls'] + summary['loss_bbox'] + summary['loss_mask'], rel=1e-5)
    assert {'AP', 'segm_AP', 'segm_AP50'} <= set(summary['val'])
    assert trainer.best_ap == summary['val']['segm_AP']      # best.pth follows segm AP
    detector = load_detector('rtmdet-ins-tiny', tmp_path / LAST)        # strict load
    assert detector.model.mask_config.stride == 8
    resumed = Trainer(_config(shapes, tmp_path, epochs=2), resume=True, show_progress=False)
    assert (resumed.epoch, resumed.iteration) == (1, 1)
    assert resumed.fit()['epoch'] == 2


# --- the bundled rtmdet-ins model ------------------------------------------------------------------

def test_bundled_rtmdet_ins_file_alias_and_card():
    """`rtmdet-ins` without a checkpoint is the shipped rtmdet-ins-tiny shapes model: small fp16,
    safe to load, strict, with its card (its AP is in the README card, measured on 300 images)."""
    from detdeploy.models import load_detector
    from detdeploy.models.bundled import INSTANCE_FILE, bundled_checkpoint, bundled_description
    from detdeploy.training.shapes import SHAPE_CLASSES
    assert bundled_checkpoint('rtmdet-ins') == INSTANCE_FILE
    assert bundled_checkpoint('rtmdet-ins-tiny') is None          # sizes stay architectures
    assert 'rtmdet-ins-tiny' in bundled_description('rtmdet-ins')
    checkpoint = load_bundled_file(INSTANCE_FILE)
    card = checkpoint['meta']['detdeploy_model_card']
    assert card['train_config']['model'] == 'rtmdet-ins-tiny' and card['best_ap'] >= 0.55
    detector = load_detector('rtmdet-ins', INSTANCE_FILE)
    assert detector.spec.name == 'rtmdet-ins-tiny' and detector.class_names == SHAPE_CLASSES
    assert detector.spec.preprocessing.input_size == (256, 256)


def test_validation_masks_are_mmdetections_not_resampled_probabilities():
    """Validation's masks (`training.instance.masks_at_image`) equal MMDetection 3.3.0's own
    original-size masks from the stored stride-8 probabilities (tests/data/
    mmdet_rtmdet_ins_tiny_reference.npz: RTMDet-Ins tiny, 128x160 input of 100x125 and 150x90
    images) pixel for pixel: MMDetection resamples logits. Resampling the probabilities, as
    validation did before, moves contours (by a pixel or more at stride 8; on the bundled model
    it cost 0.1 segm AP) and does not give them."""
    import torch.nn.functional as F

    from detdeploy.core.masks import MaskConfig
    from detdeploy.runtimes.preprocess import ImageMeta
    from detdeploy.training.instance import masks_at_image

    config = MaskConfig('input', stride=8, threshold=0.5)
    ious = []
    for probabilities, expected, original_hw, scale_wh in rtmdet_ins_reference_images():
        resized_hw = (round(original_hw[0] * scale_wh[1]),
                      round(original_hw[1] * scale_wh[0]))
        meta = ImageMeta(original_hw, resized_hw, scale_wh)
        boxes = np.tile([0, 0, original_hw[1], original_hw[0]], (len(probabilities), 1))
        ours = masks_at_image(probabilities, config, boxes.astype(np.float32), meta)
        assert expected.any() and np.array_equal(ours, expected)
        # the former way: probabilities upsampled, cropped to the resized image, resized
        upsampled = F.interpolate(torch.from_numpy(probabilities)[None], scale_factor=8,
                                  mode='bilinear', align_corners=False)
        before = F.interpolate(upsampled[:, :, :resized_hw[0], :resized_hw[1]],
                               size=original_hw, mode='bilinear', align_corners=False)[0] > 0.5
        inter = (before.numpy() & expected).sum((1, 2))
        ious += list(inter / np.maximum((before.numpy() | expected).sum((1, 2)), 1))
    assert min(ious) < 0.99
