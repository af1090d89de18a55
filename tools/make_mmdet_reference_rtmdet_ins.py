"""Write tests/data/mmdet_rtmdet_ins_tiny_reference.npz by running MMDetection's own RTMDet-Ins.

Not part of the package or CI. Needs MMDetection 3.3.0, mmengine and mmcv-lite outside the repo
(see tools/make_mmdet_reference.py):
    PYTHONPATH=/tmp/mmref/site:tests .venv/bin/python tools/make_mmdet_reference_rtmdet_ins.py
mmcv-lite has no compiled ops: mmcv's Python `batched_nms` runs on tools/mmcv_lite_shim.py's port
of its CPU NMS kernel; everything else (RTMDetInsSepBNHead, its candidate selection, the dynamic
convolutions, the mask resampling to the original image) is MMDetection's own code.

Stored (npz, compressed): evenly spaced samples and sums of every raw head output, the final
detections in network-input pixels and rescaled, the mask probabilities at stride 8 of each
image's first `PROBABILITY_ROWS` detections, and every final mask at the original resolution
(np.packbits of the boolean masks).
"""
import sys
import tempfile

import numpy as np
import torch

import mmcv_lite_shim

mmcv_lite_shim.install()

import mmdet  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402

from conftest import DATA_DIR, calibration_images, randomize_detector  # noqa: E402
from detdeploy.models import build_model, get_spec, save_checkpoint  # noqa: E402

HEIGHT, WIDTH = 128, 160
ORIGINAL_HW = ((100, 125), (150, 90))
"""Image 0 is resized by 1.28 to fill the input; image 1 by 128/150 to 128x77, padded right."""
SAMPLES = 400
PROBABILITY_ROWS = 25
OUT = DATA_DIR / 'mmdet_rtmdet_ins_tiny_reference.npz'


def resized_hw(original_hw):
    """mmcv's keep-ratio `Resize` to (HEIGHT, WIDTH) (int(side * scale + 0.5))."""
    scale = min(HEIGHT / original_hw[0], WIDTH / original_hw[1])
    return tuple(int(side * scale + 0.5) for side in original_hw)


def test_input() -> torch.Tensor:
    """Two calibration images at HEIGHT x WIDTH; image 1's padded columns are 0."""
    images = calibration_images(seed=7, count=2, size=WIDTH)[:, :, :HEIGHT, :WIDTH].contiguous()
    images[1, :, :, resized_hw(ORIGINAL_HW[1])[1]:] = 0
    return images


def samples_metainfo() -> list[dict]:
    metas = []
    for original in ORIGINAL_HW:
        resized = resized_hw(original)
        # img_shape is the padded input: RTMDet's `Pad` sets it, and boxes clamp to it
        metas.append(dict(img_shape=(HEIGHT, WIDTH), ori_shape=original,
                          pad_shape=(HEIGHT, WIDTH), batch_input_shape=(HEIGHT, WIDTH),
                          scale_factor=(resized[1] / original[1], resized[0] / original[0])))
    return metas


def summary(name: str, tensor: torch.Tensor) -> dict:
    flat = tensor.flatten()
    index = torch.linspace(0, flat.numel() - 1, SAMPLES).long()
    return {f'{name}/shape': np.array(tensor.shape), f'{name}/index': index.numpy(),
            f'{name}/values': flat[index].numpy().astype(np.float32),
            f'{name}/abs_sum': np.float64(flat.double().abs().sum().item())}


def main() -> None:
    register_all_modules()
    config = Config.fromfile(mmcv_lite_shim.config_path(
        'rtmdet/rtmdet-ins_tiny_8xb32-300e_coco.py'))
    config.model.backbone.init_cfg = None
    mmcv_lite_shim.syncbn_to_bn(config.model)
    mm_model = MODELS.build(config.model).eval()

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ours = randomize_detector(build_model('rtmdet-ins-tiny'), seed=0)
    mm_model.load_state_dict(ours.state_dict(), strict=True)

    images = test_input()
    metas = samples_metainfo()
    head = mm_model.bbox_head
    mask_logits = []
    original_mask_predict = head._mask_predict_by_feat_single

    def recording_mask_predict(*args, **kwargs):
        logits = original_mask_predict(*args, **kwargs)
        mask_logits.append(logits.clone())
        return logits
    head._mask_predict_by_feat_single = recording_mask_predict
    with torch.no_grad():
        cls_scores, bbox_preds, kernel_preds, mask_feat = head(mm_model.extract_feat(images))
        in_input = mm_model.predict(images, [DetDataSample(metainfo=m) for m in metas],
                                    rescale=False)
        mask_logits.clear()
        rescaled = mm_model.predict(images, [DetDataSample(metainfo=m) for m in metas],
                                    rescale=True)
        # a checkpoint saved by detdeploy, loaded strictly by mmengine, predicts the same
        with tempfile.TemporaryDirectory() as folder:
            path = f'{folder}/ins.pth'
            save_checkpoint(path, ours, get_spec('rtmdet-ins-tiny'),
                            get_spec('rtmdet-ins-tiny').class_names)
            reloaded = MODELS.build(config.model).eval()
            load_checkpoint(reloaded, path, map_location='cpu', strict=True)
            again = reloaded.predict(images, [DetDataSample(metainfo=m) for m in metas],
                                     rescale=True)
    same = all(torch.equal(a.pred_instances.masks, b.pred_instances.masks)
               and torch.equal(a.pred_instances.bboxes, b.pred_instances.bboxes)
               for a, b in zip(again, rescaled))

    arrays = {}
    for kind, levels in (('cls_scores', cls_scores), ('bbox_preds', bbox_preds),
                         ('kernel_preds', kernel_preds)):
        for level, tensor in enumerate(levels):
            arrays.update(summary(f'{kind}.{level}', tensor))
    arrays.update(summary('mask_feat', mask_feat))
    for image, (plain, scaled, logits) in enumerate(zip(in_input, rescaled, mask_logits)):
        det, det_scaled = plain.pred_instances, scaled.pred_instances
        assert torch.equal(det.scores, det_scaled.scores)
        arrays[f'image{image}/boxes'] = det.bboxes.numpy()
        arrays[f'image{image}/boxes_rescaled'] = det_scaled.bboxes.numpy()
        arrays[f'image{image}/scores'] = det.scores.numpy()
        arrays[f'image{image}/labels'] = det.labels.numpy().astype(np.int32)
        arrays[f'image{image}/probabilities'] = logits[:PROBABILITY_ROWS].sigmoid().numpy()
        masks = det_scaled.masks.numpy()
        arrays[f'image{image}/masks_shape'] = np.array(masks.shape)
        arrays[f'image{image}/masks_packed'] = np.packbits(masks.reshape(-1))
        arrays[f'image{image}/scale_factor'] = np.array(metas[image]['scale_factor'])
        arrays[f'image{image}/ori_shape'] = np.array(metas[image]['ori_shape'])
        fractions = masks.reshape(len(masks), -1).mean(1)
        print(f'image {image}: {len(det.scores)} detections, mask area fraction '
              f'{fractions.min():.3f}..{fractions.max():.3f}, '
              f'{(fractions == 0).sum()} empty')
    arrays['saved_checkpoint_loads_strictly_and_predicts_the_same'] = np.bool_(same)
    arrays['about'] = np.array(
        f'MMDetection {mmdet.__version__} rtmdet-ins_tiny_8xb32-300e_coco (official config, '
        'SyncBN->BN, mmcv nms kernel ported to python) on weights from tests/conftest.py: '
        'torch.manual_seed(0); randomize_detector(build_model("rtmdet-ins-tiny"), seed=0); one '
        f'torch thread; input tools/make_mmdet_reference_rtmdet_ins.test_input() ({HEIGHT}x'
        f'{WIDTH}, 2 images, original sizes {ORIGINAL_HW}); the config test_cfg')
    np.savez_compressed(OUT, **arrays)
    print(f'detdeploy checkpoint in mmengine load_checkpoint(strict=True): loaded; '
          f'predictions identical: {same}')
    print(f'wrote {OUT} ({OUT.stat().st_size} bytes)')


if __name__ == '__main__':
    sys.exit(main())
